"""Graph side of the low-rank split: candidates, weight matrices, activation rows, rewrite.

Which nodes qualify, their weight as a [K, N] matrix, their activations as rows, and the
in-place rewrite into two thinner nodes. Every rewrite keeps the original node (and so its
output name and its users) as the second, ``V`` half, and inserts the ``U`` half before it:

- ``MatMul(x, W)`` -> ``MatMul(MatMul(x, U), V)`` for x of any rank (rows are x's last axis).
- ``Gemm(A, B, C)`` with ``W = alpha * op(B)`` -> ``Gemm(MatMul(A, U), V, C)`` (transA=1: the
  first node is ``Gemm(A, U, transA=1)``); alpha is folded into ``U V``, beta and C stay, so a
  broadcast bias is handled by Gemm itself.
- 1x1 ``Conv(x, W, b)`` (group 1; W [N, C, 1, ...]) -> ``Conv(Conv(x, U'), V', b)``: the first
  conv keeps strides, pads and dilations, the second is a plain 1x1 conv. Zero padding stays
  exact because the first conv has no bias.
- k x k 2-D ``Conv`` (Jaderberg et al. 2014, scheme 2): the weight as a [C*kh, kw*N] matrix,
  split into a [r, C, kh, 1] vertical conv (vertical strides/pads/dilations) followed by a
  [N, r, 1, kw] horizontal conv (horizontal ones, and the bias). Weight-based SVD only.
- ``Gather(E, ids)`` of a [V, D] embedding table (axis 0) -> ``MatMul(Gather(U, ids), V)``
  (ALBERT's factorised embedding, Lan et al. 2020): ``E[i] = U[i] @ V`` row by row, so the
  split is exact up to the truncation. The rows are one-hot selections, so the SVD is of the
  table itself (every token weighs alike; a few calibration sentences would bias a
  frequency weighting). The original node becomes the MatMul and keeps its output name.
  With ``hot`` rows (those the calibration data indexes: the frequent tokens, which carry the
  table's high-rank part), only the other rows are factored and the hot ones stay exact:
  ``Add(MatMul(Gather(U', Gather(cold_map, ids)), V), Gather(H', Gather(hot_map, ids)))``, where
  ``U'`` and ``H'`` end in a zero row that the other half's tokens map to (int32 maps of [V]).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from onnxopt import _ir_utils

__all__ = ["Candidate", "apply_split", "find_candidate", "index_counts", "rows_of"]


@dataclasses.dataclass
class Candidate:
    """A node that can be split.

    Attributes:
        node: the MatMul/Gemm/Conv node.
        kind: "matmul", "gemm", "conv1x1", "conv-spatial" or "gather".
        weight: the constant weight value.
        matrix: the weight as [K, N] float64 (Gemm alpha folded in).
        activation: the value whose rows multiply ``matrix`` (None: not available).
        layout: how :func:`rows_of` turns a captured activation into [rows, K].
        alone: budget mode: (probe rank, model output cosine) measured with this layer the only
            one split, or None.
        hot: Gather: bool [V] mask of the table rows kept exact (``matrix`` then holds only the
            other rows), or None.

    """

    node: ir.Node
    kind: str
    weight: ir.Value
    matrix: np.ndarray
    activation: ir.Value | None
    layout: tuple
    alone: tuple[int, float] | None = None
    hot: np.ndarray | None = None

    @property
    def label(self) -> str:
        """The node's name, or its weight's name when the node is anonymous."""
        return self.node.name or str(self.weight.name)

    @property
    def stats_key(self) -> tuple:
        """Key of the activation statistics this candidate needs (shared by equal inputs)."""
        return (self.activation.name if self.activation is not None else None, self.layout)


def find_candidate(
    node: ir.Node, *, min_elements: int, spatial: bool, pass_name: str
) -> Candidate | str:
    """Return a :class:`Candidate` for ``node``, or the reason it cannot be split."""
    if node.metadata_props.get(_ir_utils.PROVENANCE_KEY) == pass_name:
        return "node is already a low-rank factor"
    if node.op_type == "Gather":
        return _gather(node, min_elements)
    weight = _ir_utils.constant_input(node, 1)
    if weight is None:
        return f"{node.op_type} weight is not a constant initializer"
    if not _ir_utils.is_float_dtype(weight.dtype):
        return f"{node.op_type} weight dtype {weight.dtype} is not floating point"
    if len(weight.uses()) > 1:
        return f"{node.op_type} weight is shared by {len(weight.uses())} uses"
    x = node.inputs[0]
    if x is None or x.const_value is not None or x.is_initializer():
        return f"{node.op_type} input is constant (simplify folds it)"
    w = _ir_utils.constant_array(weight)
    if w.size < min_elements:
        return f"weight has fewer than min_elements={min_elements} elements"
    if node.op_type == "MatMul":
        if w.ndim != 2:
            return f"MatMul weight is {w.ndim}-D, not 2-D"
        return Candidate(node, "matmul", weight, w.astype(np.float64), node.inputs[0], ("rows",))
    if node.op_type == "Gemm":
        return _gemm(node, weight, w)
    if node.op_type == "Conv":
        return _conv(node, weight, w, spatial)
    return f"op {node.op_type} is not supported"


def _gemm(node: ir.Node, weight: ir.Value, w: np.ndarray) -> Candidate | str:
    if w.ndim != 2:
        return "Gemm weight is not 2-D"
    alpha = node.attributes.get_float("alpha", 1.0)
    mat = (w.T if node.attributes.get_int("transB", 0) else w).astype(np.float64) * alpha
    layout = ("cols",) if node.attributes.get_int("transA", 0) else ("rows",)
    return Candidate(node, "gemm", weight, mat, node.inputs[0], layout)


def _conv(node: ir.Node, weight: ir.Value, w: np.ndarray, spatial: bool) -> Candidate | str:
    if node.attributes.get_int("group", 1) != 1:
        return "Conv has group > 1"
    if w.ndim < 3:
        return "Conv weight has no spatial axes"
    kernel = w.shape[2:]
    if all(k == 1 for k in kernel):
        mat = w.reshape(w.shape[0], w.shape[1]).T.astype(np.float64)  # [C, N]
        strides = tuple(node.attributes.get_ints("strides", [1] * len(kernel)))
        pads = tuple(node.attributes.get_ints("pads", [0] * 2 * len(kernel)))
        plain = node.attributes.get_string("auto_pad", "NOTSET") in ("NOTSET", "VALID")
        # Strided 1x1 conv without padding reads exactly every s-th pixel; otherwise all pixels.
        step = strides if plain and not any(pads) else (1,) * len(kernel)
        return Candidate(node, "conv1x1", weight, mat, node.inputs[0], ("channels", step))
    if not spatial:
        return "spatial k x k Conv splitting is off (spatial=false)"
    if len(kernel) != 2 or 1 in kernel:
        return "spatial split needs a 2-D kernel with both sides > 1"
    if node.attributes.get_string("auto_pad", "NOTSET") != "NOTSET":
        return "spatial split needs explicit pads (auto_pad is set)"
    n, c, kh, kw = w.shape
    mat = w.transpose(1, 2, 3, 0).reshape(c * kh, kw * n).astype(np.float64)  # [(c,i), (j,n)]
    return Candidate(node, "conv-spatial", weight, mat, None, ("none",))


def _gather(node: ir.Node, min_elements: int) -> Candidate | str:
    table = _ir_utils.constant_input(node, 0)
    if table is None:
        return "Gather data is not a constant initializer"
    if not _ir_utils.is_float_dtype(table.dtype):
        return f"Gather data dtype {table.dtype} is not floating point"
    if len(table.uses()) > 1:
        return f"Gather data is shared by {len(table.uses())} uses"
    ids = node.inputs[1] if len(node.inputs) > 1 else None
    if ids is None or ids.const_value is not None or ids.is_initializer():
        return "Gather indices are constant (simplify folds it)"
    if node.attributes.get_int("axis", 0) != 0:
        return "Gather axis is not 0"
    w = _ir_utils.constant_array(table)
    if w.ndim != 2:
        return f"Gather data is {w.ndim}-D, not a 2-D embedding table"
    if w.size < min_elements:
        return f"weight has fewer than min_elements={min_elements} elements"
    # The indices are the "activation": calibration gives how often each row is read.
    return Candidate(node, "gather", table, w.astype(np.float64), ids, ("ids", w.shape[0]))


def index_counts(array: np.ndarray, rows: int) -> np.ndarray:
    """How often each of ``rows`` table rows is read by the (possibly negative) indices ``array``."""
    flat = np.asarray(array).reshape(-1).astype(np.int64)
    flat = flat[(flat >= -rows) & (flat < rows)] % rows
    return np.bincount(flat, minlength=rows)


def rows_of(array: np.ndarray, layout: tuple) -> np.ndarray:
    """Reshape a captured activation to [rows, K] (the rows that multiply the [K, N] matrix)."""
    if layout[0] == "cols":
        return array.T
    if layout[0] == "channels":
        step = layout[1]
        sliced = array[(slice(None), slice(None), *(slice(None, None, s) for s in step))]
        return np.moveaxis(sliced, 1, -1).reshape(-1, array.shape[1])
    return array.reshape(-1, array.shape[-1])


def split_cost(cand: Candidate, rank: int) -> tuple[int, int]:
    """(parameters before, parameters after) of a split at ``rank``."""
    k, n = cand.matrix.shape
    return k * n, rank * (k + n)


def apply_split(
    graph: ir.Graph, cand: Candidate, u: np.ndarray, v: np.ndarray, pass_name: str, taken: set[str]
) -> None:
    """Rewrite ``cand.node`` in place as the two nodes described in the module docstring."""
    node = cand.node
    dtype = cand.weight.const_value.dtype.numpy()
    base = str(cand.weight.name)
    k, n = cand.matrix.shape
    r = u.shape[1]
    if cand.kind in ("matmul", "gemm", "gather"):
        u_arr, v_arr = u, v
        if cand.hot is not None:  # the tokens whose rows stay exact read a zero row of U
            u_arr = np.vstack([u, np.zeros((1, r), u.dtype)])
    elif cand.kind == "conv1x1":
        spatial_ones = (1,) * (cand.weight.const_value.numpy().ndim - 2)
        u_arr = u.T.reshape((r, k, *spatial_ones))
        v_arr = v.T.reshape((n, r, *spatial_ones))
    else:
        nw, c, kh, kw = cand.weight.const_value.shape
        u_arr = u.reshape(c, kh, r).transpose(2, 0, 1)[..., None]  # [r, C, kh, 1]
        v_arr = v.reshape(r, kw, nw).transpose(2, 0, 1)[:, :, None, :]  # [N, r, 1, kw]
    u_val = _initializer(graph, f"{base}.lr_u", u_arr.astype(dtype), taken)
    v_val = _initializer(graph, f"{base}.lr_v", v_arr.astype(dtype), taken)
    mid = ir.Value(name=_ir_utils.unique_name(graph, f"{base}.lr_mid", taken))
    mid.dtype = cand.weight.dtype  # MatMul/Gemm/Conv: activation dtype = weight dtype
    if cand.kind == "gather" and cand.hot is not None:
        _split_gather_hot(graph, cand, u_val, v_val, mid, pass_name, taken)
        return
    if cand.kind == "gather":  # Gather(U, ids) -> mid; the node itself becomes MatMul(mid, V)
        name = _ir_utils.unique_name(graph, f"{node.name}.lr_u", taken) if node.name else None
        first = ir.node("Gather", [u_val, node.inputs[1]], {"axis": 0}, outputs=[mid], name=name)
        _ir_utils.tag(first, pass_name)
        graph.insert_before(node, first)
        _retarget_gather(graph, cand, "MatMul", mid, v_val, pass_name)
        return
    x = node.inputs[0]
    first = _first_node(cand, x, u_val, mid, graph, taken)
    _ir_utils.tag(first, pass_name)
    graph.insert_before(node, first)
    node.replace_input_with(0, mid)
    node.replace_input_with(1, v_val)
    if cand.kind == "gemm":
        node.attributes["transA"] = ir.AttrInt64("transA", 0)
        node.attributes["transB"] = ir.AttrInt64("transB", 0)
        node.attributes["alpha"] = ir.AttrFloat32("alpha", 1.0)
    elif cand.kind == "conv1x1":
        for key in ("strides", "pads", "dilations", "auto_pad"):
            node.attributes.pop(key, None)
    elif cand.kind == "conv-spatial":
        _conv_attrs(node, node, axis=1)
        node.attributes["kernel_shape"] = ir.AttrInt64s("kernel_shape", [1, v_arr.shape[3]])
    _ir_utils.tag(node, pass_name)
    weight = cand.weight
    if not weight.uses() and weight.name in graph.initializers and not weight.is_graph_output():
        graph.initializers.pop(weight.name)


def _split_gather_hot(
    graph: ir.Graph, cand: Candidate, u_val: ir.Value, v_val: ir.Value, mid: ir.Value, pass_name: str, taken: set[str]
) -> None:
    """The hot-row form of the embedding split (module docstring); the node becomes the Add."""
    node = cand.node
    table = cand.weight.const_value.numpy()
    hot = cand.hot
    hot_rows, cold_rows = np.flatnonzero(hot), np.flatnonzero(~hot)
    base = str(cand.weight.name)
    cold_map = np.full(hot.size, cold_rows.size, np.int32)
    cold_map[cold_rows] = np.arange(cold_rows.size, dtype=np.int32)
    hot_map = np.full(hot.size, hot_rows.size, np.int32)
    hot_map[hot_rows] = np.arange(hot_rows.size, dtype=np.int32)
    exact = np.vstack([table[hot_rows], np.zeros((1, table.shape[1]), table.dtype)])
    cold_map_val = _initializer(graph, f"{base}.lr_cold_map", cold_map, taken)
    hot_map_val = _initializer(graph, f"{base}.lr_hot_map", hot_map, taken)
    exact_val = _initializer(graph, f"{base}.lr_hot_rows", exact, taken)
    ids = node.inputs[1]

    def value(suffix: str, dtype: ir.DataType) -> ir.Value:
        out = ir.Value(name=_ir_utils.unique_name(graph, f"{base}.{suffix}", taken))
        out.dtype = dtype
        return out

    def make(op: str, inputs: list[ir.Value], out: ir.Value, suffix: str, attrs: dict | None = None) -> ir.Node:
        name = _ir_utils.unique_name(graph, f"{node.name}.{suffix}", taken) if node.name else None
        new = ir.node(op, inputs, attrs or {}, outputs=[out], name=name)
        _ir_utils.tag(new, pass_name)
        graph.insert_before(node, new)
        return new

    cold_pos, hot_pos = value("lr_cold_pos", ir.DataType.INT32), value("lr_hot_pos", ir.DataType.INT32)
    low, exact_out = value("lr_low", cand.weight.dtype), value("lr_exact", cand.weight.dtype)
    make("Gather", [cold_map_val, ids], cold_pos, "lr_cold_pos", {"axis": 0})
    make("Gather", [u_val, cold_pos], mid, "lr_u", {"axis": 0})
    make("MatMul", [mid, v_val], low, "lr_v")
    make("Gather", [hot_map_val, ids], hot_pos, "lr_hot_pos", {"axis": 0})
    make("Gather", [exact_val, hot_pos], exact_out, "lr_hot_rows", {"axis": 0})
    _retarget_gather(graph, cand, "Add", low, exact_out, pass_name)


def _retarget_gather(graph: ir.Graph, cand: Candidate, op: str, a: ir.Value, b: ir.Value, pass_name: str) -> None:
    """The embedding's Gather becomes ``op(a, b)`` (keeping its output); the table goes once unused."""
    node = cand.node
    node.op_type = op
    node.attributes.pop("axis", None)
    node.replace_input_with(0, a)
    node.replace_input_with(1, b)
    _ir_utils.tag(node, pass_name)
    if not cand.weight.uses() and cand.weight.name in graph.initializers and not cand.weight.is_graph_output():
        graph.initializers.pop(cand.weight.name)


