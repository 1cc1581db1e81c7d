"""Compression benchmark: clustering, pruning, deep compression and codebook errors.

Parts (``--part``; all by default), every number measured in this run:

``cluster``    digits CNN and MLP (BatchNorm folded by simplify first): 16 clusters per tensor,
               packed 4-bit, without and with repair. Weight bytes (initializers) as a fraction
               of FP32, file and zip sizes, top-1 on the held-out eval set, relative L2 output
               error against FP32 on the eval set.
``recipes``    the ``compress`` and ``deep-compression`` recipes on both models: file bytes,
               zip-compressed bytes (deflate level 9), ratio to the FP32 file, top-1 drop.
``structured`` 30% of channels removed on the digits CNN: FLOPs per sample, and onnxruntime
               latency (ORT_ENABLE_ALL, ``--threads``, batch ``--batch``) of the FP32 and pruned
               models measured in interleaved rounds in this process; top-1 without and with
               repair.
``ocr``        16 clusters packed on the PP-OCR cls and det models (weights lifted by simplify),
               without and with repair from the captured real feeds (onnxopt/testing/ocr_data.py
               capture): file/zip sizes, relative L2 error and cosine of the outputs on the
               held-out captured feeds.
``deep``       Deep Compression on a real CNN, step by step (PP-OCR cls by default): prune
               (global magnitude, repaired), cluster (16 per channel where that costs fewer bytes
               than int8, else per tensor; repaired), distill (augmented calibration feeds, hint
               layers; needs torch), pack; after every step the zip ratio to the FP32 file and the
               top-1 agreement with FP32 on held-out feeds (``--feeds DIR`` holds ``cls`` and
               ``eval_cls``). ``--sparsities 0.8,0.9`` gives one table per sparsity (the frontier).
``sweep``      pruning alone (no training) on the same model and feeds, layer / global scope,
               global with repair, at ``--sparsities``: agreement with FP32 on held-out feeds.
``codebooks``  4-bit codebooks on real weights -- linear (16 evenly spaced levels), k-means (16
               centroids) and logarithmic (sign + 3-bit exponent, 15 levels) -- per tensor and
               per output channel: relative weight error sqrt(sum |W - W'|^2 / sum |W|^2) over
               every Conv/Gemm/MatMul weight of >= 256 elements, on the bundled models and the
               PP-OCR det/cls models of rapidocr-onnxruntime (onnxopt/testing/ocr_data.py).

Usage::

    python benchmarks/bench_compress.py [--part all|cluster|recipes|structured|codebooks|ocr]
        [--rounds 200] [--threads 1] [--batch 64] [--ocr-stages cls,det] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import io as _bytes_io
import json
import pathlib
import statistics
import sys
import time
import zipfile

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from onnxopt import io, pipeline, recipes
from onnxopt.compress import codebook, flops, repair
from onnxopt.context import PassContext
from onnxopt.recipes import Step
from onnxopt.runtime import data, validation
from onnxopt.runtime import sessions as runtime

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"


def file_sizes(model: ir.Model) -> tuple[int, int]:
    """(serialized bytes, zip-compressed bytes at deflate level 9)."""
    raw = ir.to_proto(model).SerializeToString()
    buf = _bytes_io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zf.writestr("model.onnx", raw)
    return len(raw), len(buf.getvalue())


def weight_bytes(model: ir.Model) -> int:
    """Bytes of all initializers (packed 4-bit tensors count half a byte per element)."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def logits(model: ir.Model, inputs: np.ndarray) -> np.ndarray:
    with runtime.session(model) as handle:
        return next(iter(handle.run({"input": inputs}).values()))


def evaluate(model: ir.Model, ev: dict[str, np.ndarray], ref_out: np.ndarray) -> dict:
    out = logits(model, ev["input"])
    raw, zipped = file_sizes(model)
    return {
        "weight_bytes": weight_bytes(model),
        "file_bytes": raw,
        "zip_bytes": zipped,
        "top1": float((out.argmax(1) == ev["label"]).mean()),
        "rel_l2": float(np.linalg.norm(out - ref_out) / np.linalg.norm(ref_out)),
    }


