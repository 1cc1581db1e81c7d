from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxopt import pipeline
from onnxopt.context import PassContext
from onnxopt.pass_base import EmptyConfig, OptPass, PassReport
from onnxopt.runtime.data import Dataset
from onnxopt.testing.builders import conv_bn_feeds, conv_bn_model


def _model() -> ir.Model:
    return ir.serde.deserialize_model(conv_bn_model())


class _Unregistered(OptPass[EmptyConfig]):
    """Test pass.

    Changes: see subclass. Preserves: -. Guarantees: -. Not exact: -.
    """

    config_class = EmptyConfig


class DanglingPass(_Unregistered):
    name = "test-dangling"
    lossless = True

    def call(self, model: ir.Model) -> PassReport:
        report = self.new_report(model)
        relu = next(n for n in model.graph if n.op_type == "Relu")
        relu.replace_input_with(0, ir.Value(name="nowhere"))  # input produced by nothing
        report.count("broken")
        return report


class WrongNumbersPass(_Unregistered):
    name = "test-wrong"
    lossless = True

    def call(self, model: ir.Model) -> PassReport:
        report = self.new_report(model)
        w = model.graph.initializers["G"]
        w.const_value = ir.tensor(w.const_value.numpy() * 1.5, name="G")
        report.count("scaled")
        return report


class RaisingPass(_Unregistered):
    name = "test-raise"

    def call(self, model: ir.Model) -> PassReport:
        model.graph.remove(next(iter(model.graph)), safe=False)  # half-done edit, then a crash
        raise RuntimeError("boom")


class NoopPass(_Unregistered):
    name = "test-noop"

    def call(self, model: ir.Model) -> PassReport:
        return self.new_report(model)


@pytest.mark.parametrize(
    ("pass_cls", "needle"),
    [
        (DanglingPass, ""),
        (WrongNumbersPass, "lossless pass changed the outputs"),
        (RaisingPass, "boom"),
    ],
)
def test_broken_pass_is_rolled_back_and_reported(pass_cls, needle):
    model = _model()
    ctx = PassContext(calibration=Dataset.from_feeds([conv_bn_feeds(1)]))
    before = ir.to_proto(model).SerializeToString()
    result = pipeline.run(model, [pass_cls(context=ctx), NoopPass(context=ctx)])
    first = result.reports[0]
    assert first.status == "rolled-back" and needle in first.error and first.error
    assert result.reports[1].status == "unchanged"
    assert ir.to_proto(result.model).SerializeToString() == before


def test_strict_mode_raises():
    with pytest.raises(RuntimeError, match="boom"):
        pipeline.run(_model(), [RaisingPass()], strict=True)


def test_reports_carry_sizes_time_and_fidelity():
    from onnxopt.pass_base import make

    ctx = PassContext(calibration=Dataset.from_feeds([conv_bn_feeds(1)]))
    result = pipeline.run(_model(), [make("simplify", context=ctx)])
    rep = result.reports[0]
    assert rep.status == "ok" and rep.counts["batchnorm_folded"] == 1
    assert rep.before["nodes"] == 7 and rep.after["nodes"] == 5
    # A BatchNorm fold on a small Conv (outputs of order 1): float re-association, ~1e-6 on any CPU.
    assert rep.fidelity["max_abs"] < 1e-4 and rep.seconds > 0
    js = rep.to_json()
    assert js["pass"] == "simplify" and js["counts"]["batchnorm_folded"] == 1
    assert np.isfinite(js["fidelity"]["cosine"])


def test_model_that_fails_on_generated_feeds_is_checked_structurally_only():
    from onnxopt.pass_base import make

    # Generated indices stay within the table's 2 rows (plain random ones in [0, 4) did not),
    # so this model is checked numerically.
    gather = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (int64[3] idx) => (float[3, 2] y) <float[2, 2] table = {1., 2., 3., 4.}> {
        t = Identity (table)
        y = Gather (t, idx)
    }
    """
    rep = pipeline.run(ir.from_onnx_text(gather), [make("simplify")]).reports[0]
    assert rep.status == "ok" and rep.fidelity["feeds"] == 2, (rep.error, rep.notes)
    # Squeezing an axis of size 2 or 3 fails whatever the axis: no numerical check, a note.
    squeeze = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3] x, int64[1] axes) => (float[k] y) {
        t = Identity (x)
        y = Squeeze (t, axes)
    }
    """
    rep = pipeline.run(ir.from_onnx_text(squeeze), [make("simplify")]).reports[0]
    assert rep.status == "ok" and rep.modified, rep.error
    assert any("numerical check skipped" in n and "--eval DATA" in n for n in rep.notes), rep.notes


class RetypeThenFailPass(_Unregistered):
    name = "test-retype"

    def call(self, model: ir.Model) -> PassReport:
        for node in model.graph:
            for out in node.outputs:
                out.dtype = ir.DataType.FLOAT16  # mutates the (shared) type object in place
        raise RuntimeError("gave up halfway")


def test_rollback_restores_types_mutated_in_place():
    model = _model()
    before = ir.to_proto(model).SerializeToString()
    result = pipeline.run(model, [RetypeThenFailPass()])
    assert result.reports[0].status == "rolled-back"
    assert ir.to_proto(result.model).SerializeToString() == before
