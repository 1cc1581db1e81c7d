"""Small real graphs for core tests (built with onnx.helper, weights seeded)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper


def conv_bn_model(seed: int = 0, *, batch: str | int = "N") -> onnx.ModelProto:
    """Conv -> BatchNorm -> Relu -> Identity -> GlobalAveragePool -> Flatten -> Gemm."""
    rng = np.random.default_rng(seed)
    arrays = {
        "W": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
        "b": rng.standard_normal(8).astype(np.float32),
        "scale": rng.uniform(0.5, 2, 8).astype(np.float32),
        "shift": rng.standard_normal(8).astype(np.float32),
        "mean": rng.standard_normal(8).astype(np.float32),
        "var": rng.uniform(0.5, 2, 8).astype(np.float32),
        "G": rng.standard_normal((8, 4)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "W", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["bn"], name="bn"),
        helper.make_node("Relu", ["bn"], ["r"], name="relu"),
        helper.make_node("Identity", ["r"], ["r2"], name="identity"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "G"], ["y"], name="gemm"),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])],
        [numpy_helper.from_array(a, n) for n, a in arrays.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    model.ir_version = 8
    helper.set_model_props(model, {"author": "tests"})
    onnx.checker.check_model(model, full_check=True)
    return model


def conv_bn_feeds(n: int = 3, batch: int = 2, seed: int = 1) -> dict[str, np.ndarray]:
    """An .npz-style dict: samples on axis 0."""
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n * batch, 3, 8, 8)).astype(np.float32)}

def big_model(n_tensors: int, rows: int, cols: int) -> ir.Model:
    """Gather one row from each of ``n_tensors`` [rows, cols] float32 weights (created lazily)."""
    idx = ir.Value(name="idx", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([1]))
    nodes, outputs, inits = [], [], []
    for i in range(n_tensors):
        def make(i=i):
            # Row r of tensor i holds the value i * 1000 + r: cheap to check after the reload.
            col = (np.arange(rows, dtype=np.float32) + i * 1000)[:, None]
            return ir.tensor(np.broadcast_to(col, (rows, cols)).copy(), name=f"w{i}")

        w = ir.Value(name=f"w{i}", const_value=ir.LazyTensor(make, ir.DataType.FLOAT, ir.Shape([rows, cols]), name=f"w{i}"),
                     type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([rows, cols]))
        inits.append(w)
        node = ir.node("Gather", [w, idx], attributes={"axis": 0}, name=f"g{i}")
        node.outputs[0].name = f"y{i}"
        node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        node.outputs[0].shape = ir.Shape([1, cols])
        nodes.append(node)
        outputs.append(node.outputs[0])
    graph = ir.Graph([idx], outputs, nodes=nodes, initializers=inits, opset_imports={"": 17}, name="big")
    return ir.Model(graph, ir_version=8)
