"""Per-op QDQ rules: small pure functions ``(node, ctx) -> QuantPlan | None``.

A rule says which inputs of a node become QuantizeLinear/DequantizeLinear pairs and how:
activations per tensor from the calibration table, constant weights symmetric int8 (per
channel along ``axis``), biases int32 with ``s_b = s_x * s_w``. ``None`` means "not applicable";
the rule then says why through ``ctx.refuse(reason)``, so every node left float has a reason.
Rules never edit the graph; :mod:`onnxopt.quant.insert` applies the plans in one place.

onnxruntime fuses ``DQ -> op -> Q`` groups into integer kernels (QLinearConv, QLinearMatMul,
QGemm, QLinearAdd, ...); data-movement ops (MaxPool, Reshape, Transpose, ...) must see the same
scale on input and output to be dropped from the integer path, so their rule sets ``share``.

Where a rounding buys no integer kernel it is left out, because every rounding adds error:

- a MatMul with a constant weight on a 3-D (or higher) input followed by a constant bias Add is
  one Linear layer (exporters split ``x @ W + b`` that way). Its MatMul output is not quantized
  and the bias is added in float, so the layer's output is rounded once, after the bias, as
  Gemm's is; onnxruntime runs the MatMul as MatMulIntegerToFloat (integer inputs, float output).
  Rounding the MatMul output and then the sum again doubled the layers' rounding error: on the
  bundled digits transformer, output error 0.0138 -> 0.0109 relative L2, 4 -> 0 top-1 flips on
  the 597 held-out samples. (2-D: onnxruntime would fuse the pair into a float Gemm, so there
  the MatMul output stays quantized.)
- a MatMul or Gemm output that is a graph output stays float: onnxruntime has integer kernels
  with a float output for both (MatMulIntegerToFloat, QGemm without y_scale), and a quantized
  output is clipped to the range seen in calibration (digits transformer: logits calibrated to
  [-1.37, 5.36], held-out logits reach -2.95; max logit error 1.58 -> 0.42).
- the parts of a GELU written out around Erf (``1 + erf``, ``x * (1 + erf)``, ``* 0.5``) stay
  float, as LayerNorm's do: no integer kernel runs Erf, and after a Linear layer onnxruntime
  fuses bias + GELU into one float BiasGelu.
- the float ``Mul`` that :mod:`onnxopt.quant.smooth` puts after a Conv whose output channels it
  evened out (tagged ``RESCALED_KEY``), and whatever reads that Mul, stay float: its output has
  the uneven channels back, which one per-tensor scale cannot hold (PicoDet's HardSwish blocks:
  quantizing them kept the worst-output cosine at 0.73, leaving them float gave 0.97).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np
import onnx_ir as ir

from onnxopt import _ir_utils
from onnxopt.quant.smooth import RESCALED_KEY

__all__ = [
    "ABSORBED_OPS", "FLOAT_OUTPUT_OPS", "RULES", "SUPPORTED_OPS", "QuantPlan", "RuleContext", "WeightSpec",
]


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """A constant input quantized symmetric int8; ``axis=None`` means per tensor."""

    index: int
    axis: int | None


@dataclasses.dataclass(frozen=True)
class QuantPlan:
    """What to quantize around one node.

    Attributes:
        node: the node.
        activations: input indices quantized per tensor with calibrated ranges.
        weight: the constant weight input, if any.
        bias: index of a constant bias input to store as int32 (needs input 0 and the weight).
        constants: constant inputs quantized per tensor from their own min/max (Add/Mul operands).
        outputs: output indices quantized (Relu/Clip consumers are absorbed by the inserter).
        share: outputs reuse input 0's scale and zero point (data movement).

    """

    node: ir.Node
    activations: tuple[int, ...] = ()
    weight: WeightSpec | None = None
    bias: int | None = None
    constants: tuple[int, ...] = ()
    outputs: tuple[int, ...] = (0,)
    share: bool = False


@dataclasses.dataclass
class RuleContext:
    """What rules may look at: calibrated ranges and options; collects refusal reasons.

    Attributes:
        ranges: calibrated (low, high) per tensor name.
        per_tensor: weights per tensor instead of per channel.
        mask_threshold: activations with ``max |x|`` at or above this (attention masks such as
            -1e4, -1e9 or -3.4e38) are never quantized.
        reasons: node name -> why the last rule refused it.
        dtypes: inferred element type per tensor name, for values the graph leaves untyped;
            only float32 activations are quantized (float16/double ones stay as they are).
        ranks: inferred rank per tensor name, where known.

    """

    ranges: Mapping[str, tuple[float, float]]
    per_tensor: bool = False
    mask_threshold: float = 1e4
    reasons: dict[str, str] = dataclasses.field(default_factory=dict)
    dtypes: Mapping[str, ir.DataType] = dataclasses.field(default_factory=dict)
    ranks: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def rank(self, value: ir.Value | None) -> int | None:
        """Rank of ``value`` from its own shape or the inferred ones; None if unknown."""
        if value is None:
            return None
        if value.shape is not None:
            return len(value.shape)
        return self.ranks.get(value.name)

    def refuse(self, node: ir.Node, reason: str) -> None:
        """Record why ``node`` stays float; returns None for ``return ctx.refuse(...)``."""
        self.reasons[node.name or node.op_type] = reason

    def activation(self, node: ir.Node, index: int) -> bool:
        """Tell whether input ``index`` is a non-constant tensor with a usable range."""
        value = node.inputs[index] if index < len(node.inputs) else None
        if value is None or value.name not in self.ranges:
            self.refuse(node, f"input {index} has no calibrated range")
            return False
        dtype = value.dtype if isinstance(value.type, ir.TensorType) else self.dtypes.get(value.name)
        if dtype is not None and dtype != ir.DataType.FLOAT:
            self.refuse(node, f"input {index} is {dtype.name.lower()}, only float32 is quantized")
            return False
        producer = value.producer()
        if producer is not None and producer.metadata_props.get(RESCALED_KEY):
            self.refuse(node, f"input {index} is a Conv output given its uneven channel scales back (kept float: "
                              "one per-tensor scale cannot hold them)")
            return False
        lo, hi = self.ranges[value.name]
        if max(abs(lo), abs(hi)) >= self.mask_threshold:
            self.refuse(
                node,
                f"input {index} reaches {max(abs(lo), abs(hi)):.3g} (attention mask or outlier): kept float",
            )
            return False
        return True


def _const_weight(node: ir.Node, index: int, ctx: RuleContext) -> tuple[int, ...] | None:
    """Return the weight's shape if it can be quantized (from the tensor's header, not its data)."""
    value = _ir_utils.constant_input(node, index)
    if value is None:
        ctx.refuse(node, f"input {index} (weight) is not a constant initializer")
        return None
    tensor = value.const_value
    if tensor.dtype != ir.DataType.FLOAT:
        ctx.refuse(node, f"weight dtype {tensor.dtype.name.lower()} is not float32")
        return None
    if any(use.node.graph is not node.graph for use in value.uses()):
        ctx.refuse(node, "weight is also read inside a subgraph (both copies would be kept)")
        return None
    return tuple(tensor.shape.numpy())


def _bias_index(node: ir.Node, index: int) -> int | None:
    if index >= len(node.inputs) or node.inputs[index] is None:
        return None
    value = _ir_utils.constant_input(node, index)
    if value is None or len(value.const_value.shape) != 1:
        return None
    return index


def _conv(node: ir.Node, ctx: RuleContext) -> QuantPlan | None:
    if not ctx.activation(node, 0):
        return None
    w = _const_weight(node, 1, ctx)
    if w is None:
        return None
    axis = None if ctx.per_tensor else 0
    return QuantPlan(node, (0,), WeightSpec(1, axis), _bias_index(node, 2))


def _conv_transpose(node: ir.Node, ctx: RuleContext) -> QuantPlan | None:
    if not ctx.activation(node, 0):
        return None
    if _const_weight(node, 1, ctx) is None:
        return None
    group = node.attributes.get_int("group", 1)
    axis = None if ctx.per_tensor or group != 1 else 1
    return QuantPlan(node, (0,), WeightSpec(1, axis), _bias_index(node, 2))


def _linear_bias_add(matmul: ir.Node, ctx: RuleContext) -> ir.Node | None:
    """Return the constant bias Add that makes ``matmul`` (constant weight) a Linear layer, or None.

    Only when the MatMul output has no other reader (and is not a graph output): the Add is then
    the layer's bias, added in float to the float output of the integer product
    (MatMulIntegerToFloat in onnxruntime). Only for inputs of rank >= 3: on 2-D ones onnxruntime
    fuses MatMul + Add into a float Gemm unless a Q/DQ pair separates them, so there the MatMul
    output keeps its rounding (QLinearMatMul + QLinearAdd).
    """
    if matmul.op_type != "MatMul" or _ir_utils.constant_input(matmul, 1) is None:
        return None
    rank = ctx.rank(matmul.inputs[0])
    if rank is None or rank < 3:
        return None
    out = matmul.outputs[0]
    uses = out.uses()
    if len(uses) != 1 or out.is_graph_output():
        return None
    add = uses[0].node
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or add.graph is not matmul.graph:
        return None
    other = add.inputs[1 - uses[0].idx] if len(add.inputs) == 2 else None
    if other is None or _ir_utils.constant_input(add, 1 - uses[0].idx) is None:
        return None
    bias = _ir_utils.constant_array(other)
    return add if bias.dtype == np.float32 else None


def _matmul(node: ir.Node, ctx: RuleContext) -> QuantPlan | None:
    if not ctx.activation(node, 0):
        return None
    if _ir_utils.constant_input(node, 1) is not None:
        w = _const_weight(node, 1, ctx)
        if w is None or len(w) < 2:
            if w is not None:
                ctx.refuse(node, "weight has rank < 2")
            return None
        outputs = () if _linear_bias_add(node, ctx) is not None else (0,)
        return QuantPlan(node, (0,), WeightSpec(1, None if ctx.per_tensor else len(w) - 1), outputs=outputs)
    if not ctx.activation(node, 1):
        return None
    return QuantPlan(node, (0, 1))


def _gemm(node: ir.Node, ctx: RuleContext) -> QuantPlan | None:
    if node.attributes.get_int("transA", 0):
        ctx.refuse(node, "Gemm with transA=1")
        return None
    if not ctx.activation(node, 0):
        return None
    if _const_weight(node, 1, ctx) is None:
        return None
    axis = None if ctx.per_tensor else (0 if node.attributes.get_int("transB", 0) else 1)
    plain = node.attributes.get_float("alpha", 1.0) == 1.0 and node.attributes.get_float("beta", 1.0) == 1.0
    return QuantPlan(node, (0,), WeightSpec(1, axis), _bias_index(node, 2) if plain else None)


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None


def _normalized(value: ir.Value | None) -> bool:
    """Whether ``value`` is ``(x - mean(x)) / std``: the core of a LayerNorm written out in primitives."""
    div = _producer(value, "Div")
    sub = _producer(div.inputs[0], "Sub") if div is not None else None
    return sub is not None and _producer(sub.inputs[1], "ReduceMean") is not None


def _layer_norm_part(node: ir.Node) -> str | None:
    """Which part of a written-out LayerNorm ``node`` is (its variance + eps, gamma or beta), or None.

    LayerNormalization stays float; so do these, which exporters before opset 17 emit instead of it.
    """
    inputs = [v for v in node.inputs if v is not None and v.const_value is None]
    if node.op_type == "Mul" and any(_normalized(v) for v in inputs):
        return "its scale (gamma)"
    if node.op_type == "Add":
        if any((m := _producer(v, "Mul")) is not None and any(_normalized(u) for u in m.inputs) for v in inputs):
            return "its bias (beta)"
        means = [m for v in inputs if (m := _producer(v, "ReduceMean")) is not None]
        if any(_producer(m.inputs[0], "Pow") or _producer(m.inputs[0], "Mul") for m in means):  # mean of squares
            return "its variance + epsilon"
    return None


def _feeds_from_erf(value: ir.Value | None, depth: int) -> bool:
    """Whether ``value`` is an Erf output, or a Mul/Add of one, up to ``depth`` nodes back."""
    node = value.producer() if value is not None else None
    if node is None or node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "Erf":
        return True
    return depth > 0 and node.op_type in ("Add", "Mul") and any(_feeds_from_erf(v, depth - 1) for v in node.inputs)


def _gelu_part(node: ir.Node) -> bool:
    """Whether ``node`` is ``1 + erf``, ``x * (1 + erf)`` or its ``* 0.5`` in a GELU written out in primitives."""
    depth = 0 if node.op_type == "Add" else 2
    return any(_feeds_from_erf(v, depth) for v in node.inputs if v is not None and v.const_value is None)


def _binary(node: ir.Node, ctx: RuleContext) -> QuantPlan | None:
    if node.metadata_props.get(RESCALED_KEY):
        ctx.refuse(node, "gives a Conv output its channel scales back: kept float (its output's channels are uneven)")
        return None
    part = _layer_norm_part(node)
    if part is not None:
        ctx.refuse(node, f"{part} of a LayerNorm written out in primitives: kept float, as LayerNormalization")
        return None
    if _gelu_part(node):
        ctx.refuse(node, "part of a GELU written out around Erf: kept float (no integer kernel runs Erf)")
        return None
    linear = next((v.producer() for v in node.inputs if v is not None and v.producer() is not None
                   and _linear_bias_add(v.producer(), ctx) is node), None)
    if linear is not None:
        ctx.refuse(node, "bias of a MatMul (a Linear layer): added in float, the sum is quantized once by its readers")
        return None
    acts, consts = [], []
    for i in (0, 1):
        value = _ir_utils.constant_input(node, i)
        if value is not None:
            array = _ir_utils.constant_array(value)
            if array.dtype != np.float32 or (array.size and np.abs(array).max() >= ctx.mask_threshold):
                ctx.refuse(node, f"constant input {i} is not float32 or is an additive mask")
                return None
            consts.append(i)
        elif ctx.activation(node, i):
            acts.append(i)
        else:
            return None
    if not acts:
        ctx.refuse(node, "both inputs are constant")
        return None
    return QuantPlan(node, tuple(acts), constants=tuple(consts))


def _shared(node: ir.Node, ctx: RuleContext) -> QuantPlan | None:
    if not ctx.activation(node, 0):
        return None
    n_out = 1 if node.op_type == "MaxPool" else len(node.outputs)
    return QuantPlan(node, (0,), outputs=tuple(range(n_out)), share=True)


def _single(node: ir.Node, ctx: RuleContext) -> QuantPlan | None:
    if not ctx.activation(node, 0):
        return None
    return QuantPlan(node, (0,))


def _average_pool(node: ir.Node, ctx: RuleContext) -> QuantPlan | None:
    # onnxruntime's QLinearAveragePool (com.microsoft) has no `dilations` attribute: the fused
    # node would not load. auto_pad, ceil_mode, count_include_pad, pads and strides it has.
    dilations = node.attributes.get_ints("dilations", None)
    if dilations is not None and any(d != 1 for d in dilations):
        ctx.refuse(node, f"AveragePool with dilations {list(dilations)} (QLinearAveragePool has none)")
        return None
    return _single(node, ctx)


def _concat(node: ir.Node, ctx: RuleContext) -> QuantPlan | None:
    for i in range(len(node.inputs)):
        if not ctx.activation(node, i):
            return None
    return QuantPlan(node, tuple(range(len(node.inputs))))


Rule = Callable[[ir.Node, RuleContext], "QuantPlan | None"]
RULES: dict[str, Rule] = {
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "MatMul": _matmul,
    "Gemm": _gemm,
    "Add": _binary,
    "Mul": _binary,
    "Concat": _concat,
    "AveragePool": _average_pool,
    "GlobalAveragePool": _single,
    **dict.fromkeys(
        ("MaxPool", "Resize", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Split", "Slice", "Gather"),
        _shared,
    ),
}
SUPPORTED_OPS: frozenset[str] = frozenset(RULES)
# onnxruntime runs these on integer inputs with a float output (QGemm without y_scale,
# MatMulIntegerToFloat): when they write a graph output it stays float, unclipped.
FLOAT_OUTPUT_OPS: frozenset[str] = frozenset({"MatMul", "Gemm"})
# Activations absorbed into the preceding quantized output (its range already excludes < 0).
ABSORBED_OPS: frozenset[str] = frozenset({"Relu", "Clip"})
