"""Shape inference: annotate value shapes and dtypes with ONNX's own inference."""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common

from onnxopt.pass_base import EmptyConfig, OptPass, PassReport, register

__all__ = ["ShapeInferencePass"]


@register("shape-inference")
class ShapeInferencePass(OptPass[EmptyConfig]):
    """Run onnx.shape_inference (through onnx-ir) and keep the inferred value infos.

    Changes: value shapes/dtypes only; no node, initializer or output changes.
    Preserves: everything computed; graph I/O.
    Guarantees: exact (no numerical change).
    Not exact: nothing.
    """

    config_class = EmptyConfig
    lossless = True
    tolerance = (1e-5, 1e-6)

    def call(self, model: ir.Model) -> PassReport:
        report = self.new_report(model)
        known = _count_shaped(model)
        common.ShapeInferencePass()(model)
        report.count("values_annotated", max(_count_shaped(model) - known, 0))
        return report


def _count_shaped(model: ir.Model) -> int:
    return sum(1 for n in model.graph.all_nodes() for v in n.outputs if v.shape is not None)
