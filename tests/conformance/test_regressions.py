"""Regression tests for bugs the conformance run found in simplify (each ran wrong on ORT)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxopt import pass_base
from tests.tolerances import TOL

SCAN_SUM = """
<ir_version: 4, opset_import: ["" : 9]>
scan_sum (float[2] initial, float[3,2] x) => (float[2] y, float[3,2] z) {
    y, z = Scan <num_scan_inputs: int = 1, body: graph = body (float[2] sum_in, float[2] next) => (float[2] sum_out, float[2] scan_out) {
        sum_out = Add (sum_in, next)
        scan_out = Identity (sum_out)
    }> (initial, x)
}
"""

TWO_OUTPUTS = """
<ir_version: 8, opset_import: ["" : 17]>
two (float[3] x) => (float[3] a, float[3] b) {
    a = Relu (x)
    b = Identity (a)
}
"""


def _run(model: ir.Model, feed):
    proto = ir.to_proto(model).SerializeToString()
    sess = ort.InferenceSession(proto, providers=["CPUExecutionProvider"])
    return [o.name for o in sess.get_outputs()], sess.run(None, feed)


def test_simplify_keeps_identity_between_two_outputs_of_a_scan_body(rng):
    # onnx-ir's IdentityEliminationPass made sum_out and scan_out one value; ORT then computed
    # the scan outputs wrongly (test_scan9_sum, test_scan_sum, test_scan9_multi_state).
    feed = {"initial": rng.standard_normal(2).astype(np.float32), "x": rng.standard_normal((3, 2)).astype(np.float32)}
    ref_names, ref = _run(ir.from_onnx_text(SCAN_SUM), feed)
    model = ir.from_onnx_text(SCAN_SUM)
    pass_base.make("simplify")(model)
    names, got = _run(model, feed)
    assert names == ref_names
    for r, g in zip(ref, got, strict=True):
        np.testing.assert_allclose(g, r, **TOL["exact"])


def test_simplify_keeps_both_names_when_one_output_is_an_identity_of_another(rng):
    feed = {"x": rng.standard_normal(3).astype(np.float32)}
    ref_names, ref = _run(ir.from_onnx_text(TWO_OUTPUTS), feed)
    model = ir.from_onnx_text(TWO_OUTPUTS)
    pass_base.make("simplify")(model)
    names, got = _run(model, feed)
    assert names == ref_names == ["a", "b"]
    for r, g in zip(ref, got, strict=True):
        np.testing.assert_allclose(g, r, **TOL["exact"])


SEQUENCE_CONCAT = """
<ir_version: 6, opset_import: ["" : 11]>
seqcat (float[2,3] X, float[2,3] Y) => (float[2,3,2] out) {
    s = SequenceConstruct (X, Y)
    out = ConcatFromSequence <axis: int = -1, new_axis: int = 1> (s)
}
"""

SPLIT_TO_SEQUENCE = """
<ir_version: 10, opset_import: ["" : 24]>
sts (float[3,6] data, int64 split) => (seq(float[]) seq) {
    seq = SplitToSequence <axis: int = 1> (data, split)
}
"""


def test_simplify_leaves_sequence_graphs_valid_with_a_reason(rng):
    # onnxscript's folder turned ConcatFromSequence into Unsqueeze with an axes input at opset 11
    # (checker: "Unsqueeze:11 has input size 2") and crashed on a SplitToSequence whose split is a
    # graph input (simple/test_sequence_model5, node/test_split_to_sequence_1).
    import onnx

    feed = {"X": rng.standard_normal((2, 3)).astype(np.float32), "Y": rng.standard_normal((2, 3)).astype(np.float32)}
    model = ir.from_onnx_text(SEQUENCE_CONCAT)
    report = pass_base.make("simplify")(model)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    assert any("sequence ops" in reason for reason in report.skipped)
    _, ref = _run(ir.from_onnx_text(SEQUENCE_CONCAT), feed)
    _, got = _run(model, feed)
    np.testing.assert_allclose(got[0], ref[0], **TOL["exact"])
    model = ir.from_onnx_text(SPLIT_TO_SEQUENCE)
    pass_base.make("simplify")(model)  # raised RuntimeError from the folder
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
