"""quantize with run-time activation scales (dynamic INT8), int8 embedding tables, Attention unpacking.

Numerical bounds are derived, not measured: for ``y = x W`` with activation step ``s_x`` (per
row, or per tensor) and weight step ``s_W[j]`` per output column, every rounding is at most half
a step, so ``|y - y_q|[r, j] <= s_x[r] / 2 * sum_k |W[k, j]| + sum_k |x_q[r, k]| * s_W[j] / 2``,
and int32 accumulation is exact; ``_FLOAT_SLACK`` covers the float32 products and sums around it.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxopt.passes.quantize import QuantizeConfig, QuantizePass

from onnxopt import config
from onnxopt.context import PassContext
from onnxopt.quant import dynamic, embedding, smooth
from onnxopt.runtime import sessions as runtime
from onnxopt.runtime.data import Dataset
from tests.tolerances import TOL

_FLOAT_SLACK = 1e-5  # relative: float32 rounding of the scale products and the K-term sums (K <= 64)


def _model(nodes, inputs, outputs, inits, opset=17, ms=False) -> ir.Model:
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("com.microsoft", 1)] if ms else [])
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in inits.items()])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=opsets))


def _linear(rng, k=16, n=8) -> tuple[ir.Model, np.ndarray, np.ndarray]:
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.3
    b = rng.standard_normal(n).astype(np.float32)
    model = _model(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Add", ["h", "b"], ["y"], name="add")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", n])],
        {"W": w, "b": b},
    )
    return model, w, b


def _run(model: ir.Model, feed) -> np.ndarray:
    with runtime.session(model) as s:
        return runtime.run_all(s, [feed])[0]


def _quantize(model: ir.Model, feeds=None, **options):
    options.setdefault("latency_runs", 0)
    options.setdefault("reduce_range", "false")
    ctx = PassContext(calibration=Dataset.from_feeds(feeds) if feeds else None, quiet=True)
    return QuantizePass(QuantizeConfig(**options), ctx)(model)


def _bound(x: np.ndarray, w: np.ndarray, per_token: bool) -> np.ndarray:
    """The worst-case |y - y_q| of every output element (module docstring)."""
    x2 = x.reshape(-1, x.shape[-1]).astype(np.float64)
    if per_token:
        s_x = np.abs(x2).max(axis=1, keepdims=True) / 127
    else:  # DynamicQuantizeLinear: uint8 over [min(x, 0), max(x, 0)]
        s_x = np.full((x2.shape[0], 1), (max(x2.max(), 0) - min(x2.min(), 0)) / 255)
    s_w = np.abs(w).max(axis=0) / 127
    x_q_abs = np.abs(x2).sum(axis=1, keepdims=True) + x2.shape[1] * s_x / 2  # sum_k |x_q[r, k]|, at most
    bound = s_x / 2 * np.abs(w).sum(axis=0) + x_q_abs * s_w / 2
    return bound.reshape(*x.shape[:-1], w.shape[1])


def _ops(model: ir.Model) -> collections.Counter[str]:
    return collections.Counter(n.op_type for n in model.graph)


@pytest.mark.parametrize("scales", ["tensor", "token"])
def test_dynamic_matmul_structure_and_bound(rng, scales):
    model, w, b = _linear(rng)
    ref = model.clone()
    report = _quantize(model, activations="dynamic", dynamic_scales=scales)  # no calibration data
    ops = _ops(model)
    assert report.counts["dynamic_int8_nodes"] == 1
    assert ops["MatMulIntegerToFloat"] == 1 and ops["MatMul"] == 0 and ops["QuantizeLinear"] == 0
    if scales == "tensor":
        assert ops["DynamicQuantizeLinear"] == 1 and ops["Add"] == 0  # the bias is in the kernel
    else:
        assert ops["ReduceMax"] == 1 and ops["DynamicQuantizeLinear"] == 0
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    x = rng.standard_normal((2, 5, 16)).astype(np.float32)
    x[0, 1] *= 40  # one outlier token
    got, want = _run(model, {"x": x})["y"], _run(ref, {"x": x})["y"]
    bound = _bound(x, w, scales == "token")
    assert np.all(np.abs(got - want) <= bound * (1 + _FLOAT_SLACK) + _FLOAT_SLACK * np.abs(want))


def test_per_token_scales_keep_ordinary_tokens_fine(rng):
    """One outlier token coarsens the whole tensor's grid, but only its own row with per-token scales."""
    x = rng.standard_normal((1, 8, 16)).astype(np.float32)
    x[0, 0] *= 100
    errors = {}
    for scales in ("tensor", "token"):
        model, _, _ = _linear(np.random.default_rng(1))
        ref = model.clone()
        _quantize(model, activations="dynamic", dynamic_scales=scales)
        errors[scales] = np.abs(_run(model, {"x": x})["y"] - _run(ref, {"x": x})["y"])[0, 1:].max()
    # per tensor: step ~ 200 * 2.5 / 255 on every row; per token: ~ 2.5 / 127 on the ordinary rows.
    assert errors["token"] * 10 < errors["tensor"]