def run_steps(name: str, steps: list[Step], calib: data.Dataset | None) -> ir.Model:
    context = PassContext(calibration=calib, quiet=True)
    result = pipeline.run(io.load_model(MODELS / f"{name}.onnx"), recipes.build(steps, context))
    for report in result.reports:
        if report.status == "rolled-back":
            raise RuntimeError(f"{name}: {report.pass_name} rolled back: {report.error}")
    return result.model


def _load(name: str) -> tuple[ir.Model, dict[str, np.ndarray], data.Dataset, dict]:
    base = io.load_model(MODELS / f"{name}.onnx")
    ev = dict(np.load(MODELS / f"{name}_eval.npz"))
    calib = data.load_data(MODELS / f"{name}_calib.npz", data.input_signature(base))
    ref_out = logits(base, ev["input"])
    return base, ev, calib, {"ref_out": ref_out, "fp32": evaluate(base, ev, ref_out)}


def part_cluster(names: list[str]) -> list[dict]:
    rows = []
    cluster = {"clusters": 16, "pack": True, "min_elements": 0}
    settings = {
        "16 clusters packed": [Step("simplify"), Step("cluster", cluster)],
        "16 clusters packed + repair": [Step("simplify"), Step("cluster", {**cluster, "repair": True})],
        "16 clusters/channel packed + repair": [
            Step("simplify"), Step("cluster", {**cluster, "repair": True, "per_channel": True})
        ],
    }
    for name in names:
        _, ev, calib, base = _load(name)
        rows.append({"model": name, "setting": "fp32", **base["fp32"]})
        for label, steps in settings.items():
            model = run_steps(name, steps, calib)
            rows.append({"model": name, "setting": label, **evaluate(model, ev, base["ref_out"])})
        for row in rows[-len(settings) - 1 :]:
            row["weight_ratio"] = row["weight_bytes"] / base["fp32"]["weight_bytes"]
    return rows


