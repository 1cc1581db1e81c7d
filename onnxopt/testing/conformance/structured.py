"""Small models with If, Loop and Scan subgraphs and dynamic batch/sequence dims.

Each subgraph reads a weight from the outer scope (passes must see through scopes) and every
control-flow condition or trip count is computed at run time (nothing folds the control flow
away). Inputs are ``x: float[batch, seq, 8]``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["MODELS", "feeds", "if_model", "loop_model", "scan_model"]

D = 8


def _w(name: str, seed: int) -> TensorProto:
    rng = np.random.default_rng(seed)
    return numpy_helper.from_array((rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32), name)


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _x(name: str = "x") -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", "seq", D])


def if_model() -> onnx.ModelProto:
    """y = x + (ReduceSum(x) > 0 ? Relu(x @ W1 + b) : x @ W2)."""
    then_g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["t0"]), helper.make_node("Add", ["t0", "b"], ["t1"]),
         helper.make_node("Relu", ["t1"], ["t_out"])],
        "then", [], [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, ["batch", "seq", D])],
    )
    else_g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W2"], ["e_out"])],
        "else", [], [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, ["batch", "seq", D])],
    )
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["c"]),
        helper.make_node("If", ["c"], ["branch"], then_branch=then_g, else_branch=else_g),
        helper.make_node("Add", ["x", "branch"], ["y"]),
    ]
    inits = [_w("W1", 1), _w("W2", 2), numpy_helper.from_array(np.full(D, 0.1, np.float32), "b"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
    return _model(helper.make_graph(nodes, "if_model", [_x()], [_x("y")], inits))


def loop_model() -> onnx.ModelProto:
    """h <- tanh(h @ W) repeated seq-length times (trip count from Shape at run time)."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("MatMul", ["h_in", "W"], ["m"]),
         helper.make_node("Tanh", ["m"], ["h_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, ["batch", "seq", D])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["batch", "seq", D])],
    )
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], start=1, end=2),
        helper.make_node("Squeeze", ["shape"], ["trips"]),
        helper.make_node("Loop", ["trips", "true", "x"], ["y"], body=body),
    ]
    inits = [_w("W", 3), numpy_helper.from_array(np.array(True), "true")]
    return _model(helper.make_graph(nodes, "loop_model", [_x()], [_x("y")], inits))


def scan_model() -> onnx.ModelProto:
    """An RNN over the sequence axis: s <- tanh(s @ W + x_t); outputs every s_t and the last."""
    body = helper.make_graph(
        [helper.make_node("MatMul", ["s_in", "W"], ["m"]),
         helper.make_node("Add", ["m", "x_t"], ["a"]),
         helper.make_node("Tanh", ["a"], ["s_out"]),
         helper.make_node("Identity", ["s_out"], ["y_t"])],
        "body",
        [helper.make_tensor_value_info("s_in", TensorProto.FLOAT, ["batch", D]),
         helper.make_tensor_value_info("x_t", TensorProto.FLOAT, ["batch", D])],
        [helper.make_tensor_value_info("s_out", TensorProto.FLOAT, ["batch", D]),
         helper.make_tensor_value_info("y_t", TensorProto.FLOAT, ["batch", D])],
    )
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["s0"], axes=[1], keepdims=0),
        helper.make_node("Scan", ["s0", "x"], ["last", "y"], body=body, num_scan_inputs=1,
                         scan_input_axes=[1], scan_output_axes=[1]),
    ]
    outputs = [helper.make_tensor_value_info("last", TensorProto.FLOAT, ["batch", D]), _x("y")]
    return _model(helper.make_graph(nodes, "scan_model", [_x()], outputs, [_w("W", 4)]))


MODELS = {"if": if_model, "loop": loop_model, "scan": scan_model}


def feeds(sizes: tuple[tuple[int, int], ...] = ((1, 3), (4, 7)), seed: int = 0) -> list[dict[str, np.ndarray]]:
    """One feed per (batch, seq) size: the dims really vary between feeds."""
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((b, s, D)).astype(np.float32)} for b, s in sizes]
