"""Self-attention as exporters write it: its geometry, and the form onnxruntime's fusion matches.

onnxruntime's attention fusion (used by the ``fuse`` pass) reads the number of heads from the
constant ``[0, 0, heads, head_dim]`` target of the Q Reshape. Exports of Hugging Face encoders
since transformers 5 write ``[batch, seq, -1, head_dim]``, a Concat of gathered dims, so the
fusion gives up ("Failed to detect num_heads and hidden_size") unless both are given. And the
default (SDPA) export of the same models writes attention in a form the fusion does not know.
This module reads each attention block once and serves both needs:

- :func:`find_blocks` locates ``Softmax(scale * Q K^T + mask) V`` blocks: the Q.K^T MatMul
  behind each Softmax (through mask Adds, scale Muls/Divs, Wheres), the Reshape before the Q,
  K and V Transposes, the projection weights before them, and the constant scale factors on
  the way (either on the scores or split over Q and K).
- :func:`geometry` derives ``(num_heads, hidden_size)`` per block from three sources, each
  reported: the projection weight width (hidden), the Reshape target dims (heads and/or
  head_dim, constants or Concat parts), and the scale constant (head_dim = 1 / scale**2). All
  blocks must agree, and the scale, where it is a constant, must be 1/sqrt(head_dim) (the one
  the fused Attention kernel applies).
- :func:`canonicalize` rewrites the SDPA export's form into the eager one the fusion matches:
  ``MatMul(Q * a, K^T * b)`` -> ``MatMul(Q, K^T) * (a*b)`` (real-number identity: re-association
  only); ``Where(IsNaN(P), 0, P)`` after the Softmax -> ``P`` (differs only on a row whose
  every score is -inf, a sequence with no attended token); and a Reshape of the context to
  ``[d0, d1, d2, d3]`` with one -1 and the other dims read from tensors of that same
  ``[batch, heads, seq, head_dim]`` layout -> removed (the identity, in self-attention where
  Q, K and V project the same input, which the fusion itself checks before fusing).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import onnx_ir as ir

from onnxopt import _ir_utils

__all__ = ["Block", "Geometry", "canonicalize", "find_blocks", "geometry"]

logger = logging.getLogger(__name__)

_DEFAULT = ("", "ai.onnx")
_MAX_DEPTH = 6  # ops between a Softmax and its Q.K^T MatMul (mask Add, scale, Where, Cast)
# head_dim from a scale constant: 1/scale**2 must be this close (relative) to an integer;
# float32 rounding of 1/sqrt(d) (or of d**-0.25, squared) is ~1e-7 relative.
_SCALE_RTOL = 1e-4
_UNSAFE = "not fusable"


@dataclasses.dataclass
class Block:
    """One attention block as found in the graph (node references, read before any rewrite)."""

    softmax: ir.Node
    qk: ir.Node  # MatMul(Q, K^T)
    context: ir.Node | None  # MatMul(P, V)
    scale: float | None  # product of constant factors on the Q.K^T path; None if one is not constant
    q_scaled: ir.Node | None  # Mul/Div by a constant right before qk input 0 (split scale), or None
    k_scaled: ir.Node | None  # the same on input 1
    reshapes: list[ir.Node]  # the Reshapes before the Q, K and V Transposes (found ones)
    widths: list[int]  # output widths of the constant Q/K/V projection weights (found ones)
    dims: list[tuple[int | None, int | None]]  # (heads, head_dim) of each Reshape target; -1, or None if dynamic


@dataclasses.dataclass(frozen=True)
class Geometry:
    """What :func:`geometry` found: the values, or the reason there are none."""

    num_heads: int = 0
    hidden_size: int = 0
    blocks: int = 0  # attention blocks found
    sources: tuple[str, ...] = ()  # how the values were read, for the report
    reason: str = ""  # why num_heads/hidden_size are 0 (empty when found)
    unsafe: bool = False  # a block's scale is not 1/sqrt(head_dim): fusing it would change the function


def _const(value: ir.Value | None) -> np.ndarray | None:
    """Return the array of an initializer or Constant-node output; None if computed or overridable."""
    if value is None or value.is_graph_input():
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _scalar(value: ir.Value | None) -> float | None:
    array = _const(value)
    if array is None or array.size != 1 or not np.issubdtype(array.dtype, np.floating):
        return None
    return float(array.reshape(()))


def _producer(value: ir.Value | None, *op_types: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    if node is None or node.domain not in _DEFAULT or (op_types and node.op_type not in op_types):
        return None
    return node


def _scores_matmul(value: ir.Value | None, depth: int = 0) -> tuple[ir.Node, float | None] | None:
    """Find the MatMul(Q, K^T) behind ``value`` (a Softmax input) and the constant factor on the way."""
    node = _producer(value)
    if node is None or depth > _MAX_DEPTH:
        return None
    op = node.op_type
    if op == "MatMul":
        return (node, 1.0) if all(_const(i) is None for i in node.inputs) else None
    if op in ("Mul", "Div"):
        factors = [_scalar(i) for i in node.inputs]
        for i, data in enumerate(node.inputs):
            if factors[i] is not None or (op == "Div" and i == 1):
                continue
            found = _scores_matmul(data, depth + 1)
            if found is None:
                continue
            other = factors[1 - i]
            if found[1] is None or other is None:
                return found[0], None
            return found[0], found[1] * (other if op == "Mul" else 1.0 / other)
        return None
    if op in ("Add", "Sub", "Where", "Cast"):
        candidates = node.inputs[1:] if op == "Where" else node.inputs[:1] if op in ("Sub", "Cast") else node.inputs
        for data in candidates:
            found = _scores_matmul(data, depth + 1)
            if found is not None:
                return found
    return None


def _walk_to_reshape(value: ir.Value | None) -> tuple[ir.Node | None, float | None, ir.Node | None]:
    """From a Q/K/V MatMul input up to its Reshape: (reshape, constant factor, first scaling node)."""
    factor: float | None = 1.0
    first_scale = None
    for _ in range(_MAX_DEPTH):
        node = _producer(value)
        if node is None:
            return None, factor, first_scale
        if node.op_type == "Reshape":
            return node, factor, first_scale
        if node.op_type == "Transpose":
            value = node.inputs[0]
        elif node.op_type in ("Mul", "Div"):
            c = _scalar(node.inputs[1])
            if c is None and node.op_type == "Mul":
                c, value = _scalar(node.inputs[0]), node.inputs[1]
            else:
                value = node.inputs[0]
            if first_scale is None:
                first_scale = node
            if c is None or c == 0.0:
                factor = None
            elif factor is not None:
                factor *= c if node.op_type == "Mul" else 1.0 / c
        else:
            return None, factor, first_scale
    return None, factor, first_scale


def _projection_width(reshape: ir.Node) -> int | None:
    """Output width of the constant 2-D weight of ``MatMul(x, W) (+ b)`` feeding ``reshape``."""
    node = _producer(reshape.inputs[0], "Add", "MatMul")
    if node is not None and node.op_type == "Add":
        node = next((p for p in (_producer(i, "MatMul") for i in node.inputs) if p is not None), None)
    if node is None:
        return None
    weight = _const(node.inputs[1])
    return int(weight.shape[1]) if weight is not None and weight.ndim == 2 else None


def _target_dims(reshape: ir.Node) -> tuple[int | None, int | None]:
    """Dims 2 and 3 (heads, head_dim) of a rank-4 Reshape target: a constant, -1, or None (computed)."""
    shape = reshape.inputs[1] if len(reshape.inputs) > 1 else None
    array = _const(shape)
    if array is not None:
        return (int(array[2]), int(array[3])) if array.ndim == 1 and array.size == 4 else (None, None)
    concat = _producer(shape, "Concat")
    if concat is None or len(concat.inputs) != 4:
        return None, None
    parts = [_const(i) for i in concat.inputs[2:]]
    dims = tuple(int(p.reshape(-1)[0]) if p is not None and p.size == 1 else None for p in parts)
    return dims[0], dims[1]


def _context_matmul(softmax: ir.Node) -> ir.Node | None:
    """Find the MatMul(P, V) reading the Softmax output, directly or through a NaN guard / Cast."""
    frontier = [softmax.outputs[0]]
    for _ in range(3):
        nxt = []
        for value in frontier:
            for use in value.uses():
                node = use.node
                if node.domain not in _DEFAULT:
                    continue
                if node.op_type == "MatMul" and use.idx == 0:
                    return node
                if node.op_type in ("Where", "Cast", "Identity", "Dropout"):
                    nxt.append(node.outputs[0])
        frontier = nxt
    return None


def find_blocks(graph: ir.Graph) -> list[Block]:
    """Every ``Softmax(f(Q K^T)) V`` block of the main graph, in graph order."""
    blocks = []
    for softmax in graph:
        if softmax.op_type != "Softmax" or softmax.domain not in _DEFAULT:
            continue
        found = _scores_matmul(softmax.inputs[0])
        if found is None:
            continue
        qk, scale = found
        context = _context_matmul(softmax)
        q_reshape, q_factor, q_scaled = _walk_to_reshape(qk.inputs[0])
        k_reshape, k_factor, k_scaled = _walk_to_reshape(qk.inputs[1])
        v_reshape = _walk_to_reshape(context.inputs[1])[0] if context is not None else None
        if scale is not None:
            scale = None if q_factor is None or k_factor is None else scale * q_factor * k_factor
        reshapes = [r for r in (q_reshape, k_reshape, v_reshape) if r is not None]
        widths = [w for w in (_projection_width(r) for r in reshapes) if w is not None]
        blocks.append(Block(
            softmax=softmax, qk=qk, context=context, scale=scale,
            q_scaled=q_scaled if q_scaled is not None and q_scaled.outputs[0] is qk.inputs[0] else None,
            k_scaled=k_scaled if k_scaled is not None and k_scaled.outputs[0] is qk.inputs[1] else None,
            reshapes=reshapes, widths=widths, dims=[_target_dims(r) for r in reshapes],
        ))
    return blocks


def _block_geometry(block: Block) -> tuple[int, int, list[str]] | str:
    """(num_heads, hidden_size, sources) of one block, or why they cannot be read."""
    hidden = block.widths[0] if block.widths and len(set(block.widths)) == 1 else None
    heads_c = next((h for h, _ in block.dims if h is not None and h > 0), None)
    dim_c = next((d for _, d in block.dims if d is not None and d > 0), None)
    scale_dim = None
    if block.scale is not None and block.scale > 0:
        d = 1.0 / block.scale**2
        if abs(d - round(d)) <= _SCALE_RTOL * d:
            scale_dim = round(d)
    sources = []
    if hidden is not None:
        sources.append(f"hidden {hidden} from the Q/K/V projection weights")
    if heads_c is not None and dim_c is not None:
        heads, head_dim = heads_c, dim_c
        sources.append(f"heads {heads} and head_dim {head_dim} from the Reshape target")
        if hidden is not None and hidden != heads * head_dim:
            return f"Reshape target {heads} x {head_dim} does not match the projection width {hidden}"
        hidden = heads * head_dim
    elif hidden is not None and dim_c is not None and hidden % dim_c == 0:
        heads, head_dim = hidden // dim_c, dim_c
        sources.append(f"head_dim {head_dim} from the Reshape target (heads written as "
                       f"{next((h for h, _ in block.dims), None)})")
    elif hidden is not None and heads_c is not None and hidden % heads_c == 0:
        heads, head_dim = heads_c, hidden // heads_c
        sources.append(f"heads {heads} from the Reshape target")
    elif hidden is not None and scale_dim is not None and hidden % scale_dim == 0:
        heads, head_dim = hidden // scale_dim, scale_dim
        sources.append(f"head_dim {head_dim} from the scale constant {block.scale:.6g} = 1/sqrt({head_dim})")
    else:
        missing = "the projection width" if hidden is None else "heads or head_dim"
        return (f"{missing} is not a constant of the graph (no constant Q/K/V weight, Reshape dim "
                "or 1/sqrt(head_dim) scale)")
    if block.scale is not None and not math.isclose(block.scale, 1.0 / math.sqrt(head_dim), rel_tol=_SCALE_RTOL):
        return (f"{_UNSAFE}: scale {block.scale:.6g} is not 1/sqrt(head_dim {head_dim}) = "
                f"{1 / math.sqrt(head_dim):.6g}, the scale of the fused Attention kernel")
    if block.scale is not None and scale_dim is not None and "scale" not in sources[-1]:
        sources.append(f"checked against the scale constant {block.scale:.6g} = 1/sqrt({head_dim})")
    return heads, hidden, sources


def geometry(blocks: list[Block]) -> Geometry:
    """num_heads and hidden_size shared by ``blocks``, with their sources, or the reason there are none."""
    if not blocks:
        return Geometry(reason="no attention block (Softmax over MatMul(Q, K^T)) found")
    found: dict[tuple[int, int], list[str]] = {}
    reasons: dict[str, int] = {}
    for block in blocks:
        result = _block_geometry(block)
        if isinstance(result, str):
            reasons[result] = reasons.get(result, 0) + 1
        else:
            found.setdefault(result[:2], result[2])
    if reasons:
        why = "; ".join(f"{r} ({n} of {len(blocks)} blocks)" for r, n in reasons.items())
        return Geometry(blocks=len(blocks), reason=why, unsafe=any(r.startswith(_UNSAFE) for r in reasons))
    if len(found) > 1:
        values = ", ".join(f"{h} heads x {s}" for h, s in sorted(found))
        return Geometry(blocks=len(blocks), reason=f"attention blocks disagree: {values}")
    (heads, hidden), sources = next(iter(found.items()))
    return Geometry(num_heads=heads, hidden_size=hidden, blocks=len(blocks), sources=tuple(sources))


def _dim_source(value: ir.Value) -> tuple[ir.Value, int] | None:
    """``(t, k)`` if ``value`` is ``Unsqueeze(Gather(Shape(t), k))`` (a 1-element dim of t), else None."""
    unsq = _producer(value, "Unsqueeze", "Reshape")
    gather = _producer(unsq.inputs[0] if unsq is not None else value, "Gather")
    shape = _producer(gather.inputs[0], "Shape") if gather is not None else None
    index = _const(gather.inputs[1]) if gather is not None else None
    if shape is None or index is None or index.size != 1 or shape.attributes.get("start") is not None:
        return None
    return shape.inputs[0], int(index.reshape(-1)[0])


def _identity_reshape(block: Block) -> ir.Node | None:
    """Find the Reshape right after the context MatMul that maps [b, h, s, d] to itself."""
    context = block.context
    if context is None:
        return None
    reshapes = [u.node for u in context.outputs[0].uses() if u.node.op_type == "Reshape" and u.idx == 0]
    if len(reshapes) != 1 or reshapes[0].domain not in _DEFAULT:
        return None
    reshape = reshapes[0]
    concat = _producer(reshape.inputs[1], "Concat")
    if concat is None or len(concat.inputs) != 4:
        return None
    # Tensors of the same [batch, heads, seq, head_dim] layout in self-attention: the context,
    # Q after its Transpose (before the split scale) and V after its Transpose.
    same = {id(context.outputs[0]), id(context.inputs[1])}
    q_in = block.q_scaled.inputs[0] if block.q_scaled is not None else block.qk.inputs[0]
    same.add(id(q_in))
    free = 0
    for position, part in enumerate(concat.inputs):
        array = _const(part)
        if array is not None and array.size == 1 and int(array.reshape(-1)[0]) == -1:
            free += 1
            continue
        source = _dim_source(part)
        if source is None or id(source[0]) not in same or source[1] not in (position, position - 4):
            return None
    return reshape if free == 1 else None


_PROBE = (2, 3, 5, 7)  # distinct primes: a computed shape is matched to the dims it came from


def _shape_value(value: ir.Value | None, probe: ir.Value, depth: int = 0) -> np.ndarray | None:
    """Evaluate a shape expression (Shape/Slice/Gather/Unsqueeze/Squeeze/Concat of constants) with
    ``probe`` given the shape :data:`_PROBE`; None where it reads anything else."""
    if value is None or depth > 8:
        return None
    array = _const(value)
    if array is not None:
        return array.astype(np.int64).reshape(-1) if array.dtype.kind == "i" else None
    node = _producer(value, "Shape", "Slice", "Gather", "Unsqueeze", "Squeeze", "Concat")
    if node is None:
        return None
    op = node.op_type
    if op == "Shape":
        if node.inputs[0] is not probe:
            return None
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", len(_PROBE))
        return np.array(_PROBE[start:end], np.int64)
    parts = [_shape_value(i, probe, depth + 1) if k == 0 or op == "Concat" else _const(i)
             for k, i in enumerate(node.inputs) if i is not None]
    if any(p is None for p in parts):
        return None
    if op == "Concat":
        return np.concatenate([p.reshape(-1) for p in parts])
    if op == "Slice":
        data, starts, ends = parts[0], parts[1], parts[2]
        steps = parts[4] if len(parts) > 4 else [1]
        if len(starts) != 1 or (len(parts) > 3 and list(parts[3].reshape(-1)) not in ([0], [-1])):
            return None
        return data[int(starts[0]):int(min(ends[0], 2**31)):int(steps[0])]
    if op == "Gather":
        return np.atleast_1d(parts[0][parts[1].astype(np.int64)]).reshape(-1)
    return parts[0].reshape(-1)  # Unsqueeze/Squeeze of a 1-D shape expression: same values


def _reshape_result(reshape: ir.Node, probe: ir.Value, in_shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The output shape of ``reshape`` when ``probe`` has shape :data:`_PROBE` and its input ``in_shape``."""
    target = _shape_value(reshape.inputs[1] if len(reshape.inputs) > 1 else None, probe)
    if target is None or np.count_nonzero(target == -1) > 1 or np.any(target == 0):
        return None
    dims = [int(d) for d in target]
    if -1 in dims:
        known = int(np.prod([d for d in dims if d != -1]))
        dims[dims.index(-1)] = int(np.prod(in_shape)) // known
    return tuple(dims) if int(np.prod(dims)) == int(np.prod(in_shape)) else None


