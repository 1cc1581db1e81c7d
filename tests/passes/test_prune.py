from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnxopt.passes.prune import PruneConfig, PrunePass

from onnxopt.compress import flops, repair
from onnxopt.context import PassContext
from onnxopt.pass_base import make
from onnxopt.runtime import data
from onnxopt.runtime import sessions as runtime
from tests.conftest import load_model, model_path, op_counts
from tests.passes.compress_models import cnn, feeds, mlp


def _run(model, calib=None, **opts):
    return PrunePass(PruneConfig(**opts), PassContext(calibration=calib, quiet=True))(model)


def _outputs(model, ds):
    with runtime.session(model) as h:
        return np.concatenate([next(iter(h.run(f).values())) for f in ds])


def _w(model, name):
    return model.graph.initializers[name].const_value.numpy()


def test_unstructured_layer_scope_exact_sparsity():
    ref, model = mlp(), mlp()
    report = _run(model, sparsity=0.6, min_elements=0)
    assert report.counts["pruned_tensors"] == 3
    for name in ("W1", "W2", "W3"):
        w, w0 = _w(model, name), _w(ref, name)
        n_zero = round(0.6 * w.size)
        assert (w == 0).sum() == n_zero and w.shape == w0.shape
        # the zeros are the smallest magnitudes; the rest is untouched
        assert np.abs(w0[w == 0]).max() <= np.abs(w0[w != 0]).min()
        np.testing.assert_array_equal(w[w != 0], w0[w != 0])
    assert op_counts(model) == op_counts(ref)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    layer_flops = {r["item"]: r for r in report.records if "flops_before" in r}
    assert layer_flops["fc2"]["flops_after"] == layer_flops["fc2"]["flops_before"] == 2 * 48 * 24
    assert layer_flops["fc2"]["flops_nonzero"] == round(2 * 48 * 24 * 0.4)


def test_unstructured_global_scope_one_threshold():
    ref, model = mlp(), mlp()
    _run(model, sparsity=0.5, scope="global", min_elements=0)
    zero_mags = np.concatenate([np.abs(_w(ref, n))[_w(model, n) == 0] for n in ("W1", "W2", "W3")])
    kept_mags = np.concatenate([np.abs(_w(ref, n))[_w(model, n) != 0] for n in ("W1", "W2", "W3")])
    assert zero_mags.max() <= kept_mags.min()
    assert zero_mags.size == round(0.5 * (zero_mags.size + kept_mags.size))


def test_global_scope_cap_keeps_every_layer_alive(rng):
    from onnxopt.passes.prune import _magnitude_masks

    # A layer of small weights (as BatchNorm folding leaves some): one global threshold at 50%
    # removes it whole; with the cap it keeps 20% and the others make up the total.
    arrays = [rng.standard_normal((40, 10)), 1e-3 * rng.standard_normal((20, 10)), rng.standard_normal((30, 10))]
    total = sum(a.size for a in arrays)
    plain = _magnitude_masks(arrays, 0.5, "global")
    assert not plain[1].any()
    capped = _magnitude_masks(arrays, 0.5, "global", cap=0.8)
    assert capped[1].mean() == pytest.approx(0.2)  # exactly floor(0.8 * 200) dropped
    dropped = sum(int((~m).sum()) for m in capped)
    assert round(0.5 * total) <= dropped <= round(0.5 * total) + len(arrays)  # ties: one per tensor at most
    # Still one threshold for the uncapped tensors: what they drop is smaller than what they keep.
    for a, m in ((arrays[0], capped[0]), (arrays[2], capped[2])):
        assert np.abs(a)[~m].max() <= np.abs(a)[m].min()


