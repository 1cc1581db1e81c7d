"""SmoothQuant / cross-layer equalisation: even out activation channels before INT8.

Xiao et al., "SmoothQuant" (ICML 2023). Transformers' LayerNorm outputs carry a few channels
tens of times larger than the rest; one per-tensor activation scale then spends its 256 levels
on them and rounds every other channel coarsely. For ``Y = X W`` and a per-input-channel scale
``s``, ``Y = (X / s) (diag(s) W)`` exactly; with ``s_j = max|X_j|^a / max|W_j|^(1-a)`` the
activation's channels are evened out and the weights, quantized per output channel, take the
difficulty they handle better. ``1 / s`` is folded into the producer where that is exact and
free: a LayerNormalization or SkipLayerNormalization (scale and bias), or a ``Mul(x, gamma) ->
Add(beta)`` pair with per-channel constants (a LayerNorm written out in primitives). Where the
normalized tensor also feeds something else (a post-LN residual Add), an explicit ``Mul(X, 1/s)``
is inserted in front of the MatMul/Gemm consumers; it stays float (it reads the float tensor).

The same algebra between two convolutions is cross-layer equalisation (Nagel et al., "Data-Free
Quantization", 2019), here driven by measured activation ranges: a Conv (optionally through a
Relu, which commutes with positive scales) whose output only feeds Convs gets ``1 / s`` folded
into its weights and bias per output channel, and the readers' weights take ``s`` per input
channel (any group count). MobileNet-style depthwise -> pointwise pairs are where it matters: a
depthwise output's channels differ in range by orders of magnitude, and one per-tensor scale
cannot hold them all.

Activations that are not positively homogeneous (HardSwish written out as ``x * clip(x + 3, 0,
6) / 6``, as in MobileNetV3 / PP-LCNet / PicoDet) break that chain; two exact rewrites take over:

- a Conv output read only by such an activation (elementwise parts of that tensor alone) gets
  ``1 / s`` folded into the Conv's weights and bias per output channel, and a float
  ``Mul(X / s, s)`` (tagged ``RESCALED_KEY``) gives the activation the original values; the
  Conv's integer output is then quantized with its channels evened out, and the activation runs
  in float (``rules`` keep the Mul and its readers float);
- an activation output read only by Convs, made by a ``Mul``/``Div`` by a constant (the ``/ 6``),
  gets ``1 / s`` folded into that constant, which becomes one value per channel.

Both come with ``rescale_conv_outputs`` (the quantizer's ``auto`` measures whether they pay), and
so does evening out every depthwise Conv input whatever its spread: the first makes the activation
float; together they won on PicoDet (worst cosine 0.68 -> 0.97) and lost on PP-OCR det and rec
(the fold and the depthwise evening alone: rec lines decoded as FP32 65.6 % -> 46.9 %). Both are free for the weights where each weight's rounding is unchanged: a Conv's own output
channels (weights quantized per output channel) and depthwise readers (one input channel per
output channel). Such groups take ``s = max |X|`` per channel (alpha 1) whatever their spread;
the rest keep ``alpha`` and ``min_ratio``. On the PicoDet CDLA layout detector the per-tensor
activation scales of its depthwise blocks were what lost the fidelity: worst-output cosine 0.73
-> 0.97 (docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxopt import _ir_utils
from onnxopt.errors import DataError
from onnxopt.quant.channel_stats import channel_stats
from onnxopt.runtime import sessions as runtime

__all__ = ["ALPHA_GRID", "RESCALED_KEY", "Reader", "SmoothGroup", "SmoothResult", "find_groups", "has_rescalable_convs", "smooth"]

# metadata_props key on the float Mul that gives a Conv's evened-out output its channel scales back
# (``rules`` keep it and whatever reads its output float).
RESCALED_KEY = "onnxopt.rescaled"
# Elementwise ops that may make up an activation function written out in primitives.
_ACTIVATION_PARTS = frozenset({"Add", "Sub", "Mul", "Div", "Clip", "Relu", "Sigmoid", "HardSigmoid", "Tanh", "Min", "Max"})

_NORMS = {("", "LayerNormalization"), ("com.microsoft", "SkipLayerNormalization")}
_SCALE_LIMIT = 1e4  # s is clipped to [1/limit, limit]: dead channels must not blow weights up


@dataclasses.dataclass(frozen=True)
class Reader:
    """A node reading X through a constant weight: input ``index``; how X's channels run over it.

    ``kind`` is "rows" (MatMul/Gemm weight [C, N]), "cols" (Gemm transB weight [N, C]) or "conv"
    (Conv weight [O, C / group, ...]).
    """

    node: ir.Node
    index: int
    kind: str
    group: int = 1

    def in_absmax(self) -> np.ndarray:
        """Max |w| per input channel of X."""
        w = np.abs(_ir_utils.constant_array(self.node.inputs[self.index]))
        if self.kind == "rows":
            return w.max(axis=1)
        if self.kind == "cols":
            return w.max(axis=0)
        g = self.group
        return w.reshape(g, w.shape[0] // g, w.shape[1], -1).max(axis=(1, 3)).reshape(-1)

    def depthwise(self) -> bool:
        """Whether this is a Conv whose every output channel reads one input channel (group = channels)."""
        if self.kind != "conv":
            return False
        shape = self.node.inputs[self.index].const_value.shape
        return int(shape[1]) == 1 and self.group > 1 and int(shape[0]) % self.group == 0

    def scaled(self, s: np.ndarray) -> np.ndarray:
        """Return the weight with input channel j multiplied by ``s[j]``."""
        w = _ir_utils.constant_array(self.node.inputs[self.index])
        if self.kind == "rows":
            return w * s[:, None]
        if self.kind == "cols":
            return w * s[None, :]
        g = self.group
        return (w.reshape(g, w.shape[0] // g, w.shape[1], -1) * s.reshape(g, 1, -1, 1)).reshape(w.shape)


@dataclasses.dataclass
class SmoothGroup:
    """One activation X and the nodes reading it through constant weights.

    ``fold`` holds the producer's constants to divide by ``s`` (node, input index, axis of the
    channels); empty means that an explicit Mul is needed (X has other readers, or is a graph
    output). ``channel_axis`` is X's channel axis: -1 after a LayerNorm, 1 after a Conv;
    ``rank`` is X's rank where it is known (Conv groups).
    """

    value: ir.Value
    channels: int
    readers: list[Reader]
    fold: list[tuple[ir.Node, int, int]]
    channel_axis: int = -1
    rank: int = 0
    restore: bool = False  # no weight reader: a float Mul(X / s, s) feeds X's readers (a pre-activation)


@dataclasses.dataclass
class SmoothResult:
    """What :func:`smooth` did: one record per group, inserted (float) Mul nodes, the scales applied."""

    records: list[dict] = dataclasses.field(default_factory=list)
    inserted: list[str] = dataclasses.field(default_factory=list)
    rescaled: list[str] = dataclasses.field(default_factory=list)  # float Muls after a Conv (``_restore``)
    skipped: list[str] = dataclasses.field(default_factory=list)
    scales: dict[str, tuple[float, ...]] = dataclasses.field(default_factory=dict)


def _reader(node: ir.Node, x: ir.Value) -> Reader | None:
    """How ``node`` reads X through a constant float weight, or None if it does not."""
    if node.domain not in ("", "ai.onnx") or len(node.inputs) < 2 or node.inputs[0] is not x:
        return None
    w = _ir_utils.constant_input(node, 1)
    if w is None or w.const_value.dtype != ir.DataType.FLOAT:
        return None
    rank = len(w.const_value.shape)
    if node.op_type == "MatMul" and rank == 2:
        return Reader(node, 1, "rows")
    if node.op_type == "Gemm" and rank == 2 and not node.attributes.get_int("transA", 0):
        return Reader(node, 1, "cols" if node.attributes.get_int("transB", 0) else "rows")
    if node.op_type == "Conv" and rank >= 3:
        return Reader(node, 1, "conv", node.attributes.get_int("group", 1))
    return None


def _channels(reader: Reader) -> int:
    shape = reader.node.inputs[reader.index].const_value.shape
    if reader.kind == "conv":
        return int(shape[1]) * reader.group
    return int(shape[0] if reader.kind == "rows" else shape[1])


def _per_channel(node: ir.Node, index: int, channels: int) -> bool:
    """Whether input ``index`` of ``node`` is a float constant of ``channels`` values along the last axis."""
    c = _ir_utils.constant_input(node, index)
    if c is None or c.const_value.dtype != ir.DataType.FLOAT:
        return False
    shape = tuple(c.const_value.shape)
    return bool(shape) and shape[-1] == channels and int(np.prod(shape)) == channels


def _foldable(x: ir.Value, channels: int) -> list[tuple[ir.Node, int]] | None:
    """Return the producer's constants that scale X per channel (exactly); None if X is not a LayerNorm output."""
    node = x.producer()
    if node is None:
        return None
    if (node.domain or "", node.op_type) in _NORMS and node.outputs[0] is x:
        first = 1 if node.op_type == "LayerNormalization" else 2  # Skip...: input, skip, gamma, beta
        if node.op_type == "LayerNormalization" and node.attributes.get_int("axis", -1) != -1:
            return None
        found = [(node, i, -1) for i in (first, first + 1) if i < len(node.inputs) and node.inputs[i] is not None]
        return found if found and all(_per_channel(n, i, channels) for n, i, _ in found) else None
    if node.op_type != "Add" or node.domain not in ("", "ai.onnx"):
        return None
    for b in (0, 1):
        mul = node.inputs[1 - b].producer() if node.inputs[1 - b] is not None else None
        if mul is None or mul.op_type != "Mul" or len(node.inputs[1 - b].uses()) != 1:
            continue
        if not _per_channel(node, b, channels):
            continue
        for g in (0, 1):
            if _per_channel(mul, g, channels):
                return [(mul, g, -1), (node, b, -1)]
    return None


