"""Model facts: opsets, I/O, op counts, parameters and bytes by dtype and by op type."""

from __future__ import annotations

import collections
import os
import pathlib
from typing import Any

import onnx_ir as ir

from onnxopt import _ir_utils
from onnxopt import io as _io

__all__ = ["INSPECT_SCHEMA_VERSION", "describe_model", "format_text"]

# Bump when a field of ``describe_model``'s output changes meaning or goes away.
INSPECT_SCHEMA_VERSION = 1


def _dims(value: ir.Value) -> list[int | str | None] | None:
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else (d.value if d is not None else None) for d in value.shape]


def describe_model(model: ir.Model | str | os.PathLike) -> dict[str, Any]:
    """A JSON-serialisable description of ``model`` (see README "inspect" for the fields)."""
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
    }
    return info


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
    return "\n".join(lines)
