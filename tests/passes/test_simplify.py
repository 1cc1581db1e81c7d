from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnxopt.passes.simplify import SimplifyConfig, SimplifyPass

from onnxopt.pass_base import make
from onnxopt.runtime import data, validation
from onnxopt.runtime import sessions as runtime
from onnxopt.testing.builders import conv_bn_feeds, conv_bn_model
from tests.conftest import load_model, model_path, op_counts
from tests.tolerances import REAL_MODEL_MIN_COSINE, TOL


def _model() -> ir.Model:
    return ir.serde.deserialize_model(conv_bn_model())


def test_structure_batchnorm_folded_identity_removed():
    model = _model()
    report = SimplifyPass()(model)
    assert report.counts["batchnorm_folded"] == 1
    assert op_counts(model) == {"Conv": 1, "Relu": 1, "GlobalAveragePool": 1, "Flatten": 1, "Gemm": 1}
    conv = next(n for n in model.graph if n.op_type == "Conv")
    assert conv.metadata_props["pkg.onnxopt.pass"] == "simplify"
    assert [v.name for v in model.graph.outputs] == ["y"]
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def test_numerics_match_within_reassociation_tolerance():
    ref, model = _model(), _model()
    SimplifyPass()(model)
    feeds = data.Dataset.from_feeds([conv_bn_feeds(1)])
    validation.compare(ref, model, feeds, **TOL["reassociate_fp32"]).assert_ok()


def test_gemm_batchnorm_fold_with_beta():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x) => (float[N, 3] y) <
        float[3, 4] W = {1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12.},
        float[3] c = {0.5, -1., 2.},
        float[3] s = {1.5, 0.5, 2.}, float[3] b = {0.1, 0.2, 0.3},
        float[3] m = {1., -1., 0.5}, float[3] v = {0.5, 2., 1.}
    > {
        h = Gemm <transB = 1, beta = 0.5> (x, W, c)
        y = BatchNormalization (h, s, b, m, v)
    }
    """
    ref, model = ir.from_onnx_text(text), ir.from_onnx_text(text)
    report = SimplifyPass()(model)
    assert report.counts["batchnorm_folded"] == 1 and op_counts(model) == {"Gemm": 1}
    feeds = data.random_data(data.input_signature(ref), 2, dims={"N": 5})
    validation.compare(ref, model, feeds, **TOL["reassociate_fp32"]).assert_ok()


def test_per_channel_mul_and_add_after_conv_fold_into_it():
    # MobileOne-style branch scale: Conv -> Mul(c[C,1,1]) -> Add(t[1,C,1,1]) (PP-OCR det has 20 of these).
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 2, 5, 5] x) => (float[N, 3, 5, 5] y) <
        float[3, 2, 3, 3] W = {1., -2., 3., 4., 5., -6., 7., 8., 9., 1., 2., 3., 4., 5., 6., 7., 8., 9.,
                               -1., 2., 3., 4., 5., 6., 7., 8., 9., 1., 2., 3., 4., -5., 6., 7., 8., 9.,
                               1., 2., 3., 4., 5., 6., 7., -8., 9., 1., 2., 3., 4., 5., 6., 7., 8., -9.},
        float[3] b = {0.1, 0.2, 0.3}, float[3, 1, 1] c = {1.5, -0.5, 2.}, float[1, 3, 1, 1] t = {1., 2., -3.}
    > {
        h = Conv <pads = [1, 1, 1, 1]> (x, W, b)
        m = Mul (c, h)
        a = Add (m, t)
        k = Constant <value = float {0.5}> ()
        y = Mul (a, k)
    }
    """
    ref, model = ir.from_onnx_text(text), ir.from_onnx_text(text)
    report = SimplifyPass()(model)
    assert report.counts["affine_folded"] == 3 and op_counts(model) == {"Conv": 1}
    assert [v.name for v in model.graph.outputs] == ["y"]
    feeds = data.random_data(data.input_signature(ref), 2, dims={"N": 2})
    validation.compare(ref, model, feeds, **TOL["reassociate_fp32"]).assert_ok()


