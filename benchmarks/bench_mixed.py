"""Mixed precision: the ``mixed`` recipe against full INT8, FP32 and a greedy search.

Per model: the budget is set between full INT8's measured cosine and 1 (so plain INT8 misses
it) unless ``--min-cosine`` is given; then

* ``mixed``: ``onnxopt.optimize(..., recipe="mixed")`` -- non-INT8 count of its accuracy plan
  (before the CPU speed guard) and of the final model, planning time, model runs;
* ``greedy``: from full INT8, fall back the one node that helps most, repeatedly, judged on the
  evaluation data itself (a strong baseline: it sees the data the final check uses);
* size and CPU latency (1 thread, ORT_ENABLE_ALL, runs interleaved with FP32, median of the
  per-pair ratios) of FP32, full INT8 and the mixed model; the output cosine of each.

    python benchmarks/bench_mixed.py [--models digits_cnn,digits_transformer,cls] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time
from typing import Any

from onnxopt.passes.mixed import int8_quantizer

import onnxopt
from onnxopt import io as _io
from onnxopt import pipeline
from onnxopt.context import PassContext
from onnxopt.pass_base import make
from onnxopt.quant import planner as precision_plan
from onnxopt.quant import sensitivity
from onnxopt.runtime import data as _data
from onnxopt.runtime import latency, validation

ROOT = pathlib.Path(__file__).resolve().parents[1]
OCR_FEEDS = ROOT / "benchmarks" / "ocr" / ".cache" / "feeds"


def sources() -> dict[str, tuple[pathlib.Path, pathlib.Path, pathlib.Path]]:
    out = {}
    for name in ("digits_cnn", "digits_transformer", "digits_mlp"):
        out[name] = (ROOT / "models" / f"{name}.onnx", ROOT / "models" / f"{name}_calib.npz",
                     ROOT / "models" / f"{name}_eval.npz")  # fmt: skip
    try:
        from onnxopt.testing import ocr_data

        out["cls"] = (ocr_data.model_paths()["cls"], OCR_FEEDS / "cls", OCR_FEEDS / "eval_cls")
    except (ImportError, FileNotFoundError) as err:
        print(f"PP-OCR cls unavailable: {err}")
    return out


def run_one(name: str, paths: tuple, args: argparse.Namespace, tmp: pathlib.Path) -> dict[str, Any]:
    model_path, calib_path, eval_path = paths
    ref = _io.load_model(model_path)
    sig = _data.input_signature(ref)
    calib = _data.load_data(calib_path, sig)
    evald = _data.load_data(eval_path, sig).take(args.eval_feeds)
    eval_feeds = list(evald)
    row: dict[str, Any] = {"model": name}
    # Full INT8 (the int8 recipe) and its cosine: the budget sits between it and 1.
    int8_out = tmp / f"{name}.int8.onnx"
    onnxopt.optimize(model_path, int8_out, recipe="int8", calibration=calib, evaluation=evald, quiet=True)
    ref_out = sensitivity.run_outputs(ref, eval_feeds)
    int8_model = _io.load_model(int8_out)
    cos_int8 = sensitivity.measure(ref_out, sensitivity.run_outputs(int8_model, eval_feeds),
                                   sensitivity.Budget(min_cosine=0.0)).cosine  # fmt: skip
    budget = args.min_cosine if args.min_cosine is not None else round(1 - (1 - cos_int8) / 2, 7)
    row.update(budget_min_cosine=budget, int8_cosine=cos_int8)
    # The mixed recipe.
    mixed_out = tmp / f"{name}.mixed.onnx"
    t0 = time.perf_counter()
    result = onnxopt.optimize(model_path, mixed_out, recipe="mixed", calibration=calib, evaluation=evald,
                              min_cosine=budget, target="cpu", quiet=True)  # fmt: skip
    row["mixed_seconds"] = round(time.perf_counter() - t0, 2)
    mixed_report = next(r for r in result.reports if r.pass_name == "mixed")
    row["mixed_status"] = mixed_report.status
    row["mixed_counts"] = dict(mixed_report.counts)
    row["mixed_notes"] = mixed_report.notes
    row["mixed_passed_final_validation"] = result.passed
    mixed_model = _io.load_model(mixed_out)
    row["mixed_cosine"] = sensitivity.measure(ref_out, sensitivity.run_outputs(mixed_model, eval_feeds),
                                              sensitivity.Budget(min_cosine=budget)).cosine  # fmt: skip
    # The accuracy plan alone (no CPU speed guard): what the budget allows, whatever the speed.
    acc_out = tmp / f"{name}.mixed_acc.onnx"
    acc = onnxopt.optimize(model_path, acc_out, passes=["simplify", ("mixed", {"speed_guard": False})],
                           calibration=calib, evaluation=evald, min_cosine=budget, quiet=True)  # fmt: skip
    acc_report = next(r for r in acc.reports if r.pass_name == "mixed")
    row["accuracy_plan_counts"] = dict(acc_report.counts)
    acc_model = _io.load_model(acc_out)
    row["accuracy_plan_cosine"] = sensitivity.measure(ref_out, sensitivity.run_outputs(acc_model, eval_feeds),
                                                      sensitivity.Budget(min_cosine=budget)).cosine  # fmt: skip
    # Greedy baseline on the same simplified, named model and the same quantizer.
    if not args.no_greedy:
        ctx = PassContext(calibration=calib, evaluation=evald, min_cosine=budget, quiet=True)
        base = pipeline.run(_io.load_model(model_path), [make("simplify", {}, ctx)]).model
        precision_plan.name_nodes(base)
        quantize = int8_quantizer(ctx)
        candidates = precision_plan.quantized_nodes(quantize(base.clone(), frozenset()))
        planner = precision_plan.Planner(base, candidates, quantize, sensitivity.Budget(min_cosine=budget), "cpu",
                                         eval_feeds, eval_feeds, latency_runs=0)  # fmt: skip
        t0 = time.perf_counter()
        fallback, runs, met = precision_plan.greedy_search(planner, max_steps=args.max_greedy_steps)
        row["greedy"] = {"non_int8": len(fallback), "runs": runs, "seconds": round(time.perf_counter() - t0, 2),
                         "met": met, "candidates": len(candidates)}  # fmt: skip
    # Size and latency, interleaved with FP32.
    feed = eval_feeds[0]
    timed = (("int8", int8_model, int8_out), ("mixed", mixed_model, mixed_out), ("accuracy_plan", acc_model, acc_out))
    for label, model, path in timed:
        fp32_ms, ratio = latency.paired_ratio(ref, model, feed, args.latency_runs)
        row[f"{label}_latency_ratio"] = round(ratio, 3)
        row[f"{label}_size_ratio"] = round(validation.file_size(path) / validation.file_size(model_path), 3)
        row["fp32_ms"] = round(fp32_ms, 3)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits_cnn,digits_transformer")
    parser.add_argument("--min-cosine", type=float, default=None, help="budget (default: halfway from INT8 to 1)")
    parser.add_argument("--eval-feeds", type=int, default=32)
    parser.add_argument("--latency-runs", type=int, default=50)
    parser.add_argument("--max-greedy-steps", type=int, default=None)
    parser.add_argument("--no-greedy", action="store_true")
    parser.add_argument("--json", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    rows = []
    all_sources = sources()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            row = run_one(name, all_sources[name], args, pathlib.Path(tmp))
            rows.append(row)
            print(json.dumps(row, indent=1, default=str))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
