"""SmoothQuant: exact float rescaling, folding vs inserted Mul, measured gain on INT8, saved scales."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxopt.passes.quantize import QuantizeConfig, QuantizePass

from onnxopt.context import PassContext
from onnxopt.errors import DataError
from onnxopt.quant import scales as quant_math
from onnxopt.quant import smooth
from onnxopt.runtime import sessions as runtime
from onnxopt.runtime.data import Dataset
from onnxopt.testing.bert_builder import bert_feeds, make_bert

HIDDEN, OUT = 32, 24
OUTLIERS = [3, 17]
CONV_OUTLIERS = [2, 11]


def ln_model(k: float, *, residual: bool = False, gemm: bool = False, seed: int = 0) -> ir.Model:
    """x -> LayerNormalization -> two linears; channels OUTLIERS of the LN output are k times larger
    and the weight rows reading them k times smaller (as in trained transformers)."""
    rng = np.random.default_rng(seed)
    gamma = (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
    beta = (0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
    gamma[OUTLIERS] *= k
    beta[OUTLIERS] *= k
    inits = [numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(beta, "beta")]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["y"], name="ln", axis=-1)]
    outputs = []
    for i in range(2):
        w = (rng.standard_normal((HIDDEN, OUT)) * 0.2).astype(np.float32)
        w[OUTLIERS] /= k
        if gemm:  # Gemm with transB=1 reads W^T
            inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), f"w{i}"))
            nodes.append(helper.make_node("Gemm", ["y", f"w{i}"], [f"out{i}"], name=f"gemm{i}", transB=1))
        else:
            inits.append(numpy_helper.from_array(w, f"w{i}"))
            nodes.append(helper.make_node("MatMul", ["y", f"w{i}"], [f"out{i}"], name=f"mm{i}"))
        outputs.append(f"out{i}")
    if residual:  # the normalized tensor also feeds something that is not a linear layer
        nodes.append(helper.make_node("Relu", ["y"], ["res"], name="res"))
        outputs.append("res")
    shape = ["N", HIDDEN] if gemm else ["N", 8, HIDDEN]
    graph = helper.make_graph(
        nodes, "ln_linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [*shape[:-1], HIDDEN if o == "res" else OUT]) for o in outputs],
        inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto, full_check=True)
    return ir.from_proto(proto)


def _conv_weights(k: float, seed: int) -> tuple[np.ndarray, ...]:
    """Conv 3x3 (8 -> 16) weights and bias whose CONV_OUTLIERS output channels are k times larger,
    depthwise 3x3 weights k times smaller on those channels, pointwise 1x1 (16 -> 12)."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((16, 8, 3, 3)) * 0.2).astype(np.float32)
    b1 = (rng.standard_normal(16) * 0.1).astype(np.float32)
    w1[CONV_OUTLIERS] *= k
    b1[CONV_OUTLIERS] *= k
    dw = (rng.standard_normal((16, 1, 3, 3)) * 0.3).astype(np.float32)
    dw[CONV_OUTLIERS] /= k
    pw = (rng.standard_normal((12, 16, 1, 1)) * 0.3).astype(np.float32)
    return w1, b1, dw, pw


def _conv_model(nodes: list, inits: list, name: str) -> ir.Model:
    """x [N, 8, 12, 12] -> ``nodes`` -> y [N, 12, 12, 12], opset 17, checked."""
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 12, 12, 12])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto, full_check=True)
    return ir.from_proto(proto)


