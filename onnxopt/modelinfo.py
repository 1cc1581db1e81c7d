"""Model facts: opsets, I/O, op counts, parameters and bytes by dtype and by op type."""

from __future__ import annotations

import collections
import logging
import os
import pathlib
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from onnxopt import _ir_utils
from onnxopt import io as _io
from onnxopt.runtime import kernels

__all__ = ["INSPECT_SCHEMA_VERSION", "describe_model", "format_text"]

logger = logging.getLogger(__name__)

# Bump when a field of ``describe_model``'s output changes meaning or goes away.
INSPECT_SCHEMA_VERSION = 1


def _dims(value: ir.Value) -> list[int | str | None] | None:
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else (d.value if d is not None else None) for d in value.shape]


def describe_model(
    model: ir.Model | str | os.PathLike, *, providers: tuple[str, ...] = ("cpu",)
) -> dict[str, Any]:
    """A JSON-serialisable description of ``model`` (see docs/cli.md "inspect --json" for the fields).

    Args:
        model: an ir.Model or a path.
        providers: execution providers whose kernel registries every node is checked against.
    """
    path = None
    if not isinstance(model, ir.Model):
        path = pathlib.Path(model)
        model = _io.load_model(path)
    graph = model.graph
    inputs = [
        {"name": v.name, "dtype": str(v.dtype) if v.dtype else None, "shape": _dims(v)}
        for v in graph.inputs
        if not v.is_initializer()
    ]
    outputs = [{"name": v.name, "dtype": str(v.dtype) if v.dtype else None, "shape": _dims(v)} for v in graph.outputs]
    dynamic = sorted(
        {str(d) for v in [*graph.inputs, *graph.outputs] for d in (_dims(v) or []) if not isinstance(d, int)}
    )
    by_dtype: dict[str, dict[str, int]] = collections.defaultdict(lambda: {"tensors": 0, "parameters": 0, "bytes": 0})
    for g in model.graphs():
        for value in g.initializers.values():
            tensor = value.const_value
            if tensor is None:
                continue
            row = by_dtype[str(tensor.dtype)]
            row["tensors"] += 1
            row["parameters"] += tensor.size
            row["bytes"] += tensor.nbytes
    by_op: dict[str, dict[str, int]] = collections.defaultdict(lambda: {"nodes": 0, "parameters": 0, "bytes": 0})
    seen: set[int] = set()
    provenance: collections.Counter[str] = collections.Counter()
    for node in graph.all_nodes():
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        row = by_op[key]
        row["nodes"] += 1
        for inp in node.inputs:
            if inp is not None and inp.const_value is not None and id(inp) not in seen:
                seen.add(id(inp))
                row["parameters"] += inp.const_value.size
                row["bytes"] += inp.const_value.nbytes
        tag = node.metadata_props.get(_ir_utils.PROVENANCE_KEY)
        if tag:
            provenance[tag] += 1
    params, nbytes = _ir_utils.parameter_count(model)
    info: dict[str, Any] = {
        "schema_version": INSPECT_SCHEMA_VERSION,
        "path": str(path) if path else None,
        "file_bytes": _file_bytes(path, model) if path else None,
        "ir_version": model.ir_version,
        "opset_imports": dict(sorted(model.opset_imports.items())),
        "producer": " ".join(x for x in (model.producer_name, model.producer_version) if x),
        "inputs": inputs,
        "outputs": outputs,
        "dynamic_dims": dynamic,
        "nodes": sum(r["nodes"] for r in by_op.values()),
        "subgraphs": sum(1 for _ in model.graphs()) - 1,
        "parameters": params,
        "weight_bytes": nbytes,
        "by_dtype": dict(sorted(by_dtype.items())),
        "by_op_type": dict(sorted(by_op.items(), key=lambda kv: (-kv[1]["nodes"], kv[0]))),
        "provenance": dict(provenance),
        "provenance_ops": _provenance_ops(model),
        "transformed": _transformed(model),
        }
    # Intermediate dtypes decide fp16 counts and kernel type checks: infer them on a copy.
    typed = _with_inferred_types(model)
    info["precision"] = _precision(typed)
    info["ep_support"] = [kernels.kernel_support(typed, p).to_json() for p in providers]
    return info


