"""Written-out HardSwish (``x * clip(x + 3, 0, 6) / c``) as one ``HardSwish`` node and a scale.

Exporters such as paddle2onnx write MobileNetV3 / PP-LCNet / PicoDet's HardSwish as four
elementwise nodes::

    a = Add(x, 3); b = Clip(a, 0, 6); m = Mul(x, b); y = Div(m, c)      (or Mul(m, 1 / c))

``y = HardSwish(x) * (6 / c)`` (ONNX ``HardSwish`` is ``x * max(0, min(1, x / 6 + 0.5))``), and
the Mul is dropped when ``6 / c`` is 1. ``c`` may hold one value per channel (the quantizer's
SmoothQuant folds channel scales into it). Four passes over the feature map become one or two:
onnxruntime 1.32, 1 thread, a [1, 64, 200, 152] map on [EPYC-ZEN4]: 1.14 ms written out,
0.71 ms as HardSwish (benchmarks/hardswish_micro.py). Not bit-exact: ``x / 6 + 0.5`` rounds
differently from ``(x + 3) / 6`` (about one float32 ulp of the output), which is why the quantizer
applies it only to the activations it leaves float between integer kernels, where the INT8
rounding dwarfs it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt import _ir_utils

__all__ = ["fuse_hardswish"]

_ONNX = ("", "ai.onnx")


def _scalar(node: ir.Node, index: int, want: float) -> bool:
    """Whether input ``index`` of ``node`` is a one-element initializer equal to ``want``."""
    value = _ir_utils.constant_input(node, index)
    if value is None:
        return False
    array = _ir_utils.constant_array(value)
    return array.size == 1 and float(array.reshape(())) == want


def _single_use(value: ir.Value) -> ir.Node | None:
    uses = value.uses()
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0].node


def _match(add: ir.Node) -> tuple[ir.Value, list[ir.Node], np.ndarray] | None:
    """(x, the four nodes, 6 / c) when ``add`` starts a written-out HardSwish, else None."""
    if add.op_type != "Add" or add.domain not in _ONNX or len(add.inputs) != 2:
        return None
    for i in (0, 1):
        x = add.inputs[i]
        if x is not None and x.dtype in (None, ir.DataType.FLOAT) and _scalar(add, 1 - i, 3.0):
            break
    else:
        return None
    clip = _single_use(add.outputs[0])
    if clip is None or clip.op_type != "Clip" or clip.domain not in _ONNX or len(clip.inputs) != 3:
        return None
    if not (_scalar(clip, 1, 0.0) and _scalar(clip, 2, 6.0)):
        return None
    mul = _single_use(clip.outputs[0])
    if mul is None or mul.op_type != "Mul" or mul.domain not in _ONNX or set(mul.inputs) != {x, clip.outputs[0]}:
        return None
    last = _single_use(mul.outputs[0])
    if last is None or last.op_type not in ("Div", "Mul") or last.domain not in _ONNX or last.inputs[0] is not mul.outputs[0]:
        return None
    c = _ir_utils.constant_input(last, 1)
    if c is None:
        return None
    k = _ir_utils.constant_array(c).astype(np.float64)
    factor = 6.0 / k if last.op_type == "Div" else 6.0 * k
    if not np.all(np.isfinite(factor)):
        return None
    return x, [add, clip, mul, last], factor.astype(np.float32)


def fuse_hardswish(model: ir.Model, *, pass_name: str = "fuse") -> int:
    """Replace each written-out HardSwish in the main graph (opset >= 14); the count replaced.

    A chain whose inner tensors have other readers (a QuantizeLinear, say) is left alone. The
    output value keeps its name.
    """
    if model.opset_imports.get("", 0) < 14:
        return 0
    graph = model.graph
    done = 0
    for add in list(graph):
        if add.graph is not graph:
            continue
        found = _match(add)
        if found is None:
            continue
        x, nodes, factor = found
        last = nodes[-1]
        label = last.name or "hardswish"
        hs = _ir_utils.tag(ir.node("HardSwish", [x], name=_ir_utils.unique_name(graph, f"{label}_hardswish")), pass_name)
        created = [hs]
        result = hs.outputs[0]
        if not np.all(factor == 1.0):
            k = ir.Value(name=_ir_utils.unique_name(graph, f"{label}_hardswish_scale"),
                         const_value=ir.tensor(factor.reshape(_ir_utils.constant_array(last.inputs[1]).shape)))
            k.shape, k.type = k.const_value.shape, ir.TensorType(ir.DataType.FLOAT)
            graph.register_initializer(k)
            mul = _ir_utils.tag(ir.node("Mul", [result, k], name=_ir_utils.unique_name(graph, f"{label}_scale")), pass_name)
            created.append(mul)
            result = mul.outputs[0]
        graph.insert_before(nodes[0], created)
        out = last.outputs[0]
        result.name, result.type, result.shape = None, out.type, out.shape
        ir.convenience.replace_all_uses_with(out, result, replace_graph_outputs=True)
        name = out.name
        for node in reversed(nodes):
            graph.remove(node, safe=True)
        result.name = name
        done += 1
    return done
