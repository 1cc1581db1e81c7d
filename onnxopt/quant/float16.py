"""Float32 -> float16 conversion of a chosen set of nodes, with Casts only at precision boundaries.

Used by the ``fp16`` pass (every node, minus the ones it must keep) and the ``mixed`` pass (the
nodes its plan lowers to FP16). Which inputs and outputs of a node change type is read from the
node's ONNX schema: a type parameter that allows both ``tensor(float)`` and ``tensor(float16)``
(``T`` of Conv, MatMul, Add, ...) follows the node's precision; fixed types (Resize ``scales``) and
parameters without float16 (LayerNormalization ``U``) keep their type. A parameter bound to one
input and no output (Shape's ``T``, Cast's ``T1``) takes any type, so it never gets a Cast,
except where onnx's type inference ties it to the output anyway (``_TIED_OPS``). Outputs typed
by an attribute follow it: a lowered Constant or ConstantOfShape gets a float16 ``value``.

Why the numbers stay close: every lowered node computes on float16-rounded inputs (relative
error <= 2^-11 per value); the caller keeps in float32 the nodes whose tensors leave float16's
range, so no inf appears. Subgraphs (If/Loop/Scan) and the node that owns them stay float32 as a
whole, and outer values they read are given a float32 copy, so no branch ever sees a type it
was not built for.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt import _ir_utils
from onnxopt import io as _io
from onnxopt.quant.calibration import CalibrationTable

__all__ = [
    "FP16_MAX",
    "FP16_MIN_NORMAL",
    "NEUTRAL_OPS",
    "ConversionResult",
    "cast_pairs",
    "convert",
    "float_params",
    "infer_main_graph_types",
    "range_reasons",
]

logger = logging.getLogger(__name__)

FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0**-14
# Ops that only move or select data: their precision follows their input (no Cast is worth it).
NEUTRAL_OPS = frozenset(
    {
        "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Gather",
        "GatherElements", "GatherND", "Slice", "Split", "Concat", "Expand", "Tile", "Pad",
        "DepthToSpace", "SpaceToDepth", "MaxPool", "Relu", "Dropout",
    }
)  # fmt: skip
# Ops whose type inference ties every float slot to one type although the schema declares
# separate parameters (RMSNormalization: Y follows X; DequantizeLinear-23+: y follows x_scale;
# the *Like ops and Bernoulli without ``dtype``: the output follows the input).
_TIED_OPS = frozenset(
    {"RMSNormalization", "DequantizeLinear", "EyeLike", "Bernoulli", "RandomNormalLike", "RandomUniformLike"}
)
_DTYPE_ATTRS = frozenset({"dtype", "output_dtype", "output_datatype", "to"})  # Cast: own rule
_FLOAT = "tensor(float)"
_HALF = "tensor(float16)"


@dataclasses.dataclass
class ConversionResult:
    """What :func:`convert` did."""

    lowered: list[ir.Node] = dataclasses.field(default_factory=list)
    kept: dict[str, str] = dataclasses.field(default_factory=dict)  # node name -> reason
    casts: int = 0
    initializers: int = 0
    bytes_before: int = 0
    bytes_after: int = 0


@dataclasses.dataclass(frozen=True)
class _Params:
    """Per node: which input/output slots follow the node's precision."""

    inputs: frozenset[int]  # input slots bound to a float16-capable, non-free parameter
    outputs: frozenset[int]
    free_inputs: frozenset[int]


def float_params(node: ir.Node, opset: int) -> _Params | None:
    """The input/output slots of ``node`` whose type may switch float32 <-> float16.

    ``None`` when the op has no schema in this onnx build (custom domain, unknown op).
    """
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain or "")
    except onnx.defs.SchemaError:
        return None
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    flexible = {p for p, types in allowed.items() if _FLOAT in types and _HALF in types}
    in_params = [_formal(schema.inputs, i) for i in range(len(node.inputs))]
    out_params = [_formal(schema.outputs, i) for i in range(len(node.outputs))]
    uses = {}
    for p in in_params + out_params:
        uses[p] = uses.get(p, 0) + 1
    bound_in = {i for i, p in enumerate(in_params) if p in flexible}
    # A parameter used by exactly one formal input and no output accepts any type as it is.
    single = {f.type_str for f in schema.inputs} - {f.type_str for f in schema.outputs}
    free = {
        i for i in bound_in
        if in_params[i] in single and sum(f.type_str == in_params[i] for f in schema.inputs) == 1
    }  # fmt: skip
    outs = {i for i, p in enumerate(out_params) if p in flexible}
    if node.op_type in _TIED_OPS:
        free = set()
    return _Params(frozenset(bound_in - free), frozenset(outs), frozenset(free))


