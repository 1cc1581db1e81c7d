"""SmoothQuant on/off: static INT8 fidelity where activations have outlier channels.

Trained transformers' LayerNorm outputs carry a few channels far larger than the rest, which
their weights read lightly. This script makes that happen exactly: in the bundled
models/digits_transformer.onnx (pre-LN: each LayerNorm feeds only MatMuls) two channels of every
LayerNorm's gamma and beta are multiplied by ``k`` and the matching weight rows divided by ``k``,
so the FP32 function (and accuracy) is unchanged, and only the activations INT8 must represent
change. models/digits_cnn.onnx gets the same between BatchNorm -> Relu and the Conv after it
(cross-layer equalisation's case). The BERT-style encoder of onnxopt/testing/bert_builder.py (post-LN, LayerNorm written out in
primitives, -1e4 attention mask) is built with the same kind of outliers.

Per model and ``k``: onnxruntime's ``quantize_static`` (QDQ, per-channel, MinMax, after
quant_pre_process where it succeeds) and onnxopt's quantize with SmoothQuant off (``smooth_quant=0``) and on
(default: alpha 0.5 on outlier groups), all on the same calibration feeds; fidelity to FP32 on
held-out feeds as deployed (onnxruntime's optimisations on): cosine, relative L2, and top-1
accuracy against labels (digits) or agreement with FP32's top-1 (BERT); latency of smoothing on
vs off (1 thread, interleaved runs, ratio).

    python benchmarks/bench_smooth.py [--ks 1,10,30,100] [--runs 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys
import tempfile

import numpy as np
import onnx_ir as ir

ROOT = pathlib.Path(__file__).resolve().parents[1]

from onnxopt import io as _io
from onnxopt import pipeline
from onnxopt.context import PassContext
from onnxopt.pass_base import make
from onnxopt.runtime import data, latency, validation
from onnxopt.runtime import sessions as runtime
from onnxopt.testing.bert_builder import bert_feeds, make_bert

OUTLIER_CHANNELS = (5, 41)


def with_outliers(model: ir.Model, k: float) -> ir.Model:
    """Scale channels OUTLIER_CHANNELS of every LayerNorm feeding only MatMuls by k, their weight rows by 1/k."""
    model = model.clone()
    for node in model.graph:
        users = [u.node for u in node.outputs[0].uses()] if node.outputs else []
        if node.op_type != "LayerNormalization" or not users or any(u.op_type != "MatMul" for u in users):
            continue
        for value, factor in [(node.inputs[1], k), (node.inputs[2], k), *((u.inputs[1], 1 / k) for u in users)]:
            a = value.const_value.numpy().copy()
            a[list(OUTLIER_CHANNELS)] *= factor
            value.const_value = ir.Tensor(a.astype(np.float32), name=value.name)
    return model


def cnn_with_outliers(model: ir.Model, k: float) -> ir.Model:
    """The CNN counterpart: BatchNorm -> Relu -> Conv; channels OUTLIER_CHANNELS (mod C) of the
    BatchNorm output times k (gamma and beta), the Conv's weights reading them divided by k."""
    model = model.clone()
    for node in model.graph:
        if node.op_type != "BatchNormalization":
            continue
        relu = [u.node for u in node.outputs[0].uses()]
        if len(relu) != 1 or relu[0].op_type != "Relu":
            continue
        convs = [u.node for u in relu[0].outputs[0].uses()]
        if not convs or any(c.op_type != "Conv" for c in convs):
            continue
        channels = node.inputs[1].const_value.shape[0]
        picked = sorted({c % channels for c in OUTLIER_CHANNELS})
        for value, factor, axis in [(node.inputs[1], k, 0), (node.inputs[2], k, 0), *((c.inputs[1], 1 / k, 1) for c in convs)]:
            a = np.moveaxis(value.const_value.numpy().copy(), axis, 0)
            a[picked] *= factor
            value.const_value = ir.Tensor(np.moveaxis(a, 0, axis).astype(np.float32), name=value.name)
    return model


def run(model: ir.Model | pathlib.Path, feeds: list[dict]) -> np.ndarray:
    with runtime.session(model, opt_level="all") as s:
        return np.concatenate([next(iter(s.run(f).values())) for f in feeds])


def ort_int8(model: ir.Model, calib: list[dict], work: pathlib.Path) -> pathlib.Path:
    from onnxruntime import quantization as q
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, pre, out = work / "fp32.onnx", work / "pre.onnx", work / "ort.onnx"
    _io.save_model(model, src)
    feeds = iter(calib)

    class Reader(q.CalibrationDataReader):
        def get_next(self):
            return next(feeds, None)

    cwd = os.getcwd()
    os.chdir(work)  # both drop temp files (failed shape inference, calibration data) into the cwd
    try:
        try:
            quant_pre_process(str(src), str(pre))
        except Exception as err:  # as bench_int8: its users then quantize the model as it is
            print(f"quant_pre_process failed ({type(err).__name__}: {err}); quantizing without it", file=sys.stderr)
            pre = src
        q.quantize_static(str(pre), str(out), Reader(), quant_format=q.QuantFormat.QDQ, per_channel=True,
                          activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8)
    finally:
        os.chdir(cwd)
    return out