def _flattened_k_transpose(value: ir.Value) -> tuple[ir.Node, ir.Value, list[int]] | None:
    """K^T written through 3-D (dynamo's SDPA export): ``Reshape(Transpose(Reshape(K, [-1, s, d]),
    [0, 2, 1]), [b, h, d, s])`` with K ``[b, h, s, d]``. Returns (outer Reshape, the tensor to
    transpose instead, its perm) where the chain is exactly a transpose of K's last two dims."""
    outer = _producer(value, "Reshape")
    inner_t = _producer(outer.inputs[0], "Transpose") if outer is not None else None
    if inner_t is None or list(inner_t.attributes.get_ints("perm", [])) != [0, 2, 1]:
        return None
    inner = _producer(inner_t.inputs[0], "Reshape")
    if inner is None or len(inner_t.outputs[0].uses()) != 1 or len(inner.outputs[0].uses()) != 1:
        return None
    k = inner.inputs[0]
    flat = _reshape_result(inner, k, _PROBE)
    b, h, s_, d = _PROBE
    if flat != (b * h, s_, d) or _reshape_result(outer, k, (b * h, d, s_)) != (b, h, d, s_):
        return None
    producer = _producer(k, "Transpose")
    if producer is not None and list(producer.attributes.get_ints("perm", [])) == [0, 2, 1, 3]:
        return outer, producer.inputs[0], [0, 2, 3, 1]  # the form of a Hugging Face eager export
    return outer, k, [0, 1, 3, 2]


