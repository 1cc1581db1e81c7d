"""quantize on the bundled digits models (slow): accuracy, fidelity and fused integer kernels."""

from __future__ import annotations

import collections

import pytest

from onnxopt import data, io, pipeline, runtime, validation
from onnxopt.context import PassContext
from onnxopt.pass_base import make
from tests.conftest import load_model, model_path

# (model, min output cosine, integer kernels onnxruntime must fuse)
CASES = [
    ("digits_mlp", 0.999, {"QGemm"}),
    ("digits_cnn", 0.999, {"QLinearConv", "QGemm"}),
    ("digits_transformer", 0.995, {"QLinearMatMul"}),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "min_cosine", "kernels"), CASES)
def test_int8_recipe_on_bundled_models(name, min_cosine, kernels, tmp_path):
    model = load_model(f"{name}.onnx")
    ref = model.clone()
    sig = data.input_signature(model)
    ctx = PassContext(calibration=data.load_data(model_path(f"{name}_calib.npz"), sig), quiet=True)
    passes = [make("simplify", {}, ctx), make("quantize", {"latency_runs": 0, "sqnr_samples": 1}, ctx)]
    result = pipeline.run(model, passes, strict=True)
    report = result.reports[-1]
    assert report.status == "ok" and report.counts["int8_weights"] > 0
    rep = validation.compare(ref, result.model, model_path(f"{name}_eval.npz"))
    metrics = next(iter(rep.outputs["CPUExecutionProvider"].values()))
    assert metrics.cosine >= min_cosine
    assert metrics.cand_accuracy >= metrics.ref_accuracy - 0.005  # top-1 drop <= 0.5 point
    assert rep.sizes["candidate_bytes"] < 0.6 * rep.sizes["reference_bytes"]
    optimized = tmp_path / "ort.onnx"
    with runtime.session(result.model, opt_level="all", optimized_model_path=optimized):
        pass
    fused = collections.Counter(n.op_type for n in io.load_model(optimized).graph)
    assert kernels <= set(fused), fused


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits_cnn", "digits_mlp", "digits_transformer"])
def test_int8_recipe_as_deployed_keeps_top1_within_half_a_point(tmp_path, name):
    # optimize() validates with onnxruntime's optimisations on, i.e. through the integer kernels
    # (on CPUs without VNNI these saturate unless reduce_range is on: the "auto" default).
    import onnxopt

    result = onnxopt.optimize(
        model_path(f"{name}.onnx"), tmp_path / "q.onnx", recipe="int8",
        calibration=model_path(f"{name}_calib.npz"), evaluation=model_path(f"{name}_eval.npz"), quiet=True,
    )
    m = result.validation.outputs["CPUExecutionProvider"]["logits"]
    assert m.ref_accuracy - m.cand_accuracy <= 0.005, (m.ref_accuracy, m.cand_accuracy)
    assert m.cosine >= 0.995