def _with_inferred_types(model: ir.Model) -> ir.Model:
    """A copy of ``model`` with onnx shape inference applied (the model itself if it fails)."""
    clone = model.clone()
    try:
        ir.passes.common.ShapeInferencePass()(clone)
    except ir.passes.PassError as err:  # keep what the file states; inspect must not fail
        logger.debug("shape inference failed: %s", err)
        return model
    return clone


# Pass-name fragments -> the kind of change ``inspect`` reports (passes tag the nodes they write).
_KINDS = (
    ("quant", "quantized"),
    ("int8", "quantized"),
    ("fp16", "fp16"),
    ("float16", "fp16"),
    ("mixed", "fp16"),
    ("cluster", "clustered"),
    ("lowrank", "low_rank"),
    ("low-rank", "low_rank"),
    ("prune", "pruned"),
    ("fuse", "fused"),
)
_QDQ = ("QuantizeLinear", "DequantizeLinear")
_INTEGER_OPS = frozenset({"QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "QLinearAdd",
                          "QLinearMul", "QGemm", "QAttention", "DynamicQuantizeLinear", "MatMulNBits",
                          "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearSoftmax"})
# Weights with at most this many distinct values (and at least _MIN_CLUSTER_SIZE elements) count
# as clustered; larger tensors are not scanned (np.unique sorts them).
_MAX_CLUSTERS = 256
_MIN_CLUSTER_SIZE = 1024
_MAX_SCAN_ELEMENTS = 1 << 24


def _kind(pass_name: str) -> str:
    for fragment, kind in _KINDS:
        if fragment in pass_name:
            return kind
    return "other"


def _provenance_ops(model: ir.Model) -> dict[str, dict[str, int]]:
    out: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for node in model.graph.all_nodes():
        tag = node.metadata_props.get(_ir_utils.PROVENANCE_KEY)
        if tag:
            out[tag][node.op_type] += 1
    return {k: dict(sorted(v.items())) for k, v in sorted(out.items())}


def _transformed(model: ir.Model) -> dict[str, int]:
    """Tagged nodes per kind of change, plus weights that look clustered."""
    kinds: collections.Counter[str] = collections.Counter()
    for node in model.graph.all_nodes():
        tag = node.metadata_props.get(_ir_utils.PROVENANCE_KEY)
        if tag:
            kinds[_kind(tag)] += 1
    out = {k: kinds.get(k, 0) for k in ("quantized", "fp16", "clustered", "low_rank", "pruned", "fused", "other")}
    out["clustered_weights"] = _clustered_weights(model)
    return out


def _clustered_weights(model: ir.Model) -> int:
    count = 0
    for g in model.graphs():
        for value in g.initializers.values():
            t = value.const_value
            if t is None or not _ir_utils.is_float_dtype(t.dtype) or isinstance(t, ir.ExternalTensor):
                continue
            if not _MIN_CLUSTER_SIZE <= t.size <= _MAX_SCAN_ELEMENTS:
                continue
            if len(np.unique(t.numpy())) <= _MAX_CLUSTERS:
                count += 1
    return count


def _dtype_name(dtype: ir.DataType | None) -> str:
    return dtype.name.lower() if dtype is not None else "unknown"


