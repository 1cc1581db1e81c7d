"""Weights stored in Constant nodes are lifted into initializers once, before the first pass."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from onnxopt import api, normalize, pipeline
from onnxopt.cli import main
from onnxopt.context import PassContext
from onnxopt.pass_base import make
from onnxopt.runtime import sessions as runtime
from onnxopt.runtime import validation
from onnxopt.testing import builders
from tests.conftest import op_counts
from tests.passes.compress_models import cnn, feeds, mlp
from tests.tolerances import TOL


def _as_constant_nodes(model: ir.Model) -> ir.Model:
    """The same model with every initializer stored as a Constant node of the same name."""
    proto = ir.to_proto(model)
    constants = [helper.make_node("Constant", [], [t.name], value=t, name=f"const_{t.name}") for t in proto.graph.initializer]
    nodes = constants + list(proto.graph.node)
    proto.graph.ClearField("initializer")
    proto.graph.ClearField("node")
    proto.graph.node.extend(nodes)
    onnx.checker.check_model(proto, full_check=True)
    return ir.from_proto(proto)


def _run_outputs(model: ir.Model | bytes, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    blob = model if isinstance(model, bytes) else ir.to_proto(model).SerializeToString()
    return ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"]).run(None, feed)


def test_lift_is_exact_and_keeps_names():
    reference = cnn()
    model = _as_constant_nodes(cnn())
    arrays = {n: v.const_value.numpy() for n, v in reference.graph.initializers.items()}
    assert op_counts(model)["Constant"] == len(arrays) == 10
    result = normalize.lift_constants(model)
    assert result.lifted == 10 and not result.kept
    assert result.elements == sum(a.size for a in arrays.values())
    assert result.nbytes == sum(a.nbytes for a in arrays.values())
    assert (result.nodes_before, result.nodes_after) == (18, 8)
    assert "Constant" not in op_counts(model)
    assert list(model.graph.initializers) == list(arrays)  # same names, same order
    for name, array in arrays.items():
        np.testing.assert_array_equal(model.graph.initializers[name].const_value.numpy(), array)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    # Exact: the same tensors, so onnxruntime computes bit-identical outputs.
    feed = next(iter(feeds(model, 1)))
    for a, b in zip(_run_outputs(reference, feed), _run_outputs(model, feed), strict=True):
        np.testing.assert_array_equal(a, b)
    # A second call finds nothing to do.
    again = normalize.lift_constants(model)
    assert again.lifted == 0 and again.note() == ""


def test_scalar_and_list_forms_lift_to_typed_initializers_others_stay():
    w = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "w")
    nodes = [
        helper.make_node("Constant", [], ["w"], value=w),
        helper.make_node("Constant", [], ["f"], value_float=0.5),
        helper.make_node("Constant", [], ["fs"], value_floats=[1.0, 2.0, 3.0]),
        helper.make_node("Constant", [], ["i"], value_int=2),
        helper.make_node("Constant", [], ["is"], value_ints=[1, 3]),
        helper.make_node("Constant", [], ["s"], value_strings=["a", "b"]),  # a graph output too
        helper.make_node("Constant", [], ["unused"], value_strings=["c"]),
        helper.make_node("Constant", [], ["graph_out"], value_floats=[7.0]),
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("Mul", ["m", "f"], ["m2"]),
        helper.make_node("Add", ["m2", "fs"], ["m3"]),
        helper.make_node("Reshape", ["m3", "is"], ["y0"]),
        helper.make_node("Unsqueeze", ["y0", "i"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "forms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 1]),
         helper.make_tensor_value_info("s", TensorProto.STRING, [2]),
         helper.make_tensor_value_info("graph_out", TensorProto.FLOAT, [1])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    model = ir.from_proto(proto)
    result = normalize.lift_constants(model)
    inits = model.graph.initializers
    assert result.lifted == 5
    assert result.kept == {"value_strings attribute": 1, "output is a graph output": 2}
    assert (inits["f"].const_value.dtype, inits["f"].const_value.shape.dims) == (ir.DataType.FLOAT, ())
    assert (inits["fs"].const_value.dtype, inits["fs"].const_value.shape.dims) == (ir.DataType.FLOAT, (3,))
    assert (inits["i"].const_value.dtype, inits["i"].const_value.shape.dims) == (ir.DataType.INT64, ())
    np.testing.assert_array_equal(inits["is"].const_value.numpy(), np.array([1, 3], np.int64))
    assert [n.op_type for n in model.graph].count("Constant") == 3
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    feed = {"x": np.array([[1.0, -2.0]], np.float32)}
    for a, b in zip(_run_outputs(proto.SerializeToString(), feed), _run_outputs(model, feed), strict=True):
        np.testing.assert_array_equal(a, b)


def test_subgraph_constants_become_that_subgraphs_initializers():
    w = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    then_g = helper.make_graph(
        [helper.make_node("Constant", [], ["wt"], value=numpy_helper.from_array(w)), helper.make_node("MatMul", ["x", "wt"], ["yt"])],
        "then", [], [helper.make_tensor_value_info("yt", TensorProto.FLOAT, [2, 4])],
    )
    else_g = helper.make_graph(
        [helper.make_node("Constant", [], ["s"], value_float=2.0), helper.make_node("Mul", ["x", "s"], ["ye"])],
        "else", [], [helper.make_tensor_value_info("ye", TensorProto.FLOAT, [2, 4])],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]), helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    model = ir.from_proto(proto)
    assert normalize.lift_constants(model).lifted == 2
    then_ir, else_ir = (model.graph.node(0).attributes[k].as_graph() for k in ("then_branch", "else_branch"))
    assert list(then_ir.initializers) == ["wt"] and list(else_ir.initializers) == ["s"]
    assert not model.graph.initializers
    pipeline.check_model(model)  # onnx's full checker accepts subgraph initializers
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    for cond in (True, False):
        feed = {"x": x, "c": np.array(cond)}
        np.testing.assert_array_equal(_run_outputs(proto.SerializeToString(), feed)[0], _run_outputs(model, feed)[0])


def test_ir_version_3_keeps_constants_and_says_why():
    proto = ir.to_proto(_as_constant_nodes(mlp()))
    proto.ir_version = 3  # initializers would have to be graph inputs, i.e. overridable
    model = ir.from_proto(proto)
    result = normalize.lift_constants(model)
    assert result.lifted == 0 and result.kept == {"IR version 3 < 4": 5}
    assert op_counts(model)["Constant"] == 5
    assert "IR version 3 < 4" in result.note() and "passes skip weights stored there" in result.note()


def test_external_tensor_is_moved_not_read(tmp_path):
    """A Constant whose tensor lives in an external file: the lifted initializer is that tensor."""
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    tensor = numpy_helper.from_array(w, "w")
    (tmp_path / "m.data").write_bytes(tensor.raw_data)
    external_data_helper.set_external_data(tensor, "m.data", offset=0, length=w.nbytes)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["w"], value=tensor), helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.save_model(proto, tmp_path / "m.onnx")
    from onnxopt import io as _io

    model = _io.load_model(tmp_path / "m.onnx")
    stored = model.graph.node(0).attributes["value"].as_tensor()
    assert isinstance(stored, ir.ExternalTensor)
    assert normalize.lift_constants(model).nbytes == w.nbytes
    assert model.graph.initializers["w"].const_value is stored  # moved, not copied or loaded
    result = api.optimize(tmp_path / "m.onnx", tmp_path / "out.onnx", passes=["cluster:clusters=16,pack=true"], quiet=True)
    assert result.reports[0].counts["packed"] == 1 and result.passed


# (pass, options) on the mlp (Gemm, MatMul, Gemm) and the cnn (Conv, BN, Conv, Gemm).
PASSES = [
    ("cluster", {"clusters": 16, "min_elements": 0}),
    ("cluster", {"clusters": 16, "min_elements": 0, "pack": True}),
    ("prune", {"sparsity": 0.5, "min_elements": 0}),
    ("prune", {"sparsity": 0.25, "structured": True, "min_elements": 0}),
    ("quantize-weights", {"min_elements": 0}),
    ("lowrank", {"rank_mode": "ratio", "rank_ratio": 0.25, "min_elements": 0}),
]


@pytest.mark.parametrize("build", [mlp, cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize(("name", "options"), PASSES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(PASSES)])
def test_pass_gives_the_same_result_for_both_storages(build, name, options):
    as_initializers, as_constants = build(), _as_constant_nodes(build())
    results = [
        pipeline.run(m, [make(name, options, PassContext(quiet=True))]) for m in (as_initializers, as_constants)
    ]
    by_init, by_const = results
    assert by_init.reports[0].modified and by_init.reports[0].status == "ok", by_init.reports[0].error
    assert by_const.reports[0].status == "ok", by_const.reports[0].error
    assert by_const.reports[0].counts == by_init.reports[0].counts
    assert by_const.reports[0].skipped == by_init.reports[0].skipped
    assert op_counts(by_const.model) == op_counts(by_init.model)
    assert by_init.lifted.lifted == 0 and by_const.lifted.lifted == len(build().graph.initializers)
    assert by_const.reports[0].notes[0].startswith("weights stored in Constant nodes: ")
    # Same tensors into the same deterministic pass: the outputs agree to float noise at most.
    ds = feeds(by_init.model, 2)
    validation.compare(by_init.model, by_const.model, ds, **TOL["exact"]).assert_ok()


def test_pass_called_directly_on_constant_nodes_skips_and_names_the_fix():
    """Outside the pipeline nothing is lifted: the pass leaves the weights and says why."""
    model = _as_constant_nodes(mlp())
    report = make("cluster", {"min_elements": 0}, PassContext(quiet=True))(model)
    assert not report.modified
    hint = "weight is not a constant initializer (a Constant node: onnxopt.normalize.lift_constants lifts it)"
    assert report.skipped == {f"Gemm: {hint}": 2, f"MatMul: {hint}": 1}


def test_recipe_through_the_python_api_folds_small_constant_batchnorm(tmp_path):
    """conv_bn_model's BatchNorm has 8 channels: simplify alone lifts only >= 16 elements."""
    model = _as_constant_nodes(ir.from_proto(builders.conv_bn_model()))
    path = tmp_path / "m.onnx"
    ir.save(model, path)
    result = api.optimize(path, tmp_path / "out.onnx", recipe="simplify", quiet=True)
    assert result.reports[0].counts["batchnorm_folded"] == 1
    assert "weights stored in Constant nodes: 7 lifted" in result.reports[0].notes[0]
    assert result.passed


