"""The driver shared by the codebook passes (cluster, logquant): select, fit, repair, store.

A pass supplies a fit function ``(w, axis) -> Codebook`` and its options; this module picks the
weights (op type, name pattern, size, first/last layer), collects calibration statistics once
when repair is on, re-fits the centroids and the bias (:mod:`onnxopt.compress.repair`), and writes the
result baked or packed (:mod:`onnxopt.compress.codebook`), recording per tensor what it did.

Repair without calibration data is not an error: the weights are still clustered, and the
report says in a note that repair was skipped (so a ``compress`` recipe run without ``--calib``
still compresses).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxopt import _ir_utils
from onnxopt.compress import repair
from onnxopt.compress.codebook import Codebook, IndexDType, write_weight
from onnxopt.config import option
from onnxopt.outcome import Outcome
from onnxopt.runtime.data import Dataset

__all__ = [
    "SUPPORTED_OPS",
    "CodebookConfig",
    "SelectionConfig",
    "SharingOptions",
    "Target",
    "apply",
    "layout_bytes",
    "select",
]

logger = logging.getLogger(__name__)

SUPPORTED_OPS = frozenset({"Conv", "Gemm", "MatMul", "ConvTranspose"})
FitFn = Callable[[np.ndarray, "int | None"], Codebook]


@dataclasses.dataclass(frozen=True)
class SharingOptions:
    """The selection/storage options common to the codebook passes."""

    per_channel: bool
    op_types: frozenset[str]
    include: str
    exclude: str
    min_elements: int
    skip_first: bool
    skip_last: bool
    repair: bool
    bias_correction: bool
    pack: bool
    index_dtype: IndexDType
    scale_only: bool = False
    sequential: bool = True
    repair_passes: int = 8
    # per_channel: one codebook per tensor where per-channel codebooks of ``clusters`` entries would
    # take more bytes than the tensor's int8 per-channel form (0: always per channel).
    size_aware_clusters: int = 0


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
    """Which weights a weight-changing pass (prune, cluster, logquant) touches."""

    op_types: frozenset[str] = option(
        factory=lambda: frozenset({"Conv", "Gemm", "MatMul"}), help="ops whose weight is changed"
    )
    include: str = option("", "regular expression: only weights whose name matches")
    exclude: str = option("", "regular expression: leave weights whose name matches")
    min_elements: int = option(256, "leave smaller weights alone")
    skip_first: bool = option(False, "leave the first matching layer alone")
    skip_last: bool = option(False, "leave the last matching layer alone")

    def __post_init__(self) -> None:
        check_options(self.op_types, self.include, self.exclude, self.min_elements)


@dataclasses.dataclass(frozen=True)
class CodebookConfig(SelectionConfig):
    """The options every codebook pass (cluster, logquant) has: selection, repair, storage."""

    per_channel: bool = option(False, "one codebook per output channel instead of per tensor")
    repair: bool = option(False, "re-fit the codebook on calibration data (skipped with a note without data)")
    bias_correction: bool = option(True, "with repair: correct biases for the mean output shift")
    sequential: bool = option(
        True, "with repair: fit each layer on the inputs the already compressed layers give (see "
        "repair_passes); false: one pass on the original inputs"
    )
    repair_passes: int = option(
        8, "sequential repair: at most this many calibration passes, each fitting the next group of "
        "consecutive layers on the inputs the groups before it give (0: one pass per layer)"
    )
    pack: bool = option(False, "store indices as UINT8/4-bit with a codebook, rebuilt in-graph")
    index_dtype: IndexDType = option("auto", "packed index type: auto (4-bit if it fits), uint8, uint4")  # noqa: RUF009

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.repair_passes < 0:
            raise ValueError(f"repair_passes must be >= 0, got {self.repair_passes}")

    def sharing_options(self, *, scale_only: bool = False) -> SharingOptions:
        """These options as the engine's :class:`SharingOptions`."""
        return SharingOptions(
            per_channel=self.per_channel,
            op_types=self.op_types,
            include=self.include,
            exclude=self.exclude,
            min_elements=self.min_elements,
            skip_first=self.skip_first,
            skip_last=self.skip_last,
            repair=self.repair,
            bias_correction=self.bias_correction,
            pack=self.pack,
            index_dtype=self.index_dtype,
            scale_only=scale_only,
            sequential=self.sequential,
            repair_passes=self.repair_passes,
        )


