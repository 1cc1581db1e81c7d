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

At scale (issue 17), ``--scale``:

* ``trial rate``: trials per second of a plan trial built for real (quantize a clone keeping the
  other groups float, new session, run) -- what every trial cost before -- against one
  ``session.run`` of the switch graph (:mod:`onnxopt.quant.screening`), same feeds, same plans;
* ``workers``: one batch of screening trials (every group alone at INT8) on 1 and on 2 worker
  processes: seconds and whether every measurement is identical;
* ``mixed``: the recipe on PP-OCR det / rec / cls with ``--time-budget`` and ``--workers``:
  wall time, whether it stopped early, nodes per precision, held-out cosine, latency vs FP32.

    python benchmarks/bench_mixed.py --scale [--scale-models digits_transformer,det,rec] [--time-budget 300]
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


def _scale_sources() -> dict[str, tuple[pathlib.Path, pathlib.Path, pathlib.Path]]:
    out = {"digits_transformer": sources()["digits_transformer"]}
    try:
        from onnxopt.testing import ocr_data

        paths = ocr_data.model_paths()
    except (ImportError, FileNotFoundError) as err:
        print(f"PP-OCR models unavailable: {err}")
        return out
    nf = pathlib.Path("/tmp/nf")
    out["det"] = (paths["det"], nf / "ocr" / "det", nf / "ocr" / "eval_det")
    out["cls"] = (paths["cls"], nf / "ocr" / "cls", nf / "ocr" / "eval_cls")
    if "rec" in paths:
        out["rec"] = (paths["rec"], nf / "ocr_rec" / "rec", nf / "ocr_rec" / "eval_rec")
    return out


def _screen_setup(model_path: pathlib.Path, calib, evald, plan_feeds: int, switch: str = "if"):
    """The mixed pass's own set-up: simplified, named float model, quantizer, switch graph, feeds."""
    from onnxopt.passes import mixed

    from onnxopt import _ir_utils
    from onnxopt.quant import screening

    ctx = PassContext(calibration=calib, evaluation=evald, quiet=True)
    # check=False: the pipeline's per-pass check runs every evaluation feed several times (minutes on det).
    base = pipeline.run(_io.load_model(model_path), [make("simplify", {}, ctx)], check=False).model
    _ir_utils.upgrade_opset(base, 13)
    precision_plan.name_nodes(base)
    quantize = int8_quantizer(ctx)
    full = quantize(base.clone(), frozenset())
    candidates = precision_plan.quantized_nodes(full)
    smoothed = quantize(base.clone(), frozenset(candidates))
    feeds = mixed._screen_feeds(evald, plan_feeds)
    sizes = None
    if switch == "if":  # as the mixed pass: large activations switched by an If
        sizes = screening.activation_sizes(full, smoothed, feeds[mixed._smallest(feeds)])
    screen = screening.build(full, smoothed, candidates, sizes=sizes)
    return base, quantize, candidates, screen, feeds