def _formal(formals: list, index: int) -> str | None:
    if not formals:
        return None
    if index < len(formals):
        return formals[index].type_str
    last = formals[-1]
    if last.option == onnx.defs.OpSchema.FormalParameterOption.Variadic:
        return last.type_str
    return None


def _opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))


def convert(
    model: ir.Model,
    lower: Collection[ir.Node],
    *,
    keep_io: bool = True,
    pass_name: str = "fp16",
) -> ConversionResult:
    """Lower the main-graph nodes in ``lower`` to float16, in place; Casts where precision changes.

    Nodes outside ``lower`` keep float32. Nodes in ``lower`` that cannot be lowered (no schema,
    owner of a subgraph, mixed float types) are kept and listed in ``result.kept`` with a reason.

    Args:
        model: the model, edited in place.
        lower: nodes (of ``model.graph``) to compute in float16.
        keep_io: keep float32 graph inputs and outputs (Casts are added inside the graph).
        pass_name: provenance tag for created nodes.

    """
    graph = model.graph
    infer_main_graph_types(model)  # types decide which inputs need a Cast
    opset = _opset(model)
    result = ConversionResult(bytes_before=_ir_utils.parameter_count(model)[1])
    wanted = set(lower)
    params: dict[ir.Node, _Params] = {}
    low: set[ir.Node] = set()
    for node in graph:
        if node not in wanted:
            continue
        reason, p = _eligibility(node, opset)
        if reason is not None:
            result.kept[node.name or node.op_type] = reason
            continue
        params[node] = p
        low.add(node)
    _follow_float32_inputs(graph, low, params, keep_io)
    for node in [n for n in low if n.op_type == "Constant"]:
        # A constant is stored in float16 only if every reader takes float16 there.
        if not all(u in low and i in params[u].inputs for u, i in node.outputs[0].uses()):
            low.discard(node)
    orig = {v: v.dtype for v in _all_values(graph)}
    # 1. Lowered nodes produce float16 on their flexible outputs.
    for node in graph:
        if node not in low:
            continue
        for i in params[node].outputs:
            out = node.outputs[i]
            if orig.get(out) == ir.DataType.FLOAT:
                _set_dtype(out, ir.DataType.FLOAT16)
        if node.op_type == "Cast" and node.attributes.get_int("to") == ir.DataType.FLOAT:
            node.attributes["to"] = ir.AttrInt64("to", int(ir.DataType.FLOAT16))
            _set_dtype(node.outputs[0], ir.DataType.FLOAT16)
        if node.op_type == "Constant":
            _lower_constant(node)
        if node.op_type == "ConstantOfShape":
            _lower_fill(node)
        result.lowered.append(node)
    if not keep_io:
        for value in graph.inputs:
            if value.dtype == ir.DataType.FLOAT and not value.is_initializer():
                _set_dtype(value, ir.DataType.FLOAT16)
    _convert_initializers(graph, low, params, result)
    # 2. Every consumer gets the precision it expects; one shared Cast per value and type.
    casts: dict[tuple[ir.Value, ir.DataType], ir.Value] = {}
    for node in list(graph.all_nodes()):
        in_main = node.graph is graph
        for i, value in enumerate(node.inputs):
            if value is None or value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
                continue
            if in_main and node in low and i in params[node].inputs:
                want = ir.DataType.FLOAT16
            elif in_main and _is_free_input(node, i, opset):
                continue
            else:
                want = orig.get(value) or value.dtype
                if not in_main and value.graph is not graph:
                    continue  # a subgraph's own value: untouched, already consistent
            if value.dtype != want:
                node.replace_input_with(i, _cast(graph, value, want, casts, result, pass_name))
    if keep_io:
        _restore_outputs(graph, orig, result, pass_name)
    _drop_identity_casts(graph)
    result.bytes_after = _ir_utils.parameter_count(model)[1]
    return result