def test_unstructured_repair_keeps_zeros_and_lowers_error():
    calib, held_out = feeds(mlp(), 8, seed=1), feeds(mlp(), 4, seed=2)
    ref, plain, repaired = mlp(), mlp(), mlp()
    _run(plain, sparsity=0.7, min_elements=0)
    report = _run(repaired, calib, sparsity=0.7, min_elements=0, repair=True)
    assert report.counts["repaired"] == 3
    for name in ("W1", "W2", "W3"):
        assert np.array_equal(_w(repaired, name) == 0, _w(plain, name) == 0)
    y = _outputs(ref, held_out)
    assert np.linalg.norm(_outputs(repaired, held_out) - y) < np.linalg.norm(_outputs(plain, held_out) - y)


def test_repair_passes_bound_the_sequential_passes():
    """Three layers: repair_passes >= 3 is the exact per-layer fit, fewer passes fit the later
    layers of a group without the earlier ones' error (so the weights differ), and the number
    of calibration passes is what the option says."""
    calib = feeds(mlp(), 4, seed=1)
    per_layer, three, one = mlp(), mlp(), mlp()
    _run(per_layer, calib, sparsity=0.7, min_elements=0, repair=True, repair_passes=0)
    _run(three, calib, sparsity=0.7, min_elements=0, repair=True, repair_passes=3)
    _run(one, calib, sparsity=0.7, min_elements=0, repair=True, repair_passes=1)
    for name in ("W1", "W2", "W3"):
        assert np.array_equal(_w(per_layer, name), _w(three, name))
    assert np.array_equal(_w(per_layer, "W1"), _w(one, "W1"))  # the first layer never sees upstream error
    assert not np.allclose(_w(per_layer, "W3"), _w(one, "W3"))

    model = mlp()
    layers = [repair.as_layer(n) for n in model.graph if n.op_type in ("Gemm", "MatMul")]
    seq = repair.SequentialStats(model, layers, calib, passes=2, quiet=True)
    first = seq(layers[0])  # 3 layers in 2 groups: fc1 + fc2, then fc3
    assert seq.passes_run == 1
    w1 = model.graph.initializers["W1"]
    w1.const_value = ir.tensor(np.zeros_like(w1.const_value.numpy()), name="W1")
    later = seq(layers[-1])
    assert seq.passes_run == 2
    # The later group's student inputs carry the edit (fc1 zeroed: relu(b1) is constant), the teacher's do not.
    assert not np.allclose(later.h, later.h_tt)
    assert np.allclose(first.h, first.h_tt)
    with pytest.raises(ValueError, match="repair_passes"):
        PruneConfig(repair=True, repair_passes=-1)


def test_structured_removes_channels_and_lowers_flops():
    ref, model = cnn(), cnn()
    report = _run(model, structured=True, sparsity=0.25, min_elements=0, channel_multiple=1)
    # conv1 (16 ch, BN in between) -> conv2, conv2 (24 ch, via GAP/Flatten) -> head; head feeds y
    assert report.counts["pruned_layers"] == 2 and report.counts["removed_channels"] == 4 + 6
    assert report.skipped["structured: output reaches a graph output"] == 1
    assert _w(model, "C1").shape == (12, 3, 3, 3) and _w(model, "c1").shape == (12,)
    assert all(_w(model, n).shape == (12,) for n in ("scale", "shift", "mean", "var"))
    assert _w(model, "C2").shape == (18, 12, 3, 3) and _w(model, "G").shape == (10, 18)
    assert op_counts(model) == op_counts(ref)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    assert flops.total_flops(model) < 0.7 * flops.total_flops(ref)
    assert _outputs(model, feeds(ref, 1)).shape == _outputs(ref, feeds(ref, 1)).shape


def test_structured_removes_weakest_channels_exactly():
    """Channels whose weights are zero contribute nothing: removing them is exact."""
    ref = mlp()
    w1 = _w(ref, "W1").copy()
    b1 = _w(ref, "b1").copy()
    w1[:12] = 0
    b1[:12] = -1.0  # Relu(-1) = 0: these neurons are dead
    for m in (ref,):
        m.graph.initializers["W1"].const_value = ir.tensor(w1, name="W1")
        m.graph.initializers["b1"].const_value = ir.tensor(b1, name="b1")
    model = ref.clone()
    _run(model, structured=True, sparsity=0.25, min_elements=0, include="W1", channel_multiple=1)
    assert _w(model, "W1").shape == (36, 32) and _w(model, "W2").shape == (36, 24)
    ds = feeds(ref, 2)
    np.testing.assert_allclose(_outputs(model, ds), _outputs(ref, ds), rtol=1e-5, atol=1e-5)


