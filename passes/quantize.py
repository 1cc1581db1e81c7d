"""Static INT8 quantization in QDQ form, from calibration data.

Algebra: every quantized tensor x is replaced by ``DQ(Q(x)) = s * (clip(round(x / s) + z) - z)``,
an error of at most ``s / 2`` inside the calibrated range. onnxruntime (CPU) and TensorRT fuse
``DQ -> op -> Q`` into integer kernels, where ``sum(q_x * q_w)`` is accumulated in int32 together
with the int32 bias (scale ``s_x * s_w``), so the fused model computes what the QDQ model says.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Literal

import onnx.shape_inference
import onnx_ir as ir
import onnx_ir.passes.common as ir_common

from onnxopt import _ir_utils
from onnxopt import io as _io
from onnxopt.config import option
from onnxopt.pass_base import OptPass, PassReport, register
from onnxopt.quant import bias_correction as quant_improve
from onnxopt.quant import calibration, smooth
from onnxopt.quant import deploy_check as quant_report
from onnxopt.quant import insert as qdq_insert
from onnxopt.quant import scales as quant_math
from onnxopt.quant.calibration import CalibrationTable
from onnxopt.quant.rules import RULES, SUPPORTED_OPS, QuantPlan, RuleContext
from onnxopt.runtime import environment
from onnxopt.runtime import sessions as runtime

__all__ = ["QuantizeConfig", "QuantizePass"]

logger = logging.getLogger(__name__)

_MIN_OPSET = 13  # QuantizeLinear/DequantizeLinear with per-channel `axis`
_RANGE_CHECK_FEEDS = 2  # calibration feeds that decide reduce_range=auto
_SMOOTH_MIN_RATIO = 4.0  # smoothing: max / median per-channel range that counts as outlier channels
_SMOOTH_FEEDS = 4  # calibration feeds whose per-channel ranges decide smoothing
_MAX_ACCUMULATED = 400  # tensors compared between float and INT8 runs (accumulated SQNR)
_REDUCED_NOTE = ("reduce_range on (7-bit weights): this CPU has no VNNI, and onnxruntime's u8s8 kernels "
                 "saturate without it; pass reduce_range=false for a VNNI or ARM deployment machine")
_FULL_NOTE = ("reduce_range off (8-bit weights): onnxruntime's u8s8 kernels are exact on this CPU ({how}); "
              "on an x86 CPU without VNNI they sum product pairs in int16 and saturate with 8-bit weights: "
              "pass reduce_range=true (or quantize there) for such a deployment machine")


def _small_feeds(feeds: list) -> bool:
    return all(sum(a.nbytes for a in f.values()) <= (1 << 20) for f in feeds)


def _tensor_types(model: ir.Model) -> tuple[dict[str, ir.DataType], dict[str, int]]:
    """Element type and rank (where known) of each main-graph tensor, inferred on a clone.

    The model is not touched.
    """
    typed = model.clone()
    try:
        _ir_utils.infer_types(typed)
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError) as err:  # best effort
        logger.debug("type inference failed before quantization: %s", err)
    values = ir.convenience.create_value_mapping(typed.graph)
    dtypes = {n: v.type.dtype for n, v in values.items() if isinstance(v.type, ir.TensorType)}
    ranks = {n: len(v.shape) for n, v in values.items() if v.shape is not None}
    return dtypes, ranks


def _drop_inner_value_info(model: ir.Model) -> None:
    """Untype the main graph's inner values: no value_info in the file (1.5 % of INT8 PP-OCR det).

    onnxruntime and the checker infer them; graph inputs, outputs and initializers keep theirs.
    """
    io_values = {*model.graph.inputs, *model.graph.outputs}
    for node in model.graph:
        for value in node.outputs:
            if value not in io_values:
                value.type, value.shape = None, None


def _check_ops(field: str, ops: frozenset[str]) -> None:
    unknown = sorted(ops - SUPPORTED_OPS)
    if unknown:
        raise ValueError(
            f"unknown op type {unknown[0]!r} in {field}; supported: {', '.join(sorted(SUPPORTED_OPS))}"
        )


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
    """Options of the quantize pass."""

    calibration_method: Literal["minmax", "percentile", "entropy", "mse"] = option(
        "mse", "how activation ranges are chosen from calibration data (mse: the clipping with the least squared error)"
    )
    percentile: float = option(99.999, "for calibration_method=percentile: share (%) of |x| kept unclipped")
    calib_table: str = option("", "path of a saved calibration table (JSON) to use instead of data")
    save_calib_table: str = option("", "write the calibration table used to this JSON path (reuse: calib_table)")
    activation_type: Literal["uint8", "int8"] = option("uint8", "integer type of activations")
    symmetric_activations: bool = option(False, "zero point at the middle of the activation type")
    per_tensor: bool = option(False, "one scale per weight tensor instead of per output channel")
    reduce_range: Literal["auto", "true", "false"] = option(
        "auto", "7-bit weights (activations keep 8 bits); auto, for target cpu on a CPU without VNNI: "
        "whichever of 8/7-bit weights is measured closer to FP32 through onnxruntime's integer kernels"
    )
    include_ops: frozenset[str] = option(frozenset(), "quantize only these op types (empty: all supported)")
    exclude_ops: frozenset[str] = option(frozenset(), "op types kept float")
    include_nodes: frozenset[str] = option(frozenset(), "quantize only these node names (empty: all)")
    exclude_nodes: frozenset[str] = option(frozenset(), "node names kept float")
    mask_threshold: float = option(
        1e4, "activations with max |x| at or above this (attention masks: -1e4, -1e9, -3.4e38) stay float"
    )
    bias_correction: bool = option(False, "shift int32 biases by the mean output error measured on calibration data")
    smooth_quant: float = option(
        0.5, "SmoothQuant alpha in (0, 1]: activations with outlier channels (largest channel range "
        f">= {_SMOOTH_MIN_RATIO:g}x the median) after a LayerNorm or a Conv hand them to the MatMul/Gemm/Conv "
        "weights that read them (0: off)"
    )
    sqnr_samples: int = option(4, "calibration feeds used for the layer-wise SQNR report (0: off)")
    latency_runs: int = option(10, "runs for the FP32 vs INT8 CPU latency check (0: off)")

    def __post_init__(self) -> None:
        _check_ops("include_ops", self.include_ops)
        _check_ops("exclude_ops", self.exclude_ops)
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
        if self.mask_threshold <= 0:
            raise ValueError(f"mask_threshold must be > 0, got {self.mask_threshold}")
        if not 0.0 <= self.smooth_quant <= 1.0:
            raise ValueError(f"smooth_quant must be in [0, 1] (0: off), got {self.smooth_quant}")
        if self.sqnr_samples < 0 or self.latency_runs < 0:
            raise ValueError("sqnr_samples and latency_runs must be >= 0")


@register("quantize")
class QuantizePass(OptPass[QuantizeConfig]):
    """Static INT8 QDQ: int8 per-channel weights, uint8/int8 activations, int32 biases.

    Changes: inserts QuantizeLinear/DequantizeLinear pairs on activations of Conv, ConvTranspose,
        MatMul, Gemm, Add, Mul, Concat, pooling and data-movement ops; replaces their float
        weights by int8 initializers (``<W>_quantized``) and biases by int32; upgrades the default
        opset to 13 when it is lower (onnx.version_converter). LayerNorm outputs with outlier
        channels are smoothed first (SmoothQuant: LayerNorm gamma/beta, or an inserted float Mul,
        divided by per-channel factors that multiply the rows of the MatMul/Gemm weights reading
        them); so are Conv (-> Relu) -> Conv pairs (cross-layer equalisation).
    Preserves: graph input/output names, dtypes and shapes; dynamic dimensions; subgraphs (their
        nodes stay float, with the reason in the report); Softmax/LayerNorm/GELU stay float.
    Guarantees: never quantizes a tensor whose range reaches ``mask_threshold`` (additive attention
        masks); every node left float has a reason in ``report.skipped``; layer-wise SQNR (worst
        first) in ``report.records``; a note when INT8 is measured slower than FP32 on CPU.
    Not exact: output error ~ the output scale; tests use atol = 2 x output scale.
    """

    config_class = QuantizeConfig
    needs_calibration = True

    def requires(self, model: ir.Model) -> None:
        """Check the opset, the node names in the config and that calibration is available."""
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        if opset < 10:
            raise ir.passes.PreconditionError(f"quantize needs default opset >= 10, model has {opset}")
        problem = qdq_insert.unsupported_qdq_opset(max(opset, _MIN_OPSET))
        if problem:
            raise ir.passes.PreconditionError(f"quantize: {problem}")
        names = {n.name for n in model.graph.all_nodes()}
        for field in ("include_nodes", "exclude_nodes"):
            missing = sorted(getattr(self.config, field) - names)
            if missing:
                raise ir.passes.PreconditionError(f"{field}: no node named {missing[0]!r} in the model")
        if not self.config.calib_table and self.context.calibration is None:
            raise ir.passes.PreconditionError("quantize needs calibration data (--calib) or calib_table")

    def call(self, model: ir.Model) -> PassReport:
        """Quantize ``model`` in place; see the class docstring."""
        report = self.new_report(model)
        opset = model.opset_imports.get("", 0)
        if _ir_utils.upgrade_opset(model, _MIN_OPSET):
            report.count("opset_upgraded")
            report.note(f"default opset upgraded from {opset} to {_MIN_OPSET} for per-channel QDQ")
        table, float_readers = self._calibrate(model, report)
        float_model = model.clone() if self.context.calibration is not None else None
        if self.config.save_calib_table:
            table.save(self.config.save_calib_table)
        dtypes, ranks = _tensor_types(model)
        ctx = RuleContext(table.ranges, self.config.per_tensor, self.config.mask_threshold, dtypes=dtypes, ranks=ranks)
        plans = self._plans(model, ctx, report, float_readers)
        if not plans:
            return report
        reduce_range = self._reduce_range(report)
        reduced = model.clone() if reduce_range is None and float_model is not None else None
        result = self._apply(model, plans, table, bool(reduce_range), float_readers)
        if reduced is not None:
            reduced_plans = self._plans(reduced, ctx, self.new_report(reduced), float_readers)  # skips reported
            reduced_result = self._apply(reduced, reduced_plans, table, True, float_readers)
            if self._reduced_is_closer(float_model, model, reduced, report):
                model.graph, plans, result = reduced.graph, reduced_plans, reduced_result
            del reduced
        ir_common.RemoveUnusedNodesPass()(model)
        _drop_inner_value_info(model)
        if self.config.bias_correction and float_model is not None:
            self._bias_correction(float_model, model, report)
        for op, n in collections.Counter(p.node.op_type for p in plans).items():
            report.count(f"quantized_{op}", n)
        report.count("int8_weights", result.weights)
        report.count("int32_biases", result.biases)
        report.count("relu_clip_absorbed", result.absorbed)
        report.count("activations_quantized", len(result.dequantized))
        if float_model is not None:
            self._measure(float_model, model, result, report)
        return report

    def _bias_correction(self, float_model: ir.Model, model: ir.Model, report: PassReport) -> None:
        """Shift biases by the measured mean output error; kept only if the output error drops."""
        feeds = list(self.context.calibration)
        biases = {v: v.const_value for v in model.graph.initializers.values()
                  if v.const_value is not None and v.const_value.dtype == ir.DataType.INT32}
        ref = quant_report.run_flat(float_model, feeds[:1], "disable")
        before = quant_math.relative_l2(ref, quant_report.run_flat(model, feeds[:1], "disable"))
        shifts = quant_improve.bias_correction(float_model, model, feeds)
        after = quant_math.relative_l2(ref, quant_report.run_flat(model, feeds[:1], "disable"))
        report.record("bias_correction", rel_l2_before=round(before, 6), rel_l2_after=round(after, 6),
                      kept=after < before)
        if after < before:
            report.count("biases_corrected", len(shifts))
            return
        for value, tensor in biases.items():
            value.const_value = tensor
        report.note(f"bias correction not kept: output error on a calibration feed rose from "
                    f"{before:.3g} to {after:.3g} relative L2")

    def _calibrate(self, model: ir.Model, report: PassReport) -> tuple[CalibrationTable, frozenset[str]]:
        """Smooth outlier channels, then calibrate; the table and the inserted float Mul nodes.

        Smoothing decides on the first calibration feeds (per-channel max |x|), then the whole
        calibration set is measured on the smoothed model.
        """
        cfg = self.config
        done = None
        if cfg.calib_table:
            table = CalibrationTable.load(cfg.calib_table)
            if table.smoothing:
                done = smooth.smooth(model, None, scales=table.smoothing)
                report.note(f"SmoothQuant scales of {len(table.smoothing)} tensors applied from the calibration table")
        else:
            if cfg.smooth_quant:
                feeds = self.context.calibration.take(_SMOOTH_FEEDS)
                done = smooth.smooth(model, feeds, cfg.smooth_quant, min_ratio=_SMOOTH_MIN_RATIO)
            method = cfg.calibration_method
            kw = {"percentile": cfg.percentile} if method == "percentile" else {}
            table = calibration.cached_ranges(self.context, model, None, method, **kw)
            if done is not None and done.scales:
                table = dataclasses.replace(table, smoothing=done.scales)
        if done is None:
            return table, frozenset()
        for rec in done.records:
            report.record(f"smooth:{rec.pop('tensor')}", **rec)
        for reason in done.skipped:
            report.note(f"SmoothQuant: {reason}")
        report.count("smoothed_activations", len(done.scales))
        return table, frozenset(done.inserted)

    def _apply(self, model: ir.Model, plans: list[QuantPlan], table: CalibrationTable, reduce_range: bool,
               float_readers: frozenset[str]):
        return qdq_insert.apply_plans(
            model,
            plans,
            table.ranges,
            qtype=self.config.activation_type,
            symmetric=self.config.symmetric_activations,
            reduce_range=reduce_range,
            pass_name=self.name,
            float_readers=float_readers,
        )

    def _reduce_range(self, report: PassReport) -> bool | None:
        """Return the config's choice, or auto's; None where auto must measure (target cpu, saturating kernels).

        Every outcome is recorded (``reduce_range`` record) with the CPU it was decided on: its
        model, cores and ISA flags, and how onnxruntime's u8 x s8 kernels multiply-add there.
        """
        cpu = environment.cpu_info()
        seen = {"cpu": cpu.describe(), "int8_dot": cpu.int8_dot}
        if self.config.reduce_range != "auto":
            chosen = self.config.reduce_range == "true"
            report.record("reduce_range", reduce_range=chosen, how="set in the config", **seen)
            return chosen
        if self.context.target != "cpu":
            report.record("reduce_range", reduce_range=False, how=f"auto, target {self.context.target}", **seen)
            return False
        if not quant_math.int8_dot_saturates():
            report.record("reduce_range", reduce_range=False, how="auto: integer kernels do not saturate here", **seen)
            report.note(_FULL_NOTE.format(how=cpu.int8_dot))
            return False
        if self.context.calibration is None:  # nothing to measure with: the safe choice
            report.record("reduce_range", reduce_range=True, how="auto: saturating kernels, no data to measure", **seen)
            report.note(_REDUCED_NOTE)
            return True
        return None

    def _reduced_is_closer(self, float_model: ir.Model, full: ir.Model, reduced: ir.Model, report: PassReport) -> bool:
        """Whether 7-bit weights give outputs closer to FP32 than 8-bit ones, as onnxruntime deploys them.

        Without VNNI, onnxruntime's u8 x s8 kernels add pairs of products in int16 and saturate
        (the QDQ graph's arithmetic does not); 7-bit weights avoid that at the cost of a coarser
        weight grid. Which costs more depends on the model, so both are run on the first
        calibration feeds with onnxruntime's optimisations on (the fused integer kernels) and
        compared with FP32. The measurement and the CPU it ran on are recorded.
        """
        feeds = list(self.context.calibration.take(_RANGE_CHECK_FEEDS))
        ref = quant_report.run_flat(float_model, feeds, "all")
        err_full = quant_math.relative_l2(ref, quant_report.run_flat(full, feeds, "all"))
        err_reduced = quant_math.relative_l2(ref, quant_report.run_flat(reduced, feeds, "all"))
        chosen = err_reduced < err_full
        cpu = environment.cpu_info()
        report.record("reduce_range", reduce_range=chosen, how="auto: measured through this CPU's integer kernels",
                      cpu=cpu.describe(), int8_dot=cpu.int8_dot, rel_l2_8bit_weights=round(err_full, 6),
                      rel_l2_7bit_weights=round(err_reduced, 6), feeds=len(feeds))
        verdict = "on (7-bit weights)" if chosen else "off (8-bit weights)"
        report.note(f"reduce_range {verdict}: this CPU lacks VNNI; as deployed, output error vs FP32 on a "
                    f"calibration feed is {err_full:.3g} relative L2 with 8-bit weights, {err_reduced:.3g} with 7-bit")
        return chosen

    def _plans(self, model: ir.Model, ctx: RuleContext, report: PassReport, float_readers: frozenset[str]) -> list[QuantPlan]:
        cfg = self.config
        plans = []
        for node in model.graph:
            if node.op_type not in RULES or node.domain not in ("", "ai.onnx"):
                continue
            label = node.name or node.op_type
            if node.name in float_readers:
                report.skip(f"{node.op_type}: SmoothQuant scaling, kept float (it reads the float LayerNorm output)")
                continue
            if (cfg.include_ops and node.op_type not in cfg.include_ops) or node.op_type in cfg.exclude_ops:
                report.skip(f"{node.op_type}: op type excluded by config")
                continue
            if (cfg.include_nodes and node.name not in cfg.include_nodes) or node.name in cfg.exclude_nodes:
                report.skip(f"{node.op_type}: node excluded by config")
                continue
            plan = RULES[node.op_type](node, ctx)
            if plan is None:
                reason = ctx.reasons.get(label, "not applicable")
                report.skip(f"{node.op_type}: {reason}")
                if "attention mask" in reason:
                    report.note(f"{label}: {reason}")
                continue
            plans.append(plan)
        for node in model.graph.all_nodes():
            if node.graph is not model.graph and node.op_type in RULES:
                report.skip(f"{node.op_type}: inside a subgraph (If/Loop/Scan body), left float")
        return plans

    def _measure(self, float_model: ir.Model, model: ir.Model, result: qdq_insert.InsertResult, report: PassReport) -> None:
        data = self.context.calibration
        cfg = self.config
        if cfg.sqnr_samples:
            feeds = list(data.take(cfg.sqnr_samples))
            params = {k: (float(p.scale), p.zero) for k, p in result.params.items()}
            local = quant_report.local_sqnr(float_model, params, cfg.activation_type, feeds)
            accumulated: dict[str, float] = {}
            small_model = _io.model_nbytes(float_model) <= runtime._IN_MEMORY_LIMIT  # both sessions live at once
            if small_model and _small_feeds(feeds) and len(result.dequantized) <= _MAX_ACCUMULATED:
                live = {k: v for k, v in result.dequantized.items() if k in local}
                rows = quant_report.layer_sqnr(float_model, model, live, feeds)
                accumulated = {str(r["tensor"]): float(r["sqnr_db"]) for r in rows}
            else:
                report.note("layer-wise SQNR is local only (model or feeds too large to hold both models' tensors)")
            order = sorted(local, key=lambda k: (accumulated.get(k, local[k]), local[k]))
            for name in order:
                fields = {"sqnr_db": local[name]}
                if name in accumulated:
                    fields["accumulated_sqnr_db"] = accumulated[name]
                report.record(name, **fields)
        if cfg.latency_runs:
            feed = next(iter(data))
            fp32, int8 = quant_report.latency_ms([float_model, model], feed, runs=cfg.latency_runs)
            report.record("latency", fp32_ms=round(fp32, 3), int8_ms=round(int8, 3), ratio=round(int8 / fp32, 3),
                          cpu=environment.cpu_info().describe())
            if int8 > fp32:
                report.note(
                    f"INT8 is slower than FP32 on CPU (1 thread, ORT_ENABLE_ALL): {int8:.2f} ms vs "
                    f"{fp32:.2f} ms ({int8 / fp32:.2f}x); consider the mixed recipe"
                )
