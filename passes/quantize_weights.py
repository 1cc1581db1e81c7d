"""Weight-only quantization: int8/int4 weights dequantized at run time, activations stay float.

Algebra: ``W ~= s * q`` with q symmetric integers (zero point 0), one scale per output channel
or per block of ``block_size`` values along the reduction axis. ``MatMul(x, DQ(q, s))`` equals
``MatMul(x, s * q)`` exactly in float, so the only error is the rounding of W: at most ``s / 2``
per weight. No calibration data is needed. Two encodings:

- ``qdq``: ``DequantizeLinear(q, s)`` feeding the op (int8 per channel: opset 13; int4 or
  blockwise: ``block_size`` attribute and INT4 tensors of opset 21, upgraded internally);
- ``matmulnbits``: onnxruntime's ``com.microsoft.MatMulNBits`` for 2-D MatMul weights (unsigned
  4/8-bit values packed along K with the default zero point ``2^(bits-1)``), a fused kernel.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as ir_common

from onnxopt import _ir_utils
from onnxopt.config import option
from onnxopt.pass_base import OptPass, PassReport, register
from onnxopt.quant import scales as qm

__all__ = ["QuantizeWeightsConfig", "QuantizeWeightsPass"]

logger = logging.getLogger(__name__)

_OPS = frozenset({"MatMul", "Gemm", "Conv"})


@dataclasses.dataclass(frozen=True)
class QuantizeWeightsConfig:
    """Options of the quantize-weights pass."""

    bits: Literal[8, 4] = option(8, "bits per weight (4 needs block_size or format=matmulnbits)")
    block_size: int = option(0, "values per scale along the reduction axis (0: one scale per channel)")
    format: Literal["qdq", "matmulnbits"] = option("qdq", "DequantizeLinear, or com.microsoft MatMulNBits")
    op_types: frozenset[str] = option(frozenset({"MatMul", "Gemm"}), "ops whose weights are quantized")
    min_elements: int = option(1024, "leave smaller weights float")
    exclude_nodes: frozenset[str] = option(frozenset(), "node names kept float")

    def __post_init__(self) -> None:
        unknown = sorted(self.op_types - _OPS)
        if unknown:
            raise ValueError(f"unknown op type {unknown[0]!r} in op_types; supported: {', '.join(sorted(_OPS))}")
        if self.block_size and (self.block_size < 16 or self.block_size & (self.block_size - 1)):
            raise ValueError(f"block_size must be 0 or a power of two >= 16, got {self.block_size}")
        if self.format == "matmulnbits" and not self.block_size:
            raise ValueError("format=matmulnbits needs block_size (e.g. 32)")
        if self.bits == 4 and self.format == "qdq" and not self.block_size:
            raise ValueError("bits=4 in qdq format needs block_size (INT4 DequantizeLinear, opset 21)")
        if self.min_elements < 0:
            raise ValueError(f"min_elements must be >= 0, got {self.min_elements}")


def _reduce_axis(node: ir.Node, w: np.ndarray) -> tuple[int, int] | None:
    """(reduction axis, output-channel axis) of the weight, or None if unsupported."""
    if node.op_type == "Conv":
        return (1, 0)
    if w.ndim != 2:
        return None
    if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
        return (1, 0)
    return (0, 1)


@register("quantize-weights")
class QuantizeWeightsPass(OptPass[QuantizeWeightsConfig]):
    """Store MatMul/Gemm/Conv weights as int8/int4 with per-channel or blockwise scales.

    Changes: replaces float weights by ``<W>_wq`` integer initializers behind DequantizeLinear
        (or MatMul by MatMulNBits); may upgrade the default opset to 21 for INT4/blockwise QDQ.
    Preserves: activations stay float; graph inputs/outputs; subgraphs (left float, with reason).
    Guarantees: every weight's relative error ||W - W'|| / ||W|| is recorded; only weights with
        at least ``min_elements`` values are touched.
    Not exact: each weight moves by at most half its scale.
    """

    config_class = QuantizeWeightsConfig

    def call(self, model: ir.Model) -> PassReport:
        """Quantize the weights of ``model`` in place; see the class docstring."""
        report = self.new_report(model)
        cfg = self.config
        candidates = []
        for node in _ir_utils.iter_nodes(model, cfg.op_types):
            if node.graph is not model.graph:
                report.skip(f"{node.op_type}: inside a subgraph, left float")
                continue
            if node.name in cfg.exclude_nodes:
                report.skip(f"{node.op_type}: node excluded by config")
                continue
            weight = _ir_utils.constant_input(node, 1)
            if weight is None:
                report.skip(f"{node.op_type}: weight is not a constant initializer")
                continue
            w = _ir_utils.constant_array(weight)
            if w.dtype != np.float32 or w.size < cfg.min_elements:
                report.skip(f"{node.op_type}: weight smaller than min_elements or not float32")
                continue
            axes = _reduce_axis(node, w)
            if axes is None or (cfg.format == "matmulnbits" and node.op_type != "MatMul"):
                report.skip(f"{node.op_type}: weight layout not supported by {cfg.format}")
                continue
            candidates.append((node, weight, w, axes))
        if not candidates:
            return report
        need = 21 if cfg.format == "qdq" and (cfg.block_size or cfg.bits == 4) else 13
        opset = model.opset_imports.get("", 0)
        if cfg.format == "qdq" and _ir_utils.upgrade_opset(model, need):
            report.note(f"default opset upgraded from {opset} to {need} for {cfg.bits}-bit DequantizeLinear")
            return self.call(model) if model.opset_imports.get("", 0) >= need else report
        taken = _ir_utils._value_names(model.graph)
        for node, weight, w, (red, out_axis) in candidates:
            if cfg.format == "matmulnbits":
                deq = self._matmulnbits(model.graph, node, weight, w, taken)
            else:
                deq = self._qdq(model.graph, node, weight, w, red, out_axis, taken)
            err = float(np.linalg.norm(w - deq) / max(np.linalg.norm(w), 1e-30))
            report.count(f"weights_{node.op_type}")
            report.record(weight.name, bits=cfg.bits, block_size=cfg.block_size, rel_error=err)
        ir_common.RemoveUnusedNodesPass()(model)
        return report

    def _init(self, graph: ir.Graph, base: str, tensor: ir.Tensor, taken: set[str]) -> ir.Value:
        name = _ir_utils.unique_name(graph, base, taken)
        tensor.name = name
        value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
        graph.register_initializer(value)
        return value

    def _qdq(self, graph: ir.Graph, node: ir.Node, weight: ir.Value, w: np.ndarray, red: int, out_axis: int,
             taken: set[str]) -> np.ndarray:
        cfg = self.config
        qtype = "int4" if cfg.bits == 4 else "int8"
        if cfg.block_size:
            q, scales = qm.block_quantize(w, red, cfg.block_size, qtype)
            deq = q.astype(np.float32) * np.repeat(scales, cfg.block_size, axis=red).take(range(w.shape[red]), axis=red)
            attrs = {"axis": red, "block_size": cfg.block_size}
        else:
            q, scales = qm.per_channel_symmetric(w, out_axis, qtype)
            deq = qm.dequantize(q, scales, np.zeros_like(scales), out_axis)
            attrs = {"axis": out_axis}
        dtype = ir.DataType.INT4 if cfg.bits == 4 else ir.DataType.INT8
        q_v = self._init(graph, f"{weight.name}_wq", ir.Tensor(q, dtype=dtype), taken)
        s_v = self._init(graph, f"{weight.name}_wscale", ir.tensor(scales.astype(np.float32)), taken)
        dq = ir.node("DequantizeLinear", [q_v, s_v], attributes=attrs,  # zero point: 0 of q's type
                     name=_ir_utils.unique_name(graph, f"{weight.name}_wdq", taken))
        dq.outputs[0].name = _ir_utils.unique_name(graph, f"{weight.name}_dequantized", taken)
        dq.outputs[0].dtype = ir.DataType.FLOAT
        dq.outputs[0].shape = ir.Shape(w.shape)
        _ir_utils.tag(dq, self.name)
        graph.insert_before(node, dq)
        node.replace_input_with(1, dq.outputs[0])
        return deq

    def _matmulnbits(self, graph: ir.Graph, node: ir.Node, weight: ir.Value, w: np.ndarray,
                     taken: set[str]) -> np.ndarray:
        cfg = self.config
        k, n = w.shape
        bs = cfg.block_size
        q, scales = qm.block_quantize(w, 0, bs, "int4" if cfg.bits == 4 else "int8")  # q [K,N], scales [nb,N]
        nb = scales.shape[0]
        deq = q.astype(np.float32) * np.repeat(scales, bs, axis=0)[:k]
        offset = 1 << (cfg.bits - 1)
        u = np.zeros((n, nb * bs), np.uint8)
        u[:, :k] = (q.T.astype(np.int16) + offset).astype(np.uint8)
        u[:, k:] = offset  # padding dequantizes to 0
        if cfg.bits == 4:  # two values per byte, the first in the low nibble
            packed = (u[:, 0::2] | (u[:, 1::2] << 4)).reshape(n, nb, bs // 2)
        else:
            packed = u.reshape(n, nb, bs)
        b_v = self._init(graph, f"{weight.name}_nbits", ir.tensor(packed), taken)
        s_v = self._init(graph, f"{weight.name}_nbits_scale", ir.tensor(scales.T.reshape(-1).astype(np.float32)), taken)
        mm = ir.node("MatMulNBits", [node.inputs[0], b_v, s_v], domain="com.microsoft",
                     attributes={"K": k, "N": n, "bits": cfg.bits, "block_size": bs}, name=node.name)
        _ir_utils.tag(mm, self.name)
        graph.insert_before(node, mm)
        out = node.outputs[0]
        ir.convenience.replace_all_uses_with(out, mm.outputs[0])
        if out.dtype is not None:
            mm.outputs[0].dtype = out.dtype
        mm.outputs[0].shape = out.shape
        name = out.name
        if out.is_graph_output():
            for i, v in enumerate(graph.outputs):
                if v is out:
                    graph.outputs[i] = mm.outputs[0]
        graph.remove(node, safe=True)
        mm.outputs[0].name = name
        if "com.microsoft" not in graph.opset_imports:
            graph.opset_imports["com.microsoft"] = 1
        return deq
