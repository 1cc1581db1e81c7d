"""Per-channel statistics of a model's tensors on data: mean, or max |x| (bias correction, smoothing).

Each tensor is reduced inside the graph right after its producer (ReduceMean, or ReduceMax and
ReduceMin for max |x| = max(max x, -min x)), so memory is that of one inference and only one
number per channel leaves onnxruntime.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.runtime import sessions as runtime

__all__ = ["channel_stats"]


def channel_stats(
    model: ir.Model,
    shapes: Mapping[str, int],
    feeds: Iterable[Mapping[str, np.ndarray]],
    *,
    last_axis: bool = False,
    absmax: bool = False,
) -> dict[str, np.ndarray]:
    """Per-channel mean (or, with ``absmax``, max |x|) of main-graph tensors over ``feeds``.

    Channels are axis 1 (``shapes`` maps name -> rank) or, with ``last_axis``, the last axis
    (``shapes`` maps name -> number of channels). Each tensor is reduced inside the graph right
    after its producer, so memory is that of one inference.
    """
    clone = model.clone()
    values = {v.name: v for v in clone.graph.inputs}
    for node in clone.graph:
        values.update({o.name: o for o in node.outputs if o.name})
    opset = clone.opset_imports.get("", 13)
    ops = ("ReduceMax", "ReduceMin") if absmax else ("ReduceMean",)  # max |x| = max(max x, -min x)
    fetch: dict[str, list[str]] = {}
    for i, (name, dim) in enumerate(shapes.items()):
        value = values.get(name)
        if value is None:
            continue
        created, outs = _channel_reduction(value, -1 if last_axis else 1, dim, ops, opset)
        for j, out in enumerate(outs):
            out.name = f"channel_stats.{i}.{j}"
        clone.graph.outputs.extend(outs)
        fetch[name] = [out.name for out in outs]
        producer = value.producer()
        if producer is not None:
            clone.graph.insert_after(producer, created)
        else:
            clone.graph.insert_before(next(iter(clone.graph)), created)
    acc: dict[str, np.ndarray] = {}
    count = 0
    names = [n for outs in fetch.values() for n in outs]
    for got in runtime.capture(clone, (dict(f) for f in feeds), names, priority_order=True):
        count += 1
        for name, outs in fetch.items():
            if absmax:
                x = np.maximum(got[outs[0]].astype(np.float64), -got[outs[1]].astype(np.float64))
                acc[name] = np.maximum(acc[name], x) if name in acc else x
            else:
                acc[name] = acc.get(name, 0.0) + got[outs[0]].astype(np.float64)
    return {k: v if absmax else v / max(count, 1) for k, v in acc.items()}


def _channel_reduction(
    value: ir.Value, axis: int, dim: int, ops: Sequence[str], opset: int
) -> tuple[list[ir.Node], list[ir.Value]]:
    """Nodes reducing ``value`` to one number per channel with each of ``ops`` (ReduceMax, ...).

    ``axis`` is the channel axis: 1 (``dim`` is the rank) or -1 (``dim`` is the channel count;
    the tensor is viewed as ``[-1, C]``). The tensor is reduced where it is, over the other
    axes: no transposed copy.
    """
    created: list[ir.Node] = []
    source = value
    if axis == -1:
        shape = ir.node("Constant", [], attributes={"value": ir.Tensor(np.array([-1, dim], np.int64))})
        created += [shape, ir.node("Reshape", [value, shape.outputs[0]])]
        source, axes = created[-1].outputs[0], [0]
    else:
        axes = [0, *range(2, dim)]
    outs = []
    for op in ops:
        if opset >= 18:
            c = ir.node("Constant", [], attributes={"value": ir.Tensor(np.array(axes, np.int64))})
            reduced = ir.node(op, [source, c.outputs[0]], attributes={"keepdims": 0})
            created += [c, reduced]
        else:
            reduced = ir.node(op, [source], attributes={"axes": axes, "keepdims": 0})
            created.append(reduced)
        outs.append(reduced.outputs[0])
    return created, outs