def _conv_producer(x: ir.Value, channels: int) -> tuple[list[tuple[ir.Node, int, int]], int] | None:
    """Find the Conv (possibly through a Relu read by nothing else) that makes X: its weight and bias, X's rank."""
    node = x.producer()
    if node is not None and node.op_type == "Relu" and node.domain in ("", "ai.onnx"):
        inner = node.inputs[0]
        if inner is None or len(inner.uses()) != 1 or inner.is_graph_output():
            return None
        node = inner.producer()
    if node is None or node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
        return None
    w = _ir_utils.constant_input(node, 1)
    if w is None or w.const_value.dtype != ir.DataType.FLOAT or w.const_value.shape[0] != channels:
        return None
    fold = [(node, 1, 0)]
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        if not _per_channel(node, 2, channels):
            return None
        fold.append((node, 2, 0))
    return fold, len(w.const_value.shape)


def _scale_producer(x: ir.Value, channels: int, rank: int) -> list[tuple[ir.Node, int, int]] | None:
    """Find the ``Mul``/``Div`` by a constant (one value, or one per channel along axis 1) that makes X.

    Activations that are not positively homogeneous (HardSwish written out as ``x * clip(x + 3,
    0, 6) / 6``, SiLU, GELU) end in such a node; ``1 / s`` folds exactly into its constant, which
    becomes one value per channel.
    """
    node = x.producer()
    if node is None or node.op_type not in ("Mul", "Div") or node.domain not in ("", "ai.onnx"):
        return None
    for i in ((1,) if node.op_type == "Div" else (1, 0)):
        c = _ir_utils.constant_input(node, i)
        if c is None or c.const_value.dtype != ir.DataType.FLOAT:
            continue
        shape = [int(d) for d in c.const_value.shape]
        if len(shape) > rank or int(np.prod(shape)) not in (1, channels):
            return None
        if int(np.prod(shape)) == channels and channels > 1:  # must run along X's axis 1
            padded = [1] * (rank - len(shape)) + shape
            if padded[1] != channels:
                return None
        return [(node, i, 1)]
    return None


