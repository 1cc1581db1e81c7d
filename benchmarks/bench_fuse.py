"""fuse and its interplay with INT8: latency and fidelity, ratios against FP32 in the same run.

Variants per model: fp32 (as given), fused, int8 (quantize alone), fuse->int8, int8->fuse.
Latency: onnxruntime CPU, 1 intra-op thread, at two graph optimization levels (disable: the
graph as written; all: what a deployment gets, where onnxruntime also runs its own C++
fusions at load time). Variants are timed interleaved, round-robin in a shuffled order, and each
reported number is the median over rounds of per-round medians, so machine noise hits all
variants alike. Fidelity: against the fp32 model on held-out feeds (not the calibration feeds).

Models: the BERT-style encoder of onnxopt/testing/bert_builder.py (hidden 128, 4 heads, 2 layers, seq 64)
and the bundled models/digits_transformer.onnx (with its labels: accuracy).

    python benchmarks/bench_fuse.py [--rounds 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import time

import numpy as np
import onnx_ir as ir

ROOT = pathlib.Path(__file__).resolve().parents[1]

from onnxopt import io as _io
from onnxopt import pipeline
from onnxopt.context import PassContext
from onnxopt.pass_base import make
from onnxopt.runtime import data, validation
from onnxopt.runtime import sessions as runtime
from onnxopt.testing.bert_builder import bert_feeds, make_bert

ORDERS = {"fp32": [], "fused": ["fuse"], "int8": ["quantize"], "fuse->int8": ["fuse", "quantize"],
          "int8->fuse": ["quantize", "fuse"]}


def build_variants(model: ir.Model, calib: list[dict]) -> tuple[dict[str, ir.Model], dict[str, str]]:
    variants, summaries = {}, {}
    for name, steps in ORDERS.items():
        context = PassContext(calibration=data.load_data(calib), quiet=True)
        passes = [make(s, {"latency_runs": 0, "sqnr_samples": 0} if s == "quantize" else {}, context) for s in steps]
        result = pipeline.run(model.clone(), passes)
        variants[name] = result.model
        summaries[name] = " | ".join(f"{r.pass_name}: {r.summary()}" for r in result.reports)
    return variants, summaries


def latency(
    variants: dict[str, ir.Model], feed: dict, level: str, rounds: int, runs: int, threads: int = 1
) -> dict[str, float]:
    """Median ms per variant: rounds in a shuffled order, each the median of ``runs`` runs."""
    sessions = {k: runtime.make_session(m, threads=threads, opt_level=level) for k, m in variants.items()}
    for s in sessions.values():
        for _ in range(5):
            s.run(feed)
    per_round: dict[str, list[float]] = {k: [] for k in sessions}
    rng = random.Random(0)
    for _ in range(rounds):
        order = list(sessions)
        rng.shuffle(order)
        for k in order:
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                sessions[k].run(feed)
                times.append(time.perf_counter() - t0)
            per_round[k].append(float(np.median(times)) * 1e3)
    for s in sessions.values():
        s.close()
    return {k: float(np.median(v)) for k, v in per_round.items()}


def fidelity(ref: ir.Model, cand: ir.Model, feeds: list[dict], labels: np.ndarray | None) -> dict[str, float]:
    with runtime.session(ref) as r, runtime.session(cand) as c:
        ro = runtime.run_all(r, feeds)
        co = runtime.run_all(c, feeds)
    name = r.output_names[0]
    m = validation.output_metrics([o[name] for o in ro], [o[name] for o in co], labels=labels)
    out = {"max_abs": m.max_abs, "cosine": m.cosine, "top1_agree": m.top1}
    if m.cand_accuracy is not None:
        out["accuracy"] = m.cand_accuracy
        out["fp32_accuracy"] = m.ref_accuracy
    return out


def bench(label: str, model: ir.Model, calib: list[dict], evals: list[dict], labels, lat_feed: dict,
          rounds: int, runs: int) -> dict:
    variants, summaries = build_variants(model, calib)
    result = {"model": label, "passes": summaries, "fidelity": {}, "latency_ms": {}, "ratio_vs_fp32": {}}
    for k, m in variants.items():
        result["fidelity"][k] = fidelity(model, m, evals, labels)
    for level in ("disable", "all"):
        lat = latency(variants, lat_feed, level, rounds, runs)
        result["latency_ms"][level] = lat
        result["ratio_vs_fp32"][level] = {k: v / lat["fp32"] for k, v in lat.items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--runs", type=int, default=20, help="runs per variant per round")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results = []
    bert = ir.serde.deserialize_model(make_bert(hidden=128, heads=4, layers=2, max_seq=64, vocab=1000))
    calib = bert_feeds(32, batch=4, seq=64, vocab=1000, seed=1)
    evals = bert_feeds(32, batch=4, seq=64, vocab=1000, seed=2)
    results.append(bench("bert_builder(h128,4 heads,2 layers,seq64)", bert, calib, evals, None,
                         bert_feeds(1, batch=1, seq=64, vocab=1000, seed=3)[0], args.rounds, args.runs))
    digits = _io.load_model(ROOT / "models" / "digits_transformer.onnx")
    c = np.load(ROOT / "models" / "digits_transformer_calib.npz")["input"]
    e = np.load(ROOT / "models" / "digits_transformer_eval.npz")
    results.append(bench("digits_transformer", digits, [{"input": c[i:i + 32]} for i in range(0, len(c), 32)],
                         [{"input": e["input"][i:i + 64]} for i in range(0, len(e["input"]), 64)],
                         e["label"], {"input": e["input"][:1]}, args.rounds, args.runs))
    for r in results:
        print(f"\n== {r['model']}")
        for k, s in r["passes"].items():
            print(f"  {k:<11} {s}")
        print(f"  {'variant':<11} {'cosine':>9} {'max_abs':>9} {'top1':>6} {'acc':>6} | "
              f"{'ms(disable)':>11} {'ratio':>6} | {'ms(all)':>8} {'ratio':>6}")
        for k in ORDERS:
            f = r["fidelity"][k]
            acc = f"{f['accuracy']:.4f}" if "accuracy" in f else "-"
            print(f"  {k:<11} {f['cosine']:>9.6f} {f['max_abs']:>9.3g} {f['top1_agree']:>6.3f} {acc:>6} | "
                  f"{r['latency_ms']['disable'][k]:>11.3f} {r['ratio_vs_fp32']['disable'][k]:>6.3f} | "
                  f"{r['latency_ms']['all'][k]:>8.3f} {r['ratio_vs_fp32']['all'][k]:>6.3f}")
        lat = r["latency_ms"]
        print("  latency ratios (same run): " + "; ".join(
            f"{level}: fused/fp32 {lat[level]['fused'] / lat[level]['fp32']:.3f}, "
            f"fuse->int8 / int8 {lat[level]['fuse->int8'] / lat[level]['int8']:.3f}" for level in lat))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