def part_recipes(names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        _, ev, calib, base = _load(name)
        fp32 = base["fp32"]
        for recipe in ("compress", "deep-compression"):
            model = run_steps(name, list(recipes.get_recipe(recipe).steps), calib)
            row = {"model": name, "recipe": recipe, **evaluate(model, ev, base["ref_out"])}
            row["fp32_file_bytes"] = fp32["file_bytes"]
            row["fp32_zip_bytes"] = fp32["zip_bytes"]
            row["ratio_vs_fp32_file"] = fp32["file_bytes"] / row["zip_bytes"]
            row["ratio_vs_fp32_zip"] = fp32["zip_bytes"] / row["zip_bytes"]
            row["top1_fp32"] = fp32["top1"]
            row["top1_drop_points"] = 100 * (fp32["top1"] - row["top1"])
            rows.append(row)
    return rows


def part_structured(rounds: int, threads: int, batch: int) -> dict:
    name = "digits_cnn"
    base, ev, calib, info = _load(name)
    prune = {"structured": True, "sparsity": 0.3, "min_elements": 0}
    plain = run_steps(name, [Step("prune", prune)], None)
    repaired = run_steps(name, [Step("prune", {**prune, "repair": True})], calib)
    feed = {"input": np.ascontiguousarray(np.resize(ev["input"], (batch, *ev["input"].shape[1:])))}
    sessions = {  # the deployment setting (NCHWc blocked layouts) and plain kernels
        f"{kind}_{level}": runtime.make_session(m, threads=threads, opt_level=level)
        for level in ("all", "basic")
        for kind, m in (("fp32", base), ("pruned", repaired))
    }
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for handle in sessions.values():
        for _ in range(20):
            handle.run(feed)
    for _ in range(rounds):  # interleaved, so load on the machine hits all alike
        for key, handle in sessions.items():
            t0 = time.perf_counter()
            handle.run(feed)
            times[key].append(time.perf_counter() - t0)
    for handle in sessions.values():
        handle.close()
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    best = {k: min(v) * 1e3 for k, v in times.items()}  # robust when the machine is oversubscribed
    f_before, f_after = flops.total_flops(base), flops.total_flops(repaired)

    def channels(model: ir.Model) -> list[int]:
        return [_out_channels(n) for n in model.graph if n.op_type in ("Conv", "Gemm")]

    return {
        "model": name,
        "removed": "30% of the output channels of every prunable layer, kept count rounded to a multiple of 8",
        "channels_before": channels(base),
        "channels_after": channels(repaired),
        "flops_before": f_before,
        "flops_after": f_after,
        "flops_ratio": f_after / f_before,
        "latency_ms_fp32": med["fp32_all"],
        "latency_ms_pruned": med["pruned_all"],
        "latency_ratio": med["pruned_all"] / med["fp32_all"],
        "latency_ratio_min": best["pruned_all"] / best["fp32_all"],
        "latency_ms_min_fp32": best["fp32_all"],
        "latency_ms_min_pruned": best["pruned_all"],
        "latency_ratio_basic_min": best["pruned_basic"] / best["fp32_basic"],
        "latency_ms_fp32_basic": med["fp32_basic"],
        "latency_ms_pruned_basic": med["pruned_basic"],
        "latency_ratio_basic": med["pruned_basic"] / med["fp32_basic"],
        "rounds": rounds,
        "threads": threads,
        "batch": batch,
        "top1_fp32": info["fp32"]["top1"],
        "top1_pruned_no_repair": evaluate(plain, ev, info["ref_out"])["top1"],
        "top1_pruned_repaired": evaluate(repaired, ev, info["ref_out"])["top1"],
        "params_before": int(sum(v.const_value.size for v in base.graph.initializers.values())),
        "params_after": int(sum(v.const_value.size for v in repaired.graph.initializers.values())),
    }


def _out_channels(node: ir.Node) -> int:
    shape = node.inputs[1].const_value.shape
    if node.op_type == "Gemm" and not node.attributes.get_int("transB", 0):
        return int(shape[1])
    return int(shape[0])


def _weights(model: ir.Model) -> list[tuple[np.ndarray, int | None]]:
    """(weight, output axis or None) of every Conv/Gemm/MatMul constant weight >= 256 elements."""
    out = []
    for node in model.graph.all_nodes():
        if node.op_type not in ("Conv", "Gemm", "MatMul") or node.domain not in ("", "ai.onnx"):
            continue
        layer = repair.as_layer(node)
        w = node.inputs[1].const_value if len(node.inputs) > 1 and node.inputs[1] is not None else None
        if w is None or w.size < 256 or not np.issubdtype(w.numpy().dtype, np.floating):
            continue
        out.append((w.numpy().astype(np.float64), layer.out_axis if isinstance(layer, repair.Layer) else None))
    return out


def part_codebooks() -> list[dict]:
    paths = {n: MODELS / f"{n}.onnx" for n in ("digits_mlp", "digits_cnn", "digits_transformer")}
    try:
        from onnxopt.testing import ocr_data  # optional: needs rapidocr-onnxruntime

        found = ocr_data.model_paths()
        paths.update({f"pp-ocr {k}": found[k] for k in ("det", "cls") if k in found})
    except ModuleNotFoundError as err:
        print(f"PP-OCR models left out: {err}", file=sys.stderr)
    rows = []
    for label, path in paths.items():
        model = io.load_model(path)
        # PP-OCR (Paddle export) keeps weights in Constant nodes: lift them to initializers first.
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        weights = _weights(model)
        for per_channel in (False, True):
            err = {"linear": 0.0, "kmeans": 0.0, "log": 0.0}
            norm = 0.0
            t0 = time.perf_counter()
            for w, axis in weights:
                ax = axis if per_channel else None
                if per_channel and axis is None:
                    ax = None
                books = {
                    "linear": codebook.fit_linear(w, 16, ax),
                    "kmeans": codebook.fit_kmeans(w, 16, ax, init="kmeans++", keep_zeros=False),
                    "log": codebook.fit_log(w, 4, ax),
                }
                for kind, book in books.items():
                    err[kind] += float(np.sum((w - book.weights(np.float64)) ** 2))
                norm += float(np.sum(w**2))
            rows.append({
                "model": label,
                "granularity": "per channel" if per_channel else "per tensor",
                "tensors": len(weights),
                "parameters": int(sum(w.size for w, _ in weights)),
                **{f"rel_error_{k}": float(np.sqrt(v / norm)) for k, v in err.items()},
                "seconds": time.perf_counter() - t0,
            })
    return rows


def part_ocr(stages: list[str]) -> list[dict]:
    """16 clusters packed on PP-OCR models, repair from the captured real feeds (one pass)."""
    from onnxopt.testing import ocr_data  # optional: needs rapidocr-onnxruntime

    feeds_dir = ROOT / "benchmarks" / "ocr" / ".cache" / "feeds"
    if not (feeds_dir / "det").is_dir():
        raise SystemExit(f"no captured feeds in {feeds_dir}: run python onnxopt/testing/ocr_data.py capture")
    cluster = {"clusters": 16, "pack": True}
    settings = {
        "16 clusters packed": cluster,
        "16 clusters packed + repair": {**cluster, "repair": True, "sequential": False},
        "16 clusters/channel packed + repair": {**cluster, "repair": True, "sequential": False, "per_channel": True},
    }
    rows = []
    for stage in stages:
        path = ocr_data.model_paths()[stage]
        base = io.load_model(path)
        signature = data.input_signature(base)
        calib = data.load_data(feeds_dir / stage, signature)
        held_out = data.load_data(feeds_dir / f"eval_{stage}", signature)
        raw, zipped = file_sizes(base)
        rows.append({"model": f"pp-ocr {stage}", "setting": "fp32", "file_bytes": raw, "zip_bytes": zipped})
        for label, options in settings.items():
            t0 = time.perf_counter()
            context = PassContext(calibration=calib, quiet=True)
            steps = [Step("simplify"), Step("cluster", options)]
            model = pipeline.run(io.load_model(path), recipes.build(steps, context)).model
            seconds = time.perf_counter() - t0
            cmp = validation.compare(base, model, held_out, rtol=1.0, atol=10.0)
            raw, zipped = file_sizes(model)
            rows.append({"model": f"pp-ocr {stage}", "setting": label, "file_bytes": raw, "zip_bytes": zipped,
                         "rel_l2": cmp.worst("rel_l2"), "cosine": cmp.worst("cosine"), "seconds": seconds})
            print(f"  {rows[-1]}", file=sys.stderr, flush=True)  # progress: this part takes minutes
    return rows


def _decisions(model: ir.Model, feeds: data.Dataset) -> np.ndarray:
    """First output of every held-out feed, concatenated: class scores [N, classes] or maps."""
    with runtime.session(model) as handle:
        return np.concatenate([next(iter(handle.run(feed).values())) for feed in feeds])


def part_deep(
    stage: str, feeds_dir: pathlib.Path, sparsities: list[float], distill_options: dict, layer_cap: float = 1.0
) -> list[dict]:
    """Prune, cluster, distill, pack on a PP-OCR model; agreement with FP32 after every step."""
    from onnxopt.testing import ocr_data  # optional: needs rapidocr-onnxruntime

    path = ocr_data.model_paths()[stage]
    base = io.load_model(path)
    signature = data.input_signature(base)
    calib = data.load_data(feeds_dir / stage, signature)
    held_out = data.load_data(feeds_dir / f"eval_{stage}", signature)
    ref = _decisions(base, held_out)
    raw0, zip0 = file_sizes(base)
    rows = []
    for sparsity in sparsities:
        steps = [
            ("teacher", Step("teacher")),
            ("simplify", Step("simplify")),
            (f"prune {sparsity:.0%} global + repair", Step("prune", {"sparsity": sparsity, "scope": "global", "skip_last": True, "repair": True, "sequential": False, "max_layer_sparsity": max(layer_cap, sparsity)})),
            ("cluster 16 (size-aware per channel) + repair", Step("cluster", {"clusters": 16, "per_channel": True, "repair": True, "min_elements": 0, "sequential": False})),
            ("distill", Step("distill", distill_options)),
            ("pack 4-bit", Step("cluster", {"clusters": 16, "per_channel": True, "pack": True, "min_elements": 0})),
        ]
        # Not quiet: distillation takes minutes and its progress bar goes to stderr.
        context = PassContext(calibration=calib, evaluation=held_out, quiet=False)
        passes = recipes.build([s for _, s in steps], context)
        model = io.load_model(path)
        rows.append({"model": f"pp-ocr {stage}", "sparsity": sparsity, "step": "fp32", "file_bytes": raw0,
                     "zip_bytes": zip0, "zip_ratio": 1.0, "agreement": 1.0, "samples": int(ref.shape[0])})
        for (label, _), p in zip(steps, passes, strict=True):
            t0 = time.perf_counter()
            print(f"  {label} ...", file=sys.stderr, flush=True)
            result = pipeline.run(model, [p])
            model = result.model
            rep = result.reports[0]
            if rep.status == "rolled-back":
                raise RuntimeError(f"{label}: rolled back: {rep.error}")
            if label in ("teacher", "simplify"):
                continue
            out = _decisions(model, held_out)
            raw, zipped = file_sizes(model)
            row = {"model": f"pp-ocr {stage}", "sparsity": sparsity, "step": label, "file_bytes": raw,
                   "zip_bytes": zipped, "zip_ratio": zip0 / zipped, "samples": int(ref.shape[0]),
                   "seconds": time.perf_counter() - t0}
            if ref.ndim == 2 and ref.shape[1] >= 2:
                row["agreement"] = float((out.argmax(1) == ref.argmax(1)).mean())
            else:
                row["cosine"] = float(np.dot(out.ravel(), ref.ravel()) / (np.linalg.norm(out) * np.linalg.norm(ref)))
            if label == "distill":
                training = next((r for r in rep.records if r.get("item") == "training"), {})
                row["calib_before"] = training.get("before")
                row["calib_after"] = training.get("after")
                row["epochs"] = training.get("epochs_run")
            if "cluster" in label:
                bytes_rows = [r for r in rep.records if "granularity" in r]
                row["per_tensor_layers"] = sum(r["granularity"] == "tensor" for r in bytes_rows)
                row["per_channel_layers"] = sum(r["granularity"] == "channel" for r in bytes_rows)
            rows.append(row)
            print(f"  {row}", file=sys.stderr, flush=True)  # progress: this part takes minutes
    return rows


def part_sweep(stage: str, feeds_dir: pathlib.Path, sparsities: list[float]) -> list[dict]:
    """Magnitude pruning alone (no training) on a PP-OCR model: agreement with FP32 vs sparsity."""
    from onnxopt.testing import ocr_data  # optional: needs rapidocr-onnxruntime

    path = ocr_data.model_paths()[stage]
    base = io.load_model(path)
    signature = data.input_signature(base)
    calib = data.load_data(feeds_dir / stage, signature)
    held_out = data.load_data(feeds_dir / f"eval_{stage}", signature)
    ref = _decisions(base, held_out).argmax(1)
    rows = []
    for sparsity in sparsities:
        for scope, repaired in (("layer", False), ("global", False), ("global", True)):
            context = PassContext(calibration=calib, quiet=True)
            options = {"sparsity": sparsity, "scope": scope, "skip_last": True, "repair": repaired, "sequential": False}
            steps = [Step("simplify"), Step("prune", options)]
            model = pipeline.run(io.load_model(path), recipes.build(steps, context), check=False).model
            agree = float((_decisions(model, held_out).argmax(1) == ref).mean())
            rows.append({"model": f"pp-ocr {stage}", "sparsity": sparsity, "scope": scope, "repair": repaired,
                         "agreement": agree, "samples": int(ref.shape[0])})
            print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def _table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="all", choices=["all", "cluster", "recipes", "structured", "codebooks", "ocr", "deep", "sweep"])
    parser.add_argument("--rounds", type=int, default=200, help="interleaved latency rounds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--ocr-stages", default="cls", help="PP-OCR models for --part ocr: cls, det or cls,det")
    parser.add_argument("--feeds", default=str(ROOT / "benchmarks" / "ocr" / ".cache" / "feeds"),
                        help="--part deep: folder with <stage>/ and eval_<stage>/ feeds")
    parser.add_argument("--deep-stage", default="cls", help="--part deep: PP-OCR model (cls, det)")
    parser.add_argument("--sparsities", default="0.8", help="--part deep: comma-separated pruning fractions")
    parser.add_argument("--max-layer-sparsity", type=float, default=1.0, help="--part deep: prune's per-tensor cap")
    parser.add_argument("--distill", default="", help="--part deep: distill options k=v,... (defaults otherwise)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    names = ["digits_cnn", "digits_mlp"]
    result: dict[str, object] = {}
    if args.part in ("all", "cluster"):
        rows = part_cluster(names)
        result["cluster"] = rows
        print("## 16 clusters, packed (weight bytes vs FP32; eval set)\n")
        print(_table(rows, ["model", "setting", "weight_bytes", "weight_ratio", "file_bytes", "zip_bytes", "top1", "rel_l2"]))
    if args.part in ("all", "recipes"):
        rows = part_recipes(names)
        result["recipes"] = rows
        print("\n## Recipes (zip = deflate level 9 of the .onnx file)\n")
        print(_table(rows, ["model", "recipe", "file_bytes", "zip_bytes", "fp32_file_bytes", "ratio_vs_fp32_file",
                            "ratio_vs_fp32_zip", "top1_fp32", "top1", "top1_drop_points"]))
    if args.part in ("all", "structured"):
        row = part_structured(args.rounds, args.threads, args.batch)
        result["structured"] = row
        print("\n## Structured pruning, 30% of channels (digits CNN)\n")
        print(f"output channels {row['channels_before']} -> {row['channels_after']}\n")
        print(_table([row], ["flops_before", "flops_after", "flops_ratio", "latency_ms_fp32", "latency_ms_pruned",
                             "latency_ratio", "latency_ratio_min", "latency_ratio_basic", "latency_ratio_basic_min", "top1_fp32", "top1_pruned_no_repair",
                             "top1_pruned_repaired"]))
        print(f"(latency: median (and _min: fastest) of {args.rounds} interleaved rounds, batch {args.batch}, {args.threads} thread(s), "
              f"ORT_ENABLE_ALL; _basic: ORT_ENABLE_BASIC, {row['latency_ms_fp32_basic']:.3g} -> "
              f"{row['latency_ms_pruned_basic']:.3g} ms)")
    if args.part in ("all", "codebooks"):
        rows = part_codebooks()
        result["codebooks"] = rows
        print("\n## 4-bit codebooks: relative weight error (lower is better)\n")
        print(_table(rows, ["model", "granularity", "tensors", "parameters", "rel_error_linear", "rel_error_kmeans",
                            "rel_error_log"]))
    if args.part in ("all", "ocr"):
        rows = part_ocr(args.ocr_stages.split(","))
        result["ocr"] = rows
        print("\n## PP-OCR: 16 clusters packed (held-out captured feeds; worst output)\n")
        print(_table(rows, ["model", "setting", "file_bytes", "zip_bytes", "rel_l2", "cosine", "seconds"]))
    if args.part == "deep":  # minutes of training: only when asked for
        from onnxopt import config

        options = config.parse_options(args.distill) if args.distill else {}
        rows = part_deep(args.deep_stage, pathlib.Path(args.feeds), [float(x) for x in args.sparsities.split(",")], options,
                         args.max_layer_sparsity)
        result["deep"] = rows
        print("\n## Deep Compression step by step (zip = deflate level 9; agreement: top-1 vs FP32 on held-out feeds)\n")
        print(_table(rows, ["model", "sparsity", "step", "file_bytes", "zip_bytes", "zip_ratio", "agreement",
                            "cosine", "samples", "per_channel_layers", "per_tensor_layers", "calib_before",
                            "calib_after", "epochs", "seconds"]))
    if args.part == "sweep":
        rows = part_sweep(args.deep_stage, pathlib.Path(args.feeds), [float(x) for x in args.sparsities.split(",")])
        result["sweep"] = rows
        print("\n## Pruning alone, no training (agreement: top-1 vs FP32 on held-out feeds)\n")
        print(_table(rows, ["model", "sparsity", "scope", "repair", "agreement", "samples"]))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
