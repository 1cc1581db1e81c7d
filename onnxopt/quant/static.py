"""Static INT8 quantization in QDQ form, from calibration data: the engine of the quantize pass.

Algebra: every quantized tensor x is replaced by ``DQ(Q(x)) = s * (clip(round(x / s) + z) - z)``,
an error of at most ``s / 2`` inside the calibrated range. onnxruntime (CPU) and TensorRT fuse
``DQ -> op -> Q`` into integer kernels, where ``sum(q_x * q_w)`` is accumulated in int32 together
with the int32 bias (scale ``s_x * s_w``), so the fused model computes what the QDQ model says.

:func:`quantize` runs these steps, each its own function:

1. upgrade the default opset to 13 (per-channel Q/DQ);
2. smooth outlier channels and calibrate (:func:`_calibrate`);
3. plan each node by its rule (:func:`_plans`);
4. decide 8- or 7-bit weights (:mod:`onnxopt.quant.reduce_range`; on a CPU whose integer
   kernels saturate, both are built and measured in onnxruntime);
5. insert Q/DQ (:func:`_insert`) and drop what the float model no longer needs;
6. optionally correct biases, kept only if measured better
   (:func:`onnxopt.quant.bias_correction.correct_if_better`);
7. measure layer-wise SQNR and FP32 vs INT8 latency
   (:func:`onnxopt.quant.deploy_check.record_sqnr`, :func:`~onnxopt.quant.deploy_check.record_latency`).

Steps 4, 6 and 7 run onnxruntime on calibration feeds; without calibration data (a saved
calibration table) they are left out.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Mapping, MutableMapping
from typing import Any, Literal

import numpy as np
import onnx.shape_inference
import onnx_ir as ir
import onnx_ir.passes.common as ir_common

from onnxopt import _ir_utils
from onnxopt.config import option
from onnxopt.outcome import Outcome
from onnxopt.quant import (
    bias_correction,
    calibration,
    deploy_check,
    range_search,
    reduce_range,
    smooth,
)
from onnxopt.quant import insert as qdq_insert
from onnxopt.quant.calibration import CalibrationTable
from onnxopt.quant.rules import RULES, SUPPORTED_OPS, QuantPlan, RuleContext
from onnxopt.runtime.data import Dataset

__all__ = ["MIN_OPSET", "QuantizeConfig", "quantize"]

logger = logging.getLogger(__name__)

MIN_OPSET = 13  # QuantizeLinear/DequantizeLinear with per-channel `axis`
_SMOOTH_MIN_RATIO = 4.0  # smoothing: max / median per-channel range that counts as outlier channels
_SMOOTH_FEEDS = 4  # calibration feeds whose per-channel ranges decide smoothing
_AUTO_FEEDS = 4  # calibration feeds each candidate model is measured on (calibration_method=auto)


def _check_ops(field: str, ops: frozenset[str]) -> None:
    unknown = sorted(ops - SUPPORTED_OPS)
    if unknown:
        raise ValueError(
            f"unknown op type {unknown[0]!r} in {field}; supported: {', '.join(sorted(SUPPORTED_OPS))}"
        )


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
    """Options of the quantize pass."""

    calibration_method: Literal["minmax", "percentile", "entropy", "mse", "auto"] = option(
        "mse", "how activation ranges are chosen from calibration data (mse: the clipping with the least squared "
        "error; auto: per tensor, the method whose range gives the model output closest to FP32, measured)"
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
        """Check the option values (ValueError naming the option)."""
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


def quantize(
    model: ir.Model,
    config: QuantizeConfig,
    *,
    calibration: Dataset | None = None,
    target: str = "cpu",
    cache: MutableMapping[Any, Any] | None = None,
    quiet: bool = True,
    pass_name: str = "quantize",
) -> Outcome:
    """Quantize ``model`` in place to static INT8 QDQ; the steps are in the module docstring.

    Args:
        model: the float model (edited in place).
        config: the options.
        calibration: calibration feeds; None only with ``config.calib_table`` (then nothing is
            measured in onnxruntime).
        target: where the model will run (cpu, cuda, tensorrt); it decides ``reduce_range=auto``.
        cache: where calibration tables are cached and looked up (shared by later steps), or None.
        quiet: no progress bars.
        pass_name: the provenance tag of the nodes created.

    Returns:
        What was done: counts of changes, skipped nodes with reasons, records (smoothing,
        reduce_range, bias correction, SQNR per tensor, latency) and notes.

    """
    out = Outcome()
    opset = model.opset_imports.get("", 0)
    if _ir_utils.upgrade_opset(model, MIN_OPSET):
        out.count("opset_upgraded")
        out.note(f"default opset upgraded from {opset} to {MIN_OPSET} for per-channel QDQ")
    table, float_readers = _calibrate(model, config, calibration, cache, quiet, out)
    float_model = model.clone() if calibration is not None else None
    if config.save_calib_table:
        table.save(config.save_calib_table)
    dtypes, ranks = _tensor_types(model)
    rules = RuleContext(table.ranges, config.per_tensor, config.mask_threshold, dtypes=dtypes, ranks=ranks)
    plans = _plans(model, config, rules, float_readers, out)
    if not plans:
        return out
    if config.calibration_method == "auto" and calibration is not None:
        table = _auto_ranges(model, config, table, rules, float_readers, calibration, cache, quiet, pass_name, out)
        if config.save_calib_table:
            table.save(config.save_calib_table)
    seven_bit = reduce_range.decide(config.reduce_range, target, can_measure=calibration is not None, outcome=out)
    if seven_bit is not None:
        result = _insert(model, config, plans, table, seven_bit, float_readers, pass_name)
    else:  # auto on a CPU whose kernels saturate, with data (float_model is set): build both, measure
        reduced = model.clone()  # planned, not yet quantized
        result = _insert(model, config, plans, table, False, float_readers, pass_name)
        reduced_plans = _plans(reduced, config, rules, float_readers, Outcome())  # skips reported above
        reduced_result = _insert(reduced, config, reduced_plans, table, True, float_readers, pass_name)
        feeds = list(calibration.take(reduce_range.CHECK_FEEDS))  # type: ignore[union-attr]
        if reduce_range.reduced_is_closer(float_model, model, reduced, feeds, out):  # type: ignore[arg-type]
            model.graph, plans, result = reduced.graph, reduced_plans, reduced_result
        del reduced
    ir_common.RemoveUnusedNodesPass()(model)
    _drop_inner_value_info(model)
    if config.bias_correction and float_model is not None and calibration is not None:
        bias_correction.correct_if_better(float_model, model, list(calibration), out)
    for op, n in collections.Counter(p.node.op_type for p in plans).items():
        out.count(f"quantized_{op}", n)
    out.count("int8_weights", result.weights)
    out.count("int32_biases", result.biases)
    out.count("relu_clip_absorbed", result.absorbed)
    out.count("activations_quantized", len(result.dequantized))
    if float_model is not None and calibration is not None:
        if config.sqnr_samples:
            feeds = list(calibration.take(config.sqnr_samples))
            deploy_check.record_sqnr(float_model, model, result, config.activation_type, feeds, out)
        if config.latency_runs:
            deploy_check.record_latency(float_model, model, next(iter(calibration)), config.latency_runs, out)
    return out


def _calibrate(
    model: ir.Model,
    config: QuantizeConfig,
    data: Dataset | None,
    cache: MutableMapping[Any, Any] | None,
    quiet: bool,
    out: Outcome,
) -> tuple[CalibrationTable, frozenset[str]]:
    """Smooth outlier channels, then calibrate; the table and the nodes that read a smoothed float tensor.

    With ``calib_table`` the table is loaded and its SmoothQuant scales applied. Otherwise
    smoothing decides on the first calibration feeds (per-channel max |x|), and then the whole
    calibration set is measured on the smoothed model (cached in ``cache``).
    """
    done = None
    if config.calib_table:
        table = CalibrationTable.load(config.calib_table)
        if table.smoothing:
            done = smooth.smooth(model, None, scales=table.smoothing)
            out.note(f"SmoothQuant scales of {len(table.smoothing)} tensors applied from the calibration table")
    else:
        if config.smooth_quant:
            feeds = data.take(_SMOOTH_FEEDS)  # type: ignore[union-attr]
            done = smooth.smooth(model, feeds, config.smooth_quant, min_ratio=_SMOOTH_MIN_RATIO)
        method = config.calibration_method if config.calibration_method != "auto" else "mse"
        # mse keeps the symmetric step t/127 even for uint8 (asymmetric=False): counting uint8's real
        # step on one-sided tensors clips less and was measured worse on the PP-OCR recogniser
        # (lines decoded as FP32: 28 % against 50 %; docs/benchmarks.md).
        kw = calibration.method_options(method, percentile=config.percentile, asymmetric=False)
        if config.calibration_method == "auto":  # every method's table from one pass; mse first
            calibration.cached_methods(model, data, cache=cache, quiet=quiet, percentile=config.percentile)
        table = calibration.cached_ranges(model, data, None, method, cache=cache, quiet=quiet, **kw)
        if done is not None and done.scales:
            table = dataclasses.replace(table, smoothing=done.scales)
    if done is None:
        return table, frozenset()
    for rec in done.records:
        out.record(f"smooth:{rec.pop('tensor')}", **rec)
    for reason in done.skipped:
        out.note(f"SmoothQuant: {reason}")
    out.count("smoothed_activations", len(done.scales))
    return table, frozenset(done.inserted)


def _auto_ranges(
    model: ir.Model, config: QuantizeConfig, base: CalibrationTable, rules: RuleContext,
    float_readers: frozenset[str], data: Dataset, cache: MutableMapping[Any, Any] | None, quiet: bool, pass_name: str, out: Outcome,
) -> CalibrationTable:
    """calibration_method=auto: per-tensor method choice measured in onnxruntime (range_search)."""
    tables = calibration.cached_methods(model, data, cache=cache, quiet=quiet, percentile=config.percentile)

    def build(ranges: Mapping[str, tuple[float, float]]) -> ir.Model:
        trial = model.clone()
        trial_plans = _plans(trial, config, rules, float_readers, Outcome())
        _insert(trial, config, trial_plans, CalibrationTable(ranges, "auto"), False, float_readers, pass_name)
        return trial

    # The smallest of the first calibration feeds: every candidate model runs on them (det's
    # feeds range from 736x928 to 736x4512 pixels, so this is ~3x cheaper than the first four).
    feeds = sorted(data.take(4 * _AUTO_FEEDS), key=lambda f: sum(np.asarray(v).size for v in f.values()))
    feeds = feeds[:_AUTO_FEEDS]
    choice = range_search.choose(tables, build, model, feeds, quiet=quiet)
    out.record("auto_calibration", start=choice.start, whole=choice.whole, changed=choice.changed,
               loss=choice.loss, trials=choice.trials)
    out.note(f"calibration auto: {choice.start} table best whole (output 1-cosine "
             f"{choice.whole[choice.start]:.3g} on {len(feeds)} calibration feeds); {len(choice.changed)} "
             f"tensors took another method's range, 1-cosine {choice.loss:.3g} ({choice.trials} models measured)")
    return dataclasses.replace(choice.table, smoothing=base.smoothing)


def _plans(
    model: ir.Model, config: QuantizeConfig, rules: RuleContext, float_readers: frozenset[str], out: Outcome
) -> list[QuantPlan]:
    """One plan per main-graph node its rule quantizes; every other candidate is a skip with its reason."""
    plans = []
    for node in model.graph:
        if node.op_type not in RULES or node.domain not in ("", "ai.onnx"):
            continue
        label = node.name or node.op_type
        if node.name in float_readers:
            out.skip(f"{node.op_type}: SmoothQuant scaling, kept float (it reads the float LayerNorm output)")
            continue
        if (config.include_ops and node.op_type not in config.include_ops) or node.op_type in config.exclude_ops:
            out.skip(f"{node.op_type}: op type excluded by config")
            continue
        if (config.include_nodes and node.name not in config.include_nodes) or node.name in config.exclude_nodes:
            out.skip(f"{node.op_type}: node excluded by config")
            continue
        plan = RULES[node.op_type](node, rules)
        if plan is None:
            reason = rules.reasons.get(label, "not applicable")
            out.skip(f"{node.op_type}: {reason}")
            if "attention mask" in reason:
                out.note(f"{label}: {reason}")
            continue
        plans.append(plan)
    for node in model.graph.all_nodes():
        if node.graph is not model.graph and node.op_type in RULES:
            out.skip(f"{node.op_type}: inside a subgraph (If/Loop/Scan body), left float")
    return plans


def _insert(
    model: ir.Model,
    config: QuantizeConfig,
    plans: list[QuantPlan],
    table: CalibrationTable,
    seven_bit: bool,
    float_readers: frozenset[str],
    pass_name: str,
) -> qdq_insert.InsertResult:
    """Insert the planned Q/DQ nodes and integer weights (7-bit weights with ``seven_bit``)."""
    return qdq_insert.apply_plans(
        model,
        plans,
        table.ranges,
        qtype=config.activation_type,
        symmetric=config.symmetric_activations,
        reduce_range=seven_bit,
        pass_name=pass_name,
        float_readers=float_readers,
    )


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