def _activation_readers(x: ir.Value) -> bool:
    """Whether every reader of X is part of an elementwise activation of X alone (HardSwish, SiLU written out).

    Each reader is one of ``_ACTIVATION_PARTS`` whose other inputs are constants or computed from X
    by such parts (``x * clip(x + 3, 0, 6)``): a residual Add of another tensor does not count.
    """
    uses = x.uses()
    if not uses or x.is_graph_output():
        return False

    def from_x(v: ir.Value | None, depth: int) -> bool:
        if v is None or v is x or v.const_value is not None:
            return True
        node = v.producer()
        if node is not None and node.op_type == "Constant":
            return True
        if node is None or depth == 0 or node.op_type not in _ACTIVATION_PARTS or node.domain not in ("", "ai.onnx"):
            return False
        return all(from_x(u, depth - 1) for u in node.inputs)

    for u in uses:
        node = u.node
        # A lone Relu/Clip is absorbed into the Conv's quantized output (and Relu passes the
        # Conv -> Conv equalisation): only a reader that keeps X's spread makes a candidate.
        if node.op_type not in _ACTIVATION_PARTS - {"Relu", "Clip"} or node.domain not in ("", "ai.onnx"):
            return False
        if not all(from_x(v, 3) for v in node.inputs):
            return False
    return True


