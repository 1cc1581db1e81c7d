"""fuse on a real pretrained encoder: all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads) exports.

For each export: ``onnxopt optimize M.onnx -o OUT.onnx --recipe fuse`` run twice through the API
the CLI calls, without data (the pipeline checks the lossless pass on generated feeds) and with
``--eval`` (tokenized real sentences); the fused op counts, the pass check (its max abs error as
a multiple of the machine's float noise floor), and fidelity to the FP32 export on the sentences:
cosine and max abs of ``last_hidden_state``, and the lowest cosine between mean-pooled sentence
embeddings. onnxruntime's own transformer optimizer, told num_heads=12 and hidden_size=384
(``optimize_model(..., opt_level=0)``), is measured beside it.

Latency: onnxruntime CPU, batch 1, one sentence (its tokens as given) and 128 tokens, 1 and 2
intra-op threads, graph optimization level ``all`` (what a deployment gets; onnxruntime adds its
own C++ fusions at load time) and ``disable`` (the graph as written). All variants of one model
are timed in the same process, interleaved round-robin in a shuffled order; each number is the
median over rounds of per-round medians, and the ratio is to FP32 in the same run.

The exports come from ``benchmarks/export_minilm.py`` (torch + transformers in their own venv;
onnxopt needs neither). Either export first::

    /work/venv-hf/bin/python benchmarks/export_minilm.py /tmp/minilm.onnx --calib /tmp/sentences.npz
    /work/venv-hf/bin/python benchmarks/export_minilm.py /tmp/minilm_eager.onnx --attn-implementation eager
    python benchmarks/bench_minilm.py --minilm /tmp/minilm.onnx /tmp/minilm_eager.onnx --eval /tmp/sentences.npz

or let this script run the export with that interpreter (both attention implementations)::

    python benchmarks/bench_minilm.py --export-python /work/venv-hf/bin/python --workdir /tmp/minilm
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import tempfile

import numpy as np
import onnx
import onnx_ir as ir
from bench_fuse import latency  # the same interleaved timer as the synthetic BERT table

import onnxopt
from onnxopt import io as _io
from onnxopt.runtime import data, environment, validation
from onnxopt.runtime import sessions as runtime

ROOT = pathlib.Path(__file__).resolve().parents[1]
FUSED = ("Attention", "SkipLayerNormalization", "BiasGelu", "EmbedLayerNormalization", "LayerNormalization")


def export(python: str, workdir: pathlib.Path) -> tuple[list[pathlib.Path], pathlib.Path]:
    """Both attention implementations of the export, and the tokenized sentences."""
    workdir.mkdir(parents=True, exist_ok=True)
    sentences = workdir / "sentences.npz"
    paths = []
    for impl in ("sdpa", "eager"):
        path = workdir / f"minilm_{impl}.onnx"
        cmd = [python, str(ROOT / "benchmarks" / "export_minilm.py"), str(path), "--attn-implementation", impl]
        if impl == "sdpa":
            cmd += ["--calib", str(sentences)]
        subprocess.run(cmd, check=True, capture_output=True)
        paths.append(path)
    return paths, sentences


def ort_optimizer(src: pathlib.Path, out: pathlib.Path) -> dict[str, int]:
    """onnxruntime's transformer optimizer told the geometry (the peer reference); its fused counts."""
    from onnxruntime.transformers.optimizer import optimize_model

    opt = optimize_model(str(src), model_type="bert", num_heads=12, hidden_size=384, opt_level=0)
    onnx.save(opt.model, str(out), save_as_external_data=False)
    return {k: v for k, v in opt.get_fused_operator_statistics().items() if v}


def fidelity(ref: ir.Model, cand: ir.Model, feeds: list[dict]) -> dict[str, float]:
    with runtime.session(ref) as r, runtime.session(cand) as c:
        ro, co = runtime.run_all(r, feeds), runtime.run_all(c, feeds)
    name = r.output_names[0]
    m = validation.output_metrics([o[name] for o in ro], [o[name] for o in co])
    emb = []
    for feed, a, b in zip(feeds, ro, co, strict=True):  # mean pooling over attended tokens
        mask = feed["attention_mask"][..., None].astype(np.float64)
        ea, eb = (np.sum(x[name] * mask, axis=1) / mask.sum(axis=1) for x in (a, b))
        emb.extend(float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v))) for u, v in zip(ea, eb, strict=True))
    return {"cosine": m.cosine, "max_abs": m.max_abs, "min_embedding_cosine": min(emb)}


