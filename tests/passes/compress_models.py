"""Small seeded graphs for the cluster, logquant and prune tests (built with onnx.helper)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from onnxopt.runtime import data

__all__ = ["cnn", "feeds", "mlp"]


def _model(nodes, inputs, outputs, arrays, opset) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in arrays.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tests")
    proto.ir_version = 10 if opset >= 21 else 8
    onnx.checker.check_model(proto, full_check=True)
    return ir.serde.deserialize_model(proto)


def mlp(seed: int = 0, *, opset: int = 17, hidden: int = 48) -> ir.Model:
    """x[N,32] -> Gemm(transB=1, bias) -> Relu -> MatMul [hidden, 24] -> Relu -> Gemm(transB=0) -> y[N,10]."""
    rng = np.random.default_rng(seed)
    arrays = {
        "W1": (rng.standard_normal((hidden, 32)) / 6).astype(np.float32),
        "b1": (rng.standard_normal(hidden) * 0.1).astype(np.float32),
        "W2": (rng.standard_normal((hidden, 24)) / 7).astype(np.float32),
        "W3": (rng.standard_normal((24, 10)) / 5).astype(np.float32),
        "b3": (rng.standard_normal(10) * 0.1).astype(np.float32),
    }
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["h1"], transB=1, name="fc1"),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["r1", "W2"], ["h2"], name="fc2"),
        helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
        helper.make_node("Gemm", ["r2", "W3", "b3"], ["y"], name="fc3"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])]
    return _model(nodes, inputs, outputs, arrays, opset)


def cnn(seed: int = 0, *, opset: int = 17) -> ir.Model:
    """x[N,3,8,8] -> Conv(16) -> BN -> Relu -> Conv(24, stride 2) -> Relu -> GAP -> Flatten -> Gemm -> y[N,10]."""
    rng = np.random.default_rng(seed)
    arrays = {
        "C1": (rng.standard_normal((16, 3, 3, 3)) / 4).astype(np.float32),
        "c1": (rng.standard_normal(16) * 0.1).astype(np.float32),
        "scale": rng.uniform(0.5, 2, 16).astype(np.float32),
        "shift": (rng.standard_normal(16) * 0.1).astype(np.float32),
        "mean": (rng.standard_normal(16) * 0.1).astype(np.float32),
        "var": rng.uniform(0.5, 2, 16).astype(np.float32),
        "C2": (rng.standard_normal((24, 16, 3, 3)) / 12).astype(np.float32),
        "c2": (rng.standard_normal(24) * 0.1).astype(np.float32),
        "G": (rng.standard_normal((10, 24)) / 5).astype(np.float32),
        "g": (rng.standard_normal(10) * 0.1).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "C1", "c1"], ["a1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("BatchNormalization", ["a1", "scale", "shift", "mean", "var"], ["bn"], name="bn1"),
        helper.make_node("Relu", ["bn"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "C2", "c2"], ["a2"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv2"),
        helper.make_node("Relu", ["a2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "G", "g"], ["y"], transB=1, name="head"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])]
    return _model(nodes, inputs, outputs, arrays, opset)


def feeds(model: ir.Model, n: int, *, batch: int = 16, seed: int = 0) -> data.Dataset:
    """``n`` seeded random feeds of ``batch`` samples for ``model``'s input."""
    rng = np.random.default_rng(seed)
    spec = data.input_signature(model)[0]
    shape = [batch if not isinstance(d, int) else d for d in spec.shape]
    return data.Dataset.from_feeds([{spec.name: rng.standard_normal(shape).astype(np.float32)} for _ in range(n)])
