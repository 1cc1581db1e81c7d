"""Words and numbers for people: report keys, values and change counts as readable text.

The HTML report (:mod:`onnxopt.report.html_page`) renders the same payload as the JSON report;
these helpers decide how each field reads there. They never drop information: a value they
have no special rule for still comes out as text (a nested dict as ``key: value`` pairs), never
as a Python repr.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["change", "label", "nbytes", "number", "ratio", "sort_value", "value"]

# Column and field names that read better than their key with underscores turned into spaces.
_LABELS = {
    "item": "item",
    "max_abs": "max abs",
    "mean_abs": "mean abs",
    "rms_abs": "rms",
    "rel_l2": "rel. L2",
    "max_rel": "max rel.",
    "mismatch_frac": "outside rtol/atol",
    "nonfinite": "non-finite",
    "top1": "top-1 agreement",
    "ref_accuracy": "accuracy, input",
    "cand_accuracy": "accuracy, output",
    "ref_rms": "rms of input outputs",
    "sqnr_db": "SQNR (dB)",
    "accumulated_sqnr_db": "accumulated SQNR (dB)",
    "fp32_ms": "FP32 (ms)",
    "int8_ms": "INT8 (ms)",
    "latency_ms": "latency (ms)",
    "num_heads": "heads",
    "non_int8": "nodes not INT8",
    "fp16_sensitivity": "FP16 sensitivity",
    "int8_dot": "int8 kernels",
    "k": "k",
    "K": "K",
    "N": "N",
    "op": "op",
    "ok": "meets budget",
}

# Words inside keys and count names that have a conventional spelling.
_WORDS = {
    "batchnorm": "BatchNorm",
    "int8": "INT8",
    "int32": "INT32",
    "int4": "INT4",
    "uint8": "UINT8",
    "fp16": "FP16",
    "fp32": "FP32",
    "bf16": "BF16",
    "gemm": "Gemm",
    "matmul": "MatMul",
    "conv": "Conv",
    "qdq": "QDQ",
    "sqnr": "SQNR",
    "flops": "FLOPs",
    "cpu": "CPU",
    "ms": "ms",
    "db": "dB",
    "l2": "L2",
    "svd": "SVD",
    "relu": "Relu",
    "lr": "low-rank",
}

# Count names whose generic reading ("3 int32 biases") would mislead or read badly.
_CHANGES = {
    "batchnorm_folded": "BatchNorm folded",
    "int8_weights": "weights to INT8",
    "int32_biases": "biases to INT32",
    "relu_clip_absorbed": "Relu/Clip absorbed into quantization",
    "activations_quantized": "activations quantized",
    "initializers_fp16": "initializers to FP16",
    "nodes_lowered": "nodes lowered",
    "int8_nodes": "nodes INT8",
    "fp16_nodes": "nodes FP16",
    "fp32_nodes": "nodes FP32",
    "functions_inlined": "functions inlined",
    "types_or_shapes_filled": "types or shapes filled",
    "aware_fallback_to_plain": "activation-aware splits fell back to plain SVD",
    "opset_upgraded": "opset upgraded",
}

_SUFFIXES = (("_ms", " (ms)"), ("_db", " (dB)"), ("_bytes", " (bytes)"))

# A list longer than this is shortened in a cell; the JSON report keeps all of it.
MAX_LIST = 24


def _word(w: str) -> str:
    return _WORDS.get(w, w)


def label(key: str) -> str:
    """Name a column or field: "sqnr_db" -> "SQNR (dB)", "bytes_after" -> "bytes after"."""
    if key in _LABELS:
        return _LABELS[key]
    suffix = ""
    for end, text in _SUFFIXES:
        if key.endswith(end) and len(key) > len(end):
            key, suffix = key[: -len(end)], text
            break
    return " ".join(_word(w) for w in key.split("_") if w) + suffix


def change(key: str, n: int | float) -> str:
    """One counted change as a phrase: ("batchnorm_folded", 3) -> "3 BatchNorm folded".

    Count names of the form ``<verb>ed_<thing>`` read as "<n> <thing> <verb>ed"
    ("zeroed_weights" -> "21,709 weights zeroed"); ``split_<kind>`` as "<n> <kind> split".
    """
    amount = number(n)
    if key in _CHANGES:
        return f"{amount} {_CHANGES[key]}"
    words = key.split("_")
    if len(words) > 1 and (words[0].endswith("ed") or words[0] == "split"):
        return f"{amount} {' '.join(_word(w) for w in words[1:])} {words[0]}"
    return f"{amount} {' '.join(_word(w) for w in words)}"


def number(v: float | int, key: str = "") -> str:
    """Write a number for a person: thousands separators, 4 significant digits, cosines to 6 places."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if "cosine" in key and abs(v) <= 1.0 + 1e-9:
        # Cosines of good models differ in the 4th-6th decimal; 4 significant digits would
        # print 0.9999 for both 0.99991 and 0.99999.
        return f"{v:.6f}"
    if v == 0:
        return "0"
    a = abs(v)
    if 1e4 <= a < 1e15:
        return f"{v:,.0f}" if float(v).is_integer() or a >= 1e6 else f"{v:,.1f}"
    if float(v).is_integer() and a < 1e4:
        return f"{int(v)}"
    return f"{v:.4g}" if a >= 1e-3 else f"{v:.3g}"


def nbytes(n: int | float | None) -> str:
    """Bytes with the exact count and a binary-prefixed size: 118,357 B (115.6 KiB)."""
    if n is None:
        return "—"
    n = int(n)
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n:,} B ({n / size:.1f} {unit})"
    return f"{n:,} B"


def ratio(after: float | None, before: float | None) -> str:
    """``after / before`` as "0.340x (-66.0 %)"; "—" when either is missing or before is 0."""
    if after is None or before is None or not before:
        return "—"
    r = after / before
    pct = (r - 1) * 100
    # Small changes keep a significant digit: "-0.04 %", not "-0.0 %".
    return f"{r:.3f}x ({pct:+.1f} %)" if abs(pct) >= 0.1 or pct == 0 else f"{r:.4f}x ({pct:+.2g} %)"


def value(v: Any, key: str = "") -> str:
    """Any JSON value as text: numbers formatted, lists joined, nested dicts as ``key: value``."""
    if v is None:
        return "—"
    if isinstance(v, str):
        return v
    if isinstance(v, (bool, int, float)):
        return number(v, key)
    if isinstance(v, Mapping):
        if not v:
            return "—"
        return ", ".join(f"{label(str(k))}: {value(x, str(k))}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        if not v:
            return "none"
        if key == "shape" and all(isinstance(x, (int, str)) and not isinstance(x, bool) for x in v):
            return " \u00d7 ".join(str(x) for x in v)
        shown = [value(x, key) for x in v[:MAX_LIST]]
        sep = "; " if any(isinstance(x, (Mapping, list, tuple)) for x in v) else ", "
        more = f"{sep}… ({len(v) - MAX_LIST} more)" if len(v) > MAX_LIST else ""
        return sep.join(shown) + more
    return str(v)


def sort_value(v: Any) -> float | None:
    """Give the number a sortable column orders ``v`` by (None: order by its text)."""
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v) if not math.isnan(v) else None
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, int) for x in v):
        return float(math.prod(v))  # a shape sorts by its element count
    return None
