"""Per-layer multiply-add counts (FLOPs = 2 x MACs) of Conv, ConvTranspose, Gemm and MatMul.

Shapes come from ONNX shape inference; the first dimension of every activation is taken as
the batch, so the numbers are per sample. Unknown (symbolic) inner dimensions count as 1, and a
layer whose shapes cannot be inferred is left out.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir

__all__ = ["layer_flops", "total_flops"]

logger = logging.getLogger(__name__)


def _shapes(model: ir.Model) -> dict[str, tuple[int, ...]]:
    proto = onnx.shape_inference.infer_shapes(ir.to_proto(model), data_prop=True)
    out: dict[str, tuple[int, ...]] = {}
    for vi in list(proto.graph.value_info) + list(proto.graph.output) + list(proto.graph.input):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in t.shape.dim)
    for init in proto.graph.initializer:
        out[init.name] = tuple(init.dims)
    return out


def layer_flops(model: ir.Model) -> dict[str, int]:
    """FLOPs per sample of each Conv/ConvTranspose/Gemm/MatMul node, keyed by node name."""
    shapes = _shapes(model)
    result = {}
    for i, node in enumerate(model.graph):
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or node.domain not in ("", "ai.onnx"):
            continue
        name = node.name or f"{node.op_type}_{i}"
        w = shapes.get(node.inputs[1].name) if node.inputs[1] is not None else None
        y = shapes.get(node.outputs[0].name)
        if w is None or y is None or len(y) < 1:
            continue
        per_sample_out = int(np.prod(y[1:])) if len(y) > 1 else 1
        if node.op_type == "Conv":
            macs = per_sample_out * int(np.prod(w[1:]))
        elif node.op_type == "ConvTranspose":
            x = shapes.get(node.inputs[0].name)
            if x is None:
                continue
            macs = int(np.prod(x[1:])) * int(np.prod(w[1:]))
        elif node.op_type == "Gemm":
            k = w[0] if node.attributes.get_int("transB", 0) == 0 else w[1]
            macs = per_sample_out * k
        else:
            macs = per_sample_out * w[-2] if len(w) >= 2 else per_sample_out
        result[name] = 2 * macs
    return result


def total_flops(model: ir.Model) -> int:
    """Sum of :func:`layer_flops`."""
    return sum(layer_flops(model).values())
