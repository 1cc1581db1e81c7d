"""A > 2 GB model (external data) through simplify, fp16 and int8, with peak RSS per run.

Usage::

    python benchmarks/large_model.py                 # 9 layers of 8192x8192 float32: 2.4 GB
    python benchmarks/large_model.py --layers 2 --width 2048 --passes simplify

Each ``onnxopt optimize`` runs as its own process; its peak resident memory comes from
``os.wait4``. The output is then checked: it loads, passes ``onnx.checker`` (by path, the way
that works beyond 2 GB), runs on onnxruntime CPU and matches the input model's outputs on a
seeded input (simplify: rtol 1e-4/atol 1e-5; fp16: rtol 1e-2/atol 1e-3 scaled; int8: cosine).
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

import numpy as np

from onnxopt.testing.conformance.large import run_with_peak_rss, write_large_mlp

INT8_NAMES = ("quantize", "int8", "qdq", "quant-int8")


def _run_model(path: pathlib.Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    out = sess.run(None, feed)[0]
    del sess
    return out


def _check(name: str, ref: np.ndarray, out: np.ndarray) -> str:
    if not np.isfinite(out).all():
        return "FAIL: non-finite outputs"
    a, b = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    err = float(np.max(np.abs(a - b)))
    if name == "simplify":
        ok = np.allclose(b, a, rtol=1e-4, atol=1e-5)
    elif "fp16" in name:
        ok = np.allclose(b, a, rtol=1e-2, atol=1e-3 * max(1.0, float(np.max(np.abs(a)))))
    else:
        ok = cos >= 0.99
    return f"{'ok' if ok else 'FAIL'}: max abs {err:.3g}, cosine {cos:.6f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=9)
    parser.add_argument("--passes", nargs="*", help="default: simplify, fp16 and the int8 pass if registered")
    parser.add_argument("--dir", type=pathlib.Path, help="work folder (default: a temp folder, removed)")
    args = parser.parse_args()

    from onnxopt import pass_base

    registered = pass_base.all_passes()
    passes = args.passes or ["simplify", "fp16", *[n for n in registered if n in INT8_NAMES][:1]]
    work = args.dir or pathlib.Path(tempfile.mkdtemp(prefix="onnxopt-large-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        src = work / "large.onnx"
        t0 = time.perf_counter()
        nbytes = write_large_mlp(src, width=args.width, layers=args.layers)
        print(f"model: {args.layers} x [{args.width},{args.width}] float32, {nbytes / 1e9:.2f} GB of external "
              f"data, written in {time.perf_counter() - t0:.0f} s")
        rng = np.random.default_rng(0)
        feed = {"x": rng.standard_normal((2, args.width), dtype=np.float32)}
        np.savez(work / "calib.npz", x=rng.standard_normal((8, args.width), dtype=np.float32))
        ref = _run_model(src, feed)
        rows = []
        for name in passes:
            if name not in registered:
                rows.append((name, "-", "-", "-", "not registered"))
                continue
            out = work / f"out_{name}.onnx"
            cmd = [sys.executable, "-m", "onnxopt.cli", "optimize", str(src), "-o", str(out), "-q", "--pass", name]
            if registered[name].needs_calibration:
                cmd += ["--calib", str(work / "calib.npz")]
            t1 = time.perf_counter()
            code, peak, err = run_with_peak_rss(cmd)
            seconds = time.perf_counter() - t1
            if code != 0:
                rows.append((name, f"{seconds:.0f}", f"{peak / 1e9:.2f}", "-", f"FAIL exit {code}: {err.strip()[-300:]}"))
                continue
            import onnx

            onnx.checker.check_model(str(out))  # by path: works above 2 GB
            size = out.stat().st_size + sum(p.stat().st_size for p in work.glob(f"out_{name}.onnx.data"))
            verdict = _check(name, ref, _run_model(out, feed))
            rows.append((name, f"{seconds:.0f}", f"{peak / 1e9:.2f}", f"{size / 1e9:.2f}", verdict))
            for p in work.glob(f"out_{name}.onnx*"):
                p.unlink()
        print("\n| pass | seconds | peak RSS (GB) | output (GB) | output check |\n|---|---|---|---|---|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
        print(f"\ninput model: {nbytes / 1e9:.2f} GB; peak RSS / model size is the memory cost of one run")
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
