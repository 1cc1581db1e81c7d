"""distill pass: torch evaluator vs onnxruntime, constraints during training, write-back, errors.

Runs where the distill extra is installed (``pip install -e '.[test,distill]'``); the core
suite runs without torch (tests/passes/test_distill_extra.py checks the lazy import).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

torch = pytest.importorskip("torch", reason="needs the distill extra (torch): pip install 'onnxopt[distill]'")

from onnxopt import pipeline, recipes
from onnxopt.context import PassContext
from onnxopt.distill import train as distill_torch
from onnxopt.distill.torch_graph import TorchGraph, UnsupportedOpError
from onnxopt.pass_base import make
from onnxopt.runtime import data
from onnxopt.runtime import sessions as runtime
from tests.conftest import load_model, model_path


def _graph_model(
    nodes: list[onnx.NodeProto], weights: dict[str, np.ndarray], inputs: list, outputs: list, opset: int = 17
) -> ir.Model:
    inits = [onnx.numpy_helper.from_array(v, k) for k, v in weights.items()]
    graph = onnx.helper.make_graph(nodes, "g", inputs, outputs, inits)
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)], ir_version=9)
    return ir.from_proto(proto)


def _build(weights: dict[str, np.ndarray], batch: int | str = "N") -> ir.Model:
    """x[N,16] -> Gemm(transB) -> Relu -> MatMul(lr_u) -> MatMul(lr_v) -> Gemm -> y[N,10]."""
    nodes = [
        onnx.helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1),
        onnx.helper.make_node("Relu", ["h"], ["r"]),
        onnx.helper.make_node("MatMul", ["r", "lr_u"], ["u"]),
        onnx.helper.make_node("MatMul", ["u", "lr_v"], ["v"]),
        onnx.helper.make_node("Gemm", ["v", "w2", "b2"], ["y"]),
    ]
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, 16])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [batch, 10])
    return _graph_model(nodes, weights, [x], [y])


def _ort(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with runtime.session(model) as handle:
        out = handle.run(feeds)
        return [out[name] for name in handle.output_names]


def _torch(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        return [o.numpy() for o in TorchGraph(model)({k: torch.from_numpy(v) for k, v in feeds.items()})]


def _student(rng: np.random.Generator) -> tuple[ir.Model, ir.Model]:
    """(teacher, student): the student's w1 is 60% pruned and its other weights clustered to 4
    values (5 with the zeros), w2 is clustered to 3 values per output channel (MatMul layout: axis 1), and the
    middle layer is a rank-4 factorisation of the teacher's dense 32x32 weight."""
    w1 = rng.standard_normal((32, 16)).astype(np.float32) * 0.5
    w_mid = rng.standard_normal((32, 32)).astype(np.float32) * 0.3
    w2 = rng.standard_normal((32, 10)).astype(np.float32) * 0.5
    b1, b2 = (rng.standard_normal(n).astype(np.float32) * 0.1 for n in (32, 10))
    eye = np.eye(32, dtype=np.float32)
    teacher = _build({"w1": w1, "b1": b1, "lr_u": w_mid, "lr_v": eye, "w2": w2, "b2": b2})
    pruned = np.where(np.abs(w1) > np.quantile(np.abs(w1), 0.6), w1, 0).astype(np.float32)
    levels = np.quantile(pruned[pruned != 0], [0.1, 0.4, 0.6, 0.9]).astype(np.float32)
    clustered = np.where(pruned == 0, 0, levels[np.abs(pruned[..., None] - levels).argmin(-1)]).astype(np.float32)
    w2c = np.empty_like(w2)
    for j in range(10):
        lv = np.quantile(w2[:, j], [0.2, 0.5, 0.8]).astype(np.float32)
        w2c[:, j] = lv[np.abs(w2[:, j, None] - lv).argmin(-1)]
    u, s, vt = np.linalg.svd(w_mid)
    student = _build({
        "w1": clustered, "b1": b1, "lr_u": (u[:, :4] * s[:4]).astype(np.float32),
        "lr_v": vt[:4].astype(np.float32), "w2": w2c, "b2": b2,
    })
    return teacher, student


def _context(teacher: ir.Model, x: np.ndarray, labels: np.ndarray | None = None) -> PassContext:
    ctx = PassContext(calibration=data.Dataset.from_feeds([{"x": x}], "train", labels=labels), quiet=True)
    ctx.teacher = ir.to_proto(teacher).SerializeToString()
    return ctx


@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn", "digits_transformer"])
def test_torch_graph_matches_onnxruntime_on_bundled_models(name):
    model = load_model(f"{name}.onnx")
    feeds = {"input": np.load(model_path(f"{name}_eval.npz"))["input"][:32]}
    np.testing.assert_allclose(_torch(model, feeds)[0], _ort(model, feeds)[0], rtol=1e-4, atol=1e-4)


