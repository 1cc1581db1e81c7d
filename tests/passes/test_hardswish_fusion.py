"""Written-out HardSwish chains fused into HardSwish (+ a scale Mul), checked in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.fusion import activations
from onnxopt.runtime import sessions as runtime

# HardSwish computes x * clip(x / 6 + 0.5, 0, 1), the chain x * clip(x + 3, 0, 6) / c: the two
# round differently by a few float32 ulps of the output (each of the 3-4 ops rounds once).
_ULPS = 8 * np.finfo(np.float32).eps


def _chain(last: str, c: np.ndarray, *, three: float = 3.0, opset: int = 17, reuse: bool = False) -> ir.Model:
    nodes = [helper.make_node("Add", ["x", "three"], ["a"], name="add"),
             helper.make_node("Clip", ["a", "zero", "six"], ["b"], name="clip"),
             helper.make_node("Mul", ["x", "b"], ["m"], name="mul"),
             helper.make_node(last, ["m", "c"], ["y"], name="last")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 5, 5])]
    if reuse:  # the Clip output is read twice: the chain cannot go
        nodes.append(helper.make_node("Neg", ["b"], ["nb"], name="neg"))
        outputs.append(helper.make_tensor_value_info("nb", TensorProto.FLOAT, [2, 4, 5, 5]))
    inits = {"three": np.array(three, np.float32), "zero": np.array(0, np.float32), "six": np.array(6, np.float32), "c": c}
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 5, 5])], outputs,
                              [numpy_helper.from_array(a, n) for n, a in inits.items()])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    with runtime.session(model) as s:
        return runtime.run_all(s, [{"x": x}])[0]["y"]


@pytest.mark.parametrize(("last", "c", "ops"), [
    ("Div", np.array(6, np.float32), ["HardSwish"]),
    ("Div", np.array([0.5, 2.0, 6.0, 30.0], np.float32).reshape(4, 1, 1), ["HardSwish", "Mul"]),
    ("Mul", np.array(1 / 6, np.float32), ["HardSwish"]),  # 6 * float32(1/6) rounds to float32 1.0
])
def test_chain_becomes_hardswish(last, c, ops):
    x = (np.random.default_rng(0).standard_normal((2, 4, 5, 5)) * 4).astype(np.float32)
    model = _chain(last, c)
    want = _run(model, x)
    assert activations.fuse_hardswish(model) == 1
    assert [n.op_type for n in model.graph] == ops
    got = _run(model, x)
    assert [o.name for o in model.graph.outputs] == ["y"]
    np.testing.assert_allclose(got, want, rtol=_ULPS, atol=_ULPS * np.abs(x).max())


@pytest.mark.parametrize("case", ["not three", "reused", "opset 13"])
def test_other_chains_stay(case):
    model = _chain("Div", np.array(6, np.float32), three=2.0 if case == "not three" else 3.0,
                   reuse=case == "reused", opset=13 if case == "opset 13" else 17)
    before = [n.op_type for n in model.graph]
    assert activations.fuse_hardswish(model) == 0
    assert [n.op_type for n in model.graph] == before
