"""Codebooks shared by weight clustering and logarithmic quantization: fit, store, pack.

A codebook replaces a weight tensor W by ``centroids[g, indices]``: one small table of float
values per group g (the whole tensor, or one output channel) and an integer index per weight.

Storage in the graph (:func:`write_weight`):
    - baked: W is replaced by the dense float tensor of codebook values (same name, same
      bytes; it compresses well because it holds at most k distinct values per group);
    - packed: the indices are stored as UINT8 (k <= 256) or 4-bit (k <= 16) initializers and
      W is rebuilt in the graph with standard ops that onnxruntime folds into a constant at
      session load (ORT_ENABLE_BASIC and above)::

          per tensor:   W = Reshape(Gather(codebook[k], Cast(indices, int32)), shape)
          per channel:  W = Reshape(GatherElements(codebook[C, k], Cast(indices[C, M], int32), axis=1), shape)

      4-bit indices are a UINT4 tensor + ``Cast`` on opset >= 21 (checked on onnxruntime 1.32).
      Below opset 21 ``Cast`` cannot read UINT4, so two indices share one UINT8 byte and are
      unpacked with Div/Mod/Concat (opset 13 ops) instead of upgrading the whole model's opset.

Gather copies the float centroids bit for bit, so packed and baked models give identical
outputs.
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from typing import Literal

import ml_dtypes
import numpy as np
import onnx_ir as ir

from onnxopt import _ir_utils
from onnxopt.compress.kmeans1d import Init, assign, kmeans1d

__all__ = [
    "Codebook",
    "IndexDType",
    "Stored",
    "fit_kmeans",
    "fit_linear",
    "fit_log",
    "index_dtype_for",
    "write_weight",
]

logger = logging.getLogger(__name__)

IndexDType = Literal["auto", "uint8", "uint4"]


@dataclasses.dataclass(frozen=True)
class Stored:
    """How a weight was written: storage kind, bytes of the tensors that hold it, deflated bytes."""

    kind: str
    nbytes: int
    zipped: int


def _stored(kind: str, tensors: list[ir.TensorProtocol]) -> Stored:
    raw = b"".join(t.tobytes() for t in tensors)
    return Stored(kind, len(raw), len(zlib.compress(raw, 9)))


@dataclasses.dataclass
class Codebook:
    """Centroids per group and an index per weight.

    Attributes:
        centroids: [G, k] float64; G = 1 (per tensor) or the number of channels.
        indices: int64, the weight's shape moved so that the channel axis is first.
        axis: the channel axis of the weight (``None`` per tensor).
        shape: the weight's shape.
        fixed: [G, k] bool, centroids that repair must not move (the zero of pruned weights).

    """

    centroids: np.ndarray
    indices: np.ndarray
    axis: int | None
    shape: tuple[int, ...]
    fixed: np.ndarray

    @property
    def k(self) -> int:
        """Codebook size (entries per group)."""
        return int(self.centroids.shape[1])

    def grouped_indices(self) -> np.ndarray:
        """Return the indices as [G, M] (channel first)."""
        return self.indices.reshape(self.centroids.shape[0], -1)

    def weights(self, dtype: np.dtype = np.float32) -> np.ndarray:
        """Return the dense weight tensor the codebook stands for."""
        table = self.centroids.astype(dtype)
        dense = np.take_along_axis(table, self.grouped_indices(), axis=1)
        moved = dense.reshape(self.indices.shape)
        return moved if self.axis is None else np.moveaxis(moved, 0, self.axis)


def _groups(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, tuple[int, ...]]:
    """[G, M] view of ``w`` (channel first) and the moved shape."""
    moved = w if axis is None else np.moveaxis(w, axis, 0)
    groups = moved.reshape(1, -1) if axis is None else moved.reshape(moved.shape[0], -1)
    return groups, moved.shape


def _build(w: np.ndarray, axis: int | None, rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Codebook:
    k = max(len(c) for c, _, _ in rows)
    cents = np.zeros((len(rows), k))
    fixed = np.zeros((len(rows), k), dtype=bool)
    for g, (c, _, f) in enumerate(rows):
        cents[g, : len(c)] = c
        cents[g, len(c) :] = c[-1]  # pad with a copy; never assigned
        fixed[g, : len(c)] = f
    _, moved_shape = _groups(w, axis)
    idx = np.stack([lab for _, lab, _ in rows]).reshape(moved_shape)
    return Codebook(cents, idx, axis, tuple(w.shape), fixed)


def fit_kmeans(
    w: np.ndarray,
    k: int,
    axis: int | None = None,
    *,
    init: Init = "kmeans++",
    keep_zeros: bool = True,
    seed: int = 0,
) -> Codebook:
    """k-means codebook per tensor or per channel.

    With ``keep_zeros`` and exact zeros in a group (pruned weights), zero is a fixed centroid
    and the other values share the remaining k - 1, so pruning survives clustering.
    """
    groups, _ = _groups(w, axis)
    rows = []
    for vals in groups:
        zero = vals == 0
        if keep_zeros and zero.any() and k >= 2 and not zero.all():
            res = kmeans1d(vals[~zero], k - 1, init=init, seed=seed, return_labels=False)
            cents = np.union1d(res.centroids, [0.0])
            fixed = cents == 0.0
        else:
            cents = kmeans1d(vals, k, init=init, seed=seed, return_labels=False).centroids
            fixed = np.zeros(len(cents), dtype=bool)
        labels = assign(vals, cents)  # exact zeros land on the zero centroid
        rows.append((cents, labels, fixed))
    return _build(w, axis, rows)


def fit_linear(w: np.ndarray, k: int, axis: int | None = None) -> Codebook:
    """Uniform codebook of ``k`` levels per group, as asymmetric integer quantization does it.

    Levels ``(q - z) * s`` for q = 0..k-1 with s = (max - min) / (k - 1) over the range widened
    to include 0, and the zero point z rounded so that 0 is exactly a level (as in onnxruntime's
    uint8/uint4 asymmetric quantization).
    """
    groups, _ = _groups(w, axis)
    rows = []
    for vals in groups:
        lo, hi = min(float(vals.min()), 0.0), max(float(vals.max()), 0.0)
        if hi == lo:
            cents = np.array([0.0])
        else:
            scale = (hi - lo) / (k - 1)
            zero = round(-lo / scale)
            cents = (np.arange(k) - zero) * scale
        rows.append((cents, assign(vals, cents), np.zeros(len(cents), dtype=bool)))
    return _build(w, axis, rows)


def log_levels(bits: int) -> np.ndarray:
    """Return the unit power-of-two codebook for ``bits``: 0 and ±2^-i, i = 0..2^(bits-1)-2 (sorted)."""
    if bits < 2:
        raise ValueError(f"a logarithmic codebook needs at least 2 bits, got {bits}")
    mags = 2.0 ** -np.arange(2 ** (bits - 1) - 1)
    return np.sort(np.concatenate((-mags, [0.0], mags)))


def fit_log(w: np.ndarray, bits: int, axis: int | None = None, *, scales: int = 16) -> Codebook:
    """Power-of-two codebook ``s * {0, ±2^-i}``: one scale s per group, sign and exponent per weight.

    The scale is searched among ``max|w| * 2^(-t)``, t in [0, 1) (``scales`` candidates), for
    the smallest squared error; each weight goes to its nearest level, which for a log grid is
    rounding log2|w| at the geometric midpoints (x' = sign(x) * 2^round(log2|x|)).
    """
    unit = log_levels(bits)
    groups, _ = _groups(w, axis)
    rows = []
    for vals in groups:
        top = float(np.abs(vals).max())
        if top == 0.0:
            rows.append((np.array([0.0]), np.zeros(vals.size, dtype=np.int64), np.array([True])))
            continue
        best = None
        for t in np.arange(scales) / scales:
            cents = unit * top * 2.0**-t
            labels = assign(vals, cents)
            err = float(np.sum((vals - cents[labels]) ** 2))
            if best is None or err < best[0]:
                best = (err, cents, labels)
        _, cents, labels = best
        rows.append((cents, labels, cents == 0.0))
    return _build(w, axis, rows)


def index_dtype_for(k: int, requested: IndexDType) -> Literal["uint8", "uint4"]:
    """Choose the index storage for a codebook of size ``k``.

    Raises:
        ValueError: uint4 requested for k > 16, or k > 256.

    """
    if k > 256:
        raise ValueError(f"codebooks larger than 256 entries cannot be packed, got k={k}")
    if requested == "uint4" and k > 16:
        raise ValueError(f"index_dtype=uint4 holds at most 16 clusters, got k={k}")
    if requested == "auto":
        return "uint4" if k <= 16 else "uint8"
    return requested


def write_weight(
    graph: ir.Graph,
    weight: ir.Value,
    book: Codebook,
    *,
    pack: bool,
    index_dtype: IndexDType,
    opset: int,
    pass_name: str,
    shared: dict[str, ir.Value] | None = None,
) -> Stored:
    """Put the codebook's weights into ``graph`` in place of ``weight``; say how it is stored.

    ``shared`` caches the small constants (unpacking divisors, shapes) so that several packed
    weights of one graph use one copy of each.
    """
    shared = {} if shared is None else shared
    dtype = weight.const_value.dtype.numpy()
    if not pack:
        weight.const_value = ir.tensor(book.weights(dtype), name=weight.name)
        return _stored("baked", [weight.const_value])
    before = set(graph.initializers)
    kind = index_dtype_for(book.k, index_dtype)
    taken = _names(graph)
    base = weight.name
    grouped = book.grouped_indices()
    per_tensor = book.axis is None
    idx = grouped.reshape(-1) if per_tensor else grouped
    nodes: list[ir.Node] = []
    if kind == "uint8":
        stored = _init(graph, taken, f"{base}.idx", ir.tensor(idx.astype(np.uint8)))
        flat = _node(nodes, "Cast", [stored], to=ir.DataType.INT32)
    elif opset >= 21:
        t = ir.Tensor(idx.astype(ml_dtypes.uint4), dtype=ir.DataType.UINT4)
        stored = _init(graph, taken, f"{base}.idx4", t)
        flat = _node(nodes, "Cast", [stored], to=ir.DataType.INT32)
        kind = "uint4"
    else:
        flat = _nibble_unpack(graph, taken, nodes, base, idx, shared)
        kind = "uint4-in-uint8"
    table = book.centroids.astype(dtype)
    cb = _init(graph, taken, f"{base}.codebook", ir.tensor(table.reshape(-1) if per_tensor else table))
    if per_tensor:
        gathered = _node(nodes, "Gather", [cb, flat], axis=0)
    else:
        gathered = _node(nodes, "GatherElements", [cb, flat], axis=1)
    moved_shape = book.indices.shape
    shape = _init(graph, taken, f"{base}.shape", ir.tensor(np.array(moved_shape, dtype=np.int64)))
    out = _node(nodes, "Reshape", [gathered, shape])
    if book.axis is not None and book.axis != 0:
        perm = list(range(1, len(moved_shape)))
        perm.insert(book.axis, 0)
        out = _node(nodes, "Transpose", [out], perm=perm)
    out.name = _ir_utils.unique_name(graph, f"{base}.unpacked", taken)
    out.dtype = weight.dtype
    out.shape = ir.Shape(book.shape)
    for node in nodes:
        _ir_utils.tag(node, pass_name)
    first = next(iter(graph))
    graph.insert_before(first, nodes)
    ir.convenience.replace_all_uses_with(weight, out)
    if weight.name in graph.initializers and not weight.uses() and not weight.is_graph_output():
        graph.initializers.pop(weight.name)
    created = [v.const_value for n, v in graph.initializers.items() if n not in before]
    return _stored(kind, created)


def _names(graph: ir.Graph) -> set[str]:
    names = {v.name for v in graph.inputs if v.name} | set(graph.initializers)
    for node in graph:
        names |= {v.name for v in node.outputs if v.name}
    return names


def _init(graph: ir.Graph, taken: set[str], name: str, tensor: ir.TensorProtocol) -> ir.Value:
    name = _ir_utils.unique_name(graph, name, taken)
    tensor.name = name
    value = ir.Value(name=name, const_value=tensor, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype))
    graph.register_initializer(value)
    return value


def _node(nodes: list[ir.Node], op: str, inputs: list[ir.Value], **attrs: object) -> ir.Value:
    node = ir.node(op, inputs, attributes=attrs)
    nodes.append(node)
    return node.outputs[0]


def _shared(graph: ir.Graph, taken: set[str], shared: dict[str, ir.Value], name: str, array: np.ndarray) -> ir.Value:
    key = f"{array.dtype}:{array.shape}:{array.tobytes().hex()}"
    value = shared.get(key)
    if value is None or value.graph is not graph:
        value = shared[key] = _init(graph, taken, name, ir.tensor(array))
    return value


def _nibble_unpack(
    graph: ir.Graph, taken: set[str], nodes: list[ir.Node], base: str, idx: np.ndarray, shared: dict[str, ir.Value]
) -> ir.Value:
    """Two 4-bit indices per UINT8 byte (high nibble first), unpacked with opset-13 ops.

    The bytes are stored as [P, 1], so Div/Mod give the high/low nibbles as columns and one
    Concat interleaves them into [P, 2] in the original order; Gather takes any index shape,
    so a per-tensor codebook of an even number of weights needs no reshaping of the indices.
    """
    flat = idx.reshape(-1).astype(np.uint8)
    padded = np.concatenate((flat, np.zeros(flat.size % 2, dtype=np.uint8)))
    packed = ((padded[0::2] << 4) | padded[1::2]).reshape(-1, 1)
    stored = _init(graph, taken, f"{base}.idx4x2", ir.tensor(packed))
    sixteen = _shared(graph, taken, shared, "onnxopt.sixteen", np.array(16, dtype=np.int32))
    as_int = _node(nodes, "Cast", [stored], to=ir.DataType.INT32)
    high = _node(nodes, "Div", [as_int, sixteen])
    low = _node(nodes, "Mod", [as_int, sixteen])
    pairs = _node(nodes, "Concat", [high, low], axis=1)
    if flat.size % 2:
        line = _shared(graph, taken, shared, "onnxopt.flat", np.array([-1], dtype=np.int64))
        starts = _shared(graph, taken, shared, "onnxopt.zero", np.array([0], dtype=np.int64))
        ends = _init(graph, taken, f"{base}.end", ir.tensor(np.array([flat.size], dtype=np.int64)))
        pairs = _node(nodes, "Slice", [_node(nodes, "Reshape", [pairs, line]), starts, ends])
    if idx.ndim == 1:
        return pairs  # feeds Gather; the final Reshape restores the weight's shape
    grid = _shared(graph, taken, shared, f"{base}.grid", np.array(idx.shape, dtype=np.int64))
    return _node(nodes, "Reshape", [pairs, grid])
