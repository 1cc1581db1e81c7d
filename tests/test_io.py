from __future__ import annotations

import hashlib
import os
import pathlib

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxopt import io
from onnxopt.errors import ModelLoadError, OutputPathError
from onnxopt.testing.builders import conv_bn_model


def _write(tmp_path: pathlib.Path, name: str = "m.onnx") -> pathlib.Path:
    path = tmp_path / name
    onnx.save(conv_bn_model(), path)
    return path


def test_round_trip_preserves_opsets_ir_version_metadata_and_io(tmp_path):
    src = _write(tmp_path)
    model = io.load_model(src)
    out = io.save_model(model, tmp_path / "out.onnx")
    a, b = onnx.load(src), onnx.load(out)
    assert b.ir_version == a.ir_version == 8
    assert [(o.domain, o.version) for o in b.opset_import] == [(o.domain, o.version) for o in a.opset_import]
    assert {p.key: p.value for p in b.metadata_props} == {"author": "tests"}
    assert [i.name for i in b.graph.input] == ["x"] and [o.name for o in b.graph.output] == ["y"]
    assert b.graph.input[0].type == a.graph.input[0].type
    assert b.graph.output[0].type == a.graph.output[0].type
    onnx.checker.check_model(b, full_check=True)


def test_external_data_round_trip(tmp_path):
    src = _write(tmp_path)
    model = io.load_model(src)
    out = io.save_model(model, tmp_path / "ext.onnx", external_data=True, size_threshold=0)
    assert (tmp_path / "ext.onnx.data").stat().st_size > 0
    reloaded = io.load_model(out)
    assert len(io.external_tensors(reloaded)) == 7
    w_ref = onnx.numpy_helper.to_array(next(t for t in onnx.load(src).graph.initializer if t.name == "W"))
    np.testing.assert_array_equal(reloaded.graph.initializers["W"].const_value.numpy(), w_ref)
    # Saved again without external data, the file stands on its own.
    (tmp_path / "sub").mkdir()
    inline = io.save_model(reloaded, tmp_path / "sub" / "inline.onnx")
    assert not io.external_tensors(io.load_model(inline))


def _external_model(tmp_path: pathlib.Path, location: str) -> pathlib.Path:
    model = conv_bn_model()
    for tensor in model.graph.initializer:
        if tensor.name == "W":
            tensor.ClearField("raw_data")
            tensor.ClearField("float_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            entry = tensor.external_data.add()
            entry.key, entry.value = "location", location
    path = tmp_path / "evil.onnx"
    onnx.save(model, path)
    return path


@pytest.mark.parametrize(
    ("location", "needle"),
    [("../secret.bin", "escapes the model's folder"), ("/etc/passwd", "absolute"), ("missing.bin", "not found")],
)
def test_unsafe_or_missing_external_data_is_refused(tmp_path, location, needle):
    (tmp_path.parent / "secret.bin").write_bytes(b"\0" * 1024)
    path = _external_model(tmp_path, location)
    with pytest.raises(ModelLoadError, match=needle):
        io.load_model(path)


@pytest.mark.parametrize(
    ("content", "needle"),
    [(None, "model file not found"), (b"hello, I am text\n", "not"), ("truncate", "not")],
)
def test_unreadable_models_raise_one_line(tmp_path, content, needle):
    path = tmp_path / "bad.onnx"
    if content == "truncate":
        data = conv_bn_model().SerializeToString()
        path.write_bytes(data[: len(data) // 3])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelLoadError) as err:
        io.load_model(path)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_save_is_atomic_and_refuses_missing_folder_or_input(tmp_path):
    src = _write(tmp_path)
    model = io.load_model(src)
    with pytest.raises(OutputPathError, match="does not exist"):
        io.save_model(model, tmp_path / "nope" / "out.onnx")
    with pytest.raises(OutputPathError, match="overwrite the input"):
        io.save_model(model, src, inputs=(src,))

    class Boom(RuntimeError):
        pass

    def fail(*args, **kwargs):
        raise Boom("disk full")

    original = ir.save
    ir.save = fail
    try:
        with pytest.raises(Boom):
            io.save_model(model, tmp_path / "out.onnx")
    finally:
        ir.save = original
    assert not (tmp_path / "out.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"], "temp files left behind"


def test_optimize_never_modifies_the_input(tmp_path):
    import onnxopt

    src = _write(tmp_path)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    mtime = os.stat(src).st_mtime_ns
    onnxopt.optimize(src, tmp_path / "out.onnx", quiet=True)
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest
    assert os.stat(src).st_mtime_ns == mtime


def _if_model_reading_outer_initializers() -> onnx.ModelProto:
    from onnx import TensorProto, helper

    c = helper.make_tensor("c", TensorProto.FLOAT, [2], [1.0, 2.0])
    unused_by_subgraphs = helper.make_tensor("w", TensorProto.FLOAT, [2], [3.0, 4.0])
    then_graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["t"])], "then", [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])],
    )
    else_graph = helper.make_graph(  # a branch whose output is its own initializer
        [], "else", [], [helper.make_tensor_value_info("k", TensorProto.FLOAT, [2])],
        [helper.make_tensor("k", TensorProto.FLOAT, [2], [5.0, 6.0])],
    )
    graph = helper.make_graph(
        [
            helper.make_node("If", ["cond"], ["y0"], then_branch=then_graph, else_branch=else_graph),
            helper.make_node("Mul", ["y0", "w"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [c, unused_by_subgraphs],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_save_keeps_initializer_types_that_subgraphs_need(tmp_path):
    # Regression (conformance affine_grid_3d_align_corners_expanded after simplify): saving without
    # initializer value_info dropped the types of main-graph initializers read inside an If branch
    # and of a branch initializer that is the branch's output; the full checker then failed.
    model = ir.serde.deserialize_model(_if_model_reading_outer_initializers())
    ir.passes.common.ShapeInferencePass()(model)  # types every value, initializers included
    out = io.save_model(model, tmp_path / "if.onnx")
    onnx.checker.check_model(str(out), full_check=True)
    saved = {v.name for v in onnx.load(str(out)).graph.value_info}
    assert "c" in saved and "w" not in saved  # only the ones inference needs are kept
