"""FP16 conversion: onnxopt's ``fp16`` pass against onnxconverter-common, on real models.

For each model (bundled digits models; PP-OCR det and cls from rapidocr-onnxruntime, with the
feeds captured by ``onnxopt/testing/ocr_data.py capture``): convert with both tools, then on
held-out feeds report whether the model loads on onnxruntime CPU, output cosine to FP32,
non-finite values, size ratio, and which nodes onnxopt kept float32 and why.

    python benchmarks/bench_fp16.py [--models digits_mlp,det,...] [--max-feeds N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
from typing import Any

import onnx
import onnx_ir as ir

from onnxopt import io as _io
from onnxopt import pipeline
from onnxopt.context import PassContext
from onnxopt.pass_base import make
from onnxopt.quant import float16
from onnxopt.runtime import data as _data
from onnxopt.runtime import validation

ROOT = pathlib.Path(__file__).resolve().parents[1]
OCR_FEEDS = ROOT / "benchmarks" / "ocr" / ".cache" / "feeds"


def sources(max_feeds: int) -> dict[str, tuple[pathlib.Path, Any, Any]]:
    """name -> (model path, calibration source, evaluation source)."""
    out: dict[str, tuple[pathlib.Path, Any, Any]] = {}
    for name in ("digits_mlp", "digits_cnn", "digits_transformer"):
        path = ROOT / "models" / f"{name}.onnx"
        if path.exists():
            out[name] = (path, ROOT / "models" / f"{name}_calib.npz", ROOT / "models" / f"{name}_eval.npz")
    try:
        from onnxopt.testing import ocr_data

        paths = ocr_data.model_paths()
    except (ImportError, FileNotFoundError) as err:
        print(f"PP-OCR models unavailable: {err}")
        return out
    for stage in ("det", "cls"):
        if (OCR_FEEDS / stage).is_dir():
            out[stage] = (paths[stage], OCR_FEEDS / stage, OCR_FEEDS / f"eval_{stage}")
    return out


def converter_common(path: pathlib.Path) -> tuple[onnx.ModelProto | None, str]:
    """onnxconverter-common's converter with I/O kept float32 (its recommended use)."""
    from onnxconverter_common import float16 as occ

    try:
        return occ.convert_float_to_float16(onnx.load(str(path)), keep_io_types=True), ""
    except Exception as err:
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"


def evaluate(ref: ir.Model, cand: Any, feeds: list[dict]) -> dict[str, Any]:
    """Load + run on ORT CPU; worst cosine, non-finite count, size ratio."""
    try:
        rep = validation.compare(ref, cand, feeds)
    except Exception as err:
        return {"loads": False, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
    return {
        "loads": True,
        "cosine": rep.worst("cosine"),
        "nonfinite": int(rep.worst("nonfinite")),
        "size_ratio": rep.sizes["candidate_bytes"] / rep.sizes["reference_bytes"],
    }


def run_one(name: str, path: pathlib.Path, calib: Any, evald: Any, max_feeds: int) -> dict[str, Any]:
    ref = _io.load_model(path)
    # No signature check: PP-OCR cls declares its batch dim as -1, which data.check_feed rejects.
    cal = _data.load_data(calib).take(max_feeds)
    ev = list(_data.load_data(evald).take(max_feeds))
    ctx = PassContext(calibration=cal, quiet=True)
    work = _io.load_model(path)
    t0 = time.perf_counter()
    result = pipeline.run(work, [make("fp16", {}, ctx)], check=False)
    seconds = time.perf_counter() - t0
    report = result.reports[0]
    row: dict[str, Any] = {"model": name, "onnxopt_seconds": round(seconds, 2)}
    row["onnxopt"] = evaluate(ref, result.model, ev)
    row["onnxopt"]["kept_float32"] = [r for r in report.records if r.get("precision") == "float32"]
    row["onnxopt"]["cast_pairs"] = float16.cast_pairs(result.model)
    row["onnxopt"]["counts"] = dict(report.counts)
    occ_model, err = converter_common(path)
    if occ_model is None:
        row["onnxconverter_common"] = {"loads": False, "error": err}
    else:
        row["onnxconverter_common"] = evaluate(ref, ir.from_proto(occ_model), ev)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="", help="comma-separated subset")
    parser.add_argument("--max-feeds", type=int, default=8, help="calibration and evaluation feeds")
    parser.add_argument("--json", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    wanted = {m for m in args.models.split(",") if m}
    rows = []
    for name, (path, calib, evald) in sources(args.max_feeds).items():
        if wanted and name not in wanted:
            continue
        row = run_one(name, path, calib, evald, args.max_feeds)
        rows.append(row)
        o, c = row["onnxopt"], row["onnxconverter_common"]
        print(
            f"{name:20s} onnxopt: loads={o['loads']} cos={o.get('cosine', float('nan')):.6f} "
            f"nonfinite={o.get('nonfinite')} size={o.get('size_ratio', float('nan')):.3f}x "
            f"kept_fp32={len(o['kept_float32'])} cast_pairs={o['cast_pairs']} ({row['onnxopt_seconds']}s) | "
            f"onnxconverter-common: loads={c['loads']} cos={c.get('cosine', float('nan')):.6f} "
            f"nonfinite={c.get('nonfinite')} {c.get('error', '')}"
        )
        for r in o["kept_float32"]:
            print(f"    kept float32: {r['item']} ({r['op']}): {r['reason']}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
