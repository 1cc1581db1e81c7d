"""onnxruntime CPU latency of several models on one feed, timed interleaved; ratios to the first.

Needs only onnxruntime and numpy (no onnxopt), so it runs on a machine that has just those,
e.g. to time the models ``bench_int8.py --keep DIR`` wrote on a quiet machine. Pin the cores
from outside (``taskset -c 0,1``) to mimic a smaller machine.

    python benchmarks/latency.py --feed feed.npz fp32.onnx int8_a.onnx int8_b.onnx [--runs 30]
    python benchmarks/latency.py --feed feed.npz int8.onnx --threads 1 --profile   # time per op type
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import random
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort


def session(path: pathlib.Path, threads: int, disabled: tuple[str, ...] = ()) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(disabled) or None)


# Deliberately not onnxopt.runtime.latency (the one timer): this script must run without onnxopt.
def medians(variants: list[tuple[pathlib.Path, tuple[str, ...]]], feed: dict[str, np.ndarray], threads: int,
            runs: int) -> list[float]:
    """Median ms per (model, disabled optimizers): warm-up, then rounds in a shuffled order (noise hits all alike)."""
    sessions = [session(p, threads, d) for p, d in variants]
    for s in sessions:
        for _ in range(3):
            s.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    order = list(range(len(sessions)))
    rng = random.Random(0)
    for _ in range(runs):
        rng.shuffle(order)
        for i in order:
            t0 = time.perf_counter()
            sessions[i].run(None, feed)
            times[i].append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


def profile(path: pathlib.Path, feed: dict[str, np.ndarray], threads: int, runs: int) -> list[tuple[str, float, float]]:
    """(op type, share of kernel time, kernels per run) from onnxruntime's own profiler, largest first."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.enable_profiling = True
    s = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        s.run(None, feed)
    trace = pathlib.Path(s.end_profiling())
    time_by_op: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            time_by_op[event["args"]["op_name"]] += event["dur"]
            count[event["args"]["op_name"]] += 1
    trace.unlink()
    total = sum(time_by_op.values()) or 1
    return [(op, t / total, count[op] / runs) for op, t in time_by_op.most_common()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=pathlib.Path, help="the first is the baseline")
    ap.add_argument("--feed", required=True, type=pathlib.Path, help=".npz keyed by input name")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--profile", action="store_true", help="also print each model's kernel time per op type")
    ap.add_argument("--also-disabled", default="", help="comma-separated onnxruntime optimizers (e.g. "
                    "SkipLayerNormFusion): also time every model in a session with these disabled")
    args = ap.parse_args(argv)
    feed = dict(np.load(args.feed))
    print(f"onnxruntime {ort.__version__}, {args.runs} runs, feed {[a.shape for a in feed.values()]}")
    if args.profile:
        threads = int(args.threads.split(",")[0])
        for path in args.models:
            print(f"{path.name}, {threads} thread(s):")
            for op, share, per_run in profile(path, feed, threads, args.runs)[:12]:
                print(f"  {op:<28} {share * 100:5.1f} %  {per_run:5.0f} per run")
    for threads in (int(t) for t in args.threads.split(",")):
        off = tuple(o for o in args.also_disabled.split(",") if o)
        variants = [(p, d) for p in args.models for d in ([(), off] if off else [()])]
        ms = medians(variants, feed, threads, args.runs)
        for (path, d), m in zip(variants, ms, strict=True):
            label = path.name + (f" -{','.join(d)}" if d else "")
            print(f"{threads} thread(s)  {label:<32} {m:9.2f} ms  {m / ms[0]:6.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