def infer_main_graph_types(model: ir.Model) -> list[ir.Value]:
    """Give untyped main-graph node outputs their inferred tensor type; returns those values.

    Inference runs on a clone and only main-graph tensor types are copied back. It uses
    ``_ir_utils.infer_types``: onnx-ir's ShapeInferencePass gives untyped sequence/optional
    values tensor types, which onnxruntime then rejects.
    """
    untyped = [v for node in model.graph for v in node.outputs if v.type is None and v.name]
    if not untyped:
        return []
    clone = model.clone()
    _ir_utils.infer_types(clone)
    inferred = {v.name: v for node in clone.graph for v in node.outputs if v.name}
    typed = []
    for value in untyped:
        other = inferred.get(value.name)
        if other is not None and isinstance(other.type, ir.TensorType) and other.dtype is not None:
            value.type = ir.TensorType(other.dtype)
            if other.shape is not None:
                value.shape = other.shape.copy()
            typed.append(value)
    return typed


def _set_dtype(value: ir.Value, dtype: ir.DataType) -> None:
    # A fresh type object: ir.Model.clone() shares Value types, so assigning ``value.dtype``
    # would also retype the caller's snapshot of the model.
    value.type = ir.TensorType(dtype)


def _eligibility(node: ir.Node, opset: int) -> tuple[str | None, _Params]:
    empty = _Params(frozenset(), frozenset(), frozenset())
    if node.domain not in ("", "ai.onnx"):
        return f"custom domain {node.domain!r}", empty
    if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
        return "owns a subgraph (kept float32 as a whole)", empty
    if node.op_type == "Constant":
        value = node.attributes.get("value")
        if value is None or value.type != ir.AttributeType.TENSOR or value.as_tensor().dtype != ir.DataType.FLOAT:
            return "not a float32 constant", empty
        return None, _Params(frozenset(), frozenset({0}), frozenset())
    if node.op_type == "ConstantOfShape":
        # Its output type is the type of its ``value`` attribute (float32 zero when absent).
        value = node.attributes.get("value")
        if value is not None and value.as_tensor().dtype != ir.DataType.FLOAT:
            return "not a float32 constant", empty
        fill = 0.0 if value is None else float(value.as_tensor().numpy().reshape(-1)[0])
        if np.isfinite(fill) and abs(fill) > FP16_MAX:
            return "constant fill value out of float16 range", empty
        return None, _Params(frozenset(), frozenset({0}), frozenset())
    if node.op_type in _SEQUENCE_OPS or any(
        isinstance(v.type, (ir.SequenceType, ir.OptionalType))
        for v in (*node.inputs, *node.outputs)
        if v is not None
    ):
        return "reads or writes sequence/optional values (kept float32)", empty
    p = float_params(node, opset)
    if p is None:
        return f"no ONNX schema for {node.op_type} at opset {opset}", empty
    typing_attrs = _DTYPE_ATTRS & set(onnx.defs.get_schema(node.op_type, opset, node.domain or "").attributes)
    if node.op_type != "Cast" and typing_attrs and (node.op_type not in _TIED_OPS or any(a in node.attributes for a in typing_attrs)):
        # Set (BitCast's ``to``), or absent with a float32 default (RandomNormal, window ops).
        return "output type set by an attribute (dtype, to)", empty
    gap = _ort_cpu_gap(node, opset)
    if gap is not None:
        return gap, empty
    kinds = {node.inputs[i].dtype for i in p.inputs if node.inputs[i] is not None}
    kinds |= {node.outputs[i].dtype for i in p.outputs}
    kinds.discard(None)
    if node.op_type == "Cast":
        if node.attributes.get_int("to") != ir.DataType.FLOAT:
            return "Cast to a non-float32 type", empty
        return None, p
    if ir.DataType.FLOAT not in kinds:
        return "no float32 tensor", empty
    if kinds != {ir.DataType.FLOAT}:
        return "mixes float32 with other types on one type parameter", empty
    return None, p


# Their element types follow the sequence's, which this converter does not retype.
_SEQUENCE_OPS = frozenset({
    "SequenceConstruct", "SequenceAt", "SequenceInsert", "SequenceErase", "SequenceLength",
    "SequenceEmpty", "SplitToSequence", "ConcatFromSequence", "SequenceMap",
    "Optional", "OptionalGetElement", "OptionalHasElement",
})


def _ort_cpu_gap(node: ir.Node, opset: int) -> str | None:
    """Why onnxruntime CPU (1.32) cannot run this node in float16 although the schema allows it."""
    if node.op_type in ("ScatterND", "ScatterElements"):
        reduction = node.attributes.get_string("reduction", "none")
        if reduction != "none":
            return f"onnxruntime CPU has no float16 {node.op_type} with reduction={reduction}"
    if node.op_type == "MeanVarianceNormalization" and opset < 19:
        return "onnxruntime CPU rejects float16 MeanVarianceNormalization below opset 19"
    return None


