"""Time of one distillation training step with and without the fast paths; memory of an evaluation batch.

The distill pass trains through :class:`onnxopt.distill.torch_graph.TorchGraph`. Its fast paths
(``onnxopt.distill.torch_ops.FAST_PATHS``: 2-D Conv in channels-last layout, Clip by scalar
bounds) are switched on and off in turn, in one process, on the same weights and batch; the
table gives the median step time of each and their ratio, and checks that both compute the same
loss and gradients: each one's largest relative error against the same step in float64 (plain
forms), so a difference between the two reads against float32's own rounding. Models: rapidocr's packaged PP-OCR direction
classifier and recogniser, simplified by onnxopt (their weights are Constant nodes until then);
inputs: rendered text-line crops (``ocr_data.render_cls_crops``), zero-padded on the right to the
recogniser's 320 columns as rapidocr pads.

Memory: the distill pass evaluates held-out samples in chunks of 512 without gradients (each
epoch) and runs the student over the check samples. The evaluator drops each intermediate value
after its last reader; the baseline asks for every intermediate value back (``extra=``), which
keeps them all alive as the evaluator did before. Each variant runs in a fresh subprocess and
reports how much its peak RSS (VmHWM, reset just before) grew during one no-grad forward of ``--eval-batch`` crops.

Needs the distill extra (torch)::

    python benchmarks/bench_distill_steps.py [--models cls rec] [--batch 32] [--steps 9] [--threads 2] [--eval-batch 512]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch

import onnxopt
from onnxopt.distill import torch_ops
from onnxopt.distill.torch_graph import TorchGraph
from onnxopt.testing import ocr_data

WIDTH = {"cls": 192, "rec": 320}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def step(graph: TorchGraph, x: torch.Tensor, weights: dict[str, torch.Tensor]) -> tuple[float, float, dict]:
    """(seconds, loss, gradients) of one forward + backward of a fixed quadratic loss."""
    for w in weights.values():
        w.grad = None
    start = time.perf_counter()
    out = graph({graph.input_names[0]: x}, weights)[0]
    loss = (out.float() ** 2).mean()
    loss.backward()
    seconds = time.perf_counter() - start
    return seconds, loss.item(), {k: w.grad.clone() for k, w in weights.items() if w.grad is not None}


def measure(name: str, batch: int, steps: int, workdir: Path) -> dict:
    src = ocr_data.model_paths()[name]
    simple = workdir / f"{name}.onnx"
    onnxopt.optimize(src, simple, recipe="simplify", quiet=True)
    graph = TorchGraph(ir.load(simple))
    xt = crops(name, batch)
    weights = {k: v.clone().requires_grad_(True) for k, v in graph.constants.items()
               if v.dtype == torch.float32 and v.numel() > 1}
    times: dict[bool, list[float]] = {True: [], False: []}
    results = {}
    for i in range(steps + 1):
        for fast in (False, True):  # interleaved, so drift in the machine's speed hits both
            torch_ops.FAST_PATHS = fast
            seconds, loss, grads = step(graph, xt, weights)
            if i:  # the first step of each warms up allocators and oneDNN's kernel choice
                times[fast].append(seconds)
            results[fast] = (loss, grads)
    # The float64 reference (plain forms): how far each float32 variant's gradients are from it.
    torch_ops.FAST_PATHS = False
    graph.constants = {k: v.double() if v.dtype == torch.float32 else v for k, v in graph.constants.items()}
    _, loss64, g64 = step(graph, xt.double(), {k: w.detach().double().requires_grad_(True) for k, w in weights.items()})
    torch_ops.FAST_PATHS = True

    def worst(grads: dict) -> float:
        return max(float((grads[k].double() - g64[k]).norm() / max(float(g64[k].norm()), 1e-300)) for k in g64)

    (loss0, g0), (loss1, g1) = results[False], results[True]
    plain, fast = statistics.median(times[False]), statistics.median(times[True])
    return {"model": name, "batch": batch, "plain_s": plain, "fast_s": fast, "ratio": fast / plain,
            "loss_rel": (abs(loss0 - loss64) / abs(loss64), abs(loss1 - loss64) / abs(loss64)),
            "grad_rel": (worst(g0), worst(g1))}


def crops(name: str, n: int) -> torch.Tensor:
    """``n`` rendered crops, zero-padded on the right to the model's input width."""
    rendered, _ = ocr_data.render_cls_crops(n, seed=5)
    x = np.zeros((n, 3, 48, WIDTH[name]), np.float32)
    x[..., : rendered.shape[-1]] = rendered
    return torch.from_numpy(x)


def forward_peak(path: str, name: str, n: int, keep_all: bool) -> int:
    """Peak-RSS growth (MiB) of one no-grad forward of ``n`` crops (run in its own process)."""
    graph = TorchGraph(ir.load(path))
    x = crops(name, n)
    extra = [o for _, _, outs, _ in graph._steps for o in outs if o] if keep_all else []
    base = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM (peak RSS) restarts from VmRSS
    with torch.no_grad():
        graph({graph.input_names[0]: x}, extra=extra)
    return (_status_kib("VmHWM") - base) // 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (the memory part needs Linux)")


def measure_memory(name: str, n: int, workdir: Path) -> dict:
    simple = workdir / f"{name}.onnx"
    if not simple.exists():
        onnxopt.optimize(ocr_data.model_paths()[name], simple, recipe="simplify", quiet=True)
    grown = {}
    for keep_all in (True, False):
        code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_distill_steps as b; "
                f"print(b.forward_peak({str(simple)!r}, {name!r}, {n}, {keep_all}))")
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if run.returncode == -9:  # SIGKILL: the kernel's out-of-memory killer, as a user would meet it
            grown[keep_all] = None
            continue
        if run.returncode:
            raise RuntimeError(f"memory probe failed: {run.stderr.strip().splitlines()[-1]}")
        grown[keep_all] = int(run.stdout.strip().splitlines()[-1])
    return {"model": name, "n": n, "all_mib": grown[True], "live_mib": grown[False]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["cls", "rec"], choices=sorted(WIDTH))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=9, help="timed steps per mode (after one warm-up step each)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-batch", type=int, default=512, help="crops in the no-grad forward whose memory is measured")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_name()}; torch {torch.__version__}, onnxruntime {ort.__version__}, {args.threads} threads")
    print("| model | batch | step, plain (s) | step, fast paths (s) | ratio | loss rel. error vs float64, plain / fast "
          "| largest grad rel. error vs float64, plain / fast |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            r = measure(name, args.batch, args.steps, Path(tmp))
            print(f"| {r['model']} | {r['batch']} | {r['plain_s']:.3f} | {r['fast_s']:.3f} | {r['ratio']:.2f} "
                  f"| {r['loss_rel'][0]:.1e} / {r['loss_rel'][1]:.1e} | {r['grad_rel'][0]:.1e} / {r['grad_rel'][1]:.1e} |")
        print()
        print("| model | crops, no-grad forward | peak RSS growth, every value kept (MiB) | only live values (MiB) | ratio |")
        print("|---|---|---|---|---|")
        for name in args.models:
            r = measure_memory(name, args.eval_batch, Path(tmp))
            ratio = f"{r['live_mib'] / r['all_mib']:.2f}" if r["all_mib"] and r["live_mib"] is not None else "-"
            print(f"| {r['model']} | {r['n']} | {r['all_mib'] if r['all_mib'] is not None else 'killed (out of memory)'} "
                  f"| {r['live_mib']} | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