def ours(model: ir.Model, calib: list[dict], alpha: float) -> tuple[ir.Model, int]:
    ctx = PassContext(calibration=data.load_data(calib), quiet=True)
    options = {"smooth_quant": alpha, "latency_runs": 0, "sqnr_samples": 0, "calibration_method": "minmax"}
    result = pipeline.run(model.clone(), [make("simplify", {}, ctx), make("quantize", options, ctx)], strict=True)
    return result.model, result.reports[-1].counts.get("smoothed_activations", 0)


def latency_ratio(a: ir.Model, b: ir.Model, feed: dict, runs: int) -> float:
    """Median latency of b over a, 1 thread, runs interleaved (the one timer, runtime.latency)."""
    ms_a, ms_b = latency.medians([a, b], feed, runs=runs, warmup=10, budget_s=600.0)
    return ms_b / ms_a


def bench(name: str, fp32: ir.Model, calib: list[dict], evals: list[dict], labels: np.ndarray | None,
          runs: int, work: pathlib.Path) -> dict:
    ref = run(fp32, evals)
    row: dict = {"model": name}
    outs = {"ort": run(ort_int8(fp32, calib, work), evals)}
    smooth_off, _ = ours(fp32, calib, 0.0)
    smooth_on, row["smoothed"] = ours(fp32, calib, 0.5)
    outs["onnxopt off"], outs["onnxopt on"] = run(smooth_off, evals), run(smooth_on, evals)
    truth = labels if labels is not None else ref.argmax(1)
    row["fp32_top1"] = float((ref.argmax(1) == truth).mean())
    for tool, got in outs.items():
        m = validation.output_metrics([ref], [got])
        row[tool] = {"cosine": m.cosine, "rel_l2": m.rel_l2, "top1": float((got.argmax(1) == truth).mean())}
    row["latency_on_over_off"] = latency_ratio(smooth_off, smooth_on, evals[0], runs)
    return row


def table(rows: list[dict]) -> str:
    head = f"{'model':<28}{'tool':<13}{'cosine':>9}{'rel L2':>9}{'top-1':>8}{'fp32 top-1':>11}"
    lines = [head, "-" * len(head)]
    for r in rows:
        for tool in ("ort", "onnxopt off", "onnxopt on"):
            m = r[tool]
            lines.append(f"{r['model']:<28}{tool:<13}{m['cosine']:>9.5f}{m['rel_l2']:>9.4f}{m['top1']:>8.4f}"
                         f"{r['fp32_top1']:>11.4f}")
        lines.append(f"{'':<28}smoothed activations: {r['smoothed']}; latency on/off: {r['latency_on_over_off']:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", default="1,10,30,100", help="outlier factors")
    ap.add_argument("--runs", type=int, default=200, help="timed runs per variant for the latency ratio")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)  # quantize_static warns once per LayerNorm weight
    ks = [float(k) for k in args.ks.split(",")]
    digits = _io.load_model(ROOT / "models" / "digits_transformer.onnx")
    sig = data.input_signature(digits)
    calib = list(data.load_data(ROOT / "models" / "digits_transformer_calib.npz", sig).take(128))
    evald = np.load(ROOT / "models" / "digits_transformer_eval.npz")
    evals = [{"input": evald["input"][i : i + 64]} for i in range(0, len(evald["input"]), 64)]
    cnn = _io.load_model(ROOT / "models" / "digits_cnn.onnx")
    cnn_calib = list(data.load_data(ROOT / "models" / "digits_cnn_calib.npz", data.input_signature(cnn)).take(128))
    cnn_eval = np.load(ROOT / "models" / "digits_cnn_eval.npz")
    cnn_evals = [{"input": cnn_eval["input"][i : i + 64]} for i in range(0, len(cnn_eval["input"]), 64)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-smooth-") as tmp:
        for k in ks:
            print(f"... digits_transformer k={k:g}", file=sys.stderr, flush=True)
            rows.append(bench(f"digits_transformer k={k:g}", with_outliers(digits, k), calib, evals,
                              evald["label"], args.runs, pathlib.Path(tmp)))
        for k in ks:
            print(f"... digits_cnn k={k:g}", file=sys.stderr, flush=True)
            rows.append(bench(f"digits_cnn k={k:g}", cnn_with_outliers(cnn, k), cnn_calib, cnn_evals,
                              cnn_eval["label"], args.runs, pathlib.Path(tmp)))
        for k in ks:
            print(f"... bert k={k:g}", file=sys.stderr, flush=True)
            bert = ir.from_proto(make_bert(hidden=128, outlier_scale=k))
            rows.append(bench(f"bert (post-LN) k={k:g}", bert, bert_feeds(32, seq=32), bert_feeds(16, seq=32, seed=1),
                              None, args.runs, pathlib.Path(tmp)))
    print(table(rows))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