def test_structured_channel_multiple_rounds_kept_channels():
    model = cnn()
    report = _run(model, structured=True, sparsity=0.3, min_elements=0, channel_multiple=8)
    kept = {r["item"]: r["channels_after"] for r in report.records if "channels_after" in r}
    assert kept == {"conv1": 8, "conv2": 16}  # 16 * 0.7 = 11.2 -> 8, 24 * 0.7 = 16.8 -> 16
    assert _w(model, "C2").shape == (16, 8, 3, 3) and _w(model, "G").shape == (10, 16)


def test_structured_repair_lowers_error():
    calib, held_out = feeds(cnn(), 8, seed=1), feeds(cnn(), 4, seed=2)
    ref, plain, repaired = cnn(), cnn(), cnn()
    _run(plain, structured=True, sparsity=0.4, min_elements=0)
    report = _run(repaired, calib, structured=True, sparsity=0.4, min_elements=0, repair=True)
    assert report.counts["repaired"] == 2
    y = _outputs(ref, held_out)
    assert np.linalg.norm(_outputs(repaired, held_out) - y) < np.linalg.norm(_outputs(plain, held_out) - y)


def test_structured_skips_branches_with_reason():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x) => (float[N, 3] y) <float[4, 6] w1 = {1.,2.,3.,4.,5.,6.,7.,8.,9.,10.,11.,12.,
        13.,14.,15.,16.,17.,18.,19.,20.,21.,22.,23.,24.}, float[6, 3] w2 = {1.,2.,3.,4.,5.,6.,7.,8.,9.,
        10.,11.,12.,13.,14.,15.,16.,17.,18.}> {
        h = MatMul (x, w1)
        a = Relu (h)
        b = Sigmoid (h)
        c = Add (a, b)
        y = MatMul (c, w2)
    }
    """
    model = ir.from_onnx_text(text)
    before = ir.to_proto(model).SerializeToString()
    report = _run(model, structured=True, min_elements=0)
    assert not report.modified and ir.to_proto(model).SerializeToString() == before
    assert report.skipped["structured: output has several consumers (branch)"] == 1
    assert report.skipped["structured: output reaches a graph output"] == 1


def test_no_op_without_layers_and_zero_sparsity():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] x) => (float[N, 4] y) { y = Relu (x) }
    """
    model = ir.from_onnx_text(text)
    before = ir.to_proto(model).SerializeToString()
    assert not _run(model).modified and ir.to_proto(model).SerializeToString() == before
    model = mlp()
    before = ir.to_proto(model).SerializeToString()
    assert not _run(model, sparsity=0.0).modified and ir.to_proto(model).SerializeToString() == before


def test_repair_without_data_notes():
    report = _run(mlp(), sparsity=0.5, min_elements=0, repair=True)
    assert report.counts["pruned_tensors"] == 3 and "repaired" not in report.counts
    assert any("no calibration data" in n for n in report.notes)


@pytest.mark.parametrize(("options", "message"), [
    ({"sparsity": 1.0}, r"sparsity must be in \[0, 1\)"),
    ({"sparsity": -0.1}, r"sparsity must be in \[0, 1\)"),
    ({"scope": "model"}, "expected one of 'layer', 'global'"),
    ({"op_types": "Add"}, "op_types: unsupported 'Add'"),
    ({"channel_multiple": 0}, "channel_multiple must be >= 1"),
    ({"sparsity": 0.8, "max_layer_sparsity": 0.5}, r"max_layer_sparsity must be in \[sparsity, 1\]"),
    ({"max_depthwise_sparsity": 1.5}, r"max_depthwise_sparsity must be in \[0, 1\]"),
])
def test_config_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        make("prune", options)


