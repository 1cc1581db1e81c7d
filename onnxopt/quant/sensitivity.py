"""Per-node precision sensitivity: the output error a node causes when it alone is lowered.

Measured: for each candidate node, a copy of the float model with only that node lowered
(INT8 QDQ or FP16, built by the caller's ``lower`` function) runs on calibration feeds in
onnxruntime; its loss against the float model's outputs under the accuracy budget (1 - cosine,
max abs error, or minus a user metric) is the node's sensitivity. One model build and one
session per node.

Estimated (cheap): per-tensor SQNR of INT8 rounding from one instrumented float run -- each
candidate's output activation is fake-quantized per tensor (uint8, calibrated range) and its
constant weight per output channel (int8, symmetric); the two noise powers add. No model is
rebuilt. :func:`rank_agreement` says whether the two rank nodes alike (Spearman).

Measured sensitivities are cached in the caller's ``cache`` (a pass context's) under
``("sensitivity", ...)`` keys.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from onnxopt import _ir_utils
from onnxopt.runtime import sessions as runtime
from onnxopt.runtime import validation

__all__ = [
    "Budget",
    "Measurement",
    "Metric",
    "estimate_sqnr",
    "measure",
    "node_sensitivity",
    "rank_agreement",
    "run_outputs",
]

logger = logging.getLogger(__name__)

Outputs = list[dict[str, np.ndarray]]
Lower = Callable[[ir.Model, frozenset[str]], ir.Model]
# metric(reference_outputs, candidate_outputs) -> score, higher is better (as onnxopt.context.Metric).
Metric = Callable[[Outputs, Outputs], float]


@dataclasses.dataclass(frozen=True)
class Budget:
    """An accuracy budget on a candidate's outputs against the float model's.

    Exactly one kind is active, in this order: ``metric`` with ``min_metric`` (higher is
    better), ``max_error`` (max abs over outputs), ``min_cosine`` (worst output cosine).
    """

    min_cosine: float | None = None
    max_error: float | None = None
    metric: Metric | None = None
    min_metric: float | None = None

    def __post_init__(self) -> None:
        if self.metric is not None and self.min_metric is None:
            raise ValueError("a metric budget needs min_metric")
        if self.min_cosine is None and self.max_error is None and self.metric is None:
            raise ValueError("a budget needs min_cosine, max_error or metric with min_metric")
        if self.min_cosine is not None and not -1.0 <= self.min_cosine <= 1.0:
            raise ValueError(f"min_cosine must be in [-1, 1], got {self.min_cosine}")
        if self.max_error is not None and self.max_error < 0:
            raise ValueError(f"max_error must be >= 0, got {self.max_error}")

    @classmethod
    def from_bounds(
        cls,
        *,
        min_cosine: float | None = None,
        max_error: float | None = None,
        metric: Metric | None = None,
        min_metric: float | None = None,
        default_min_cosine: float,
    ) -> Budget:
        """Build the budget of the first bound set, or ``min_cosine=default_min_cosine`` when none is.

        The order is ``metric`` with ``min_metric``, then ``max_error``, then ``min_cosine``;
        the others are ignored (a context's ``--min-cosine`` next to a Python metric, say).
        """
        if metric is not None and min_metric is not None:
            return cls(metric=metric, min_metric=min_metric)
        if max_error is not None:
            return cls(max_error=max_error)
        return cls(min_cosine=min_cosine if min_cosine is not None else default_min_cosine)

    def describe(self) -> str:
        """``cosine >= 0.995`` and the like."""
        if self.metric is not None:
            return f"metric >= {self.min_metric}"
        if self.max_error is not None:
            return f"max abs error <= {self.max_error}"
        return f"cosine >= {self.min_cosine}"


@dataclasses.dataclass(frozen=True)
class Measurement:
    """A candidate's outputs against the reference: loss (lower is better) and whether it fits."""

    loss: float
    cosine: float
    max_abs: float
    metric: float | None
    nonfinite: int
    ok: bool

    def to_json(self) -> dict[str, Any]:
        """Rounded fields for reports."""
        return {
            "loss": _round(self.loss),
            "cosine": _round(self.cosine),
            "max_abs": _round(self.max_abs),
            "metric": None if self.metric is None else _round(self.metric),
            "ok": self.ok,
        }


def _round(x: float) -> float:
    return float(f"{x:.6g}") if math.isfinite(x) else x


def run_outputs(
    model: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]], opt_level: runtime.OptLevel = "disable"
) -> Outputs:
    """Outputs of ``model`` on every feed (onnxruntime CPU; graph as written, or at ``opt_level``)."""
    with runtime.session(model, opt_level=opt_level) as handle:
        return runtime.run_all(handle, [dict(f) for f in feeds])