@pytest.mark.parametrize("const", ["float[1, 3, 5, 1] c", "float[5] c", "float[3, 5, 5] c"])
def test_mul_by_a_constant_that_is_not_per_channel_is_left_alone(const):
    values = ", ".join(["2."] * {"float[1, 3, 5, 1] c": 15, "float[5] c": 5, "float[3, 5, 5] c": 75}[const])
    text = f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 2, 5, 5] x) => (float[N, 3, 5, 5] y) <
        float[3, 2, 1, 1] W = {{1., 2., 3., 4., 5., 6.}}, {const} = {{{values}}}
    > {{
        h = Conv (x, W)
        y = Mul (h, c)
    }}
    """
    model = ir.from_onnx_text(text)
    report = SimplifyPass()(model)
    assert report.counts["affine_folded"] == 0 and op_counts(model) == {"Conv": 1, "Mul": 1}


def test_no_op_on_a_graph_with_nothing_to_simplify():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x) => (float[N, 4] y) {
        y = Relu (x)
    }
    """
    model = ir.from_onnx_text(text)
    before = ir.to_proto(model).SerializeToString()
    report = SimplifyPass()(model)
    assert report.modified is False
    assert ir.to_proto(model).SerializeToString() == before


def test_batchnorm_with_shared_conv_output_is_skipped_with_reason():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, 1, 4, 4] x) => (float[1, 1, 4, 4] y, float[1, 1, 4, 4] z) <
        float[1, 1, 1, 1] W = {2.}, float[1] s = {1.}, float[1] b = {0.}, float[1] m = {0.}, float[1] v = {1.}
    > {
        c = Conv (x, W)
        y = BatchNormalization (c, s, b, m, v)
        z = Relu (c)
    }
    """
    model = ir.from_onnx_text(text)
    report = SimplifyPass()(model)
    assert report.counts["batchnorm_folded"] == 0
    assert report.skipped["BatchNormalization not folded: Conv/Gemm output has other users"] == 1


def test_config_is_validated():
    with pytest.raises(ValueError, match="max_fold_elements must be >= 0"):
        SimplifyConfig(max_fold_elements=-1)
    with pytest.raises(ValueError, match="unknown option 'fold' for simplify"):
        make("simplify", {"fold": True})


@pytest.mark.slow
def test_bundled_cnn_simplified_matches_and_is_smaller():
    ref = load_model("digits_cnn.onnx")
    model = load_model("digits_cnn.onnx")
    report = SimplifyPass()(model)
    assert report.counts["batchnorm_folded"] == 3
    assert "BatchNormalization" not in op_counts(model)
    assert sum(1 for _ in model.graph) < sum(1 for _ in ref.graph)
    # Folding re-associates float32 sums, as onnxruntime's own optimisations do, so the deviation
    # is of the order of the model's float noise on the CPU at hand: the reference against itself
    # at opt level disable vs all and 1 vs 2 threads (3.1e-6 on AMD EPYC AVX-512, as large as the
    # fold's own 3.1e-6). Another CPU's noise differs; 10x its own floor (at least 1e-5) holds there.
    x = np.load(model_path("digits_cnn_eval.npz"))["input"]
    runs = []
    for level in ("disable", "all"):
        for threads in (1, 2):
            with runtime.session(ref, opt_level=level, threads=threads) as s:
                runs.append(s.run({"input": x})["logits"])
    tol = max(10 * max(float(np.abs(r - runs[0]).max()) for r in runs), 1e-5)
    result = validation.compare(ref, model, model_path("digits_cnn_eval.npz"), atol=tol, rtol=0)
    assert result.worst("max_abs") <= tol
    # Top-1 equal: the smallest top-2 margin of this model (0.017) is 5000x the float noise.
    assert result.worst("cosine") >= REAL_MODEL_MIN_COSINE and result.worst("top1") == 1.0


def _if_model_whose_branches_end_in_identity_of_outer_values() -> ir.Model:
    """Like silero VAD's If branches: a branch output is Identity(a constant), the other Identity(Neg(x))."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])
    c = onnx.helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, [])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])
    const = onnx.helper.make_tensor("k", onnx.TensorProto.FLOAT, [2, 3], [0.5] * 6)
    then_g = onnx.helper.make_graph(
        [onnx.helper.make_node("Constant", [], ["k_out"], value=const),
         onnx.helper.make_node("Identity", ["k_out"], ["t_out"])], "then", [],
        [onnx.helper.make_tensor_value_info("t_out", onnx.TensorProto.FLOAT, [2, 3])],
    )
    else_g = onnx.helper.make_graph(
        [onnx.helper.make_node("Neg", ["x"], ["e_mid"]), onnx.helper.make_node("Identity", ["e_mid"], ["e_out"])],
        "else", [], [onnx.helper.make_tensor_value_info("e_out", onnx.TensorProto.FLOAT, [2, 3])],
    )
    node = onnx.helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)
    graph = onnx.helper.make_graph([node], "g", [x, c], [y])
    return ir.from_proto(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]))


