"""Low-rank split benchmark: accuracy on the bundled models and latency of a large MatMul.

Part 1 (``--part accuracy``): on digits_mlp and digits_transformer, plain SVD vs activation-aware
SVD (and plain + least-squares re-fit) at the same ranks (so the same parameter reduction), plus
the ``global`` rank allocation; output error (relative L2 of the logits) and top-1 accuracy on the
held-out eval data, statistics from the calibration data only.

Part 2 (``--part latency``): one MatMul with a [K, N] = [1024, 4096] weight on [tokens, 1024]
activations, split at rank 25% of min(K, N). The FLOP arithmetic predicts the ratio
r * (K + N) / (K * N); the measured ratio comes from interleaved onnxruntime runs of both models in
the same process (so machine load affects both alike).

Part 3 (``--part ocr``, not in ``all``: minutes): the real PP-OCRv4 text detector from
rapidocr-onnxruntime (many 1x1 Convs), simplified, then split by the ``lowrank`` pass (plain vs
aware at rank 25%, and aware with the global 50% target) using the captured real feeds of
``onnxopt/testing/ocr_data.py capture``; output error on the held-out feeds, interleaved latency,
and the character error rate of the whole OCR pipeline on the held-out images.

Part 4 (``--part minilm``, not in ``all``: minutes): all-MiniLM-L6-v2 (a real pretrained sentence
encoder, ``benchmarks/export_minilm.py``) through the ``lowrank`` recipe at each ``--min-cosine``
budget and through ``lowrank-fixed`` (the old fixed 50 %), ranks chosen on ``calib.npz`` and the
budget checked on ``eval.npz`` (``benchmarks/minilm_sentences.py``: disjoint sentences); reported:
mean/min cosine of mean-pooled sentence embeddings on the held-out sentences, file size ratio, and
latency ratio to FP32 (1 thread, ORT_ENABLE_ALL, reference and candidate alternating in one
process, median of per-pair ratios) on one held-out sentence and on 128 tokens::

    /work/venv-hf/bin/python benchmarks/export_minilm.py /tmp/minilm/minilm.onnx
    /work/venv-hf/bin/python benchmarks/minilm_sentences.py /tmp/minilm
    python benchmarks/bench_lowrank.py --part minilm --minilm-dir /tmp/minilm --budgets 0.99 0.98

Usage::

    python benchmarks/bench_lowrank.py [--part all|accuracy|latency|ocr|minilm] [--tokens 64 256]
        [--rounds 60] [--threads 1] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import random
import statistics
import sys
import time

import numpy as np
import onnx_ir as ir
import tqdm
from onnx import TensorProto, helper, numpy_helper
from onnxopt.passes.lowrank import LowRankConfig, LowRankPass

from onnxopt import io
from onnxopt.context import PassContext
from onnxopt.runtime import data, validation
from onnxopt.runtime import sessions as runtime

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"


def accuracy(names: list[str]) -> list[dict]:
    """Plain vs aware vs refit vs global on the bundled models, measured on held-out data."""
    settings = {
        "plain r=25%": LowRankConfig(method="plain", rank_ratio=0.25),
        "plain+refit r=25%": LowRankConfig(method="plain", rank_ratio=0.25, refit=True),
        "aware r=25%": LowRankConfig(method="aware", rank_ratio=0.25),
        "plain r=50%": LowRankConfig(method="plain", rank_ratio=0.5),
        "aware r=50%": LowRankConfig(method="aware", rank_ratio=0.5),
        "aware global 50%": LowRankConfig(method="aware", rank_mode="global", target=0.5),
    }
    rows = []
    for name in names:
        path = MODELS / f"{name}.onnx"
        signature = data.input_signature(io.load_model(path))
        calib = data.load_data(MODELS / f"{name}_calib.npz", signature)
        held_out = data.load_data(MODELS / f"{name}_eval.npz", signature)
        for label, cfg in settings.items():
            model = io.load_model(path)
            report = LowRankPass(cfg, PassContext(calibration=calib, quiet=True))(model)
            before = sum(r["params_before"] for r in report.records)
            after = sum(r["params_after"] for r in report.records)
            result = validation.compare(path, model, held_out)
            metrics = next(iter(result.outputs["CPUExecutionProvider"].values()))
            rows.append(
                {
                    "model": name,
                    "setting": label,
                    "layers_split": report.counts["split"],
                    "param_reduction_split_layers": 1 - after / before if before else 0.0,
                    "ranks": [r["rank"] for r in report.records],
                    "rel_l2": metrics.rel_l2,
                    "cosine": metrics.cosine,
                    "top1_agreement": metrics.top1,
                    "accuracy_before": metrics.ref_accuracy,
                    "accuracy_after": metrics.cand_accuracy,
                }
            )
    return rows


def _matmul_model(w: np.ndarray) -> ir.Model:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="big")],
        "big_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["tokens", w.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["tokens", w.shape[1]])],
        [numpy_helper.from_array(w, "W")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return ir.from_proto(proto)


@dataclasses.dataclass
class Timing:
    """Interleaved latency of the unsplit and the split model at one token count."""

    tokens: int
    unsplit_ms: float
    split_ms: float
    ratio: float
    ratio_per_round_median: float
    predicted_flop_ratio: float
    flops_unsplit: float
    flops_split: float


def latency(token_counts: list[int], rounds: int, threads: int, k: int = 1024, n: int = 4096) -> dict:
    """Split a [k, n] MatMul at rank 25% and time both models, interleaved, per token count."""
    rng = np.random.default_rng(0)
    # A decaying spectrum, as trained weights have (the latency does not depend on it).
    w = (rng.standard_normal((k, k)) * np.logspace(0, -2, k)) @ rng.standard_normal((k, n)) / np.sqrt(k)
    w = w.astype(np.float32)
    reference = _matmul_model(w)
    split = _matmul_model(w)
    report = LowRankPass(LowRankConfig(method="plain", rank_ratio=0.25), PassContext(quiet=True))(split)
    rec = report.records[0]
    r = rec["rank"]
    out = {"K": k, "N": n, "rank": r, "weight_rel_error": rec["weight_rel_error"], "threads": threads}
    handles = {
        "unsplit": runtime.make_session(reference, threads=threads, opt_level="all"),
        "split": runtime.make_session(split, threads=threads, opt_level="all"),
    }
    timings = []
    for tokens in token_counts:
        feed = {"x": rng.standard_normal((tokens, k)).astype(np.float32)}
        err = validation.output_metrics([handles["unsplit"].run(feed)["y"]], [handles["split"].run(feed)["y"]])
        for h in handles.values():
            for _ in range(5):
                h.run(feed)
        times: dict[str, list[float]] = {"unsplit": [], "split": []}
        order = list(handles)
        for _ in tqdm.trange(rounds, desc=f"latency tokens={tokens}", leave=False):
            random.shuffle(order)
            for key in order:
                t0 = time.perf_counter()
                handles[key].run(feed)
                times[key].append((time.perf_counter() - t0) * 1e3)
        per_round = [s / u for s, u in zip(times["split"], times["unsplit"], strict=True)]
        flops_u = 2.0 * tokens * k * n
        flops_s = 2.0 * tokens * r * (k + n)
        t = Timing(
            tokens,
            statistics.median(times["unsplit"]),
            statistics.median(times["split"]),
            statistics.median(times["split"]) / statistics.median(times["unsplit"]),
            statistics.median(per_round),
            flops_s / flops_u,
            flops_u,
            flops_s,
        )
        timings.append({**dataclasses.asdict(t), "output_rel_l2": err.rel_l2})
    for h in handles.values():
        h.close()
    out["timings"] = timings
    return out


def _interleaved(handles: dict, feed: dict, rounds: int) -> dict[str, float]:
    """Median ms per model over ``rounds`` rounds, models in shuffled order each round."""
    for h in handles.values():
        h.run(feed)
    times: dict[str, list[float]] = {key: [] for key in handles}
    order = list(handles)
    for _ in tqdm.trange(rounds, desc="latency", leave=False):
        random.shuffle(order)
        for key in order:
            t0 = time.perf_counter()
            handles[key].run(feed)
            times[key].append((time.perf_counter() - t0) * 1e3)
    return {key: statistics.median(v) for key, v in times.items()}


def ocr(rounds: int, threads: int, max_feeds: int) -> list[dict]:
    """Low-rank split of the PP-OCR detector on real feeds; error, latency and CER."""
    import tempfile

    from onnxopt.passes.simplify import SimplifyPass

    from onnxopt.testing import ocr_data

    feeds_dir = ocr_data.CACHE_DIR / "feeds"
    if not (feeds_dir / "det").is_dir():
        ocr_data.capture_feeds(ocr_data.load_image_set(ocr_data.default_data_dir())[0], feeds_dir)
    eval_dir = ocr_data.CACHE_DIR / "eval_images"
    ocr_data.make_eval_images(eval_dir)
    images, gt = ocr_data.load_image_set(eval_dir)
    reference = io.load_model(ocr_data.model_paths()["det"])
    SimplifyPass()(reference)
    signature = data.input_signature(reference)
    calib = data.load_data(feeds_dir / "det", signature)
    held_out = data.load_data(feeds_dir / "eval_det", signature)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench-lowrank-"))
    ref_path = tmp / "det.onnx"
    io.save_model(reference, ref_path)
    context = PassContext(calibration=calib, quiet=True)
    settings = {
        "simplified (reference)": None,
        "plain r=25%": LowRankConfig(method="plain", max_feeds=max_feeds),
        "aware r=25%": LowRankConfig(method="aware", max_feeds=max_feeds),
        "aware global 50%": LowRankConfig(method="aware", rank_mode="global", target=0.5, max_feeds=max_feeds),
    }
    rows = []
    feed = next(iter(held_out))
    for label, cfg in settings.items():
        row: dict = {"setting": label}
        path = ref_path
        if cfg is not None:
            model = io.load_model(ref_path)
            report = LowRankPass(cfg, context)(model)
            path = tmp / f"det.{len(rows)}.onnx"
            io.save_model(model, path)
            before = sum(r["params_before"] for r in report.records)
            after = sum(r["params_after"] for r in report.records)
            result = validation.compare(ref_path, path, held_out)
            with runtime.session(ref_path, threads=threads, opt_level="all") as a, runtime.session(
                path, threads=threads, opt_level="all"
            ) as b:
                lat = _interleaved({"ref": a, "split": b}, feed, rounds)
            row |= {
                "layers_split": report.counts["split"],
                "param_reduction_split_layers": 1 - after / before if before else 0.0,
                "rel_l2": result.worst("rel_l2"),
                "cosine": result.worst("cosine"),
                "latency_ms_ref": lat["ref"],
                "latency_ms_split": lat["split"],
                "latency_ratio": lat["split"] / lat["ref"],
            }
        quality = ocr_data.ocr_quality(path, None, images, gt)
        row |= {"cer": quality["cer"], "cer_nospace": quality["cer_nospace"]}
        rows.append(row)
    return rows


def _pooled_cosines(held, ref, got) -> list[float]:
    """Cosine of FP32's and the candidate's mean-pooled sentence embeddings, per held-out feed."""
    cos = []
    for feed, r, c in zip(held, ref, got, strict=True):
        a = _pooled(next(iter(r.values())), feed["attention_mask"]).ravel()
        b = _pooled(next(iter(c.values())), feed["attention_mask"]).ravel()
        cos.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
    return cos


def _pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of the token vectors over the attention mask (sentence-transformers' pooling)."""
    m = mask[..., None].astype(np.float64)
    return (hidden.astype(np.float64) * m).sum(axis=-2) / np.maximum(m.sum(axis=-2), 1.0)