def measure(
    reference: Outputs, candidate: Outputs, budget: Budget, cache: dict[str, Any] | None = None
) -> Measurement:
    """Compare ``candidate`` outputs with ``reference`` under ``budget``.

    ``cache``: a dict kept with ``reference`` (a trial worker's) for its float64 copy and norm,
    so that a trial computes only the candidate's side of cosine and max abs.
    """
    names = list(reference[0]) if reference else []
    cosines, max_abs, nonfinite = [], [], 0
    for name in names:
        ref = [r[name] for r in reference]
        cand = [c[name] for c in candidate]
        lean = _lean_metrics(name, ref, cand, cache) if cache is not None else None
        if lean is None:
            m = validation.output_metrics(ref, cand)
            lean = (m.cosine, m.max_abs, m.nonfinite)
        cosines.append(lean[0])
        max_abs.append(lean[1])
        nonfinite += lean[2]
    cos = min(cosines) if cosines else 1.0
    err = max(max_abs) if max_abs else 0.0
    score = None
    if budget.metric is not None:
        score = float(budget.metric(reference, candidate))
        loss = -score
        ok = score >= budget.min_metric  # type: ignore[operator]
    elif budget.max_error is not None:
        loss = err
        ok = err <= budget.max_error
    else:
        loss = 1.0 - cos
        ok = cos >= budget.min_cosine  # type: ignore[operator]
    if nonfinite or math.isnan(loss):
        loss, ok = math.inf, False
    return Measurement(loss, cos, err, score, nonfinite, bool(ok))


def _lean_metrics(
    name: str, ref: list[np.ndarray], cand: list[np.ndarray], cache: dict[str, Any]
) -> tuple[float, float, int] | None:
    """Cosine, max abs and non-finite count as :func:`validation.output_metrics` computes them
    (same float64 formulas, so the same numbers), without its other statistics; None for
    outputs it handles specially (strings, sequences, shape mismatches). On PP-OCR rec's
    6625-class outputs the full metrics took as long as the trial's run."""
    if not all(isinstance(x, np.ndarray) and x.dtype.kind == "f" for x in (*ref, *cand)):
        return None
    if any(r.shape != c.shape for r, c in zip(ref, cand, strict=True)):
        return None
    if name not in cache:
        a = np.concatenate([np.asarray(x, dtype=np.float64).ravel() for x in ref]) if ref else np.zeros(0)
        cache[name] = (a, np.isfinite(a), validation.norm(a), bool(np.isnan(a).any()))
    a, finite_a, norm_a, nan_a = cache[name]
    b = np.concatenate([np.asarray(x, dtype=np.float64).ravel() for x in cand]) if cand else np.zeros(0)
    nonfinite = int(np.count_nonzero(~np.isfinite(b) & finite_a))
    if a.size == 0:
        return 1.0, 0.0, nonfinite
    with np.errstate(all="ignore"):
        diff = np.abs(a - b)
        if nan_a:
            diff[np.isnan(diff) & (np.isnan(a) & np.isnan(b))] = 0.0  # NaN in both: agree
        max_abs = float(np.max(diff))
        norm_b = validation.norm(b)
        if norm_a == 0 and norm_b == 0:
            cosine = 1.0
        elif norm_a == 0 or norm_b == 0:
            cosine = 0.0
        else:
            cosine = float(validation.dot(a, b) / (norm_a * norm_b))
    return cosine, max_abs, nonfinite


