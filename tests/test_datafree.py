"""Runs without user data: generated feeds that real models accept, and honest skips.

Each model here is one that plain random feeds (ints in [0, 4), standard-normal floats, 1 for
every symbolic dim) break, so each test also shows what the old generator did wrong where that
is cheap to show.
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import api, cli
from onnxopt.errors import DataError, ModelLoadError
from onnxopt.runtime import data, feedgen
from onnxopt.runtime import sessions as runtime

# Embeddings as a Hugging Face BERT export writes them: token_type_ids reach a table of 2 rows
# through a Cast, input_ids a vocabulary of 30, and the mask becomes an additive bias.
HF_EMBEDDINGS = """
<ir_version: 8, opset_import: ["" : 17]>
emb (int64[batch_size, sequence_length] input_ids, int64[batch_size, sequence_length] attention_mask,
     int64[batch_size, sequence_length] token_type_ids) => (float[batch_size, sequence_length, 4] out)
<float[30, 4] word = {WORD}, float[2, 4] types = {TYPES}, float[1] one = {1.0}, float[1] neg = {-10000.0},
 int64[1] last = {-1}>
{
    w = Gather (word, input_ids)
    tt = Cast <to = 6> (token_type_ids)
    t = Gather (types, tt)
    m = Unsqueeze (attention_mask, last)
    mf = Cast <to = 1> (m)
    inv = Sub (one, mf)
    bias = Mul (inv, neg)
    s = Add (w, t)
    out = Add (s, bias)
}
"""


def _hf_embeddings() -> ir.Model:
    rng = np.random.default_rng(0)
    word = ", ".join(f"{v:.3f}" for v in rng.standard_normal(120))
    types = ", ".join(f"{v:.3f}" for v in rng.standard_normal(8))
    return ir.from_onnx_text(HF_EMBEDDINGS.replace("{WORD}", "{" + word + "}").replace("{TYPES}", "{" + types + "}"))


def _save(model: ir.Model | onnx.ModelProto, path) -> str:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    onnx.save(proto, str(path))
    return str(path)


def _runs_all(model: ir.Model, feeds) -> None:
    with runtime.session(model) as handle:
        runtime.run_all(handle, feeds)


def test_indices_masks_and_dims_follow_the_graph():
    model = _hf_embeddings()
    feeds = list(feedgen.generated_data(model, 16, seed=0))
    for feed in feeds:
        shapes = {v.shape for v in feed.values()}
        assert len(shapes) == 1, "inputs sharing dim names share sizes"
        (batch, seq) = shapes.pop()
        assert batch in (1, 2) and 8 <= seq <= 16
        assert feed["input_ids"].min() >= 0 and feed["input_ids"].max() < 30
        assert set(np.unique(feed["token_type_ids"])) <= {0, 1}
        assert set(np.unique(feed["attention_mask"])) <= {0, 1} and (feed["attention_mask"][:, 0] == 1).all()
    # The draws are not degenerate: both token types, ids beyond the old [0, 4), padded positions.
    ids = np.concatenate([f["input_ids"].ravel() for f in feeds])
    types = np.concatenate([f["token_type_ids"].ravel() for f in feeds])
    masks = np.concatenate([f["attention_mask"].ravel() for f in feeds])
    assert ids.max() >= 4 and set(types) == {0, 1} and set(masks) == {0, 1}
    _runs_all(model, feeds)
    # What the old generator did: token types up to 3, which onnxruntime refuses.
    old = list(data.random_data(data.input_signature(model), 2, seed=0))
    with pytest.raises(Exception, match=r"out of bounds|must be within"):
        _runs_all(model, old)


def _if_on_sample_rate() -> onnx.ModelProto:
    """y = sr == 16000 ? Pad(x, 64 each side, reflect) : x, as silero VAD selects on ``sr``.

    Reflect padding by 64 needs more than 64 samples, which dims without a name do not say.
    """
    then_g = helper.make_graph(
        [helper.make_node("Pad", ["x", "pads"], ["t"], mode="reflect")],
        "then", [], [helper.make_tensor_value_info("t", TensorProto.FLOAT, [None, None])],
    )
    else_g = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e"])], "else", [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [None, None])],
    )
    nodes = [
        helper.make_node("Constant", [], ["rate"], value=numpy_helper.from_array(np.array(16000, np.int64))),
        helper.make_node("Equal", ["sr", "rate"], ["is16k"]),
        helper.make_node("If", ["is16k"], ["y"], then_branch=then_g, else_branch=else_g),
    ]
    graph = helper.make_graph(
        nodes, "vad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None])],
        [numpy_helper.from_array(np.array([0, 64, 0, 64], np.int64), "pads")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_branch_selector_draws_the_compared_constant_and_free_dims_are_retried():
    model = ir.serde.deserialize_model(_if_on_sample_rate())
    cache: dict = {}
    feeds = list(feedgen.runnable_feeds(model, 2, seed=0, cache=cache))
    assert all(int(f["sr"]) == 16000 for f in feeds)
    assert all(f["x"].shape[1] > 64 for f in feeds), "a later try gave the samples reflect padding needs"
    assert list(cache.values()) and all(v > 0 for v in cache.values()), "the first guess failed"
    again = list(feedgen.runnable_feeds(model, 2, seed=0, cache=cache))  # from the cache, no probe
    np.testing.assert_array_equal(again[0]["x"], feeds[0]["x"])


def test_split_sizes_are_a_partition_of_the_axis():
    model = ir.from_onnx_text("""
    <ir_version: 8, opset_import: ["" : 18]>
    s (float[batch, 10] x, int64[3] split) => (float[batch, a] y0, float[batch, b] y1, float[batch, c] y2) {
        y0, y1, y2 = Split <axis = 1> (x, split)
    }
    """)
    feeds = list(feedgen.generated_data(model, 8, seed=0))
    for feed in feeds:
        assert feed["split"].sum() == 10 and (feed["split"] >= 1).all()
    _runs_all(model, feeds)


def test_reshape_to_a_constant_shape_fixes_the_free_dim():
    model = ir.from_onnx_text("""
    <ir_version: 8, opset_import: ["" : 17]>
    r (float[n] x) => (float[2, 3, 4] y) <int64[3] shape = {2, 3, 4}> {
        y = Reshape (x, shape)
    }
    """)
    feeds = list(feedgen.generated_data(model, 2, seed=0))
    assert [f["x"].shape for f in feeds] == [(24,), (24,)]
    _runs_all(model, feeds)


@pytest.mark.parametrize(
    ("elem", "dtype"),
    [
        (TensorProto.FLOAT8E4M3FN, ml_dtypes.float8_e4m3fn),
        (TensorProto.FLOAT8E5M2, ml_dtypes.float8_e5m2),
        (TensorProto.FLOAT8E5M2FNUZ, ml_dtypes.float8_e5m2fnuz),
        (TensorProto.BFLOAT16, ml_dtypes.bfloat16),
        (TensorProto.INT4, ml_dtypes.int4),
        (TensorProto.UINT4, ml_dtypes.uint4),
        (TensorProto.INT2, ml_dtypes.int2),
        (TensorProto.UINT2, ml_dtypes.uint2),
        (TensorProto.FLOAT4E2M1, ml_dtypes.float4_e2m1fn),
    ],
)
def test_dtypes_numpy_cannot_draw_are_generated_through_ml_dtypes(tmp_path, elem, dtype):
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)], "cast",
        [helper.make_tensor_value_info("x", elem, [3, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25)])
    proto.ir_version = 11
    onnx.checker.check_model(proto, full_check=True)
    model = ir.serde.deserialize_model(proto)
    (feed,) = list(feedgen.generated_data(model, 1, seed=0))
    x = feed["x"]
    assert x.dtype == np.dtype(dtype) and x.shape == (3, 5)
    values = x.astype(np.float32)
    assert np.isfinite(values).all() and len(np.unique(values)) > 1
    # The whole command: the checks run where onnxruntime takes the arrays, else are skipped
    # with a note naming the dtype; it ends with a model either way.
    path = _save(proto, tmp_path / "m.onnx")
    try:
        ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception:  # onnxruntime 1.32 has no Cast from float4: the model itself cannot run
        with pytest.raises(ModelLoadError, match="cannot run the input model: it does not load"):
            api.optimize(path, tmp_path / "o.onnx", recipe="simplify", quiet=True)
        return
    result = api.optimize(path, tmp_path / "o.onnx", recipe="simplify", quiet=True)
    assert (tmp_path / "o.onnx").exists()
    if result.validation is None:  # onnxruntime 1.32's Python API takes none of these arrays
        (note,) = result.notes
        assert "--eval DATA" in note and str(np.dtype(dtype)) in note, note


def _sequence_model(with_strings: bool) -> ir.Model:
    """ConcatFromSequence of a float sequence input (and a LabelEncoder of a string input)."""
    nodes = [helper.make_node("ConcatFromSequence", ["parts"], ["joined"], axis=0)]
    inputs = [helper.make_tensor_sequence_value_info("parts", TensorProto.FLOAT, None)]
    outputs = [helper.make_tensor_value_info("joined", TensorProto.FLOAT, ["n"])]
    if with_strings:
        nodes.append(helper.make_node("LabelEncoder", ["words"], ["ids"], domain="ai.onnx.ml",
                                      keys_strings=["cat", "dog"], values_int64s=[1, 2]))
        inputs.append(helper.make_tensor_value_info("words", TensorProto.STRING, [2]))
        outputs.append(helper.make_tensor_value_info("ids", TensorProto.INT64, [2]))
    graph = helper.make_graph(nodes, "seq", inputs, outputs)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 2)]
    proto = helper.make_model(graph, opset_imports=opsets)
    proto.ir_version = 8
    onnx.checker.check_model(proto, full_check=True)
    return ir.serde.deserialize_model(proto)


def test_strings_come_from_the_graph_and_sequences_are_lists():
    model = _sequence_model(with_strings=True)
    (feed,) = list(feedgen.generated_data(model, 1, seed=0))
    assert set(feed["words"]) <= {"cat", "dog"}
    assert isinstance(feed["parts"], list) and len(feed["parts"]) == 2
    assert all(p.dtype == np.float32 for p in feed["parts"])
    data.check_feed(feed, data.input_signature(model), "generated")
    _runs_all(model, [feed])


# Squeezing an axis of size 2 or 3 is an error whatever the axis: no feed can work.
SQUEEZE_BY_INPUT = """
<ir_version: 8, opset_import: ["" : 17]>
r (float[2, 3] x, int64[1] axes) => (float[k] y) {
    y = Squeeze (x, axes)
}
"""


def test_a_model_that_rejects_generated_feeds_is_written_with_a_note(tmp_path, capsys):
    path = _save(ir.from_onnx_text(SQUEEZE_BY_INPUT), tmp_path / "m.onnx")
    report = tmp_path / "report.json"
    result = api.optimize(path, tmp_path / "o.onnx", recipe="fp16", quiet=True, report_path=report)
    assert result.passed and result.validation is None and (tmp_path / "o.onnx").exists()
    assert len(result.notes) == 1 and "final check skipped" in result.notes[0]
    assert "does not run on generated feeds" in result.notes[0] and "--eval DATA" in result.notes[0]
    doc = json.loads(report.read_text())
    assert doc["notes"] == result.notes and doc["validation"] is None
    code = cli.main(["optimize", path, "-o", str(tmp_path / "o2.onnx"), "--recipe", "simplify"])
    out = capsys.readouterr()
    assert code == 0 and "note: final check skipped" in out.out and "cannot run the input model" not in out.err
    # With a budget there is nothing to prove it with: that is a failure, not a pass.
    result = api.optimize(path, tmp_path / "o3.onnx", recipe="simplify", quiet=True, min_cosine=0.99)
    assert not result.passed and "not checked" in result.failures[0]


def test_the_users_own_data_that_the_model_rejects_is_a_model_error(tmp_path, capsys):
    path = _save(ir.from_onnx_text(SQUEEZE_BY_INPUT), tmp_path / "m.onnx")
    feeds = [{"x": np.ones((2, 3), np.float32), "axes": np.array([0], np.int64)}]
    with pytest.raises(ModelLoadError, match="cannot run the input model on the given data"):
        api.optimize(path, tmp_path / "o.onnx", recipe="simplify", quiet=True, calibration=feeds)
    np.savez(tmp_path / "bad.npz", x=np.ones((1, 2, 3), np.float32), axes=np.array([[0]], np.int64))
    code = cli.main(["optimize", path, "-o", str(tmp_path / "o.onnx"), "--eval", str(tmp_path / "bad.npz")])
    assert code == 2 and "cannot run the input model on the given data" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", ["simplify", "fuse", "fp16", "lowrank", "compress", "deep-compression"])
def test_every_recipe_checks_an_hf_style_export_on_generated_feeds(tmp_path, recipe):
    path = _save(_hf_embeddings(), tmp_path / "m.onnx")
    result = api.optimize(path, tmp_path / "o.onnx", recipe=recipe, quiet=True)
    assert result.passed and not result.notes and result.validation is not None
    assert all("skipped" not in n for r in result.reports for n in r.notes)


def test_additive_minus_inf_masks_are_data_and_calibrate(tmp_path, rng):
    model = ir.from_onnx_text("""
    <ir_version: 8, opset_import: ["" : 17]>
    att (float[2, 8] scores, float[2, 8] attn_mask) => (float[2, 4] y) <float[8, 4] w = {W}> {
        s = Add (scores, attn_mask)
        p = Softmax <axis = -1> (s)
        y = MatMul (p, w)
    }
    """.replace("{W}", "{" + ", ".join(f"{v:.3f}" for v in rng.standard_normal(32)) + "}"))
    path = _save(model, tmp_path / "m.onnx")
    feeds = []
    for _ in range(8):
        mask = np.where(rng.random((2, 8)) < 0.3, -np.inf, 0.0).astype(np.float32)
        mask[:, 0] = 0.0
        feeds.append({"scores": rng.standard_normal((2, 8)).astype(np.float32), "attn_mask": mask})
    np.savez(tmp_path / "calib.npz", **{k: np.stack([f[k] for f in feeds]) for k in feeds[0]})
    loaded = list(data.load_data(tmp_path / "calib.npz", data.input_signature(model)))
    assert np.isneginf(loaded[0]["attn_mask"]).any()
    result = api.optimize(path, tmp_path / "q.onnx", recipe="int8", calibration=tmp_path / "calib.npz", quiet=True)
    assert result.passed and result.validation is not None
    quant = next(r for r in result.reports if r.pass_name == "quantize")
    assert quant.modified, quant.to_json()
    sess = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    out = sess.run(None, feeds[0])[0]
    assert np.isfinite(out).all()


def test_sequence_inputs_load_from_test_data_sets(tmp_path):
    model = _sequence_model(with_strings=False)
    parts = [np.arange(3, dtype=np.float32), np.arange(2, dtype=np.float32)]
    folder = tmp_path / "test_data_set_0"
    folder.mkdir()
    (folder / "input_0.pb").write_bytes(numpy_helper.from_list(parts, "parts").SerializeToString())
    (feed,) = list(data.load_data(tmp_path, data.input_signature(model)))
    assert [p.tolist() for p in feed["parts"]] == [p.tolist() for p in parts]
    with pytest.raises(DataError, match="is a sequence"):
        data.check_feed({"parts": parts[0]}, data.input_signature(model), "x")


# ---- ONNX backend conformance cases, through the Python API --------------------------------------

# One case per kind of input that broke data-free runs: float8 and int4 (dtypes numpy cannot
# draw), a Split's `split` input, Gather indices into another input, a sequence input, a -inf
# attention mask (as calibration data), and an opset-28 model (no onnxruntime QDQ kernels).
CASES = {
    "test_cast_FLOAT8E5M2_to_FLOAT": "cast",
    "test_cast_INT4_to_FLOAT": "cast",
    "test_split_variable_parts_1d_opset18": "split",
    "test_gather_0": "gather",
    "test_sequence_insert_at_back": "sequenceinsert",
    "test_attention_4d_softcap_neginf_mask": "attention",
    "test_celu": "celu",
}


@pytest.fixture(scope="module")
def conformance_cases():
    from onnxopt.testing.conformance.cases import node_cases

    found = {c.name: c for c in node_cases(sorted(set(CASES.values()))) if c.name in CASES}
    assert sorted(found) == sorted(CASES)
    return found


def _write_data_sets(case, folder) -> None:
    """The case's inputs as onnx test_data_set_* folders (SequenceProto for sequences)."""
    model = onnx.load_from_string(case.model)
    for k, (feed, _) in enumerate(case.data_sets):
        ds = folder / f"test_data_set_{k}"
        ds.mkdir(parents=True)
        for i, vi in enumerate(model.graph.input):
            value = feed[vi.name]
            if vi.type.HasField("sequence_type"):
                proto = numpy_helper.from_list(list(value), vi.name)
            else:
                proto = numpy_helper.from_array(value, vi.name)
            (ds / f"input_{i}.pb").write_bytes(proto.SerializeToString())