@pytest.mark.slow
def test_bundled_cnn_structured_30_percent_with_repair():
    ev = np.load(model_path("digits_cnn_eval.npz"))
    held_out = data.Dataset.from_feeds([{"input": ev["input"]}])
    calib = data.load_data(model_path("digits_cnn_calib.npz"))
    ref, model = load_model("digits_cnn.onnx"), load_model("digits_cnn.onnx")
    report = _run(model, calib, structured=True, sparsity=0.3, min_elements=0, repair=True)
    assert report.counts["pruned_layers"] >= 3
    assert flops.total_flops(model) < 0.8 * flops.total_flops(ref)
    top1 = lambda m: float((_outputs(m, held_out).argmax(1) == ev["label"]).mean())
    # FP32 compute: the smallest top-2 margin of the pruned model is 0.018, 6000x onnxruntime's
    # float noise on this model (3e-6), so no CPU changes a class. 0.03 (17 of 597 samples) is
    # the quality bar; measured drop 4 samples.
    assert top1(model) >= top1(ref) - 0.03


def test_uniform_scope_counts_the_dense_layers_and_caps_depthwise():
    """Uniform scope: one fraction for every pruned tensor, raised until `sparsity` of all the
    op types' weights are zero, the ones left dense (small: min_elements; last: skip_last)
    counted; a depthwise Conv weight stops at max_depthwise_sparsity."""
    rng = np.random.default_rng(0)
    init = {"w_small": rng.standard_normal((8, 3, 1, 1)), "w_dw": rng.standard_normal((8, 1, 3, 3)) * 0.01,
            "w_pw": rng.standard_normal((64, 8, 1, 1)), "w_last": rng.standard_normal((4, 64, 1, 1))}
    sizes = {k: v.size for k, v in init.items()}
    nodes = [onnx.helper.make_node("Conv", ["x", "w_small"], ["a"]),
             onnx.helper.make_node("Conv", ["a", "w_dw"], ["b"], group=8, pads=[1, 1, 1, 1]),
             onnx.helper.make_node("Conv", ["b", "w_pw"], ["c"]),
             onnx.helper.make_node("Conv", ["c", "w_last"], ["y"])]
    graph = onnx.helper.make_graph(
        nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 8, 8])],
        [onnx.numpy_helper.from_array(v.astype(np.float32), k) for k, v in init.items()])
    model = ir.from_proto(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]))
    # w_small (24) is under min_elements, w_last is skipped: both dense, both in the denominator.
    report = make("prune", {"sparsity": 0.5, "scope": "uniform", "min_elements": 64, "skip_last": True,
                            "max_depthwise_sparsity": 0.25})(model)
    zeros = {k: int((_w(model, k) == 0).sum()) for k in init}
    assert zeros["w_small"] == zeros["w_last"] == 0
    assert zeros["w_dw"] == round(0.25 * sizes["w_dw"])  # capped, though its weights are the smallest
    total = sum(sizes.values())
    assert sum(zeros.values()) >= round(0.5 * total)
    # the same one fraction would have been too little: the pointwise layer makes up the rest
    assert zeros["w_pw"] / sizes["w_pw"] > 0.5
    assert any("uniform:" in n and f"of all {total} Conv/Gemm/MatMul weights zero" in n for n in report.notes), report.notes
    # layer scope: the depthwise cap applies there too
    model2 = ir.from_proto(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]))
    make("prune", {"sparsity": 0.5, "min_elements": 64, "max_depthwise_sparsity": 0.25})(model2)
    assert int((_w(model2, "w_dw") == 0).sum()) == round(0.25 * sizes["w_dw"])
    assert int((_w(model2, "w_pw") == 0).sum()) == round(0.5 * sizes["w_pw"])
