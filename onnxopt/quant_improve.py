"""Data-aware repairs of a QDQ model: bias correction.

Bias correction (Nagel et al., "Data-Free Quantization", sec. 4.2, measured instead of
estimated): quantization shifts the mean of a layer's output, ``E[y_q] != E[y]``, and downstream
averaging (GlobalAveragePool, squeeze-excitation blocks) turns that shift into large errors.
For each quantized Conv/Gemm with an int32 bias, the per-channel mean of its float output and of
its quantized output are measured on calibration data, and ``E[y] - E[y_q]`` is added to the
bias (re-quantized with the same scale ``s_x * s_w``). Means are reduced inside the graph
(right after each producer), so memory is that of one inference.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxopt import runtime

__all__ = ["bias_correction", "channel_means"]


def channel_means(
    model: ir.Model, ranks: Mapping[str, int], feeds: Iterable[Mapping[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Mean over every axis but 1 (channels) of each main-graph tensor (name -> rank), over feeds."""
    clone = model.clone()
    values = {}
    for node in clone.graph:
        values.update({o.name: o for o in node.outputs if o.name})
    opset = clone.opset_imports.get("", 13)
    fetch = {}
    for i, (name, rank) in enumerate(ranks.items()):
        value = values.get(name)
        if value is None:
            continue
        t = ir.node("Transpose", [value], attributes={"perm": [1, 0, *range(2, rank)]})
        flat = ir.node("Flatten", [t.outputs[0]], attributes={"axis": 1})
        created = [t, flat]
        if opset >= 18:
            axes = ir.node("Constant", [], attributes={"value": ir.tensor(np.array([1], np.int64))})
            mean = ir.node("ReduceMean", [flat.outputs[0], axes.outputs[0]], attributes={"keepdims": 0})
            created += [axes, mean]
        else:
            mean = ir.node("ReduceMean", [flat.outputs[0]], attributes={"axes": [1], "keepdims": 0})
            created.append(mean)
        mean.outputs[0].name = f"biascorr.{i}.mean"
        clone.graph.insert_after(value.producer(), created)
        clone.graph.outputs.append(mean.outputs[0])
        fetch[name] = mean.outputs[0].name
    sums: dict[str, np.ndarray] = {}
    count = 0
    for got in runtime.capture(clone, (dict(f) for f in feeds), list(fetch.values()), priority_order=True):
        count += 1
        for name, out in fetch.items():
            sums[name] = sums.get(name, 0.0) + got[out].astype(np.float64)
    return {k: v / max(count, 1) for k, v in sums.items()}


def bias_correction(
    float_model: ir.Model, quant_model: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]], *, stages: int = 8
) -> dict[str, float]:
    """Shift the int32 biases of quantized Conv/Gemm nodes by the measured mean output error.

    Only nodes whose bias input is ``DequantizeLinear(int32 initializer, scale)`` and whose
    output has a rank-2 or rank-4 shape with channels on axis 1 are touched; ``float_model``
    must hold the same output names. Layers are corrected in ``stages`` groups in graph order,
    each measured after the corrections upstream of it. Returns output name -> max |shift|.
    """
    targets: dict[str, ir.Node] = {}
    ranks: dict[str, int] = {}
    for node in quant_model.graph:
        if node.op_type not in ("Conv", "Gemm") or len(node.inputs) < 3 or node.inputs[2] is None:
            continue
        dq = node.inputs[2].producer()
        if dq is None or dq.op_type != "DequantizeLinear" or dq.inputs[0].const_value is None:
            continue
        if dq.inputs[0].const_value.dtype != ir.DataType.INT32:
            continue
        w = node.inputs[1].producer() if node.inputs[1] is not None else None
        if node.op_type == "Gemm":
            ranks[node.outputs[0].name] = 2
        elif w is not None and w.inputs[0].const_value is not None:
            ranks[node.outputs[0].name] = len(w.inputs[0].const_value.shape)
        else:
            continue
        targets[node.outputs[0].name] = dq
    if not targets:
        return {}
    ref = channel_means(float_model, ranks, feeds)
    shifts: dict[str, float] = {}
    names = list(targets)  # graph order: upstream corrections change what downstream layers see
    size = max(1, -(-len(names) // stages))
    for start in range(0, len(names), size):
        group = names[start : start + size]
        got = channel_means(quant_model, {n: ranks[n] for n in group}, feeds)
        shifts.update(_shift({n: targets[n] for n in group}, ref, got))
    return shifts


def _shift(targets: Mapping[str, ir.Node], ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> dict[str, float]:
    shifts = {}
    for name, dq in targets.items():
        if name not in ref or name not in got or ref[name].shape != got[name].shape:
            continue
        q_value = dq.inputs[0]
        q = q_value.const_value.numpy().astype(np.int64)
        scale = dq.inputs[1].const_value.numpy().astype(np.float64)
        if q.shape != ref[name].shape:
            continue
        delta = ref[name] - got[name]
        limit = np.iinfo(np.int32).max
        new_q = np.clip(q + np.rint(delta / scale), -limit, limit).astype(np.int32)
        q_value.const_value = ir.tensor(new_q, name=q_value.name)
        shifts[name] = float(np.abs(delta).max())
    return shifts