def check_options(op_types: frozenset[str], include: str, exclude: str, min_elements: int) -> None:
    """Config validation shared by the passes (raises ValueError naming the field)."""
    unknown = sorted(set(op_types) - SUPPORTED_OPS)
    if unknown:
        raise ValueError(f"op_types: unsupported {unknown[0]!r}; valid: {', '.join(sorted(SUPPORTED_OPS))}")
    for field, pattern in (("include", include), ("exclude", exclude)):
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"{field}: invalid regular expression {pattern!r} ({err})") from None
    if min_elements < 0:
        raise ValueError(f"min_elements must be >= 0, got {min_elements}")


@dataclasses.dataclass
class Target:
    """A weight chosen for sharing, with the layer view used for repair (if any)."""

    weight: ir.Value
    layer: repair.Layer | None
    axis: int | None


def select(model: ir.Model, opts: SharingOptions, report: Outcome) -> list[Target]:
    """Pick the weights to share, each once; every candidate left out is a ``report.skip``."""
    nodes = list(_ir_utils.iter_nodes(model, opts.op_types, subgraphs=False))
    if opts.skip_first and nodes:
        report.skip("first layer excluded (skip_first)")
        nodes = nodes[1:]
    if opts.skip_last and nodes:
        report.skip("last layer excluded (skip_last)")
        nodes = nodes[:-1]
    targets: dict[int, Target] = {}
    for node in nodes:
        weight = _ir_utils.constant_input(node, 1)
        if weight is None:
            # Only a pass called outside the pipeline still sees Constant nodes.
            hint = " (a Constant node: onnxopt.normalize.lift_constants lifts it)"
            hint = hint if _ir_utils.from_constant_node(node.inputs[1]) else ""
            report.skip(f"{node.op_type}: weight is not a constant initializer{hint}")
            continue
        reason = _skip_reason(weight, opts)
        if reason:
            report.skip(reason)
            continue
        if id(weight) in targets:  # shared weight: cluster once, repair for one layer is wrong
            targets[id(weight)].layer = None
            continue
        layer = repair.as_layer(node) if node.op_type != "ConvTranspose" else "ConvTranspose"
        layer = layer if isinstance(layer, repair.Layer) else None
        axis = None
        if opts.per_channel:
            axis = layer.out_axis if layer is not None else _output_axis(node)
            if axis is None:
                report.skip(f"{node.op_type}: no output-channel axis for a per-channel codebook")
                continue
        targets[id(weight)] = Target(weight, layer, axis)
    return list(targets.values())


def _output_axis(node: ir.Node) -> int | None:
    """Output-channel axis of a weight without a layer view (grouped Conv, ConvTranspose)."""
    rank = len(node.inputs[1].const_value.shape)
    if node.op_type == "Conv" and rank >= 3:
        return 0
    if node.op_type == "ConvTranspose" and rank >= 3 and node.attributes.get_int("group", 1) == 1:
        return 1
    return None


def _skip_reason(weight: ir.Value, opts: SharingOptions) -> str | None:
    tensor = weight.const_value
    if not _ir_utils.is_float_dtype(tensor.dtype):
        return f"weight dtype {tensor.dtype.name} is not float"
    if tensor.size < opts.min_elements:
        return f"weight smaller than min_elements={opts.min_elements}"
    if not np.isfinite(tensor.numpy()).all():
        return "weight has non-finite values"
    name = weight.name or ""
    if opts.include and not re.search(opts.include, name):
        return "name does not match include"
    if opts.exclude and re.search(opts.exclude, name):
        return "name matches exclude"
    return None


