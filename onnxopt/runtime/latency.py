"""onnxruntime latency: the one timer every measurement of onnxopt goes through.

:func:`time_runs` is the loop: warm-up rounds, then timed rounds over one or more session
handles on one feed, each round running every handle once, so that load on a shared machine
hits every model alike. Its order is ``"interleaved"`` (the same order every round) or
``"alternating"`` (every other round reversed, so no model always runs right after another).
An optional time budget shrinks the number of runs when a first round shows they would not fit
(PP-OCR det at 736x2944 takes seconds per run). The three shapes callers need sit on top:

- :func:`median_p90`: one open session, median and p90 (``validation.compare``);
- :func:`medians`: the median of each of several models, interleaved (the quantize pass's
  FP32-vs-INT8 check, ``bench_int8``, ``bench_smooth``);
- :func:`paired_ratio`: a reference and a candidate alternating, the median of the per-pair
  ratios (the precision planner's decisions, ``bench_mixed``).

``benchmarks/latency.py`` keeps its own loop on purpose: it runs where only onnxruntime and
numpy are installed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxopt.runtime import sessions

__all__ = ["Order", "median_p90", "medians", "paired_ratio", "time_runs"]

logger = logging.getLogger(__name__)

Order = Literal["interleaved", "alternating"]
ModelSource = ir.Model | str | os.PathLike | bytes


def time_runs(
    handles: Sequence[sessions.SessionHandle],
    feed: Mapping[str, np.ndarray],
    *,
    runs: int,
    warmup: int,
    order: Order = "interleaved",
    budget_s: float | None = None,
) -> list[list[float]]:
    """Time runs of ``handles`` on ``feed``: the wall time in ms of each timed run, per handle.

    Args:
        handles: open sessions, all taking ``feed``.
        feed: one input feed.
        runs: timed rounds (each runs every handle once).
        warmup: untimed rounds before them.
        order: ``"interleaved"``: handles in the given order every round; ``"alternating"``:
            every other round in reverse order.
        budget_s: if given, one untimed round runs first; when ``runs + warmup`` rounds would
            take longer than this, ``runs`` shrinks to what fits (at least 3) and that first
            round is the only warm-up.

    Returns:
        One list of ``runs`` times (ms) per handle, in the order of ``handles``.

    """
    feed = dict(feed)
    if budget_s is not None:
        t0 = time.perf_counter()
        for h in handles:
            h.run(feed)
        one_round = time.perf_counter() - t0
        if one_round * (runs + warmup) > budget_s:
            shrunk = max(3, int(budget_s / max(one_round, 1e-9)) - 1)
            logger.debug(
                "latency: %d runs do not fit %.1f s (%.3f s a round): %d runs",
                runs, budget_s, one_round, shrunk,
            )
            runs, warmup = shrunk, 0
    for _ in range(warmup):
        for h in handles:
            h.run(feed)
    forward = list(range(len(handles)))
    times: list[list[float]] = [[] for _ in handles]
    for i in range(runs):
        sequence = forward if order == "interleaved" or i % 2 == 0 else forward[::-1]
        for j in sequence:
            t0 = time.perf_counter()
            handles[j].run(feed)
            times[j].append((time.perf_counter() - t0) * 1e3)
    return times


def median_p90(
    handle: sessions.SessionHandle,
    feed: Mapping[str, np.ndarray],
    *,
    runs: int = 30,
    warmup: int = 5,
) -> tuple[float, float]:
    """Time ``runs`` runs of one feed after ``warmup`` runs: (median, p90) wall time in ms."""
    (times,) = time_runs([handle], feed, runs=runs, warmup=warmup)
    return float(np.median(times)), float(np.percentile(times, 90))


def medians(
    models: Sequence[ModelSource],
    feed: Mapping[str, np.ndarray],
    *,
    runs: int = 10,
    warmup: int = 3,
    threads: int | None = 1,
    budget_s: float | None = 30.0,
) -> list[float]:
    """Time each model on ``feed``, runs interleaved (ORT_ENABLE_ALL, CPU): median ms per model.

    Models whose weights together do not fit :func:`~onnxopt.runtime.sessions.fits_in_memory`
    are timed one after the other instead, so that one copy of weights is live at a time (paths
    are loaded by onnxruntime from their files and are not counted).

    Args:
        models: ir.Models, paths or serialized bytes.
        feed: one input feed.
        runs: timed runs of each model.
        warmup: untimed rounds first.
        threads: intra-op threads (None: onnxruntime's default).
        budget_s: see :func:`time_runs`; None never shrinks ``runs``.

    """
    models = list(models)
    in_memory = [m for m in models if isinstance(m, ir.Model)]
    if len(models) > 1 and not sessions.fits_in_memory(*in_memory):
        kw = {"runs": runs, "warmup": warmup, "threads": threads, "budget_s": budget_s}
        return [medians([m], feed, **kw)[0] for m in models]
    with contextlib.ExitStack() as stack:
        handles = [
            stack.enter_context(sessions.session(m, threads=threads, opt_level="all")) for m in models
        ]
        times = time_runs(handles, feed, runs=runs, warmup=warmup, budget_s=budget_s)
    return [statistics.median(t) for t in times]


def paired_ratio(
    reference: ModelSource,
    candidate: ModelSource,
    feed: Mapping[str, np.ndarray],
    runs: int,
    *,
    warmup: int = 3,
    threads: int | None = 1,
) -> tuple[float, float]:
    """Time ``candidate`` against ``reference`` in alternating pairs (ORT_ENABLE_ALL, CPU).

    Runs alternate reference and candidate (and which of the two goes first), so load on a
    shared machine hits both alike; the median of the pairwise ratios is what decisions use.

    Returns:
        (reference median ms, median of the per-pair candidate/reference ratios).

    """
    kw = {"threads": threads, "opt_level": "all"}
    with sessions.session(reference, **kw) as ref, sessions.session(candidate, **kw) as cand:
        ref_ms, cand_ms = time_runs([ref, cand], feed, runs=runs, warmup=warmup, order="alternating")
    ratios = [c / r if r > 0 else math.inf for r, c in zip(ref_ms, cand_ms, strict=True)]
    return float(np.median(ref_ms)), float(np.median(ratios))
