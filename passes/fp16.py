"""FP16: float32 weights and computation lowered to float16, range-checked on calibration data.

Each node that computes in float32 is lowered to float16 unless it is blocked (by op type or
name), cannot be (custom domain, owner of an If/Loop/Scan subgraph, no float16 in its schema,
output type fixed by an attribute, no float16 kernel on onnxruntime CPU), or one of its tensors
leaves float16's range on the calibration data: ``|x| > max_abs`` (float16 overflows at 65504)
or a nonzero tensor whose every value lies below float16's smallest normal (2^-14, where
float16 keeps no relative precision). Weights are checked the same way without
data. The conversion itself (Casts only where precision changes) is
:func:`onnxopt.quant.float16.convert`.

On onnxruntime CPU, float16 nodes without a CPU float16 kernel are run by onnxruntime through
its own inserted Casts; the model loads and runs, but FP16 is a GPU format: expect it slower
than float32 on CPU.
"""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir

from onnxopt.config import option
from onnxopt.pass_base import OptPass, PassReport, register
from onnxopt.quant import calibration, float16

__all__ = ["Fp16Config", "Fp16Pass"]

logger = logging.getLogger(__name__)

DEFAULT_OP_BLOCK_LIST = frozenset({"Range", "CumSum", "RoiAlign"})


@dataclasses.dataclass(frozen=True)
class Fp16Config:
    """Options of the fp16 pass."""

    keep_io: bool = option(True, "keep float32 graph inputs and outputs (Casts inside the graph)")
    op_block_list: frozenset[str] = option(DEFAULT_OP_BLOCK_LIST, "op types kept in float32")
    node_block_list: frozenset[str] = option(frozenset(), "node names kept in float32")
    auto_keep: bool = option(True, "keep float32 the nodes whose tensors leave float16's range")
    max_abs: float = option(
        float16.FP16_MAX / 2, "largest |value| a float16 tensor may hold on calibration data "
        "(float16 overflows at 65504; the margin covers unseen inputs)"
    )
    underflow_fraction: float = option(
        0.5, "keep a weight's users float32 when more than this share of its nonzero values "
        "is below float16's smallest normal (2^-14)"
    )
    calibration_method: str = option("minmax", "range statistic: minmax (safe) or percentile")

    def __post_init__(self) -> None:
        """Check the option values (ValueError naming the option)."""
        if not 0.0 < self.max_abs <= float16.FP16_MAX:
            raise ValueError(f"max_abs must be in (0, 65504], got {self.max_abs}")
        if not 0.0 < self.underflow_fraction <= 1.0:
            raise ValueError(f"underflow_fraction must be in (0, 1], got {self.underflow_fraction}")
        if self.calibration_method not in calibration.METHODS:
            raise ValueError(
                f"calibration_method must be one of {', '.join(calibration.METHODS)}, "
                f"got {self.calibration_method!r}"
            )


@register("fp16")
class Fp16Pass(OptPass[Fp16Config]):
    """Lower float32 nodes and weights to float16; keep out-of-range nodes float32 automatically.

    Changes: float32 weights read by lowered nodes become float16; lowered nodes' float outputs
        become float16; Cast nodes (tagged ``pkg.onnxopt.pass=fp16``) are added where a float32
        tensor meets a float16 node or the reverse, one per tensor and direction.
    Preserves: graph input/output names (and float32 types with ``keep_io``), shapes, opsets;
        If/Loop/Scan nodes and their subgraphs stay float32 as a whole.
    Guarantees: no Cast feeds another float Cast; a node whose calibrated input or output
        exceeds ``max_abs`` or is all-subnormal stays float32, with the reason recorded; without
        calibration data only weights are range-checked (noted in the report).
    Not exact: outputs change by float16 rounding; tolerance "fp16" (rtol 1e-2, atol 1e-3) in
        tests/tolerances.py, and no inf/NaN.
    """

    config_class = Fp16Config

    def call(self, model: ir.Model) -> PassReport:
        """Range-check (with calibration data), then convert; see the class docstring."""
        report = self.new_report(model)
        cfg = self.config
        untyped = [v for v in float16.infer_main_graph_types(model) if not v.is_graph_output()]
        table = None
        if cfg.auto_keep and self.context.calibration is not None:
            table = calibration.cached_ranges(
                model, self.context.calibration, None, cfg.calibration_method,  # type: ignore[arg-type]
                cache=self.context.cache, quiet=self.context.quiet,
            )  # fmt: skip
        elif cfg.auto_keep:
            report.note("no calibration data: only weights were range-checked, not activations")
        keep = float16.range_reasons(model, table, cfg.max_abs, cfg.underflow_fraction) if cfg.auto_keep else {}
        lower = []
        for node in model.graph:
            if node.op_type in cfg.op_block_list:
                reason = f"op type {node.op_type} is in op_block_list"
            elif node.name in cfg.node_block_list:
                reason = "node is in node_block_list"
            else:
                reason = keep.get(node)
            if reason is None:
                lower.append(node)
            else:
                report.skip(reason.split(":")[0])
                report.record(node.name or node.op_type, op=node.op_type, precision="float32", reason=reason)
        result = float16.convert(model, lower, keep_io=cfg.keep_io, pass_name=self.name)
        for value in untyped:  # types inferred only for the conversion are not stored (size)
            value.type = None
            value.shape = None
        for name, reason in result.kept.items():
            report.skip(reason)
            report.record(name, op="", precision="float32", reason=reason)
        report.count("nodes_lowered", len(result.lowered))
        report.count("initializers_fp16", result.initializers)
        report.count("casts_added", result.casts)
        if result.lowered and result.bytes_before:
            report.note(f"weights {result.bytes_before:,} B -> {result.bytes_after:,} B")
        return report
