"""Mixed precision: INT8 where the budget allows, FP16/FP32 fallback where it does not.

Per quantizable node the plan picks INT8, FP16 (cuda/tensorrt targets) or FP32, so that the
model's outputs meet the accuracy budget of the context (``--min-cosine``, ``--max-error``, or a
Python metric with ``min_metric``) with as few fallbacks as the search finds; on the CPU target
INT8 regions measured slower than float are put back to float, and if no INT8 plan beats FP32
the model stays FP32. The search is :mod:`onnxopt.quant.planner`; the INT8 models are built by
:func:`onnxopt.quant.static.quantize` (the quantize pass's engine, handed to the planner as a
callable by :func:`int8_quantizer`), FP16 by :mod:`onnxopt.quant.float16`.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time

import onnx_ir as ir

from onnxopt import _ir_utils
from onnxopt.config import option
from onnxopt.context import PassContext
from onnxopt.pass_base import OptPass, PassReport, register
from onnxopt.quant import float16, sensitivity, static
from onnxopt.quant import insert as qdq_insert
from onnxopt.quant import planner as precision_plan
from onnxopt.quant.calibration import cached_ranges
from onnxopt.report import plots as mixed_plots

__all__ = ["MixedConfig", "MixedPass", "int8_quantizer"]

logger = logging.getLogger(__name__)

# The record with the plan's metrics (budget met, model runs, nodes per precision): metrics are
# records, counts are changes.
SUMMARY = "summary"

_QDQ_OPSET = static.MIN_OPSET  # QuantizeLinear/DequantizeLinear with per-channel axis


def int8_quantizer(context: PassContext, calibration_method: str = "mse") -> precision_plan.QuantizeFn:
    """Build the planner's quantize callable: static INT8 of a float clone, given names kept float.

    Options as the quantize pass with ``sqnr_samples=0, latency_runs=0`` (plans are measured by
    the planner) and ``exclude_nodes`` set to the names kept float. Data, target and progress
    bars come from ``context``; the calibration table is cached in ``context.cache``, so every
    plan reuses one calibration.
    """
    base = static.QuantizeConfig(sqnr_samples=0, latency_runs=0, calibration_method=calibration_method)  # type: ignore[arg-type]

    def quantize(clone: ir.Model, keep_float: frozenset[str]) -> ir.Model:
        config = dataclasses.replace(base, exclude_nodes=keep_float)
        static.quantize(clone, config, calibration=context.calibration, target=context.target,
                        cache=context.cache, quiet=context.quiet, pass_name="quantize")  # fmt: skip
        return clone

    return quantize


@dataclasses.dataclass(frozen=True)
class MixedConfig:
    """Options of the mixed pass."""

    default_min_cosine: float = option(0.99, "budget when the context gives no min_cosine/max_error/metric")
    plan_feeds: int = option(8, "calibration feeds each plan and each sensitivity run is measured on")
    eval_feeds: int = option(32, "evaluation feeds the chosen plan is verified on")
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
        ``budget_met`` count), with every plan tried (the frontier), the number of model runs
        and the planning time. CPU target: the chosen plan was measured no slower than FP32.
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
        calib = list(ctx.calibration.take(cfg.plan_feeds))  # type: ignore[union-attr]
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
        sens = sensitivity.node_sensitivity(
            float_model, candidates, lambda m, names: quantize(m, frozenset(candidates) - names),
            calib, budget, cache=ctx.cache, quiet=ctx.quiet, key="int8",
        )  # fmt: skip
        planner.runs += len(candidates)
        order = sorted(candidates, key=lambda n: -sens[n].loss)
        sens16: dict[str, sensitivity.Measurement] = {}
        if ctx.target != "cpu":  # FP16 fallbacks: which of them need FP32 is ranked by FP16 loss

            def lower16(m: ir.Model, names: frozenset[str]) -> ir.Model:
                float16.convert(m, [n for n in m.graph if n.name in names], pass_name=self.name)
                return m

            sens16 = sensitivity.node_sensitivity(
                float_model, candidates, lower16, calib, budget, cache=ctx.cache, quiet=ctx.quiet, key="fp16"
            )  # fmt: skip
            planner.runs += len(candidates)
            planner.fp16_order = sorted(candidates, key=lambda n: -sens16[n].loss)
        sqnr = {}
        if cfg.sqnr_feeds:
            table = cached_ranges(
                float_model, ctx.calibration, None, cfg.calibration_method, cache=ctx.cache, quiet=ctx.quiet,  # type: ignore[arg-type]
            )  # fmt: skip
            sqnr = sensitivity.estimate_sqnr(float_model, candidates, table.ranges, calib[: cfg.sqnr_feeds])
            agree = sensitivity.rank_agreement({n: -v for n, v in sqnr.items()}, {n: m.loss for n, m in sens.items()})
            report.note(f"SQNR estimate vs measured sensitivity: Spearman rank correlation {agree:.3f}")
        fallback, fp32 = planner.search(order)
        groups = {n.name: _region(n) for n in float_model.graph if n.name in set(candidates)}
        report.record("accuracy plan", non_int8=len(fallback), fallback=sorted(fallback))
        notes = []
        if cfg.speed_guard:
            fallback, notes = planner.speed_guard(fallback, groups)
        final, model_out = planner.evaluate("chosen", fallback, fp32, data="evaluation")
        model.graph = model_out.graph  # opset imports live on the graph in onnx-ir
        for note in notes:
            report.note(note)
        self._report(report, float_model, planner, (sens, sens16, sqnr), fallback, fp32, final, budget)
        report.note(f"planning took {time.perf_counter() - t0:.2f} s and {planner.runs} model runs")
        summary = next(r for r in report.records if r["item"] == SUMMARY)
        summary.update(model_runs=planner.runs, accuracy_plan_non_int8=len(fallback))
        return report

    def _report(self, report, float_model, planner, scores, fallback, fp32, final, budget) -> None:
        sens, sens16, sqnr = scores
        ops = {n.name: n.op_type for n in float_model.graph}
        precision = {}
        for name in planner.candidates:
            p = precision_plan.precision_of(name, fallback, fp32, planner.target)
            precision[name] = p
            if p != "fp32":  # a change; FP32 nodes are counted in the summary record
                report.count(f"{p}_nodes")
            if p == "int8":
                reason = "INT8 within budget"
            elif p == "fp16":
                reason = "INT8 over budget; FP16 fallback"
            else:
                reason = "FP16 over budget or unsafe range" if planner.target != "cpu" else "INT8 over budget or slower"
            report.record(
                name, op=ops.get(name, ""), precision=p, sensitivity=round(sens[name].loss, 8),
                sqnr_db=round(sqnr[name], 2) if name in sqnr else None, reason=reason,
                **({"fp16_sensitivity": round(sens16[name].loss, 8)} if name in sens16 else {}),
            )  # fmt: skip
        frontier = [p.to_json() for p in planner.frontier]
        for i, row in enumerate(frontier):
            report.record(f"plan {i}", **row)
        met = final.measurement.ok
        per_precision = collections.Counter(precision.values())
        report.record(
            SUMMARY, budget_met=bool(met), int8_nodes=per_precision["int8"],
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
            report.figures.append(mixed_plots.sensitivity_figure({n: m.loss for n, m in sens.items()}, precision, budget_loss))
            report.figures.append(mixed_plots.frontier_figure(frontier, budget_loss))


def _region(node: ir.Node) -> str:
    """Region key for the CPU speed check: op type, with depthwise convolutions apart."""
    if node.op_type == "Conv" and node.attributes.get_int("group", 1) > 1:
        return "Conv (depthwise/grouped)"
    return node.op_type