def find_groups(model: ir.Model, *, rescale_conv_outputs: bool = False) -> tuple[list[SmoothGroup], list[str]]:
    """Smoothable activations: LayerNorm outputs read by MatMul/Gemm, Conv outputs read by Convs.

    With ``rescale_conv_outputs`` also the two rewrites for written-out activations (module
    docstring): Conv outputs read by one, and Mul/Div-by-constant outputs read only by Convs.

    Returns the groups and reasons for candidates left alone.
    """
    groups, reasons = [], []
    for node in model.graph:
        for x in node.outputs:
            if x.dtype not in (None, ir.DataType.FLOAT):
                continue
            readers = [r for u in x.uses() if u.node.graph is model.graph and (r := _reader(u.node, x)) is not None]
            if not readers:
                continue
            dims = {_channels(r) for r in readers}
            if len(dims) != 1:
                reasons.append(f"{x.name}: the weights reading it disagree on the channel count")
                continue
            channels = dims.pop()
            others = len(x.uses()) > len(readers) or x.is_graph_output()
            kinds = {r.kind == "conv" for r in readers}
            if kinds == {False}:
                fold = _foldable(x, channels)
                if fold is not None:
                    groups.append(SmoothGroup(x, channels, readers, [] if others else fold))
            elif kinds == {True} and not others and (conv := _conv_producer(x, channels)) is not None:
                groups.append(SmoothGroup(x, channels, readers, conv[0], channel_axis=1, rank=conv[1]))
            elif kinds == {True} and not others and rescale_conv_outputs:
                rank = len(readers[0].node.inputs[readers[0].index].const_value.shape)
                if (scale := _scale_producer(x, channels, rank)) is not None:
                    groups.append(SmoothGroup(x, channels, readers, scale, channel_axis=1, rank=rank))
        if (rescale_conv_outputs and node.op_type == "Conv" and node.domain in ("", "ai.onnx")
                and _activation_readers(node.outputs[0])):
            w = _ir_utils.constant_input(node, 1)
            channels = int(w.const_value.shape[0]) if w is not None else 0
            conv = _conv_producer(node.outputs[0], channels) if channels else None
            if conv is not None:
                groups.append(SmoothGroup(node.outputs[0], channels, [], conv[0], channel_axis=1, rank=conv[1],
                                          restore=True))
    folded = {id(n) for g in groups if not g.restore for n, _, _ in g.fold}
    return [g for g in groups if not (g.restore and id(g.fold[0][0]) in folded)], reasons


def has_rescalable_convs(model: ir.Model) -> bool:
    """Whether ``rescale_conv_outputs=true`` would add groups (around written-out activations)."""
    return len(find_groups(model, rescale_conv_outputs=True)[0]) > len(find_groups(model)[0])


def _outlier_ratio(x_max: np.ndarray) -> float:
    """Largest per-channel range over the median one."""
    return float(x_max.max() / max(float(np.median(x_max)), 1e-12))


def _scales(x_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    """``s = max|X|^a / max|W|^(1-a)`` per channel; 1 where either side is zero."""
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.power(x_max, alpha) / np.power(w_max, 1.0 - alpha)
    ok = (x_max > 0) & (w_max > 0) & np.isfinite(s)
    return np.where(ok, np.clip(s, 1.0 / _SCALE_LIMIT, _SCALE_LIMIT), 1.0)


def _replace_constant(node: ir.Node, index: int, array: np.ndarray, taken: set[str], graph: ir.Graph) -> None:
    """Set input ``index`` of ``node`` to ``array``: in place when only this node reads it, else a new initializer."""
    old = node.inputs[index]
    if len(old.uses()) == 1 and not old.is_graph_output():
        old.const_value = ir.Tensor(array.astype(np.float32), name=old.name)
        return
    name = _ir_utils.unique_name(graph, f"{old.name}_smooth", taken)
    new = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.FLOAT),
                   const_value=ir.Tensor(array.astype(np.float32), name=name))
    graph.register_initializer(new)
    node.replace_input_with(index, new)


ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # per-layer alpha candidates (SmoothQuant's sweet spot is 0.4-0.8)