def node_sensitivity(
    model: ir.Model,
    nodes: Sequence[str],
    lower: Lower,
    feeds: Sequence[Mapping[str, np.ndarray]],
    budget: Budget,
    *,
    cache: MutableMapping[Any, Any] | None = None,
    quiet: bool = True,
    key: str = "",
) -> dict[str, Measurement]:
    """Per node name: the measured effect of lowering that node alone (``lower(clone, {name})``).

    Args:
        model: the float model (not modified).
        nodes: candidate node names.
        lower: builds the lowered model from a clone and a set of node names.
        feeds: calibration feeds.
        budget: how outputs are scored.
        cache: where results are kept between calls (a pass context's cache), or None.
        quiet: no progress bar.
        key: distinguishes precisions in the cache ("int8", "fp16").

    """
    cache_key = ("sensitivity", key, tuple(nodes), len(feeds), budget.describe())
    if cache is not None and cache_key in cache:
        return cache[cache_key]
    reference = run_outputs(model, feeds)
    out: dict[str, Measurement] = {}
    for name in tqdm(nodes, desc=f"sensitivity {key}".strip(), unit="node", disable=quiet, leave=False):
        candidate = lower(model.clone(), frozenset({name}))
        out[name] = measure(reference, run_outputs(candidate, feeds), budget)
    if cache is not None:
        cache[cache_key] = out
    return out


def estimate_sqnr(
    model: ir.Model,
    nodes: Sequence[str],
    ranges: Mapping[str, tuple[float, float]],
    feeds: Sequence[Mapping[str, np.ndarray]],
) -> dict[str, float]:
    """Cheap INT8 SQNR (dB) per node from one instrumented float run; lower is more sensitive.

    Output activation: uint8 per tensor over its calibrated range. Weight (first constant
    input with rank >= 2): symmetric int8 per output channel (axis 0, or 1 for MatMul).
    """
    by_name = {n.name: n for n in model.graph}
    outputs = {name: by_name[name].outputs[0].name for name in nodes if name in by_name}
    wanted = [v for v in outputs.values() if v in ranges]
    signal = dict.fromkeys(wanted, 0.0)
    noise = dict.fromkeys(wanted, 0.0)
    for captured in runtime.capture(model, [dict(f) for f in feeds], wanted):
        for v in wanted:
            x = np.asarray(captured[v], dtype=np.float64)
            lo, hi = ranges[v]
            lo, hi = min(lo, 0.0), max(hi, 0.0)
            scale = (hi - lo) / 255.0 or 1.0
            zero = round(-lo / scale)
            q = (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale
            signal[v] += float(np.sum(x * x))
            noise[v] += float(np.sum((x - q) ** 2))
    result = {}
    for name, value in outputs.items():
        node = by_name[name]
        rel_noise = noise.get(value, 0.0) / signal[value] if signal.get(value) else 0.0
        rel_noise += _weight_noise(node)
        result[name] = 10.0 * math.log10(1.0 / rel_noise) if rel_noise > 0 else math.inf
    return result


def _weight_noise(node: ir.Node) -> float:
    for i in range(1, len(node.inputs)):
        value = _ir_utils.constant_input(node, i)
        if value is None:
            continue
        w = _ir_utils.constant_array(value).astype(np.float64)
        if w.ndim < 2:
            continue
        axis = 1 if node.op_type == "MatMul" else 0
        moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        scale = np.abs(moved).max(axis=1, keepdims=True) / 127.0
        scale[scale == 0] = 1.0
        q = np.clip(np.round(moved / scale), -127, 127) * scale
        power = float(np.sum(moved * moved))
        return float(np.sum((moved - q) ** 2)) / power if power else 0.0
    return 0.0


def rank_agreement(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """Spearman rank correlation of two scores over their shared keys (nan if < 3 keys)."""
    keys = [k for k in a if k in b and math.isfinite(a[k]) and math.isfinite(b[k])]
    if len(keys) < 3:
        return math.nan
    ra = _ranks([a[k] for k in keys])
    rb = _ranks([b[k] for k in keys])
    if np.std(ra) == 0 or np.std(rb) == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(values: Sequence[float]) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    return ranks
