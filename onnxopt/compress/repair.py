"""Data-aware repair of compressed linear layers: least squares on calibration activations.

Every supported layer is seen as ``y = X @ Wm (+ b)`` with ``Wm`` of shape [K, N]: Gemm (either
transB), MatMul with a 2-D weight, and group-1 2-D Conv on im2col patches. The original model
is the teacher: for a replacement ``V`` of ``Wm`` the layer's output error on the calibration
inputs is ``tr((Wm - V)^T H (Wm - V))`` with ``H = E[x x^T]``, so one streaming pass that
accumulates ``H`` and the input mean ``mu`` (:func:`collect_stats`) is enough to

    - refit codebook centroids (:func:`refit_codebook`): V is linear in the centroids, and the
      normal equations have k unknowns per tensor or per channel (one unknown, the scale, for a
      power-of-two codebook);
    - refit the kept weights of a pruned layer (:func:`refit_rows`): least squares on the kept
      input rows with an intercept, which absorbs the mean of the removed inputs;
    - correct the bias for the mean output shift ``mu @ (Wm - V)`` (:func:`bias_shift`).

With a ``teacher`` (sequential repair), the statistics pair each layer's input in the model
being compressed (x, which carries the error of the layers compressed before it) with the
original model's input (t), and the least-squares targets become ``t @ Wm``: each layer then
also corrects what the layers before it got wrong. :class:`SequentialStats` bounds the number
of such calibration passes by fitting consecutive groups of layers from one pass.

Activations are never held for more than one feed; memory is O(K^2) per layer.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence

import numpy as np
import onnx_ir as ir
import tqdm

from onnxopt import _ir_utils
from onnxopt.compress.codebook import Codebook
from onnxopt.runtime import sessions as runtime

__all__ = [
    "Layer",
    "LayerStats",
    "SequentialStats",
    "add_bias",
    "as_layer",
    "bias_shift",
    "collect_stats",
    "output_error",
    "refit_codebook",
    "refit_rows",
    "refit_support",
]

logger = logging.getLogger(__name__)
# Columns of a codebook refit processed at once (bounds the one-hot tensor to K * 256 * k).
_CHUNK = 256
# Rows (samples x output positions) per feed kept for the moments: a large image gives a Conv
# hundreds of thousands of patches; a seeded random subset estimates E[x x^T] at a fraction of
# the O(rows * K^2) cost.
MAX_ROWS_PER_FEED = 16384


@dataclasses.dataclass(frozen=True)
class Layer:
    """A linear node with a constant weight, in the ``y = X @ Wm`` view."""

    node: ir.Node
    weight: ir.Value
    kind: str  # gemm | gemm_t | matmul | conv
    out_axis: int  # axis of the weight that indexes output features N

    @property
    def in_features(self) -> int:
        """K, the number of rows of Wm."""
        shape = self.weight.const_value.shape.numpy()
        if self.kind == "conv":
            return int(np.prod(shape[1:]))
        return int(shape[1] if self.kind == "gemm_t" else shape[0])

    def matrix(self, w: np.ndarray) -> np.ndarray:
        """Return the weight (or any array of its shape) as Wm [K, N]."""
        if self.kind == "conv":
            return w.reshape(w.shape[0], -1).T
        return w.T if self.kind == "gemm_t" else w

    def unmatrix(self, wm: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`matrix`."""
        shape = self.weight.const_value.shape.numpy()
        if self.kind == "conv":
            return wm.T.reshape(shape)
        return wm.T if self.kind == "gemm_t" else wm


def as_layer(node: ir.Node) -> Layer | str:
    """Return the layer view of ``node``, or the reason it has none."""
    weight = _ir_utils.constant_input(node, 1)
    if weight is None:
        return "weight is not a constant initializer"
    rank = len(weight.const_value.shape)
    if node.op_type == "Gemm":
        if node.attributes.get_int("transA", 0):
            return "Gemm with transA=1"
        t = node.attributes.get_int("transB", 0)
        return Layer(node, weight, "gemm_t" if t else "gemm", 0 if t else 1)
    if node.op_type == "MatMul":
        if rank != 2:
            return f"MatMul weight of rank {rank}"
        return Layer(node, weight, "matmul", 1)
    if node.op_type == "Conv":
        if rank != 4:
            return f"Conv of rank {rank} (only 2-D Conv)"
        if node.attributes.get_int("group", 1) != 1:
            return "grouped Conv"
        if node.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", ""):
            return "Conv with auto_pad"
        return Layer(node, weight, "conv", 0)
    return f"{node.op_type} is not a linear layer"