def _fake_quant_rows(x: np.ndarray, per_token: bool) -> np.ndarray:
    """X as the INT8 kernels see it: uint8 over [min, max] per tensor, or symmetric int8 per row."""
    if per_token:
        s = np.maximum(np.abs(x).max(axis=1, keepdims=True) / 127, 1e-12)
        return np.rint(x / s) * s
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    s = max((hi - lo) / 255, 1e-12)
    z = np.rint(-lo / s)
    return (np.clip(np.rint(x / s) + z, 0, 255) - z) * s


def _fake_quant_cols(w: np.ndarray) -> np.ndarray:
    """W[C, N] as symmetric int8 per output column."""
    s = np.maximum(np.abs(w).max(axis=0, keepdims=True) / 127, 1e-12)
    return np.rint(w / s) * s


def _best_alpha(
    g: SmoothGroup, x: np.ndarray, x_max: np.ndarray, w_max: np.ndarray, grid: Sequence[float], per_token: bool
) -> tuple[float | None, dict[str, float]]:
    """The alpha of ``grid`` whose smoothed INT8 outputs are closest to the float ones on ``x``.

    The error is the relative L2 of ``Q(X / s) Q(diag(s) W) - X W`` over all the group's readers,
    with the activation quantized as it will be (per tensor or per token) and the weights per
    output column. None: no smoothing (s = 1) was measured best.
    """
    weights = []
    for r in g.readers:
        w = _ir_utils.constant_array(r.node.inputs[r.index]).astype(np.float64)
        weights.append(w if r.kind == "rows" else w.T)
    ref = [x @ w for w in weights]
    norm = sum(float(np.sum(y * y)) for y in ref) or 1.0

    def error(s: np.ndarray) -> float:
        xq = _fake_quant_rows(x / s, per_token)
        return float(np.sqrt(sum(np.sum((xq @ _fake_quant_cols(w * s[:, None]) - y) ** 2)
                                 for w, y in zip(weights, ref, strict=True)) / norm))

    errors = {"off": error(np.ones_like(x_max))}
    for a in grid:
        errors[f"{a:g}"] = error(_scales(x_max, w_max, a))
    best = min(errors, key=errors.get)  # type: ignore[arg-type]
    return (None if best == "off" else float(best)), {k: round(v, 5) for k, v in errors.items()}


