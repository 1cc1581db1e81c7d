"""fp16 pass: structure, no-op, contract, numerics on onnxruntime CPU, overflow and subgraphs."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnxopt.passes.fp16 import Fp16Config, Fp16Pass

from onnxopt import pipeline
from onnxopt.context import PassContext
from onnxopt.quant import float16
from onnxopt.runtime import data, validation
from onnxopt.runtime import sessions as runtime
from tests.conftest import load_model, model_path
from tests.tolerances import TOL


def _weights(rng: np.random.Generator, n: int) -> str:
    return ",".join(f"{v:.5f}" for v in rng.standard_normal(n))


def mlp(rng: np.random.Generator) -> ir.Model:
    return ir.from_onnx_text(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 3] y)
        <float[4, 8] w1 = {{{_weights(rng, 32)}}}, float[8] b1 = {{{_weights(rng, 8)}}},
         float[8, 3] w2 = {{{_weights(rng, 24)}}}> {{
            h = MatMul(x, w1)
            hb = Add(h, b1)
            r = Relu(hb)
            y = MatMul(r, w2)
        }}""")


def overflow_model(rng: np.random.Generator) -> ir.Model:
    """``big`` reaches ~1e6 (float16 overflows at 65504); everything else stays small."""
    return ir.from_onnx_text(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 4] y)
        <float[4, 4] w = {{{_weights(rng, 16)}}}, float k = {{100000.0}}, float kinv = {{0.00001}}> {{
            a = MatMul(x, w)
            big = Mul(a, k)
            small = Mul(big, kinv)
            s = Sigmoid(small)
            y = Add(s, a)
        }}""")


def feeds_for(rng: np.random.Generator, n: int = 4, shape: tuple[int, ...] = (3, 4)) -> list[dict[str, np.ndarray]]:
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def dtypes_of(model: ir.Model, op_type: str) -> list[ir.DataType]:
    """Output dtypes of the ``op_type`` nodes, as onnx's own shape inference sees them."""
    typed = ir.from_proto(onnx.shape_inference.infer_shapes(ir.to_proto(model), strict_mode=True))
    return [n.outputs[0].dtype for n in typed.graph if n.op_type == op_type]


def run_pass(model: ir.Model, feeds=None, **options) -> tuple:
    ctx = PassContext(calibration=data.Dataset.from_feeds(feeds) if feeds else None, quiet=True)
    report = Fp16Pass(Fp16Config(**options), ctx)(model)
    return report, model


def test_structure_weights_fp16_io_fp32_two_casts(rng):
    model = mlp(rng)
    report, model = run_pass(model)
    assert report.modified
    counts = collections.Counter(n.op_type for n in model.graph)
    assert counts == {"MatMul": 2, "Add": 1, "Relu": 1, "Cast": 2}  # one in, one out
    assert all(v.dtype == ir.DataType.FLOAT16 for v in model.graph.initializers.values())
    assert model.graph.inputs[0].dtype == ir.DataType.FLOAT
    assert model.graph.outputs[0].dtype == ir.DataType.FLOAT and model.graph.outputs[0].name == "y"
    assert float16.cast_pairs(model) == 0
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def test_numerics_match_fp32_within_fp16_tolerance(rng):
    ref, model = mlp(rng), None
    model = ir.from_proto(ir.to_proto(ref))
    feeds = feeds_for(rng)
    run_pass(model)
    result = validation.compare(ref, model, feeds, **TOL["fp16"])
    result.assert_ok()
    assert result.worst("nonfinite") == 0


def test_keep_io_false_makes_io_float16(rng):
    model = mlp(rng)
    run_pass(model, keep_io=False)
    assert model.graph.inputs[0].dtype == ir.DataType.FLOAT16
    assert model.graph.outputs[0].dtype == ir.DataType.FLOAT16
    assert "Cast" not in {n.op_type for n in model.graph}
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def test_no_float_graph_is_unchanged():
    model = ir.from_onnx_text("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[N] x) => (int64[N] y) { y = Add(x, x) }""")
    before = ir.to_proto(model).SerializeToString()
    report, model = run_pass(model)
    assert report.modified is False
    assert ir.to_proto(model).SerializeToString() == before


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="max_abs"):
        Fp16Config(max_abs=1e6)
    with pytest.raises(ValueError, match="underflow_fraction"):
        Fp16Config(underflow_fraction=0.0)
    from onnxopt import config

    with pytest.raises(ValueError, match="unknown option 'keep_i'"):
        config.from_dict(Fp16Config, {"keep_i": True}, owner="fp16")