def test_graph_started_at_an_intermediate_value_gives_the_full_outputs():
    model = load_model("digits_cnn.onnx")
    feeds = {"input": torch.from_numpy(np.load(model_path("digits_cnn_eval.npz"))["input"][:16])}
    full = TorchGraph(model)
    convs = [n for n in model.graph if n.op_type == "Conv"]
    cut = convs[-1].inputs[0].name  # the input of the last convolution
    with torch.no_grad():
        expected, middle = full(feeds, extra=[cut])
        part = full.starting_at([cut])
        got = part({cut: middle})[0]
    assert part.input_names == [cut]
    assert len(part._steps) < len(full._steps)
    # the same torch ops on the same values in the same order: bit-identical, no tolerance
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="no node produces 'nowhere'"):
        full.starting_at(["nowhere"])


def test_graph_drops_each_value_after_its_last_reader_but_returns_outputs_and_extras(rng):
    from onnxopt.distill import torch_graph

    mk = onnx.helper.make_node
    nodes = [mk("Relu", ["x"], ["a"]), mk("Neg", ["a"], ["b"]), mk("Add", ["a", "b"], ["c"]), mk("Abs", ["c"], ["y"])]
    info = onnx.helper.make_tensor_value_info
    model = _graph_model(nodes, {}, [info("x", onnx.TensorProto.FLOAT, [2, 3])], [info("y", onnx.TensorProto.FLOAT, None)])
    graph = TorchGraph(model)
    # "a" is read last by the Add (step 2), "b" too; "x" by the Relu; "c" by the Abs; "y" made last.
    assert [sorted(names) for names in torch_graph._last_uses(graph._steps)] == [["x"], [], ["a", "b"], ["c", "y"]]
    x = rng.standard_normal((2, 3)).astype(np.float32)
    y, a = graph({"x": torch.from_numpy(x)}, extra=["a"])
    np.testing.assert_array_equal(a.numpy(), np.maximum(x, 0))
    np.testing.assert_array_equal(y.numpy(), np.zeros_like(x))


def test_graph_start_that_does_not_separate_the_graph_is_refused(rng):
    mk = onnx.helper.make_node
    nodes = [mk("Relu", ["x"], ["a"]), mk("Neg", ["a"], ["b"]), mk("Add", ["a", "b"], ["y"])]
    info = onnx.helper.make_tensor_value_info
    model = _graph_model(nodes, {}, [info("x", onnx.TensorProto.FLOAT, [2, 3])], [info("y", onnx.TensorProto.FLOAT, [2, 3])])
    with pytest.raises(ValueError, match="Add node .* needs 'a', computed before the cut"):
        TorchGraph(model).starting_at(["b"])