def _is_free_input(node: ir.Node, index: int, opset: int) -> bool:
    p = float_params(node, opset)
    return p is not None and index in p.free_inputs


def _follow_float32_inputs(graph: ir.Graph, low: set[ir.Node], params: dict, keep_io: bool) -> None:
    """Data-movement nodes fed only by float32 stay float32 (a Cast later is as good as now)."""
    for node in graph:  # topological order: decisions flow forward
        if node not in low or node.op_type not in NEUTRAL_OPS:
            continue
        feeds = [node.inputs[i] for i in params[node].inputs if node.inputs[i] is not None]
        if feeds and all(_is_float32_source(v, low, keep_io) for v in feeds):
            low.discard(node)


def _is_float32_source(value: ir.Value, low: set[ir.Node], keep_io: bool) -> bool:
    producer = value.producer()
    if producer is not None:
        return producer not in low
    if value.is_initializer() and not value.is_graph_input():
        return False  # a weight can be stored in float16
    return keep_io


def _all_values(graph: ir.Graph) -> list[ir.Value]:
    values = list(graph.inputs) + list(graph.initializers.values())
    for node in graph.all_nodes():
        values += [v for v in node.outputs]
    return values


def _lower_constant(node: ir.Node) -> None:
    tensor = node.attributes["value"].as_tensor()
    array = _to_half(tensor.numpy())
    node.attributes["value"] = ir.AttrTensor("value", ir.tensor(array, name=tensor.name))
    _set_dtype(node.outputs[0], ir.DataType.FLOAT16)


def _lower_fill(node: ir.Node) -> None:
    value = node.attributes.get("value")
    array = np.zeros(1, np.float32) if value is None else value.as_tensor().numpy()
    node.attributes["value"] = ir.AttrTensor("value", ir.tensor(_to_half(array)))
    _set_dtype(node.outputs[0], ir.DataType.FLOAT16)


def _to_half(array: np.ndarray) -> np.ndarray:
    # Values below float16's smallest subnormal keep their sign instead of flushing to zero.
    tiny = np.float32(2.0**-24)
    out = np.where((array != 0) & (np.abs(array) < tiny), np.sign(array) * tiny, array)
    return out.astype(np.float16)


def _convert_initializers(graph: ir.Graph, low: set[ir.Node], params: dict, result: ConversionResult) -> None:
    """Store a main-graph weight in float16 when a lowered node reads it."""
    for value in list(graph.initializers.values()):
        if value.dtype != ir.DataType.FLOAT or value.const_value is None or value.is_graph_input():
            continue
        uses = list(value.uses())
        if value.is_graph_output() or not uses:
            continue
        if not any(n in low and i in params[n].inputs for n, i in uses):
            continue
        source = value.const_value
        array = source.numpy()
        if np.any(np.abs(array) > FP16_MAX):
            continue  # lowered users of an out-of-range weight are the caller's error; stay safe
        value.const_value = ir.tensor(_to_half(array), name=value.name)
        del array  # one weight at a time: its float32 data is unmapped before the next is read
        _io.release_external(source)
        _set_dtype(value, ir.DataType.FLOAT16)
        result.initializers += 1


def _cast(
    graph: ir.Graph,
    value: ir.Value,
    to: ir.DataType,
    cache: dict[tuple[ir.Value, ir.DataType], ir.Value],
    result: ConversionResult,
    pass_name: str,
) -> ir.Value:
    key = (value, to)
    if key in cache:
        return cache[key]
    producer = value.producer()
    if producer is not None and producer.op_type == "Cast" and producer.inputs[0] is not None:
        source = producer.inputs[0]
        if source.dtype == to and producer.inputs[0].dtype == ir.DataType.FLOAT16:
            cache[key] = source  # Cast(Cast(x16 -> 32) -> 16) is x16 exactly
            return source
    suffix = "fp16" if to == ir.DataType.FLOAT16 else "fp32"
    node = ir.node(
        "Cast",
        [value],
        attributes={"to": int(to)},
        name=_node_name(graph, f"{value.name}_cast_{suffix}"),
    )
    out = node.outputs[0]
    out.name = _ir_utils.unique_name(graph, f"{value.name}_{suffix}")
    _set_dtype(out, to)
    out.shape = value.shape.copy() if value.shape is not None else None
    _ir_utils.tag(node, pass_name)
    if producer is not None and producer.graph is graph:
        graph.insert_after(producer, node)
    else:
        graph.insert_before(graph[0], node)
    cache[key] = out
    result.casts += 1
    return out