def _precision(model: ir.Model) -> dict[str, Any]:
    """Q/DQ nodes by integer dtype, integer kernels, Casts by target dtype, float16 nodes."""
    q: collections.Counter[str] = collections.Counter()
    dq: collections.Counter[str] = collections.Counter()
    integer_ops: collections.Counter[str] = collections.Counter()
    casts: collections.Counter[str] = collections.Counter()
    qdq_consumers = 0
    half_nodes = 0
    for node in model.graph.all_nodes():
        op = node.op_type
        if op in _QDQ:
            zp = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] is not None else None
            if op == "QuantizeLinear":
                dtype = zp.dtype if zp is not None else node.outputs[0].dtype
                if dtype is None and "output_dtype" in node.attributes:
                    dtype = ir.DataType(node.attributes.get_int("output_dtype"))
                q[_dtype_name(dtype or ir.DataType.UINT8)] += 1
            else:
                dtype = node.inputs[0].dtype if node.inputs[0] is not None else None
                dq[_dtype_name(dtype or (zp.dtype if zp is not None else None))] += 1
            continue
        if op in _INTEGER_OPS:
            integer_ops[op] += 1
        if op == "Cast":
            casts[_dtype_name(ir.DataType(node.attributes.get_int("to", 0)))] += 1
            continue
        if any(v is not None and v.producer() is not None and v.producer().op_type == "DequantizeLinear"
               for v in node.inputs):
            qdq_consumers += 1
        if any(v is not None and v.dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
               for v in [*node.inputs, *node.outputs]):
            half_nodes += 1
    return {
        "quantize_linear": dict(sorted(q.items())),
        "dequantize_linear": dict(sorted(dq.items())),
        "qdq_quantized_nodes": qdq_consumers,
        "integer_ops": dict(sorted(integer_ops.items())),
        "casts": dict(sorted(casts.items())),
        "float16_nodes": half_nodes,
    }


def _file_bytes(path: pathlib.Path, model: ir.Model) -> int:
    total = path.stat().st_size
    for loc in {t.location for t in _io.external_tensors(model)}:
        total += (path.parent / loc).stat().st_size
    return total


def format_text(info: dict[str, Any]) -> str:
    """Human-readable version of :func:`describe_model`'s dict."""
    lines = []
    if info.get("path"):
        lines.append(f"model: {info['path']} ({info['file_bytes']:,} bytes)")
    opsets = ", ".join(f"{d or 'ai.onnx'}:{v}" for d, v in info["opset_imports"].items())
    lines.append(f"ir_version: {info['ir_version']}  opsets: {opsets}  producer: {info['producer'] or '-'}")
    for kind in ("inputs", "outputs"):
        for v in info[kind]:
            dims = "?" if v["shape"] is None else ",".join(str(d) for d in v["shape"])
            lines.append(f"{kind[:-1]}: {v['name']} {v['dtype']} [{dims}]")
    if info["dynamic_dims"]:
        lines.append(f"dynamic dims: {', '.join(info['dynamic_dims'])}")
    lines.append(
        f"nodes: {info['nodes']}  subgraphs: {info['subgraphs']}  parameters: {info['parameters']:,}  "
        f"weight bytes: {info['weight_bytes']:,}"
    )
    lines.append("by dtype:")
    for dtype, row in info["by_dtype"].items():
        lines.append(f"  {dtype:<12} tensors={row['tensors']:<5} params={row['parameters']:<12,} bytes={row['bytes']:,}")
    lines.append("by op type:")
    for op, row in info["by_op_type"].items():
        lines.append(f"  {op:<24} nodes={row['nodes']:<5} params={row['parameters']:<12,} bytes={row['bytes']:,}")
    if info["provenance"]:
        lines.append("written by onnxopt passes: " + ", ".join(f"{k}={v}" for k, v in info["provenance"].items()))
    changed = {k: v for k, v in info.get("transformed", {}).items() if v}
    if changed:
        lines.append("transformed nodes: " + ", ".join(f"{k}={v}" for k, v in changed.items()))
    prec = info.get("precision", {})
    parts = [f"{k}={v}" for k, v in prec.items() if v]
    if parts:
        lines.append("precision: " + "; ".join(parts))
    for ep in info.get("ep_support", []):
        if not ep["checked"]:
            lines.append(f"{ep['provider']}: not in this onnxruntime build, kernels not checked")
        elif ep["all_supported"]:
            fallback = sum(r["count"] for r in ep["cast_fallback"])
            extra = f" ({fallback} float16 nodes run through inserted Casts)" if fallback else ""
            lines.append(f"{ep['provider']}: every node has a kernel{extra}")
        else:
            lines.append(f"{ep['provider']}: nodes without a kernel:")
            for r in ep["unsupported"]:
                lines.append(f"  {r['domain']}.{r['op_type']} v{r['version']} x{r['count']}: {r['reason']}")
    return "\n".join(lines)