def _graph_inputs_reached(value: ir.Value, graph: ir.Graph, depth: int = 0) -> set[str] | None:
    """Names of the graph inputs ``value`` depends on other than through Shape; None if too deep."""
    if value.is_graph_input():
        return {value.name or ""}
    node = value.producer()
    if node is None or node.op_type == "Shape":
        return set()
    if depth > 12:
        return None
    found: set[str] = set()
    for i in node.inputs:
        if i is not None:
            sub = _graph_inputs_reached(i, graph, depth + 1)
            if sub is None:
                return None
            found |= sub
    return found


def _dynamo_padding_mask(where: ir.Node, graph: ir.Graph) -> ir.Value | None:
    """The raw 0/1 mask input behind dynamo's SDPA mask ``Where(keep, 0, -inf)``, or None.

    ``keep`` is ``And(<all-true from shapes>, GatherND(Cast<bool>(mask), [batch, key] indices))``:
    the key padding mask broadcast over queries, which is what the TorchScript export's
    ``Where(Cast<bool>(1 - mask[:, None, None, :]), -inf, 0)`` computes for a 0/1 mask.
    """
    zero, fill = _scalar(where.inputs[1]), _scalar(where.inputs[2])
    if zero != 0.0 or fill is None or fill > -1e30:
        return None
    keep = _producer(where.inputs[0], "And")
    if keep is None:
        return None
    for i in (0, 1):
        gather = _producer(keep.inputs[i], "GatherND")
        cast = _producer(gather.inputs[0], "Cast") if gather is not None else None
        if cast is None or cast.attributes.get_int("to", 0) != ir.DataType.BOOL or not cast.inputs[0].is_graph_input():
            continue
        if _graph_inputs_reached(keep.inputs[1 - i], graph) == set() and \
                _graph_inputs_reached(gather.inputs[1], graph) == set():
            return cast.inputs[0]
    return None


