"""Dynamic INT8 MatMul/Gemm: activation scales computed at run time, one per token (row).

Algebra: for ``y = x @ W`` with a constant ``W[K, N]``, each row ``x_r`` of ``x`` (one token of a
transformer) gets its own scale ``s_r = max|x_r| / 127``; ``q_r = round(x_r / s_r)`` lies in
[-127, 127]. The weight is symmetric int8 per output column, ``W ~= q_W * s_W[N]``. Then
``y ~= (q_x @ q_W) * s_W * s_r``, where ``q_x @ q_W`` is an exact int32 accumulation. The error
of a row is at most ``s_r / 2`` per element, set by that row's own largest value: a token whose
activations are 50x larger than the others' (the [CLS]/[SEP] tokens of BERT-family encoders)
no longer coarsens every other token's grid, which is what per-tensor scales (static, or
onnxruntime's DynamicQuantizeLinear) do.

In the graph, per distinct input ``x`` (Q, K and V projections share one)::

    s   = Max(ReduceMax(Abs(x), axes=[-1], keepdims=1) * (1/127), tiny)
    q_x = Cast<uint8>(x / s + 128.5)                        # round(x / s), shifted to uint8
    y   = MatMulIntegerToFloat(q_x, q_W, 1, s_W, 128) * s     (+ Gemm's bias C)

(``MatMulIntegerToFloat``, onnxruntime's com.microsoft op, is ``float(q_x - 128) @ q_W * s_W``.)

Why uint8 with zero point 128 rather than int8 activations: onnxruntime 1.32 runs
MatMulInteger u8 x s8 through MLAS's VNNI/AMX kernels but s8 x s8 through a slow generic path
(one 128x384x1536 MatMul, 1 thread, [XEON-AMX]: FP32 9.7 ms, s8 x s8 65.5 ms, u8 x s8 with
zero point 128 1.0 ms, per-tensor DynamicQuantizeLinear + MatMulInteger 0.59 ms; /tmp micro
benchmark kept as benchmarks/bench_transformers.py's ``--micro``). Why not QDQ with run-time
scales: onnxruntime fuses QDQ into integer kernels only with constant scales, so a QDQ graph
with computed scales runs in float. Why not DynamicQuantizeLinear: it has one scale for the
whole tensor (the 0.96 embedding cosine of onnxruntime's quantize_dynamic on MiniLM).

On an x86 CPU without VNNI the u8 x s8 pair sums saturate in int16: ``reduce_range`` gives
7-bit weights there, as for static INT8.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxopt import _ir_utils
from onnxopt.quant import scales as qm
from onnxopt.runtime import sessions as runtime

__all__ = ["DynamicResult", "can_quantize", "quantize_dynamic_nodes", "token_spreads", "unpack_attention", "SPREAD_LIMIT"]

_QMAX = 127.0
_TINY = np.float32(1e-12)  # a row of zeros gets this scale (its q is 0 either way)
_SHIFT = 128  # int8 value + 128 = uint8 value; MatMulInteger subtracts the zero point back
_MS = "com.microsoft"
# One scale per tensor leaves a token whose max |x| is 1/k of the largest token's log2(k) bits fewer
# than its own scale would; at k = 16 the median token still has 4 of the 8 bits (16 levels) per
# half-range, at k = 32 three. Up to 16 the DynamicQuantizeLinear path (fewer ops, MiniLM 0.41x
# against 0.46x FP32 latency) is kept; above it the row gets its own scale. (MiniLM's inputs reach 11x
# and per tensor holds it at 0.997; MPNet's GELU outputs in layers 6-10 reach 24-44x and per tensor
# there takes it to 0.93: docs/benchmarks.md.)
SPREAD_LIMIT = 16.0


@dataclasses.dataclass
class DynamicResult:
    """What :func:`quantize_dynamic_nodes` did: node names made dynamic, inputs quantized."""

    nodes: list[str] = dataclasses.field(default_factory=list)
    inputs_quantized: int = 0
    weights: int = 0
    merged: int = 0  # per-tensor kernels folded into a sibling reading the same input (Q/K/V)


def _weight_matrix(node: ir.Node) -> np.ndarray | None:
    """The ``[K, N]`` weight of a MatMul/Gemm with a constant 2-D weight, or None."""
    w_value = _ir_utils.constant_input(node, 1)
    if w_value is None:
        return None
    w = _ir_utils.constant_array(w_value)
    if w.ndim != 2 or w.dtype != np.float32:
        return None
    if node.op_type == "Gemm":
        return w.T if _attr(node, "transB") else w
    return w


def _attr(node: ir.Node, name: str, default: float = 0) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


_NORMS = frozenset({"LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
                    "SkipSimplifiedLayerNormalization"})


def normalized_input(node: ir.Node) -> bool:
    """Whether ``node`` reads a LayerNorm output (directly, or through a SmoothQuant Mul).

    Every row of a LayerNorm output has the same RMS up to the per-channel gamma, so one scale
    per tensor costs little there; the attention context and the GELU output between the two
    FFN MatMuls have no such bound, and single tokens reach 10-40x the median token's max.
    """
    producer = node.inputs[0].producer() if node.inputs[0] is not None else None
    if producer is not None and producer.op_type == "Mul" and _ir_utils.constant_input(producer, 1) is not None:
        producer = producer.inputs[0].producer() if producer.inputs[0] is not None else None
    return producer is not None and producer.op_type in _NORMS and producer.outputs[0] is not None and (
        node.inputs[0] is producer.outputs[0] or node.inputs[0].producer() is not producer)


def can_quantize(node: ir.Node) -> str | None:
    """Why ``node`` cannot become a dynamic INT8 MatMul, or None if it can."""
    if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
        return "only MatMul and Gemm have a dynamic INT8 form"
    if _ir_utils.constant_input(node, 1) is None:
        return "weight is not a constant initializer (activation x activation)"
    w = _ir_utils.constant_array(node.inputs[1])
    if w.ndim != 2 or w.dtype != np.float32:
        return "weight is not a 2-D float32 matrix"
    x = node.inputs[0]
    if x is None or (x.shape is not None and len(x.shape) < 2):
        return "input is 1-D"
    if node.op_type == "Gemm":
        if _attr(node, "transA") or _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0:
            return "Gemm with transA, alpha or beta"
        if len(node.inputs) > 2 and node.inputs[2] is not None and _ir_utils.constant_input(node, 2) is None:
            return "Gemm bias is not a constant"
    return None


class _Builder:
    def __init__(self, model: ir.Model, pass_name: str, reduce_range: bool) -> None:
        self.graph = model.graph
        self.opset = model.opset_imports.get("", 13)
        self.pass_name = pass_name
        self.reduce_range = reduce_range
        self.taken = _ir_utils._value_names(self.graph) | {n.name for n in self.graph.all_nodes() if n.name}
        self.token_quant: dict[ir.Value, tuple[ir.Value, ir.Value]] = {}
        self.tensor_quant: dict[ir.Value, tuple[ir.Value, ir.Value, ir.Value]] = {}
        self.consts: dict[str, ir.Value] = {}
        self.tensor_kernels: list[ir.Node] = []
        self.result = DynamicResult()

    def initializer(self, base: str, array: np.ndarray) -> ir.Value:
        name = _ir_utils.unique_name(self.graph, base, self.taken)
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                         const_value=ir.Tensor(array, name=name))
        self.graph.register_initializer(value)
        return value

    def shared_const(self, key: str, array: np.ndarray) -> ir.Value:
        if key not in self.consts:
            self.consts[key] = self.initializer(f"dyn_{key}", array)
        return self.consts[key]

    def op(self, op_type: str, inputs: Sequence[ir.Value | None], base: str, before: ir.Node,
           _domain: str = "", **attrs: object) -> ir.Value:
        name = _ir_utils.unique_name(self.graph, base, self.taken)
        node = ir.node(op_type, list(inputs), attributes=attrs, name=name, domain=_domain)
        node.outputs[0].name = name
        _ir_utils.tag(node, self.pass_name)
        self.graph.insert_before(before, node)
        return node.outputs[0]

    def quantize_tokens(self, x: ir.Value, first_user: ir.Node) -> tuple[ir.Value, ir.Value]:
        """(q_x uint8, s per row) for ``x``, built once per tensor before its first dynamic user."""
        if x in self.token_quant:
            return self.token_quant[x]
        base = x.name or "x"
        absx = self.op("Abs", [x], f"{base}_abs", first_user)
        if self.opset >= 18:
            axes = self.shared_const("axes_last", np.array([-1], np.int64))
            rmax = self.op("ReduceMax", [absx, axes], f"{base}_absmax", first_user, keepdims=1)
        else:
            rmax = self.op("ReduceMax", [absx], f"{base}_absmax", first_user, axes=[-1], keepdims=1)
        inv = self.shared_const("inv_qmax", np.array(1.0 / _QMAX, np.float32))
        tiny = self.shared_const("tiny", np.array(_TINY, np.float32))
        scale = self.op("Max", [self.op("Mul", [rmax, inv], f"{base}_s0", first_user), tiny], f"{base}_s", first_user)
        # Cast truncates toward zero; x / s + 128.5 >= 1.5 > 0, so truncating it rounds x / s + 128
        # (halves up): one op fewer than Round then Cast.
        shift = self.shared_const("shift", np.array(_SHIFT + 0.5, np.float32))
        shifted = self.op("Add", [self.op("Div", [x, scale], f"{base}_div", first_user), shift], f"{base}_shift", first_user)
        q = self.op("Cast", [shifted], f"{base}_q8", first_user, to=ir.DataType.UINT8)
        self.token_quant[x] = (q, scale)
        self.result.inputs_quantized += 1
        return q, scale

    def quantize_tensor(self, x: ir.Value, first_user: ir.Node) -> tuple[ir.Value, ir.Value, ir.Value]:
        """(q_x uint8, scale, zero point) of DynamicQuantizeLinear on ``x``, built once per tensor."""
        if x in self.tensor_quant:
            return self.tensor_quant[x]
        base = x.name or "x"
        name = _ir_utils.unique_name(self.graph, f"{base}_dql", self.taken)
        node = ir.node("DynamicQuantizeLinear", [x], name=name, num_outputs=3)
        for out, suffix in zip(node.outputs, ("_q8", "_s", "_zp"), strict=True):
            out.name = _ir_utils.unique_name(self.graph, f"{base}{suffix}", self.taken)
        _ir_utils.tag(node, self.pass_name)
        self.graph.insert_before(first_user, node)
        self.tensor_quant[x] = (node.outputs[0], node.outputs[1], node.outputs[2])
        self.result.inputs_quantized += 1
        return self.tensor_quant[x]

    def rewrite(self, node: ir.Node, granularity: str) -> None:
        w = _weight_matrix(node)
        assert w is not None
        qw, w_scales = qm.per_channel_symmetric(w, 1, reduce_range=self.reduce_range)
        label = node.name or node.op_type
        w_name = node.inputs[1].name or label
        qw_v = self.initializer(f"{w_name}_dyn_q", np.ascontiguousarray(qw.astype(np.int8)))
        ws_v = self.initializer(f"{w_name}_dyn_s", w_scales.astype(np.float32))
        bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
        replaced = node
        if granularity == "tensor":
            bias_add = _bias_add(node, qw.shape[1]) if bias is None else None
            if bias_add is not None:
                replaced, bias = bias_add
            q, xs, xz = self.quantize_tensor(node.inputs[0], node)
            # One kernel: int32 accumulation, float cast, s_x * s_W per column and the bias.
            final = ir.node("MatMulIntegerToFloat", [q, qw_v, xs, ws_v, xz, None, bias], name=label, domain=_MS)
            self.tensor_kernels.append(final)
        else:
            q, scale = self.quantize_tokens(node.inputs[0], node)
            zero = self.shared_const("zero_point", np.array(_SHIFT, np.uint8))
            one = self.shared_const("one", np.array(1.0, np.float32))
            # MatMulIntegerToFloat: the int32 accumulation, its float cast and the per-column
            # weight scale in one kernel (MatMulInteger -> Cast -> Mul with a per-column scale is
            # not fused by onnxruntime 1.32: 3 passes over the output instead of 1). Its a_scale is
            # a scalar, so the row scales follow as a Mul, and the bias after that.
            y = self.op("MatMulIntegerToFloat", [q, qw_v, one, ws_v, zero], f"{label}_wscaled", node, _domain=_MS)
            if bias is None:
                final = ir.node("Mul", [y, scale], name=label)
            else:
                final = ir.node("Add", [self.op("Mul", [y, scale], f"{label}_xscaled", node), bias], name=label)
        _ir_utils.tag(final, self.pass_name)
        self.graph.insert_before(node, final)
        out = replaced.outputs[0]
        out_name = out.name
        ir.convenience.replace_all_uses_with(out, final.outputs[0], replace_graph_outputs=True)
        if replaced is not node:
            self.graph.remove(replaced, safe=True)
        self.graph.remove(node, safe=True)
        final.outputs[0].name = out_name
        final.outputs[0].type, final.outputs[0].shape = out.type, out.shape
        self.result.nodes.append(label)
        self.result.weights += 1


def _merge_shared_input(builder: _Builder) -> int:
    """One MatMulIntegerToFloat + Split for the per-tensor kernels that read one quantized input.

    The Q, K and V projections of a block read one LayerNorm output: three [K, N] products
    become one [K, 3N] product (weights, scales and biases concatenated along N), which
    onnxruntime then fuses with the DynamicQuantizeLinear into one DynamicQuantizeMatMul (it
    fuses only a quantizer with one reader). Exact: each output column is the same sum as
    before. Returns the number of kernels removed.
    """
    groups: dict[ir.Value, list[ir.Node]] = {}
    for node in builder.tensor_kernels:
        # a graph output stays with its own kernel (the Split's outputs would have to take its place)
        if node.graph is builder.graph and not node.outputs[0].is_graph_output():
            groups.setdefault(node.inputs[0], []).append(node)
    removed = 0
    position = {id(n): i for i, n in enumerate(builder.graph)}
    for nodes in groups.values():
        if len(nodes) < 2:  # one quantized input: one DynamicQuantizeLinear, so one scale and zero point
            continue
        weights = [n.inputs[1].const_value.numpy() for n in nodes]
        scales = [n.inputs[3].const_value.numpy().reshape(-1) for n in nodes]
        widths = [w.shape[1] for w in weights]
        biases = [n.inputs[6].const_value.numpy().reshape(-1) if len(n.inputs) > 6 and n.inputs[6] is not None
                  else np.zeros(w.shape[1], np.float32) for n, w in zip(nodes, weights, strict=True)]
        first = min(nodes, key=lambda n: position[id(n)])
        base = f"{nodes[0].name or 'qkv'}_merged"
        qw = builder.initializer(f"{base}_q", np.ascontiguousarray(np.concatenate(weights, axis=1)))
        ws = builder.initializer(f"{base}_s", np.concatenate(scales).astype(np.float32))
        bias = builder.initializer(f"{base}_b", np.concatenate(biases).astype(np.float32))
        x, xs, xz = nodes[0].inputs[0], nodes[0].inputs[2], nodes[0].inputs[4]
        y = builder.op("MatMulIntegerToFloat", [x, qw, xs, ws, xz, None, bias], base, first, _domain=_MS)
        sizes = builder.initializer(f"{base}_split", np.array(widths, np.int64))
        split = _ir_utils.tag(ir.node("Split", [y, sizes], attributes={"axis": -1}, num_outputs=len(nodes),
                                      name=_ir_utils.unique_name(builder.graph, f"{base}_split", builder.taken)),
                              builder.pass_name)
        builder.graph.insert_before(first, split)
        for node, out in zip(nodes, split.outputs, strict=True):
            old = node.outputs[0]
            out.type, out.shape = old.type, old.shape
            name = old.name
            ir.convenience.replace_all_uses_with(old, out)
            builder.graph.remove(node, safe=True)
            out.name = name
            for value in node.inputs[1:]:
                if value is not None and not value.uses() and value.name in builder.graph.initializers:
                    builder.graph.initializers.pop(value.name)
        removed += len(nodes) - 1
    return removed


def _bias_add(node: ir.Node, columns: int) -> tuple[ir.Node, ir.Value] | None:
    """The ``Add(node's output, b[columns])`` that only reads it, and ``b``, or None."""
    out = node.outputs[0]
    uses = out.uses()
    if len(uses) != 1 or out.is_graph_output():
        return None
    add = uses[0].node
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or add.graph is not node.graph:
        return None
    other = 1 - uses[0].idx
    b = _ir_utils.constant_input(add, other)
    if b is None or b.const_value.dtype != ir.DataType.FLOAT or tuple(b.const_value.shape) != (columns,):
        return None
    return add, b


def quantize_dynamic_nodes(
    model: ir.Model,
    nodes: Sequence[ir.Node],
    *,
    granularity: Mapping[str, str] | str = "token",
    reduce_range: bool = False,
    pass_name: str = "quantize",
) -> DynamicResult:
    """Rewrite each of ``nodes`` (all passing :func:`can_quantize`) as a dynamic INT8 MatMul.

    ``granularity`` ("token", "tensor" or "auto", or per node name) picks per-token scales or
    one DynamicQuantizeLinear scale for the whole input; auto: per tensor where the input is a
    LayerNorm output (:func:`normalized_input`), per token elsewhere.

    Graph input/output names and the float output of every node are kept; the float weights
    are dropped once no other node reads them.
    """
    builder = _Builder(model, pass_name, reduce_range)
    if nodes and _MS not in model.opset_imports:
        model.opset_imports[_MS] = 1
    weights = []
    for node in nodes:
        weights.append(node.inputs[1])
        how = granularity if isinstance(granularity, str) else granularity.get(node.name, "token")
        if how == "auto":
            how = "tensor" if normalized_input(node) else "token"
        builder.rewrite(node, how)
    builder.result.merged = _merge_shared_input(builder)
    for value in weights:
        if not value.uses() and not value.is_graph_output() and value.name in model.graph.initializers:
            model.graph.initializers.pop(value.name)
    return builder.result


def token_spreads(
    model: ir.Model, nodes: Sequence[ir.Node], feeds: Sequence[Mapping[str, np.ndarray]]
) -> dict[str, float]:
    """Per node name: the largest token's max |x| over the median token's, worst over ``feeds``.

    ``x`` is the node's first input viewed as rows of its last axis (one row per token); the
    ratio says how many bits one scale per tensor costs the typical token (:data:`SPREAD_LIMIT`).
    """
    inputs = {n.name: n.inputs[0].name for n in nodes if n.inputs[0] is not None and n.inputs[0].name}
    worst = dict.fromkeys(inputs.values(), 0.0)
    for got in runtime.capture(model, (dict(f) for f in feeds), list(worst), priority_order=True):
        for name, x in got.items():
            if name not in worst or x.size == 0:
                continue
            rows = np.abs(x.reshape(-1, x.shape[-1])).max(axis=1)
            median = float(np.median(rows))
            ratio = float(rows.max()) / median if median > 0 else (1.0 if rows.max() == 0 else np.inf)
            worst[name] = max(worst[name], ratio)
    return {node: worst[value] for node, value in inputs.items()}


def unpack_attention(model: ir.Model, pass_name: str = "quantize") -> list[str]:
    """Split each com.microsoft Attention into Q/K/V MatMul + bias Add and a MultiHeadAttention.

    The fused Attention keeps its packed ``[hidden, 3 * hidden]`` projection weight inside one
    float kernel, where no dynamic INT8 can reach it; MultiHeadAttention computes the same
    ``softmax(Q K^T * scale + mask) V`` from projected Q, K and V (exact up to float
    re-association), so the three projections become ordinary MatMuls that can be quantized.
    Only the encoder form is split: no past state, not unidirectional, a raw 2-D key padding
    mask or none, equal Q/K/V widths. Returns the names of the MatMuls created.
    """
    graph = model.graph
    taken = _ir_utils._value_names(graph) | {n.name for n in graph.all_nodes() if n.name}
    created: list[str] = []
    for node in list(graph):
        if node.op_type != "Attention" or node.domain != _MS or len(node.outputs) != 1:
            continue
        inputs = list(node.inputs) + [None] * (4 - len(node.inputs))
        x, w_value, b_value, mask = inputs[:4]
        if any(v is not None for v in node.inputs[4:]) or _attr(node, "unidirectional"):
            continue
        w, b = _ir_utils.constant_input(node, 1), _ir_utils.constant_input(node, 2)
        if w is None or b is None or node.attributes.get("qkv_hidden_sizes") is not None:
            continue
        weight, bias = _ir_utils.constant_array(w), _ir_utils.constant_array(b)
        if weight.ndim != 2 or weight.shape[1] % 3 or bias.shape != (weight.shape[1],):
            continue
        if mask is not None and (mask.shape is None or len(mask.shape) != 2):
            continue
        hidden = weight.shape[1] // 3
        label = node.name or "Attention"
        projected = []
        new_nodes = []
        for i, part in enumerate("qkv"):
            names = [_ir_utils.unique_name(graph, f"{label}_{part}{s}", taken) for s in ("_w", "_b", "_matmul", "")]
            w_i = ir.Value(name=names[0], shape=ir.Shape([weight.shape[0], hidden]), type=ir.TensorType(ir.DataType.FLOAT),
                           const_value=ir.Tensor(np.ascontiguousarray(weight[:, i * hidden:(i + 1) * hidden]), name=names[0]))
            b_i = ir.Value(name=names[1], shape=ir.Shape([hidden]), type=ir.TensorType(ir.DataType.FLOAT),
                           const_value=ir.Tensor(np.ascontiguousarray(bias[i * hidden:(i + 1) * hidden]), name=names[1]))
            graph.register_initializer(w_i)
            graph.register_initializer(b_i)
            matmul = ir.node("MatMul", [x, w_i], name=names[2])
            matmul.outputs[0].name = names[2]
            add = ir.node("Add", [matmul.outputs[0], b_i], name=names[3])
            add.outputs[0].name = names[3]
            new_nodes += [matmul, add]
            projected.append(add.outputs[0])
            created.append(names[2])
        attrs: dict[str, object] = {"num_heads": int(_attr(node, "num_heads"))}
        for name in ("scale", "mask_filter_value"):
            if node.attributes.get(name) is not None:
                attrs[name] = node.attributes[name].value
        mha = ir.node("MultiHeadAttention", [*projected, None, mask], attributes=attrs, name=f"{label}_mha",
                      domain=_MS)
        for n in [*new_nodes, mha]:
            _ir_utils.tag(n, pass_name)
        graph.insert_before(node, [*new_nodes, mha])
        out = node.outputs[0]
        out_name = out.name
        ir.convenience.replace_all_uses_with(out, mha.outputs[0], replace_graph_outputs=True)
        graph.remove(node, safe=True)
        mha.outputs[0].name = out_name
        mha.outputs[0].type, mha.outputs[0].shape = out.type, out.shape
        for value in (w_value, b_value):
            if value is not None and not value.uses() and value.name in graph.initializers:
                graph.initializers.pop(value.name)
    return created