def test_block_lists_keep_nodes_float32(rng):
    model = mlp(rng)
    run_pass(model, op_block_list=frozenset({"Relu"}))
    assert dtypes_of(model, "Relu") == [ir.DataType.FLOAT]
    model = mlp(rng)
    names = [n.name for n in model.graph]
    relu = next(n for n in model.graph if n.op_type == "Relu")
    relu.name = "keep_me"
    report, model = run_pass(model, node_block_list=frozenset({"keep_me"}))
    assert dtypes_of(model, "Relu") == [ir.DataType.FLOAT]
    assert report.skipped["node is in node_block_list"] == 1
    assert len(names) == 4


def test_overflowing_node_is_kept_float32_automatically(rng):
    ref = overflow_model(rng)
    feeds = feeds_for(rng)
    # The model really leaves float16's range (ORT CPU would hide it: it computes float16 ops
    # without a CPU kernel in float32 and drops the Cast pairs it inserted around them).
    peak = max(float(np.abs(t["big"]).max()) for t in runtime.capture(ref, feeds, ["big"]))
    assert peak > float16.FP16_MAX
    model = ir.from_proto(ir.to_proto(ref))
    report, model = run_pass(model, feeds)
    kept = [r for r in report.records if r["precision"] == "float32"]
    assert dtypes_of(model, "Mul") == [ir.DataType.FLOAT, ir.DataType.FLOAT]
    assert dtypes_of(model, "MatMul") == [ir.DataType.FLOAT16]
    assert dtypes_of(model, "Sigmoid") == [ir.DataType.FLOAT16]
    assert len(kept) == 2 and any("overflow" in r["reason"] for r in report.records)
    assert float16.cast_pairs(model) == 0
    result = validation.compare(ref, model, feeds, **TOL["fp16"])
    result.assert_ok()


def test_underflowing_weight_keeps_its_user_float32(rng):
    model = ir.from_onnx_text("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 2] x) => (float[N, 2] y) <float[2] eps = {1e-9, 2e-9}> {
            m = Mul(x, eps)
            y = Relu(m)
        }""")
    report, model = run_pass(model)
    assert dtypes_of(model, "Mul") == [ir.DataType.FLOAT]
    assert any("underflow" in r["reason"] for r in report.records)


SUBGRAPH_MODEL = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x, bool c, int64 trip) => (float[N, 4] y, float[N, 4] z)
    <float[4, 4] w = {{{w}}}> {{
        a = MatMul(x, w)
        b = Relu(a)
        y = If(c) <
            then_branch = t () => (float[N, 4] yt) {{ yt = Add(b, a) }},
            else_branch = e () => (float[N, 4] ye) {{ ye = Neg(a) }}
        >
        cond = Constant <value = bool {{1}}> ()
        z = Loop(trip, cond, b) <
            body = body (int64 i, bool cin, float[N, 4] s) => (bool cout, float[N, 4] s2) {{
                cout = Identity(cin)
                s2 = Add(s, a)
            }}
        >
    }}"""


def test_if_and_loop_subgraphs_convert_and_load(rng):
    ref = ir.from_onnx_text(SUBGRAPH_MODEL.format(w=_weights(rng, 16)))
    model = ir.from_proto(ir.to_proto(ref))
    report, model = run_pass(model)
    assert report.skipped["owns a subgraph (kept float32 as a whole)"] == 2
    assert dtypes_of(model, "MatMul") == [ir.DataType.FLOAT16]
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    for c in (True, False):
        feeds = [
            {"x": rng.standard_normal((3, 4)).astype(np.float32), "c": np.array(c), "trip": np.array(3)}
            for _ in range(2)
        ]
        validation.compare(ref, model, feeds, **TOL["fp16"]).assert_ok()