def _torchscript_mask(graph: ir.Graph, mask: ir.Value, fill: float, cache: dict, before: ir.Node) -> ir.Value:
    """``Where(Cast<bool>(1 - Expand(Unsqueeze(Unsqueeze(mask)))), fill, 0)``: the mask form of a
    TorchScript SDPA export, which onnxruntime's attention fusion reads (built once per mask)."""
    if mask in cache:
        return cache[mask]
    base = f"{mask.name}/onnxopt_mask"
    names = [_ir_utils.unique_name(graph, f"{base}_{k}") for k in range(10)]

    def const(i: int, array: np.ndarray) -> ir.Value:
        v = ir.Value(name=names[i], const_value=ir.tensor(array))
        graph.register_initializer(v)
        return v

    dtype = mask.dtype.numpy() if mask.dtype is not None else np.int64
    axes1, axes2 = const(0, np.array([1], np.int64)), const(1, np.array([2], np.int64))
    ones, one = const(2, np.ones(4, np.int64)), const(3, np.array(1, dtype))
    fill_v, zero_v = const(4, np.array(fill, np.float32)), const(5, np.array(0.0, np.float32))
    nodes = [ir.node("Unsqueeze", [mask, axes1], name=names[6])]
    nodes.append(ir.node("Unsqueeze", [nodes[-1].outputs[0], axes2], name=names[7]))
    nodes.append(ir.node("Expand", [nodes[-1].outputs[0], ones], name=names[8]))
    nodes.append(ir.node("Sub", [one, nodes[-1].outputs[0]], name=names[9]))
    nodes.append(ir.node("Cast", [nodes[-1].outputs[0]], attributes={"to": ir.DataType.BOOL},
                         name=_ir_utils.unique_name(graph, f"{base}_bool")))
    nodes.append(ir.node("Where", [nodes[-1].outputs[0], fill_v, zero_v], name=_ir_utils.unique_name(graph, base)))
    for node in nodes:
        node.outputs[0].name = node.name
    graph.insert_before(before, nodes)
    cache[mask] = nodes[-1].outputs[0]
    return cache[mask]