def conv_model(k: float, *, relu: bool = True, seed: int = 0) -> ir.Model:
    """x -> Conv 3x3 (8 -> 16) [-> Relu] -> depthwise 3x3 -> pointwise 1x1 (16 -> 12); output
    channels CONV_OUTLIERS of the first Conv are k times larger, the depthwise weights reading them
    k times smaller: conv -> conv pairs whose activations have outlier channels."""
    w1, b1, dw, pw = _conv_weights(k, seed)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (dw, "dw"), (pw, "pw"))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1])]
    if relu:
        nodes.append(helper.make_node("Relu", ["c1"], ["r1"], name="relu1"))
    nodes += [helper.make_node("Conv", ["r1" if relu else "c1", "dw"], ["d"], name="dw", group=16, pads=[1, 1, 1, 1]),
              helper.make_node("Conv", ["d", "pw"], ["y"], name="pw")]
    return _conv_model(nodes, inits, "conv_pairs")


def conv_feeds(n: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((2, 8, 12, 12)).astype(np.float32)} for _ in range(n)]


def feeds(n: int, *, gemm: bool = False, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    shape = (16, HIDDEN) if gemm else (4, 8, HIDDEN)
    return [{"x": (rng.standard_normal(shape) * 2 + 0.5).astype(np.float32)} for _ in range(n)]


def outputs(model: ir.Model, data) -> np.ndarray:
    with runtime.session(model, opt_level="all") as s:
        return np.concatenate([np.concatenate([v.ravel() for v in s.run(f).values()]) for f in data])


def quantize(model: ir.Model, data, **options) -> object:
    options = {"latency_runs": 0, "sqnr_samples": 0, "calibration_method": "minmax", **options}
    ctx = PassContext(calibration=Dataset.from_feeds(data), quiet=True)
    return QuantizePass(QuantizeConfig(**options), ctx)(model)


@pytest.mark.parametrize("gemm", [False, True])
def test_folding_into_layernorm_is_exact_and_evens_out_channels(gemm):
    model = ln_model(30.0, gemm=gemm)
    ref = outputs(model, feeds(3, gemm=gemm, seed=5))
    done = smooth.smooth(model, feeds(8, gemm=gemm), 0.5)
    assert done.inserted == [] and len(done.records) == 1
    rec = done.records[0]
    assert rec["how"] == "folded into ln" and rec["consumers"] == 2
    assert rec["outlier_ratio_before"] > 20 and rec["outlier_ratio_after"] < 6
    assert sorted(n.op_type for n in model.graph) == sorted(["LayerNormalization"] + (["Gemm"] * 2 if gemm else ["MatMul"] * 2))
    np.testing.assert_allclose(outputs(model, feeds(3, gemm=gemm, seed=5)), ref, rtol=1e-5, atol=1e-5)


def test_normalized_tensor_with_another_reader_gets_a_float_mul_that_reads_it_unquantized():
    model = ln_model(30.0, residual=True)
    ref = outputs(model, feeds(3, seed=5))
    report = quantize(model, feeds(8))
    assert report.counts["smoothed_activations"] == 1
    mul = next(n for n in model.graph if n.op_type == "Mul")
    assert mul.inputs[0].name == "y" and mul.inputs[0].producer().op_type == "LayerNormalization"
    assert any("SmoothQuant scaling, kept float" in reason for reason in report.skipped)
    # The MatMuls read the quantized Mul output; the Relu reads the quantized LN output.
    for name in ("mm0", "mm1"):
        node = next(n for n in model.graph if n.name == name)
        assert node.inputs[0].producer().op_type == "DequantizeLinear"
    got = outputs(model, feeds(3, seed=5))
    # Measured 0.0023 (8-bit weights) / 0.0029 (7-bit, what reduce_range=auto may pick on an x86
    # CPU without VNNI), the same through integer kernels and QDQ math: 0.02 is 7x the worse.
    assert quant_math.relative_l2(ref, got) < 0.02


def test_smoothing_shrinks_int8_error_on_outlier_channels_and_is_measurable_on_off():
    data, evals = feeds(8), feeds(4, seed=7)
    ref = outputs(ln_model(30.0), evals)
    off, on = ln_model(30.0), ln_model(30.0)
    quantize(off, data, smooth_quant=0.0)
    report = quantize(on, data)  # default alpha 0.5
    err_off = quant_math.relative_l2(ref, outputs(off, evals))
    err_on = quant_math.relative_l2(ref, outputs(on, evals))
    assert report.counts["smoothed_activations"] == 1
    # Measured err_off / err_on = 16.6 (8-bit weights) / 14.2 (7-bit); both models are built and
    # run on the same CPU, so its choices apply to both alike.
    assert err_on < err_off / 3, (err_on, err_off)


def test_activations_without_outlier_channels_are_left_alone():
    model = ln_model(1.0)
    before = {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items()}
    report = quantize(model, feeds(8))
    assert report.counts.get("smoothed_activations", 0) == 0
    rec = next(r for r in report.records if r["item"] == "smooth:y")
    assert rec["how"].startswith("left: no outlier channels")
    np.testing.assert_array_equal(before["gamma"], next(n for n in model.graph if n.op_type == "LayerNormalization")
                                  .inputs[1].const_value.numpy())


def test_saved_table_carries_the_scales_and_reproduces_the_model(tmp_path):
    table = tmp_path / "calib.json"
    first = ln_model(30.0)
    quantize(first, feeds(8), save_calib_table=str(table))
    doc = json.loads(table.read_text())
    assert list(doc["smoothing"]) == ["y"] and len(doc["smoothing"]["y"]) == HIDDEN
    second = ln_model(30.0)
    report = QuantizePass(QuantizeConfig(calib_table=str(table), latency_runs=0, sqnr_samples=0),
                          PassContext(quiet=True))(second)
    assert any("SmoothQuant scales of 1 tensors applied" in n for n in report.notes)
    evals = feeds(2, seed=9)
    np.testing.assert_array_equal(outputs(first, evals), outputs(second, evals))


def test_table_scales_for_another_model_are_refused(tmp_path):
    model = ln_model(30.0)
    with pytest.raises(DataError, match="'nope' is not a smoothable activation"):
        smooth.smooth(model, None, scales={"nope": (1.0,) * HIDDEN})
    with pytest.raises(DataError, match="'y' is not a smoothable activation with 3 channels"):
        smooth.smooth(model, None, scales={"y": (1.0, 2.0, 3.0)})


def test_alpha_is_validated():
    with pytest.raises(ValueError, match="smooth_quant must be in"):
        QuantizeConfig(smooth_quant=1.5)
    with pytest.raises(ValueError, match="alpha must be in"):
        smooth.smooth(ln_model(1.0), feeds(1), 0.0)


def test_written_out_layernorm_and_post_ln_bert_keep_their_function():
    # A BERT in primitives (LayerNorm as ReduceMean/Sub/Pow/Sqrt/Div/Mul/Add), post-LN: the
    # normalized tensors also feed residual Adds, so every smoothed group gets a float Mul.
    model = ir.from_proto(make_bert(outlier_scale=30.0))
    evals = bert_feeds(2, seed=3)
    ref = outputs(model, evals)
    done = smooth.smooth(model, bert_feeds(8), 0.5, min_ratio=4.0)
    assert len(done.scales) == 4 and len(done.inserted) == 4
    got = outputs(model, evals)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


def test_bert_int8_keeps_layernorm_parts_and_the_minus_1e4_mask_float():
    model = ir.from_proto(make_bert())
    report = quantize(model, bert_feeds(8), smooth_quant=0.0)
    reasons = " | ".join(report.skipped)
    assert "its scale (gamma) of a LayerNorm written out in primitives" in reasons
    assert "its bias (beta) of a LayerNorm written out in primitives" in reasons
    assert "its variance + epsilon of a LayerNorm written out in primitives" in reasons
    assert "attention mask" in reasons


@pytest.mark.parametrize("relu", [True, False])
def test_conv_pairs_are_equalised_exactly_through_relu_and_depthwise(relu):
    model = conv_model(30.0, relu=relu)
    evals = conv_feeds(2, seed=5)
    ref = outputs(model, evals)
    done = smooth.smooth(model, conv_feeds(4), 0.5)
    assert [r["how"] for r in done.records] == ["folded into conv1", "folded into dw"]
    assert done.records[0]["outlier_ratio_before"] > 10 and done.records[0]["outlier_ratio_after"] < 4
    assert done.inserted == []
    np.testing.assert_allclose(outputs(model, evals), ref, rtol=1e-4, atol=1e-4)


def test_depthwise_inputs_are_evened_whatever_their_spread_only_with_rescaling():
    """The alpha-1 evening of every depthwise input comes with rescale_conv_outputs (it cost PP-OCR rec
    lines decoded as FP32 when on by default); without it a depthwise input below min_ratio is left."""
    how = {}
    for flag in (False, True):
        done = smooth.smooth(conv_model(1.0), conv_feeds(4), 0.5, min_ratio=4.0, rescale_conv_outputs=flag)
        how[flag] = {r["tensor"]: r for r in done.records}
    assert how[False]["r1"]["outlier_ratio_before"] < 4.0 and how[False]["r1"]["how"].startswith("left")
    assert how[True]["r1"]["how"] == "folded into conv1" and how[True]["r1"]["outlier_ratio_after"] < 1.1


def test_conv_equalisation_shrinks_int8_error_on_outlier_channels():
    data, evals = conv_feeds(8), conv_feeds(4, seed=7)
    ref = outputs(conv_model(30.0), evals)
    off, on = conv_model(30.0), conv_model(30.0)
    quantize(off, data, smooth_quant=0.0)
    report = quantize(on, data)
    assert report.counts["smoothed_activations"] >= 1
    err_off = quant_math.relative_l2(ref, outputs(off, evals))
    err_on = quant_math.relative_l2(ref, outputs(on, evals))
    # Measured err_off / err_on = 5.0 (8-bit weights) / 4.1 (7-bit, reduce_range=auto's other
    # outcome), at both opt levels: the worse still 1.4x over the claimed 3x.
    assert err_on < err_off / 3, (err_on, err_off)


@pytest.mark.parametrize("build", ["ln", "conv"])
def test_a_second_build_in_one_context_reuses_smoothing_and_calibration(build, monkeypatch):
    """mixed builds many plans of one model: SmoothQuant writes new weight tensors each time, so
    the calibration cache keys weights by content and the smoothing scales are cached too."""
    from onnxopt.quant import calibration

    make, data = (ln_model, feeds(8)) if build == "ln" else (conv_model, conv_feeds(8))
    runs = {"calibrate": 0, "channel_stats": 0}
    collect, stats = calibration.collect_ranges, smooth.channel_stats

    def counted_collect(*a, **k):
        runs["calibrate"] += 1
        return collect(*a, **k)

    def counted_stats(*a, **k):
        runs["channel_stats"] += 1
        return stats(*a, **k)

    monkeypatch.setattr(calibration, "collect_ranges", counted_collect)
    monkeypatch.setattr(smooth, "channel_stats", counted_stats)
    ctx = PassContext(calibration=Dataset.from_feeds(data), quiet=True)
    config = QuantizeConfig(latency_runs=0, sqnr_samples=0, calibration_method="minmax")
    first, second = make(30.0), make(30.0)
    r1 = QuantizePass(config, ctx)(first)
    r2 = QuantizePass(config, ctx)(second)
    assert r1.counts["smoothed_activations"] == r2.counts["smoothed_activations"] == 1
    assert runs == {"calibrate": 1, "channel_stats": 1}, runs
    assert [r for r in r1.records if r["item"].startswith("smooth:")] == [
        r for r in r2.records if r["item"].startswith("smooth:")]
    evals = conv_feeds(2, seed=9) if build == "conv" else feeds(2, seed=9)
    np.testing.assert_array_equal(outputs(first, evals), outputs(second, evals))  # the same model, bit for bit


def _hardswish(nodes: list, x: str, name: str) -> str:
    """HardSwish as exporters write it out: x * clip(x + 3, 0, 6) / 6 (the PaddlePaddle/PyTorch form)."""
    nodes += [helper.make_node("Add", [x, "three"], [f"{name}_a"], name=f"{name}_add"),
              helper.make_node("Clip", [f"{name}_a", "zero", "six"], [f"{name}_c"], name=f"{name}_clip"),
              helper.make_node("Mul", [x, f"{name}_c"], [f"{name}_m"], name=f"{name}_mul"),
              helper.make_node("Div", [f"{name}_m", "six"], [f"{name}_o"], name=f"{name}_div")]
    return f"{name}_o"


def hardswish_model(k: float, *, residual: bool = False, seed: int = 0) -> ir.Model:
    """x -> Conv 3x3 (8 -> 16) -> HardSwish -> depthwise 3x3 -> HardSwish -> pointwise 1x1 (16 -> 12).

    Output channels CONV_OUTLIERS of the first Conv are k times larger (and the depthwise weights
    reading them k times smaller), as in MobileNetV3/PP-LCNet backbones. HardSwish is not
    positively homogeneous, so the Conv -> Conv equalisation cannot pass through it. With
    ``residual`` the first Conv's output is also added to the depthwise output (not an activation part).
    """
    w1, b1, dw, pw = _conv_weights(k, seed)
    consts = ((w1, "w1"), (b1, "b1"), (dw, "dw"), (pw, "pw"), (np.float32(3), "three"), (np.float32(0), "zero"),
              (np.float32(6), "six"))
    inits = [numpy_helper.from_array(np.asarray(a), n) for a, n in consts]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1])]
    h1 = _hardswish(nodes, "c1", "hs1")
    nodes.append(helper.make_node("Conv", [h1, "dw"], ["d"], name="dw", group=16, pads=[1, 1, 1, 1]))
    if residual:
        nodes.append(helper.make_node("Add", ["d", "c1"], ["d_res"], name="residual"))
    h2 = _hardswish(nodes, "d_res" if residual else "d", "hs2")
    nodes.append(helper.make_node("Conv", [h2, "pw"], ["y"], name="pw"))
    return _conv_model(nodes, inits, "hardswish")


