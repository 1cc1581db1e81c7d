"""`onnxopt inspect`: the documented JSON fields, provenance, precision, kernel support."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnxopt import cli, modelinfo
from onnxopt.pass_base import make
from onnxopt.runtime import kernels
from onnxopt.testing.bert_builder import make_bert
from tests.conftest import from_text, load_model, model_path

# The documented fields of `inspect --json` (README section "inspect --json"), schema version 1.
TOP_LEVEL = {
    "schema_version", "path", "file_bytes", "ir_version", "opset_imports", "producer", "inputs",
    "outputs", "dynamic_dims", "nodes", "subgraphs", "parameters", "weight_bytes", "by_dtype",
    "by_op_type", "provenance", "provenance_ops", "transformed", "precision", "ep_support",
}
TRANSFORMED = {"quantized", "fp16", "clustered", "low_rank", "pruned", "fused", "other", "clustered_weights"}
PRECISION = {"quantize_linear", "dequantize_linear", "qdq_quantized_nodes", "integer_ops", "casts", "float16_nodes"}
EP = {"provider", "checked", "all_supported", "nodes", "unsupported", "cast_fallback"}


def loads(model: ir.Model) -> bool:
    try:
        ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:  # onnxruntime raises its own exception types
        return False
    return True


def test_json_fields_of_bundled_model(capsys):
    assert cli.main(["inspect", str(model_path("digits_mlp.onnx")), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info) == TOP_LEVEL
    assert info["schema_version"] == modelinfo.INSPECT_SCHEMA_VERSION == 1
    assert info["opset_imports"] == {"": 17} and info["ir_version"] == 8
    assert info["inputs"] == [{"name": "input", "dtype": "FLOAT", "shape": ["batch", 64]}]
    assert info["dynamic_dims"] == ["batch"]
    model = load_model("digits_mlp.onnx")
    arrays = [v.const_value.numpy() for v in model.graph.initializers.values()]
    assert info["parameters"] == sum(a.size for a in arrays)
    assert info["by_dtype"]["FLOAT"]["bytes"] == sum(a.nbytes for a in arrays) == info["weight_bytes"]
    assert sum(r["nodes"] for r in info["by_op_type"].values()) == info["nodes"]
    assert set(info["transformed"]) == TRANSFORMED and not any(info["transformed"].values())
    assert set(info["precision"]) == PRECISION
    [cpu] = info["ep_support"]
    assert set(cpu) == EP
    assert cpu["provider"] == "CPUExecutionProvider" and cpu["checked"] and cpu["all_supported"] is True
    assert cpu["nodes"] == info["nodes"]


def test_fused_nodes_are_reported_by_provenance():
    model = ir.serde.deserialize_model(make_bert(layers=1))
    report = make("fuse")(model)
    info = modelinfo.describe_model(model)
    # Every fused node, plus the Cast the attention fusion adds for the int32 mask.
    assert info["provenance_ops"]["fuse"] == {**report.counts, "Cast": 1}
    assert info["provenance"] == {"fuse": sum(report.counts.values()) + 1}
    assert info["transformed"]["fused"] == info["provenance"]["fuse"]
    assert info["by_op_type"]["com.microsoft.Attention"]["nodes"] == 1
    assert info["ep_support"][0]["all_supported"] is True and loads(model)


def test_unsupported_op_agrees_with_onnxruntime():
    model = from_text(
        """
        <ir_version: 8, opset_import: ["" : 17, "my.custom" : 1]>
        g (float[N] x) => (float[N] y) { t = Relu(x)
          y = my.custom.Foo(t) }
        """
    )
    [cpu] = modelinfo.describe_model(model)["ep_support"]
    assert cpu["all_supported"] is False
    assert [(r["domain"], r["op_type"], r["count"]) for r in cpu["unsupported"]] == [("my.custom", "Foo", 1)]
    assert not loads(model)


def test_contrib_op_is_checked_by_op_and_version():
    support = kernels.kernel_support(
        from_text('<ir_version: 8, opset_import: ["com.microsoft" : 1, "" : 17]> g (float[N] x) => '
                  "(float[N] y) { y = com.microsoft.FastGelu(x) }")
    )
    assert support.all_supported is True
    missing = kernels.kernel_support(
        from_text('<ir_version: 8, opset_import: ["com.microsoft" : 1, "" : 17]> g (float[N] x) => '
                  "(float[N] y) { y = com.microsoft.NoSuchFusedOp(x) }")
    )
    assert missing.unsupported[0]["reason"] == "no kernel for this op"


@pytest.mark.parametrize("opset", [25, 28])
def test_open_ended_kernel_matches_only_its_start_version(opset):
    # onnxruntime's newest QuantizeLinear/DequantizeLinear CPU kernels are registered from 25
    # without an end version; like onnxruntime's lookup, they serve schema version 25 only, so
    # the opset-28 schema (since_version 28) has no kernel and the model does not load.
    model = from_text(
        f"""
        <ir_version: 10, opset_import: ["" : {opset}]>
        g (float[N] x) => (float[N] y) <float s = {{0.1}}, int8 zp = {{0}}> {{
            q = QuantizeLinear(x, s, zp)
            y = DequantizeLinear(q, s, zp)
        }}
        """
    )
    support = kernels.kernel_support(model)
    since = {n.op_type: onnx.defs.get_schema(n.op_type, opset).since_version for n in model.graph}
    expected = all(kernels.has_kernel(op, v) for op, v in since.items())
    assert support.all_supported is expected is loads(model)
    if not expected:
        assert {r["op_type"] for r in support.unsupported} == {"QuantizeLinear", "DequantizeLinear"}
        assert all(r["reason"].startswith(f"no kernel for opset version {since[r['op_type']]}")
                   for r in support.unsupported)


def test_qdq_and_fp16_precision():
    model = from_text(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float16[N, 4] y) <float[4, 4] w = {1,2,3,4,5,6,7,8,1,2,3,4,5,6,7,8},
             float s = {0.1}, int8 zp = {0}> {
            xq = QuantizeLinear(x, s, zp)
            xd = DequantizeLinear(xq, s, zp)
            h = MatMul(xd, w)
            h16 = Cast<to=10>(h)
            y = Sin(h16)
        }
        """
    )
    info = modelinfo.describe_model(model)
    prec = info["precision"]
    assert prec["quantize_linear"] == {"int8": 1} and prec["dequantize_linear"] == {"int8": 1}
    assert prec["qdq_quantized_nodes"] == 1  # the MatMul reads a DequantizeLinear output
    assert prec["casts"] == {"float16": 1} and prec["float16_nodes"] == 1
    [cpu] = info["ep_support"]
    # Sin has no float16 CPU kernel: onnxruntime inserts Casts, so the model still loads.
    assert cpu["all_supported"] is True
    assert [r["op_type"] for r in cpu["cast_fallback"]] == ["Sin"]
    assert loads(model)


