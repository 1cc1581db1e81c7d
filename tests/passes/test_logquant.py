from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnxopt.passes.logquant import LogQuantConfig, LogQuantPass

from onnxopt.compress import codebook
from onnxopt.context import PassContext
from onnxopt.pass_base import make
from onnxopt.runtime import sessions as runtime
from tests.conftest import op_counts
from tests.passes.compress_models import cnn, feeds, mlp


def _run(model, calib=None, **opts):
    return LogQuantPass(LogQuantConfig(**opts), PassContext(calibration=calib, quiet=True))(model)


def _outputs(model, ds, opt_level="disable"):
    with runtime.session(model, opt_level=opt_level) as h:
        return np.concatenate([next(iter(h.run(f).values())) for f in ds])


def _assert_power_of_two_grid(w: np.ndarray, axis: int | None, bits: int) -> None:
    groups = [w.reshape(-1)] if axis is None else np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    for g in groups:
        assert len(np.unique(g)) <= 2**bits - 1
        mags = np.abs(g[g != 0])
        exps = np.log2(mags.max() / mags)
        np.testing.assert_allclose(exps, np.round(exps), atol=1e-5)
        assert exps.max() <= 2 ** (bits - 1) - 2 + 1e-5


@pytest.mark.parametrize(("bits", "per_channel"), [(4, True), (3, False), (5, True)])
def test_weights_on_power_of_two_grid(bits, per_channel):
    model = cnn()
    report = _run(model, bits=bits, per_channel=per_channel, min_elements=0)
    assert report.counts["shared"] == 3
    for rec in report.records:
        w = model.graph.initializers[rec["item"]].const_value.numpy()
        _assert_power_of_two_grid(w, rec["axis"], bits)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def test_packed_equals_baked():
    baked, packed = mlp(), mlp()
    _run(baked, min_elements=0)
    report = _run(packed, min_elements=0, pack=True)
    assert {r["storage"] for r in report.records} == {"uint4-in-uint8"}
    assert op_counts(packed)["GatherElements"] == 3
    ds = feeds(baked, 2)
    np.testing.assert_allclose(_outputs(packed, ds, "basic"), _outputs(baked, ds, "basic"), rtol=0, atol=1e-6)


def test_repair_fits_scale_keeps_grid_and_lowers_error():
    calib, held_out = feeds(mlp(), 8, seed=1), feeds(mlp(), 4, seed=2)
    ref, plain, repaired = mlp(), mlp(), mlp()
    _run(plain, bits=3, min_elements=0)
    report = _run(repaired, calib, bits=3, min_elements=0, repair=True)
    assert report.counts["repaired"] == 3
    for rec in report.records:
        assert rec["output_rel_error_after"] <= rec["output_rel_error_before"] + 1e-12
        _assert_power_of_two_grid(repaired.graph.initializers[rec["item"]].const_value.numpy(), rec["axis"], 3)
    y = _outputs(ref, held_out)
    assert np.linalg.norm(_outputs(repaired, held_out) - y) < np.linalg.norm(_outputs(plain, held_out) - y)


def test_codebooks_at_equal_bits(rng):
    """k-means from a linear start never loses to the linear grid; all three are recorded."""
    w = rng.laplace(0, 0.05, (64, 64))
    errors = {}
    for kind, book in (
        ("linear", codebook.fit_linear(w, 16)),
        ("kmeans", codebook.fit_kmeans(w, 16, init="linear")),
        ("log", codebook.fit_log(w, 4)),
    ):
        errors[kind] = np.linalg.norm(w - book.weights(np.float64)) / np.linalg.norm(w)
    assert errors["kmeans"] <= errors["linear"]
    assert all(0 < e < 0.5 for e in errors.values())


def test_no_op_and_skip():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x, float[4, 3] w) => (float[N, 3] y) { y = MatMul (x, w) }
    """
    model = ir.from_onnx_text(text)
    before = ir.to_proto(model).SerializeToString()
    report = _run(model, min_elements=0)
    assert not report.modified and ir.to_proto(model).SerializeToString() == before
    assert report.skipped["MatMul: weight is not a constant initializer"] == 1


@pytest.mark.parametrize(("options", "message"), [
    ({"bits": 1}, "bits must be in 2..8"),
    ({"bits": 9}, "bits must be in 2..8"),
    ({"bits": 6, "index_dtype": "uint4"}, "at most 4 bits"),
    ({"exclude": "["}, "exclude: invalid regular expression"),
])
def test_config_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        make("logquant", options)
