"""distill without torch: the passes import without it, options and preconditions are checked.

These run in the core environment (no torch); test_distill.py needs the distill extra.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import onnx_ir as ir
import pytest

from onnxopt import recipes
from onnxopt.context import PassContext
from onnxopt.pass_base import make
from onnxopt.runtime import data
from tests.conftest import load_model

HAS_TORCH = importlib.util.find_spec("torch") is not None


def test_importing_the_passes_does_not_import_torch():
    code = "import sys, onnxopt, onnxopt.passes; onnxopt.passes.get('distill'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(("options", "message"), [
    ({"tau": 0}, "tau must be > 0"),
    ({"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
    ({"epochs": 0}, "epochs must be >= 1"),
    ({"val_fraction": 0.9}, r"val_fraction must be in \[0, 0.5\]"),
    ({"loss": "huber"}, "expected one of"),
    ({"include": "("}, "include: invalid regular expression"),
    ({"epoch": 3}, "unknown option 'epoch' for distill"),
    ({"freeze_first": 1.0}, r"freeze_first must be in \[0, 1\)"),
    ({"augment_to": -1}, "augment_to must be >= 0"),
    ({"warmup": 1.0}, r"warmup must be in \[0, 1\)"),
])
def test_bad_options_are_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        make("distill", options)


def test_without_teacher_or_data_is_a_precondition_error():
    model = load_model("digits_mlp.onnx")
    before = ir.to_proto(model).SerializeToString()
    feeds = data.Dataset.from_feeds([{"input": np.zeros((2, 64), np.float32)}])
    with pytest.raises(ir.passes.PreconditionError, match="distill needs a teacher"):
        make("distill", {}, PassContext(calibration=feeds, quiet=True))(model)
    ctx = PassContext(quiet=True)
    ctx.teacher = before
    with pytest.raises(ir.passes.PreconditionError, match="distill needs training data"):
        make("distill", {}, ctx)(model)
    assert ir.to_proto(model).SerializeToString() == before


def test_teacher_pass_records_a_copy_and_changes_nothing():
    model = load_model("digits_mlp.onnx")
    ctx = PassContext(quiet=True)
    report = make("teacher", {}, ctx)(model)
    assert not report.modified
    assert ctx.teacher == ir.to_proto(model).SerializeToString()


def test_recipe_chains_compression_distillation_and_packing():
    recipe = recipes.get_recipe("compress-distill")
    assert [s.name for s in recipe.steps] == ["teacher", "simplify", "prune", "cluster", "distill", "cluster"]
    assert recipe.needs_calibration and recipe.steps[-1].options["pack"] is True
    recipes.build(recipe.steps, PassContext())  # every option valid


def test_gradual_recipe_prunes_in_growing_steps_with_distillation_between():
    steps = recipes.get_recipe("compress-distill-gradual").steps
    names = [s.name for s in steps]
    assert names[:2] == ["teacher", "simplify"] and names[-3:] == ["cluster", "distill", "cluster"]
    cuts = [s.options["sparsity"] for s in steps if s.name == "prune"]
    assert cuts == sorted(cuts) and cuts[-1] == 0.8 and len(cuts) == 8
    assert names[2:-3] == ["prune", "distill"] * 8  # each cut is trained before the next one
    assert steps[-1].options["pack"] is True
    recipes.build(steps, PassContext())  # every option valid


def test_deep_compression_distill_recipe_trains_back_each_cut_and_the_centroids():
    steps = recipes.get_recipe("deep-compression-distill").steps
    names = [s.name for s in steps]
    assert names == ["teacher", "simplify", "prune", "distill", "prune", "distill", "cluster", "distill", "cluster"]
    cuts = [s.options["sparsity"] for s in steps if s.name == "prune"]
    assert cuts == sorted(cuts) and all(s.options["scope"] == "global" for s in steps if s.name == "prune")
    assert steps[-1].options["pack"] is True and "pack" not in steps[-3].options  # centroids train unpacked
    assert recipes.get_recipe("deep-compression-distill").needs_calibration
    recipes.build(steps, PassContext())  # every option valid


@pytest.mark.skipif(HAS_TORCH, reason="checks the message shown where torch is not installed")
def test_without_torch_the_error_says_how_to_install_it():
    from onnxopt.passes.distill import DistillDependencyError

    model = load_model("digits_mlp.onnx")
    before = ir.to_proto(model).SerializeToString()
    ctx = PassContext(calibration=data.Dataset.from_feeds([{"input": np.zeros((2, 64), np.float32)}]), quiet=True)
    ctx.teacher = before
    with pytest.raises(DistillDependencyError, match=r"pip install 'onnxopt\[distill\]'"):
        make("distill", {}, ctx)(model)
    assert ir.to_proto(model).SerializeToString() == before


def test_augmentation_is_for_image_inputs_only(rng):
    from onnxopt.distill import data as distill_data

    inputs = {
        "image": rng.standard_normal((5, 3, 16, 24)).astype(np.float32),   # NCHW, RGB
        "grey": rng.standard_normal((5, 1, 8, 8)).astype(np.float32),      # the digits CNN's input
        "rows": rng.standard_normal((5, 64)).astype(np.float32),           # tabular / MLP
        "nhwc": rng.standard_normal((5, 16, 16, 3)).astype(np.float32),    # channels last
        "tokens": rng.integers(0, 100, (5, 3, 16, 16)),                    # integer ids
    }
    assert distill_data.image_inputs(inputs) == ["image", "grey"]
    out = distill_data.augment_images(inputs, 3, rng)
    for name, array in inputs.items():
        assert out[name].shape == (15, *array.shape[1:]) and out[name].dtype == array.dtype
    for name in ("rows", "nhwc", "tokens"):  # repeated unchanged, copy c of sample i at c * n + i
        np.testing.assert_array_equal(out[name], np.concatenate([inputs[name]] * 3))
    assert not np.array_equal(out["image"][:5], inputs["image"])


def test_augmentation_without_shift_zoom_or_noise_is_the_identity(rng):
    from onnxopt.distill import data as distill_data

    x = {"image": rng.standard_normal((4, 3, 12, 20)).astype(np.float32)}
    out = distill_data.augment_images(x, 2, rng, shift=0.0, scale=0.0, noise=0.0)
    # Bilinear weights at integer positions are exactly 0 and 1: the identity, up to float32
    # rounding of v * 1 + w * 0 (exact).
    np.testing.assert_array_equal(out["image"], np.concatenate([x["image"]] * 2))


def test_auto_hints_are_intermediate_values_of_both_graphs():
    from onnxopt.distill import data as distill_data
    from onnxopt.errors import DataError

    teacher = load_model("digits_cnn.onnx")
    student = load_model("digits_cnn.onnx")
    make("simplify", {})(student)  # BatchNorm folded: some names go, activations stay
    hints = distill_data.choose_hints(student, ir.to_proto(teacher).SerializeToString(), "auto")
    produced_s = {v.name for n in student.graph for v in n.outputs}
    produced_t = {v.name for n in teacher.graph for v in n.outputs}
    assert 1 <= len(hints) <= 3 and all(h in produced_s and h in produced_t for h in hints)
    assert distill_data.choose_hints(student, teacher, "none") == []
    with pytest.raises(DataError, match="hint value 'nope'"):
        distill_data.choose_hints(student, teacher, "nope")


def test_auto_k_hints_spread_over_the_layers_and_end_at_the_last():
    from onnxopt.distill import data as distill_data
    from onnxopt.errors import DataError

    model = load_model("digits_cnn.onnx")
    layer_inputs = [n.inputs[0].name for n in model.graph if n.op_type in ("Conv", "Gemm", "MatMul")]
    every = distill_data.choose_hints(model, model, f"auto:{len(layer_inputs)}")
    assert every == [h for h in layer_inputs if h in every] and every[-1] == layer_inputs[-1]
    one = distill_data.choose_hints(model, model, "auto:1")
    assert one == [layer_inputs[-1]]
    for bad in ("auto:0", "auto:x"):
        with pytest.raises(DataError, match="'auto:K' needs a whole number K >= 1"):
            distill_data.choose_hints(model, model, bad)


def test_teacher_outputs_fill_one_row_per_sample_across_uneven_batches(rng):
    from onnx import TensorProto, helper

    from onnxopt.distill import data as distill_data
    from onnxopt.errors import DataError
    from onnxopt.runtime import sessions as runtime

    model = load_model("digits_cnn.onnx")
    name = model.graph.inputs[0].name
    x = rng.standard_normal((10, 1, 8, 8)).astype(np.float32)
    got = distill_data.teacher_outputs(model, {name: x}, 4, quiet=True)  # batches of 4, 4, 2
    # The same batches run by hand in the same kind of session: the rows must be those arrays,
    # in order, bit for bit.
    with runtime.session(model) as handle:
        want = np.concatenate([next(iter(handle.run({name: x[i : i + 4]}).values())) for i in (0, 4, 8)])
    assert len(got) == 1 and got[0].shape == (10, *want.shape[1:])
    np.testing.assert_array_equal(got[0], want)

    # An output without one row per sample cannot be a training target: a clear error.
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, [])],
    )
    flat = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    with pytest.raises(DataError, match="teacher output 'total': batch at sample 0 has shape"):
        distill_data.teacher_outputs(flat, {"x": np.ones((5, 3), np.float32)}, 2, quiet=True)


def test_tables_false_keeps_embedding_tables_and_their_gathered_lowrank_factors(rng):
    """After the lowrank pass splits a table (exact rows + factors), ``tables=False`` leaves every
    tensor read only as a Gather's data untrained, and still trains the table's V factor and the
    MatMul after it; the default trains them all."""
    from onnx import TensorProto, helper, numpy_helper
    from onnxopt.passes.lowrank import LowRankConfig, LowRankPass

    from onnxopt.distill.data import select_trainable

    v, d = 512, 32
    graph = helper.make_graph(
        [helper.make_node("Gather", ["E", "ids"], ["e"], name="emb"),
         helper.make_node("MatMul", ["e", "W"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", d])],
        [numpy_helper.from_array(rng.standard_normal((v, d)).astype(np.float32), "E"),
         numpy_helper.from_array(rng.standard_normal((d, d)).astype(np.float32), "W")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    model = ir.from_proto(proto)
    calib = data.Dataset.from_feeds([{"ids": np.arange(64, dtype=np.int64).reshape(4, 16)}])
    cfg = LowRankConfig(rank_mode="ratio", rank_ratio=0.25, min_elements=0, op_types=frozenset({"Gather"}))
    LowRankPass(cfg, PassContext(calibration=calib, quiet=True))(model)
    gathered = {n.inputs[0].name for n in model.graph if n.op_type == "Gather"
                and n.inputs[0].dtype == ir.DataType.FLOAT}
    assert len(gathered) == 2  # the factored cold rows and the exact hot rows

    kept, skipped = select_trainable(model, "", "", tables=False)
    assert not gathered & set(kept)
    assert {skipped[name] for name in gathered} == {"embedding table (tables=false)"}
    assert "W" in kept and any(name.endswith("lr_v") for name in kept)
    everything, _ = select_trainable(model, "", "")
    assert gathered < set(everything) and set(kept) < set(everything)


def test_lowrank_distill_recipe_splits_matmuls_for_speed_and_tables_for_size_then_trains():
    steps = recipes.get_recipe("lowrank-distill").steps
    assert [s.name for s in steps] == ["teacher", "simplify", "lowrank", "lowrank", "distill"]
    assert steps[2].options["target_metric"] == "flops" and "Gather" not in steps[2].options["op_types"]
    assert steps[3].options["op_types"] == "[Gather]"
    assert steps[4].options["tables"] is False
    recipes.build(steps, PassContext())  # every option valid
