"""Mixed precision: INT8 where the budget allows, FP16/FP32 fallback where it does not.

Per quantizable node the plan picks INT8, FP16 (cuda/tensorrt targets) or FP32 (and dynamic
INT8 where the quantize engine offers ``dynamic_nodes``), so that the model's outputs meet the
accuracy budget of the context (``--min-cosine``, ``--max-error``, or a Python metric with
``min_metric``) with as few fallbacks as the search finds; on the CPU target INT8 regions
measured slower than float are put back to float, and if no INT8 plan beats FP32 the model stays
FP32. Plans are screened on one onnxruntime session of a switch graph
(:mod:`onnxopt.quant.screening`), on ``--workers`` (:mod:`onnxopt.quant.trials`), within
``--time-budget`` seconds, and the chosen one is verified on a model built for real by
:func:`onnxopt.quant.static.quantize` (the quantize pass's engine, handed to the planner as a
callable by :func:`int8_quantizer`); FP16 by :mod:`onnxopt.quant.float16`. The search is
:func:`onnxopt.quant.planner.bounded_search`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import math
import time

import numpy as np
import onnx_ir as ir

from onnxopt import _ir_utils
from onnxopt import io as _io
from onnxopt.config import option
from onnxopt.context import PassContext
from onnxopt.pass_base import OptPass, PassReport, register
from onnxopt.quant import float16, screening, sensitivity, static, trials
from onnxopt.quant import insert as qdq_insert
from onnxopt.quant import planner as precision_plan
from onnxopt.quant.calibration import cached_ranges
from onnxopt.report import plots as mixed_plots
from onnxopt.runtime.data import Dataset

__all__ = ["MixedConfig", "MixedPass", "int8_quantizer"]

logger = logging.getLogger(__name__)

# The record with the plan's metrics (budget met, model runs, nodes per precision): metrics are
# records, counts are changes.
SUMMARY = "summary"

_QDQ_OPSET = static.MIN_OPSET  # QuantizeLinear/DequantizeLinear with per-channel axis
# Estimated serial screening time above which a worker pool is started (its start-up: ~1-2 s
# per spawned worker to import onnxruntime and load the model).
_POOL_MIN_SECONDS = 8.0
# Verifications (a real build + a run on every evaluation feed) kept in reserve beyond the first,
# for the bisection that repairs a screened plan that misses on the evaluation data: 3 steps take
# a miss among ~8 candidate prefixes to a verified plan (log2 8); later steps run if time is left.
_REPAIR_STEPS = 3


def dynamic_supported() -> bool:
    """Whether the quantize engine offers per-token dynamic INT8 (``QuantizeConfig.dynamic_nodes``)."""
    return "dynamic_nodes" in {f.name for f in dataclasses.fields(static.QuantizeConfig)}


def int8_quantizer(context: PassContext, calibration_method: str = "mse") -> precision_plan.QuantizeFn:
    """Build the planner's quantize callable: static INT8 of a float clone, given names kept float.

    Options as the quantize pass with ``sqnr_samples=0, latency_runs=0`` (plans are measured by
    the planner) and ``exclude_nodes`` set to the names kept float; the optional third argument
    names the nodes with dynamic (run-time) activation scales, where the engine has them. Data,
    target and progress bars come from ``context``; the calibration table is cached in
    ``context.cache``, so every plan reuses one calibration.
    """
    base = static.QuantizeConfig(sqnr_samples=0, latency_runs=0, calibration_method=calibration_method)  # type: ignore[arg-type]
    workers = trials.parse_workers(context.workers)  # calibration on data shards, as the trials

    def quantize(clone: ir.Model, keep_float: frozenset[str], dynamic: frozenset[str] = frozenset()) -> ir.Model:
        extra = {"dynamic_nodes": frozenset(dynamic)} if dynamic else {}
        config = dataclasses.replace(base, exclude_nodes=keep_float, **extra)
        static.quantize(clone, config, calibration=context.calibration, target=context.target,
                        cache=context.cache, quiet=context.quiet, pass_name="quantize", workers=workers)  # fmt: skip
        return clone

    return quantize


@dataclasses.dataclass(frozen=True)
class MixedConfig:
    """Options of the mixed pass."""

    # auto: offered on transformers. The screen quantizes what a dynamic reader really reads (a
    # static DQ's output where the producer is INT8), and only MatMul/Gemm groups may be dynamic.
    dynamic_int8: str = option("auto", "offer dynamic INT8 (run-time activation scales) per MatMul: true, false, or auto (where the "
                               "quantize engine's activations=auto picks dynamic: transformers)")
    default_min_cosine: float = option(0.99, "budget when the context gives no min_cosine/max_error/metric")
    plan_feeds: int = option(4, "feeds plans are screened on: the smallest of the first 4x as many evaluation (else calibration) feeds")
    eval_feeds: int = option(32, "evaluation feeds the chosen plan is verified on (a model built for real)")
    time_budget: float = option(300.0, "seconds of planning; then the best verified plan (context/--time-budget wins)")
    latency_runs: int = option(20, "CPU: interleaved timing runs per plan (0: no latency, no speed guard)")
    calibration_method: str = option("mse", "activation ranges for INT8 (the quantize pass option)")
    sqnr_feeds: int = option(4, "feeds for the cheap SQNR estimate (0: off)")
    speed_guard: bool = option(True, "CPU: put INT8 regions measured slower than float back to float")
    plots: bool = option(True, "attach sensitivity and frontier plots (matplotlib) to the report")

    def __post_init__(self) -> None:
        """Check the option values (ValueError naming the option)."""
        if not -1.0 <= self.default_min_cosine <= 1.0:
            raise ValueError(f"default_min_cosine must be in [-1, 1], got {self.default_min_cosine}")
        for name in ("plan_feeds", "eval_feeds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dynamic_int8 not in ("auto", "true", "false"):
            raise ValueError(f"dynamic_int8 must be auto, true or false, got {self.dynamic_int8!r}")
        if not self.time_budget > 0:
            raise ValueError(f"time_budget must be > 0 seconds, got {self.time_budget}")
        if self.latency_runs < 0 or self.sqnr_feeds < 0:
            raise ValueError("latency_runs and sqnr_feeds must be >= 0")
        if self.calibration_method not in ("minmax", "percentile", "entropy", "mse"):
            raise ValueError(f"calibration_method must be minmax, percentile, entropy or mse, got {self.calibration_method!r}")


@register("mixed")
class MixedPass(OptPass[MixedConfig]):
    """Choose INT8 / FP16 / FP32 per quantizable node under an accuracy budget, measured in ORT.

    Changes: as the quantize pass for INT8 nodes (QDQ pairs, int8 weights); FP16 fallbacks as
        the fp16 pass (float16 weights, Casts at boundaries); unnamed nodes get unique names.
    Preserves: graph input/output names, dtypes and shapes.
    Guarantees: the chosen model is built and measured on the evaluation data (or calibration
        data) in onnxruntime; whether it meets the budget is in the report (a note and the
        ``budget_met`` count), with every plan tried (the frontier: screened and built ones,
        and the best screened plan the time budget cut off before verification), the number
        of screening trials and model runs, and the planning time. Within the time budget
        (the set-up -- calibration, one full-INT8 build -- comes first and is not cut) it
        returns the best verified plan, at worst the FP32 model, and says where it stopped.
        CPU target: the chosen plan was measured no slower than FP32.
    Not exact: error is bounded by the budget when ``budget_met``; otherwise it is the best found.
    """

    config_class = MixedConfig
    needs_calibration = True

    def requires(self, model: ir.Model) -> None:
        """Calibration data is needed (plans are measured on it); opset >= 10 as for quantize."""
        if self.context.calibration is None:
            raise ir.passes.PreconditionError("mixed needs calibration data (--calib)")
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        if opset < 10:  # older ops (Scan-8, Upsample) change meaning under version conversion
            raise ir.passes.PreconditionError(f"mixed needs default opset >= 10, model has {opset}")
        problem = qdq_insert.unsupported_qdq_opset(max(opset, _QDQ_OPSET))
        if problem:
            raise ir.passes.PreconditionError(f"mixed: {problem}")

    def call(self, model: ir.Model) -> PassReport:
        """Measure sensitivity, search, guard speed, verify; see the class docstring."""
        t0 = time.perf_counter()
        report = self.new_report(model)
        cfg, ctx = self.config, self.context
        opset = model.opset_imports.get("", 0)
        # Upgrade once here: the quantize engine would do it per plan.
        if _ir_utils.upgrade_opset(model, _QDQ_OPSET):
            report.count("opset_upgraded")
            report.note(f"default opset upgraded from {opset} to {_QDQ_OPSET} (per-channel QDQ)")
        named = precision_plan.name_nodes(model)
        if named:
            report.count("nodes_named", named)
        budget = sensitivity.Budget.from_bounds(
            min_cosine=ctx.min_cosine, max_error=ctx.max_error, metric=ctx.metric, min_metric=ctx.min_metric,
            default_min_cosine=cfg.default_min_cosine,
        )  # fmt: skip
        deadline = precision_plan.Deadline(ctx.time_budget if ctx.time_budget is not None else cfg.time_budget, t0)
        spec = trials.parse_workers(ctx.workers)
        # Screened on a few small feeds of the data the plan is verified on (evaluation, else
        # calibration): a plan screened on the calibration data the ranges came from is optimistic.
        calib = _screen_feeds(ctx.evaluation or ctx.calibration, cfg.plan_feeds)  # type: ignore[arg-type]
        evald = list((ctx.evaluation or ctx.calibration).take(cfg.eval_feeds))  # type: ignore[union-attr]
        float_model = model.clone()
        quantize = int8_quantizer(ctx, cfg.calibration_method)
        full = quantize(float_model.clone(), frozenset())
        candidates = precision_plan.quantized_nodes(full)
        if not candidates:
            report.skip("no node the quantize pass can lower to INT8")
            return report
        unsafe = frozenset()
        if ctx.target != "cpu":
            table = cached_ranges(float_model, ctx.calibration, None, "minmax", cache=ctx.cache, quiet=ctx.quiet)
            unsafe = frozenset(n.name for n in float16.range_reasons(float_model, table))
        planner = precision_plan.Planner(
            float_model, candidates, quantize, budget, ctx.target, calib, evald, unsafe, cfg.latency_runs
        )
        # The all-float build: the smoothed float model the quantizer starts from (float weights
        # of the switch graph), and how long one real build takes (time kept for verification).
        tb = time.perf_counter()
        smoothed = quantize(float_model.clone(), frozenset(candidates))
        build_s = time.perf_counter() - tb
        offer_dynamic = dynamic_supported() and (
            self.config.dynamic_int8 == "true"
            or (self.config.dynamic_int8 == "auto" and static.activations_mode(float_model) == "dynamic"))
        levels = precision_plan.levels_for(ctx.target, offer_dynamic)
        # Large activations get an If switch (no Q/DQ computed in a float trial): sizes from one
        # float run on the smallest screening feed.
        small = _smallest(calib)
        sizes = screening.activation_sizes(full, smoothed, calib[small])
        screen = screening.build(full, smoothed, candidates, [lv for lv in levels if lv != "fp32"], sizes=sizes)
        del smoothed
        report.count("precision_groups", len(screen.groups))
        hint = {}
        if cfg.sqnr_feeds:
            # A ranking hint only: ranges from the same few screening feeds, not another pass over
            # the whole calibration set (the float model is not the smoothed one calibrated above).
            few = calib[: cfg.sqnr_feeds]
            table = cached_ranges(float_model, Dataset.from_feeds(few), None, cfg.calibration_method, cache=None, quiet=True)
            sqnr = sensitivity.estimate_sqnr(float_model, candidates, table.ranges, few)
            hint = {g: min(sqnr.get(n, math.inf) for n in names) for g, names in screen.groups.items()}
        reference = planner.reference("calibration")
        tr = time.perf_counter()
        planner.reference("evaluation")
        eval_s = time.perf_counter() - tr
        # One verification: a build (calibration is cached: no data pass) and one (slower,
        # quantized) run on every evaluation feed; the search keeps 1 + _REPAIR_STEPS of them.
        reserve = build_s + 1.5 * eval_s
        with _runner(ir.to_proto(screen.model).SerializeToString(), calib, small, reference, budget, spec, screen,
                     report) as runner:  # fmt: skip
            result = precision_plan.bounded_search(
                planner, screen, runner, levels, deadline, hint=hint, reserve=reserve, quiet=ctx.quiet,
                rank_data="rank", repair_steps=_REPAIR_STEPS, dynamic_groups=_dynamic_groups(float_model, screen.groups),
            )  # fmt: skip
        report.count("screening_trials", result.trials)
        fallback, fp32, dynamic = result.sets()
        report.record("accuracy plan", non_int8=len(fallback), fallback=sorted(fallback))
        notes = list(result.progress)
        if result.model is None:  # nothing but FP32 verified: the float model, untouched
            final, model_out = None, float_model
            fallback, fp32, dynamic = frozenset(candidates), frozenset(candidates), frozenset()
        else:
            final, model_out = result.point, result.model
            guarded = fallback
            if cfg.speed_guard and ctx.target == "cpu" and cfg.latency_runs > 0:
                regions = {n.name: _region(n) for n in float_model.graph if n.name in set(candidates)}
                cost = (2 + len(set(regions.values()))) * (build_s + 1.0)
                if deadline.left() > cost and not dynamic:
                    guarded, guard_notes = planner.speed_guard(fallback, regions)
                    notes += guard_notes
                elif not planner._confirm_faster(model_out):
                    guarded = frozenset(candidates)
                    notes.append("time budget: no time for the per-region speed guard; the plan was timed "
                                 "against FP32, was not faster, and the model stays FP32")  # fmt: skip
            if guarded == frozenset(candidates):
                final, model_out = None, float_model
                fallback, fp32, dynamic = guarded, guarded, frozenset()
            elif guarded != fallback:
                point, built = planner.evaluate("chosen", guarded, fp32 & guarded, data="evaluation", timed=False)
                if point.measurement.ok:
                    final, model_out, fallback = point, built, guarded
                else:
                    notes.append("the speed guard's plan missed the budget on the evaluation data: the verified plan is kept")
        if final is None:  # the input model against itself: a metric budget may still miss
            ref = planner.reference("evaluation")
            final = precision_plan.PlanPoint("FP32 (input model)", fallback, fp32, sensitivity.measure(ref, ref, budget),
                                             "evaluation", _io.serialized_size(float_model), planner.fp32_ms)  # fmt: skip
        planner.frontier.append(dataclasses.replace(final, label="chosen"))
        model.graph = model_out.graph  # opset imports live on the graph in onnx-ir
        if result.stopped_early:  # the steps reached follow in the next notes
            notes.insert(0, f"time budget of {deadline.seconds:g} s reached: stopped early after "
                            f"{result.trials} screening trials; the best verified plan is kept")  # fmt: skip
        for note in notes:
            report.note(note)
        group_of = {n: g for g, names in screen.groups.items() for n in names}
        sens = {n: result.level_loss[levels[0]][group_of[n]] for n in candidates if group_of[n] in result.level_loss[levels[0]]}
        level_sens = {lv: {n: v[group_of[n]] for n in candidates if group_of[n] in v}
                      for lv, v in result.level_loss.items() if lv != levels[0]}  # fmt: skip
        self._report(report, float_model, planner, sens, level_sens, (fallback, fp32, dynamic), final, budget)
        report.note(f"planning took {time.perf_counter() - t0:.2f} s, {result.trials} screening trials "
                    f"on {runner.spec.describe()} and {planner.runs} real model runs")  # fmt: skip
        summary = next(r for r in report.records if r["item"] == SUMMARY)
        summary.update(model_runs=planner.runs, screening_trials=result.trials, accuracy_plan_non_int8=len(fallback),
                       stopped_early=result.stopped_early, groups=len(screen.groups),
                       groups_measured=result.groups_measured, workers=runner.spec.describe())  # fmt: skip
        return report

    def _report(self, report, float_model, planner, sens, level_sens, plan_sets, final, budget) -> None:
        fallback, fp32, dynamic = plan_sets
        ops = {n.name: n.op_type for n in float_model.graph}
        precision = {}
        reasons = {"int8": "INT8 within budget", "int8-dynamic": "static INT8 over budget; dynamic INT8",
                   "fp16": "INT8 over budget; FP16 fallback"}  # fmt: skip
        for name in planner.candidates:
            p = precision_plan.precision_of(name, fallback, fp32, planner.target, dynamic)
            precision[name] = p
            if p != "fp32":  # a change; FP32 nodes are counted in the summary record
                report.count(f"{p.replace('-', '_')}_nodes")
            reason = reasons.get(p) or (
                "FP16 over budget or unsafe range" if planner.target != "cpu" else "INT8 over budget or slower"
            )
            extra = {f"{lv.replace('-', '_')}_sensitivity": _rounded(v[name]) for lv, v in level_sens.items() if name in v}
            report.record(name, op=ops.get(name, ""), precision=p, sensitivity=_rounded(sens.get(name)), reason=reason,
                          **extra)  # fmt: skip
        frontier = [p.to_json() for p in planner.frontier]
        for i, row in enumerate(frontier):
            report.record(f"plan {i}", **row)
        met = final.measurement.ok
        per_precision = collections.Counter(precision.values())
        report.record(
            SUMMARY, budget_met=bool(met), int8_nodes=per_precision["int8"], int8_dynamic_nodes=per_precision["int8-dynamic"],
            fp16_nodes=per_precision["fp16"], fp32_nodes=per_precision["fp32"],
        )  # fmt: skip
        report.note(
            f"budget {budget.describe()}: {'met' if met else 'NOT met'} on {len(planner.evald)} evaluation feeds "
            f"(cosine {final.measurement.cosine:.6f}, max abs {final.measurement.max_abs:.4g}); "
            f"{len(fallback)} of {len(planner.candidates)} quantizable nodes not INT8"
        )
        if planner.fp32_ms is not None and final.latency_ms is not None:
            report.note(f"CPU latency: FP32 {planner.fp32_ms:.3f} ms, chosen {final.latency_ms:.3f} ms")
        if self.config.plots:
            budget_loss = 1.0 - budget.min_cosine if budget.min_cosine is not None else budget.max_error
            measured = {n: v for n, v in sens.items() if math.isfinite(v)}
            if measured:
                report.figures.append(mixed_plots.sensitivity_figure(measured, precision, budget_loss))
            report.figures.append(mixed_plots.frontier_figure(frontier, budget_loss))


def _rounded(x: float | None) -> float | None:
    """8 significant decimals; None for not measured; inf stays (a node that makes non-finite outputs)."""
    return None if x is None else (round(x, 8) if math.isfinite(x) else x)


def _screen_feeds(data, n: int) -> list[dict]:
    """The ``n`` smallest feeds (by elements) of the first ``4 n``: screening cost follows size."""
    pool = list(data.take(4 * n))
    order = sorted(range(len(pool)), key=lambda i: (sum(np.asarray(v).size for v in pool[i].values()), i))
    return [pool[i] for i in sorted(order[:n])]


def _smallest(feeds: list[dict]) -> int:
    """Index of the feed with the fewest elements (the first of equals)."""
    return min(range(len(feeds)), key=lambda i: (sum(np.asarray(v).size for v in feeds[i].values()), i))


@contextlib.contextmanager
def _runner(model_bytes, feeds, small, reference, budget, spec, screen, report):
    """Trials in this process when the whole screening would take a few seconds, else on ``spec``.

    One trial is timed in this process; a pool (spawn start, ~1-2 s per worker) pays off only
    when the estimated serial screening time is well above its start-up. Every mode runs the same
    single-threaded sessions, so the plan does not depend on this choice.
    """
    # "rank": the smallest screening feed alone, for the per-group sensitivity trials (a ranking:
    # one feed, a quarter of a screening trial's cost on det's page-sized images).
    data = {"screen": feeds, "rank": [feeds[small]]}
    refs = {"screen": reference, "rank": [reference[small]]}
    local = trials.Runner(model_bytes, data, refs, budget, trials.WorkerSpec())
    runner = local
    try:
        if spec.kind == "ray" or spec.count > 1:
            t = time.perf_counter()
            local.measure("screen", [screen.feed({})])
            estimate = (time.perf_counter() - t) * 1.5 * (len(screen.groups) + 16)
            if spec.kind == "ray" or estimate > _POOL_MIN_SECONDS:
                local.close()
                runner = trials.Runner(model_bytes, data, refs, budget, spec)
                if runner.note:
                    report.note(runner.note)
        yield runner
    finally:
        runner.close()
        local.close()


def _dynamic_groups(model: ir.Model, groups: dict[str, list[str]]) -> frozenset[str]:
    """Groups whose every node is a MatMul/Gemm the engine can give run-time activation scales."""
    from onnxopt.quant import dynamic

    nodes = {n.name: n for n in model.graph}
    return frozenset(
        g for g, names in groups.items()
        if all(n in nodes and nodes[n].op_type in ("MatMul", "Gemm") and dynamic.can_quantize(nodes[n]) is None
               for n in names)
    )  # fmt: skip


def _region(node: ir.Node) -> str:
    """Region key for the CPU speed check: op type, with depthwise convolutions apart."""
    if node.op_type == "Conv" and node.attributes.get_int("group", 1) > 1:
        return "Conv (depthwise/grouped)"
    return node.op_type