def canonicalize(graph: ir.Graph, blocks: list[Block]) -> list[str]:
    """Rewrite ``blocks`` into the eager form onnxruntime's fusion matches (see the module docstring).

    Returns:
        The names of the Softmax nodes of the blocks that were rewritten (named here if unnamed),
        so the caller can tell whether the fusion then consumed them.

    """
    touched = []
    masks: dict = {}
    for n, block in enumerate(blocks):
        changed = False
        # dynamo's Where(And(.., GatherND(Cast<bool>(mask), idx)), 0, -inf) -> the TorchScript mask form
        add = _producer(block.softmax.inputs[0], "Add")
        for i, value in enumerate(add.inputs if add is not None else ()):
            where = _producer(value, "Where")
            mask = _dynamo_padding_mask(where, graph) if where is not None else None
            if mask is not None:
                add.replace_input_with(i, _torchscript_mask(graph, mask, _scalar(where.inputs[2]), masks, add))
                changed = True
        # Reshape(Transpose(Reshape(K, [-1, s, d]), [0, 2, 1]), [b, h, d, s]) -> Transpose(K) (a copy)
        k_in = block.k_scaled.inputs[0] if block.k_scaled is not None else block.qk.inputs[1]
        flat = _flattened_k_transpose(k_in)
        if flat is not None and not flat[0].outputs[0].is_graph_output():
            outer, source, perm = flat
            name = _ir_utils.unique_name(graph, f"{outer.name or 'k'}/onnxopt_k_transpose")
            transpose = ir.node("Transpose", [source], attributes={"perm": perm}, name=name)
            transpose.outputs[0].name = name
            graph.insert_before(outer, transpose)
            outer.outputs[0].replace_all_uses_with(transpose.outputs[0])
            changed = True
        # Where(IsNaN(P), 0, P) -> P
        for use in list(block.softmax.outputs[0].uses()):
            where = use.node
            if where.op_type != "Where" or where.domain not in _DEFAULT or use.idx != 2:
                continue
            isnan = _producer(where.inputs[0], "IsNaN")
            zero = _const(where.inputs[1])
            if isnan is None or isnan.inputs[0] is not block.softmax.outputs[0] or zero is None or np.any(zero != 0):
                continue
            if where.outputs[0].is_graph_output():
                continue
            where.outputs[0].replace_all_uses_with(block.softmax.outputs[0])
            graph.remove(where, safe=True)
            if not isnan.outputs[0].uses():
                graph.remove(isnan, safe=True)
            changed = True
        # MatMul(Q * a, K^T * b) -> MatMul(Q, K^T) * (a * b)
        reshape = _identity_reshape(block)
        qs, ks = block.q_scaled, block.k_scaled
        if (qs is not None and ks is not None and qs.op_type == ks.op_type == "Mul"
                and len(qs.outputs[0].uses()) == 1 and len(ks.outputs[0].uses()) == 1
                and not block.qk.outputs[0].is_graph_output()):
            a, b = (_scalar(qs.inputs[1]), _scalar(ks.inputs[1]))
            if a is not None and b is not None:
                q_in, k_in = qs.inputs[0], ks.inputs[0]
                dtype = ir.convenience.get_const_tensor(qs.inputs[1]).dtype.numpy()
                base = block.qk.name or f"attention_{n}"
                factor = ir.Value(name=_ir_utils.unique_name(graph, f"{base}/onnxopt_scale_value"),
                                  const_value=ir.tensor(np.array(a * b, dtype=dtype)))
                graph.register_initializer(factor)
                scores = ir.Value(name=_ir_utils.unique_name(graph, f"{base}/onnxopt_scores"))
                scaled = ir.Value(name=_ir_utils.unique_name(graph, f"{base}/onnxopt_scaled"))
                matmul = ir.node("MatMul", [q_in, k_in], name=f"{base}/onnxopt_qk", outputs=[scores])
                mul = ir.node("Mul", [scores, factor], name=f"{base}/onnxopt_scale", outputs=[scaled])
                graph.insert_before(block.qk, [matmul, mul])
                block.qk.outputs[0].replace_all_uses_with(mul.outputs[0])
                graph.remove([block.qk, qs, ks], safe=True)
                block.qk = matmul
                changed = True
        if reshape is not None and not reshape.outputs[0].is_graph_output():
            reshape.outputs[0].replace_all_uses_with(reshape.inputs[0])
            graph.remove(reshape, safe=True)
            changed = True
        if changed:
            if not block.softmax.name:
                block.softmax.name = f"onnxopt_attention_softmax_{n}"
            touched.append(block.softmax.name)
    return touched