@dataclasses.dataclass
class LayerStats:
    """Streaming second moments of a layer's input rows (float64).

    ``x`` is the input the layer sees in the model being repaired (the student) and ``t`` the
    input of the same layer in the original model (the teacher); without a teacher they are
    the same rows and only ``xx`` is kept.
    """

    xx: np.ndarray
    x_sum: np.ndarray
    xt: np.ndarray | None = None
    tt: np.ndarray | None = None
    t_sum: np.ndarray | None = None
    count: int = 0

    @property
    def h(self) -> np.ndarray:
        """E[x x^T] (student)."""
        return self.xx / max(self.count, 1)

    @property
    def h_st(self) -> np.ndarray:
        """E[x t^T] (student by teacher)."""
        return (self.xt if self.xt is not None else self.xx) / max(self.count, 1)

    @property
    def h_tt(self) -> np.ndarray:
        """E[t t^T] (teacher)."""
        return (self.tt if self.tt is not None else self.xx) / max(self.count, 1)

    @property
    def mu(self) -> np.ndarray:
        """E[x]."""
        return self.x_sum / max(self.count, 1)

    @property
    def mu_t(self) -> np.ndarray:
        """E[t]."""
        return (self.t_sum if self.t_sum is not None else self.x_sum) / max(self.count, 1)

    def add(self, rows: np.ndarray, teacher_rows: np.ndarray | None = None) -> None:
        """Accumulate a [n, K] block of input rows (and the teacher's rows for the same samples)."""
        r = rows.astype(np.float64, copy=False)
        self.xx += r.T @ r
        self.x_sum += r.sum(axis=0)
        self.count += r.shape[0]
        if teacher_rows is not None:
            t = teacher_rows.astype(np.float64, copy=False)
            k = r.shape[1]
            if self.xt is None:
                self.xt, self.tt, self.t_sum = np.zeros((k, t.shape[1])), np.zeros((t.shape[1],) * 2), np.zeros(t.shape[1])
            self.xt += r.T @ t
            self.tt += t.T @ t
            self.t_sum += t.sum(axis=0)


def _rows(layer: Layer, x: np.ndarray, limit: int) -> np.ndarray:
    """Return the layer input ``x`` as rows of X (im2col patches for Conv), at most ``limit``.

    Beyond ``limit`` rows a seeded random subset is taken, before the patches are copied.
    """
    if layer.kind != "conv":
        rows = x.reshape(-1, x.shape[-1])
        return rows[_subset(rows.shape[0], limit)] if rows.shape[0] > limit else rows
    kh, kw = layer.weight.const_value.shape.numpy()[2:]
    a = layer.node.attributes
    pads = a.get_ints("pads", [0, 0, 0, 0])
    sh, sw = a.get_ints("strides", [1, 1])
    dh, dw = a.get_ints("dilations", [1, 1])
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    win = np.lib.stride_tricks.sliding_window_view(xp, (dh * (kh - 1) + 1, dw * (kw - 1) + 1), axis=(2, 3))
    win = win[:, :, ::sh, ::sw, ::dh, ::dw]  # [B, C, Ho, Wo, kh, kw], still a view
    b, _, ho, wo = win.shape[:4]
    if b * ho * wo > limit:
        flat = _subset(b * ho * wo, limit)
        bi, rest = np.divmod(flat, ho * wo)
        hi, wi = np.divmod(rest, wo)
        return win[bi, :, hi, wi].reshape(flat.size, -1)  # [n, C, kh, kw] -> [n, C*kh*kw]
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(-1, x.shape[1] * kh * kw)


def _subset(n: int, limit: int) -> np.ndarray:
    # Seeded random rows: a fixed stride over (batch, height, width) can alias with the image grid.
    return np.sort(np.random.default_rng(n).choice(n, limit, replace=False))


def collect_stats(
    model: ir.Model,
    layers: Sequence[Layer],
    feeds: Iterable[dict[str, np.ndarray]],
    *,
    quiet: bool = False,
    teacher: ir.Model | None = None,
) -> list[LayerStats]:
    """One onnxruntime pass over ``feeds``: input statistics of every layer (in order).

    With ``teacher`` (the original model, whose values have the same names), the same feeds run
    through it too and the student-by-teacher moments are accumulated as well.
    """
    names = [lay.node.inputs[0].name for lay in layers]
    stats = [LayerStats(np.zeros((lay.in_features,) * 2), np.zeros(lay.in_features)) for lay in layers]
    total = len(feeds) if hasattr(feeds, "__len__") else None
    captured = runtime.capture(model, feeds, names)
    if teacher is not None:
        paired = zip(captured, runtime.capture(teacher, feeds, names), strict=True)
    else:
        paired = ((c, None) for c in captured)
    for outs, t_outs in tqdm.tqdm(paired, total=total, desc="repair stats", unit="feed", disable=quiet, leave=False):
        for lay, st, name in zip(layers, stats, names, strict=True):
            rows = _rows(lay, outs[name], MAX_ROWS_PER_FEED)
            t_rows = _rows(lay, t_outs[name], MAX_ROWS_PER_FEED) if t_outs is not None else None
            st.add(rows, t_rows)
    return stats


