"""quantize-weights: weight-only int8/int4 (QDQ and MatMulNBits), checked in onnxruntime."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnxopt.passes.quantize_weights import QuantizeWeightsConfig, QuantizeWeightsPass

from onnxopt.runtime import sessions as runtime


def _model(rng, opset: int = 17, k: int = 64, n: int = 48) -> tuple[ir.Model, np.ndarray]:
    w = (rng.standard_normal((k, n)) * 0.2).astype(np.float32)
    vals = ",".join(f"{v:.6f}" for v in w.ravel())
    model = ir.from_onnx_text(f"""
<ir_version: 8, opset_import: ["" : {opset}]>
g (float[N, {k}] x) => (float[N, {n}] y) <float[{k}, {n}] w = {{{vals}}}> {{
    h = MatMul(x, w)
    y = Relu(h)
}}""")
    return model, np.array([float(f"{v:.6f}") for v in w.ravel()], np.float32).reshape(k, n)


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    with runtime.session(model) as s:
        return s.run({"x": x})["y"]


def _ops(model: ir.Model) -> collections.Counter[str]:
    return collections.Counter(n.op_type for n in model.graph)


@pytest.mark.parametrize(
    ("options", "ops", "opset"),
    [
        ({"bits": 8}, {"DequantizeLinear": 1, "MatMul": 1, "Relu": 1}, 17),
        ({"bits": 8, "block_size": 16}, {"DequantizeLinear": 1, "MatMul": 1, "Relu": 1}, 21),
        ({"bits": 4, "block_size": 32}, {"DequantizeLinear": 1, "MatMul": 1, "Relu": 1}, 21),
        ({"bits": 4, "block_size": 32, "format": "matmulnbits"}, {"MatMulNBits": 1, "Relu": 1}, 17),
        ({"bits": 8, "block_size": 16, "format": "matmulnbits"}, {"MatMulNBits": 1, "Relu": 1}, 17),
    ],
)
def test_weight_only_formats_match_the_float_model_within_the_rounding_bound(rng, options, ops, opset):
    model, w = _model(rng)
    ref = model.clone()
    before = ir.to_proto(model).ByteSize()
    report = QuantizeWeightsPass(QuantizeWeightsConfig(**options, min_elements=0))(model)
    assert report.counts["weights_MatMul"] == 1 and _ops(model) == ops
    assert model.opset_imports[""] == opset
    assert ir.to_proto(model).ByteSize() < before / (2.8 if options["bits"] == 8 else 5)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    # |dy| <= sum_k |x_k| * |dW_k| <= sum|x| * max scale / 2; the scale is max|W| / qmax per group.
    qmax = 7 if options["bits"] == 4 else 127
    bound = np.abs(x).sum(axis=1, keepdims=True) * np.abs(w).max() / qmax / 2
    assert np.all(np.abs(_run(model, x) - _run(ref, x)) <= bound + 1e-5)
    rel = report.records[0]["rel_error"]
    # The weights' own relative error, computed in numpy (no CPU kernel involved): uniform
    # rounding of a Gaussian to 15 / 255 levels gives ~0.1 / ~0.006.
    assert 0 < rel < (0.2 if options["bits"] == 4 else 0.02)


def test_no_op_and_errors(rng):
    model, _ = _model(rng, k=8, n=4)
    before = ir.to_proto(model).SerializeToString()
    report = QuantizeWeightsPass(QuantizeWeightsConfig())(model)  # 32 values < min_elements
    assert report.modified is False and ir.to_proto(model).SerializeToString() == before
    with pytest.raises(ValueError, match="bits=4 in qdq format needs block_size"):
        QuantizeWeightsConfig(bits=4)
    with pytest.raises(ValueError, match="power of two"):
        QuantizeWeightsConfig(block_size=24)
    with pytest.raises(ValueError, match="unknown op type 'Foo'"):
        QuantizeWeightsConfig(op_types=frozenset({"Foo"}))
