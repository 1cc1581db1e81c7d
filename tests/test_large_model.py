"""Large models through the same code path as > 2 GB ones, at test size.

``onnxopt.io._AUTO_EXTERNAL_BYTES`` (save with external data above it) and
``onnxopt.runtime._IN_MEMORY_LIMIT`` (above it, sessions and the checker go through a saved
copy instead of one protobuf) are lowered so that a ~1 MB model takes the > 2 GB route. The
real > 2 GB run, with peak RSS, is benchmarks/large_model.py.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxopt
from onnxopt import io as _io
from onnxopt import pass_base, runtime
from tests.conformance.large import write_large_mlp
from tests.tolerances import TOL

INT8_NAMES = ("quantize", "int8", "qdq-quantize")


def _ort(path, feed):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def _passes():
    names = ["simplify", "fp16", *[n for n in pass_base.all_passes() if n in INT8_NAMES][:1]]
    return [n for n in names if n in pass_base.all_passes()]


@pytest.fixture
def large(tmp_path, rng):
    src = tmp_path / "large.onnx"
    nbytes = write_large_mlp(src, width=256, layers=3)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng.standard_normal((16, 256), dtype=np.float32))
    feed = {"x": rng.standard_normal((3, 256), dtype=np.float32)}
    return src, nbytes, calib, feed


def _check_output(name, out, src, feed):
    onnx.checker.check_model(str(out), full_check=True)
    ref, got = _ort(src, feed), _ort(out, feed)
    assert got.shape == ref.shape and np.isfinite(got).all()
    if name == "simplify":
        np.testing.assert_allclose(got, ref, **TOL["reassociate_fp32"])
    elif name == "fp16":
        np.testing.assert_allclose(got, ref, rtol=TOL["fp16"]["rtol"], atol=TOL["fp16"]["atol"] * np.abs(ref).max())
    else:
        cos = float(np.dot(got.ravel(), ref.ravel()) / (np.linalg.norm(got) * np.linalg.norm(ref)))
        assert cos >= 0.99


@pytest.mark.parametrize("name", _passes())
def test_external_data_model_is_optimized_not_rolled_back(large, tmp_path, name):
    # Regression: a model with external data (under the 2 GB route) went to onnxruntime and the
    # checker as bytes, whose relative data locations cannot resolve: every pass was rolled back
    # and the final validation crashed.
    src, _, calib, feed = large
    out = tmp_path / f"out_{name}.onnx"
    result = onnxopt.optimize(src, out, passes=[name], calibration=calib, quiet=True)
    report = result.reports[0]
    assert report.status == "ok" and report.modified, report.summary()
    _check_output(name, out, src, feed)


@pytest.mark.parametrize("name", _passes())
def test_above_the_limit_route_saves_external_data_and_validates(large, tmp_path, monkeypatch, name):
    src, nbytes, calib, feed = large
    monkeypatch.setattr(runtime, "_IN_MEMORY_LIMIT", nbytes // 4)
    monkeypatch.setattr(_io, "_AUTO_EXTERNAL_BYTES", nbytes // 4)
    out = tmp_path / f"out_{name}.onnx"
    result = onnxopt.optimize(src, out, passes=[name], calibration=calib, quiet=True)
    report = result.reports[0]
    assert report.status == "ok" and report.modified, report.summary()
    # Saved as > 2 GB models are: a small protobuf plus a data file beside it.
    data = tmp_path / f"out_{name}.onnx.data"
    out_weights = _io.model_nbytes(_io.load_model(out))
    if out_weights > nbytes // 4:
        assert data.exists() and out.stat().st_size < 100_000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".onnxopt-")]
    _check_output(name, out, src, feed)
    assert src.with_name("large.onnx.data").stat().st_size == nbytes  # input untouched