class SequentialStats:
    """Statistics for layers repaired one after another, in at most ``passes`` calibration passes.

    The layers (in the order they will be repaired) are cut into ``passes`` consecutive groups of
    near-equal size. The first time a layer of a group is asked for, one pass over the feeds
    (student and teacher) collects the whole group on the model as compressed so far: a layer
    sees the error of every earlier group, not that of the earlier layers in its own group.
    ``passes=0`` gives one pass per layer (the exact sequential fit), which on a 48-Conv network
    with page-sized feeds is 48 passes of the model and of its teacher per step.
    """

    def __init__(
        self,
        model: ir.Model,
        layers: Sequence[Layer],
        feeds: Sequence[dict[str, np.ndarray]],
        *,
        passes: int,
        quiet: bool = False,
    ) -> None:
        if passes < 0:
            raise ValueError(f"passes must be >= 0, got {passes}")
        self._model, self._feeds, self._quiet = model, feeds, quiet
        self._teacher = model.clone()
        n = len(layers)
        groups = n if passes == 0 else min(passes, n)
        bounds = np.linspace(0, n, groups + 1).round().astype(int) if n else np.zeros(1, dtype=int)
        self._groups = [list(layers[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
        self._group_of = {id(lay.node): i for i, group in enumerate(self._groups) for lay in group}
        self._stats: dict[int, LayerStats] = {}
        self.passes_run = 0

    def __call__(self, layer: Layer) -> LayerStats:
        """The statistics of ``layer``, collecting its group's now if they are not yet collected."""
        key = id(layer.node)
        if key not in self._stats:
            group = self._groups[self._group_of[key]]
            found = collect_stats(self._model, group, self._feeds, quiet=self._quiet, teacher=self._teacher)
            self._stats.update((id(lay.node), st) for lay, st in zip(group, found, strict=True))
            self.passes_run += 1
        return self._stats.pop(key)


def output_error(stats: LayerStats, wo: np.ndarray, wn: np.ndarray) -> float:
    """Relative output error E||t @ wo - x @ wn||^2 / E||t @ wo||^2 (t: teacher input, x: student)."""
    ref = float(np.einsum("kn,kn->", wo, stats.h_tt @ wo))
    cross = float(np.einsum("kn,kn->", wn, stats.h_st @ wo))
    own = float(np.einsum("kn,kn->", wn, stats.h @ wn))
    return max(ref - 2.0 * cross + own, 0.0) / max(ref, 1e-30)


def bias_shift(stats: LayerStats, wo: np.ndarray, wn: np.ndarray) -> np.ndarray:
    """Per output feature, the mean output lost by the replacement: E[t] @ wo - E[x] @ wn."""
    return stats.mu_t @ wo - stats.mu @ wn


def refit_codebook(layer: Layer, book: Codebook, stats: LayerStats, wo: np.ndarray, *, scale_only: bool = False) -> None:
    """Re-fit ``book``'s centroids in place to minimise the layer's output error.

    ``scale_only`` keeps the codebook's shape and fits one scale per group (power-of-two
    codebooks stay powers of two). Fixed centroids (zero of pruned weights) never move.
    """
    if book.axis is not None and book.axis != layer.out_axis:
        raise ValueError("per-channel codebook must be along the layer's output axis")
    h = stats.h
    wm = layer.matrix(wo).astype(np.float64)
    idx = layer.matrix(book.indices.reshape(book.shape) if book.axis is None else np.moveaxis(book.indices, 0, book.axis))
    k = book.k
    hw = stats.h_st @ wm
    n_cols = wm.shape[1]
    per_channel = book.axis is not None
    a_sum = np.zeros((k, k))
    b_sum = np.zeros(k)
    for lo in range(0, n_cols, _CHUNK):
        hi = min(lo + _CHUNK, n_cols)
        onehot = (idx[:, lo:hi, None] == np.arange(k)).astype(np.float64)  # [K, n, k]
        ho = (h @ onehot.reshape(h.shape[0], -1)).reshape(onehot.shape)
        a_n = np.einsum("kni,knj->nij", onehot, ho)
        b_n = np.einsum("kni,kn->ni", onehot, hw[:, lo:hi])
        if per_channel:
            for j, n in enumerate(range(lo, hi)):
                book.centroids[n] = _solve(a_n[j], b_n[j], book.centroids[n], book.fixed[n], scale_only)
        else:
            a_sum += a_n.sum(axis=0)
            b_sum += b_n.sum(axis=0)
    if not per_channel:
        book.centroids[0] = _solve(a_sum, b_sum, book.centroids[0], book.fixed[0], scale_only)


def _solve(a: np.ndarray, b: np.ndarray, c0: np.ndarray, fixed: np.ndarray, scale_only: bool) -> np.ndarray:
    """Minimise c^T A c - 2 b^T c over free entries (ridge towards c0 keeps empty ones put)."""
    if scale_only:
        den = float(c0 @ a @ c0)
        return c0 * (float(c0 @ b) / den) if den > 0 else c0
    free = ~fixed
    if not free.any():
        return c0
    af = a[np.ix_(free, free)]
    rhs = b[free] - a[np.ix_(free, fixed)] @ c0[fixed]
    lam = 1e-6 * float(np.mean(np.diag(af))) + 1e-12
    sol = np.linalg.solve(af + lam * np.eye(af.shape[0]), rhs + lam * c0[free])
    out = c0.copy()
    out[free] = sol
    return out


def refit_rows(stats: LayerStats, wo: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares weights on the kept input rows ``keep`` (bool [K]) plus a bias change.

    Minimises E||x @ wo - (x[keep] @ v + d)||^2; returns (v [sum(keep), N], d [N]).
    """
    h, mu = stats.h, stats.mu
    idx = np.flatnonzero(keep)
    aug = np.empty((idx.size + 1, idx.size + 1))
    aug[:-1, :-1] = h[np.ix_(idx, idx)]
    aug[:-1, -1] = mu[idx]
    aug[-1, :-1] = mu[idx]
    aug[-1, -1] = 1.0
    wm = wo.astype(np.float64)
    rhs = np.vstack((stats.h_st[idx] @ wm, (stats.mu_t @ wm)[None, :]))
    lam = 1e-6 * float(np.mean(np.diag(aug))) + 1e-12
    sol = np.linalg.solve(aug + lam * np.eye(aug.shape[0]), rhs)
    return sol[:-1], sol[-1]


def refit_support(stats: LayerStats, wo: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per output column n, least-squares weights on the kept rows ``mask[:, n]`` (zeros elsewhere).

    Minimises E||x @ wo[:, n] - x[S] @ v||^2 for each column; the caller corrects the bias for
    the remaining mean shift (:func:`bias_shift`).
    """
    h = stats.h
    wm = wo.astype(np.float64)
    hw = stats.h_st @ wm
    out = np.zeros_like(wm)
    for n in range(wm.shape[1]):
        s = np.flatnonzero(mask[:, n])
        if s.size == 0:
            continue
        hs = h[np.ix_(s, s)]
        lam = 1e-6 * float(np.mean(np.diag(hs))) + 1e-12
        out[s, n] = np.linalg.solve(hs + lam * np.eye(s.size), hw[s, n] + lam * wm[s, n])
    return out


def add_bias(graph: ir.Graph, layer: Layer, delta: np.ndarray, pass_name: str) -> str:
    """Add ``delta`` (in units of ``X @ Wm``) to the layer's bias, creating one for Conv/Gemm.

    Returns what happened, for the report ("corrected", "added", or why not).
    """
    node = layer.node
    if layer.kind == "matmul":
        return "not corrected: MatMul has no bias input"
    if layer.kind.startswith("gemm"):
        beta = node.attributes.get_float("beta", 1.0)
        if beta == 0.0:
            return "not corrected: Gemm beta=0"
        delta = delta * node.attributes.get_float("alpha", 1.0) / beta
    dtype = layer.weight.const_value.dtype.numpy()
    bias = _ir_utils.constant_input(node, 2)
    if bias is None and len(node.inputs) > 2 and node.inputs[2] is not None:
        return "not corrected: bias is not a constant initializer"
    if bias is not None:
        old = bias.const_value.numpy()
        if old.size not in (1, delta.size) or len(bias.uses()) > 1:
            return "not corrected: bias is shared or not per output feature"
        new = np.broadcast_to(old.reshape(-1), delta.shape) + delta
        bias.const_value = ir.tensor(new.astype(dtype), name=bias.name)
        bias.shape = ir.Shape(new.shape)
        return "corrected"
    name = _ir_utils.unique_name(graph, f"{layer.weight.name}.bias")
    value = ir.Value(name=name, const_value=ir.tensor(delta.astype(dtype), name=name))
    value.shape = ir.Shape(delta.shape)
    value.dtype = value.const_value.dtype
    graph.register_initializer(value)
    node.resize_inputs(3)
    node.replace_input_with(2, value)
    _ir_utils.tag(node, pass_name)
    return "added"
