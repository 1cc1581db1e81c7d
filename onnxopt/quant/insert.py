"""Apply QDQ plans to a graph: QuantizeLinear/DequantizeLinear pairs, int8 weights, int32 biases.

Each activation tensor that a plan asks for gets one ``Q -> DQ`` pair; every main-graph user of
the tensor then reads the DQ output, so onnxruntime sees ``DQ -> op -> Q`` groups it can fuse.
A tensor whose only user is a Relu/Clip is not quantized itself: the Relu/Clip output is
(its range starts at 0, so the zero point is the type minimum and onnxruntime drops the op).
Weights are stored as int8 initializers behind a DequantizeLinear (4x smaller files); biases as
int32 with scale ``s_x * s_w``. Graph output names are kept: a quantized output's DQ takes it.
MatMul/Gemm outputs that are graph outputs are not quantized (see :mod:`onnxopt.quant.rules`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as ir_common

from onnxopt import _ir_utils
from onnxopt import io as _io
from onnxopt.quant import scales as qm
from onnxopt.quant.rules import ABSORBED_OPS, FLOAT_OUTPUT_OPS, QuantPlan
from onnxopt.runtime import kernels

__all__ = ["InsertResult", "QParams", "apply_plans", "unsupported_qdq_opset"]


def unsupported_qdq_opset(opset: int, provider: str = "CPUExecutionProvider") -> str | None:
    """Why Q/DQ nodes at default ``opset`` would not run in onnxruntime, or None if they would.

    The schema version of QuantizeLinear/DequantizeLinear at ``opset`` must have a kernel in
    the installed onnxruntime (1.32 CPU stops at version 25: a model at opset 28 fails to load
    once Q/DQ nodes are in it).
    """
    for op in ("QuantizeLinear", "DequantizeLinear"):
        version = onnx.defs.get_schema(op, opset).since_version
        if not kernels.has_kernel(op, version, provider):
            supported = [v for v in range(10, version) if kernels.has_kernel(op, v, provider)]
            highest = max(supported, default=None)
            return (
                f"default opset {opset} has {op}-{version}, which onnxruntime has no "
                f"{provider} kernel for (highest supported: {highest})"
            )
    return None


@dataclasses.dataclass(frozen=True)
class QParams:
    """Scale and zero point of one activation tensor."""

    scale: np.float32
    zero: int


@dataclasses.dataclass
class InsertResult:
    """What :func:`apply_plans` created: float tensor name -> dequantized tensor name, counts."""

    dequantized: dict[str, str] = dataclasses.field(default_factory=dict)
    params: dict[str, QParams] = dataclasses.field(default_factory=dict)
    weights: int = 0
    biases: int = 0
    absorbed: int = 0


class _Inserter:
    def __init__(
        self, model: ir.Model, ranges: Mapping[str, tuple[float, float]], qtype: str,
        symmetric: bool, reduce_range: bool, pass_name: str, float_readers: frozenset[str] = frozenset(),
    ) -> None:
        self.graph = model.graph
        self.float_readers = float_readers
        self.ranges = ranges
        self.qtype = qtype
        self.symmetric = symmetric
        self.reduce_range = reduce_range
        self.pass_name = pass_name
        # Q/DQ nodes are named as their outputs: names of existing nodes are avoided too.
        self.taken = _ir_utils._value_names(self.graph) | {n.name for n in self.graph.all_nodes() if n.name}
        self.shared: dict[ir.Value, ir.Value] = {}
        self.result = InsertResult()
        self.created: set[ir.Value] = set()
        self.origin: dict[ir.Value, ir.Value] = {}
        # Graph outputs give their name to their DQ output; the float value keeps its old name here.
        self.original_name: dict[ir.Value, str] = {}
        self.quantized: set[ir.Value] = set()
        self.weight_cache: dict[tuple[str, int | None], tuple[ir.Value, np.ndarray]] = {}

    def params(self, value: ir.Value) -> QParams:
        source = self.origin.get(value, value)
        while source in self.shared:
            source = self.shared[source]
        lo, hi = self.ranges[self.original_name.get(source, source.name)]
        # reduce_range narrows weights only: |w| <= 63 keeps u8 x s8 pair sums below int16 saturation.
        scale, zero = qm.scale_zero_point(lo, hi, self.qtype, symmetric=self.symmetric)
        return QParams(scale, zero)

    def initializer(self, base: str, array: np.ndarray) -> ir.Value:
        name = _ir_utils.unique_name(self.graph, base, self.taken)
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                         const_value=ir.Tensor(array, name=name))  # ir.tensor: 0.3 ms a call (protocol checks)
        self.graph.register_initializer(value)
        return value

    def node(self, op: str, inputs: Sequence[ir.Value], out_name: str, **attrs: int) -> ir.Node:
        out = _ir_utils.unique_name(self.graph, out_name, self.taken)
        node = ir.node(op, list(inputs), attributes=attrs, name=out)  # node and value names are apart
        node.outputs[0].name = out
        self.graph.append(node)
        return node

    def resolve_output(self, value: ir.Value) -> ir.Value:
        """Return the Relu/Clip output that absorbs ``value``, or ``value`` itself."""
        uses = value.uses()
        if len(uses) != 1 or value.is_graph_output():
            return value
        user = uses[0].node
        if user.op_type not in ABSORBED_OPS or user.domain != "" or user.graph is not self.graph:
            return value
        if user.op_type == "Clip" and any(
            v is not None and _ir_utils.constant_input(user, i) is None for i, v in enumerate(user.inputs) if i
        ):
            return value
        out = user.outputs[0]
        if out.name not in self.ranges:
            return value
        return out

    def quantize_activation(self, value: ir.Value) -> None:
        if value in self.quantized or value in self.created:
            return  # by identity: a quantized graph output is renamed ``<name>_float``
        users = [(u.node, u.idx) for u in value.uses()
                 if u.node.graph is self.graph and (not u.node.name or u.node.name not in self.float_readers)]
        if not users and not value.is_graph_output():
            return  # read only inside subgraphs, which stay float
        p = self.params(value)
        qdtype = np.uint8 if self.qtype == "uint8" else np.int8
        # Short suffixes: each name is written 3-6 times per quantized tensor (2 % of an INT8 file).
        scale = self.initializer(f"{value.name}_s", np.array(p.scale, dtype=np.float32))
        zero = self.initializer(f"{value.name}_zp", np.array(p.zero, dtype=qdtype))
        q = self.node("QuantizeLinear", [value, scale, zero], f"{value.name}_q")
        dq = self.node("DequantizeLinear", [q.outputs[0], scale, zero], f"{value.name}_dq")
        dq_out = dq.outputs[0]
        if value.is_graph_output():  # inner Q/DQ values stay untyped: no value_info in the file
            dq_out.dtype = value.dtype or ir.DataType.FLOAT
            dq_out.shape = value.shape
        for user, idx in users:
            user.replace_input_with(idx, dq_out)
        name = value.name
        if value.is_graph_output():
            for i, out in enumerate(self.graph.outputs):
                if out is value:
                    self.graph.outputs[i] = dq_out
            self.original_name[value] = name
            value.name = _ir_utils.unique_name(self.graph, f"{name}_float", self.taken)
            dq_out.name = name
        self.quantized.add(value)
        self.result.dequantized[name] = dq_out.name
        self.created.add(dq_out)
        self.origin[dq_out] = value
        self.result.params[name] = p

    def dq_constant(self, node: ir.Node, index: int, q: np.ndarray, scale: np.ndarray, zero: np.ndarray,
                    axis: int | None, base: str) -> ir.Value:
        q_v = self.initializer(f"{base}_quantized", q)
        s_v = self.initializer(f"{base}_scale", scale)
        attrs = {"axis": axis} if axis is not None and scale.ndim == 1 else {}
        # An int32 (bias) zero point of zeros is the default: left out. onnxruntime fuses Gemm/Conv
        # only when int8 weights keep theirs.
        inputs = [q_v, s_v] + ([self.initializer(f"{base}_zero_point", zero)] if np.any(zero) or zero.dtype != np.int32 else [])
        dq = self.node("DequantizeLinear", inputs, f"{base}_dequantized", **attrs)
        old = node.inputs[index]
        node.replace_input_with(index, dq.outputs[0])
        if old is not None and not old.uses() and not old.is_graph_output() and old.name in self.graph.initializers:
            self.graph.initializers.pop(old.name)
        return dq.outputs[0]

    def weight(self, node: ir.Node, index: int, axis: int | None) -> np.ndarray:
        value = node.inputs[index]
        w = _ir_utils.constant_array(value)
        if axis is None:
            q, scales = qm.per_channel_symmetric(w.reshape(1, -1), 0, reduce_range=self.reduce_range)
            q, scales = q.reshape(w.shape), scales.reshape(())
        else:
            q, scales = qm.per_channel_symmetric(w, axis, reduce_range=self.reduce_range)
        self.dq_constant(node, index, q, scales, np.zeros(scales.shape, np.int8), axis, value.name)
        del w
        _io.release_external(value.const_value)  # a large model's weights are not all kept mapped
        self.result.weights += 1
        return scales

    def apply(self, plan: QuantPlan) -> None:
        node = plan.node
        _ir_utils.tag(node, self.pass_name)  # provenance on the quantized node, not on its Q/DQ
        x = node.inputs[0]
        for i in plan.activations:
            self.quantize_activation(node.inputs[i])
        weight_scales = None
        if plan.weight is not None:
            weight_scales = self.weight(node, plan.weight.index, plan.weight.axis)
        if plan.bias is not None and weight_scales is not None:
            bias_v = node.inputs[plan.bias]
            x_scale = self.params(x).scale
            q, scales = qm.quantize_bias(_ir_utils.constant_array(bias_v), float(x_scale), weight_scales)
            self.dq_constant(node, plan.bias, q, scales, np.zeros(scales.shape, np.int32), 0, bias_v.name)
            self.result.biases += 1
        for i in plan.constants:
            value = node.inputs[i]
            c = _ir_utils.constant_array(value)
            scale, zero = qm.scale_zero_point(float(c.min(initial=0)), float(c.max(initial=0)), self.qtype)
            qc = qm.quantize(c, scale, zero, self.qtype)  # type: ignore[arg-type]
            self.dq_constant(node, i, qc, np.array(scale, np.float32), np.array(zero, qc.dtype), None, value.name)


def apply_plans(
    model: ir.Model,
    plans: Sequence[QuantPlan],
    ranges: Mapping[str, tuple[float, float]],
    *,
    qtype: str = "uint8",
    symmetric: bool = False,
    reduce_range: bool = False,
    pass_name: str = "quantize",
    float_readers: frozenset[str] = frozenset(),
) -> InsertResult:
    """Insert the Q/DQ nodes and quantized initializers that ``plans`` ask for (main graph).

    Plans must be in topological order. Nodes named in ``float_readers`` keep reading the float
    tensor where its other users read the DQ output. Output tensors without a calibrated range (and not
    sharing an input's scale) are left float, and so are graph outputs of MatMul/Gemm
    (``FLOAT_OUTPUT_OPS``) unless another quantized node reads them.
    """
    ins = _Inserter(model, ranges, qtype, symmetric, reduce_range, pass_name, float_readers)
    outputs: list[ir.Value] = []
    for plan in plans:
        for j in plan.outputs:
            out = plan.node.outputs[j]
            target = ins.resolve_output(out)
            if target.is_graph_output() and plan.node.op_type in FLOAT_OUTPUT_OPS:
                continue  # an integer kernel with a float output: the model's output is not clipped
            if plan.share and target is out and plan.node.inputs[0].name in ranges:
                ins.shared[out] = plan.node.inputs[0]
            elif target.name not in ranges:
                continue
            ins.result.absorbed += target is not out
            outputs.append(target)
    for plan in plans:
        ins.apply(plan)
    for value in outputs:
        ins.quantize_activation(value)
    ir_common.TopologicalSortPass()(model)
    return ins.result
