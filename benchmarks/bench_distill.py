"""Distillation on the bundled digits CNN: compression loss, layer-wise repair, distill.

Needs the distill extra and scikit-learn::

    pip install -e '.[test,distill]' scikit-learn
    python benchmarks/bench_distill.py [--sparsity 0.8] [--clusters 16] [--per-tensor] [--epochs 60] [--out out.json]

Data: the training split is sklearn's digits minus the 597 held-out samples of
models/digits_cnn_eval.npz (matched by pixels: 1200 samples, with labels, the same split the
model was trained on); repair and distill both use it. Every accuracy is measured on
models/digits_cnn_eval.npz in onnxruntime. The compression is simplify -> global magnitude
pruning (last layer kept) -> 16-cluster (4-bit) weight sharing, one codebook per output channel
(``--per-tensor``: one per tensor); variants:

    fp32            the teacher
    compressed      no repair
    repair          layer-wise least-squares repair (prune repair=true, cluster repair=true)
    distill         distill pass on "compressed"
    repair+distill  distill pass on "repair"

Also checked for each distilled model: zeros stay zero, distinct values per clustered tensor
<= clusters, shapes unchanged, untrained initializers bit-identical, and the written ONNX
against the trained torch evaluator (max-abs difference on the eval data).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnx_ir as ir
import torch
from sklearn.datasets import load_digits

from onnxopt import io as _io
from onnxopt import pass_base, pipeline
from onnxopt.context import PassContext
from onnxopt.distill.torch_graph import TorchGraph
from onnxopt.runtime import data
from onnxopt.runtime import sessions as runtime

MODEL = "models/digits_cnn.onnx"
EVAL = "models/digits_cnn_eval.npz"


def train_split() -> tuple[np.ndarray, np.ndarray]:
    ev = np.load(EVAL)["input"]
    digits = load_digits()
    x = (digits.images / 16).astype(np.float32)[:, None]
    held = {row.tobytes() for row in ev.reshape(len(ev), -1)}
    keep = np.array([row.reshape(-1).tobytes() not in held for row in x])
    assert len(x) - keep.sum() == len(ev), "eval samples not all found in sklearn digits"
    return x[keep], digits.target[keep]


def evaluate(model: ir.Model, teacher_logits: np.ndarray | None = None) -> dict[str, float]:
    ev = np.load(EVAL)
    with runtime.session(model) as h:
        logits = h.run({"input": ev["input"]})["logits"]
    out = {"accuracy": float((logits.argmax(1) == ev["label"]).mean() * 100)}
    if teacher_logits is not None:
        out["agreement"] = float((logits.argmax(1) == teacher_logits.argmax(1)).mean() * 100)
        p = torch.softmax(torch.from_numpy(teacher_logits), 1)
        out["kl"] = float(torch.nn.functional.kl_div(torch.log_softmax(torch.from_numpy(logits), 1), p, reduction="batchmean"))
    return out


def compress(ctx: PassContext, sparsity: float, clusters: int, repair: bool, per_channel: bool) -> ir.Model:
    steps = [
        ("simplify", {}),
        ("prune", {"sparsity": sparsity, "scope": "global", "skip_last": True, "repair": repair}),
        ("cluster", {"clusters": clusters, "min_elements": 0, "repair": repair, "per_channel": per_channel}),
    ]
    result = pipeline.run(_io.load_model(MODEL), [pass_base.make(n, o, ctx) for n, o in steps])
    bad = [r.pass_name for r in result.reports if r.status != "ok"]
    assert not bad, f"compression steps not applied: {bad}"
    return result.model


def constraints(
    student: ir.Model, distilled: ir.Model, clusters: int, trained: set[str], per_channel: bool
) -> dict[str, object]:
    zeros_kept, max_unique, same_shapes, untouched = True, 0, True, True
    for name, value in student.graph.initializers.items():
        a = value.const_value.numpy()
        b = distilled.graph.initializers[name].const_value.numpy()
        same_shapes &= a.shape == b.shape and a.dtype == b.dtype
        zeros_kept &= bool(np.all(b[a == 0] == 0))
        if name in trained and a.ndim >= 2:
            # Output channels are on axis 0 for every weight of this model (Conv, Gemm transB=1).
            groups = b.reshape(b.shape[0], -1) if per_channel else b.reshape(1, -1)
            max_unique = max(max_unique, max(len(np.unique(g)) for g in groups))
        if name not in trained:
            untouched &= a.tobytes() == b.tobytes()
    return {"zeros_kept": zeros_kept, "max_unique_clustered": max_unique, "clusters": clusters,
            "shapes_kept": same_shapes, "untrained_identical": untouched}


def distill(student: ir.Model, ctx: PassContext, options: dict) -> tuple[ir.Model, dict]:
    work = student.clone()
    t0 = time.perf_counter()
    result = pipeline.run(work, [pass_base.make("distill", options, ctx)])
    seconds = time.perf_counter() - t0
    report = result.reports[0]
    assert report.status == "ok", report.summary()
    trained = {r["item"] for r in report.records if "constraint" in r}
    training = next(r for r in report.records if r["item"] == "training")
    ev = np.load(EVAL)["input"]
    with torch.no_grad():
        torch_out = TorchGraph(result.model)({"input": torch.from_numpy(ev)})[0].numpy()
    with runtime.session(result.model) as h:
        ort_out = h.run({"input": ev})["logits"]
    info = {
        "seconds": round(seconds, 1), "epochs_run": training["epochs_run"], "best_epoch": training["best_epoch"],
        "onnx_vs_torch_max_abs_eval": float(np.abs(torch_out - ort_out).max()),
        "trained_tensors": len(trained), "trained": sorted(trained),
    }
    return result.model, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--clusters", type=int, default=16)
    ap.add_argument("--per-tensor", action="store_true", help="one codebook per tensor (default: per channel)")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--tau", type=float, default=4.0)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--patience", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    x, y = train_split()
    ctx = PassContext(calibration=data.Dataset.from_feeds([{"input": x}], "sklearn digits minus eval", labels=y), quiet=True)
    ctx.teacher = ir.to_proto(_io.load_model(MODEL)).SerializeToString()
    teacher = _io.load_model(MODEL)
    with runtime.session(teacher) as h:
        t_logits = h.run({"input": np.load(EVAL)["input"]})["logits"]
    options = {"epochs": args.epochs, "lr": args.lr, "tau": args.tau, "alpha": args.alpha,
               "patience": args.patience, "threads": args.threads, "val_fraction": 0.1}
    rows: dict[str, dict] = {"fp32": evaluate(teacher, t_logits)}
    plain = compress(ctx, args.sparsity, args.clusters, repair=False, per_channel=not args.per_tensor)
    repaired = compress(ctx, args.sparsity, args.clusters, repair=True, per_channel=not args.per_tensor)
    rows["compressed"] = evaluate(plain, t_logits)
    rows["repair"] = evaluate(repaired, t_logits)
    for name, student in (("distill", plain), ("repair+distill", repaired)):
        model, info = distill(student, ctx, options)
        rows[name] = {**evaluate(model, t_logits), **info, **constraints(student, model, args.clusters, set(info.pop("trained")), not args.per_tensor)}
    scope = "per channel" if not args.per_tensor else "per tensor"
    print(f"digits CNN, prune {args.sparsity:.0%} global + {args.clusters} clusters {scope}; distill {options}")
    print(f"{'variant':16s} {'top-1 %':>8s} {'vs fp32':>8s} {'agree %':>8s} {'KL':>8s}")
    for name, row in rows.items():
        print(f"{name:16s} {row['accuracy']:8.2f} {row['accuracy'] - rows['fp32']['accuracy']:+8.2f} "
              f"{row['agreement']:8.2f} {row['kl']:8.4f}")
    for name in ("distill", "repair+distill"):
        row = rows[name]
        print(f"{name}: {row['seconds']} s, epochs {row['epochs_run']} (best {row['best_epoch']}), "
              f"written ONNX vs torch max-abs {row['onnx_vs_torch_max_abs_eval']:.2e}, zeros kept {row['zeros_kept']}, "
              f"max distinct per clustered tensor {row['max_unique_clustered']} (k={args.clusters}), "
              f"shapes kept {row['shapes_kept']}, untrained identical {row['untrained_identical']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