def test_pipeline_keeps_the_snapshot_float32(rng):
    """The pass must not retype values shared with the pipeline's rollback snapshot."""
    model = mlp(rng)
    snapshot = model.clone()
    run_pass(model)
    assert snapshot.graph.outputs[0].dtype == ir.DataType.FLOAT
    assert all(v.dtype == ir.DataType.FLOAT for v in snapshot.graph.initializers.values())


MIXED_OPS = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 2, 8, 8] x) => (float[1, 4, 8, 8] y, float[1, 2, 16, 16] r, int64[4] s)
    <float[4, 2, 3, 3] w = {{{w}}}, float[8] g = {{1, 1, 1, 1, 1, 1, 1, 1}}, float[8] bb = {{0, 0, 0, 0, 0, 0, 0, 0}},
     float[4] sc = {{1, 1, 2, 2}}> {{
        cv = Conv <pads = [1, 1, 1, 1]> (x, w)
        ln = LayerNormalization <axis = -1> (cv, g, bb)
        sm = Softmax <axis = 1> (ln)
        er = Erf(sm)
        mp = MaxPool <kernel_shape = [1, 1]> (er)
        y = Sigmoid(mp)
        r = Resize <mode = "nearest"> (x, , sc)
        s = Shape(y)
    }}"""


def test_ops_with_fixed_float32_inputs_and_free_inputs(rng):
    """Resize's scales stay float32, Shape takes float16 as is, ORT CPU loads and runs it."""
    ref = ir.from_onnx_text(MIXED_OPS.format(w=_weights(rng, 72)))
    model = ir.from_proto(ir.to_proto(ref))
    run_pass(model)
    assert model.graph.initializers["sc"].dtype == ir.DataType.FLOAT
    assert dtypes_of(model, "Sigmoid") == [ir.DataType.FLOAT16]
    shape_node = next(n for n in model.graph if n.op_type == "Shape")
    assert shape_node.inputs[0].producer().op_type == "Sigmoid"  # no Cast before Shape
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    feeds = [{"x": rng.standard_normal((1, 2, 8, 8)).astype(np.float32)} for _ in range(2)]
    validation.compare(ref, model, feeds, **TOL["fp16"]).assert_ok()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn", "digits_transformer"])
def test_bundled_models_cosine_size_finite(name):
    model = load_model(f"{name}.onnx")
    sig = data.input_signature(model)
    calib = data.load_data(model_path(f"{name}_calib.npz"), sig).take(8)
    ctx = PassContext(calibration=calib, quiet=True)
    result = pipeline.run(model, [Fp16Pass(None, ctx)])
    assert result.reports[0].status == "ok", result.reports[0].error
    evald = data.load_data(model_path(f"{name}_eval.npz"), sig).take(8)
    rep = validation.compare(model_path(f"{name}.onnx"), result.model, evald)
    # Measured 1 - cosine <= 1e-6 (x86: float16 storage, float32 compute). A CPU that also
    # accumulates in float16 (ARM64 FP16) adds ~sqrt(K) roundings per dot product: ~10x the error,
    # 100x in 1 - cosine, still 10x inside 0.999.
    assert rep.worst("cosine") >= 0.999
    assert rep.worst("nonfinite") == 0
    assert rep.sizes["candidate_bytes"] <= 0.55 * rep.sizes["reference_bytes"]
    assert float16.cast_pairs(result.model) == 0