def test_hardswish_conv_outputs_are_rescaled_and_the_depthwise_input_evened_out_exactly():
    model = hardswish_model(30.0)
    evals = conv_feeds(2, seed=5)
    ref = outputs(model, evals)
    done = smooth.smooth(model, conv_feeds(4), 0.5, min_ratio=4.0, rescale_conv_outputs=True)
    how = {r["tensor"]: r["how"] for r in done.records}
    assert how["c1"].startswith("folded into conv1, float Mul restores it")
    assert how["hs1_o"] == "folded into hs1_div"  # depthwise reader: evened out whatever its spread
    by_tensor = {r["tensor"]: r for r in done.records}
    assert by_tensor["c1"]["outlier_ratio_before"] > 10 and by_tensor["c1"]["outlier_ratio_after"] < 1.5
    assert len(done.rescaled) == 2 and done.inserted == []  # c1 and the depthwise output d
    # Exact up to float32 rounding: each value is multiplied and divided by the same per-channel
    # factor (a few ulps, ~1e-7 relative each) before a 3-Conv chain; 1e-4 leaves 100x margin.
    np.testing.assert_allclose(outputs(model, evals), ref, rtol=1e-4, atol=1e-4)


def test_conv_read_by_a_residual_add_is_not_rescaled():
    model = hardswish_model(30.0, residual=True)
    done = smooth.smooth(model, conv_feeds(4), 0.5, min_ratio=4.0, rescale_conv_outputs=True)
    assert "c1" not in {r["tensor"] for r in done.records}  # its Add reader mixes in another tensor
    assert "d_res" not in {r["tensor"] for r in done.records}  # an Add output, not a Conv's