@pytest.mark.parametrize("name", sorted(CASES))
def test_conformance_cases_run_every_kind_of_recipe_without_data(tmp_path, conformance_cases, name):
    from onnxopt.testing.conformance import harness, tools

    case = conformance_cases[name]
    src = tmp_path / "model.onnx"
    src.write_bytes(case.model)
    original = harness.check_original(case)
    for recipe in ("simplify", "fp16", "compress"):
        out = tmp_path / f"{recipe}.onnx"
        result = api.optimize(src, out, recipe=recipe, quiet=True)
        assert result.passed, result.failures
        onnx.checker.check_model(str(out), full_check=True)
        if original.status != "eligible":  # onnxruntime's Python API cannot feed the case's arrays
            assert result.validation is None and "--eval DATA" in result.notes[0], result.notes
            continue
        assert result.validation is not None, result.notes  # checked on generated feeds
        kind, (rtol, atol) = tools.tool_kind(f"recipe:{recipe}")
        why = harness._compare(case, harness._run(out, case), kind, max(rtol, case.rtol), max(atol, case.atol))
        assert why is None, f"{recipe}: {why}"
    if original.status != "eligible":
        return
    # The case's own inputs as calibration data, read from test_data_set folders.
    _write_data_sets(case, tmp_path / "calib")
    result = api.optimize(src, tmp_path / "int8.onnx", recipe="int8", calibration=tmp_path / "calib", quiet=True)
    assert result.passed and result.validation is not None, result.failures
    quant = next(r for r in result.reports if r.pass_name == "quantize")
    assert quant.status in ("ok", "unchanged", "rolled-back"), quant.to_json()
    if quant.status == "rolled-back":  # e.g. opset 28: the simplified model is written, with why
        assert "opset 28" in quant.error, quant.error
    why = harness._compare(case, harness._run(tmp_path / "int8.onnx", case), "lossy", case.rtol, case.atol)
    assert why is None, why


def test_validate_without_data_uses_generated_feeds(tmp_path, capsys):
    path = _save(_hf_embeddings(), tmp_path / "m.onnx")
    rep = api.validate(path, path, latency_runs=0)
    assert rep.num_feeds == 4 and rep.worst("max_abs") == 0.0
    bad = _save(ir.from_onnx_text(SQUEEZE_BY_INPUT), tmp_path / "bad.onnx")
    code = cli.main(["validate", bad, bad, "--runs", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot validate without data" in err and "--data" in err and len(err.splitlines()) == 1


def test_scalar_inputs_of_an_npz_are_fed_as_0d_arrays(tmp_path):
    # A scalar input (silero VAD's int64 `sr`) stored one value per sample: each feed must hold
    # a 0-d array; a numpy scalar is refused by onnxruntime ("Unable to handle object").
    model = ir.serde.deserialize_model(_if_on_sample_rate())
    np.savez(tmp_path / "d.npz", x=np.ones((3, 1, 200), np.float32), sr=np.full(3, 16000, np.int64))
    feeds = list(data.load_data(tmp_path / "d.npz", data.input_signature(model)))
    assert all(isinstance(f["sr"], np.ndarray) and f["sr"].shape == () for f in feeds)
    _runs_all(model, feeds)
