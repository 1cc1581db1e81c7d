"""Logarithmic quantization: weights on a power-of-two codebook, x' = sign(x) * s * 2^-e.

Each weight keeps a sign and an exponent e in 0..2^(b-1)-2 (or becomes zero), so b bits index
a codebook {0, ±s*2^-e} with one float scale s per tensor or per output channel (searched for
the smallest squared error). Storage, packing and repair are those of weight clustering
(:mod:`onnxopt.compress.weight_sharing`); repair fits only the scale, so the codebook stays powers of two.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from onnxopt.compress import weight_sharing
from onnxopt.compress.codebook import Codebook, IndexDType, fit_log
from onnxopt.config import option
from onnxopt.pass_base import OptPass, PassReport, register

__all__ = ["LogQuantConfig", "LogQuantPass"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LogQuantConfig(weight_sharing.CodebookConfig):
    """Options of the logquant pass."""

    bits: int = option(4, "bits per weight (1 sign bit + exponent), 2..8")
    per_channel: bool = option(True, "one scale per output channel instead of per tensor")
    repair: bool = option(False, "re-fit the scales on calibration data (skipped with a note without data)")
    index_dtype: IndexDType = option("auto", "packed index type: auto (4-bit if bits <= 4), uint8, uint4")  # noqa: RUF009

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {self.bits}")
        if self.index_dtype == "uint4" and self.bits > 4:
            raise ValueError(f"index_dtype=uint4 holds at most 4 bits, got bits={self.bits}")
        super().__post_init__()


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
        opts = cfg.sharing_options(scale_only=True)

        def fit(w: np.ndarray, axis: int | None) -> Codebook:
            return fit_log(w, cfg.bits, axis)

        ctx = self.context
        shared = weight_sharing.apply(
            model, fit, opts, calibration=ctx.calibration, pass_name=self.name, quiet=ctx.quiet
        )
        report.absorb(shared)
        return report