def test_hardswish_rescaling_shrinks_int8_error_and_keeps_integer_convs():
    data, evals = conv_feeds(8), conv_feeds(4, seed=7)
    ref = outputs(hardswish_model(30.0), evals)
    off, on = hardswish_model(30.0), hardswish_model(30.0)
    quantize(off, data, smooth_quant=0.0)
    report = quantize(on, data, rescale_conv_outputs="true")
    assert report.counts["quantized_Conv"] == 3
    # The Conv outputs stay quantized (so onnxruntime runs QLinearConv); the restoring Mul and
    # the HardSwish parts after it read the dequantized tensor and stay float.
    producers = {n.outputs[0].name: n for n in on.graph}
    q_inputs = {n.inputs[0].name for n in on.graph if n.op_type == "QuantizeLinear"}
    assert "c1" in q_inputs and "d" in q_inputs
    # The float HardSwish chains are fused (HardSwish, then a Mul by the folded channel scales,
    # whose output is the depthwise Conv's quantized input), so no Q sits inside a chain.
    assert report.counts["float_hardswish_fused"] >= 1 and any(n.op_type == "HardSwish" for n in on.graph)

    def inside_chain(node) -> bool:
        if node is None or node.op_type in ("Add", "Clip"):
            return node is not None
        return node.op_type == "Mul" and (node.inputs[0].producer() is None
                                          or node.inputs[0].producer().op_type != "HardSwish")

    assert not any(n.op_type == "QuantizeLinear" and inside_chain(producers.get(n.inputs[0].name)) for n in on.graph)
    assert any("channel scales back" in reason for reason in report.skipped)
    err_off = quant_math.relative_l2(ref, outputs(off, evals))
    err_on = quant_math.relative_l2(ref, outputs(on, evals))
    # Off, the 14 ordinary channels of c1 and of the HardSwish output share one scale with the two
    # 30x larger ones: their step is ~30x too coarse, so their rounding error dominates. On, every
    # channel's range is ~1 under its own factor; the error should drop by an order of magnitude.
    # A 3x drop is claimed (the same margin as the Conv -> Conv equalisation test above).
    assert err_on < err_off / 3, (err_on, err_off)