def smooth(
    model: ir.Model,
    feeds: Iterable[Mapping[str, np.ndarray]] | None,
    alpha: float = 0.5,
    *,
    min_ratio: float = 0.0,
    scales: Mapping[str, Sequence[float]] | None = None,
    per_layer: Sequence[float] = (),
    per_token: bool = False,
    rescale_conv_outputs: bool = False,
) -> SmoothResult:
    """Apply SmoothQuant to ``model`` in place; the float function is unchanged (up to rounding).

    Args:
        model: the float model (edited in place).
        feeds: calibration feeds; each group's per-channel max |X| is measured on them.
        alpha: migration strength in (0, 1]: near 0 keeps activations as they are, 1 moves all
            of their range into the weights.
        min_ratio: only smooth activations whose largest channel range is at least this many
            times the median channel range (outlier channels); the others are recorded as left.
        scales: per-channel factors to apply instead of measuring (a saved calibration table's
            ``smoothing``); ``feeds``, ``alpha`` and ``min_ratio`` are then not used.
        per_layer: alpha candidates; if given, each activation after a LayerNorm gets the one
            whose simulated INT8 output error on the feeds' real activations is least (or no
            smoothing, if that is measured best); Conv groups keep ``alpha``.
        per_token: for ``per_layer``: simulate per-token activation scales (dynamic INT8)
            instead of one per tensor.
        rescale_conv_outputs: also the rewrites around written-out activations (Conv outputs
            read by one, ``_restore``; Mul/Div-by-constant outputs read by Convs) and every
            depthwise input evened out at alpha 1; off by default: they won on the PicoDet layout
            detector and lost on PP-OCR det/rec (docs/benchmarks.md).

    Raises:
        ValueError: alpha outside (0, 1].
        DataError: ``scales`` names a tensor that is not a smoothable activation here, or has
            the wrong number of channels.

    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha must be in (0, 1], got {alpha}")
    result = SmoothResult()
    groups, result.skipped = find_groups(model, rescale_conv_outputs=rescale_conv_outputs)
    by_name = {g.value.name: g for g in groups}
    if scales is not None:
        for name, factors in scales.items():
            g = by_name.get(name)
            if g is None or len(factors) != g.channels:
                raise DataError(f"calibration table smoothing: {name!r} is not a smoothable activation with "
                                f"{len(factors)} channels in this model (a table from another model?)")
        planned = {name: (by_name[name], np.asarray(f, np.float64), None) for name, f in scales.items()}
    elif groups and feeds is not None:
        feeds = feeds if isinstance(feeds, Sequence) or hasattr(feeds, "take") else list(feeds)  # read twice
        after_norm = {g.value.name: g.channels for g in groups if g.channel_axis == -1}
        after_conv = {g.value.name: g.rank for g in groups if g.channel_axis == 1}
        x_max = {}
        if after_norm:
            x_max.update(channel_stats(model, after_norm, feeds, last_axis=True, absmax=True))
        if after_conv:
            x_max.update(channel_stats(model, after_conv, feeds, absmax=True))
        planned = {}
        chosen: dict[str, tuple[float | None, dict[str, float]]] = {}
        samples = _samples(model, [g.value.name for g in groups if g.channel_axis == -1], feeds) if per_layer else {}
        for g in groups:
            xm = x_max.get(g.value.name)
            if xm is None or xm.shape != (g.channels,):
                result.skipped.append(f"{g.value.name}: no per-channel statistics")
                continue
            ratio = _outlier_ratio(xm)
            # Free groups (no weight's rounding changes: a rescaled Conv output, depthwise readers)
            # are evened out whatever their spread, with rescale_conv_outputs; the others only past
            # min_ratio (on PP-OCR rec, evening out every depthwise input cost lines: 65.6 % -> 46.9 %).
            free = g.restore or (rescale_conv_outputs and all(r.depthwise() for r in g.readers))
            if ratio < min_ratio and not free:
                result.records.append({"tensor": g.value.name, "channels": g.channels, "outlier_ratio_before": round(ratio, 2),
                                       "how": f"left: no outlier channels (max/median channel range < {min_ratio:g})"})
                continue
            if g.restore:  # the Conv quantizes its weights per output channel: s = x_max costs them nothing
                planned[g.value.name] = (g, _scales(xm, np.ones_like(xm), 1.0), xm)
                continue
            w_max = np.max([r.in_absmax() for r in g.readers], axis=0).astype(np.float64)
            # Depthwise readers (one input channel per output channel) quantize their weights per
            # output channel, so scaling channel j's weights by s_j changes no weight's rounding:
            # all of the activation's spread can move into them (alpha 1).
            a = 1.0 if free else alpha
            if g.value.name in samples:
                best, errors = _best_alpha(g, samples[g.value.name], xm.astype(np.float64), w_max, per_layer, per_token)
                chosen[g.value.name] = (best, errors)
                if best is None:
                    result.records.append({"tensor": g.value.name, "channels": g.channels, "outlier_ratio_before":
                                           round(ratio, 2), "how": "left: no alpha measured better than none",
                                           "int8_rel_error": errors})
                    continue
                a = best
            planned[g.value.name] = (g, _scales(xm, w_max, a), xm)
    else:
        planned = {}
    taken = _ir_utils._value_names(model.graph) | {n.name for n in model.graph.all_nodes() if n.name}
    for name, (g, s, xm) in planned.items():
        how = _apply(model, g, s, taken, result)
        result.scales[name] = tuple(float(x) for x in s)
        record = {"tensor": name, "channels": g.channels, "consumers": len(g.readers), "how": how}
        if scales is None and name in chosen:
            record["alpha"], record["int8_rel_error"] = chosen[name]
        if xm is not None:
            record["outlier_ratio_before"] = round(_outlier_ratio(xm), 2)
            record["outlier_ratio_after"] = round(_outlier_ratio(xm / s), 2)
        result.records.append(record)
    return result


def _samples(model: ir.Model, names: Sequence[str], feeds: Iterable[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The feeds' values of ``names``, each flattened to [tokens, channels] (float64)."""
    if not names:
        return {}
    rows: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for outs in runtime.capture(model, feeds, names):
        for n in names:
            if n in outs:
                rows[n].append(outs[n].reshape(-1, outs[n].shape[-1]).astype(np.float64))
    return {n: np.concatenate(r) for n, r in rows.items() if r}


