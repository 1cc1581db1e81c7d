"""Measurements a quantization pass reports: layer-wise SQNR and FP32-vs-INT8 CPU latency.

Both run the float and the quantized model in onnxruntime on calibration feeds. SQNR compares,
per quantized tensor, the float model's value with the quantized model's dequantized value (the
error accumulated up to that point), streamed per feed and per chunk of tensors. The latency
check is the one timer, :func:`onnxopt.runtime.latency.medians`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.outcome import Outcome
from onnxopt.quant import scales
from onnxopt.quant.insert import InsertResult
from onnxopt.runtime import environment
from onnxopt.runtime import sessions as runtime
from onnxopt.runtime.latency import medians

__all__ = ["layer_sqnr", "local_sqnr", "record_latency", "record_sqnr", "run_flat", "run_outputs", "worst_relative_l2"]

_MAX_ACCUMULATED = 400  # tensors compared between float and INT8 runs (accumulated SQNR)


def layer_sqnr(
    float_model: ir.Model,
    quant_model: ir.Model,
    dequantized: Mapping[str, str],
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    chunk: int = 64,
) -> list[dict[str, float | str]]:
    """SQNR in dB per quantized tensor, worst (lowest) first.

    Args:
        float_model: the model before quantization.
        quant_model: the QDQ model.
        dequantized: float tensor name -> name of its DequantizeLinear output in ``quant_model``.
        feeds: calibration feeds (a few are enough).
        chunk: tensors fetched per onnxruntime session (bounds memory).

    """
    names = list(dequantized)
    signal = dict.fromkeys(names, 0.0)
    noise = dict.fromkeys(names, 0.0)
    for start in range(0, len(names), chunk):
        part = names[start : start + chunk]
        ref_stream = runtime.capture(float_model, (dict(f) for f in feeds), part)
        cand_stream = runtime.capture(quant_model, (dict(f) for f in feeds), [dequantized[n] for n in part])
        for ref, cand in zip(ref_stream, cand_stream, strict=True):
            for name in part:
                r = np.asarray(ref[name], dtype=np.float64)
                c = np.asarray(cand[dequantized[name]], dtype=np.float64)
                signal[name] += float(np.sum(r * r))
                noise[name] += float(np.sum((r - c) ** 2))
    rows = []
    for name in names:
        if noise[name] == 0.0:
            db = math.inf
        elif signal[name] == 0.0:
            db = -math.inf
        else:
            db = 10.0 * math.log10(signal[name] / noise[name])
        rows.append({"tensor": name, "sqnr_db": round(db, 2) if math.isfinite(db) else db})
    rows.sort(key=lambda r: r["sqnr_db"])
    return rows


def _db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return round(10.0 * math.log10(signal / noise), 2)


def local_sqnr(
    float_model: ir.Model,
    params: Mapping[str, tuple[float, int]],
    qtype: str,
    feeds: Iterable[Mapping[str, np.ndarray]],
) -> dict[str, float]:
    """SQNR in dB that quantizing each tensor alone adds, measured in one float-model run per feed.

    For each tensor T with (scale, zero point), the clone computes ``sum(T^2)`` and
    ``sum((T - DQ(Q(T)))^2)`` in the graph, right after T's producer, so only scalars leave
    onnxruntime and memory stays that of one inference (PP-OCR-sized feeds included).
    """
    clone = float_model.clone()
    values = {v.name: v for v in clone.graph.inputs}
    for node in clone.graph:
        values.update({o.name: o for o in node.outputs if o.name})
    first = next(iter(clone.graph), None)
    zero_type = ir.DataType.UINT8 if qtype == "uint8" else ir.DataType.INT8
    fetch: dict[str, tuple[str, str]] = {}
    for i, (name, (scale, zero)) in enumerate(params.items()):
        if name not in values:
            continue
        x = values[name]
        s = ir.node("Constant", [], attributes={"value": ir.tensor(np.array(scale, np.float32))})
        z = ir.node("Constant", [], attributes={"value": ir.tensor(np.array(zero, zero_type.numpy()))})
        q = ir.node("QuantizeLinear", [x, s.outputs[0], z.outputs[0]])
        dq = ir.node("DequantizeLinear", [q.outputs[0], s.outputs[0], z.outputs[0]])
        diff = ir.node("Sub", [x, dq.outputs[0]])
        noise = ir.node("ReduceSumSquare", [diff.outputs[0]], attributes={"keepdims": 0})
        signal = ir.node("ReduceSumSquare", [x], attributes={"keepdims": 0})
        noise.outputs[0].name = f"sqnr.{i}.noise"
        signal.outputs[0].name = f"sqnr.{i}.signal"
        created = [s, z, q, dq, diff, noise, signal]
        producer = x.producer()
        if producer is not None:
            clone.graph.insert_after(producer, created)
        elif first is not None:
            clone.graph.insert_before(first, created)
        clone.graph.outputs.extend([noise.outputs[0], signal.outputs[0]])
        fetch[name] = (signal.outputs[0].name, noise.outputs[0].name)
    names = [n for pair in fetch.values() for n in pair]
    sums = dict.fromkeys(names, 0.0)
    for got in runtime.capture(clone, (dict(f) for f in feeds), names, priority_order=True):
        for n in names:
            sums[n] += float(got[n])
    return {t: _db(sums[sig], sums[noi]) for t, (sig, noi) in fetch.items()}


def record_sqnr(
    float_model: ir.Model,
    quant_model: ir.Model,
    result: InsertResult,
    qtype: str,
    feeds: Sequence[Mapping[str, np.ndarray]],
    outcome: Outcome,
) -> None:
    """Record the layer-wise SQNR of ``quant_model``, worst first, in ``outcome``.

    Each quantized tensor gets its local SQNR (:func:`local_sqnr`: that tensor's rounding
    alone) and, where both models' tensors fit in memory at once, its accumulated SQNR
    (:func:`layer_sqnr`: the error up to that point); otherwise a note says it is local only.

    Args:
        float_model: the model before quantization.
        quant_model: the QDQ model.
        result: what Q/DQ insertion did (scales and zero points, dequantized tensor names).
        qtype: the activation type, "uint8" or "int8".
        feeds: calibration feeds.
        outcome: receives one record per tensor.

    """
    params = {k: (float(p.scale), p.zero) for k, p in result.params.items()}
    local = local_sqnr(float_model, params, qtype, feeds)
    accumulated: dict[str, float] = {}
    small_model = runtime.fits_in_memory(float_model)  # both sessions live at once
    if small_model and _small_feeds(feeds) and len(result.dequantized) <= _MAX_ACCUMULATED:
        live = {k: v for k, v in result.dequantized.items() if k in local}
        rows = layer_sqnr(float_model, quant_model, live, feeds)
        accumulated = {str(r["tensor"]): float(r["sqnr_db"]) for r in rows}
    else:
        outcome.note("layer-wise SQNR is local only (model or feeds too large to hold both models' tensors)")
    order = sorted(local, key=lambda k: (accumulated.get(k, local[k]), local[k]))
    for name in order:
        fields = {"sqnr_db": local[name]}
        if name in accumulated:
            fields["accumulated_sqnr_db"] = accumulated[name]
        outcome.record(name, **fields)


def record_latency(
    float_model: ir.Model, quant_model: ir.Model, feed: Mapping[str, np.ndarray], runs: int, outcome: Outcome
) -> None:
    """Record FP32 vs INT8 CPU latency (1 thread, ORT_ENABLE_ALL); a note when INT8 is slower."""
    fp32, int8 = medians([float_model, quant_model], feed, runs=runs)
    outcome.record("latency", fp32_ms=round(fp32, 3), int8_ms=round(int8, 3), ratio=round(int8 / fp32, 3),
                   cpu=environment.cpu_info().describe())
    if int8 > fp32:
        outcome.note(
            f"INT8 is slower than FP32 on CPU (1 thread, ORT_ENABLE_ALL): {int8:.2f} ms vs "
            f"{fp32:.2f} ms ({int8 / fp32:.2f}x); consider the mixed recipe"
        )


def _small_feeds(feeds: Sequence[Mapping[str, np.ndarray]]) -> bool:
    return all(sum(a.nbytes for a in f.values()) <= (1 << 20) for f in feeds)


def run_outputs(
    model: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]], opt_level: runtime.OptLevel
) -> dict[str, np.ndarray]:
    """Each output of ``model`` over ``feeds`` (one session), flattened into one float64 vector per output."""
    with runtime.session(model, opt_level=opt_level) as handle:
        runs = [handle.run(dict(feed)) for feed in feeds]
    return {name: np.concatenate([np.asarray(outs[name], np.float64).ravel() for outs in runs]) for name in runs[0]}


def worst_relative_l2(reference: Mapping[str, np.ndarray], approx: Mapping[str, np.ndarray]) -> float:
    """The largest per-output relative L2 error (one small output badly off is not hidden by a large one)."""
    return max(scales.relative_l2(reference[name], approx[name]) for name in reference)


def run_flat(model: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]], opt_level: runtime.OptLevel) -> np.ndarray:
    """All outputs of ``model`` on each feed (one session), flattened into one float64 vector."""
    with runtime.session(model, opt_level=opt_level) as handle:
        runs = [handle.run(dict(feed)) for feed in feeds]
    return np.concatenate([np.asarray(v, np.float64).ravel() for outs in runs for v in outs.values()])
