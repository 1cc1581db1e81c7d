"""Search for a per-node precision plan (INT8 / FP16 / FP32) that meets an accuracy budget.

A plan gives each quantizable node one of an ordered list of levels, most compressed first
(:func:`levels_for`: ``int8``, ``int8-dynamic`` where the quantize engine has it, ``fp16`` off
the CPU, ``fp32``). The planner does not know how INT8 models are made: the ``mixed`` pass hands
it :func:`onnxopt.quant.static.quantize` with ``exclude_nodes`` (and ``dynamic_nodes``) as a
callable, :data:`QuantizeFn`.

:func:`bounded_search` (what ``mixed`` runs) screens plans on one session of the switch graph
(:mod:`onnxopt.quant.screening`) through a trial runner (:mod:`onnxopt.quant.trials`: this
process, a process pool or Ray) and builds for real only to verify:

1. screen full INT8; screen each precision group alone at INT8 (its sensitivity), most
   SQNR-sensitive first, while 40 % of the time left allows (the rest ranked by the estimate);
2. per level, bisect how many of the most sensitive groups move one level up (screened); the
   group at the boundary is moved first and the bisection repeated below it (a few rounds);
3. prune: each raised group, least sensitive first, tries one level down (screened);
4. verify on every evaluation feed with a model built for real; if it misses, bisect (real
   builds) how many more of the most sensitive INT8 groups move up;
5. CPU (in the pass): INT8 regions whose INT8 form loses time go back to float; a plan not
   measured faster than FP32 gives the FP32 model.

Within ``--time-budget`` it returns the best verified plan (FP32, valid by construction, at
worst) and says which step it reached. The older helpers below (:meth:`Planner.search`,
:func:`greedy_search`) build every plan for real; the benchmarks keep them as baselines.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import time
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
    dynamic: frozenset[str] = frozenset()
    cut_off: bool = False  # screened as the best plan, but the time budget ended before its verification

    def to_json(self) -> dict[str, Any]:
        """A row of the frontier table."""
        return {
            "plan": self.label,
            "non_int8": len(self.fallback),
            "fp32": len(self.fp32),
            "int8_dynamic": len(self.dynamic),
            "data": self.data,
            "cut_off": self.cut_off,
            "size_bytes": self.size_bytes,
            "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 4),
            **self.measurement.to_json(),
        }


def precision_of(
    name: str, fallback: frozenset[str], fp32: frozenset[str], target: str, dynamic: frozenset[str] = frozenset()
) -> str:
    """The precision a candidate node gets under a plan."""
    if name in dynamic:
        return "int8-dynamic"
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

    def build(
        self, fallback: frozenset[str], fp32: frozenset[str] = frozenset(), dynamic: frozenset[str] = frozenset()
    ) -> ir.Model:
        """The model of a plan: INT8 except ``fallback``; ``dynamic`` INT8 with run-time scales; FP16 fallbacks on GPU targets."""
        if dynamic:
            model = self.quantize(self.model.clone(), fallback, dynamic)  # type: ignore[call-arg]
        else:
            model = self.quantize(self.model.clone(), fallback)
        if self.target != "cpu":
            keep = fp32 | self.fp16_unsafe
            lower = [n for n in model.graph if n.name not in keep and _is_float_compute(n)]
            float16.convert(model, lower, keep_io=True, pass_name="mixed")
        return model

    def evaluate(
        self,
        label: str,
        fallback: frozenset[str],
        fp32: frozenset[str] = frozenset(),
        data: str = "calibration",
        dynamic: frozenset[str] = frozenset(),
        timed: bool = True,
    ) -> tuple[PlanPoint, ir.Model]:
        """Build, run and record a plan (CPU latency too when ``timed``)."""
        model = self.build(fallback, fp32, dynamic)
        feeds = self.calib if data == "calibration" else self.evald
        # As deployed (optimisations on): INT8 QDQ then runs through the integer kernels, as in the
        # final check of optimize(); as written, det's verified plan (0.996) missed it (< 0.995).
        m = sensitivity.measure(self.reference(data), sensitivity.run_outputs(model, feeds, "all"), self.budget)
        self.runs += 1
        size = _io.serialized_size(model)
        latency = self.latency(model) if timed else None
        point = PlanPoint(label, fallback, fp32 & fallback, m, data, size, latency, dynamic)
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



# --- Bounded search on the screening graph ------------------------------------------------------

LEVELS = ("int8", "int8-dynamic", "fp16", "fp32")  # most compressed first
# Re-bisections with the boundary group moved first, per level step: each costs ~log2(k) trials.
_PROMOTE_ROUNDS = 4


def levels_for(target: str, dynamic: bool) -> tuple[str, ...]:
    """The ordered precision levels a node may take: INT8 first, FP32 last.

    ``int8-dynamic`` only where the quantize engine offers it (``dynamic``); ``fp16`` only off
    the CPU (FP16 is a GPU format; most CPUs run it slower than FP32).
    """
    out = ["int8"]
    if dynamic:
        out.append("int8-dynamic")
    if target != "cpu":
        out.append("fp16")
    out.append("fp32")
    return tuple(out)


@dataclasses.dataclass
class Deadline:
    """A wall-clock budget in seconds, started at construction."""

    seconds: float
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def left(self) -> float:
        """Seconds left (negative once over)."""
        return self.seconds - (time.perf_counter() - self.start)

    def elapsed(self) -> float:
        """Seconds since the start."""
        return time.perf_counter() - self.start


@dataclasses.dataclass
class SearchResult:
    """What :func:`bounded_search` chose and how far it got."""

    plan: dict[str, str]  # candidate node -> level
    point: PlanPoint | None  # the verified plan's measurement on the evaluation data (None: FP32 kept)
    model: ir.Model | None  # its model (None: FP32 kept)
    sensitivity: dict[str, float]  # group -> screened loss at the lowest level (inf: not measured)
    stopped_early: bool
    progress: list[str]  # phases finished, and the one cut off
    trials: int  # screening trials run
    groups_measured: int
    level_loss: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)  # level -> group -> loss

    def sets(self) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
        """(fallback: not INT8 static nor dynamic, fp32, int8-dynamic) node sets."""
        return _sets(self.plan)


class _Screen:
    """Screening trials of group plans through a runner; records every plan in the frontier."""

    def __init__(self, planner: Planner, screen: Any, runner: Any, bar: Any, rank_data: str = "screen") -> None:
        self.planner, self.screen, self.runner, self.bar = planner, screen, runner, bar
        self.rank_data = rank_data  # the runner's data set for ranking trials (group alone)
        self.trials = 0

    def node_plan(self, assign: Mapping[str, str]) -> dict[str, str]:
        return {n: assign.get(g, "fp32") for g, names in self.screen.groups.items() for n in names}

    def run(
        self, labelled: Sequence[tuple[str, Mapping[str, str]]], record: bool = True, data: str = "screen"
    ) -> list[Measurement]:
        switches = [self.screen.feed(a) for _, a in labelled]
        results = self.runner.measure(data, switches)
        self.trials += len(labelled)
        self.bar.update(len(labelled))
        if record:
            for (label, assign), m in zip(labelled, results, strict=True):
                fallback, fp32, dynamic = _sets(self.node_plan(assign))
                self.planner.frontier.append(PlanPoint(label, fallback, fp32, m, "screen", 0, None, dynamic))
        return results


def _bisect(lo: int, hi: int, probe: Any, width: int, alive: Any) -> tuple[int, bool]:
    """Smallest k in (lo, hi] where ``probe`` holds (it holds at hi, not at lo), as binary search does.

    Speculative: each round evaluates the mids of the next levels of the binary-search tree that
    fit in ``width`` parallel trials, then walks them; the answer is the serial answer for any
    width. Returns (k, finished) -- finished is False when ``alive()`` stopped it (k: best so far).
    """
    depth = max(1, int(math.log2(width + 1)))
    while hi - lo > 1:
        if not alive():
            return hi, False
        mids: list[int] = []
        frontier = [(lo, hi)]
        for _ in range(depth):
            nxt = []
            for a, b in frontier:
                if b - a > 1:
                    m = (a + b) // 2
                    mids.append(m)
                    nxt += [(a, m), (m, b)]
            frontier = nxt
        results = dict(zip(mids, probe(mids), strict=True))
        for _ in range(depth):
            if hi - lo <= 1:
                break
            m = (lo + hi) // 2
            if m not in results:
                break
            if results[m]:
                hi = m
            else:
                lo = m
    return hi, True


def bounded_search(
    planner: Planner,
    screen: Any,
    runner: Any,
    levels: Sequence[str],
    deadline: Deadline,
    *,
    hint: Mapping[str, float] | None = None,
    reserve: float = 0.0,
    quiet: bool = True,
    rank_data: str = "screen",
    repair_steps: int = 0,
    dynamic_groups: frozenset[str] | None = None,
) -> SearchResult:
    """Plan per group on the screening graph within ``deadline``; verify on a real build.

    1. full INT8 screened; per-group sensitivity (group alone at the lowest level), most
       ``hint``-sensitive first (SQNR estimate), for as long as 40 % of the time left allows;
    2. per level, bisect how many of the most sensitive groups move up one level (screen), then
       re-bisect with the boundary group first while that lowers the count;
    3. prune: each raised group, least sensitive first, tries one level down (screen);
    4. verify on the evaluation data with a model built for real; if it misses, bisect (real
       builds) how many more of the most sensitive lowest-level groups move up.

    Parallel trials are speculative (binary-search tree levels, greedy look-ahead), so the plan
    equals the serial one whenever the budget does not cut the search. ``reserve`` seconds are
    kept for verification builds. FP32 is the fallback plan, valid by construction.
    ``rank_data`` names the runner's data set for the per-group sensitivity trials (a ranking
    only: ``mixed`` gives its smallest screening feed); ``repair_steps`` more verifications are
    kept in reserve for a repair when the screened plan misses on the evaluation data.
    ``dynamic_groups``: the groups that may take ``int8-dynamic`` (MatMul/Gemm the engine can
    give run-time scales; None: all); the others step from INT8 straight to the next level.
    """
    from tqdm.auto import tqdm

    groups = list(screen.groups)
    width = max(1, runner.workers)
    low, top = levels[0], levels[-1]

    def own(g: str) -> list[str]:  # the levels group g may take
        return [lv for lv in levels if lv != "int8-dynamic" or dynamic_groups is None or g in dynamic_groups]

    def up(g: str, lv: str) -> str:
        mine = own(g)
        return mine[min(mine.index(lv) + 1, len(mine) - 1)]

    def down(g: str, lv: str) -> str:
        mine = own(g)
        return mine[max(mine.index(lv) - 1, 0)]

    progress: list[str] = []
    stopped = False
    est = 1 + len(groups) + 2 * max(1, math.ceil(math.log2(len(groups) + 1))) + len(groups) // 4
    bar = tqdm(total=est, desc="mixed: screening", unit="trial", disable=quiet, leave=False)
    scr = _Screen(planner, screen, runner, bar, rank_data)
    search_reserve = reserve * (1 + repair_steps)

    def alive() -> bool:
        bar.set_postfix_str(f"budget left {max(0.0, deadline.left() - search_reserve):.0f} s", refresh=False)
        return deadline.left() > search_reserve

    # 1. full INT8, then sensitivity per group.
    full = {g: low for g in groups}
    (full_m,) = scr.run([(f"full {low.upper()}", full)])
    loss = dict.fromkeys(groups, math.inf)
    rank = sorted(groups, key=lambda g: (hint or {}).get(g, 0.0))  # hint: higher is safer (SQNR dB)
    # Measured even when full INT8 screens fine: a verification miss still needs the order.
    # At most 40 % of the time left, judged by the clock between batches (not by the first
    # trial, whose time includes the workers' start-up).
    sens_end = time.perf_counter() + 0.4 * max(0.0, deadline.left() - search_reserve)
    bar.set_description("mixed: sensitivity")
    alone = _alone(scr, rank, low, width, lambda: alive() and time.perf_counter() < sens_end)
    loss.update(alone)
    measured = len(alone)
    progress.append(f"sensitivity of {measured} of {len(groups)} groups")
    if measured < len(groups):
        progress[-1] += " (the rest ranked by the SQNR estimate: out of time)"
    # Measured groups by loss (non-finite first), the unmeasured (estimate order) before the
    # measured ones that are known to be safe -- alone, less than an even share of full INT8's
    # loss: on det an unmeasured group that the SQNR estimate ranked last cost 0.004 alone, and
    # bisection had to raise every measured safe group before it.
    pos = {g: i for i, g in enumerate(rank)}
    share = full_m.loss / len(groups) if math.isfinite(full_m.loss) else math.inf
    by_loss = sorted(alone, key=lambda g: (-loss[g], pos[g]))
    order = ([g for g in by_loss if not loss[g] <= share] + [g for g in rank if g not in alone]
             + [g for g in by_loss if loss[g] <= share])  # fmt: skip

    # 2. per level, bisect the number of most sensitive groups that move up one level.
    assign = dict(full)
    ok = full_m.ok
    level_loss: dict[str, dict[str, float]] = {low: alone}
    best_screen: dict[str, str] | None = dict(assign) if ok else None
    for li in range(len(levels) - 1):
        if ok:
            break
        cur, nxt = levels[li], levels[li + 1]
        # Groups at this level, and lower ones whose next level is nxt (INT8 groups that cannot
        # be dynamic, when this step leaves int8-dynamic).
        movable = [g for g in order if assign[g] != top and levels.index(assign[g]) <= li and up(g, assign[g]) == nxt]
        if not movable:
            continue
        if not alive():
            stopped = True
            break
        if li > 0:  # rank the raised groups by their own loss at this level (FP16 on GPU targets)
            bar.set_description(f"mixed: sensitivity {cur}")
            level_loss[cur] = _alone(scr, [g for g in movable if assign[g] == cur], cur, width, alive)
            movable.sort(key=lambda g: -level_loss[cur].get(g, loss.get(g, math.inf)))
        bar.set_description(f"mixed: {cur} -> {nxt}")

        def plan_k(k: int, movable=movable, nxt=nxt) -> dict[str, str]:
            return {**assign, **{g: nxt for g in movable[:k]}}

        (all_m,) = scr.run([(f"top {len(movable)} {nxt}", plan_k(len(movable)))])
        if not all_m.ok:
            assign = plan_k(len(movable))
            continue
        k, done = _bisect(
            0, len(movable),
            lambda ks, pk=plan_k, nxt=nxt: [m.ok for m in scr.run([(f"top {k} {nxt}", pk(k)) for k in ks])],
            width, alive,
        )  # fmt: skip
        # The group at the boundary (top k holds, top k-1 does not) is critical whatever its rank:
        # move it first and bisect again below k. A ranking from groups measured alone misses
        # groups that matter only next to other INT8 groups (on rec: ranked 169th of 190, the one
        # that took the screen from cosine 0.979 to 0.99999).
        promoted = 0
        while done and k > 1 and promoted < _PROMOTE_ROUNDS and alive():
            critical = movable[k - 1]
            again = [critical] + movable[: k - 1] + movable[k:]

            def plan_j(j: int, again=again, nxt=nxt) -> dict[str, str]:
                return {**assign, **{g: nxt for g in again[:j]}}

            k2, done = _bisect(
                0, k,
                lambda ks, pj=plan_j, nxt=nxt: [m.ok for m in scr.run([(f"top {j} {nxt} (critical first)", pj(j))
                                                                         for j in ks])],
                width, alive,
            )  # fmt: skip
            promoted += 1
            if k2 >= k:
                break
            movable[:] = again
            order = [critical] + [g for g in order if g != critical]
            k = k2
        assign, ok = plan_k(k), True
        best_screen = dict(assign)
        progress.append(f"{cur} -> {nxt}: {k} of {len(movable)} groups"
                        + (f" ({promoted} boundary re-bisections)" if promoted else ""))  # fmt: skip
        if not done:
            stopped = True
            progress[-1] += " (bisection cut off by the time budget)"
            break

    # Groups left at an intermediate level: their loss there, for the report (and the order of a repair).
    for lv in levels[1:-1]:
        at = [g for g in order if assign[g] == lv and g not in level_loss.get(lv, {})]
        if at and alive():
            level_loss.setdefault(lv, {}).update(_alone(scr, at, lv, width, alive))

    # 3. prune: raised groups, least sensitive first, one level down while the screen holds.
    if ok and not stopped and best_screen is not None:
        bar.set_description("mixed: prune")
        raised = [g for g in reversed(order) if assign[g] != own(g)[0]]
        i, given_back = 0, 0
        while i < len(raised):
            if not alive():
                stopped = True
                break
            batch = raised[i : i + width]
            trials = [(f"prune {g}", {**assign, g: down(g, assign[g])}) for g in batch]
            results = scr.run(trials)
            i += len(batch)
            for j, m in enumerate(results):
                if m.ok:
                    assign = trials[j][1]
                    given_back += 1
                    i = i - len(batch) + j + 1
                    break
        best_screen = dict(assign)
        progress.append(f"prune: {given_back} of {len(raised)} raised groups given back"
                        + (" (cut off by the time budget)" if stopped else ""))  # fmt: skip
    bar.close()

    # 4. verify on a real build (all evaluation feeds); repair by bisection if it misses.
    result_point: PlanPoint | None = None
    result_model: ir.Model | None = None
    final_plan = {n: top for names in screen.groups.values() for n in names}
    if best_screen is not None and any(lv != top for lv in best_screen.values()):
        fallback, fp32, dynamic = _sets(scr.node_plan(best_screen))
        point, model = planner.evaluate("verify", fallback, fp32, "evaluation", dynamic, timed=False)
        if point.measurement.ok:
            result_point, result_model, final_plan = point, model, scr.node_plan(best_screen)
            progress.append("verified on the evaluation data")
        else:
            progress.append("the screened plan missed the budget on the evaluation data: repair")
            lowest = [g for g in order if best_screen[g] == low]

            def real(k: int) -> tuple[PlanPoint, ir.Model, dict[str, str]]:
                a = {**best_screen, **{g: up(g, low) for g in lowest[:k]}}  # type: ignore[dict-item]
                f, f32, d = _sets(scr.node_plan(a))
                p, m = planner.evaluate(f"verify: +{k} raised", f, f32, "evaluation", d, timed=False)
                return p, m, scr.node_plan(a)

            lo, hi = 0, len(lowest)
            found = None
            # Raising every lowest group to FP32, with the rest FP32 already, is the FP32 model: it
            # meets the budget by construction, so it is not built (bisection starts bracketed).
            everything = (all(up(g, low) == top for g in lowest)
                          and all(best_screen[g] == top for g in groups if g not in set(lowest)))  # fmt: skip
            if lowest and not everything and deadline.left() > 0:
                p, m, plan = real(hi)
                found = (p, m, plan) if p.measurement.ok else None  # None: even all raised misses
            while (found is not None or (everything and lowest)) and hi - lo > 1:
                if deadline.left() <= 0:
                    stopped = True
                    progress.append("repair cut off by the time budget")
                    break
                mid = (lo + hi) // 2
                p, m, plan = real(mid)
                if p.measurement.ok:
                    found, hi = (p, m, plan), mid
                else:
                    lo = mid
            if found is not None:
                result_point, result_model, final_plan = found
    elif best_screen is not None:
        progress.append("no group can leave FP32 within the budget")
    if best_screen is not None and result_point is None and stopped:
        f, f32, d = _sets(scr.node_plan(best_screen))
        planner.frontier.append(PlanPoint("best screened (not verified: time budget)", f, f32,
                                          Measurement(math.nan, math.nan, math.nan, None, 0, False),
                                          "screen", 0, None, d, cut_off=True))  # fmt: skip
    return SearchResult(final_plan, result_point, result_model, {g: loss[g] for g in groups}, stopped,
                        progress, scr.trials, measured, level_loss)  # fmt: skip


def _alone(scr: _Screen, todo: Sequence[str], level: str, width: int, alive: Any) -> dict[str, float]:
    """Screened loss of each group alone at ``level`` (the rest FP32), in batches while ``alive()``."""
    out: dict[str, float] = {}
    for i in range(0, len(todo), 4 * width):
        if not alive():
            break
        batch = todo[i : i + 4 * width]
        trials = [(f"{g} alone {level}", {g: level}) for g in batch]
        for g, m in zip(batch, scr.run(trials, record=False, data=scr.rank_data), strict=True):
            out[g] = m.loss
    return out


def _sets(plan: Mapping[str, str]) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    fallback = frozenset(n for n, lv in plan.items() if lv in ("fp16", "fp32"))
    fp32 = frozenset(n for n, lv in plan.items() if lv == "fp32")
    dynamic = frozenset(n for n, lv in plan.items() if lv == "int8-dynamic")
    return fallback, fp32, dynamic
