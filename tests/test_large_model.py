"""Large models through the same code path as > 2 GB ones, at test size.

``onnxopt.io._AUTO_EXTERNAL_BYTES`` (save with external data above it) and
``onnxopt.runtime.sessions._IN_MEMORY_LIMIT`` (what ``in_memory_limit()`` returns: above it,
sessions and the checker go through a saved copy instead of one protobuf) are lowered so that a
~1 MB model takes the > 2 GB route. The real > 2 GB run, with peak RSS, is
benchmarks/large_model.py.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxopt
from onnxopt import io as _io
from onnxopt import pass_base
from onnxopt.runtime import sessions as runtime
from onnxopt.testing.conformance.large import write_large_mlp
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
        # K = 256: on x86 onnxruntime computes float16 MatMuls in float32 (max error 5.7e-4 x
        # max|y| here); ARM64 CPUs with FP16 arithmetic accumulate in float16 (MLAS half GEMM),
        # which a numpy model of it (8 lanes of sequential float16 FMA) puts at 1.6e-3 x max|y|.
        # 5e-3 x max|y| leaves 3x over the float16-accumulating kernel.
        np.testing.assert_allclose(got, ref, rtol=TOL["fp16"]["rtol"], atol=5e-3 * np.abs(ref).max())
    else:
        # INT8, 3 layers: measured cosine 0.99973 (8-bit weights, AVX-512 VNNI); 7-bit weights (what
        # reduce_range=auto may choose on an x86 CPU without VNNI) cost at most ~3x in 1 - cosine
        # on the bundled models. 0.99 leaves 1 - cosine 37x what was measured.
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


# Peak memory of the > 2 GB run (benchmarks/large_model.py) comes from copies these tests pin
# down at test size: mapped external data left resident, a second serialized copy for
# onnxruntime, and onnxruntime's arena keeping what a run allocated.


def _mapped(tensors):
    return [t for t in tensors if t.raw is not None]


def test_release_external_unmaps_and_the_tensor_still_reads(large):
    src, _, _, _ = large
    model = _io.load_model(src)
    tensor = model.graph.initializers["W0"].const_value
    first = tensor.numpy().copy()
    assert tensor.raw is not None  # onnx-ir keeps the file mapped after a read
    _io.release_external(tensor)
    assert tensor.raw is None
    np.testing.assert_array_equal(tensor.numpy(), first)  # mapped again on the next read
    view = tensor.numpy()
    _io.release_external(tensor)  # an array still views the mapping: no error, stays readable
    np.testing.assert_array_equal(view, first)
    _io.release_external(model.graph.initializers["b0"].const_value)  # in-memory tensor: no-op


def test_fp16_unmaps_each_weight_it_read(large):
    src, _, _, _ = large
    model = _io.load_model(src)
    external = _io.external_tensors(model)
    assert len(external) == 3
    from onnxopt.quant import float16

    float16.range_reasons(model, None)
    assert not _mapped(external)
    result = float16.convert(model, list(model.graph), keep_io=True, pass_name="fp16")
    assert result.initializers >= 3 and not _mapped(external)
    assert not _io.external_tensors(model)  # the float16 weights are in memory now


@pytest.mark.parametrize("name", ["simplify", "fp16"])
def test_pipeline_leaves_no_external_data_mapped(large, name):
    src, _, calib, _ = large
    from onnxopt import context, pipeline, recipes
    from onnxopt.runtime import data

    model = _io.load_model(src)
    external = _io.external_tensors(model)
    ctx = context.PassContext(calibration=data.load_data(calib, data.input_signature(model)), quiet=True)
    result = pipeline.run(model, recipes.build([recipes.Step(name)], ctx))
    assert result.reports[0].status == "ok", result.reports[0].summary()
    assert not _mapped(external) and not _mapped(_io.external_tensors(result.model))


def _spy_sessions(monkeypatch):
    seen = []
    real = runtime.make_session

    def spy(model, *args, **kw):
        handle = real(model, *args, **kw)
        options = handle.session.get_session_options()
        in_order = options.execution_order == ort.ExecutionOrder.PRIORITY_BASED
        assert in_order is not options.enable_cpu_mem_arena  # low memory: both, else neither
        seen.append((type(model).__name__, options.enable_cpu_mem_arena))
        return handle

    monkeypatch.setattr(runtime, "make_session", spy)
    return seen


def test_compare_small_models_go_as_bytes_with_the_arena(large, monkeypatch, rng):
    from onnxopt.runtime import validation

    src, _, _, feed = large
    model = _io.load_model(src)
    _io._internalize(model)  # in memory and under the limit: the bytes route, as before
    seen = _spy_sessions(monkeypatch)
    report = validation.compare(model, model, [feed])
    report.assert_ok()
    assert seen == [("bytes", True), ("bytes", True)]


def test_compare_large_models_use_their_file_or_a_saved_copy_without_arena(large, monkeypatch):
    from onnxopt.runtime import validation

    src, nbytes, _, feed = large
    monkeypatch.setattr(runtime, "_IN_MEMORY_LIMIT", nbytes // 4)
    candidate = _io.load_model(src)
    _io._internalize(candidate)  # above the limit in memory: saved to a temp folder, never bytes
    seen = _spy_sessions(monkeypatch)
    report = validation.compare(src, candidate, [feed])
    report.assert_ok()
    # The reference path goes to onnxruntime as it is (no temp copy); neither is serialized.
    assert seen == [("str", False), ("Model", False)]
    assert report.sizes["candidate_bytes"] == _io.model_nbytes(candidate)


def test_make_session_low_memory_by_size(large, monkeypatch):
    src, nbytes, _, feed = large
    model = _io.load_model(src)
    _io._internalize(model)
    with runtime.session(model) as small:
        assert small.session.get_session_options().enable_cpu_mem_arena
        expected = small.run(feed)
    monkeypatch.setattr(runtime, "_IN_MEMORY_LIMIT", nbytes // 4)
    with runtime.session(model) as big:
        assert not big.session.get_session_options().enable_cpu_mem_arena
        np.testing.assert_array_equal(big.run(feed)["y"], expected["y"])
    with runtime.session(src, low_memory=True) as by_path:
        assert not by_path.session.get_session_options().enable_cpu_mem_arena
