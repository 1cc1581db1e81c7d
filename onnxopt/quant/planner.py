"""Search for a per-node precision plan (INT8 / FP16 / FP32) that meets an accuracy budget.

A plan is the set of quantizable nodes that fall back from INT8 (to FP32 on the CPU target, to
FP16 on cuda/tensorrt, and to FP32 only where FP16 itself fails). Every plan is built for real
(the caller's quantize callable, :data:`QuantizeFn`, keeping the fallbacks float, then
:func:`onnxopt.quant.float16.convert`) and run in onnxruntime; the estimate never stands in for
the measurement. The planner does not know how INT8 models are made: the ``mixed`` pass hands it
:func:`onnxopt.quant.static.quantize` with ``exclude_nodes``.

Search (``N + O(log N) + k`` model runs for N candidates and k fallbacks, where the greedy
search needs ``O(N * k)``):

1. rank nodes by measured sensitivity (each node INT8 alone, on calibration data);
2. bisect the number of most-sensitive nodes to fall back until the budget holds (calibration);
3. verify on the evaluation data; if it misses there, bisect how many more to add (GPU targets:
   fallbacks are FP16, and the most FP16-sensitive move to FP32 until the budget holds);
4. prune on the evaluation data: give each fallback back to INT8, least sensitive first, when
   the budget still holds without it;
5. CPU: measure latency against FP32 (interleaved runs); INT8 groups of nodes (by op type and
   depthwise-ness) whose INT8 form loses time are put back to float; if no plan beats FP32,
   the FP32 model is the answer and the report says so.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt import io as _io
from onnxopt.quant import float16, sensitivity
from onnxopt.quant.rules import SUPPORTED_OPS
from onnxopt.quant.sensitivity import Budget, Measurement
from onnxopt.runtime.latency import paired_ratio

__all__ = [
    "PlanPoint",
    "Planner",
    "greedy_search",
    "name_nodes",
    "precision_of",
    "quantized_nodes",
]

logger = logging.getLogger(__name__)

Feeds = Sequence[Mapping[str, np.ndarray]]
# (float model clone, names kept float) -> INT8 model, built in place on the clone; the mixed
# pass hands one running onnxopt.quant.static.quantize.
QuantizeFn = sensitivity.Lower


@dataclasses.dataclass
class PlanPoint:
    """One plan that was built and measured."""

    label: str
    fallback: frozenset[str]
    fp32: frozenset[str]
    measurement: Measurement
    data: str  # "calibration" or "evaluation"
    size_bytes: int
    latency_ms: float | None = None

    def to_json(self) -> dict[str, Any]:
        """A row of the frontier table."""
        return {
            "plan": self.label,
            "non_int8": len(self.fallback),
            "fp32": len(self.fp32),
            "data": self.data,
            "size_bytes": self.size_bytes,
            "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 4),
            **self.measurement.to_json(),
        }


def precision_of(name: str, fallback: frozenset[str], fp32: frozenset[str], target: str) -> str:
    """The precision a candidate node gets under a plan."""
    if name not in fallback:
        return "int8"
    if target == "cpu" or name in fp32:
        return "fp32"
    return "fp16"


@dataclasses.dataclass
class Planner:
    """Builds and measures plans for one float model; counts model runs; keeps the frontier.

    Attributes:
        model: the float model (node names unique and non-empty).
        candidates: names of the nodes ``quantize`` lowers in the full-INT8 model.
        quantize: builds an INT8 model from a clone, keeping the given names float.
        budget: the accuracy budget.
        target: cpu, cuda or tensorrt.
        calib: calibration feeds (planning).
        evald: evaluation feeds (verification).
        fp16_unsafe: nodes that must not be lowered to FP16 (range check).
        latency_runs: interleaved timing runs per measurement on CPU (0: no latency).

    """

    model: ir.Model
    candidates: list[str]
    quantize: QuantizeFn
    budget: Budget
    target: str
    calib: Feeds
    evald: Feeds
    fp16_unsafe: frozenset[str] = frozenset()
    latency_runs: int = 10
    fp16_order: list[str] = dataclasses.field(default_factory=list)  # most FP16-sensitive first
    runs: int = 0
    frontier: list[PlanPoint] = dataclasses.field(default_factory=list)
    _ref: dict[str, list] = dataclasses.field(default_factory=dict)
    _fp32_ms: float | None = None

    def reference(self, data: str) -> list[dict[str, np.ndarray]]:
        """Float model outputs on the calibration or evaluation feeds (computed once)."""
        if data not in self._ref:
            self._ref[data] = sensitivity.run_outputs(self.model, self.calib if data == "calibration" else self.evald)
            self.runs += 1
        return self._ref[data]

    def build(self, fallback: frozenset[str], fp32: frozenset[str] = frozenset()) -> ir.Model:
        """The model of a plan: INT8 except ``fallback``; FP16 fallbacks on GPU targets."""
        model = self.quantize(self.model.clone(), fallback)
        if self.target != "cpu":
            keep = fp32 | self.fp16_unsafe
            lower = [n for n in model.graph if n.name not in keep and _is_float_compute(n)]
            float16.convert(model, lower, keep_io=True, pass_name="mixed")
        return model

    def evaluate(
        self, label: str, fallback: frozenset[str], fp32: frozenset[str] = frozenset(), data: str = "calibration"
    ) -> tuple[PlanPoint, ir.Model]:
        """Build, run and record a plan."""
        model = self.build(fallback, fp32)
        feeds = self.calib if data == "calibration" else self.evald
        m = sensitivity.measure(self.reference(data), sensitivity.run_outputs(model, feeds), self.budget)
        self.runs += 1
        size = _io.serialized_size(model)
        point = PlanPoint(label, fallback, fp32 & fallback, m, data, size, self.latency(model))
        self.frontier.append(point)
        logger.debug("plan %s: %d fallbacks, loss %.4g, ok=%s", label, len(fallback), m.loss, m.ok)
        return point, model

    def latency(self, model: ir.Model) -> float | None:
        """CPU median ms of ``model``, measured interleaved with FP32 and scaled to its median."""
        if self.latency_runs <= 0 or self.target != "cpu":
            return None
        fp32_ms, ratio = paired_ratio(self.model, model, dict(self.calib[0]), self.latency_runs)
        if self._fp32_ms is None:
            self._fp32_ms = fp32_ms
        # Same-script ratio against the FP32 run next to it, scaled to the first FP32 median.
        return ratio * self._fp32_ms

    @property
    def fp32_ms(self) -> float | None:
        """FP32 median latency (first measurement)."""
        return self._fp32_ms

    def search(self, order: Sequence[str]) -> tuple[frozenset[str], frozenset[str]]:
        """Steps 2-4 of the module docstring; ``order`` is most sensitive first."""
        n = len(order)
        point, _ = self.evaluate("full INT8", frozenset())
        if point.measurement.ok:
            k = 0
        else:
            top, _ = self.evaluate(f"top {n} float", frozenset(order))
            if not top.measurement.ok:
                return frozenset(order), self._fp32_where_fp16_fails(frozenset(order), order)
            lo, hi = 0, n
            while hi - lo > 1:
                mid = (lo + hi) // 2
                probe, _ = self.evaluate(f"top {mid} float", frozenset(order[:mid]))
                if probe.measurement.ok:
                    hi = mid
                else:
                    lo = mid
            k = hi
        fallback = frozenset(order[:k])
        fp32 = self._fp32_where_fp16_fails(fallback, order)
        fallback, fp32 = self._verify(fallback, fp32, [o for o in order if o not in fallback])
        return self._prune(fallback, fp32, order), fp32

    def _prune(self, fallback: frozenset[str], fp32: frozenset[str], order: Sequence[str]) -> frozenset[str]:
        """Give each fallback back to INT8 (least sensitive first) while the evaluation data fits."""
        kept = set(fallback)
        for name in [o for o in reversed(order) if o in fallback]:
            trial = frozenset(kept - {name})
            probe, _ = self.evaluate(f"requantize {name}", trial, fp32 - {name}, data="evaluation")
            if probe.measurement.ok:
                kept.discard(name)
        return frozenset(kept)

    def _verify(
        self, fallback: frozenset[str], fp32: frozenset[str], pending: Sequence[str]
    ) -> tuple[frozenset[str], frozenset[str]]:
        """Smallest prefix of ``pending`` (sensitivity order) to add so that evaluation data fits."""
        check, _ = self.evaluate("verify", fallback, fp32, data="evaluation")
        if check.measurement.ok or not pending:
            return fallback, fp32
        every = fallback | frozenset(pending)
        check, _ = self.evaluate("verify: all fall back", every, fp32, data="evaluation")
        if not check.measurement.ok:
            return every, fp32
        lo, hi = 0, len(pending)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            probe, _ = self.evaluate(f"verify: +{mid} fallbacks", fallback | frozenset(pending[:mid]), fp32, "evaluation")
            if probe.measurement.ok:
                hi = mid
            else:
                lo = mid
        return fallback | frozenset(pending[:hi]), fp32

    def _fp32_where_fp16_fails(self, fallback: frozenset[str], order: Sequence[str]) -> frozenset[str]:
        """GPU targets: fallbacks go FP16; the most sensitive move to FP32 until the budget holds."""
        if self.target == "cpu" or not fallback:
            return frozenset()
        fp32: set[str] = set()
        for name in [o for o in (self.fp16_order or order) if o in fallback]:
            probe, _ = self.evaluate(f"fp16 fallback, {len(fp32)} fp32", fallback, frozenset(fp32))
            if probe.measurement.ok:
                break
            fp32.add(name)
        return frozenset(fp32)

    def speed_guard(
        self, fallback: frozenset[str], groups: Mapping[str, str]
    ) -> tuple[frozenset[str], list[str]]:
        """CPU: put INT8 groups that lose time back to float; FP32 if no INT8 plan is faster.

        Args:
            fallback: the accurate plan.
            groups: node name -> region key (op type, depthwise).

        Returns the final fallback set and notes.

        """
        notes: list[str] = []
        if self.target != "cpu" or self.latency_runs <= 0:
            return fallback, notes
        point, model = self.evaluate("accurate plan (timed)", fallback)
        best, best_ms = fallback, point.latency_ms or math.inf
        fp32_ms = self.fp32_ms or math.inf
        if best_ms < fp32_ms and self._confirm_faster(model):
            return best, notes
        int8 = collections.defaultdict(set)
        for name in self.candidates:
            if name not in best:
                int8[groups.get(name, "other")].add(name)
        for key, names in sorted(int8.items(), key=lambda kv: -len(kv[1])):
            trial = frozenset(best | names)
            probe, _ = self.evaluate(f"float region {key}", trial)
            if probe.latency_ms is not None and probe.latency_ms < best_ms and probe.measurement.ok:
                notes.append(f"INT8 {key} ({len(names)} nodes) lost time on CPU: kept float")
                best, best_ms = trial, probe.latency_ms
        if best_ms >= fp32_ms or not self._confirm_faster(self.build(best)):
            notes.append(
                f"no INT8 plan tried beats FP32 on this CPU (best {best_ms:.3f} ms vs FP32 {fp32_ms:.3f} ms, "
                "or not confirmed by a second timing): the model stays FP32"
            )
            return frozenset(self.candidates), notes
        return best, notes

    def _confirm_faster(self, model: ir.Model) -> bool:
        """A second, longer interleaved timing: the candidate must again be faster than FP32."""
        _, ratio = paired_ratio(self.model, model, dict(self.calib[0]), 2 * self.latency_runs)
        return ratio < 1.0


def name_nodes(model: ir.Model) -> int:
    """Give every unnamed or duplicate-named main-graph node a unique name; how many changed."""
    seen: set[str] = set()
    changed = 0
    for i, node in enumerate(model.graph):
        if not node.name or node.name in seen:
            base = f"{node.op_type}_{i}"
            name = base
            while name in seen:
                name += "_"
            node.name = name
            changed += 1
        seen.add(node.name)
    return changed


def quantized_nodes(model: ir.Model) -> list[str]:
    """Names of main-graph nodes fed by a DequantizeLinear in the quantized model."""
    out = []
    for node in model.graph:
        if node.op_type not in SUPPORTED_OPS:
            continue
        if any(v is not None and v.producer() is not None and v.producer().op_type == "DequantizeLinear" for v in node.inputs):
            out.append(node.name)
    return out


def _is_float_compute(node: ir.Node) -> bool:
    if node.op_type in ("QuantizeLinear", "DequantizeLinear", "Cast"):
        return False
    return any(o.dtype in (None, ir.DataType.FLOAT) for o in node.outputs)


def greedy_search(planner: Planner, *, max_steps: int | None = None) -> tuple[frozenset[str], int, bool]:
    """Baseline: from full INT8, repeatedly fall back the one node that helps most.

    Returns the fallback set, the number of model runs it took, and whether it met the budget.
    """
    runs_before = planner.runs
    fallback: frozenset[str] = frozenset()
    point, _ = planner.evaluate("greedy start", fallback)
    loss = point.measurement.loss
    steps = 0
    while not point.measurement.ok and len(fallback) < len(planner.candidates):
        best = None
        for name in planner.candidates:
            if name in fallback:
                continue
            probe, _ = planner.evaluate(f"greedy +{name}", fallback | {name})
            if best is None or probe.measurement.loss < best[1].measurement.loss:
                best = (name, probe)
        assert best is not None
        fallback = fallback | {best[0]}
        point = best[1]
        loss = point.measurement.loss
        steps += 1
        if max_steps is not None and steps >= max_steps:
            break
    logger.debug("greedy: %d fallbacks, loss %.4g", len(fallback), loss)
    runs = planner.runs - runs_before
    return fallback, runs, point.measurement.ok