def test_cli_pass_cluster_packs_constant_node_weights(tmp_path, capsys):
    """``onnxopt optimize --pass cluster:clusters=16,pack=true`` on a model with Constant weights."""
    model = _as_constant_nodes(mlp(hidden=256))  # W1 256x32, W2 256x24 packed; W3 24x10 < 256 elements
    path, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    ir.save(model, path)
    code = main(["optimize", str(path), "-o", str(out), "--pass", "cluster:clusters=16,pack=true",
                 "--report", str(tmp_path / "r.json")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "note: weights stored in Constant nodes: 5 lifted to initializers" in printed
    report = json.loads((tmp_path / "r.json").read_text())["passes"][0]
    assert report["counts"] == {"packed": 2, "shared": 2}
    assert report["skipped"] == {"weight smaller than min_elements=256": 1}
    written = runtime_model(out)
    counts = op_counts(written)
    assert "Constant" not in counts and counts["Gather"] == 2 and counts["Gemm"] == 2 and counts["MatMul"] == 1
    assert {v.const_value.dtype for n, v in written.graph.initializers.items() if ".idx" in n} == {ir.DataType.UINT8}
    # 4-bit indices: each packed float32 weight shrinks to 1/8 plus a 16-entry codebook and the
    # few rebuild nodes; the packed weights are 96 % of the input's bytes, so the file is below
    # 0.04 + 0.96/8 = 0.16 of the input plus that overhead (a few hundred bytes per weight).
    saved = sum(r["bytes_before"] - r["bytes_after"] for r in report["records"])
    assert saved > 0.8 * 4 * (256 * 32 + 256 * 24)
    assert out.stat().st_size <= path.stat().st_size - saved + 2048
    assert out.stat().st_size < 0.3 * path.stat().st_size


def runtime_model(path: pathlib.Path) -> ir.Model:
    model = ir.load(path)
    with runtime.session(model):  # onnxruntime loads what was written
        pass
    return model


def _rec_model_path() -> pathlib.Path:
    import rapidocr_onnxruntime as ocr

    return next(pathlib.Path(ocr.__file__).parent.glob("models/*rec*.onnx"))


def _text_line(text: str) -> np.ndarray:
    """A rendered text line as the PP-OCR recogniser takes it: [1, 3, 48, W], (x/255 - 0.5)/0.5."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=32)
    image = Image.new("L", (int(font.getlength(text)) + 16, 48), 255)
    ImageDraw.Draw(image).text((8, 6), text, fill=0, font=font)
    x = (np.asarray(image, np.float32) / 255.0 - 0.5) / 0.5
    return np.repeat(x[None, None], 3, axis=1)


def _lifted_by_hand(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Every main-graph Constant(value) node as an initializer (independent of onnxopt.normalize)."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    kept = []
    for node in proto.graph.node:
        if node.op_type == "Constant" and [a.name for a in node.attribute] == ["value"]:
            tensor = onnx.TensorProto.FromString(node.attribute[0].t.SerializeToString())
            tensor.name = node.output[0]
            proto.graph.initializer.append(tensor)
        else:
            kept.append(node)
    proto.graph.ClearField("node")
    proto.graph.node.extend(kept)
    return proto


@pytest.mark.slow
def test_cluster_packs_the_paddle_recogniser(tmp_path):
    """PP-OCRv4 rec (Paddle export, every weight in a Constant node): ``--pass cluster`` packs it."""
    path = _rec_model_path()
    proto = onnx.load(str(path))
    assert not proto.graph.initializer  # the point of the test: weights only in Constant nodes
    sizes = {n.output[0]: int(np.prod(n.attribute[0].t.dims)) for n in proto.graph.node if n.op_type == "Constant"}
    weights = {n.input[1] for n in proto.graph.node if n.op_type in ("Conv", "MatMul", "Gemm") and n.input[1] in sizes}
    expected = sum(1 for w in weights if sizes[w] >= 256)  # cluster's default min_elements
    weight_bytes = 4 * sum(sizes[w] for w in weights if sizes[w] >= 256)

    out = tmp_path / "rec.c16.onnx"
    assert main(["-q", "optimize", str(path), "-o", str(out), "--pass", "cluster:clusters=16,pack=true",
                 "--report", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())["passes"][0]
    assert report["status"] == "ok" and report["counts"] == {"packed": expected, "shared": expected}
    assert not [reason for reason in report["skipped"] if "Constant" in reason]
    assert report["notes"][0].startswith("weights stored in Constant nodes: ")
    # 4-bit indices store each packed float32 weight in 1/8 of its bytes (plus a 64-byte codebook
    # and a few rebuild nodes); the packed weights are most of the file, so it must shrink by at
    # least 7/8 of their bytes, less 1 KB per weight for that overhead.
    assert weight_bytes > 0.9 * path.stat().st_size
    assert out.stat().st_size <= path.stat().st_size - weight_bytes * 7 / 8 + 1024 * expected
    assert out.stat().st_size < 0.5 * path.stat().st_size

    # Lifting is exact: the pipeline's packed model equals the cluster pass run directly on the same
    # model with its Constant nodes turned into initializers by hand (same k-means on the same
    # tensors), bit for bit on a rendered text line; and the input model itself still reads it.
    by_hand = ir.from_proto(_lifted_by_hand(proto))
    direct = make("cluster", {"clusters": 16, "pack": True}, PassContext(quiet=True))(by_hand)
    assert direct.counts == report["counts"]
    feed = {"x": _text_line("Invoice 2024-03-17")}
    packed_out = _run_outputs(onnx.load(str(out)).SerializeToString(), feed)[0]
    np.testing.assert_array_equal(packed_out, _run_outputs(by_hand, feed)[0])
    assert np.isfinite(packed_out).all()
    reference = _run_outputs(proto.SerializeToString(), feed)[0]
    chars = ["", *next(p.value for p in proto.metadata_props if p.key == "character").splitlines(), " "]
    best = reference[0].argmax(-1)
    read = "".join(chars[c] for i, c in enumerate(best) if c and (i == 0 or c != best[i - 1]))
    assert read.strip() == "Invoice 2024-03-17"