def test_auto_scales_per_tensor_unless_tokens_spread(rng):
    """dynamic_scales=auto with data: per token only where one token's range is > SPREAD_LIMIT x the median's."""
    w = rng.standard_normal((16, 8)).astype(np.float32) * 0.3

    def two_inputs() -> ir.Model:
        return _model(
            [helper.make_node("MatMul", ["x", "W"], ["y"], name="spread"), helper.make_node("MatMul", ["z", "W"], ["v"], name="even")],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 8, 16]) for n in ("x", "z")],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 8, 8]) for n in ("y", "v")],
            {"W": w},
        )

    feeds = []
    for _ in range(3):
        x = rng.uniform(-1, 1, (1, 8, 16)).astype(np.float32)
        x[0, 2] *= 4 * dynamic.SPREAD_LIMIT  # one token far beyond the limit (row maxima of U(-1, 1) are ~1)
        feeds.append({"x": x, "z": rng.uniform(-1, 1, (1, 8, 16)).astype(np.float32)})
    model = two_inputs()
    report = _quantize(model, feeds, activations="dynamic")
    spreads = {r["item"]: r for r in report.records if r["item"].startswith("token_spread:")}
    assert spreads["token_spread:spread"]["scales"] == "token" and spreads["token_spread:even"]["scales"] == "tensor"
    assert spreads["token_spread:spread"]["spread"] > dynamic.SPREAD_LIMIT >= spreads["token_spread:even"]["spread"]
    assert _ops(model)["ReduceMax"] == 1 and _ops(model)["DynamicQuantizeLinear"] == 1
    without = two_inputs()  # no data: nothing measured, per token on both (neither is a LayerNorm output)
    _quantize(without, activations="dynamic")
    assert _ops(without)["ReduceMax"] == 2 and _ops(without)["DynamicQuantizeLinear"] == 0


def test_per_tensor_siblings_share_one_kernel(rng):
    """Q/K/V-like MatMuls on one input: one MatMulIntegerToFloat + Split, each output within its bound."""
    ws = [rng.standard_normal((16, n)).astype(np.float32) * 0.3 for n in (8, 8, 4)]
    b = rng.standard_normal(8).astype(np.float32)
    model = _model(
        [helper.make_node("MatMul", ["x", "W0"], ["h0"], name="q"), helper.make_node("Add", ["h0", "b"], ["qa"], name="qb"),
         helper.make_node("Neg", ["qa"], ["q_out"], name="neg"),
         helper.make_node("MatMul", ["x", "W1"], ["k_out"], name="k"), helper.make_node("MatMul", ["x", "W2"], ["v"], name="v"),
         helper.make_node("Relu", ["v"], ["v_out"], name="relu")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 16])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "seq", k]) for n, k in
         (("q_out", 8), ("k_out", 8), ("v_out", 4))],
        {"W0": ws[0], "W1": ws[1], "W2": ws[2], "b": b},
    )
    ref = model.clone()
    report = _quantize(model, activations="dynamic", dynamic_scales="tensor")
    ops = _ops(model)
    assert report.counts["dynamic_int8_nodes"] == 3
    # k_out is a graph output: it keeps its own kernel; q (bias folded in) and v share one
    assert ops["MatMulIntegerToFloat"] == 2 and ops["Split"] == 1 and ops["DynamicQuantizeLinear"] == 1
    assert report.counts["dynamic_int8_merged"] == 1
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    x = rng.standard_normal((2, 5, 16)).astype(np.float32)
    got, want = _run(model, {"x": x}), _run(ref, {"x": x})
    assert [o.name for o in model.graph.outputs] == ["q_out", "k_out", "v_out"]
    for name, w in (("q_out", ws[0]), ("k_out", ws[1])):  # q_out = -(x W0 + b): the same error
        bound = _bound(x, w, False)
        assert np.all(np.abs(got[name] - want[name]) <= bound * (1 + _FLOAT_SLACK) + _FLOAT_SLACK * np.abs(want[name]))
    # Relu is 1-Lipschitz (Neg exact): q_out's and v_out's errors are within their MatMul's bound
    assert np.all(np.abs(got["v_out"] - want["v_out"]) <= _bound(x, ws[2], False) * (1 + _FLOAT_SLACK) + _FLOAT_SLACK)


