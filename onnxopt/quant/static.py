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

Dynamic INT8 (``activations=dynamic``, ``auto`` on a transformer, or ``dynamic_nodes``): those
MatMul/Gemm nodes get activation scales computed at run time (:mod:`onnxopt.quant.dynamic`) instead
of Q/DQ from the calibration table; with ``activations=dynamic`` nothing else is quantized and
calibration data is needed only for SmoothQuant. Embedding tables become int8 rows
(:mod:`onnxopt.quant.embedding`) in every mode unless ``embeddings=float``.
"""

from __future__ import annotations

import collections
import copy
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
from onnxopt.fusion import activations
from onnxopt.outcome import Outcome
from onnxopt.quant import (
    bias_correction,
    calibration,
    deploy_check,
    dynamic,
    embedding,
    range_search,
    reduce_range,
    smooth,
)
from onnxopt.quant import insert as qdq_insert
from onnxopt.quant.calibration import CalibrationTable
from onnxopt.quant.rules import RULES, SUPPORTED_OPS, QuantPlan, RuleContext
from onnxopt.runtime import environment
from onnxopt.runtime.data import Dataset

__all__ = ["MIN_OPSET", "QuantizeConfig", "quantize"]

logger = logging.getLogger(__name__)

MIN_OPSET = 13  # QuantizeLinear/DequantizeLinear with per-channel `axis`
_SMOOTH_MIN_RATIO = 4.0  # smoothing: max / median per-channel range that counts as outlier channels
_SMOOTH_FEEDS = 4  # calibration feeds whose per-channel ranges decide smoothing
_EMBEDDING_MIN_ROWS = 1024  # smaller Gather tables (position, token type) cost little and stay float
_AUTO_FEEDS = 4  # calibration feeds each candidate model is measured on (calibration_method=auto)
_SPREAD_FEEDS = 8  # calibration feeds whose token spreads decide dynamic_scales=auto (the worst one counts)


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
    activations: Literal["static", "dynamic", "auto"] = option(
        "static", "static: calibrated per-tensor activation scales; dynamic: every MatMul/Gemm with a constant "
        "weight gets scales computed at run time (see dynamic_scales) and nothing else is quantized "
        "(no calibration needed); auto: dynamic for transformers (MatMuls on token sequences, no "
        "convolutions), static otherwise"
    )
    dynamic_nodes: frozenset[str] = option(
        frozenset(), "MatMul/Gemm node names given per-token run-time activation scales (dynamic INT8) "
        "whatever `activations` says"
    )
    dynamic_scales: Literal["auto", "token", "tensor"] = option(
        "auto", "dynamic INT8 activation scales: token: one per token (row), robust to outlier tokens; tensor: one "
        "per tensor (onnxruntime's DynamicQuantizeLinear, fewer ops); auto: per tensor on LayerNorm outputs "
        "(every row normalized); elsewhere (attention context, GELU output) per tensor where no calibration token "
        "exceeds 16x the median token's max |x|, else per token (per token everywhere there without data)"
    )
    embeddings: Literal["int8", "float"] = option(
        "int8", f"Gather tables of >= {_EMBEDDING_MIN_ROWS} rows (word embeddings): int8 with one scale per row, or float"
    )
    rescale_conv_outputs: Literal["auto", "true", "false"] = option(
        "auto", "even out the channels around written-out activations (HardSwish): Conv outputs read by one get "
        "1/s folded into the Conv and a float Mul restoring them (the activation runs in float), and activation "
        "outputs made by a Mul/Div by a constant and read by Convs get 1/s folded into that constant, and every "
        "depthwise Conv input is evened out whatever its spread (PicoDet "
        "layout: worst cosine 0.68 -> 0.97; PP-OCR det/rec: worse, see docs/benchmarks.md); auto, with "
        "calibration data on a model that has such activations: both built, the one whose worst output is "
        "closer to FP32 on calibration feeds (as deployed) is kept"
    )
    smooth_alpha: Literal["per-layer", "fixed"] = option(
        "per-layer", "SmoothQuant alpha: per-layer: for each LayerNorm output, the alpha (0.3-0.9, or no smoothing) "
        "whose simulated INT8 output error on the calibration activations is least; fixed: smooth_quant for all"
    )
    sqnr_samples: int = option(4, "calibration feeds used for the layer-wise SQNR report (0: off)")
    latency_runs: int = option(10, "runs for the FP32 vs INT8 CPU latency check (0: off)")

    @property
    def rescaling(self) -> bool:
        """``rescale_conv_outputs`` once decided (``auto`` is decided by :func:`quantize` before it applies)."""
        return self.rescale_conv_outputs == "true"

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
    workers: Any = None,
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
        workers: a :class:`onnxopt.quant.trials.WorkerSpec` to calibrate on data shards in
            parallel (:func:`onnxopt.quant.calibration.collect_ranges`); None: one session.

    Returns:
        What was done: counts of changes, skipped nodes with reasons, records (smoothing,
        reduce_range, bias correction, SQNR per tensor, latency) and notes.

    """
    kw = {"calibration": calibration, "target": target, "cache": cache, "quiet": quiet, "pass_name": pass_name,
          "workers": workers}
    if config.rescale_conv_outputs == "auto":
        return _rescale_auto(model, config, kw)
    return _quantize(model, config, **kw)