def test_identity_of_an_outer_value_ending_a_branch_stays_and_the_model_stays_valid(rng):
    model = _if_model_whose_branches_end_in_identity_of_outer_values()
    ref = _if_model_whose_branches_end_in_identity_of_outer_values()
    SimplifyPass()(model)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    then_g = model.graph.node(0).attributes["then_branch"].as_graph()
    else_g = model.graph.node(0).attributes["else_branch"].as_graph()
    # Every branch output is made by a node of that branch (the checker's rule), and an Identity
    # of a value made inside the branch still goes.
    for branch in (then_g, else_g):
        assert all(out.producer() is not None and out.producer().graph is branch for out in branch.outputs)
    assert [n.op_type for n in else_g] == ["Neg"]
    x = rng.standard_normal((2, 3)).astype(np.float32)
    for cond in (True, False):
        feeds = [{"x": x, "c": np.array(cond)}]
        validation.compare(ref, model, feeds, **TOL["exact"]).assert_ok()


def test_constant_folding_that_would_copy_a_weight_read_elsewhere_is_skipped(rng):
    w = rng.standard_normal((256, 256)).astype(np.float32)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 256]))
    weight = ir.Value(name="w", const_value=ir.tensor(w, name="w"), type=ir.TensorType(ir.DataType.FLOAT),
                      shape=ir.Shape([256, 256]))
    axes = ir.Value(name="axes", const_value=ir.tensor(np.array([0], np.int64), name="axes"),
                    type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([1]))
    mm = ir.node("MatMul", [x, weight])
    unsq = ir.node("Unsqueeze", [weight, axes])  # folding it stores W twice (W is still read by mm)
    out = ir.node("Add", [mm.outputs[0], unsq.outputs[0]])
    out.outputs[0].name = "y"
    graph = ir.Graph([x], [out.outputs[0]], nodes=[mm, unsq, out], initializers=[weight, axes],
                     opset_imports={"": 17}, name="g")
    model = ir.Model(graph, ir_version=8)
    report = SimplifyPass()(model)
    assert any("constant folding skipped" in r for r in report.skipped)
    assert sum(v.const_value.nbytes for v in model.graph.initializers.values()) <= w.nbytes + 8


def _pad_chain_model() -> onnx.ModelProto:
    """Pad whose pads are computed from constants through ConstantOfShape, as torch exports F.pad."""
    mk = onnx.helper.make_node
    consts = {
        "six": np.array([6], np.int64), "head": np.array([0, 0], np.int64),
        "w": np.ones((2, 1, 3, 1), np.float32),
    }
    nodes = [
        mk("ConstantOfShape", ["six"], ["zeros"], value=onnx.numpy_helper.from_array(np.array([0], np.int64))),
        mk("Concat", ["head", "zeros"], ["flat"], axis=0),  # [0, 0, 0, 0, 0, 0, 0, 0]
        mk("Add", ["flat", "bump"], ["pads"]),  # + [0, 0, 2, 0, 0, 0, 1, 0]: H padded by 2 and 1
        mk("Pad", ["x", "pads"], ["p"]),
        mk("Conv", ["p", "w"], ["y"]),
    ]
    consts["bump"] = np.array([0, 0, 2, 0, 0, 0, 1, 0], np.int64)
    inits = [onnx.numpy_helper.from_array(v, k) for k, v in consts.items()]
    info = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(nodes, "g", [info("x", onnx.TensorProto.FLOAT, ["N", 1, 16, 1])],
                                   [info("y", onnx.TensorProto.FLOAT, None)], inits)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)


def test_pads_computed_from_constants_fold_so_shapes_and_flops_are_known(rng):
    from onnxopt.compress import flops

    proto = _pad_chain_model()
    model = ir.from_proto(proto)
    report = SimplifyPass()(model)
    assert report.status == "ok"
    ops = [n.op_type for n in model.graph]
    assert ops == ["Pad", "Conv"], ops
    np.testing.assert_array_equal(model.graph.node(0).inputs[1].const_value.numpy(), [0, 0, 2, 0, 0, 0, 1, 0])
    # Conv over H = 16 + 3 padded rows, kernel 3: 17 output rows x 2 channels x 3 MACs, x 2 for FLOPs
    assert flops.total_flops(model) == 2 * 17 * 2 * 3
    feeds = {"x": rng.standard_normal((2, 1, 16, 1)).astype(np.float32)}
    with runtime.session(ir.from_proto(proto)) as a, runtime.session(model) as b:
        np.testing.assert_array_equal(a.run(feeds)["y"], b.run(feeds)["y"])  # folding integer pads: exact


def test_constant_of_shape_larger_than_the_fold_limit_stays():
    model = ir.from_proto(_pad_chain_model())
    SimplifyPass(SimplifyConfig(max_fold_elements=4))(model)
    assert "ConstantOfShape" in [n.op_type for n in model.graph]
