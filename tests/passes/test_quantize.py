"""quantize: exact Q/DQ structure per rule, numerics in onnxruntime, fusion, contracts."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnxopt.passes.quantize import QuantizeConfig, QuantizePass

from onnxopt import io
from onnxopt.context import PassContext
from onnxopt.quant import calibration
from onnxopt.runtime import sessions as runtime
from onnxopt.runtime.data import Dataset


def _arr(a: np.ndarray) -> str:
    return ",".join(f"{v:.6f}" for v in np.asarray(a, dtype=np.float32).ravel())


def _run_pass(model: ir.Model, feeds, **options) -> tuple[ir.Model, object]:
    options.setdefault("latency_runs", 0)
    options.setdefault("calibration_method", "minmax")  # no clipping: the 2 x scale bound holds
    # The same QDQ graph on every CPU: reduce_range=auto would measure 8- against 7-bit weights on
    # an x86 CPU without VNNI and could keep either (with 7-bit weights this file's bias correction
    # is measured worse on its check feed and rolled back). auto has its own tests below.
    options.setdefault("reduce_range", "false")
    ctx = PassContext(calibration=Dataset.from_feeds(feeds), quiet=True)
    report = QuantizePass(QuantizeConfig(**options), ctx)(model)
    return model, report


def _ops(model: ir.Model) -> collections.Counter[str]:
    return collections.Counter(n.op_type for n in model.graph.all_nodes())


def _dq_input_dtypes(model: ir.Model) -> collections.Counter[str]:
    return collections.Counter(n.inputs[0].const_value.dtype.name if n.inputs[0].const_value is not None
                               else "activation" for n in model.graph if n.op_type == "DequantizeLinear")


def _outputs(model: ir.Model, feeds) -> list[dict[str, np.ndarray]]:
    with runtime.session(model) as s:
        return runtime.run_all(s, feeds)


def _output_scale(model: ir.Model, name: str) -> float:
    """The output's quantization scale; 0 for a MatMul/Gemm output, which stays float."""
    out = next(v for v in model.graph.outputs if v.name == name)
    dq = out.producer()
    assert dq is not None
    if dq.op_type in ("MatMul", "Gemm"):
        return 0.0
    assert dq.op_type == "DequantizeLinear", "output is not quantized"
    return float(dq.inputs[1].const_value.numpy())


def _scales(model: ir.Model, *, weights: bool) -> list[np.ndarray]:
    """Scales of the weight DequantizeLinear nodes (int8 constants), or of the activation ones."""
    out = []
    for n in model.graph:
        if n.op_type != "DequantizeLinear":
            continue
        const = n.inputs[0].const_value
        is_weight = const is not None and const.dtype == ir.DataType.INT8
        if is_weight == weights:
            out.append(n.inputs[1].const_value.numpy())
    return out


def _linear_atol(quant: ir.Model, w: np.ndarray, x_absmax: float, reduce_axes: tuple[int, ...]) -> float:
    """Worst-case error of one quantized linear layer y = W x (+ b), then 2 x output scale.

    Rounding x costs at most s_x / 2 per term, rounding W at most s_w / 2 per term, so
    |dy| <= s_x / 2 * sum|W| + |x|max * K * s_w / 2 over the accumulation axis, plus the output
    rounding; every scale is read back from the quantized model.
    """
    s_x = max(float(s.max()) for s in _scales(quant, weights=False))
    s_w = max(float(s.max()) for s in _scales(quant, weights=True))
    k = int(np.prod([w.shape[a] for a in reduce_axes]))
    row = float(np.abs(w).sum(axis=reduce_axes).max())
    return s_x / 2 * row + x_absmax * k * s_w / 2


def _extra(ref: ir.Model, quant: ir.Model, feeds, reduce_axes: tuple[int, ...]) -> float:
    w = ref.graph.initializers["w"].const_value.numpy()
    return _linear_atol(quant, w, max(float(np.abs(f["x"]).max()) for f in feeds), reduce_axes)


def _assert_close_to_float(ref: ir.Model, quant: ir.Model, feeds, output: str = "y", extra: float = 0.0) -> None:
    """atol = 2 x output scale (tests/tolerances.py) + ``extra`` (propagated input rounding).

    ``extra`` is a worst-case bound (every rounding error at its maximum, same sign), so it
    holds on any CPU; float32 accumulation order (threads, SIMD width) moves outputs of order 1
    by ~1e-6, far inside it. 1e-5 is added for that when the output is float (no output scale).
    """
    atol = 2 * _output_scale(quant, output) + extra + 1e-5
    for r, q in zip(_outputs(ref, feeds), _outputs(quant, feeds), strict=True):
        np.testing.assert_allclose(q[output], r[output], rtol=0, atol=atol)