def _rescale_auto(model: ir.Model, config: QuantizeConfig, kw: dict[str, Any]) -> Outcome:
    """``rescale_conv_outputs=auto``: build with and without, keep the one closer to FP32 as deployed.

    Only where it can matter (calibration data, smoothing on, Convs read by a written-out
    activation); the choice is cached per model, so ``mixed``'s many builds decide once. The error
    is the worst output's relative L2 on :data:`_AUTO_FEEDS` calibration feeds, onnxruntime's
    optimisations on (the fused integer kernels).
    """
    off = dataclasses.replace(config, rescale_conv_outputs="false")
    on = dataclasses.replace(config, rescale_conv_outputs="true")
    data, cache = kw["calibration"], kw["cache"]
    if data is None or config.calib_table or not config.smooth_quant or not smooth.has_rescalable_convs(model):
        return _quantize(model, off, **kw)
    key = ("rescale_conv_outputs", calibration.fingerprint(model))
    decided = cache.get(key) if cache is not None else None
    if decided is not None:
        out = _quantize(model, on if decided else off, **kw)
        out.note(f"rescale_conv_outputs=auto: {'on' if decided else 'off'}, as measured on the first build of this model")
        return out
    feeds = list(data.take(_AUTO_FEEDS))
    ref = deploy_check.run_outputs(model, feeds, "all")  # before either build edits it
    rescaled = model.clone()
    out_on = _quantize(rescaled, on, **kw)
    out_off = _quantize(model, off, **kw)
    err_on = deploy_check.worst_relative_l2(ref, deploy_check.run_outputs(rescaled, feeds, "all"))
    err_off = deploy_check.worst_relative_l2(ref, deploy_check.run_outputs(model, feeds, "all"))
    chosen = err_on < err_off
    if chosen:
        model.graph = rescaled.graph  # the opset imports live on the graph
    out = out_on if chosen else out_off
    out.record("rescale_conv_outputs", rescaled=chosen, worst_rel_l2_off=round(err_off, 6),
               worst_rel_l2_on=round(err_on, 6), feeds=len(feeds))
    out.note(f"rescale_conv_outputs=auto: {'on' if chosen else 'off'}; worst output relative L2 to FP32 on "
             f"{len(feeds)} calibration feed(s), as deployed: {err_off:.3g} without, {err_on:.3g} with")
    if cache is not None:
        cache[key] = chosen
    return out