def _apply(model: ir.Model, g: SmoothGroup, s: np.ndarray, taken: set[str], result: SmoothResult) -> str:
    """Scale ``g``'s reading weights by ``s`` and its activation by ``1 / s``; say how the latter was done."""
    for r in g.readers:
        _replace_constant(r.node, r.index, r.scaled(s), taken, model.graph)
    if g.restore:
        return _restore(model, g, s, taken, result)
    if g.fold:
        for node, i, axis in g.fold:
            c = _ir_utils.constant_array(node.inputs[i])
            if node.op_type in ("Mul", "Div"):  # a scale producer: its constant becomes [C, 1, ...] along X's axis 1
                c = np.broadcast_to(c.reshape(-1), (g.channels,)).reshape([g.channels] + [1] * (g.rank - 2))
                _replace_constant(node, i, c * s.reshape(c.shape) if node.op_type == "Div" else c / s.reshape(c.shape),
                                  taken, model.graph)
                continue
            shape = [1] * c.ndim
            shape[axis] = -1
            factor = s.reshape(c.shape) if c.size == g.channels else s.reshape(shape)
            _replace_constant(node, i, c / factor, taken, model.graph)
        producer = g.fold[0][0]
        return "folded into " + (producer.name or producer.op_type)
    inv = ir.Value(name=_ir_utils.unique_name(model.graph, f"{g.value.name}_smooth_inv", taken),
                   const_value=ir.Tensor((1.0 / s).astype(np.float32)))
    inv.const_value.name = inv.name
    model.graph.register_initializer(inv)
    name = _ir_utils.unique_name(model.graph, f"{g.value.name}_smooth", taken)
    mul = ir.node("Mul", [g.value, inv], name=name)
    mul.outputs[0].name = name
    model.graph.insert_after(g.value.producer(), [mul])
    for r in g.readers:
        r.node.replace_input_with(0, mul.outputs[0])
    result.inserted.append(name)
    return "Mul inserted (the activation has other readers)"


def _restore(model: ir.Model, g: SmoothGroup, s: np.ndarray, taken: set[str], result: SmoothResult) -> str:
    """Divide the producing Conv's output channels by ``s`` and insert a float ``Mul(X / s, s)`` for X's readers.

    The Conv's integer output is then quantized with its channels evened out; the activation
    after it (HardSwish written out, ...) runs in float on the rescaled values, so no per-tensor
    scale ever holds X's uneven channels.
    """
    readers = [(u.node, u.idx) for u in g.value.uses()]
    for node, i, axis in g.fold:
        c = _ir_utils.constant_array(node.inputs[i])
        shape = [1] * c.ndim
        shape[axis] = -1
        _replace_constant(node, i, c / s.reshape(shape), taken, model.graph)
    name = _ir_utils.unique_name(model.graph, f"{g.value.name}_rescale", taken)
    factor = ir.Value(name=name + "_s", const_value=ir.Tensor(s.reshape([-1] + [1] * (g.rank - 2)).astype(np.float32),
                                                              name=name + "_s"))
    model.graph.register_initializer(factor)
    mul = ir.node("Mul", [g.value, factor], name=name)
    mul.outputs[0].name = name
    mul.metadata_props[RESCALED_KEY] = "1"
    model.graph.insert_after(g.value.producer(), [mul])
    for node, idx in readers:
        node.replace_input_with(idx, mul.outputs[0])
    result.rescaled.append(name)
    return "folded into " + (g.fold[0][0].name or "Conv") + ", float Mul restores it for the activation"