def conv_relu(rng, opset: int = 17) -> ir.Model:
    w = rng.standard_normal((4, 3, 3, 3)) * 0.3
    b = rng.standard_normal(4) * 0.1
    return ir.from_onnx_text(f"""
<ir_version: 8, opset_import: ["" : {opset}]>
g (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y) <float[4, 3, 3, 3] w = {{{_arr(w)}}}, float[4] b = {{{_arr(b)}}}> {{
    c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    y = Relu(c)
}}""")


def image_feeds(rng, n: int = 4):
    return [{"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)} for _ in range(n)]


def test_conv_relu_structure_dtypes_and_numerics(rng):
    model, feeds = conv_relu(rng), image_feeds(rng)
    ref = model.clone()
    model, report = _run_pass(model, feeds)
    assert report.counts["quantized_Conv"] == 1 and report.counts["relu_clip_absorbed"] == 1
    assert _ops(model) == {"QuantizeLinear": 2, "DequantizeLinear": 4, "Conv": 1, "Relu": 1}
    assert _dq_input_dtypes(model) == {"activation": 2, "INT8": 1, "INT32": 1}
    weight_dq = next(n for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None
                     and n.inputs[0].const_value.dtype == ir.DataType.INT8)
    assert weight_dq.attributes["axis"].value == 0 and weight_dq.inputs[1].const_value.shape == (4,)
    for q in (n for n in model.graph if n.op_type == "QuantizeLinear"):
        assert q.inputs[2].const_value.dtype == ir.DataType.UINT8
    # Relu is absorbed: the quantized tensor is the Relu output, its zero point is 0.
    assert _ops(model)["Relu"] == 1 and model.graph.outputs[0].producer().op_type == "DequantizeLinear"
    assert int(model.graph.outputs[0].producer().inputs[2].const_value.numpy()) == 0
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    _assert_close_to_float(ref, model, feeds, extra=_extra(ref, model, feeds, (1, 2, 3)))


def test_onnxruntime_fuses_into_integer_kernels(rng, tmp_path):
    model, _ = _run_pass(conv_relu(rng), image_feeds(rng))
    mm, _ = _run_pass(matmul_model(rng), vector_feeds(rng))
    # The MatMul writes the graph output, which stays float: an integer kernel with a float output.
    for m, kernel, op in ((model, "QLinearConv", "Conv"), (mm, "MatMulIntegerToFloat", "MatMul")):
        path = tmp_path / f"{kernel}.onnx"
        with runtime.session(m, opt_level="extended", optimized_model_path=path):
            pass
        fused = _ops(io.load_model(path))
        assert fused[kernel] == 1, fused
        assert op not in fused


def matmul_model(rng, transposed_gemm: bool = False) -> ir.Model:
    w = rng.standard_normal((16, 8)) * 0.3
    return ir.from_onnx_text(f"""
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 16] x) => (float[N, 8] y) <float[16, 8] w = {{{_arr(w)}}}> {{
    y = MatMul(x, w)
}}""")


def vector_feeds(rng, n: int = 4, width: int = 16):
    return [{"x": rng.standard_normal((5, width)).astype(np.float32)} for _ in range(n)]


def test_matmul_weight_is_per_column(rng):
    model, feeds = matmul_model(rng), vector_feeds(rng)
    ref = model.clone()
    model, _report = _run_pass(model, feeds)
    # x only: y is a graph output written by a MatMul, which stays float (unclipped).
    assert _ops(model) == {"QuantizeLinear": 1, "DequantizeLinear": 2, "MatMul": 1}
    wdq = next(n for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None)
    assert wdq.attributes["axis"].value == 1 and wdq.inputs[1].const_value.shape == (8,)
    _assert_close_to_float(ref, model, feeds, extra=_extra(ref, model, feeds, (0,)))
    per_tensor, _ = _run_pass(matmul_model(rng), feeds, per_tensor=True)
    wdq = next(n for n in per_tensor.graph if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None)
    assert "axis" not in wdq.attributes and wdq.inputs[1].const_value.shape == ()


def test_gemm_trans_b_bias_and_int8_activations(rng):
    w = rng.standard_normal((8, 16)) * 0.3
    b = rng.standard_normal(8) * 0.1
    model = ir.from_onnx_text(f"""
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 16] x) => (float[N, 8] y) <float[8, 16] w = {{{_arr(w)}}}, float[8] b = {{{_arr(b)}}}> {{
    y = Gemm <transB = 1> (x, w, b)
}}""")
    feeds = vector_feeds(rng)
    ref = model.clone()
    model, report = _run_pass(model, feeds, activation_type="int8", symmetric_activations=True)
    assert report.counts["int32_biases"] == 1
    wdq = next(n for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None
               and n.inputs[0].const_value.dtype == ir.DataType.INT8)
    assert wdq.attributes["axis"].value == 0
    for q in (n for n in model.graph if n.op_type == "QuantizeLinear"):
        assert q.inputs[2].const_value.dtype == ir.DataType.INT8 and int(q.inputs[2].const_value.numpy()) == 0
    _assert_close_to_float(ref, model, feeds, extra=_extra(ref, model, feeds, (1,)))


def test_elementwise_and_data_movement_rules(rng):
    model = ir.from_onnx_text("""
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 3, 8, 8] x, float[N, 3, 8, 8] z) => (float[N, 12, 4, 4] y) <float k = {0.5}> {
    a = Add(x, z)
    m = Mul(a, k)
    p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (m)
    t = Transpose <perm = [0, 1, 3, 2]> (p)
    av = AveragePool <kernel_shape = [2, 2], strides = [2, 2]> (m)
    c = Concat <axis = 1> (p, t, av, av)
    y = Relu(c)
}""")
    feeds = [{"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32),
              "z": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    ref = model.clone()
    model, report = _run_pass(model, feeds)
    for op in ("Add", "Mul", "MaxPool", "Transpose", "AveragePool", "Concat"):
        assert report.counts[f"quantized_{op}"] == 1, op
    # x, z, a, m, p (shared), t (shared), av, relu(c)
    assert _ops(model)["QuantizeLinear"] == 8
    pool = next(n for n in model.graph if n.op_type == "MaxPool")
    q_out = pool.outputs[0].uses()[0].node
    dq_in = pool.inputs[0].producer()
    assert q_out.op_type == "QuantizeLinear" and dq_in.op_type == "DequantizeLinear"
    assert q_out.inputs[1].const_value.numpy() == dq_in.inputs[1].const_value.numpy()  # shared scale
    _assert_close_to_float(ref, model, feeds, extra=sum(float(s) for s in _scales(model, weights=False)) / 2)


def test_attention_mask_add_stays_float_and_is_reported(rng):
    model = ir.from_onnx_text(f"""
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4, 4] s, float[N, 4, 4] mask) => (float[N, 4, 4] y) <float[4, 4] w = {{{_arr(rng.standard_normal((4, 4)))}}}> {{
    q = MatMul(s, w)
    a = Add(q, mask)
    y = Softmax <axis = -1> (a)
}}""")
    feeds = []
    for _ in range(3):
        m = np.where(rng.random((2, 4, 4)) < 0.3, -1e9, 0.0).astype(np.float32)
        feeds.append({"s": rng.standard_normal((2, 4, 4)).astype(np.float32), "mask": m})
    ref = model.clone()
    model, report = _run_pass(model, feeds)
    assert report.counts["quantized_MatMul"] == 1 and "quantized_Add" not in report.counts
    assert any("attention mask" in r for r in report.skipped) and any("attention mask" in n for n in report.notes)
    add = next(n for n in model.graph if n.op_type == "Add")
    assert add.inputs[1].name == "mask"  # the mask reaches the Add unquantized
    # Worst case: the quantized q = s @ w is off by at most its own rounding (s_q / 2) plus the
    # propagated input and weight rounding; Softmax moves each output by at most half the largest
    # change of its inputs (|d p_i| <= sum_j p_i |delta_ij - p_j| |d a_j| <= 2 p_i (1 - p_i) max|d a|).
    # Every scale is read back from the model, so the bound holds on any CPU.
    w = ref.graph.initializers["w"].const_value.numpy()
    s_q = float(model.graph.initializers["q_s"].const_value.numpy())
    q_err = s_q / 2 + _linear_atol(model, w, max(float(np.abs(f["s"]).max()) for f in feeds), (0,))
    for r, q in zip(_outputs(ref, feeds), _outputs(model, feeds), strict=True):
        np.testing.assert_allclose(q["y"], r["y"], rtol=0, atol=0.5 * q_err + 1e-6)


def test_no_op_on_a_graph_without_quantizable_ops(rng):
    model = ir.from_onnx_text("""
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x) => (float[N, 4] y) {
    y = Softmax <axis = -1> (x)
}""")
    before = ir.to_proto(model).SerializeToString()
    model, report = _run_pass(model, vector_feeds(rng, width=4))
    assert report.modified is False
    assert ir.to_proto(model).SerializeToString() == before


def test_config_and_precondition_errors(rng):
    with pytest.raises(ValueError, match="unknown op type 'Cnv' in exclude_ops"):
        QuantizeConfig(exclude_ops=frozenset({"Cnv"}))
    with pytest.raises(ValueError, match="percentile must be in"):
        QuantizeConfig(percentile=120)
    ctx = PassContext(calibration=Dataset.from_feeds(image_feeds(rng, 1)), quiet=True)
    with pytest.raises(ir.passes.PreconditionError, match="exclude_nodes: no node named 'nope'"):
        QuantizePass(QuantizeConfig(exclude_nodes=frozenset({"nope"})), ctx)(conv_relu(rng))
    with pytest.raises(ir.passes.PreconditionError, match="needs calibration data"):
        QuantizePass(QuantizeConfig())(conv_relu(rng))
    with pytest.raises(ir.passes.PreconditionError, match="opset >= 10, model has 9"):
        QuantizePass(QuantizeConfig(), ctx)(conv_relu(rng, opset=9))


def test_excluded_node_and_op_stay_float(rng):
    model = conv_relu(rng)
    conv = next(n for n in model.graph if n.op_type == "Conv")
    conv.name = "conv0"
    model, report = _run_pass(model, image_feeds(rng), exclude_nodes=frozenset({"conv0"}))
    assert report.modified is False and report.skipped["Conv: node excluded by config"] == 1
    model, report = _run_pass(conv_relu(rng), image_feeds(rng), exclude_ops=frozenset({"Conv"}))
    assert report.modified is False and report.skipped["Conv: op type excluded by config"] == 1


def test_opset_11_is_upgraded_and_still_matches(rng):
    model, feeds = conv_relu(rng, opset=11), image_feeds(rng)
    ref = model.clone()
    model, report = _run_pass(model, feeds)
    assert model.opset_imports[""] == 13 and report.counts["opset_upgraded"] == 1
    _assert_close_to_float(ref, model, feeds, extra=_extra(ref, model, feeds, (1, 2, 3)))


def test_saved_calibration_table_replaces_data(rng, tmp_path):
    model, feeds = conv_relu(rng), image_feeds(rng)
    _run_pass(conv_relu(np.random.default_rng(5)), feeds, save_calib_table=str(tmp_path / "saved.json"))
    table = calibration.collect_ranges(model, feeds, quiet=True)
    assert calibration.CalibrationTable.load(tmp_path / "saved.json").ranges["x"] == table.ranges["x"]
    table.save(tmp_path / "t.json")
    ref = model.clone()
    report = QuantizePass(QuantizeConfig(calib_table=str(tmp_path / "t.json")))(model)
    # no data: no SQNR, only the recorded reduce_range decision
    assert report.counts["quantized_Conv"] == 1 and [r["item"] for r in report.records] == ["reduce_range"]
    _assert_close_to_float(ref, model, feeds, extra=_extra(ref, model, feeds, (1, 2, 3)))


def test_sqnr_records_sorted_and_latency_measured(rng):
    _model, report = _run_pass(conv_relu(rng), image_feeds(rng), latency_runs=3)
    sqnr = [r for r in report.records if "sqnr_db" in r]
    assert {r["item"] for r in sqnr} == {"x", "y"}
    acc = [r["accumulated_sqnr_db"] for r in sqnr]
    assert acc == sorted(acc)  # worst first
    # 8-bit min/max rounding of a Gaussian tensor: SQNR = 10 log10(12 var / s^2) with
    # s = range / 255, ~40 dB for a range of 8 sigma (measured 39.6-47.2 dB). Computed from the QDQ
    # math, the same on any CPU up to float noise; 20 dB leaves 20 dB.
    assert all(r["sqnr_db"] > 20 and r["accumulated_sqnr_db"] > 20 for r in sqnr)
    # the input is quantized first: nothing accumulated before it, local == accumulated
    x = next(r for r in sqnr if r["item"] == "x")
    assert x["sqnr_db"] == pytest.approx(x["accumulated_sqnr_db"], abs=0.05)
    latency = next(r for r in report.records if r["item"] == "latency")
    assert latency["fp32_ms"] > 0 and latency["int8_ms"] > 0


def test_if_subgraph_nodes_stay_float_with_a_reason(rng):
    w, w2 = _arr(rng.standard_normal((64, 32))), _arr(rng.standard_normal((64, 32)))
    text = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 64] x, bool c) => (float[N, 32] y) <float[64, 32] w = {%s}, float[64, 32] w2 = {%s}> {
    h = MatMul(x, w)
    y = If (c) <
        then_branch = t () => (float[N, 32] o) { o = MatMul(x, W_IN_BRANCH) },
        else_branch = e () => (float[N, 32] o2) { o2 = Relu(h) }
    >
}"""
    # A weight read in both the main graph and a branch stays float (no second copy).
    shared = ir.from_onnx_text((text % (w, w2)).replace("W_IN_BRANCH", "w"))
    shared_size = ir.to_proto(shared).ByteSize()
    shared, report = _run_pass(shared, [{"x": rng.standard_normal((3, 64)).astype(np.float32),
                                         "c": np.array(True)}])
    assert any("also read inside a subgraph" in r for r in report.skipped)
    assert ir.to_proto(shared).ByteSize() <= shared_size + 512  # activation Q/DQ only
    model = ir.from_onnx_text((text % (w, w2)).replace("W_IN_BRANCH", "w2"))
    feeds = [{"x": rng.standard_normal((3, 64)).astype(np.float32), "c": np.array(i % 2 == 0)} for i in range(4)]
    ref = model.clone()
    size_before = ir.to_proto(model).ByteSize()
    model, report = _run_pass(model, feeds)
    assert report.counts["quantized_MatMul"] == 1
    assert report.skipped["MatMul: inside a subgraph (If/Loop/Scan body), left float"] == 1
    assert ir.to_proto(model).ByteSize() < size_before  # w is int8 now; w2 stays float for the branch
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    # The else branch reads h = x @ w computed from quantized x and w (h itself is read only in
    # the branch, so it stays float): worst-case bound from the model's scales; the then branch
    # is float (1e-5 covers float noise).
    w_main = ref.graph.initializers["w"].const_value.numpy()
    atol = _linear_atol(model, w_main, max(float(np.abs(f["x"]).max()) for f in feeds), (0,)) + 1e-5
    for r, q in zip(_outputs(ref, feeds), _outputs(model, feeds), strict=True):
        np.testing.assert_allclose(q["y"], r["y"], rtol=0, atol=atol)


def test_bias_correction_shrinks_the_mean_output_error(rng):
    feeds = image_feeds(rng, 6)
    errors = {}
    for on in (False, True):
        model = conv_relu(np.random.default_rng(1))  # same weights both times
        ref = model.clone()
        conv = next(n for n in model.graph if n.op_type == "Conv")
        conv_out = conv.outputs[0].name
        model, report = _run_pass(model, feeds, bias_correction=on, per_tensor=True)
        assert report.counts["biases_corrected"] == (1 if on else 0)
        ref_c = runtime.capture(ref, feeds, [conv_out])
        got_c = runtime.capture(model, feeds, [conv_out])
        diffs = [g[conv_out] - r[conv_out] for r, g in zip(ref_c, got_c, strict=True)]
        errors[on] = float(np.abs(np.mean(np.concatenate(diffs), axis=(0, 2, 3))).max())
    assert errors[True] < errors[False]


def test_a_bias_correction_that_raises_the_output_error_is_not_kept(rng, monkeypatch):
    from onnxopt.quant import bias_correction as quant_improve

    def harmful(float_model, model, feeds, **kw):  # a correction gone wrong: every bias off by 1e5 steps
        for v in model.graph.initializers.values():
            if v.const_value.dtype == ir.DataType.INT32:
                v.const_value = ir.tensor(v.const_value.numpy() + 100000, name=v.name)
        return {"x": 1.0}

    feeds = image_feeds(rng, 4)
    plain, _ = _run_pass(conv_relu(np.random.default_rng(1)), feeds, per_tensor=True)
    monkeypatch.setattr(quant_improve, "bias_correction", harmful)
    model, report = _run_pass(conv_relu(np.random.default_rng(1)), feeds, bias_correction=True, per_tensor=True)
    assert report.counts["biases_corrected"] == 0
    assert any("bias correction not kept" in n for n in report.notes)
    check = next(r for r in report.records if r["item"] == "bias_correction")
    assert check["kept"] is False and check["rel_l2_after"] > check["rel_l2_before"]
    for a, b in zip(_outputs(plain, feeds), _outputs(model, feeds), strict=True):
        np.testing.assert_array_equal(a["y"], b["y"])


# Conformance regressions (tests/conformance): each case is loaded from onnx's backend tests and
# judged by the conformance harness, which runs the output model in onnxruntime against the
# case's expected outputs (tolerances in onnxopt/testing/conformance/tools.py).


def _conformance_case(module: str, name: str):
    from onnxopt.testing.conformance import cases

    if module == "simple":
        return next(c for c in cases.folder_cases(("simple",)) if c.name == name)
    return next(c for c in cases.node_cases([module]) if c.name == name)


def _conformance_verdict(module: str, name: str, tool: str = "quantize"):
    from onnxopt.testing.conformance import harness

    outcome = harness.evaluate(_conformance_case(module, name), tool)
    assert outcome.status not in harness.BAD, f"{outcome.status}: {outcome.detail}"
    return outcome


@pytest.mark.parametrize(
    ("module", "name"), [("if_", "test_if_seq"), ("if_", "test_if_opt"), ("simple", "test_sequence_model6")]
)
def test_calibration_skips_sequence_and_optional_values(module, name):
    case = _conformance_case(module, name)
    model = ir.from_proto(onnx.load_from_string(case.model))
    typed = model.clone()
    from onnxopt import _ir_utils

    _ir_utils.infer_types(typed)
    not_tensors = {
        n for n, v in ir.convenience.create_value_mapping(typed.graph).items()
        if v.type is not None and not isinstance(v.type, ir.TensorType)
    }
    assert not_tensors, "the case has no sequence/optional value: the test checks nothing"
    table = calibration.collect_ranges(model, [feed for feed, _ in case.data_sets], quiet=True)
    assert not set(table.ranges) & not_tensors
    assert set(calibration.float_values(typed)).isdisjoint(not_tensors)
    _conformance_verdict(module, name)


def test_opset_without_an_onnxruntime_qdq_kernel_is_refused(rng):
    case = _conformance_case("spacetodepth", "test_spacetodepth_crd_mode_example_expanded")
    model = ir.from_proto(onnx.load_from_string(case.model))
    assert model.opset_imports[""] == 28
    ctx = PassContext(calibration=Dataset.from_feeds([f for f, _ in case.data_sets]), quiet=True)
    with pytest.raises(ir.passes.PreconditionError, match=r"default opset 28 has QuantizeLinear-28.*highest supported: 25"):
        QuantizePass(QuantizeConfig(latency_runs=0), ctx)(model)
    outcome = _conformance_verdict("depthtospace", "test_depthtospace_example_expanded")
    assert outcome.status == "unchanged-with-reason" and "opset 28" in outcome.detail


def test_average_pool_with_dilations_stays_float_with_a_reason(rng):
    model = ir.from_onnx_text("""
<ir_version: 8, opset_import: ["" : 19]>
g (float[1, 2, 8, 8] x) => (float[1, 2, 6, 6] y) {
    y = AveragePool <kernel_shape = [2, 2], dilations = [2, 2]> (x)
}""")
    feeds = [{"x": rng.standard_normal((1, 2, 8, 8)).astype(np.float32)}]
    model, report = _run_pass(model, feeds)
    assert report.modified is False
    assert report.skipped["AveragePool: AveragePool with dilations [2, 2] (QLinearAveragePool has none)"] == 1
    outcome = _conformance_verdict("averagepool", "test_averagepool_2d_dilations")
    assert outcome.status == "unchanged-with-reason" and "dilations" in outcome.detail


def test_float16_activations_stay_float16_with_a_reason(rng):
    h = onnx.helper
    w = (rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float16)
    model = ir.from_proto(h.make_model(h.make_graph(
        [h.make_node("Conv", ["x", "w"], ["y"])], "g",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT16, ["N", 3, 8, 8])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT16, ["N", 4, 6, 6])],
        [onnx.numpy_helper.from_array(w, "w")],
    ), opset_imports=[h.make_opsetid("", 17)], ir_version=8))
    before = ir.to_proto(model).SerializeToString()
    feeds = [{"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float16)}]
    model, report = _run_pass(model, feeds)
    assert report.modified is False and ir.to_proto(model).SerializeToString() == before
    assert report.skipped["Conv: input 0 is float16, only float32 is quantized"] == 1
    # A float16 model with a float32 region: only the float32 Mul is quantized, and the result
    # still matches the case's expected outputs in onnxruntime.
    outcome = _conformance_verdict("causal_conv_with_state", "test_causal_conv_with_state_silu_fp16_expanded")
    assert outcome.status == "transformed-ok", outcome.detail


def test_graph_output_read_by_a_quantized_node_is_quantized_once(rng):
    # c is a Concat output (quantized as a plan output), a graph output (its DQ takes the name)
    # and a MatMul input (quantized as an activation first): it used to be quantized a second
    # time under its new name `c_float` (KeyError; conformance recipe:int8 on attention cases).
    # y, a MatMul's graph output, stays float.
    w = rng.standard_normal((8, 4)) * 0.3
    model = ir.from_onnx_text(f"""
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] x, float[N, 4] z) => (float[N, 8] c, float[N, 4] y) <float[8, 4] w = {{{_arr(w)}}}> {{
    c = Concat <axis = 1> (x, z)
    y = MatMul (c, w)
}}""")
    ref = model.clone()
    feeds = [{k: rng.standard_normal((2, 4)).astype(np.float32) for k in "xz"} for _ in range(4)]
    model, report = _run_pass(model, feeds)
    assert report.counts["quantized_Concat"] == 1 and report.counts["quantized_MatMul"] == 1
    assert _ops(model)["QuantizeLinear"] == 3  # x, z, c: once each
    assert model.graph.outputs[1].producer().op_type == "MatMul"
    assert [v.name for v in model.graph.outputs] == ["c", "y"]
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    _assert_close_to_float(ref, model, feeds, output="c")


def test_linear_layer_is_rounded_once_after_its_bias(rng, tmp_path):
    # x @ W + b on a 3-D input exports as MatMul + Add. The MatMul output is not quantized and the
    # bias is added in float: the layer's output is rounded once (by its reader), as a Gemm's is,
    # and onnxruntime runs each MatMul as MatMulIntegerToFloat (integer inputs, float output).
    w = rng.standard_normal((16, 8)) * 0.3
    b = rng.standard_normal(8) * 0.1
    w2 = rng.standard_normal((8, 4)) * 0.3
    model = ir.from_onnx_text(f"""
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 3, 16] x) => (float[N, 3, 4] y) <float[16, 8] w = {{{_arr(w)}}}, float[8] b = {{{_arr(b)}}},
                                            float[8, 4] w2 = {{{_arr(w2)}}}> {{
    h = MatMul(x, w)
    a = Add(h, b)
    y = MatMul(a, w2)
}}""")
    feeds = [{"x": rng.standard_normal((2, 3, 16)).astype(np.float32)} for _ in range(4)]
    ref = model.clone()
    model, report = _run_pass(model, feeds)
    assert report.counts["quantized_MatMul"] == 2 and "quantized_Add" not in report.counts
    assert report.skipped["Add: bias of a MatMul (a Linear layer): added in float, the sum is quantized once by its readers"] == 1
    quantized = {n.inputs[0].name for n in model.graph if n.op_type == "QuantizeLinear"}
    assert quantized == {"x", "a"}  # not h
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    path = tmp_path / "fused.onnx"
    with runtime.session(model, opt_level="all", optimized_model_path=path):
        pass
    fused = _ops(io.load_model(path))
    assert fused["MatMulIntegerToFloat"] == 2 and "MatMul" not in fused and "QLinearAdd" not in fused, fused
    # Worst-case bound, every rounding at its maximum: a = x W + b carries x's and W's rounding
    # (no rounding of h), then a is rounded once (s_a / 2) and goes through W2 with W2's rounding.
    s_x, s_a = (float(model.graph.initializers[f"{t}_s"].const_value.numpy()) for t in ("x", "a"))
    s_w, s_w2 = (float(s.max()) for s in _scales(model, weights=True))
    x_max = max(float(np.abs(f["x"]).max()) for f in feeds)
    err_a = s_x / 2 * float(np.abs(w).sum(0).max()) + x_max * 16 * s_w / 2
    a_max = x_max * float(np.abs(w).sum(0).max()) + float(np.abs(b).max())
    extra = (err_a + s_a / 2) * float(np.abs(w2).sum(0).max()) + a_max * 8 * s_w2 / 2
    _assert_close_to_float(ref, model, feeds, extra=extra)


def test_linear_layer_on_2d_input_keeps_its_integer_kernels(rng, tmp_path):
    # On 2-D inputs onnxruntime fuses MatMul + Add into a float Gemm unless Q/DQ separates them:
    # there the MatMul output stays quantized, so both run as integer kernels.
    w = rng.standard_normal((16, 8)) * 0.3
    b = rng.standard_normal(8) * 0.1
    model = ir.from_onnx_text(f"""
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 16] x) => (float[N, 8] y) <float[16, 8] w = {{{_arr(w)}}}, float[8] b = {{{_arr(b)}}}> {{
    h = MatMul(x, w)
    a = Add(h, b)
    y = Relu(a)
}}""")
    model, report = _run_pass(model, vector_feeds(rng))
    assert report.counts["quantized_MatMul"] == 1 and report.counts["quantized_Add"] == 1
    path = tmp_path / "fused.onnx"
    with runtime.session(model, opt_level="all", optimized_model_path=path):
        pass
    fused = _ops(io.load_model(path))
    assert fused["QLinearMatMul"] == 1 and fused["QLinearAdd"] == 1 and "Gemm" not in fused, fused


def test_written_out_gelu_stays_float(rng, tmp_path):
    # GELU as torch exports it after a Linear layer: x * (1 + erf(x / sqrt 2)) * 0.5. Its Add and
    # Muls stay float (no integer kernel runs Erf), only the Linear layers around it are INT8, and
    # onnxruntime fuses bias + GELU into one float BiasGelu.
    w = rng.standard_normal((8, 16)) * 0.3
    b = rng.standard_normal(16) * 0.1
    w2 = rng.standard_normal((16, 8)) * 0.3
    model = ir.from_onnx_text(f"""
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 3, 8] x) => (float[N, 3, 8] y) <float[8, 16] w = {{{_arr(w)}}}, float[16] b = {{{_arr(b)}}},
                                           float[16, 8] w2 = {{{_arr(w2)}}},
                                     float r2 = {{1.4142135}}, float one = {{1.0}}, float half = {{0.5}}> {{
    l = MatMul(x, w)
    h = Add(l, b)
    d = Div(h, r2)
    e = Erf(d)
    p = Add(e, one)
    m = Mul(h, p)
    g = Mul(m, half)
    y = MatMul(g, w2)
}}""")
    feeds = [{"x": rng.standard_normal((2, 3, 8)).astype(np.float32)} for _ in range(4)]
    model, report = _run_pass(model, feeds)
    assert report.skipped["Add: part of a GELU written out around Erf: kept float (no integer kernel runs Erf)"] == 1
    assert report.skipped["Mul: part of a GELU written out around Erf: kept float (no integer kernel runs Erf)"] == 2
    assert {n.inputs[0].name for n in model.graph if n.op_type == "QuantizeLinear"} == {"x", "g"}
    path = tmp_path / "fused.onnx"
    with runtime.session(model, opt_level="all", optimized_model_path=path):
        pass
    fused = _ops(io.load_model(path))
    assert fused["BiasGelu"] == 1 and "Erf" not in fused and fused["MatMulIntegerToFloat"] == 2, fused


def test_reduce_range_auto_follows_the_cpu_and_explicit_values_win(monkeypatch):
    from onnxopt.passes.quantize import QuantizeConfig

    from onnxopt.config import from_dict
    from onnxopt.outcome import Outcome
    from onnxopt.quant import reduce_range
    from onnxopt.quant import scales as quant_math

    assert from_dict(QuantizeConfig, {"reduce_range": True}).reduce_range == "true"  # TOML boolean
    assert from_dict(QuantizeConfig, {"reduce_range": "false"}).reduce_range == "false"
    from onnxopt.runtime.environment import cpu_info

    def decided(report) -> dict:
        (rec,) = [r for r in report.records if r["item"] == "reduce_range"]
        assert rec["cpu"] == cpu_info().describe() and rec["int8_dot"] == cpu_info().int8_dot  # what it saw
        return rec

    monkeypatch.setattr(quant_math, "int8_dot_saturates", lambda: False)
    report = Outcome()
    assert reduce_range.decide("auto", "cpu", can_measure=False, outcome=report) is False  # VNNI/ARM: never
    assert decided(report)["reduce_range"] is False and "reduce_range=true" in report.notes[0]
    monkeypatch.setattr(quant_math, "int8_dot_saturates", lambda: True)
    report = Outcome()
    # no data to measure with: the safe choice
    assert reduce_range.decide("auto", "cpu", can_measure=False, outcome=report) is True and report.notes
    assert decided(report)["reduce_range"] is True
    report = Outcome()
    # measured (and recorded) in quantize()
    assert reduce_range.decide("auto", "cpu", can_measure=True, outcome=report) is None and not report.records
    report = Outcome()
    assert reduce_range.decide("false", "cpu", can_measure=False, outcome=report) is False
    assert decided(report)["how"] == "set in the config"


@pytest.mark.slow
def test_reduce_range_auto_is_measured_on_the_integer_kernels(monkeypatch):
    # The digits CNN's u8 x s8 pair sums saturate int16 without VNNI: as deployed, its INT8 model
    # with 8-bit weights is further from FP32 than with 7-bit ones (AVX2 without VNNI, 2 cores:
    # cosine 0.982 vs 0.9997); with VNNI (or AMX, ARM) nothing saturates and the finer 8-bit grid
    # wins (AMD EPYC, AVX-512 VNNI: relative L2 0.0186 vs 0.0222 on the 2 check feeds). Either
    # gap comes from the weight grid or from saturation, not from float noise (~1e-6), so the
    # comparison cannot turn on a correct CPU of the same kind.
    from onnxopt.quant import scales as quant_math

    saturating_cpu = quant_math.int8_dot_saturates()
    monkeypatch.setattr(quant_math, "int8_dot_saturates", lambda: True)  # measure on any x86 CPU
    from onnxopt.pass_base import make
    from onnxopt.runtime import data
    from tests.conftest import load_model, model_path

    model = load_model("digits_cnn.onnx")
    calib = data.load_data(model_path("digits_cnn_calib.npz")).take(8)
    report = make("quantize", {"latency_runs": 0, "sqnr_samples": 0}, PassContext(calibration=calib, quiet=True))(model)
    check = next(r for r in report.records if r["item"] == "reduce_range")
    assert check["how"].startswith("auto: measured") and check["cpu"]
    assert check["reduce_range"] is saturating_cpu, check
    assert (check["rel_l2_7bit_weights"] < check["rel_l2_8bit_weights"]) is saturating_cpu
    weights = [v.const_value.numpy() for v in model.graph.initializers.values()
               if v.name.endswith("_quantized") and v.const_value.dtype == ir.DataType.INT8]
    assert weights and max(int(np.abs(w).max()) for w in weights) == (63 if saturating_cpu else 127)


def test_opset_11_softmax_split_by_the_upgrade_keeps_node_names_unique(rng):
    # onnx's converter turns Softmax-11 (axis 1 of a 3-D tensor) into Softmax-13 plus reshapes;
    # the name restored on the new nodes must not be given twice (onnxruntime refuses the model;
    # PP-OCR cls, opset 11, hit this).
    w = rng.standard_normal((8, 8)).astype(np.float32)
    text = f"""
    <ir_version: 7, opset_import: ["" : 11]>
    g (float[N, 4, 8] x) => (float[N, 4, 8] y) <float[8, 8] w = {{{_arr(w)}}}> {{
        h = MatMul(x, w)
        y = Softmax <axis = 1> (h)
    }}
    """
    model = ir.from_onnx_text(text)
    model.graph.node(1).name = "Softmax@0"
    feeds = [{"x": rng.standard_normal((2, 4, 8)).astype(np.float32)} for _ in range(4)]
    model, report = _run_pass(model, feeds)
    assert report.counts["opset_upgraded"] == 1
    names = [n.name for n in model.graph if n.name]
    assert len(names) == len(set(names)), names
    with runtime.session(model) as handle:  # loads: names are unique
        assert handle.run(feeds[0])["y"].shape == (2, 4, 8)