def apply(
    model: ir.Model,
    fit: FitFn,
    opts: SharingOptions,
    *,
    calibration: Dataset | None,
    pass_name: str,
    quiet: bool = True,
) -> Outcome:
    """Fit a codebook for every selected weight, repair when asked and possible, and store it.

    Args:
        model: edited in place.
        fit: ``(w, axis) -> Codebook``.
        opts: selection and storage options.
        calibration: feeds for repair (None: no repair, with a note when repair was asked for).
        pass_name: provenance tag for created nodes.
        quiet: no progress bars.

    Returns:
        What was shared, repaired, packed and skipped, with a record per tensor.
    """
    report = Outcome()
    targets = select(model, opts, report)
    if not targets:
        return report
    stats: dict[int, repair.LayerStats] = {}
    calib = calibration if opts.repair else None
    sequential = None
    if opts.repair:
        repairable = [t for t in targets if t.layer is not None]
        if calib is None:
            report.note("repair requested but no calibration data: weights shared without repair")
        elif opts.sequential:
            sequential = repair.SequentialStats(
                model, [t.layer for t in repairable], calib, passes=opts.repair_passes, quiet=quiet
            )
        elif repairable:
            found = repair.collect_stats(model, [t.layer for t in repairable], calib, quiet=quiet)
            stats = {id(t.weight): s for t, s in zip(repairable, found, strict=True)}
        skipped = len(targets) - len(repairable)
        if skipped and calib is not None:
            report.skip("repair: weight is shared or not a supported linear layer", skipped)
    opset = model.opset_imports.get("", model.graph.opset_imports.get("", 1))
    shared: dict[str, ir.Value] = {}
    for target in targets:
        st = stats.get(id(target.weight))
        if sequential is not None and target.layer is not None:
            # Sequential: this layer's inputs come from the model with the groups before it shared.
            st = sequential(target.layer)
        _share_one(model.graph, target, fit, opts, st, report, opset, pass_name, shared)
    done = [r for r in report.records if "bytes_before" in r]
    if done:
        before = sum(r["bytes_before"] for r in done)
        after = sum(r["bytes_after"] for r in done)
        zipped = sum(r["zlib_bytes_after"] for r in done)
        report.note(f"shared weights: {before} -> {after} bytes ({zipped} deflated)")
    return report


def _share_one(
    graph: ir.Graph,
    target: Target,
    fit: FitFn,
    opts: SharingOptions,
    stats: repair.LayerStats | None,
    report: Outcome,
    opset: int,
    pass_name: str,
    shared: dict[str, ir.Value],
) -> None:
    weight = target.weight
    w = weight.const_value.numpy()
    axis = target.axis
    fields: dict[str, object] = {}
    if axis is not None and opts.size_aware_clusters:
        sizes = layout_bytes(w.shape, axis, min(opts.size_aware_clusters, int(np.unique(w).size)))
        fields.update(sizes)
        if sizes["per_channel_bytes"] > sizes["int8_bytes"]:
            axis = None
            report.count("per_tensor_by_size")
    book = fit(w.astype(np.float64), axis)
    fields.update({"shape": list(w.shape), "k": book.k, "axis": axis})
    fields["granularity"] = "tensor" if axis is None else "channel"
    fields["weight_rel_error"] = _rel(w, book.weights(np.float64))
    if stats is not None:
        layer = target.layer
        wm = layer.matrix(w.astype(np.float64))
        before = layer.matrix(book.weights(np.float64))
        fields["output_rel_error_before"] = repair.output_error(stats, wm, before)
        repair.refit_codebook(layer, book, stats, w, scale_only=opts.scale_only)
        after = layer.matrix(book.weights(np.float64))
        fields["output_rel_error_after"] = repair.output_error(stats, wm, after)
        if opts.bias_correction:
            fields["bias"] = repair.add_bias(graph, layer, repair.bias_shift(stats, wm, after), pass_name)
        report.count("repaired")
    storage = write_weight(
        graph, weight, book, pack=opts.pack, index_dtype=opts.index_dtype, opset=opset, pass_name=pass_name,
        shared=shared,
    )
    fields["storage"] = storage.kind
    fields["bytes_before"] = int(w.nbytes)
    fields["bytes_after"] = storage.nbytes  # packed: indices + codebook + shape constants
    fields["zlib_bytes_after"] = storage.zipped  # deflate level 9, as in a .zip
    report.count("shared")
    if opts.pack:
        report.count("packed")
    report.record(weight.name or "?", **fields)


def layout_bytes(shape: tuple[int, ...], axis: int, k: int) -> dict[str, int]:
    """Stored bytes of a packed weight: per-channel codebooks, one codebook, and int8 per channel.

    Indices take 4 bits (k <= 16) or 8; a codebook holds ``min(k, elements per channel)`` float32
    entries per channel (or ``k`` per tensor); the int8 form is one byte per element plus a float32
    scale per channel. A 3x3 depthwise layer (9 elements per channel) with per-channel codebooks
    stores 9 floats per channel, more than its float32 weights; these counts let the pass see it.
    """
    size = int(np.prod(shape))
    channels = int(shape[axis])
    bits = 4 if k <= 16 else 8
    index = -(-size * bits // 8)
    return {
        "per_channel_bytes": index + channels * min(k, size // max(channels, 1)) * 4,
        "per_tensor_bytes": index + k * 4,
        "int8_bytes": size + channels * 4,
    }


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))
