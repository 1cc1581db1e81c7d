from __future__ import annotations

import onnx
import onnx_ir as ir
from onnxopt.passes.shape_inference import ShapeInferencePass

from onnxopt.runtime import data, validation
from tests.tolerances import TOL


def test_fills_missing_shapes_and_is_exact():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x) => (float[N, 4] y) {
        h = Relu (x)
        y = Sigmoid (h)
    }
    """
    ref, model = ir.from_onnx_text(text), ir.from_onnx_text(text)
    report = ShapeInferencePass()(model)
    h = next(n for n in model.graph if n.op_type == "Relu").outputs[0]
    assert report.modified and h.dtype == ir.DataType.FLOAT and str(h.shape) == "[N,4]"
    feeds = data.random_data(data.input_signature(ref), 2, dims={"N": 3})
    validation.compare(ref, model, feeds, **TOL["exact"]).assert_ok()


def test_sequence_values_in_subgraphs_keep_their_types():
    # onnx-ir's own pass turned these into tensor types (found by the conformance run).
    from onnxopt.testing.conformance.cases import node_cases

    case = next(c for c in node_cases(["loop"]) if c.name == "test_loop16_seq_none")
    model = ir.serde.deserialize_model(onnx.load_from_string(case.model))
    ShapeInferencePass()(model)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def test_no_op_when_everything_is_typed():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x) => (float[2] y) {
        y = Relu (x)
    }
    """
    model = ir.from_onnx_text(text)
    before = ir.to_proto(model).SerializeToString()
    assert ShapeInferencePass()(model).modified is False
    assert ir.to_proto(model).SerializeToString() == before