def test_clustered_weights_are_counted(rng):
    model = load_model("digits_mlp.onnx")
    value = model.graph.initializers["net.0.weight"]
    w = value.const_value.numpy()
    centroids = np.linspace(w.min(), w.max(), 16, dtype=np.float32)
    value.const_value = ir.tensor(centroids[rng.integers(0, 16, w.shape)], name=value.name)
    assert modelinfo.describe_model(model)["transformed"]["clustered_weights"] == 1


def test_cli_ep_option(capsys):
    path = str(model_path("digits_mlp.onnx"))
    assert cli.main(["inspect", path, "--json", "--ep", "cpu,cuda"]) == 0
    cpu, cuda = json.loads(capsys.readouterr().out)["ep_support"]
    assert cpu["checked"] is True
    assert cuda["checked"] is ("CUDAExecutionProvider" in kernels.registry_providers())
    assert cli.main(["inspect", path, "--ep", "bogus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown execution provider 'bogus'" in err[0]


@pytest.mark.parametrize("name", ["digits_cnn", "digits_transformer"])
def test_text_output_mentions_kernels(capsys, name):
    assert cli.main(["inspect", str(model_path(f"{name}.onnx"))]) == 0
    assert "CPUExecutionProvider: every node has a kernel" in capsys.readouterr().out