def test_rescale_auto_keeps_the_build_closer_to_float():
    """rescale_conv_outputs=auto (default) builds both and keeps the one measured closer to FP32."""
    data, evals = conv_feeds(8), conv_feeds(2, seed=3)
    for k in (30.0, 1.0):
        auto, on, off = hardswish_model(k), hardswish_model(k), hardswish_model(k)
        report = quantize(auto, data)
        (rec,) = [r for r in report.records if r["item"] == "rescale_conv_outputs"]
        assert rec["rescaled"] == (rec["worst_rel_l2_on"] < rec["worst_rel_l2_off"])
        quantize(on, data, rescale_conv_outputs="true")
        quantize(off, data, rescale_conv_outputs="false")
        np.testing.assert_array_equal(outputs(auto, evals), outputs(on if rec["rescaled"] else off, evals))
        if k == 30.0:  # 30x outlier channels: rescaling cuts the INT8 error >= 3x (test above)
            assert rec["rescaled"]
    plain = ln_model(30.0)  # no Conv read by a written-out activation: one build, nothing recorded
    report = quantize(plain, feeds(4))
    assert not [r for r in report.records if r["item"] == "rescale_conv_outputs"]


def test_nothing_around_written_out_activations_unless_asked():
    """Without rescale_conv_outputs neither rewrite runs: no rescaled Conv, no fold into the "/ 6"."""
    model = hardswish_model(30.0)
    done = smooth.smooth(model, conv_feeds(4), 0.5, min_ratio=4.0)
    assert done.rescaled == [] and not {"c1", "hs1_o"} & {r["tensor"] for r in done.records}
    assert smooth.has_rescalable_convs(model)