def minilm(workdir: pathlib.Path, budgets: list[float], rounds: int, threads: int,
           min_saving: float | None, calib: str = "calib.npz", options: str = "", fixed: bool = True,
           model_file: str = "minilm.onnx") -> list[dict]:
    """lowrank (budget) and lowrank-fixed on all-MiniLM-L6-v2; see the module docstring.

    ``options``: extra lowrank pass options (``damping=0.1,compensate=true``) on top of the
    recipe's; ``calib``: the calibration file in ``workdir`` (``calib_corpus.npz`` from
    ``corpus_calib.py``); ``fixed``: also run ``lowrank-fixed``.
    """
    import onnxopt
    from onnxopt.runtime import latency as lat

    src = workdir / model_file
    fp32 = io.load_model(src)
    sig = data.input_signature(fp32)
    held = [dict(f) for f in data.load_data(workdir / "eval.npz", sig)]
    with runtime.session(fp32) as handle:
        ref = runtime.run_all(handle, held)
    first = held[0]
    seq = first["input_ids"].shape[-1]
    long = {k: np.tile(v, (1, 128 // seq + 1))[:, :128] for k, v in first.items()}
    rows = []
    settings = [(f"lowrank --min-cosine {b}", "lowrank", b) for b in budgets]
    if fixed:
        settings.append(("lowrank-fixed (50%)", "lowrank-fixed", None))
    for label, recipe, budget in settings:
        out = workdir / f"{recipe}_{budget}.onnx"
        passes = ()
        extra = [f"min_saving={min_saving}"] if min_saving is not None else []
        extra += [o for o in options.split(",") if o]
        if extra and recipe == "lowrank":  # the recipe's lowrank step with these options on top
            recipe = "simplify"
            passes = ("lowrank:rank_mode=budget,op_types=[MatMul,Gemm,Conv,Gather]," + ",".join(extra),)
            label += " " + ",".join(extra)
        t0 = time.perf_counter()
        result = onnxopt.optimize(src, out, recipe=recipe, passes=passes, calibration=workdir / calib,
                                  evaluation=workdir / "eval.npz", min_cosine=budget, quiet=True)
        seconds = time.perf_counter() - t0
        cand = io.load_model(out)
        with runtime.session(cand) as handle:
            got = runtime.run_all(handle, held)
        cos = _pooled_cosines(held, ref, got)
        token_cos = validation.output_metrics([next(iter(r.values())) for r in ref],
                                              [next(iter(c.values())) for c in got]).cosine
        rep = next(r for r in result.reports if r.pass_name == "lowrank")
        row = {
            "setting": label, "seconds": seconds, "layers_split": rep.counts["split"],
            "emb_cos_mean": float(np.mean(cos)), "emb_cos_min": float(np.min(cos)), "token_cos": token_cos,
            "size_ratio": out.stat().st_size / src.stat().st_size,
            "ranks": {r["item"]: [r["K"], r["N"], r["rank"], r["output_rel_error"]] for r in rep.records},
            "notes": rep.notes,
        }
        for name, feed in (("sentence", first), ("128 tokens", long)):
            _ms, ratio = lat.paired_ratio(src, out, feed, rounds, threads=threads)
            row[f"latency_ratio_{name}"] = ratio
        rows.append(row)
        row["calib"] = calib
        row["word_embedding"] = next((v for k, v in row["ranks"].items() if "word_embeddings" in k), None)
        print(f"{label:<40} split {row['layers_split']:>2}  emb cos mean {row['emb_cos_mean']:.4f} "
              f"min {row['emb_cos_min']:.4f}  token cos {token_cos:.4f}  size {row['size_ratio']:.3f}x  "
              f"latency {row['latency_ratio_sentence']:.3f}x / {row['latency_ratio_128 tokens']:.3f}x  "
              f"({seconds:.0f} s)  word embedding split: {row['word_embedding']}", flush=True)
    return rows


def frontier(workdir: pathlib.Path, calib: str, specs: list[str], model_file: str = "minilm.onnx") -> list[dict]:
    """Cosine vs file size at fixed ``global`` targets (no budget), one context (statistics once).

    Each spec is lowrank options, e.g. ``target=0.08,damping=0.1`` or
    ``op_types=[MatMul,Gather],target=0.04,damping=0.1``; rank_mode is ``global``.
    """
    import onnxopt
    from onnxopt.config import from_dict
    from onnxopt.context import PassContext

    src = workdir / model_file
    simp = workdir / f"simplified_{model_file}"
    if not simp.exists():
        onnxopt.optimize(src, simp, recipe="simplify", quiet=True)
    base = io.load_model(simp)
    sig = data.input_signature(base)
    held = [dict(f) for f in data.load_data(workdir / "eval.npz", sig)]
    with runtime.session(base) as handle:
        ref = runtime.run_all(handle, held)
    context = PassContext(calibration=data.load_data(workdir / calib, sig), quiet=True)
    rows = []
    for spec in specs:
        options = {"rank_mode": "global"}
        for item in _split_options(spec):
            key, value = item.split("=", 1)
            options[key] = value
        cfg = from_dict(LowRankConfig, options)
        model = io.load_model(simp)
        report = LowRankPass(cfg, context)(model)
        out = workdir / "frontier.onnx"
        io.save_model(model, out)
        with runtime.session(io.load_model(out)) as handle:
            got = runtime.run_all(handle, held)
        cos = _pooled_cosines(held, ref, got)
        word = [r["rank"] for r in report.records if "word_embeddings" in r["item"]]
        row = {"spec": spec, "layers_split": report.counts.get("split", 0), "emb_cos_mean": float(np.mean(cos)),
               "emb_cos_min": float(np.min(cos)), "size_ratio": out.stat().st_size / src.stat().st_size,
               "word_embedding_rank": word[0] if word else None}
        rows.append(row)
        print(f"{spec:<55} split {row['layers_split']:>2}  emb cos {row['emb_cos_mean']:.4f} / "
              f"{row['emb_cos_min']:.4f}  size {row['size_ratio']:.3f}x  word embedding rank {row['word_embedding_rank']}",
              flush=True)
    return rows


def _split_options(spec: str) -> list[str]:
    """``a=1,op_types=[X,Y],b=2`` -> ``["a=1", "op_types=[X,Y]", "b=2"]`` (commas inside [] kept)."""
    items, depth, cur = [], 0, ""
    for ch in spec:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    return [*items, cur] if cur else items


def curves(workdir: pathlib.Path, calibs: list[str], dampings: list[float],
           model_file: str = "minilm.onnx") -> list[dict]:
    """Per layer: relative output error on the held-out sentences vs rank, plain vs aware SVD.

    Every MatMul of the simplified model with a constant weight; the error at rank r is
    ``||X_eval (W - U_r V_r)|| / ||X_eval W||`` with ``X_eval`` the layer's input on ``eval.npz``
    (computed exactly from its second moment), ``U_r V_r`` fitted on each calibration file.
    Ranks are fractions of the pay-off rank ``K*N/(K+N)``. The word-embedding table is reported
    as the plain SVD error weighted by how often each token occurs in the held-out sentences.
    """
    import onnxopt
    from onnxopt.compress import lowrank_graph as lg
    from onnxopt.compress import lowrank_math as lm

    simp = workdir / f"simplified_{model_file}"
    if not simp.exists():
        onnxopt.optimize(workdir / model_file, simp, recipe="simplify", quiet=True)
    model = io.load_model(simp)
    sig = data.input_signature(model)
    cands = []
    for node in model.graph:
        if node.op_type in ("MatMul", "Gather"):
            found = lg.find_candidate(node, min_elements=4096, spatial=False, pass_name="lowrank")
            if not isinstance(found, str):
                cands.append(found)
    names = sorted({c.activation.name for c in cands if c.activation is not None})

    def grams(path: pathlib.Path) -> tuple[dict, np.ndarray]:
        feeds = [dict(f) for f in data.load_data(path, sig)]
        out: dict = {}
        ids = []
        for cap in runtime.capture(model, feeds, [*names, "input_ids"]):
            for n in names:
                x = cap[n].reshape(-1, cap[n].shape[-1]).astype(np.float64)
                out[n] = out[n] + x.T @ x if n in out else x.T @ x
            ids.append(np.asarray(cap["input_ids"]).ravel())
        return out, np.concatenate(ids)

    held, held_ids = grams(workdir / "eval.npz")
    fits = {c: grams(workdir / c)[0] for c in calibs}
    fractions = (0.25, 0.5, 0.75, 0.9)
    rows = []
    for cand in cands:
        w = cand.matrix
        k, n = w.shape
        pay = k * n / (k + n)
        ranks = [max(1, int(f * pay)) for f in fractions]
        row = {"layer": cand.label, "K": k, "N": n, "ranks": ranks, "errors": {}}
        if cand.kind == "gather":
            if cand.node.inputs[1].name != "input_ids":
                continue
            p, sv, qt = np.linalg.svd(w, full_matrices=False)
            weight = np.bincount(held_ids, minlength=w.shape[0]).astype(np.float64)
            errs = []
            for r in ranks:
                e = w - (p[:, :r] * sv[:r]) @ qt[:r]
                errs.append(float(np.sqrt(np.sum(weight[:, None] * e * e) / np.sum(weight[:, None] * w * w))))
            row["errors"]["plain (held-out token weighted)"] = errs
            rows.append(row)
            continue
        g_eval = held[cand.activation.name]
        decs = {"plain": lm.decompose(w)}
        for calib in calibs:
            for d in dampings:
                decs[f"aware {calib} d={d:g}"] = lm.decompose(w, fits[calib][cand.activation.name], damping=d)
        for label, dec in decs.items():
            row["errors"][label] = [lm.output_rel_error(w, *dec.factors(r), g_eval) for r in ranks]
        rows.append(row)
    print(f"held-out relative output error at {', '.join(f'{f:.0%}' for f in fractions)} of the pay-off rank")
    for row in rows:
        print(f"{row['layer'][-45:]:<45} {row['K']}x{row['N']} ranks {row['ranks']}")
        for label, errs in row["errors"].items():
            print(f"    {label:<36} " + " ".join(f"{e:.3f}" for e in errs))
    kinds = {}
    for row in rows:
        kind = row["layer"].split("/")[-2] if "layer." in row["layer"] else row["layer"]
        for label, errs in row["errors"].items():
            kinds.setdefault((kind, label), []).append(errs)
    print("mean over the 6 layers of each kind:")
    for (kind, label), errs in kinds.items():
        print(f"    {kind[-30:]:<30} {label:<36} " + " ".join(f"{e:.3f}" for e in np.mean(errs, axis=0)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "accuracy", "latency", "ocr", "minilm", "curves", "frontier"],
                        default="all")
    parser.add_argument("--specs", nargs="+", default=["target=0.04,damping=0.1", "target=0.08,damping=0.1"],
                        help="frontier: lowrank options per point (rank_mode=global)")
    parser.add_argument("--calib", nargs="+", default=["calib.npz"],
                        help="minilm/curves: calibration file(s) in --minilm-dir (minilm: the first)")
    parser.add_argument("--options", default="", help="minilm: extra lowrank options, e.g. damping=0.1")
    parser.add_argument("--no-fixed", action="store_true", help="minilm: skip the lowrank-fixed row")
    parser.add_argument("--model-file", default="minilm.onnx", help="minilm/curves: the .onnx in --minilm-dir")
    parser.add_argument("--dampings", nargs="+", type=float, default=[1e-4, 0.1], help="curves: aware damping values")
    parser.add_argument("--minilm-dir", type=pathlib.Path, default=pathlib.Path("/tmp/minilm"))
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.99, 0.98])
    parser.add_argument("--min-saving", type=float, help="minilm: lowrank min_saving (default: the pass's)")
    parser.add_argument("--ocr-feeds", type=int, default=8, help="ocr: calibration feeds for X^T X")
    parser.add_argument("--models", nargs="+", default=["digits_mlp", "digits_transformer"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[64, 256])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args(argv)
    results: dict = {}
    if args.part in ("all", "accuracy"):
        results["accuracy"] = accuracy(args.models)
        print("model               setting             split  params-   rel_l2  cosine    top1   acc before->after")
        for row in results["accuracy"]:
            print(
                f"{row['model']:<19} {row['setting']:<19} {row['layers_split']:>5}  "
                f"{row['param_reduction_split_layers']:6.1%}  {row['rel_l2']:7.4f}  {row['cosine']:.5f}  "
                f"{row['top1_agreement']:.4f}  {row['accuracy_before']:.4f}->{row['accuracy_after']:.4f}"
            )
    if args.part in ("all", "latency"):
        lat = latency(args.tokens, args.rounds, args.threads)
        results["latency"] = lat
        print(
            f"\nMatMul [tokens, {lat['K']}] x [{lat['K']}, {lat['N']}] split at rank {lat['rank']} "
            f"(weight rel error {lat['weight_rel_error']:.3f}), onnxruntime CPU, {lat['threads']} thread(s), "
            "ORT_ENABLE_ALL, interleaved runs"
        )
        for t in lat["timings"]:
            print(
                f"tokens={t['tokens']:<5} FLOPs {t['flops_unsplit'] / 1e9:.3f} G -> {t['flops_split'] / 1e9:.3f} G "
                f"(predicted ratio {t['predicted_flop_ratio']:.4f}); median ms unsplit {t['unsplit_ms']:.3f}, "
                f"split {t['split_ms']:.3f}: measured ratio {t['ratio']:.3f} "
                f"(per-round median {t['ratio_per_round_median']:.3f}); output rel_l2 {t['output_rel_l2']:.3f}"
            )
    if args.part == "ocr":
        results["ocr"] = ocr(args.rounds, args.threads, args.ocr_feeds)
        print("PP-OCRv4 det            split  params-   rel_l2  cosine   ms ref   ms split  ratio    CER")
        for row in results["ocr"]:
            if "rel_l2" not in row:
                print(f"{row['setting']:<23} {'':>47}  {'':>15}  {row['cer']:.4f}")
                continue
            print(
                f"{row['setting']:<23} {row['layers_split']:>5}  {row['param_reduction_split_layers']:6.1%}  "
                f"{row['rel_l2']:7.4f}  {row['cosine']:.5f}  {row['latency_ms_ref']:7.2f}  "
                f"{row['latency_ms_split']:8.2f}  {row['latency_ratio']:.3f}  {row['cer']:.4f}"
            )
    if args.part == "minilm":
        results["minilm"] = minilm(args.minilm_dir, args.budgets, args.rounds, args.threads, args.min_saving,
                                   args.calib[0], args.options, not args.no_fixed, args.model_file)
    if args.part == "frontier":
        results["frontier"] = frontier(args.minilm_dir, args.calib[0], args.specs, args.model_file)
    if args.part == "curves":
        results["curves"] = curves(args.minilm_dir, args.calib, args.dampings, args.model_file)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