def _node_name(graph: ir.Graph, base: str) -> str:
    """A node name from ``base`` that no node of ``graph`` has (onnxruntime rejects duplicates)."""
    return _ir_utils.unique_name(graph, base, taken={n.name for n in graph.all_nodes() if n.name})


def _restore_outputs(graph: ir.Graph, orig: dict, result: ConversionResult, pass_name: str) -> None:
    """Graph outputs that became float16 get a final Cast that takes over their name."""
    for slot, value in enumerate(list(graph.outputs)):
        if orig.get(value) != ir.DataType.FLOAT or value.dtype != ir.DataType.FLOAT16:
            continue
        name = value.name
        value.name = _ir_utils.unique_name(graph, f"{name}_fp16")
        cast_name = _node_name(graph, f"{name}_cast_fp32")
        node = ir.node("Cast", [value], attributes={"to": int(ir.DataType.FLOAT)}, name=cast_name)
        out = node.outputs[0]
        out.name = name
        _set_dtype(out, ir.DataType.FLOAT)
        out.shape = value.shape.copy() if value.shape is not None else None
        _ir_utils.tag(node, pass_name)
        if value.producer() is not None and value.producer().graph is graph:
            graph.insert_after(value.producer(), node)
        else:
            graph.append(node)
        graph.outputs[slot] = out
        result.casts += 1


def _drop_identity_casts(graph: ir.Graph) -> None:
    """Remove model Casts that now cast a type to itself (a float16 Cast fed float16)."""
    for node in list(graph):
        if node.op_type != "Cast" or node.inputs[0] is None:
            continue
        out = node.outputs[0]
        if node.inputs[0].dtype != node.attributes.get_int("to") or out.is_graph_output():
            continue
        ir.convenience.replace_all_uses_with(out, node.inputs[0])
        graph.remove(node, safe=True)


def cast_pairs(model: ir.Model) -> int:
    """Number of float Casts fed directly by another float Cast (what conversion must avoid)."""
    floats = (ir.DataType.FLOAT, ir.DataType.FLOAT16)
    n = 0
    for node in model.graph.all_nodes():
        if node.op_type != "Cast" or node.inputs[0] is None:
            continue
        producer = node.inputs[0].producer()
        if producer is None or producer.op_type != "Cast":
            continue
        if producer.inputs[0] is not None and producer.inputs[0].dtype in floats:
            n += 1
    return n


def range_reasons(
    model: ir.Model,
    table: CalibrationTable | None,
    max_abs: float = FP16_MAX / 2,
    underflow_fraction: float = 0.5,
) -> dict[ir.Node, str]:
    """Main-graph nodes that must stay float32 because a tensor they touch leaves float16's range.

    Args:
        model: the float32 model.
        table: calibrated activation ranges (None: weights only).
        max_abs: overflow threshold on ``|x|``.
        underflow_fraction: share of a weight's nonzero values below 2^-14 that makes it unsafe.

    """
    bad: dict[str, str] = {}
    for name, value in model.graph.initializers.items():
        if value.const_value is None or value.dtype != ir.DataType.FLOAT:
            continue
        reason = _weight_reason(value.const_value.numpy(), max_abs, underflow_fraction)
        _io.release_external(value.const_value)
        if reason:
            bad[name] = f"{reason}: weight {name!r}"
    if table is not None:
        for name, (lo, hi) in table.ranges.items():
            peak = max(abs(lo), abs(hi))
            if peak > max_abs:
                bad[name] = f"overflow: tensor {name!r} reaches |x|={peak:.4g} > {max_abs:g}"
            elif 0.0 < peak < FP16_MIN_NORMAL:
                bad[name] = f"underflow: tensor {name!r} stays below 2^-14 (|x| <= {peak:.3g})"
    reasons: dict[ir.Node, str] = {}
    for node in model.graph:
        for v in list(node.inputs) + list(node.outputs):
            if v is not None and v.name in bad:
                reasons[node] = bad[v.name]
                break
    return reasons


def _weight_reason(array: np.ndarray, max_abs: float, underflow_fraction: float) -> str | None:
    magnitude = np.abs(array[np.isfinite(array)])
    if magnitude.size and float(magnitude.max()) > max_abs:
        return f"overflow (|w| up to {float(magnitude.max()):.4g})"
    nonzero = magnitude[magnitude > 0]
    if nonzero.size and np.mean(nonzero < FP16_MIN_NORMAL) > underflow_fraction:
        return "underflow (most nonzero |w| < 2^-14)"
    return None
