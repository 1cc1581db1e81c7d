"""Shape inference: annotate value shapes and dtypes with ONNX's own inference."""

from __future__ import annotations

import onnx_ir as ir

from onnxopt import _ir_utils
from onnxopt.pass_base import EmptyConfig, OptPass, PassReport, register

__all__ = ["ShapeInferencePass"]


@register("shape-inference")
class ShapeInferencePass(OptPass[EmptyConfig]):
    """Run onnx.shape_inference and keep the inferred types and shapes of values that had none.

    Changes: types/shapes of values that declared none; no node, initializer or output changes.
    Preserves: everything computed; graph I/O.
    Guarantees: exact (no numerical change).
    Not exact: nothing.
    """

    config_class = EmptyConfig
    lossless = True
    tolerance = (1e-5, 1e-6)

    def call(self, model: ir.Model) -> PassReport:
        report = self.new_report(model)
        report.count("types_or_shapes_filled", _ir_utils.infer_types(model))
        return report
