"""Time of one distillation training step (forward + backward in torch) with and without the fast paths.

The distill pass trains through :class:`onnxopt.distill.torch_graph.TorchGraph`. Its fast paths
(``onnxopt.distill.torch_ops.FAST_PATHS``: 2-D Conv in channels-last layout, Clip by scalar
bounds) are switched on and off in turn, in one process, on the same weights and batch; the
table gives the median step time of each and their ratio, and checks that both compute the same
loss and gradients: each one's largest relative error against the same step in float64 (plain
forms), so a difference between the two reads against float32's own rounding. Models: rapidocr's packaged PP-OCR direction
classifier and recogniser, simplified by onnxopt (their weights are Constant nodes until then);
inputs: rendered text-line crops (``ocr_data.render_cls_crops``), zero-padded on the right to the
recogniser's 320 columns as rapidocr pads. Needs the distill extra (torch)::

    python benchmarks/bench_distill_steps.py [--models cls rec] [--batch 32] [--steps 9] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import statistics
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
    crops, _ = ocr_data.render_cls_crops(batch, seed=5)
    x = np.zeros((batch, 3, 48, WIDTH[name]), np.float32)
    x[..., : crops.shape[-1]] = crops
    xt = torch.from_numpy(x)
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["cls", "rec"], choices=sorted(WIDTH))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=9, help="timed steps per mode (after one warm-up step each)")
    ap.add_argument("--threads", type=int, default=2)
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