@pytest.mark.slow
def test_ppocr_cls_fp16(rng):
    """PP-OCR cls from rapidocr-onnxruntime (in the test extra: real pretrained weights)."""
    import pathlib

    import rapidocr_onnxruntime as ocr

    path = next(pathlib.Path(ocr.__file__).parent.glob("models/*cls*.onnx"))
    ref = ir.load(path)
    model = ir.load(path)
    feeds = [{"x": rng.uniform(-1, 1, (1, 3, 48, 192)).astype(np.float32)} for _ in range(3)]
    ctx = PassContext(calibration=data.Dataset.from_feeds(feeds), quiet=True)
    result = pipeline.run(model, [Fp16Pass(None, ctx)])
    assert result.reports[0].status == "ok", result.reports[0].error
    rep = validation.compare(ref, result.model, feeds)
    # Measured 1 - cosine < 5e-7; float16 accumulation (ARM64 FP16) ~100x that: inside 0.999.
    assert rep.worst("cosine") >= 0.999 and rep.worst("nonfinite") == 0


# Conformance regressions: each case once wrote a model the full checker rejected.
CONFORMANCE_CASES = [
    ("attention", "test_attention_4d_causal_expanded"),  # ConstantOfShape output typed float16
    ("rmsnormalization", "test_rms_normalization_4d_axis1"),  # inference ties X, scale and Y
    ("light", "test_bvlc_alexnet"),  # weights made by ConstantOfShape, initializers as inputs
]


@pytest.mark.parametrize(("module", "name"), CONFORMANCE_CASES)
def test_conformance_regressions_pass_full_checker_and_match(module, name):
    from onnxopt.testing.conformance import cases

    found = cases.light_cases() if module == "light" else cases.node_cases([module])
    case = next(c for c in found if c.name == name)
    feeds = [feed for feed, _ in case.data_sets]
    ref = ir.from_proto(onnx.load_from_string(case.model))
    model = ir.from_proto(onnx.load_from_string(case.model))
    report, model = run_pass(model, feeds)
    assert report.counts["nodes_lowered"] > 0
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    rep = validation.compare(ref, model, feeds, **TOL["fp16"])
    rep.assert_ok()
    assert rep.worst("nonfinite") == 0


def test_constant_of_shape_fill_follows_its_precision(rng):
    """ConstantOfShape's output type is its ``value`` attribute's: lowered, the fill is float16."""
    ref = ir.from_onnx_text("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3] x) => (float[2, 3] y) {
            s = Shape(x)
            z = ConstantOfShape(s)
            t = ConstantOfShape <value = float[1] {0.5}> (s)
            a = Add(x, z)
            y = Mul(a, t)
        }""")
    model = ir.from_proto(ir.to_proto(ref))
    report, model = run_pass(model)
    assert dtypes_of(model, "ConstantOfShape") == [ir.DataType.FLOAT16] * 2
    assert report.counts["casts_added"] == 2  # x in, y out
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    validation.compare(ref, model, feeds_for(rng, 2, (2, 3)), **TOL["fp16"]).assert_ok()


def test_dequantize_linear_scale_and_output_move_together(rng):
    """DequantizeLinear-23: y takes x_scale's type, so a lowered node casts its scale too."""
    ref = ir.from_onnx_text("""
        <ir_version: 10, opset_import: ["" : 23]>
        g (int8[2, 3] q, float[2, 3] x) => (float[2, 3] y)
        <float s = {0.125}> {
            d = DequantizeLinear(q, s)
            y = Add(d, x)
        }""")
    model = ir.from_proto(ir.to_proto(ref))
    run_pass(model)
    assert dtypes_of(model, "DequantizeLinear") == [ir.DataType.FLOAT16]
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    feeds = [
        {"q": rng.integers(-128, 127, (2, 3)).astype(np.int8), "x": rng.standard_normal((2, 3)).astype(np.float32)}
        for _ in range(2)
    ]
    validation.compare(ref, model, feeds, **TOL["fp16"]).assert_ok()


def test_initializer_listed_as_graph_input_stays_float32(rng):
    """IR 3 models list weights as inputs too: a feed may override them, so they keep float32."""
    w = rng.standard_normal((4, 3)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [
            onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4]),
            onnx.helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [4, 3]),
        ],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])],
        [onnx.numpy_helper.from_array(w, "w")],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 8)], ir_version=3)
    ref, model = ir.from_proto(proto), ir.from_proto(proto)
    run_pass(model)
    assert model.graph.initializers["w"].dtype == ir.DataType.FLOAT
    assert dtypes_of(model, "MatMul") == [ir.DataType.FLOAT16]
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    validation.compare(ref, model, feeds_for(rng, 2, (2, 4)), **TOL["fp16"]).assert_ok()


