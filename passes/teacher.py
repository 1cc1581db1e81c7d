"""Record the model as it is at this point of the pipeline as the teacher for ``distill``."""

from __future__ import annotations

import logging

import onnx_ir as ir

from onnxopt.pass_base import EmptyConfig, OptPass, PassReport, register

__all__ = ["TeacherPass"]

logger = logging.getLogger(__name__)


@register("teacher")
class TeacherPass(OptPass[EmptyConfig]):
    """Keep a serialized copy of the model in the pass context for a later ``distill`` pass.

    Changes: nothing in the model (the report says unchanged).
    Preserves: everything.
    Guarantees: the copy is serialized bytes, so passes that edit tensors in place later
        cannot alter the teacher.
    Not exact: n/a (exact).
    """

    lossless = True

    def call(self, model: ir.Model) -> PassReport:
        """Store the serialized model as the context's teacher."""
        report = self.new_report(model)
        self.context.teacher = ir.to_proto(model).SerializeToString()
        report.note("recorded the model as the teacher for distill")
        return report