def test_dynamic_gemm_trans_b(rng):
    w = rng.standard_normal((8, 16)).astype(np.float32) * 0.3  # [N, K], transB
    c = rng.standard_normal(8).astype(np.float32)
    model = _model([helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="gemm", transB=1)],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], {"W": w, "C": c})
    ref = model.clone()
    _quantize(model, activations="dynamic")
    assert _ops(model)["Gemm"] == 0 and _ops(model)["MatMulIntegerToFloat"] == 1
    x = rng.standard_normal((4, 16)).astype(np.float32)
    got, want = _run(model, {"x": x})["y"], _run(ref, {"x": x})["y"]
    assert np.all(np.abs(got - want) <= _bound(x, w.T, False) * (1 + _FLOAT_SLACK) + _FLOAT_SLACK * np.abs(want))


def test_dynamic_nodes_next_to_static(rng):
    """``dynamic_nodes`` (the mixed planner's int8-dynamic level) makes those nodes dynamic, the rest static."""
    w1 = rng.standard_normal((16, 16)).astype(np.float32) * 0.3
    w2 = rng.standard_normal((16, 8)).astype(np.float32) * 0.3
    model = _model(
        [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], {"W1": w1, "W2": w2},
    )
    feeds = [{"x": rng.standard_normal((4, 16)).astype(np.float32)} for _ in range(4)]
    report = _quantize(model, feeds, dynamic_nodes=frozenset({"mm1"}), calibration_method="minmax", smooth_quant=0.0)
    assert report.counts["dynamic_int8_nodes"] == 1 and report.counts["quantized_MatMul"] == 1
    ops = _ops(model)
    assert ops["MatMulIntegerToFloat"] == 1 and ops["MatMul"] == 1 and ops["QuantizeLinear"] >= 1
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def test_contracts(rng):
    model, _, _ = _linear(rng)
    with pytest.raises(ir.passes.PreconditionError, match="dynamic_nodes: no node named 'nope'"):
        _quantize(model, [{"x": np.zeros((1, 2, 16), np.float32)}], dynamic_nodes=frozenset({"nope"}))
    with pytest.raises(ValueError, match="dynamic_scales"):
        config.from_dict(QuantizeConfig, {"dynamic_scales": "row"})
    act = _model([helper.make_node("MatMul", ["x", "z"], ["y"], name="mm")],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
                  helper.make_tensor_value_info("z", TensorProto.FLOAT, [4, 3])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], {})
    assert "not a constant" in (dynamic.can_quantize(next(iter(act.graph))) or "")
    before = ir.to_proto(act).SerializeToString()
    report = _quantize(act, activations="dynamic")
    assert not report.counts["dynamic_int8_nodes"] and ir.to_proto(act).SerializeToString() == before


def test_auto_is_dynamic_for_transformers_static_with_convolutions(rng):
    seq, _, _ = _linear(rng)
    feeds = [{"x": rng.standard_normal((1, 3, 16)).astype(np.float32)} for _ in range(2)]
    report = _quantize(seq, feeds, activations="auto")
    assert report.counts["dynamic_int8_nodes"] == 1 and _ops(seq)["QuantizeLinear"] == 0
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    conv = _model([helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[1, 1, 1, 1])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], {"W": w})
    report = _quantize(conv, [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)}], activations="auto")
    assert not report.counts["dynamic_int8_nodes"] and _ops(conv)["QuantizeLinear"] >= 1


