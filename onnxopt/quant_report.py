"""Measurements a quantization pass reports: layer-wise SQNR and FP32-vs-INT8 CPU latency.

Both run the float and the quantized model in onnxruntime on calibration feeds. SQNR compares,
per quantized tensor, the float model's value with the quantized model's dequantized value (the
error accumulated up to that point), streamed per feed and per chunk of tensors.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxopt import runtime

__all__ = ["latency_ms", "layer_sqnr"]


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
        for ref, cand in zip(ref_stream, cand_stream):
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


def latency_ms(
    models: Iterable[ir.Model], feed: Mapping[str, np.ndarray], *, runs: int = 10, warmup: int = 3, threads: int = 1
) -> list[float]:
    """Median latency (ms) of each model on ``feed``, runs interleaved, ORT_ENABLE_ALL on CPU."""
    handles = [runtime.make_session(m, threads=threads, opt_level="all") for m in models]
    try:
        times: list[list[float]] = [[] for _ in handles]
        feed = dict(feed)
        for _ in range(warmup):
            for h in handles:
                h.run(feed)
        for _ in range(runs):
            for h, t in zip(handles, times):
                t0 = time.perf_counter()
                h.run(feed)
                t.append((time.perf_counter() - t0) * 1e3)
        return [statistics.median(t) for t in times]
    finally:
        for h in handles:
            h.close()
