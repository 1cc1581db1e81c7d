"""Exports: ORT format through onnxruntime, ONNX with external data (one file / per tensor), >2 GB."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import onnxopt
from onnxopt import cli, export
from onnxopt import io as _io
from onnxopt.errors import OutputPathError
from onnxopt.export import ExportError, ExportOptions
from onnxopt.pass_base import make
from onnxopt.testing import builders
from onnxopt.testing.bert_builder import bert_feeds, make_bert
from tests.conftest import from_text, load_model, model_path
from tests.tolerances import TOL

BUNDLED = ["digits_mlp", "digits_cnn", "digits_transformer"]


def run(path_or_model, feeds):
    target = ir.to_proto(path_or_model).SerializeToString() if isinstance(path_or_model, ir.Model) else str(path_or_model)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(target, so, providers=["CPUExecutionProvider"])
    return [sess.run(None, f) for f in feeds]


def assert_close(ref, got, rtol, atol):
    for r_outs, g_outs in zip(ref, got, strict=True):
        for r, g in zip(r_outs, g_outs, strict=True):
            np.testing.assert_allclose(g, r, rtol=rtol, atol=atol)


def eval_feeds(name: str, n: int = 64, batch: int = 16):
    x = np.load(model_path(f"{name}_eval.npz"))["input"][:n]
    return [{"input": x[i : i + batch]} for i in range(0, len(x), batch)]


@pytest.mark.slow
@pytest.mark.parametrize("name", BUNDLED)
def test_ort_export_of_bundled_model_loads_and_matches(tmp_path, name):
    model = load_model(f"{name}.onnx")
    result = export.export(model, tmp_path / f"{name}.ort")
    assert result.format == "ort" and result.ort_level == "all"
    assert result.path.read_bytes()[4:8] == b"ORTM"  # flatbuffer file identifier of ORT format
    config = (tmp_path / f"{name}.required_operators.config").read_text()
    assert "ai.onnx;" in config and str(tmp_path) not in config
    feeds = eval_feeds(name)
    ref = run(model_path(f"{name}.onnx"), feeds)
    # Level "all" re-associates (e.g. Conv+Relu fused): fp32 re-association tolerance.
    assert_close(ref, run(result.path, feeds), **TOL["reassociate_fp32"])
    metrics = export.check_ort(model, result.path, feeds)
    # FP32 re-association only: 1 - cosine ~1e-12 on any CPU.
    assert all(m.cosine > 0.99999 for m in metrics.values())


def test_ort_export_of_fused_bert_keeps_contrib_ops_working(tmp_path):
    model = ir.serde.deserialize_model(make_bert(layers=1))
    ref = model.clone()
    make("fuse")(model)
    result = export.export(model, tmp_path / "bert.ort", ExportOptions(ort_level="basic"))
    assert result.ort_level == "basic"
    assert "com.microsoft;1;" in (tmp_path / "bert.required_operators.config").read_text()
    feeds = bert_feeds(3)
    assert_close(run(ref, feeds), run(result.path, feeds), **TOL["reassociate_fp32"])


def test_ort_export_failure_leaves_nothing_behind(tmp_path):
    model = from_text(
        """
        <ir_version: 8, opset_import: ["" : 17, "my.custom" : 1]>
        g (float[N] x) => (float[N] y) { y = my.custom.Foo(x) }
        """
    )
    with pytest.raises(ExportError, match="onnxruntime cannot write/load it as ORT format"):
        export.export(model, tmp_path / "bad.ort")
    assert list(tmp_path.iterdir()) == []


def test_external_data_one_file_round_trip(tmp_path):
    model = load_model("digits_mlp.onnx")
    result = export.export(model, tmp_path / "mlp.onnx", ExportOptions(external_data="one-file", size_threshold=1024))
    assert [f.name for f in result.files] == ["mlp.onnx", "mlp.onnx.data"]
    reloaded = _io.load_model(result.path)
    external = _io.external_tensors(reloaded)
    big = [v for v in model.graph.initializers.values() if v.const_value.nbytes > 1024]
    assert len(external) == len(big) > 0
    assert result.path.stat().st_size < 10_000  # the weights really left the protobuf
    feeds = eval_feeds("digits_mlp", 32)
    assert_close(run(model_path("digits_mlp.onnx"), feeds), run(result.path, feeds), **TOL["exact"])


def test_external_data_per_tensor_round_trip(tmp_path):
    model = load_model("digits_cnn.onnx")
    threshold = 4096
    result = export.export(model, tmp_path / "cnn.onnx", ExportOptions(external_data="per-tensor", size_threshold=threshold))
    big = sorted(v.name for v in model.graph.initializers.values() if v.const_value.nbytes > threshold)
    weight_files = result.files[1:]
    assert len(weight_files) == len(big) > 1
    assert all(f.parent.name == "cnn.weights" for f in weight_files)
    reloaded = _io.load_model(result.path)
    locations = sorted(t.location for t in _io.external_tensors(reloaded))
    assert len(locations) == len(set(locations)) == len(big)
    # The exported model object is unchanged: its weights are still in memory.
    assert not _io.external_tensors(model)
    feeds = eval_feeds("digits_cnn", 32)
    assert_close(run(model_path("digits_cnn.onnx"), feeds), run(result.path, feeds), **TOL["exact"])


def test_format_and_options_are_checked(tmp_path):
    model = load_model("digits_mlp.onnx")
    with pytest.raises(ExportError, match="does not match --format ort"):
        export.export(model, tmp_path / "m.onnx", ExportOptions(format="ort"))
    with pytest.raises(ExportError, match="ORT format keeps its weights inline"):
        export.export(model, tmp_path / "m.ort", ExportOptions(external_data="per-tensor"))
    with pytest.raises(ValueError, match="size_threshold must be >= 0"):
        ExportOptions(size_threshold=-1)
    with pytest.raises(ValueError, match="ort_level must be"):
        ExportOptions(ort_level="max")  # type: ignore[arg-type]
    assert export.format_for("model.ORT") == "ort" and export.format_for("model.bin") == "onnx"


def test_optimize_api_writes_ort_and_checks_it(tmp_path):
    out = tmp_path / "mlp.ort"
    result = onnxopt.optimize(model_path("digits_mlp.onnx"), out, quiet=True)
    assert result.passed and result.export is not None and result.export.format == "ort"
    # FP32 (simplify) saved as ORT format at level all: re-association only, 1 - cosine ~1e-12.
    assert result.export.check and all(v["cosine"] > 0.9999 for v in result.export.check.values())
    sess = ort.InferenceSession(str(out))
    assert [o.name for o in sess.get_outputs()] == ["logits"]


def test_cli_export_options(tmp_path, capsys):
    src = str(model_path("digits_mlp.onnx"))
    assert cli.main(["optimize", src, "-o", str(tmp_path / "m.onnx"), "--format", "ort", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not match --format ort" in err[0]
    assert not (tmp_path / "m.onnx").exists()
    code = cli.main(["optimize", src, "-o", str(tmp_path / "m.onnx"), "-q",
                     "--external-data", "per-tensor", "--external-threshold", "2048"])
    assert code == 0 and len(list((tmp_path / "m.weights").iterdir())) >= 2
    assert cli.main(["optimize", src, "-o", str(tmp_path / "m2.onnx"), "-q", "--external-data"]) == 0
    assert (tmp_path / "m2.onnx.data").exists()



def test_auto_external_data_above_the_limit_and_reload(tmp_path, monkeypatch):
    # The same code path as a > 2 GB model (benchmarks/big_export.py writes a real 3 GiB one),
    # with the automatic threshold lowered so the test stays small.
    monkeypatch.setattr(_io, "_AUTO_EXTERNAL_BYTES", 1 << 20)
    n, rows, cols = 3, 512, 256  # 3 x 512 KiB
    model = builders.big_model(n, rows, cols)
    result = export.export(model, tmp_path / "big.onnx")  # external_data="auto"
    assert [f.name for f in result.files] == ["big.onnx", "big.onnx.data"]
    assert result.files[1].stat().st_size == n * rows * cols * 4
    reloaded = _io.load_model(result.path)
    assert len(_io.external_tensors(reloaded)) == n
    assert reloaded.graph.initializers["w2"].const_value.numpy()[300, 17] == 2 * 1000 + 300
    sess = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {"idx": np.array([77], np.int64)})
    for i, y in enumerate(outs):
        assert y.shape == (1, cols) and np.all(y == i * 1000 + 77)


def test_per_tensor_export_replaces_its_own_folder_but_not_a_foreign_one(tmp_path):
    model = load_model("digits_mlp.onnx")
    options = ExportOptions(external_data="per-tensor")
    export.export(model, tmp_path / "m.onnx", options)
    export.export(model, tmp_path / "m.onnx", options)  # a re-run replaces its own weights
    (tmp_path / "m.weights" / "notes.txt").write_text("mine")
    with pytest.raises(OutputPathError, match=r"holds 'notes\.txt'"):
        export.export(model, tmp_path / "m.onnx", options)
    assert (tmp_path / "m.weights" / "notes.txt").read_text() == "mine"