def test_int8_embedding_rows(rng):
    big = rng.standard_normal((2000, 16)).astype(np.float32) * rng.uniform(0.01, 5, (2000, 1)).astype(np.float32)
    small = rng.standard_normal((64, 16)).astype(np.float32)
    model = _model(
        [helper.make_node("Gather", ["E", "ids"], ["e"], name="words"),
         helper.make_node("Gather", ["P", "pos"], ["p"], name="positions"),
         helper.make_node("Add", ["e", "p"], ["y"], name="sum")],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 7]),
         helper.make_tensor_value_info("pos", TensorProto.INT64, [2, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 7, 16])], {"E": big, "P": small},
    )
    ref = model.clone()
    result = embedding.quantize_embeddings(model, min_rows=1024)
    assert list(result.tables) == ["E"] and "E" not in model.graph.initializers and "P" in model.graph.initializers
    assert result.bytes_after == 2000 * 16 + 2000 * 4
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    ids = rng.integers(0, 2000, (2, 7)).astype(np.int64)
    feed = {"ids": ids, "pos": np.zeros((2, 7), np.int64)}
    err = np.abs(_run(model, feed)["y"] - _run(ref, feed)["y"])
    half_step = np.abs(big[ids]).max(axis=-1, keepdims=True) / 127 / 2  # per row, exact rounding bound
    assert np.all(err <= half_step * (1 + _FLOAT_SLACK) + 1e-6)


def test_unpack_attention_is_exact(rng):
    """Attention -> Q/K/V MatMul + Add + MultiHeadAttention computes the same function (float re-association)."""
    hidden, heads = 16, 2
    w = rng.standard_normal((hidden, 3 * hidden)).astype(np.float32) * 0.3
    b = rng.standard_normal(3 * hidden).astype(np.float32) * 0.1
    model = _model(
        [helper.make_node("Attention", ["x", "W", "B", "mask"], ["y"], name="attn", domain="com.microsoft",
                          num_heads=heads)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, hidden]),
         helper.make_tensor_value_info("mask", TensorProto.INT32, [2, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, hidden])], {"W": w, "B": b}, ms=True,
    )
    ref = model.clone()
    created = dynamic.unpack_attention(model)
    assert len(created) == 3
    assert _ops(model) == {"MatMul": 3, "Add": 3, "MultiHeadAttention": 1}
    feed = {"x": rng.standard_normal((2, 5, hidden)).astype(np.float32),
            "mask": np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.int32)}
    np.testing.assert_allclose(_run(model, feed)["y"], _run(ref, feed)["y"], **TOL["reassociate_fp32"])


@pytest.mark.parametrize("per_token", [False, True])
def test_smoothquant_alpha_chosen_per_layer_from_activations(per_token):
    """Per-layer alpha: the grid value (or none) with the least simulated INT8 error is applied and recorded."""
    from tests.passes.test_smooth import ln_model

    rng = np.random.default_rng(0)
    model = ln_model(30.0)  # LayerNorm output with 30x outlier channels, read by two MatMuls
    feeds = [{"x": rng.standard_normal((2, 8, 32)).astype(np.float32)} for _ in range(4)]
    done = smooth.smooth(model, feeds, 0.5, min_ratio=4.0, per_layer=smooth.ALPHA_GRID, per_token=per_token)
    (rec,) = [r for r in done.records if r["tensor"] == "y"]
    errors = rec["int8_rel_error"]
    assert set(errors) == {"off", *(f"{a:g}" for a in smooth.ALPHA_GRID)}
    assert rec["alpha"] in smooth.ALPHA_GRID and errors[f"{rec['alpha']:g}"] == min(errors.values())
    assert errors[f"{rec['alpha']:g}"] < errors["off"]  # smoothing these outliers helps: measured, then applied
    assert "y" in done.scales


def test_embeddings_follow_the_node_selection(rng):
    table = rng.standard_normal((2000, 16)).astype(np.float32)
    w = rng.standard_normal((16, 8)).astype(np.float32)

    def model() -> ir.Model:
        return _model([helper.make_node("Gather", ["E", "ids"], ["e"], name="words"),
                       helper.make_node("MatMul", ["e", "W"], ["y"], name="mm")],
                      [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 7])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 7, 8])], {"E": table, "W": w})

    picked = model()
    report = _quantize(picked, activations="dynamic", include_nodes=frozenset({"mm"}))
    assert report.counts["dynamic_int8_nodes"] == 1 and not report.counts["int8_embedding_tables"]
    assert "E" in picked.graph.initializers
    both = model()
    assert _quantize(both, activations="dynamic").counts["int8_embedding_tables"] == 1
    kept = model()
    assert not _quantize(kept, activations="dynamic", embeddings="float").counts["int8_embedding_tables"]
