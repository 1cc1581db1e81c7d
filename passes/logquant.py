"""Logarithmic quantization: weights on a power-of-two codebook, x' = sign(x) * s * 2^-e.

Each weight keeps a sign and an exponent e in 0..2^(b-1)-2 (or becomes zero), so b bits index
a codebook {0, ±s*2^-e} with one float scale s per tensor or per output channel (searched for
the smallest squared error). Storage, packing and repair are those of weight clustering
(:mod:`onnxopt.weight_sharing`); repair fits only the scale, so the codebook stays powers of two.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from onnxopt import weight_sharing
from onnxopt.codebook import Codebook, IndexDType, fit_log
from onnxopt.config import option
from onnxopt.pass_base import OptPass, PassReport, register

__all__ = ["LogQuantConfig", "LogQuantPass"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LogQuantConfig:
    """Options of the logquant pass."""

    bits: int = option(4, "bits per weight (1 sign bit + exponent), 2..8")
    per_channel: bool = option(True, "one scale per output channel instead of per tensor")
    op_types: frozenset[str] = option(
        factory=lambda: frozenset({"Conv", "Gemm", "MatMul"}), help="ops whose weight is quantized"
    )
    include: str = option("", "regular expression: only weights whose name matches")
    exclude: str = option("", "regular expression: leave weights whose name matches")
    min_elements: int = option(256, "leave smaller weights alone")
    skip_first: bool = option(False, "leave the first matching layer alone")
    skip_last: bool = option(False, "leave the last matching layer alone")
    repair: bool = option(False, "re-fit the scales on calibration data (skipped with a note without data)")
    bias_correction: bool = option(True, "with repair: correct biases for the mean output shift")
    sequential: bool = option(
        True, "with repair: fit each layer on the inputs the already compressed layers give (one "
        "calibration pass per layer); false: one pass on the original inputs"
    )
    pack: bool = option(False, "store indices as UINT8/4-bit with a codebook, rebuilt in-graph")
    index_dtype: IndexDType = option("auto", "packed index type: auto (4-bit if bits <= 4), uint8, uint4")  # noqa: RUF009

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {self.bits}")
        if self.index_dtype == "uint4" and self.bits > 4:
            raise ValueError(f"index_dtype=uint4 holds at most 4 bits, got bits={self.bits}")
        weight_sharing.check_options(self.op_types, self.include, self.exclude, self.min_elements)


@register("logquant")
class LogQuantPass(OptPass[LogQuantConfig]):
    """Quantize weights to ``s * {0, ±2^-e}`` with ``bits`` bits per weight.

    Changes: as the cluster pass (baked weights, or packed indices + codebook + rebuild nodes).
    Preserves: graph inputs/outputs, opset imports, weights that are not selected.
    Guarantees: every stored weight is 0 or ±s*2^-e with e < 2^(bits-1)-1 and one s per
        tensor/channel (also after repair, which scales s); at most 2^bits - 1 distinct values
        per group; per-tensor errors are in the report records.
    Not exact: outputs change; tests bound them (tests/passes/test_logquant.py).
    """

    config_class = LogQuantConfig

    def call(self, model: ir.Model) -> PassReport:
        """Transform ``model`` in place; see the class docstring."""
        report = self.new_report(model)
        cfg = self.config
        opts = weight_sharing.SharingOptions(
            per_channel=cfg.per_channel,
            op_types=cfg.op_types,
            include=cfg.include,
            exclude=cfg.exclude,
            min_elements=cfg.min_elements,
            skip_first=cfg.skip_first,
            skip_last=cfg.skip_last,
            repair=cfg.repair,
            bias_correction=cfg.bias_correction,
            pack=cfg.pack,
            index_dtype=cfg.index_dtype,
            sequential=cfg.sequential,
            scale_only=True,
        )

        def fit(w: np.ndarray, axis: int | None) -> Codebook:
            return fit_log(w, cfg.bits, axis)

        ctx = self.context
        shared = weight_sharing.apply(
            model, fit, opts, calibration=ctx.calibration, pass_name=self.name, quiet=ctx.quiet
        )
        report.absorb(shared)
        return report