def _first_node(
    cand: Candidate, x: ir.Value, u_val: ir.Value, mid: ir.Value, graph: ir.Graph, taken: set[str]
) -> ir.Node:
    node = cand.node
    # onnxruntime rejects duplicate node names; ``taken`` holds node names as well.
    name = _ir_utils.unique_name(graph, f"{node.name}.lr_u", taken) if node.name else None
    if cand.kind == "matmul" or (cand.kind == "gemm" and cand.layout[0] == "rows"):
        return ir.node("MatMul", [x, u_val], outputs=[mid], name=name)
    if cand.kind == "gemm":
        return ir.node("Gemm", [x, u_val], {"transA": 1}, outputs=[mid], name=name)
    attrs = {key: attr.value for key, attr in node.attributes.items()}
    first = ir.node("Conv", [x, u_val], attrs, outputs=[mid], name=name)
    if cand.kind == "conv-spatial":
        _conv_attrs(node, first, axis=0)
        first.attributes["kernel_shape"] = ir.AttrInt64s("kernel_shape", [u_val.shape[2], 1])
    return first


def _conv_attrs(source: ir.Node, target: ir.Node, axis: int) -> None:
    """Keep only spatial ``axis`` (0 = height, 1 = width) of strides, dilations and pads."""
    strides = list(source.attributes.get_ints("strides", [1, 1]))
    dilations = list(source.attributes.get_ints("dilations", [1, 1]))
    pads = list(source.attributes.get_ints("pads", [0, 0, 0, 0]))
    keep = [1, 1]
    keep[axis] = strides[axis]
    dil = [1, 1]
    dil[axis] = dilations[axis]
    pad = [0, 0, 0, 0]
    pad[axis], pad[axis + 2] = pads[axis], pads[axis + 2]
    target.attributes["strides"] = ir.AttrInt64s("strides", keep)
    target.attributes["dilations"] = ir.AttrInt64s("dilations", dil)
    target.attributes["pads"] = ir.AttrInt64s("pads", pad)


def _initializer(graph: ir.Graph, base: str, array: np.ndarray, taken: set[str]) -> ir.Value:
    name = _ir_utils.unique_name(graph, base, taken)
    value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array), name=name))
    value.shape = ir.Shape(array.shape)
    value.dtype = value.const_value.dtype
    graph.register_initializer(value)
    return value


def breakeven_rank(k: int, n: int, min_saving: float) -> int:
    """Largest r with ``r * (K + N) < (1 - min_saving) * K * N`` (0 if none)."""
    bound = (1.0 - min_saving) * k * n / (k + n)
    r = math.ceil(bound) - 1
    return max(0, min(r, min(k, n)))