def test_torch_graph_matches_onnxruntime_on_more_ops(rng):
    mk = onnx.helper.make_node
    nodes = [
        mk("Transpose", ["x"], ["t"], perm=[0, 2, 1]),
        mk("LayerNormalization", ["x", "sc", "bi"], ["n"], axis=-1),
        mk("Softmax", ["n"], ["s"], axis=-1),
        mk("Slice", ["s", "st", "en", "ax"], ["sl"]),
        mk("Split", ["sl", "sp"], ["a", "b"], axis=2),
        mk("Concat", ["b", "a"], ["c"], axis=2),
        mk("ReduceMean", ["c"], ["m"], axes=[2], keepdims=1),
        mk("Erf", ["m"], ["e"]),
        mk("Add", ["e", "m"], ["y"]),
        mk("Gather", ["t", "ix"], ["gt"], axis=2),
        mk("ReduceSum", ["gt", "ax"], ["r"]),
        mk("Flatten", ["r"], ["f"], axis=1),
        mk("Gather", ["f", "ix"], ["z"], axis=1),
        mk("MaxPool", ["x4"], ["p"], kernel_shape=[2, 2], pads=[0, 0, 1, 1], strides=[2, 2]),
        mk("AveragePool", ["p"], ["q"], kernel_shape=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1),
        mk("Conv", ["q", "cw"], ["w"], pads=[1, 0, 0, 1], group=2),
    ]
    weights = {
        "sc": np.linspace(0.5, 1.5, 6, dtype=np.float32), "bi": np.linspace(-1, 1, 6, dtype=np.float32),
        "sp": np.array([1, 3], np.int64), "st": np.array([1], np.int64), "en": np.array([5], np.int64),
        "ax": np.array([2], np.int64), "ix": np.array([0, 2, 1], np.int64),
        "cw": rng.standard_normal((4, 1, 2, 2)).astype(np.float32),
    }
    info = onnx.helper.make_tensor_value_info
    f = onnx.TensorProto.FLOAT
    model = _graph_model(
        nodes, weights, [info("x", f, [2, 4, 6]), info("x4", f, [1, 2, 5, 5])],
        [info("y", f, None), info("z", f, None), info("w", f, None)],
    )
    feeds = {
        "x": rng.standard_normal((2, 4, 6)).astype(np.float32),
        "x4": rng.standard_normal((1, 2, 5, 5)).astype(np.float32),
    }
    for got, want in zip(_torch(model, feeds), _ort(model, feeds), strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge", "wrap"])
def test_pad_matches_onnxruntime_in_every_mode(rng, mode):
    """Pad as CREPE's export uses it (constant, asymmetric, on H of NCHW), the other modes, and a crop."""
    mk = onnx.helper.make_node
    nodes = [
        mk("Pad", ["x", "p1", "v"], ["a"], mode=mode),  # all four axes' pads given
        mk("Pad", ["a", "p2", "", "ax"], ["y"], mode=mode),  # axes input (opset 18), a negative pad crops
    ]
    weights = {
        "p1": np.array([0, 0, 2, 0, 0, 0, 3, 1], np.int64), "v": np.array(1.5, np.float32),
        "p2": np.array([1, -1], np.int64), "ax": np.array([-1], np.int64),
    }
    info = onnx.helper.make_tensor_value_info
    model = _graph_model(nodes, weights, [info("x", onnx.TensorProto.FLOAT, [2, 3, 5, 4])],
                         [info("y", onnx.TensorProto.FLOAT, None)], opset=19)  # axes: 18, wrap: 19
    feeds = {"x": rng.standard_normal((2, 3, 5, 4)).astype(np.float32)}
    got, want = _torch(model, feeds)[0], _ort(model, feeds)[0]
    assert got.shape == want.shape == (2, 3, 10, 5)
    np.testing.assert_array_equal(got, want)  # padding copies values: exact


def test_slice_with_negative_steps_matches_onnxruntime(rng):
    """Reversed slices (torch's exporter writes F.pad's pad list reversal as Slice with step -1)."""
    mk = onnx.helper.make_node
    big = np.iinfo(np.int64)
    nodes = [
        mk("Slice", ["x", "s1", "e1", "a1", "st1"], ["a"]),  # whole axis reversed, open end
        mk("Slice", ["a", "s2", "e2", "a2", "st2"], ["y"]),  # step -2 from past the end, and a plain axis
    ]
    weights = {
        "s1": np.array([-1], np.int64), "e1": np.array([big.min], np.int64), "a1": np.array([1], np.int64),
        "st1": np.array([-1], np.int64),
        "s2": np.array([100, 1], np.int64), "e2": np.array([0, 4], np.int64), "a2": np.array([2, 0], np.int64),
        "st2": np.array([-2, 2], np.int64),
    }
    info = onnx.helper.make_tensor_value_info
    model = _graph_model(nodes, weights, [info("x", onnx.TensorProto.FLOAT, [5, 4, 7])],
                         [info("y", onnx.TensorProto.FLOAT, None)])
    feeds = {"x": rng.standard_normal((5, 4, 7)).astype(np.float32)}
    got, want = _torch(model, feeds)[0], _ort(model, feeds)[0]
    assert got.shape == want.shape == (2, 4, 3)
    np.testing.assert_array_equal(got, want)


def test_fast_paths_match_onnxruntime_and_the_plain_forms_gradients(rng, monkeypatch):
    """Channels-last 2-D Conv and scalar-bound Clip (torch_ops.FAST_PATHS) change speed, not results."""
    from onnxopt.distill import torch_ops

    mk = onnx.helper.make_node
    nodes = [
        mk("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        mk("Add", ["c1", "three"], ["a"]),
        mk("Clip", ["a", "zero", "six"], ["k"]),  # written-out HardSwish, as paddle2onnx exports it
        mk("Mul", ["c1", "k"], ["m"]),
        mk("Div", ["m", "six"], ["h"]),
        mk("Conv", ["h", "dw"], ["d"], pads=[0, 1, 0, 1], group=4),
        mk("Clip", ["d", "", "six"], ["y"]),
    ]
    weights = {
        "w1": rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "b1": rng.standard_normal(4).astype(np.float32),
        "dw": rng.standard_normal((4, 1, 1, 3)).astype(np.float32),
        "three": np.array(3, np.float32), "zero": np.array(0, np.float32), "six": np.array(6, np.float32),
    }
    info = onnx.helper.make_tensor_value_info
    model = _graph_model(nodes, weights, [info("x", onnx.TensorProto.FLOAT, [2, 3, 6, 7])],
                         [info("y", onnx.TensorProto.FLOAT, None)])
    x = (rng.standard_normal((2, 3, 6, 7)) * 2).astype(np.float32)
    want = _ort(model, {"x": x})[0]
    graph = TorchGraph(model)
    results = {}
    for fast in (False, True):
        monkeypatch.setattr(torch_ops, "FAST_PATHS", fast)
        w = {k: v.clone().requires_grad_(True) for k, v in graph.constants.items() if v.numel() > 1}
        out = graph({"x": torch.from_numpy(x)}, w)[0]
        (out**2).sum().backward()
        results[fast] = (out.detach().numpy(), {k: v.grad.numpy() for k, v in w.items()})
        # float32 sums of at most 27 products per output: agreement to a few ulp of the values
        np.testing.assert_allclose(results[fast][0], want, rtol=1e-5, atol=1e-5)
    for name, grad in results[False][1].items():
        # the same sums in another order: a float32 rounding difference, relative to the gradient
        tol = 1e-5 * float(np.abs(grad).max())
        np.testing.assert_allclose(results[True][1][name], grad, rtol=1e-5, atol=tol, err_msg=name)
    assert np.abs(results[True][1]["w1"]).max() > 0


def test_clip_bound_that_needs_a_gradient_keeps_it(monkeypatch):
    from onnxopt.distill import torch_ops

    monkeypatch.setattr(torch_ops, "FAST_PATHS", True)
    clip = torch_ops.OPS["Clip"]({}, 13)
    hi = torch.tensor(0.5, requires_grad=True)
    clip([torch.tensor([0.2, 0.9, 1.5]), torch.tensor(0.0), hi])[0].sum().backward()
    assert float(hi.grad) == 2.0  # two elements clamped at the upper bound


def test_torch_graph_comparisons_and_constant_of_shape_match_onnxruntime():
    mk = onnx.helper.make_node
    fill = onnx.numpy_helper.from_array(np.array([2.5], np.float32))
    nodes = [
        mk("Shape", ["x"], ["s"]), mk("ConstantOfShape", ["s"], ["c"], value=fill),
        mk("Less", ["x", "c"], ["l"]), mk("Greater", ["x", "c"], ["g"]), mk("Or", ["l", "g"], ["o"]),
        mk("Not", ["o"], ["n"]), mk("Equal", ["x", "c"], ["e"]), mk("And", ["n", "e"], ["y"]),
    ]
    info = onnx.helper.make_tensor_value_info
    model = _graph_model(nodes, {}, [info("x", onnx.TensorProto.FLOAT, [3, 4])],
                         [info("y", onnx.TensorProto.BOOL, None), info("c", onnx.TensorProto.FLOAT, None)])
    feeds = {"x": np.array([[2.5, 1, 3, 2.5]] * 3, np.float32)}
    for got, want in zip(_torch(model, feeds), _ort(model, feeds), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def test_torch_graph_index_ops_of_bert_exports_match_onnxruntime():
    """Flatten with axis == rank, Range and IsNaN, as Hugging Face BERT exports use them (batch > 1)."""
    mk = onnx.helper.make_node
    consts = {"zero": np.array(0, np.int64), "one": np.array(1, np.int64)}
    nodes = [
        mk("Flatten", ["m"], ["f"], axis=2),  # [2, 3] -> [6, 1]: axis may equal the rank
        mk("Shape", ["m"], ["s"]), mk("Gather", ["s", "one"], ["n"], axis=0), mk("Range", ["zero", "n", "one"], ["r"]),
        mk("IsNaN", ["x"], ["nan"]),
    ]
    info = onnx.helper.make_tensor_value_info
    model = _graph_model(nodes, consts, [info("m", onnx.TensorProto.INT64, [2, 3]), info("x", onnx.TensorProto.FLOAT, [4])],
                         [info("f", onnx.TensorProto.INT64, None), info("r", onnx.TensorProto.INT64, None),
                          info("nan", onnx.TensorProto.BOOL, None)])
    feeds = {"m": np.arange(6, dtype=np.int64).reshape(2, 3), "x": np.array([1, np.nan, -np.inf, 0], np.float32)}
    for got, want in zip(_torch(model, feeds), _ort(model, feeds), strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def test_codebook_gradient_is_sum_of_member_gradients(rng):
    w = rng.choice(np.array([-0.5, 0.0, 0.25, 1.0], np.float32), size=(8, 16))
    p = distill_torch.make_param("w", w)
    assert p.kind == "codebook" and p.codebook_size == 4
    g = torch.from_numpy(rng.standard_normal(w.shape).astype(np.float32))
    (p.weight() * g).sum().backward()
    p.mask_grad()
    want = [g.numpy()[w == c].sum() for c in np.unique(w)]
    want[1] = 0.0  # the zero centroid is frozen
    np.testing.assert_allclose(p.theta.grad.numpy(), want, rtol=1e-5, atol=1e-5)


def test_constraints_hold_and_student_moves_towards_teacher(rng):
    teacher, student = _student(rng)
    x = rng.standard_normal((400, 16)).astype(np.float32)
    before = {n: v.const_value.numpy().copy() for n, v in student.graph.initializers.items()}
    nodes_before = [(n.op_type, [i.name for i in n.inputs]) for n in student.graph]
    ctx = _context(teacher, x)
    # Output loss only: hint layers (on by default) also pull the middle features, which this
    # 8-epoch check of "the output moves towards the teacher" does not measure.
    opts = {"epochs": 8, "lr": 1e-2, "threads": 1, "val_fraction": 0.25, "loss": "mse", "hints": "none"}
    report = make("distill", opts, ctx)(student)
    assert report.modified and report.counts["trained"] == 6
    after = {n: v.const_value.numpy() for n, v in student.graph.initializers.items()}
    kinds = {r["item"]: r["constraint"] for r in report.records if "constraint" in r}
    assert kinds["w1"] == "codebook" and kinds["w2"] == "codebook"
    # Zeros stay zero, codebooks stay codebooks (per tensor / per output channel), shapes kept.
    assert np.all(after["w1"][before["w1"] == 0] == 0)
    assert len(np.unique(before["w1"])) == 5  # 4 centroids and the pruned zeros
    assert len(np.unique(after["w1"])) <= 5 and not np.array_equal(after["w1"], before["w1"])
    assert max(len(np.unique(after["w2"][:, j])) for j in range(10)) <= 3
    for name in before:
        assert after[name].shape == before[name].shape and after[name].dtype == np.float32
    assert after["lr_u"].shape == (32, 4) and after["lr_v"].shape == (4, 32)
    assert [(n.op_type, [i.name for i in n.inputs]) for n in student.graph] == nodes_before
    onnx.checker.check_model(ir.to_proto(student), full_check=True)
    # The distilled student is closer to the teacher on fresh data (onnxruntime on both).
    held = {"x": rng.standard_normal((200, 16)).astype(np.float32)}
    t_out = _ort(teacher, held)[0]
    start = _build({k: v for k, v in before.items()})
    err_before = np.linalg.norm(_ort(start, held)[0] - t_out)
    err_after = np.linalg.norm(_ort(student, held)[0] - t_out)
    assert err_after < 0.8 * err_before
    # The written ONNX reproduces the trained torch module.
    np.testing.assert_allclose(_torch(student, held)[0], _ort(student, held)[0], rtol=0, atol=1e-4)
    training = next(r for r in report.records if r["item"] == "training")
    assert training["onnx_vs_torch_max_abs"] <= 1e-4


def test_include_exclude_limit_trained_parameters(rng):
    teacher, student = _student(rng)
    frozen = {n: v.const_value.numpy().copy() for n, v in student.graph.initializers.items()}
    ctx = _context(teacher, rng.standard_normal((128, 16)).astype(np.float32))
    report = make("distill", {"epochs": 2, "threads": 1, "include": "^(w|b)", "exclude": "^b2$", "patience": 0}, ctx)(student)
    assert report.counts["trained"] == 3
    for name in ("lr_u", "lr_v", "b2"):
        np.testing.assert_array_equal(student.graph.initializers[name].const_value.numpy(), frozen[name])


def test_unsupported_op_names_op_and_node_and_leaves_model_unchanged(rng):
    nodes = [
        onnx.helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        onnx.helper.make_node("TopK", ["h", "k"], ["y", "idx"], axis=-1, name="top_k_node"),
    ]
    weights = {"w": rng.standard_normal((4, 6)).astype(np.float32), "k": np.array([2], np.int64)}
    info = onnx.helper.make_tensor_value_info
    model = _graph_model(
        nodes, weights, [info("x", onnx.TensorProto.FLOAT, ["N", 4])],
        [info("y", onnx.TensorProto.FLOAT, ["N", 2])],
    )
    before = ir.to_proto(model).SerializeToString()
    ctx = _context(model.clone(), rng.standard_normal((16, 4)).astype(np.float32))
    with pytest.raises(UnsupportedOpError, match=r"TopK node 'top_k_node'"):
        make("distill", {"epochs": 1}, ctx)(model)
    assert ir.to_proto(model).SerializeToString() == before
    result = pipeline.run(model, [make("distill", {"epochs": 1}, ctx)])
    assert result.reports[0].status == "rolled-back" and "TopK node 'top_k_node'" in result.reports[0].error


def test_fixed_batch_model_trains_in_batches_of_that_size(rng):
    teacher, student = _student(rng)
    weights = {n: v.const_value.numpy() for n, v in student.graph.initializers.items()}
    fixed = _build(weights, batch=8)
    ctx = _context(teacher, rng.standard_normal((100, 16)).astype(np.float32))
    report = make("distill", {"epochs": 2, "threads": 1, "loss": "mse", "patience": 0}, ctx)(fixed)
    assert report.counts["trained"] == 6
    training = next(r for r in report.records if r["item"] == "training")
    assert training["samples"] == 96 and training["held_out"] % 8 == 0
    onnx.checker.check_model(ir.to_proto(fixed), full_check=True)


def test_outputs_without_trainable_inputs_leave_the_model_unchanged(rng):
    weights = {"w": rng.standard_normal((4, 3)).astype(np.float32)}
    nodes = [
        onnx.helper.make_node("MatMul", ["x", "w"], ["h"]),
        onnx.helper.make_node("Relu", ["x"], ["y"]),
    ]
    info = onnx.helper.make_tensor_value_info
    model = _graph_model(nodes, weights, [info("x", onnx.TensorProto.FLOAT, ["N", 4])],
                         [info("y", onnx.TensorProto.FLOAT, ["N", 4])])
    before = ir.to_proto(model).SerializeToString()
    report = make("distill", {"epochs": 1}, _context(model.clone(), rng.standard_normal((8, 4)).astype(np.float32)))(model)
    assert not report.modified and report.skipped["no float output depends on a trainable initializer"] == 1
    assert ir.to_proto(model).SerializeToString() == before


def test_missing_teacher_is_a_precondition_error(rng):
    _, student = _student(rng)
    ctx = PassContext(calibration=data.Dataset.from_feeds([{"x": np.zeros((4, 16), np.float32)}]), quiet=True)
    with pytest.raises(ir.passes.PreconditionError, match="distill needs a teacher"):
        make("distill", {}, ctx)(student)


@pytest.mark.slow
def test_compress_distill_recipe_on_digits_cnn_recovers_accuracy():
    """The recipe's own steps (distill shortened to a few epochs) on the bundled CNN with the
    128 calibration samples (no labels); accuracy measured on the held-out eval set."""
    calib = data.load_data(model_path("digits_cnn_calib.npz"))
    ev = np.load(model_path("digits_cnn_eval.npz"))
    steps = list(recipes.get_recipe("compress-distill").steps)
    assert [s.name for s in steps] == ["teacher", "simplify", "prune", "cluster", "distill", "cluster"]
    steps[4] = recipes.Step("distill", {"epochs": 6, "threads": 1, "lr": 3e-3})
    ctx = PassContext(calibration=calib, quiet=True)
    result = pipeline.run(load_model("digits_cnn.onnx"), recipes.build(steps, ctx))
    assert [r.status for r in result.reports] == ["unchanged", "ok", "ok", "ok", "ok", "ok"]
    compressed = result.reports[3]
    distilled = result.reports[4]
    assert distilled.fidelity["cosine"] > 0  # measured by the pipeline against the pass input
    packed = result.reports[5]
    assert packed.counts["packed"] >= 3 and packed.fidelity["max_abs"] <= 1e-5  # packing is exact

    def accuracy(model: ir.Model) -> float:
        return float((_ort(model, {"input": ev["input"]})[0].argmax(1) == ev["label"]).mean())

    ref = accuracy(load_model("digits_cnn.onnx"))
    final = accuracy(result.model)
    assert final >= ref - 0.02, (ref, final, compressed.fidelity)
    onnx.checker.check_model(ir.to_proto(result.model), full_check=True)


def test_softmax_outputs_are_trained_as_log_probabilities(rng):
    logits = rng.standard_normal((16, 5)).astype(np.float32) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert distill_torch.is_probability(probs) and not distill_torch.is_probability(logits)
    assert distill_torch._kinds([probs], "auto") == ["kl_prob"] and distill_torch._kinds([logits], "auto") == ["kl"]
    t = torch.from_numpy(probs)
    same = distill_torch.distill_loss([t.clone()], [t], None, ["kl_prob"], tau=4.0, alpha=1.0)
    assert abs(same.item()) < 1e-6
    # Tempered log-probabilities equal tempered logits (softmax is shift-invariant per row): the
    # loss on probabilities is the loss the logits would give.
    s_logits = torch.from_numpy(rng.standard_normal((16, 5)).astype(np.float32))
    on_probs = distill_torch.distill_loss([torch.softmax(s_logits, 1)], [t], None, ["kl_prob"], 4.0, 1.0)
    on_logits = distill_torch.distill_loss([s_logits], [torch.from_numpy(logits)], None, ["kl"], 4.0, 1.0)
    assert on_probs.item() == pytest.approx(on_logits.item(), rel=1e-4)


def test_sigmoid_scores_are_trained_with_mse_not_a_softmax_over_them(rng):
    """Independent per-class probabilities (CREPE's 360 sigmoid pitch bins): a softmax over values in
    [0, 1] is near-uniform whatever the scores, so auto picks MSE; logits and softmax outputs keep KL."""
    scores = 1 / (1 + np.exp(-rng.standard_normal((16, 360)).astype(np.float32) * 4))
    assert not distill_torch.is_probability(scores)
    assert distill_torch._kinds([scores], "auto") == ["mse"]
    assert distill_torch._kinds([scores], "kl") == ["kl"]  # asked for: as asked
    logits = rng.standard_normal((16, 5)).astype(np.float32) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert distill_torch._kinds([logits, probs], "auto") == ["kl", "kl_prob"]


def test_sequence_softmax_outputs_get_a_kl_term_per_position_and_a_sequence_agreement(rng):
    """[N, positions, classes] probabilities (a CTC recogniser's output) are distributions per position."""
    from onnxopt.distill import data as distill_data

    logits = rng.standard_normal((6, 4, 5)).astype(np.float32) * 3
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    hidden = rng.standard_normal((6, 4, 5)).astype(np.float32)  # a 3-D hidden state: not classes
    assert distill_torch._kinds([probs], "auto") == ["kl_prob"] and distill_torch._kinds([hidden], "auto") == ["mse"]
    # The sequence loss is the mean of the per-position losses, each computed as a 2-D batch.
    s_logits = rng.standard_normal((6, 4, 5)).astype(np.float32)
    s_probs = torch.softmax(torch.from_numpy(s_logits), -1)
    seq = distill_torch.distill_loss([s_probs], [torch.from_numpy(probs)], None, ["kl_prob"], 2.0, 1.0)
    flat = distill_torch.distill_loss([s_probs.reshape(24, 5)], [torch.from_numpy(probs.reshape(24, 5))], None,
                                      ["kl_prob"], 2.0, 1.0)
    assert seq.item() == pytest.approx(flat.item(), rel=1e-6) and seq.item() > 0
    student = probs.copy()
    student[0, 2] = np.eye(5, dtype=np.float32)[(probs[0, 2].argmax() + 1) % 5]  # one position, another top class
    got = distill_data.agreement(student, probs, None)
    assert got["sequence_agreement"] == pytest.approx(5 / 6)
    assert got["position_agreement"] == pytest.approx(23 / 24)


def test_sequence_model_is_trained_and_scored_per_position(rng):
    """A per-step softmax over 12 positions: training is kept (the early stopping steers by the
    share of agreeing positions) and the report gives position and sequence agreement."""
    mk = onnx.helper.make_node
    info = onnx.helper.make_tensor_value_info
    nodes = [mk("MatMul", ["x", "w"], ["z"]), mk("Softmax", ["z"], ["y"], axis=-1)]

    def model(w: np.ndarray) -> ir.Model:
        return _graph_model(nodes, {"w": w}, [info("x", onnx.TensorProto.FLOAT, ["N", 12, 8])],
                            [info("y", onnx.TensorProto.FLOAT, ["N", 12, 6])])

    w = (rng.standard_normal((8, 6)) * 2).astype(np.float32)
    noisy = (w + rng.standard_normal(w.shape) * 1.5).astype(np.float32)
    x = rng.standard_normal((300, 12, 8)).astype(np.float32)
    student = model(noisy)
    opts = {"epochs": 20, "lr": 5e-2, "threads": 1, "val_fraction": 0.2, "hints": "none", "tau": 1.0}
    report = make("distill", opts, _context(model(w), x))(student)
    training = next(r for r in report.records if r["item"] == "training")
    before, after = training["before"], training["after"]
    assert set(before) == {"sequence_agreement", "position_agreement"}
    assert training["best_epoch"] > 0 and report.modified
    # 720 held-out positions (binomial sd <= 0.02): measured 0.58 -> 0.88 on this seed
    assert after["position_agreement"] > before["position_agreement"] + 0.2
    assert after["sequence_agreement"] >= before["sequence_agreement"]


@pytest.mark.parametrize(("share", "copies"), [(3, 2), (1, 0)])
def test_augment_to_caps_the_copies_at_a_training_set_size(share, copies):
    """``augment_to`` = ``share`` x the training samples: ``share - 1`` copies (8 asked), so a large
    data set is not multiplied; the report says how many were made and why."""
    calib = data.load_data(model_path("digits_cnn_calib.npz"))
    n = sum(next(iter(f.values())).shape[0] for f in calib)
    train = n - round(0.2 * n)  # val_fraction 0.2, the default
    ctx = PassContext(calibration=calib, quiet=True)
    steps = [recipes.Step("teacher"), recipes.Step("prune", {"sparsity": 0.8, "skip_last": True}),
             recipes.Step("distill", {"epochs": 1, "threads": 1, "augment": 8, "augment_to": share * train, "hints": "none"})]
    report = pipeline.run(load_model("digits_cnn.onnx"), recipes.build(steps, ctx)).reports[2]
    training = next(r for r in report.records if r["item"] == "training")
    assert training["samples"] - training["held_out"] == train
    assert training["augmented"] == copies * train
    assert any(f"augmentation: {copies} copies per sample, not 8" in note for note in report.notes)


def test_augment_to_says_nothing_of_copies_where_nothing_is_augmented():
    """Rows of 64 features are not images: the one note is that augmentation is off."""
    calib = data.load_data(model_path("digits_mlp_calib.npz"))
    ctx = PassContext(calibration=calib, quiet=True)
    steps = [recipes.Step("teacher"), recipes.Step("prune", {"sparsity": 0.5}),
             recipes.Step("distill", {"epochs": 1, "threads": 1, "augment": 8, "augment_to": 16, "hints": "none"})]
    report = pipeline.run(load_model("digits_mlp.onnx"), recipes.build(steps, ctx)).reports[2]
    notes = [note for note in report.notes if note.startswith("augmentation")]
    assert notes == ["augmentation off: no input is an image batch (float [N, C<=4, H>=8, W>=8])"]
    assert next(r for r in report.records if r["item"] == "training")["augmented"] == 0


def test_freeze_first_leaves_the_first_layers_untrained():
    calib = data.load_data(model_path("digits_cnn_calib.npz"))
    ctx = PassContext(calibration=calib, quiet=True)
    steps = [recipes.Step("teacher"), recipes.Step("prune", {"sparsity": 0.8, "skip_last": True}),
             recipes.Step("distill", {"epochs": 1, "threads": 1, "augment": 0, "hints": "none", "patience": 0,
                                      "freeze_first": 0.5})]
    before = load_model("digits_cnn.onnx")
    make("prune", {"sparsity": 0.8, "skip_last": True})(before)  # what the distill step starts from
    result = pipeline.run(load_model("digits_cnn.onnx"), recipes.build(steps, ctx))
    layers = [n for n in result.model.graph if n.op_type in ("Conv", "Gemm", "MatMul")]
    frozen = {v.name for n in layers[: round(0.5 * len(layers))] for v in n.inputs[1:] if v is not None}
    assert frozen and result.reports[2].skipped["frozen (freeze_first)"] == len(frozen)
    for name, value in result.model.graph.initializers.items():
        same = np.array_equal(value.const_value.numpy(), before.graph.initializers[name].const_value.numpy())
        if name in frozen:
            assert same, name
    trained = [r["item"] for r in result.reports[2].records if "constraint" in r]
    assert trained and not frozen & set(trained)


def test_warmup_rises_to_the_peak_then_decays_to_zero():
    """warmup=0.5 over 2 epochs: the LR peaks as the first epoch ends and is 0 after the last step."""
    calib = data.load_data(model_path("digits_cnn_calib.npz"))
    ctx = PassContext(calibration=calib, quiet=True)
    steps = [recipes.Step("teacher"), recipes.Step("prune", {"sparsity": 0.8, "skip_last": True}),
             recipes.Step("distill", {"epochs": 2, "threads": 1, "augment": 0, "hints": "none", "patience": 0,
                                      "lr": 0.002, "warmup": 0.5})]
    report = pipeline.run(load_model("digits_cnn.onnx"), recipes.build(steps, ctx)).reports[2]
    history = next(r for r in report.records if r["item"] == "training")["history"]
    assert history[0]["lr"] == pytest.approx(0.002) and history[1]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_augmented_hinted_distillation_reports_agreement_and_keeps_constraints():
    """digits CNN (input [N, 1, 8, 8]: an image): pruned and clustered, then distilled with two
    augmented copies per training sample and the automatic hint layers."""
    calib = data.load_data(model_path("digits_cnn_calib.npz"))
    ctx = PassContext(calibration=calib, quiet=True)
    steps = [recipes.Step("teacher"), recipes.Step("simplify"),
             recipes.Step("prune", {"sparsity": 0.8, "scope": "global", "skip_last": True}),
             recipes.Step("cluster", {"clusters": 16, "per_channel": True, "min_elements": 0}),
             recipes.Step("distill", {"epochs": 2, "threads": 1, "augment": 2, "patience": 0})]
    result = pipeline.run(load_model("digits_cnn.onnx"), recipes.build(steps, ctx))
    assert [r.status for r in result.reports] == ["unchanged", "ok", "ok", "ok", "ok"]
    clustered, distilled = result.reports[3], result.reports[4]
    training = next(r for r in distilled.records if r["item"] == "training")
    n, held = training["samples"], training["held_out"]
    assert training["augmented_inputs"] == ["input"] and training["augmented"] == 2 * (n - held)
    assert 1 <= len(training["hints"]) <= 3
    assert set(training["before"]) == set(training["after"]) == {"top1_agreement"}
    assert all("val_agreement" in row for row in training["history"])
    # Constraints: the zeros of the pruned model stay zero, each clustered channel keeps <= 16 values.
    for rec in clustered.records:
        if "granularity" not in rec:
            continue
        w = result.model.graph.initializers[rec["item"]].const_value.numpy()
        groups = w.reshape(1, -1) if rec["axis"] is None else np.moveaxis(w, rec["axis"], 0).reshape(w.shape[rec["axis"]], -1)
        assert max(len(np.unique(g)) for g in groups) <= 16


@pytest.mark.parametrize(("exclusive", "reverse"), [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_torch_graph_cumsum_matches_onnxruntime(exclusive, reverse):
    """CumSum (MPNet exports number positions with it) on int64 and float, axis from an input."""
    mk = onnx.helper.make_node
    consts = {"ax": np.array(1, np.int64), "neg": np.array(-2, np.int64)}
    nodes = [mk("CumSum", ["m", "ax"], ["ci"], exclusive=exclusive, reverse=reverse),
             mk("CumSum", ["x", "neg"], ["cf"], exclusive=exclusive, reverse=reverse)]
    info = onnx.helper.make_tensor_value_info
    model = _graph_model(nodes, consts, [info("m", onnx.TensorProto.INT64, [2, 5]), info("x", onnx.TensorProto.FLOAT, [3, 4, 2])],
                         [info("ci", onnx.TensorProto.INT64, None), info("cf", onnx.TensorProto.FLOAT, None)])
    feeds = {"m": np.array([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], np.int64),
             "x": np.arange(24, dtype=np.float32).reshape(3, 4, 2) / 8}
    for got, want in zip(_torch(model, feeds), _ort(model, feeds), strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)  # sums of multiples of 1/8: exact in float32