def long_feed(feed: dict, seq: int) -> dict:
    """A batch-1 feed of ``seq`` real tokens: the sentence's tokens repeated, every token attended."""
    ids = np.resize(feed["input_ids"][0], seq)[None, :]
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def bench(path: pathlib.Path, sentences: pathlib.Path, tmp: pathlib.Path, args: argparse.Namespace) -> dict:
    fp32 = _io.load_model(path)
    feeds = list(data.load_data(sentences, data.input_signature(fp32)))  # one feed per sentence
    result: dict = {"model": str(path), "runs": {}, "fidelity": {}, "latency_ms": {}}
    outputs = {}
    for label, evaluation in (("fuse (no data)", None), ("fuse (--eval)", sentences)):
        out = tmp / f"{path.stem}.{len(outputs)}.onnx"
        r = onnxopt.optimize(path, out, recipe="fuse", evaluation=evaluation, quiet=True)
        fuse = next(p for p in r.reports if p.pass_name == "fuse")
        result["runs"][label] = {
            "status": fuse.status, "counts": dict(fuse.counts), "notes": fuse.notes,
            "check_max_abs": fuse.fidelity.get("max_abs"), "check_feeds": fuse.fidelity.get("feeds"),
            "noise_multiple": fuse.fidelity.get("noise_multiple_max_abs"),
            "allowed_multiple": fuse.fidelity.get("noise_allowed_multiple"),
        }
        outputs[label] = out
    peer = tmp / f"{path.stem}.ort.onnx"
    result["runs"]["onnxruntime optimizer (12, 384)"] = {"counts": ort_optimizer(path, peer)}
    variants = {"fp32": fp32, "fused": _io.load_model(outputs["fuse (no data)"]), "ort-optimizer": _io.load_model(peer)}
    result["fidelity"] = {k: fidelity(fp32, m, feeds) for k, m in variants.items() if k != "fp32"}
    result["fidelity"]["fused (--eval run)"] = fidelity(fp32, _io.load_model(outputs["fuse (--eval)"]), feeds)
    sentence = {k: v[:1] for k, v in feeds[0].items()}
    for seq_label, feed in ((f"seq {sentence['input_ids'].shape[1]}", sentence), (f"seq {args.seq}", long_feed(sentence, args.seq))):
        for level in args.levels:
            for threads in (1, 2):
                key = f"{seq_label}, {threads} thread{'s' if threads > 1 else ''}, {level}"
                result["latency_ms"][key] = latency(variants, feed, level, args.rounds, args.runs, threads=threads)
    return result


def print_table(results: list[dict]) -> None:
    print(f"\nmachine: {environment.summary()}")
    for r in results:
        print(f"\n== {pathlib.Path(r['model']).name}")
        print(f"  {'run':<34} {'status':<7} {'fused ops':<64} check (max abs, x noise floor)")
        for label, run in r["runs"].items():
            counts = ", ".join(f"{op} {run['counts'][op]}" for op in FUSED if op in run["counts"])
            check = (f"{run['check_max_abs']:.2g} = {run['noise_multiple']:.2f}x of {run['allowed_multiple']:.0f}x "
                     f"allowed, {run['check_feeds']} feeds") if run.get("check_max_abs") is not None else "-"
            print(f"  {label:<34} {run.get('status', '-'):<7} {counts:<64} {check}")
        print(f"  {'vs FP32 on the sentences':<34} {'cosine':>12} {'max abs':>9} {'min emb. cosine':>16}")
        for label, f in r["fidelity"].items():
            print(f"  {label:<34} {f['cosine']:>12.9f} {f['max_abs']:>9.2g} {f['min_embedding_cosine']:>16.9f}")
        print(f"  {'latency (median ms, ratio to fp32)':<34} {'fp32':>8} {'fused':>16} {'ort-optimizer':>16}")
        for key, lat in r["latency_ms"].items():
            cells = [f"{lat['fp32']:>8.3f}"] + [f"{lat[k]:>8.3f} ({lat[k] / lat['fp32']:.3f})" for k in ("fused", "ort-optimizer")]
            print(f"  {key:<34} " + " ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minilm", nargs="+", type=pathlib.Path, help="MiniLM .onnx exports (export_minilm.py)")
    parser.add_argument("--eval", type=pathlib.Path, help="tokenized sentences (.npz from export_minilm.py --calib)")
    parser.add_argument("--export-python", help="export first, with this interpreter (torch + transformers)")
    parser.add_argument("--workdir", type=pathlib.Path, help="where --export-python writes (never the repository)")
    parser.add_argument("--seq", type=int, default=128, help="the long input's token count")
    parser.add_argument("--levels", nargs="+", default=["all", "disable"], choices=["all", "disable"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--runs", type=int, default=10, help="runs per variant per round")
    parser.add_argument("--json", type=pathlib.Path, help="write the results here")
    args = parser.parse_args()
    if args.export_python:
        if args.workdir is None:
            parser.error("--export-python needs --workdir")
        models, sentences = export(args.export_python, args.workdir)
    elif args.minilm and args.eval:
        models, sentences = args.minilm, args.eval
    else:
        parser.error("give --minilm PATH... --eval NPZ, or --export-python PY --workdir DIR")
    with tempfile.TemporaryDirectory(prefix="bench-minilm-") as tmp:
        results = [bench(path, sentences, pathlib.Path(tmp), args) for path in models]
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps({"machine": environment.summary(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
