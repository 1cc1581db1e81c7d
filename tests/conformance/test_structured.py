"""If/Loop/Scan subgraphs and dynamic batch/sequence dims survive every pass and recipe.

For each model of onnxopt/testing/conformance/structured.py and each of our tools (every registered pass
and recipe), the result must keep the graph inputs/outputs with their symbolic dims, keep the
control-flow op (or replace it by something that computes the same), and compute what the
original computes on onnxruntime for two different (batch, seq) sizes, at the tool's
tolerance (onnxopt/testing/conformance/tools.py). The reference outputs come from running the original.
"""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest

from onnxopt.testing.conformance import harness, structured, tools
from onnxopt.testing.conformance.cases import Case

TOOLS = tools.our_tools()


def _case(name: str) -> Case:
    model = structured.MODELS[name]()
    raw = model.SerializeToString()
    sess = ort.InferenceSession(raw, providers=["CPUExecutionProvider"])
    data = tuple((feed, sess.run(None, feed)) for feed in structured.feeds())
    return Case(name, "structured", raw, data)


def _io_dims(model: onnx.ModelProto) -> list[tuple[str, list]]:
    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    return [(vi.name, dims(vi)) for vi in [*model.graph.input, *model.graph.output]]


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("name", list(structured.MODELS))
def test_control_flow_and_dynamic_dims_survive(tmp_path, name, tool):
    case = _case(name)
    dst = tmp_path / "out.onnx"
    outcome = harness.evaluate(case, tool, keep=dst)
    assert outcome.status not in harness.BAD, f"{tool} on {name}: {outcome.status}: {outcome.detail}"
    if outcome.detail.startswith("refused:"):
        # A documented refusal (distill without a teacher or torch): one clear typed line.
        assert "\n" not in outcome.detail and ("PreconditionError" in outcome.detail or "Error:" in outcome.detail)
        return
    before, after = onnx.load_from_string(case.model), onnx.load(str(dst))
    assert _io_dims(after) == _io_dims(before)  # names and symbolic batch/seq dims kept
    control = {"if": "If", "loop": "Loop", "scan": "Scan"}[name]
    assert any(n.op_type == control for n in after.graph.node)
