"""Fuzzing of the loader, the data readers and the CLI with hostile input (hypothesis).

Each example must end in one of two ways: a clear error (an ``OnnxOptError`` subclass from
Python; exit code 2 and exactly one ``onnxopt: error:`` line from the CLI) with nothing written,
or correct handling (the output loads, passes the checker, and computes what the input did on
onnxruntime). A SIGALRM guard turns a hang into a failure. Hypothesis runs without a database
(nothing is written to the working folder) and with fixed seeds (``derandomize=True``).
"""

from __future__ import annotations

import contextlib
import io as _stdio
import os
import pathlib
import shutil
import signal
import tempfile

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from onnxopt import io as _io
from onnxopt.cli import main as cli_main
from onnxopt.errors import DataError, ModelLoadError
from onnxopt.runtime import data as _data

FUZZ = settings(
    database=None,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
HANG_SECONDS = 30


@contextlib.contextmanager
def no_hang(seconds: int = HANG_SECONDS):
    """Fail (instead of hanging) when the body runs longer than ``seconds``."""

    def alarm(signum, frame):
        raise TimeoutError(f"no result after {seconds} s: hang")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def mlp(opset: int = 17, ir_version: int | None = None) -> onnx.ModelProto:
    """x[N,4] -> MatMul(W) -> Add(b) -> Relu -> y: ops that exist in every opset from 7 on."""
    w = helper.make_tensor("W", TensorProto.FLOAT, [4, 3], np.linspace(-1, 1, 12).tolist())
    b = helper.make_tensor("b", TensorProto.FLOAT, [3], [0.1, -0.2, 0.3])
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        helper.make_node("Add", ["h", "b"], ["a"], name="add"),
        helper.make_node("Relu", ["a"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version or min(onnx.helper.find_min_ir_version_for([model.opset_import[0]]), 10)
    if model.ir_version < 4:  # IR 3: initializers must also be graph inputs
        graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in (w, b))
        model.graph.CopyFrom(graph)
    return model


def run_cli(workdir: pathlib.Path, *args: str) -> tuple[int, str]:
    err = _stdio.StringIO()
    with no_hang(), contextlib.redirect_stderr(err), contextlib.redirect_stdout(_stdio.StringIO()):
        code = cli_main(list(args))
    return code, err.getvalue()


def assert_clean_failure_or_correct(workdir: pathlib.Path, model_path: pathlib.Path, code: int, err: str) -> None:
    """Exit 2 with one line and nothing written, or exit 0 with a correct output model."""
    out = workdir / "out.onnx"
    leftovers = [p.name for p in workdir.iterdir() if p.name.startswith(".onnxopt-")]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    if code != 0:
        lines = err.strip().splitlines()
        assert code == 2, err
        assert len(lines) == 1 and lines[0].startswith("onnxopt: error:"), err
        assert not out.exists() and not (workdir / "out.onnx.data").exists()
        return
    onnx.checker.check_model(str(out), full_check=True)
    import onnxruntime as ort

    ref = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    cand = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feeds = {}
    for i in ref.get_inputs():
        shape = [d if isinstance(d, int) else 2 for d in i.shape]
        if np.prod(shape, dtype=object) > 1 << 24:  # optimized with its checks skipped (a note)
            return
        feeds[i.name] = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for r, c in zip(ref.run(None, feeds), cand.run(None, feeds), strict=True):
        # Lossless passes on a 4-wide MLP with weights in [-1, 1]: float noise ~1e-7 on any CPU.
        np.testing.assert_allclose(c, r, rtol=1e-4, atol=1e-5)


@pytest.fixture
def workdir():
    # One fresh folder per hypothesis example (tmp_path is per test, not per example).
    path = pathlib.Path(tempfile.mkdtemp(prefix="onnxopt-fuzz-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def fresh(workdir: pathlib.Path) -> pathlib.Path:
    for p in workdir.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return workdir


# ---- the loader: truncated and bit-flipped protobufs -------------------------------------------

VALID = mlp().SerializeToString()


@settings(FUZZ, max_examples=300)
@given(cut=st.integers(min_value=0, max_value=len(VALID) - 1))
def test_truncated_protobuf_is_a_load_error_or_a_valid_model(workdir, cut):
    path = fresh(workdir) / "m.onnx"
    path.write_bytes(VALID[:cut])
    with no_hang():
        try:
            model = _io.load_model(path)
        except ModelLoadError as err:
            assert "\n" not in str(err) and str(path) in str(err)
            return
    # A prefix can still parse: then it must be a model we can serialize again.
    onnx.load_from_string(_ir_to_bytes(model))


@settings(FUZZ, max_examples=120)
@given(flips=st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 7)), min_size=1, max_size=8))
def test_bit_flipped_protobuf_is_a_clear_error_or_handled(workdir, flips):
    data = bytearray(VALID)
    for pos, bit in flips:
        data[pos] ^= 1 << bit
    path = fresh(workdir) / "m.onnx"
    path.write_bytes(bytes(data))
    code, err = run_cli(workdir, "optimize", str(path), "-o", str(workdir / "out.onnx"), "-q")
    assert_clean_failure_or_correct(workdir, path, code, err)


def _ir_to_bytes(model) -> bytes:
    import onnx_ir as ir

    return ir.to_proto(model).SerializeToString()


# ---- malformed graphs through the CLI ----------------------------------------------------------


def _mutate(model: onnx.ModelProto, how: str) -> onnx.ModelProto:
    g = model.graph
    if how == "cycle":
        g.node[0].input[0] = "y"  # mm reads relu's output: mm -> add -> relu -> mm
    elif how == "duplicate_output":
        g.node[1].output[0] = "h"  # Add also writes 'h'
        g.node[2].input[0] = "h"
    elif how == "duplicate_graph_input":
        g.input.append(g.input[0])
    elif how == "empty_output_name":
        g.node[1].output[0] = ""
        g.node[2].input[0] = ""
    elif how == "empty_graph_output":
        g.output[0].name = ""
    elif how == "dangling_input":
        g.node[1].input[1] = "nowhere"
    elif how == "missing_initializer":
        del g.initializer[0]
    elif how == "unknown_op":
        g.node[2].op_type = "FrobnicateAll"
    elif how == "unknown_domain":
        g.node[2].domain = "com.example.unknown"
        model.opset_import.append(helper.make_opsetid("com.example.unknown", 1))
    elif how == "undeclared_domain":
        g.node[2].domain = "com.example.undeclared"
    elif how == "zero_size_input":
        g.input[0].type.tensor_type.shape.dim[1].dim_value = 0
        g.initializer[0].CopyFrom(helper.make_tensor("W", TensorProto.FLOAT, [0, 3], []))
    elif how == "zero_size_initializer":
        g.initializer[1].CopyFrom(helper.make_tensor("b", TensorProto.FLOAT, [0], []))
    elif how == "huge_dim_input":
        g.input[0].type.tensor_type.shape.dim[0].dim_value = 2**40
    elif how == "huge_dim_initializer":
        t = g.initializer[0]
        del t.dims[:]
        t.dims.extend([2**31, 2**31])  # claims 2^62 elements, holds 12
    elif how == "wrong_initializer_size":
        t = g.initializer[1]
        del t.float_data[:]
        t.float_data.extend([1.0])  # dims say 3
    elif how == "no_outputs":
        del g.output[:]
    elif how == "none":
        pass
    else:  # pragma: no cover
        raise AssertionError(how)
    return model


MUTATIONS = [
    "none",
    "cycle",
    "duplicate_output",
    "duplicate_graph_input",
    "empty_output_name",
    "empty_graph_output",
    "dangling_input",
    "missing_initializer",
    "unknown_op",
    "unknown_domain",
    "undeclared_domain",
    "zero_size_input",
    "zero_size_initializer",
    "huge_dim_input",
    "huge_dim_initializer",
    "wrong_initializer_size",
    "no_outputs",
]


@settings(FUZZ, max_examples=80)
@given(how=st.sampled_from(MUTATIONS), opset=st.integers(7, 23))
def test_malformed_graphs_fail_cleanly_or_optimize_correctly(workdir, how, opset):
    model = _mutate(mlp(opset), how)
    path = fresh(workdir) / "m.onnx"
    path.write_bytes(model.SerializeToString())
    code, err = run_cli(workdir, "optimize", str(path), "-o", str(workdir / "out.onnx"), "-q")
    if how == "none":
        assert code == 0, err
    assert_clean_failure_or_correct(workdir, path, code, err)


# What the one error line must name (None: handled, exit 0). Before the fixes these were
# "internal error" tracebacks (clone_graph RuntimeError, onnxruntime errors, a 32 TiB MemoryError).
EXPECTED = {
    "none": None,
    "cycle": "topologically sorted",
    "duplicate_output": "single static assignment",
    "duplicate_graph_input": "single static assignment",
    "empty_output_name": "empty string",
    "empty_graph_output": "required to be non-empty",
    "dangling_input": "input 'nowhere'",
    "missing_initializer": "input 'W'",
    "unknown_op": "No Op registered for FrobnicateAll",
    "unknown_domain": "onnxruntime cannot run the input model",
    "undeclared_domain": "No opset import for domain",
    "zero_size_input": None,
    "zero_size_initializer": "onnxruntime cannot run the input model",
    "huge_dim_input": None,  # written, its checks skipped with a note: no feed fits in memory
    "huge_dim_initializer": "too small for the declared shape",
    "wrong_initializer_size": "too small for the declared shape",
    "no_outputs": "no outputs",
}


@pytest.mark.parametrize("how", MUTATIONS)
def test_every_malformation_is_tried_once(workdir, how):
    # The hypothesis run above samples; this makes sure each kind is exercised at least once.
    model = _mutate(mlp(17), how)
    path = fresh(workdir) / "m.onnx"
    path.write_bytes(model.SerializeToString())
    code, err = run_cli(workdir, "optimize", str(path), "-o", str(workdir / "out.onnx"), "-q")
    assert_clean_failure_or_correct(workdir, path, code, err)
    needle = EXPECTED[how]
    assert (code == 0) if needle is None else (needle in err), err


# ---- external data pointing outside the folder or to missing files ----------------------------


def _with_external(workdir: pathlib.Path, location: str, offset: int, length: int | None) -> pathlib.Path:
    model = mlp()
    w = model.graph.initializer[0]
    nbytes = 12 * 4
    (workdir / "w.bin").write_bytes(np.linspace(-1, 1, 12).astype(np.float32).tobytes())
    w.ClearField("float_data")
    w.data_location = TensorProto.EXTERNAL
    entries = {"location": location, "offset": str(offset)}
    if length is not None:
        entries["length"] = str(length if length >= 0 else nbytes)
    for k, v in entries.items():
        e = w.external_data.add()
        e.key, e.value = k, v
    path = workdir / "m.onnx"
    path.write_bytes(model.SerializeToString())
    return path


LOCATIONS = ["w.bin", "../w.bin", "/etc/passwd", "missing.bin", "sub/../w.bin", "./w.bin", "sub/../../w.bin", ""]


@settings(FUZZ, max_examples=60)
@given(
    location=st.sampled_from(LOCATIONS),
    offset=st.sampled_from([0, 4, 48, 4096]),
    length=st.sampled_from([None, -1, 0, 8, 10**9]),
)
def test_external_data_outside_the_folder_or_missing(workdir, location, offset, length):
    path = _with_external(fresh(workdir), location, offset, length)
    code, err = run_cli(workdir, "optimize", str(path), "-o", str(workdir / "out.onnx"), "-q")
    if location.startswith(("/", "..")) or location.count("..") > 1:
        assert code == 2 and ("absolute" in err or "escapes" in err), err
    assert_clean_failure_or_correct(workdir, path, code, err)


# ---- data readers: npz with wrong names, dtypes, shapes, NaN, junk -----------------------------

SIGNATURE = [_data.InputSpec("x", np.dtype(np.float32), ("N", 4))]


@st.composite
def npz_arrays(draw):
    arrays = {}
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(["x", "X", "y", "label", "x ", ""]))
        dtype = draw(st.sampled_from([np.float32, np.float64, np.int64, np.float16, np.bool_]))
        shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=4))
        arr = np.ones(shape, dtype=dtype)
        if arr.size and dtype in (np.float32, np.float64, np.float16) and draw(st.booleans()):
            arr.flat[draw(st.integers(0, arr.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        arrays[name] = arr
    return arrays


def _consume(dataset) -> int:
    n = 0
    for feed in dataset:
        _data.check_feed(feed, SIGNATURE, "fuzz")
        n += 1
    return n


@settings(FUZZ, max_examples=150)
@given(arrays=npz_arrays(), as_folder=st.booleans())
def test_npz_readers_give_data_errors_or_valid_feeds(workdir, arrays, as_folder):
    root = fresh(workdir)
    target = root / "feeds" if as_folder else root / "d.npz"
    if as_folder:
        target.mkdir()
        np.savez(target / "0.npz", **arrays)
    else:
        np.savez(target, **arrays)
    with no_hang():
        try:
            dataset = _data.load_data(target, SIGNATURE)
            assert _consume(dataset) == len(dataset)
        except DataError as err:
            assert "\n" not in str(err)


@settings(FUZZ, max_examples=150)
@given(blob=st.binary(max_size=300), keep=st.integers(0, 400))
def test_junk_and_truncated_npz_are_data_errors(workdir, blob, keep):
    root = fresh(workdir)
    buf = _stdio.BytesIO()
    np.savez(buf, x=np.ones((2, 4), np.float32))
    good = buf.getvalue()
    (root / "junk.npz").write_bytes(blob)
    (root / "cut.npz").write_bytes(good[: keep % len(good)])
    for name in ("junk.npz", "cut.npz"):
        with no_hang(), pytest.raises(DataError):
            _consume(_data.load_data(root / name, SIGNATURE))


def test_npz_with_pickled_objects_is_refused(workdir):
    path = fresh(workdir) / "obj.npz"
    np.savez(path, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match="cannot read"):
        _consume(_data.load_data(path, SIGNATURE))


# ---- CLI option strings ------------------------------------------------------------------------

_spec_text = st.text(alphabet=st.sampled_from("simplfy:=,.-_0123456789 xTrueFalse"), max_size=30)


@settings(FUZZ, max_examples=80)
@given(spec=_spec_text, use_recipe=st.booleans())
def test_garbage_pass_and_recipe_specs_fail_cleanly(workdir, spec, use_recipe):
    root = fresh(workdir)
    path = root / "m.onnx"
    path.write_bytes(VALID)
    flag = "--recipe" if use_recipe else "--pass"
    code, err = run_cli(root, "optimize", str(path), "-o", str(root / "out.onnx"), "-q", flag, spec)
    assert_clean_failure_or_correct(root, path, code, err)


def test_output_over_input_is_refused_and_input_kept(workdir):
    root = fresh(workdir)
    path = root / "m.onnx"
    path.write_bytes(VALID)
    code, err = run_cli(root, "optimize", str(path), "-o", str(path), "-q")
    assert code == 2 and "overwrite the input" in err
    assert path.read_bytes() == VALID
    assert os.listdir(root) == ["m.onnx"]


def test_external_data_through_a_symlink_out_of_the_folder_is_refused(workdir):
    root = fresh(workdir)
    inner = root / "model"
    inner.mkdir()
    path = _with_external(inner, "w.bin", 0, -1)
    (inner / "w.bin").rename(root / "secret.bin")
    (inner / "w.bin").symlink_to(root / "secret.bin")  # the data lives outside the model folder
    code, err = run_cli(inner, "optimize", str(path), "-o", str(inner / "out.onnx"), "-q")
    assert code == 2 and "escapes the model's folder" in err, err
    assert not (inner / "out.onnx").exists()