def _quantize(
    model: ir.Model,
    config: QuantizeConfig,
    *,
    calibration: Dataset | None,
    target: str,
    cache: MutableMapping[Any, Any] | None,
    quiet: bool,
    pass_name: str,
    workers: Any,
) -> Outcome:
    """:func:`quantize` with ``rescale_conv_outputs`` decided (true or false)."""
    out = Outcome()
    opset = model.opset_imports.get("", 0)
    if _ir_utils.upgrade_opset(model, MIN_OPSET):
        out.count("opset_upgraded")
        out.note(f"default opset upgraded from {opset} to {MIN_OPSET} for per-channel QDQ")
    mode = _resolve_mode(model, config, out)
    if mode == "dynamic":
        unpacked = dynamic.unpack_attention(model, pass_name)
        if unpacked:
            out.count("attention_unpacked", len(unpacked) // 3)
            out.note(f"{len(unpacked) // 3} fused Attention node(s) split into Q/K/V MatMuls + MultiHeadAttention "
                     "so that their projections are quantized")
    if mode == "dynamic":  # no static activation: ranges are not needed, smoothing may be
        table, float_readers = CalibrationTable({}, "none", 0), _smooth_only(model, config, calibration, cache, out)
    else:
        table, float_readers = _calibrate(model, config, calibration, cache, quiet, out, workers)
    float_model = model.clone() if calibration is not None else None
    if config.save_calib_table:
        table.save(config.save_calib_table)
    dtypes, ranks = _tensor_types(model)
    dynamic_names = _dynamic_names(model, config, mode, out)
    granularity = _scale_granularity(model, config, dynamic_names, calibration, cache, out)
    rules = RuleContext(table.ranges, config.per_tensor, config.mask_threshold, dtypes=dtypes, ranks=ranks)
    plans = [] if mode == "dynamic" else _plans(model, config, rules, float_readers, out, dynamic_names)
    if plans:
        if config.calibration_method == "auto" and calibration is not None:
            table = _auto_ranges(model, config, table, rules, float_readers, calibration, cache, quiet, pass_name, out,
                                 dynamic_names)
            if config.save_calib_table:
                table.save(config.save_calib_table)
        result = _static(model, config, plans, table, rules, float_readers, dynamic_names, calibration, float_model,
                         target, pass_name, out)
    else:
        result = qdq_insert.InsertResult()
    _dynamic_and_embeddings(model, config, dynamic_names, granularity, target, pass_name, out)
    if not plans and not out.counts:
        return out
    if plans:  # what stayed float between the integer kernels (rescaled Conv outputs' activations)
        fused = activations.fuse_hardswish(model, pass_name=pass_name)
        if fused:
            out.count("float_hardswish_fused", fused)
    ir_common.RemoveUnusedNodesPass()(model)
    _drop_inner_value_info(model)
    if config.bias_correction and float_model is not None and calibration is not None and plans:
        bias_correction.correct_if_better(float_model, model, list(calibration), out)
    for op, n in collections.Counter(p.node.op_type for p in plans).items():
        out.count(f"quantized_{op}", n)
    out.count("int8_weights", result.weights)
    out.count("int32_biases", result.biases)
    out.count("relu_clip_absorbed", result.absorbed)
    out.count("activations_quantized", len(result.dequantized))
    if float_model is not None and calibration is not None:
        if config.sqnr_samples and plans:
            feeds = list(calibration.take(config.sqnr_samples))
            deploy_check.record_sqnr(float_model, model, result, config.activation_type, feeds, out)
        if config.latency_runs:
            deploy_check.record_latency(float_model, model, next(iter(calibration)), config.latency_runs, out)
    return out


def _static(
    model: ir.Model,
    config: QuantizeConfig,
    plans: list[QuantPlan],
    table: CalibrationTable,
    rules: RuleContext,
    float_readers: frozenset[str],
    dynamic_names: frozenset[str],
    calibration: Dataset | None,
    float_model: ir.Model | None,
    target: str,
    pass_name: str,
    out: Outcome,
) -> qdq_insert.InsertResult:
    """Insert the static Q/DQ of ``plans`` (steps 4 and 5 of the module docstring)."""
    seven_bit = reduce_range.decide(config.reduce_range, target, can_measure=calibration is not None, outcome=out)
    if seven_bit is not None:
        result = _insert(model, config, plans, table, seven_bit, float_readers, pass_name)
    else:  # auto on a CPU whose kernels saturate, with data (float_model is set): build both, measure
        reduced = model.clone()  # planned, not yet quantized
        result = _insert(model, config, plans, table, False, float_readers, pass_name)
        reduced_plans = _plans(reduced, config, rules, float_readers, Outcome(), dynamic_names)  # skips reported above
        reduced_result = _insert(reduced, config, reduced_plans, table, True, float_readers, pass_name)
        feeds = list(calibration.take(reduce_range.CHECK_FEEDS))  # type: ignore[union-attr]
        if reduce_range.reduced_is_closer(float_model, model, reduced, feeds, out):  # type: ignore[arg-type]
            model.graph, result = reduced.graph, reduced_result
            plans[:] = reduced_plans
        del reduced
    return result


def activations_mode(model: ir.Model) -> str:
    """What ``activations=auto`` picks for ``model``: ``static`` or ``dynamic`` (transformers)."""
    return _resolve_mode(model, QuantizeConfig(activations="auto"), Outcome())


def _resolve_mode(model: ir.Model, config: QuantizeConfig, out: Outcome) -> str:
    """``static`` or ``dynamic``: ``activations=auto`` decided for this model (a note says why)."""
    if config.activations != "auto":
        return config.activations
    ops = {(n.domain or "", n.op_type) for n in model.graph}
    if ("", "Conv") in ops or ("", "ConvTranspose") in ops:
        out.note("activations=auto: static (the model has convolutions)")
        return "static"
    fused = {("com.microsoft", op) for op in ("Attention", "MultiHeadAttention", "SkipLayerNormalization")}
    _, ranks = _tensor_types(model)
    sequence = [n for n in model.graph if n.op_type in ("MatMul", "Gemm") and n.domain in ("", "ai.onnx")
                and n.inputs[0] is not None and ranks.get(n.inputs[0].name, 0) >= 3
                and dynamic.can_quantize(n) is None]
    if sequence or ops & fused:
        out.note("activations=auto: dynamic (a transformer: MatMuls with constant weights on token sequences, no "
                 "convolutions), every MatMul/Gemm with run-time scales, the rest float")
        return "dynamic"
    out.note("activations=auto: static (no MatMul/Gemm on token sequences)")
    return "static"


def _dynamic_names(model: ir.Model, config: QuantizeConfig, mode: str, out: Outcome) -> frozenset[str]:
    """Names of the MatMul/Gemm nodes that get run-time activation scales."""
    names = set()
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            continue
        if (config.include_nodes and node.name not in config.include_nodes) or node.name in config.exclude_nodes:
            continue
        if (config.include_ops and node.op_type not in config.include_ops) or node.op_type in config.exclude_ops:
            continue
        if not (node.name in config.dynamic_nodes or mode == "dynamic"):
            continue
        reason = dynamic.can_quantize(node)
        if reason is not None:
            if node.name in config.dynamic_nodes:
                out.note(f"{node.name}: asked for dynamic INT8, but {reason}")
            if mode == "dynamic" or node.name in config.dynamic_nodes:
                out.skip(f"{node.op_type}: dynamic INT8 not possible, {reason}")
            continue
        if not node.name:  # plans and the rewrite find dynamic nodes by name
            node.name = _ir_utils.unique_name(model.graph, f"{node.op_type}_dynamic")
        names.add(node.name)
    return frozenset(names)


def _scale_granularity(
    model: ir.Model,
    config: QuantizeConfig,
    names: frozenset[str],
    data: Dataset | None,
    cache: MutableMapping[Any, Any] | None,
    out: Outcome,
) -> Mapping[str, str] | str:
    """``dynamic_scales`` per dynamic node; ``auto`` with data is decided per node by measurement.

    LayerNorm outputs get one scale per tensor (every row normalized). Any other input gets one
    scale per tensor where its token spread on the calibration feeds (largest token's max |x|
    over the median token's) is at most :data:`dynamic.SPREAD_LIMIT`, else one per token. Without
    data the other inputs are per token (the safe choice).
    """
    if config.dynamic_scales != "auto" or not names:
        return config.dynamic_scales
    nodes = [n for n in model.graph if n.name in names]
    open_nodes = [n for n in nodes if not dynamic.normalized_input(n)]
    if not open_nodes:
        return "auto"
    if data is None:
        out.note(f"dynamic_scales=auto without calibration data: {len(open_nodes)} input(s) that are not LayerNorm "
                 "outputs get per-token scales (with --calib, per tensor where the tokens' ranges allow it)")
        return "auto"
    key = ("token_spread", calibration.fingerprint(model), tuple(sorted(n.name for n in open_nodes)))
    spreads = cache.get(key) if cache is not None else None
    if spreads is None:
        spreads = dynamic.token_spreads(model, open_nodes, list(data.take(_SPREAD_FEEDS)))
        if cache is not None:
            cache[key] = spreads
    choice = {n.name: "tensor" for n in nodes}
    for name, spread in spreads.items():
        choice[name] = "tensor" if spread <= dynamic.SPREAD_LIMIT else "token"
        out.record(f"token_spread:{name}", spread=round(spread, 2), scales=choice[name])
    tokens = sorted(n for n, how in choice.items() if how == "token")
    out.count("dynamic_per_token", len(tokens))
    out.note(f"dynamic_scales=auto: {len(tokens)} of {len(open_nodes)} MatMul input(s) outside LayerNorm outputs have "
             f"tokens over {dynamic.SPREAD_LIMIT:g}x the median token's range and get per-token scales"
             + (f" ({', '.join(tokens[:4])}{', ...' if len(tokens) > 4 else ''})" if tokens else "")
             + "; the rest one scale per tensor")
    return choice


def _dynamic_and_embeddings(
    model: ir.Model,
    config: QuantizeConfig,
    names: frozenset[str],
    granularity: Mapping[str, str] | str,
    target: str,
    pass_name: str,
    out: Outcome,
) -> None:
    """Rewrite the dynamic nodes (:mod:`onnxopt.quant.dynamic`) and the embedding tables."""
    nodes = [n for n in model.graph if n.name in names and n.op_type in ("MatMul", "Gemm")]
    if nodes:
        seven_bit = config.reduce_range == "true" or (
            config.reduce_range == "auto" and target == "cpu" and reduce_range.scales.int8_dot_saturates()
        )
        cpu = environment.cpu_info()
        how = "set in the config" if config.reduce_range != "auto" else (
            "auto, dynamic INT8: 7-bit weights where the u8 x s8 kernels saturate (no data needed to decide)")
        out.record("reduce_range", reduce_range=seven_bit, how=how, cpu=cpu.describe(), int8_dot=cpu.int8_dot)
        done = dynamic.quantize_dynamic_nodes(model, nodes, granularity=granularity, reduce_range=seven_bit,
                                              pass_name=pass_name)
        out.count("dynamic_int8_nodes", len(done.nodes))
        out.count("dynamic_int8_inputs", done.inputs_quantized)
        out.count("dynamic_int8_merged", done.merged)
        out.count("int8_weights", done.weights)
        if seven_bit:
            out.note("dynamic INT8: 7-bit weights (reduce_range), the u8 x s8 kernels of this CPU saturate")
    if config.embeddings == "int8":
        def allowed(node: ir.Node) -> bool:  # the same node selection as every other quantized node
            if "Gather" in config.exclude_ops or (config.include_ops and "Gather" not in config.include_ops):
                return False
            return not ((config.include_nodes and node.name not in config.include_nodes)
                        or node.name in config.exclude_nodes)

        emb = embedding.quantize_embeddings(model, min_rows=_EMBEDDING_MIN_ROWS, pass_name=pass_name,
                                            allowed=allowed)
        for name, (rows, cols, err) in emb.tables.items():
            out.record(f"embedding:{name}", rows=rows, columns=cols, max_row_rel_error=round(err, 5))
        if emb.tables:
            out.count("int8_embedding_tables", len(emb.tables))
            out.count("embedding_bytes_saved", emb.bytes_before - emb.bytes_after)


def _alphas(config: QuantizeConfig, per_token: bool) -> dict[str, Any]:
    """smooth.smooth's per-layer alpha arguments for ``config``."""
    if config.smooth_alpha == "fixed":
        return {}
    return {"per_layer": smooth.ALPHA_GRID, "per_token": per_token}


def _smooth_only(
    model: ir.Model, config: QuantizeConfig, data: Dataset | None, cache: MutableMapping[Any, Any] | None, out: Outcome
) -> frozenset[str]:
    """SmoothQuant without range calibration (all activations dynamic); needs data, else a note."""
    if not config.smooth_quant:
        return frozenset()
    if data is None:
        out.note("SmoothQuant skipped: no calibration data (dynamic INT8 needs none otherwise)")
        return frozenset()
    done = _cached_smooth(model, config, data, cache, per_token=config.dynamic_scales == "token")  # auto: per tensor
    for rec in done.records:
        out.record(f"smooth:{rec.pop('tensor')}", **rec)
    for reason in done.skipped:
        out.note(f"SmoothQuant: {reason}")
    out.count("smoothed_activations", len(done.scales))
    return frozenset(done.inserted)


def _calibrate(
    model: ir.Model,
    config: QuantizeConfig,
    data: Dataset | None,
    cache: MutableMapping[Any, Any] | None,
    quiet: bool,
    out: Outcome,
    workers: Any = None,
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
            done = smooth.smooth(model, None, scales=table.smoothing, rescale_conv_outputs=config.rescaling)
            out.note(f"SmoothQuant scales of {len(table.smoothing)} tensors applied from the calibration table")
    else:
        if config.smooth_quant:
            done = _cached_smooth(model, config, data, cache, per_token=False)
        method = config.calibration_method if config.calibration_method != "auto" else "mse"
        # mse keeps the symmetric step t/127 even for uint8 (asymmetric=False): counting uint8's real
        # step on one-sided tensors clips less and was measured worse on the PP-OCR recogniser
        # (lines decoded as FP32: 28 % against 50 %; docs/benchmarks.md).
        kw = calibration.method_options(method, percentile=config.percentile, asymmetric=False)
        if config.calibration_method == "auto":  # every method's table from one pass; mse first
            calibration.cached_methods(model, data, cache=cache, quiet=quiet, percentile=config.percentile, workers=workers)
        table = calibration.cached_ranges(model, data, None, method, cache=cache, quiet=quiet, workers=workers, **kw)
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


def _cached_smooth(
    model: ir.Model, config: QuantizeConfig, data: Dataset | None, cache: MutableMapping[Any, Any] | None,
    *, per_token: bool,
) -> smooth.SmoothResult:
    """SmoothQuant on ``model``, its scales measured once per model and options (``mixed`` builds
    many plans of one model: each applies the first build's scales instead of re-running the data)."""
    key = ("smooth", config.smooth_quant, config.smooth_alpha, config.rescale_conv_outputs, per_token,
           calibration.fingerprint(model))  # fmt: skip
    hit = cache.get(key) if cache is not None else None
    if hit is not None:
        scales, records, skipped = hit
        done = smooth.smooth(model, None, scales=scales, rescale_conv_outputs=config.rescaling)
        done.records, done.skipped = copy.deepcopy(records), list(skipped)
        return done
    feeds = data.take(_SMOOTH_FEEDS)  # type: ignore[union-attr]
    done = smooth.smooth(model, feeds, config.smooth_quant, min_ratio=_SMOOTH_MIN_RATIO,
                         rescale_conv_outputs=config.rescaling, **_alphas(config, per_token))
    if cache is not None:
        cache[key] = (dict(done.scales), copy.deepcopy(done.records), list(done.skipped))
    return done


def _auto_ranges(
    model: ir.Model, config: QuantizeConfig, base: CalibrationTable, rules: RuleContext,
    float_readers: frozenset[str], data: Dataset, cache: MutableMapping[Any, Any] | None, quiet: bool, pass_name: str, out: Outcome,
    dynamic_names: frozenset[str] = frozenset(),
) -> CalibrationTable:
    """calibration_method=auto: per-tensor method choice measured in onnxruntime (range_search)."""
    tables = calibration.cached_methods(model, data, cache=cache, quiet=quiet, percentile=config.percentile)

    def build(ranges: Mapping[str, tuple[float, float]]) -> ir.Model:
        trial = model.clone()
        trial_plans = _plans(trial, config, rules, float_readers, Outcome(), dynamic_names)
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
    model: ir.Model, config: QuantizeConfig, rules: RuleContext, float_readers: frozenset[str], out: Outcome,
    dynamic_names: frozenset[str] = frozenset(),
) -> list[QuantPlan]:
    """One plan per main-graph node its rule quantizes; every other candidate is a skip with its reason."""
    plans = []
    for node in model.graph:
        if node.op_type not in RULES or node.domain not in ("", "ai.onnx") or node.name in dynamic_names:
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
