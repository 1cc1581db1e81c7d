"""Bias correction of a QDQ model, measured on calibration data.

Bias correction (Nagel et al., "Data-Free Quantization", sec. 4.2, measured instead of
estimated): quantization shifts the mean of a layer's output, ``E[y_q] != E[y]``, and downstream
averaging (GlobalAveragePool, squeeze-excitation blocks) turns that shift into large errors.
For each quantized Conv/Gemm with an int32 bias, the per-channel mean of its float output and of
its quantized output are measured on calibration data, and ``E[y] - E[y_q]`` is added to the
bias (re-quantized with the same scale ``s_x * s_w``). Means are reduced inside the graph
(right after each producer), so memory is that of one inference. :func:`correct_if_better`
keeps a correction only where it lowers the output error, as measured in onnxruntime.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.outcome import Outcome
from onnxopt.quant.channel_stats import channel_stats
from onnxopt.quant.deploy_check import run_flat
from onnxopt.quant.scales import relative_l2

__all__ = ["bias_correction", "correct_if_better"]


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
    ref = channel_stats(float_model, ranks, feeds)
    shifts: dict[str, float] = {}
    names = list(targets)  # graph order: upstream corrections change what downstream layers see
    size = max(1, -(-len(names) // stages))
    for start in range(0, len(names), size):
        group = names[start : start + size]
        got = channel_stats(quant_model, {n: ranks[n] for n in group}, feeds)
        shifts.update(_shift({n: targets[n] for n in group}, ref, got))
    return shifts


def correct_if_better(
    float_model: ir.Model, model: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]], out: Outcome
) -> None:
    """Shift int32 biases by the measured mean output error; kept only if the output error drops.

    The error is the relative L2 of all outputs against the float model on the first
    calibration feed, run in onnxruntime with its optimisations off (the QDQ graph as written).
    Both errors are recorded; a correction that made it worse is undone, with a note.
    """
    biases = {v: v.const_value for v in model.graph.initializers.values()
              if v.const_value is not None and v.const_value.dtype == ir.DataType.INT32}
    ref = run_flat(float_model, feeds[:1], "disable")
    before = relative_l2(ref, run_flat(model, feeds[:1], "disable"))
    shifts = bias_correction(float_model, model, feeds)
    after = relative_l2(ref, run_flat(model, feeds[:1], "disable"))
    out.record("bias_correction", rel_l2_before=round(before, 6), rel_l2_after=round(after, 6), kept=after < before)
    if after < before:
        out.count("biases_corrected", len(shifts))
        return
    for value, tensor in biases.items():
        value.const_value = tensor
    out.note(f"bias correction not kept: output error on a calibration feed rose from "
             f"{before:.3g} to {after:.3g} relative L2")


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