def test_eye_like_without_dtype_follows_its_input(rng):
    """EyeLike's output takes its input's type when ``dtype`` is absent: both move together."""
    ref = ir.from_onnx_text("""
        <ir_version: 10, opset_import: ["" : 22]>
        g (float[4, 4] x) => (float[4, 4] y) {
            e = EyeLike(x)
            y = Add(e, x)
        }""")
    model = ir.from_proto(ir.to_proto(ref))
    run_pass(model)
    assert dtypes_of(model, "EyeLike") == [ir.DataType.FLOAT16]
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    validation.compare(ref, model, feeds_for(rng, 2, (4, 4)), **TOL["fp16"]).assert_ok()


@pytest.mark.parametrize(
    ("module", "name", "reason"),
    [
        ("blackmanwindow", "test_blackmanwindow_symmetric", "output type set by an attribute (dtype, to)"),
        ("bitcast", "test_bitcast_int32_to_float32", "output type set by an attribute (dtype, to)"),
        ("meanvariancenormalization", "test_mvn", "onnxruntime CPU rejects float16 MeanVarianceNormalization"),
        ("scatternd", "test_scatternd_multiply", "onnxruntime CPU has no float16 ScatterND with reduction=mul"),
    ],
)
def test_nodes_without_a_float16_form_stay_float32_with_reason(module, name, reason):
    """Window ops default to a float32 output; ORT CPU lacks these float16 kernels or bodies."""
    from onnxopt.testing.conformance import cases

    case = next(c for c in cases.node_cases([module]) if c.name == name)
    feeds = [feed for feed, _ in case.data_sets]
    ref = ir.from_proto(onnx.load_from_string(case.model))
    model = ir.from_proto(onnx.load_from_string(case.model))
    report, model = run_pass(model, feeds)
    assert any(k.startswith(reason) for k in report.skipped), report.skipped
    assert report.counts["nodes_lowered"] == 0
    validation.compare(ref, model, feeds, **TOL["exact"]).assert_ok()


def test_output_read_inside_graph_gets_uniquely_named_casts(rng):
    """A float16 graph output also read by a float32-only input: two Casts, distinct node names."""
    ref = ir.from_onnx_text("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[6] x) => (float s, uint8[6] q) {
            s = ReduceMax <keepdims = 0> (x)
            q = QuantizeLinear(x, s)
        }""")
    model = ir.from_proto(ir.to_proto(ref))
    run_pass(model)
    names = [n.name for n in model.graph if n.name]
    assert len(names) == len(set(names))
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    feeds = [{"x": rng.uniform(1, 2, 6).astype(np.float32)} for _ in range(2)]
    validation.compare(ref, model, feeds, **TOL["fp16"]).assert_ok()


@pytest.mark.parametrize("name", [f"test_sequence_model{i}" for i in range(1, 9)])
def test_sequence_models_load_run_and_match(name):
    # Crashed in calibration: onnx-ir's shape inference gave the untyped sequence values tensor
    # types, which onnxruntime rejected (conformance, simple/test_sequence_model1-8).
    import onnx

    from onnxopt.testing.conformance.cases import folder_cases

    case = next(c for c in folder_cases() if c.name == name)
    feeds = data.Dataset.from_feeds([feed for feed, _ in case.data_sets])
    ref = ir.serde.deserialize_model(onnx.load_from_string(case.model))
    model = ir.serde.deserialize_model(onnx.load_from_string(case.model))
    result = pipeline.run(model, [Fp16Pass(None, PassContext(calibration=feeds, quiet=True))], strict=True)
    assert result.reports[0].status in ("ok", "unchanged")
    onnx.checker.check_model(ir.to_proto(result.model), full_check=True)
    validation.compare(ref, result.model, feeds, **TOL["fp16"]).assert_ok()