def run_scale(name: str, paths: tuple, args: argparse.Namespace, tmp: pathlib.Path) -> dict[str, Any]:
    from onnxopt.quant import trials

    model_path, calib_path, eval_path = paths
    ref = _io.load_model(model_path)
    sig = _data.input_signature(ref)
    calib = _data.load_data(calib_path, sig)
    evald = _data.load_data(eval_path, sig)
    row: dict[str, Any] = {"model": name}
    t0 = time.perf_counter()
    # The trial-rate and worker parts calibrate on --setup-calib-feeds (ranges do not change trial cost).
    base, quantize, candidates, screen, feeds = _screen_setup(model_path, calib.take(args.setup_calib_feeds),
                                                              evald, args.plan_feeds, args.switch)  # fmt: skip
    row.update(setup_seconds=round(time.perf_counter() - t0, 1), candidates=len(candidates), groups=len(screen.groups),
               switched_inputs=screen.switched_inputs, screen_feeds=len(feeds), switch=args.switch,
               if_switches=sum(n.op_type == "If" for n in screen.model.graph))  # fmt: skip
    budget = sensitivity.Budget(min_cosine=0.0)
    reference = sensitivity.run_outputs(base, feeds)
    groups = list(screen.groups)
    # Trial rate: the same plans (group g alone INT8) both ways.
    picks = groups[:: max(1, len(groups) // args.rate_trials)][: args.rate_trials]
    t0 = time.perf_counter()
    before = []
    for g in picks[: args.rebuild_trials]:
        built = quantize(base.clone(), frozenset(candidates) - frozenset(screen.groups[g]))
        before.append(sensitivity.measure(reference, sensitivity.run_outputs(built, feeds), budget))
    rebuild_s = (time.perf_counter() - t0) / len(before)
    data_bytes = _io.serialized_size(screen.model)
    with trials.Runner(ir_bytes(screen.model), {"screen": feeds}, {"screen": reference}, budget, trials.WorkerSpec()) as r:
        r.measure("screen", [screen.feed({})])  # warm-up
        t0 = time.perf_counter()
        after = r.measure("screen", [screen.feed({g: "int8"}) for g in picks])
        screen_s = (time.perf_counter() - t0) / len(picks)
    row["trial_rate"] = {
        "rebuild_trials_per_s": round(1 / rebuild_s, 3), "screen_trials_per_s": round(1 / screen_s, 3),
        "speedup": round(rebuild_s / screen_s, 1), "screen_model_bytes": data_bytes,
        "max_cosine_gap_screen_vs_real": max(abs(a.cosine - b.cosine) for a, b in zip(after, before, strict=False)),
    }  # fmt: skip
    print(json.dumps(row, default=str), flush=True)
    # Workers: one batch of trials on 1 and on 2 processes (after the pool is up: start-up apart).
    if args.worker_trials:
        batch = [screen.feed({g: "int8"}) for g in groups[: args.worker_trials]]
        timing = {}
        results = {}
        for n in (1, 2):
            with trials.Runner(ir_bytes(screen.model), {"screen": feeds}, {"screen": reference}, budget,
                               trials.WorkerSpec("local", n)) as r:  # fmt: skip
                r.measure("screen", [screen.feed({})] * n)  # workers up and warm
                t0 = time.perf_counter()
                results[n] = r.measure("screen", batch)
                timing[n] = time.perf_counter() - t0
        row["workers"] = {"trials": len(batch), "seconds_1": round(timing[1], 2), "seconds_2": round(timing[2], 2),
                          "speedup_2_vs_1": round(timing[1] / timing[2], 2),
                          "identical": [m.loss for m in results[1]] == [m.loss for m in results[2]]}  # fmt: skip
        print(json.dumps(row["workers"]), flush=True)
    # Calibration: one session (onnxruntime's intra-op threads: all cores) against data shards on
    # 2 single-threaded worker processes (start-up included), and whether the tables are equal.
    if args.calib_shards:
        from onnxopt.quant import calibration

        feeds = [dict(f) for f in calib.take(args.calib_shards)]
        timing, tables = {}, {}
        for label, spec in (("one_session", None), ("2_workers", trials.parse_workers(2))):
            t0 = time.perf_counter()
            tables[label] = calibration.collect_methods(base, feeds, quiet=True, workers=spec)
            timing[label] = time.perf_counter() - t0
        gap = max(abs(a - b) / max(abs(a), 1e-30)
                  for m in calibration.METHODS for name, lohi in tables["one_session"][m].ranges.items()
                  for a, b in zip(lohi, tables["2_workers"][m].ranges[name], strict=True))  # fmt: skip
        row["calibration"] = {"feeds": len(feeds), "seconds_one_session": round(timing["one_session"], 2),
                              "seconds_2_workers": round(timing["2_workers"], 2),
                              "speedup": round(timing["one_session"] / timing["2_workers"], 2),
                              "max_relative_range_gap": gap}  # fmt: skip
        print(json.dumps(row["calibration"]), flush=True)
    # The recipe itself, as a user runs it.
    if args.run_mixed:
        out = tmp / f"{name}.mixed.onnx"
        t0 = time.perf_counter()
        result = onnxopt.optimize(model_path, out, recipe="mixed", calibration=calib, evaluation=evald,
                                  min_cosine=args.min_cosine or 0.995, target="cpu", quiet=True,
                                  time_budget=args.time_budget, workers=args.workers)  # fmt: skip
        rep = next(r for r in result.reports if r.pass_name == "mixed")
        summary = next((x for x in rep.records if x["item"] == "summary"), {})
        held = list(evald)[args.plan_feeds * 4 :] or list(evald)  # past the screening pool
        mixed_model = _io.load_model(out)
        m = sensitivity.measure(sensitivity.run_outputs(ref, held), sensitivity.run_outputs(mixed_model, held),
                                sensitivity.Budget(min_cosine=args.min_cosine or 0.995))  # fmt: skip
        _, ratio = latency.paired_ratio(ref, mixed_model, held[0], args.latency_runs)
        row["mixed"] = {"seconds": round(time.perf_counter() - t0, 1), "status": rep.status,
                        "summary": summary, "notes": rep.notes, "heldout_feeds": len(held),
                        "heldout_cosine": round(m.cosine, 6), "heldout_ok": m.ok,
                        "latency_ratio_vs_fp32": round(ratio, 3), "final_validation_passed": result.passed}  # fmt: skip
        print(json.dumps(row["mixed"], default=str), flush=True)
    return row


def ir_bytes(model) -> bytes:
    import onnx_ir as ir

    return ir.to_proto(model).SerializeToString()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits_cnn,digits_transformer")
    parser.add_argument("--min-cosine", type=float, default=None, help="budget (default: halfway from INT8 to 1)")
    parser.add_argument("--eval-feeds", type=int, default=32)
    parser.add_argument("--latency-runs", type=int, default=50)
    parser.add_argument("--max-greedy-steps", type=int, default=None)
    parser.add_argument("--no-greedy", action="store_true")
    parser.add_argument("--json", type=pathlib.Path, default=None)
    parser.add_argument("--scale", action="store_true", help="issue 17: trial rate, workers, mixed on PP-OCR")
    parser.add_argument("--scale-models", default="digits_transformer,det")
    parser.add_argument("--plan-feeds", type=int, default=4)
    parser.add_argument("--setup-calib-feeds", type=int, default=8)
    parser.add_argument("--rate-trials", type=int, default=8)
    parser.add_argument("--rebuild-trials", type=int, default=3)
    parser.add_argument("--worker-trials", type=int, default=16)
    parser.add_argument("--run-mixed", action="store_true")
    parser.add_argument("--switch", choices=["if", "where"], default="if",
                        help="switch graph for the trial-rate/worker parts: If on large activations (as mixed) or Where only")
    parser.add_argument("--calib-shards", type=int, default=0, help="time calibration on this many feeds: one session vs 2 shards")
    parser.add_argument("--time-budget", type=float, default=None)
    parser.add_argument("--workers", default=None)
    args = parser.parse_args(argv)
    rows = []
    if args.scale:
        srcs = _scale_sources()
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.scale_models.split(","):
                rows.append(run_scale(name, srcs[name], args, pathlib.Path(tmp)))
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1, default=str))
        return 0
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
