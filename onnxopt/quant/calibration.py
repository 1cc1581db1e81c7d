"""Activation statistics collected through onnxruntime, streamed over the data.

Phases (onnxruntime's instrument / collect / compute, without the disk and the subclass hooks):

1. **min/max** — an in-memory clone of the model gets a ``ReduceMin``/``ReduceMax``/``Size``
   node per observed tensor, and only those scalars are fetched with
   :func:`onnxopt.runtime.capture`. onnxruntime frees every activation as usual, so memory is
   bounded by one inference of the model, whatever the number of samples. Running min/max are
   merged per feed.
2. **histogram** (percentile, entropy, mse) — in the same run, each observed tensor also gets an
   evenly strided sample of at most ``S`` values of ``|x|`` (a strided Slice, then Abs). Per feed
   these update a histogram of ``|x|`` (each sampled value weighted by size / sample size) whose
   range doubles, merging bin pairs, when a feed's exact max |x| exceeds it; histograms merge
   over feeds and memory is bounded by the samples of one feed, not the number of feeds. One
   inference per feed for every method: histogram methods cost about what min/max costs. A
   tensor of at most ``S`` values is binned whole, so small models get exact histograms. Models
   below opset 11 fetch the tensors themselves instead, in chunks of at most
   ``max_chunk_bytes``, one session over the data per chunk (also with ``exact=True``).
3. **compute** — a clipping threshold per tensor from its histogram (percentile, KL entropy as in
   TensorRT, or the threshold minimising the expected int8 quantisation MSE).

The result is a :class:`CalibrationTable`, JSON-saveable and reusable (``--calib-table``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import pathlib
import time
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from typing import Any, Literal

import numpy as np
import onnx
import onnx_ir as ir
from tqdm.auto import tqdm

from onnxopt import _ir_utils
from onnxopt.errors import DataError
from onnxopt.runtime import sessions as runtime
from onnxopt.runtime.data import Dataset

__all__ = [
    "METHODS",
    "CalibrationTable",
    "Method",
    "cached_methods",
    "cached_ranges",
    "collect_methods",
    "collect_ranges",
    "fingerprint",
    "float_values",
    "method_options",
    "threshold_from_histogram",
]

logger = logging.getLogger(__name__)

Method = Literal["minmax", "percentile", "entropy", "mse"]
METHODS: tuple[str, ...] = ("minmax", "percentile", "entropy", "mse")
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16)
_REDUCE_SUFFIXES = ("min", "max", "size")
_SKETCH_OPSET = 11  # Slice with tensor steps, Mod
_SHARD_MIN_SECONDS = 8.0  # estimated one-process calibration time above which data shards go to workers
_SAMPLE = 1 << 17  # values of |x| sampled per tensor and feed (all of them in smaller tensors)
_BINS = 4096
_OPT = "disable"  # exact float values as written; instrumented nodes block fusions anyway


@dataclasses.dataclass(frozen=True)
class CalibrationTable:
    """Observed range ``(low, high)`` per tensor name, and how it was obtained.

    Attributes:
        ranges: tensor name -> (low, high) in float; low <= 0 <= high is not implied.
        method: the calibration method that produced the ranges.
        num_samples: number of feeds the statistics were collected on.
        smoothing: SmoothQuant scales applied before the ranges were measured, tensor name ->
            one factor per channel (the ranges of those tensors are of ``x / s``).

    """

    ranges: Mapping[str, tuple[float, float]]
    method: str = "minmax"
    num_samples: int = 0
    smoothing: Mapping[str, tuple[float, ...]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, rng in self.ranges.items():
            if len(rng) != 2 or not (math.isfinite(rng[0]) and math.isfinite(rng[1])):
                raise ValueError(f"calibration range of {name!r} must be two finite numbers, got {rng}")
            if rng[0] > rng[1]:
                raise ValueError(f"calibration range of {name!r} has low > high: {rng}")

    def __contains__(self, name: object) -> bool:
        return name in self.ranges

    def absmax(self, name: str) -> float:
        """``max(|low|, |high|)`` of tensor ``name`` (KeyError if it was not observed)."""
        low, high = self.ranges[name]
        return float(max(abs(low), abs(high)))

    def merged(self, other: CalibrationTable) -> CalibrationTable:
        """Return a table holding the ranges of both (``other`` wins on a shared name)."""
        return CalibrationTable({**self.ranges, **other.ranges}, self.method, max(self.num_samples, other.num_samples),
                                {**self.smoothing, **other.smoothing})

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return {
            "format": "onnxopt-calibration-table",
            "version": 1,
            "method": self.method,
            "num_samples": self.num_samples,
            "ranges": {k: [float(lo), float(hi)] for k, (lo, hi) in self.ranges.items()},
            **({"smoothing": {k: [float(x) for x in v] for k, v in self.smoothing.items()}} if self.smoothing else {}),
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> CalibrationTable:
        """Inverse of :meth:`to_json`.

        Raises:
            ValueError: a document that is not a calibration table.

        """
        if not isinstance(doc, Mapping) or doc.get("format") != "onnxopt-calibration-table":
            raise ValueError("not an onnxopt calibration table (missing format key)")
        ranges = doc.get("ranges")
        if not isinstance(ranges, Mapping):
            raise ValueError("calibration table has no 'ranges' object")
        parsed = {str(k): (float(v[0]), float(v[1])) for k, v in ranges.items()}
        smoothing = {str(k): tuple(float(x) for x in v) for k, v in doc.get("smoothing", {}).items()}
        return cls(parsed, str(doc.get("method", "minmax")), int(doc.get("num_samples", 0)), smoothing)

    def save(self, path: str | os.PathLike) -> None:
        """Write the table as JSON."""
        pathlib.Path(path).write_text(json.dumps(self.to_json(), indent=1, sort_keys=True))

    @classmethod
    def load(cls, path: str | os.PathLike) -> CalibrationTable:
        """Read a table written by :meth:`save`.

        Raises:
            DataError: missing or malformed file.

        """
        path = pathlib.Path(path)
        try:
            return cls.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            raise DataError(f"{path}: calibration table not found") from None
        except (json.JSONDecodeError, ValueError, TypeError, IndexError) as err:
            raise DataError(f"{path}: invalid calibration table ({err})") from None


def _is_float_tensor(value: ir.Value) -> bool:
    """Tell whether ``value`` is typed as a float tensor (sequence/optional values are not)."""
    return isinstance(value.type, ir.TensorType) and value.type.dtype in _FLOAT_TYPES


def float_values(model: ir.Model) -> list[str]:
    """Names of the float tensors of the main graph: real inputs and node outputs (typed).

    Only values whose type is a float ``ir.TensorType``: a sequence or optional of float
    tensors has ``dtype`` float too, but ReduceMin/ReduceMax cannot read it.
    """
    names = [v.name for v in model.graph.inputs if not v.is_initializer() and _is_float_tensor(v)]
    for node in model.graph:
        names += [o.name for o in node.outputs if o.name and _is_float_tensor(o)]
    return list(dict.fromkeys(names))


def _typed_clone(model: ir.Model) -> ir.Model:
    """Return a clone with inferred value types (needed to pick the float tensors).

    :func:`onnxopt._ir_utils.infer_types` fills whole types only where a value has none, so
    sequence and optional values keep their types (onnx-ir's ShapeInferencePass makes them
    tensors, and the instrumented clone would then not load in onnxruntime).
    """
    clone = model.clone()
    try:
        _ir_utils.infer_types(clone)
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError) as err:  # best effort
        logger.debug("shape inference failed before calibration: %s", err)
    return clone


def _reduce_model(
    model: ir.Model, names: Sequence[str], sketch: bool = False
) -> tuple[ir.Model, dict[str, tuple[str, ...]]]:
    """Return a clone exposing ReduceMin/ReduceMax/Size (with ``sketch``, a |x| sample) per tensor."""
    clone = model.clone()
    values = {v.name: v for v in clone.graph.inputs}
    for node in clone.graph:
        values.update({o.name: o for o in node.outputs if o.name})
    taken = {v.name for v in values.values()} | set(clone.graph.initializers)
    outs: dict[str, tuple[str, ...]] = {}
    first = next(iter(clone.graph), None)
    consts = _sketch_constants(clone.graph, taken) if sketch else {}
    for name in names:
        if name not in values:
            raise KeyError(f"no value named {name!r} in the main graph")
        created, exposed = [], []
        for op, suffix in zip(("ReduceMin", "ReduceMax", "Size"), _REDUCE_SUFFIXES, strict=True):
            attrs = {"keepdims": 0} if op != "Size" else {}
            node = ir.node(op, [values[name]], attributes=attrs)
            node.outputs[0].name = _ir_utils.unique_name(clone.graph, f"{name}.calib_{suffix}", taken)
            created.append(node)
            exposed.append(node.outputs[0])
        if sketch:
            created += _sketch_nodes(values[name], created[2].outputs[0], consts)
            created[-1].outputs[0].name = _ir_utils.unique_name(clone.graph, f"{name}.calib_sample", taken)
            exposed.append(created[-1].outputs[0])
        clone.graph.outputs.extend(exposed)
        # Right after the producer: onnxruntime runs nodes in this order, so each activation
        # is reduced (and can be freed) as soon as it exists, not at the end of the graph.
        producer = values[name].producer()
        if producer is not None:
            clone.graph.insert_after(producer, created)
        elif first is not None:
            clone.graph.insert_before(first, created)
        else:
            clone.graph.extend(created)
        outs[name] = tuple(v.name for v in exposed)  # type: ignore[misc]
    return clone, outs


def _sketch_constants(graph: ir.Graph, taken: set[str]) -> dict[str, ir.Value]:
    """Add the int64 constants of :func:`_sketch_nodes` to ``graph`` once, as initializers."""
    values = {"flat": [-1], "one_d": [1], "sample_m1": _SAMPLE - 1, "sample": _SAMPLE, "one": 1, "two": 2, "zero": [0]}
    out = {}
    for key, value in values.items():
        name = _ir_utils.unique_name(graph, f"calib_sketch_{key}", taken)  # adds it to taken
        out[key] = ir.Value(name=name, const_value=ir.Tensor(np.array(value, np.int64), name=name))
        graph.register_initializer(out[key])
    return out


def _sketch_nodes(x: ir.Value, size: ir.Value, c: Mapping[str, ir.Value]) -> list[ir.Node]:
    """Nodes computing ``|x.ravel()[::step]|`` (the last node), at most ``_SAMPLE`` values.

    ``step`` is ``ceil(size / _SAMPLE)`` made odd, so that the stride does not alias with the
    power-of-two widths of feature maps. Slicing before ``Abs`` keeps the cost to a strided copy
    of the sample (a full-tensor Abs or TopK per tensor measured 2.4x the min/max run on PP-OCR det).
    ``c`` holds the constants made by :func:`_sketch_constants`.
    """
    flat = ir.node("Reshape", [x, c["flat"]])
    num = ir.node("Add", [size, c["sample_m1"]])
    step = ir.node("Div", [num.outputs[0], c["sample"]])
    parity = ir.node("Mod", [step.outputs[0], c["two"]])
    bump = ir.node("Sub", [c["one"], parity.outputs[0]])
    odd = ir.node("Add", [step.outputs[0], bump.outputs[0]])
    steps = ir.node("Reshape", [odd.outputs[0], c["one_d"]])
    ends = ir.node("Reshape", [size, c["one_d"]])
    sample = ir.node("Slice", [flat.outputs[0], c["zero"], ends.outputs[0], c["zero"], steps.outputs[0]])
    nodes = [flat, num, step, parity, bump, odd, steps, ends, sample]
    if x.dtype is not None and x.dtype != ir.DataType.FLOAT:
        nodes.append(ir.node("Cast", [nodes[-1].outputs[0]], attributes={"to": ir.DataType.FLOAT}))
    nodes.append(ir.node("Abs", [nodes[-1].outputs[0]]))
    return nodes


class _Histogram:
    """Histogram of ``|x|`` over ``[0, top]`` whose range doubles when a larger value arrives."""

    def __init__(self, bins: int = _BINS) -> None:
        self.counts = np.zeros(bins, dtype=np.float64)
        self.top = 0.0

    def add(self, peak: float, sample: np.ndarray, size: int) -> None:
        """Add one feed's sample of ``|x|`` for a tensor of ``size`` values whose max |x| is ``peak``."""
        sample = sample[np.isfinite(sample)]
        if not sample.size or not math.isfinite(peak):
            return
        if self.top == 0.0:  # a power of two: histograms of data shards then merge exactly (merge)
            self.top = 2.0 ** math.ceil(math.log2(peak)) if peak > 0 else 1.0
        self._widen(peak)  # merge bin pairs: the same counts over twice the range, until peak fits
        self._bin(sample, size / sample.size)

    def _bin(self, x: np.ndarray, weight: float) -> None:
        self.counts += weight * _bincount(x, self.top, len(self.counts))

    def _widen(self, top: float) -> None:
        while self.top < top:
            half = self.counts.reshape(-1, 2).sum(axis=1)
            self.counts = np.concatenate([half, np.zeros_like(half)])
            self.top *= 2.0

    def merge(self, other: _Histogram) -> None:
        """Add another shard's histogram: both tops are powers of two, so the wider one's bins are
        unions of the other's bin pairs, and binning floor(x * bins / top) commutes with the pair
        merge -- the result is the histogram of both shards' samples, up to float64 rounding of
        the per-feed weights' sum."""
        if other.top == 0.0:
            return
        if self.top == 0.0:
            self.counts, self.top = other.counts.copy(), other.top
            return
        other = _Histogram.from_state(other.counts, other.top)
        top = max(self.top, other.top)
        self._widen(top)
        other._widen(top)
        self.counts += other.counts

    @classmethod
    def from_state(cls, counts: np.ndarray, top: float) -> _Histogram:
        h = cls(len(counts))
        h.counts, h.top = np.array(counts, dtype=np.float64), float(top)
        return h


def _bincount(x: np.ndarray, top: float, bins: int) -> np.ndarray:
    """Counts of ``x >= 0`` in ``bins`` equal bins over ``[0, top]`` (larger values in the last)."""
    # Integer binning with bincount: several times faster than np.histogram.
    idx = np.minimum((x * (bins / top)).astype(np.int64), bins - 1)
    return np.bincount(idx, minlength=bins)


def _reiterable(data: Iterable[Mapping[str, np.ndarray]]) -> Iterable[Mapping[str, np.ndarray]]:
    """Return ``data`` itself if iterating it twice works, else a list of its feeds."""
    if hasattr(data, "get_next"):  # an onnxruntime CalibrationDataReader
        feeds = []
        while (item := data.get_next()) is not None:
            feeds.append(dict(item))
        return feeds
    if iter(data) is data:  # a one-shot iterator: keep its feeds for the second phase
        return list(data)
    return data


def _progress(items: Iterable[Any], total: int | None, desc: str, quiet: bool) -> Iterable[Any]:
    return tqdm(items, total=total, desc=desc, disable=quiet, leave=False, unit="feed")


def _minmax_phase(
    model: ir.Model, data: Iterable[Mapping[str, np.ndarray]], names: Sequence[str], quiet: bool,
    sketch: bool = False, threads: int | None = None, stop_after_first: Any = None,
) -> tuple[dict[str, list[float]], dict[str, int], int, dict[str, _Histogram]]:
    """Min/max, sizes and (``sketch``) |x| histograms over ``data`` in one session.

    ``stop_after_first(seconds)``: called with the first feed's time; if it returns True the
    pass stops there (the count says how many feeds were read), so the caller can hand the rest
    to workers without a second session.
    """
    instrumented, outs = _reduce_model(model, names, sketch)
    fetch = [x for exposed in outs.values() for x in exposed]
    lows = {n: math.inf for n in names}
    highs = {n: -math.inf for n in names}
    sizes = dict.fromkeys(names, 0)
    hists = {n: _Histogram() for n in names} if sketch else {}
    count = 0
    total = len(data) if hasattr(data, "__len__") else None  # type: ignore[arg-type]
    stream = runtime.capture(instrumented, (dict(f) for f in data), fetch, priority_order=True, opt_level=_OPT,
                             threads=threads)  # fmt: skip
    desc = "calibration min/max + histograms" if sketch else "calibration min/max"
    t0 = time.perf_counter()
    for got in _progress(stream, total, desc, quiet):
        count += 1
        for name, exposed in outs.items():
            size = int(got[exposed[2]])
            if size == 0:
                continue
            lows[name] = min(lows[name], float(got[exposed[0]]))
            highs[name] = max(highs[name], float(got[exposed[1]]))
            sizes[name] = max(sizes[name], size)
            if sketch:
                peak = max(abs(float(got[exposed[0]])), abs(float(got[exposed[1]])))
                hists[name].add(peak, got[exposed[3]], size)
        del got
        if count == 1 and stop_after_first is not None and stop_after_first(time.perf_counter() - t0):
            break
    if count == 0:
        raise DataError("calibration: no feeds")
    ranges = {n: [lows[n], highs[n]] for n in names}
    return ranges, sizes, count, hists


def _shard_stats(
    blob: bytes, names: Sequence[str], sketch: bool, feeds: list[dict[str, np.ndarray]]
) -> tuple[dict[str, list[float]], dict[str, int], int, dict[str, tuple[np.ndarray, float]]]:
    """One data shard's min/max, sizes and |x| histograms (a worker's task: one thread each)."""
    model = ir.from_proto(onnx.load_from_string(blob))
    ranges, sizes, count, hists = _minmax_phase(model, feeds, names, True, sketch, threads=1)
    return ranges, sizes, count, {n: (h.counts, h.top) for n, h in hists.items()}


def _minmax_sharded(
    model: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]], names: Sequence[str], quiet: bool, sketch: bool,
    workers: Any,
) -> tuple[dict[str, list[float]], dict[str, int], int, dict[str, _Histogram]]:
    """:func:`_minmax_phase` over contiguous shards of ``feeds`` on ``workers``, merged.

    Min, max and sizes merge exactly, histograms as :meth:`_Histogram.merge` says, so the table
    is the one a single pass gives (tested), whatever the number of shards.
    """
    from onnxopt.quant import trials

    n = len(feeds)
    width = workers.count if workers.kind == "local" else max(2, min(n, 64))
    k = max(1, min(width, n))
    shards = [[dict(f) for f in feeds[i * n // k : (i + 1) * n // k]] for i in range(k)]
    blob = ir.to_proto(model).SerializeToString()
    bar = tqdm(total=n, desc=f"calibration on {k} shards ({workers.describe()})", disable=quiet, leave=False, unit="feed")
    try:
        parts = trials.map_tasks(_shard_stats, [(list(names), sketch, shard) for shard in shards], workers, blob)
    finally:
        bar.update(n)
        bar.close()
    return _merge_stats([(r, z, c, {m: _Histogram.from_state(*h) for m, h in hs.items()}) for r, z, c, hs in parts],
                        names, sketch)  # fmt: skip


def _merge_stats(parts: Sequence[tuple], names: Sequence[str], sketch: bool) -> tuple:
    """Merge (ranges, sizes, count, histograms) of consecutive data shards, in shard order."""
    lows = {m: math.inf for m in names}
    highs = {m: -math.inf for m in names}
    sizes = dict.fromkeys(names, 0)
    hists = {m: _Histogram() for m in names} if sketch else {}
    count = 0
    for ranges, shard_sizes, shard_count, shard_hists in parts:  # in shard order: the same sums every run
        count += shard_count
        for m in names:
            lows[m] = min(lows[m], ranges[m][0])
            highs[m] = max(highs[m], ranges[m][1])
            sizes[m] = max(sizes[m], shard_sizes[m])
            if sketch and m in shard_hists:
                hists[m].merge(shard_hists[m])
    if count == 0:
        raise DataError("calibration: no feeds")
    return {m: [lows[m], highs[m]] for m in names}, sizes, count, hists


def _minmax_parallel(
    model: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]], names: Sequence[str], quiet: bool, sketch: bool,
    workers: Any,
) -> tuple:
    """The first feed here, timed; the rest on ``workers`` only if one process is estimated to take
    more than _SHARD_MIN_SECONDS (spawning workers costs ~2-5 s: the digits models calibrate in 1 s
    in one session and in 5 s on two fresh workers), else in the same session."""

    def shard(seconds: float) -> bool:
        return len(feeds) >= 3 and seconds * (len(feeds) - 1) >= _SHARD_MIN_SECONDS

    here = _minmax_phase(model, feeds, names, quiet, sketch, stop_after_first=shard)
    if here[2] == len(feeds):  # one session did it all
        return here
    rest = _minmax_sharded(model, feeds[here[2]:], names, quiet, sketch, workers)
    return _merge_stats([here, rest], names, sketch)


def _chunks(names: Sequence[str], sizes: Mapping[str, int], max_bytes: int) -> list[list[str]]:
    chunks: list[list[str]] = [[]]
    used = 0
    for name in names:
        nbytes = 4 * sizes[name]
        if chunks[-1] and used + nbytes > max_bytes:
            chunks.append([])
            used = 0
        chunks[-1].append(name)
        used += nbytes
    return [c for c in chunks if c]


def _histogram_phase(
    model: ir.Model,
    data: Iterable[Mapping[str, np.ndarray]],
    names: Sequence[str],
    absmax: Mapping[str, float],
    sizes: Mapping[str, int],
    num_bins: int,
    max_chunk_bytes: int,
    quiet: bool,
) -> dict[str, np.ndarray]:
    hists = {n: np.zeros(num_bins, dtype=np.int64) for n in names}
    chunks = _chunks(names, sizes, max_chunk_bytes)
    total = len(data) if hasattr(data, "__len__") else None  # type: ignore[arg-type]
    for i, chunk in enumerate(chunks):
        desc = f"calibration histograms {i + 1}/{len(chunks)}"
        stream = runtime.capture(model, (dict(f) for f in data), chunk, priority_order=True, opt_level=_OPT)
        for got in _progress(stream, total, desc, quiet):
            for name in chunk:
                top = absmax[name]
                if top <= 0 or name not in got:
                    continue
                x = np.abs(np.asarray(got[name], dtype=np.float32).ravel())
                x = x[np.isfinite(x)]  # NaN/inf entries carry no range information
                hists[name] += _bincount(x, top, num_bins)
            del got
    return hists


def threshold_from_histogram(
    hist: np.ndarray,
    top: float,
    method: str,
    *,
    percentile: float = 99.99,
    levels: int = 128,
    bounds: tuple[float, float] | None = None,
) -> float:
    """Clipping threshold for ``|x|`` from a histogram of ``|x|`` over ``[0, top]``.

    Args:
        hist: counts per bin, bins of equal width ``top / len(hist)``.
        top: the observed ``max |x|``.
        method: "percentile", "entropy" (KL divergence, as TensorRT) or "mse".
        percentile: for "percentile", the share (in %) of values kept unclipped.
        levels: quantisation levels on one side of zero (128 for int8).
        bounds: for "mse" with an asymmetric 8-bit grid (uint8 with a zero point): the observed
            ``(min, max)``. The grid then spans the clipped range ``[max(min, -t), min(max, t)]``
            (0 included) in 255 steps, so a one-sided tensor (ReLU output) gets steps of t/255,
            not the t/127 of a symmetric grid. Lower MSE per tensor, but it clips less, and on
            the PP-OCR recogniser that was measured worse end to end, so quantize leaves it off.

    """
    n = len(hist)
    total = float(hist.sum())
    if total <= 0 or top <= 0:
        return float(top)
    width = top / n
    if method == "percentile":
        cdf = np.cumsum(hist) / total
        idx = int(np.searchsorted(cdf, percentile / 100.0))
        return float(min(idx + 1, n) * width)
    if method == "mse":
        return _mse_threshold(hist.astype(np.float64), width, levels, bounds)
    if method == "entropy":
        return _entropy_threshold(hist.astype(np.float64), width, levels)
    raise ValueError(f"unknown calibration method {method!r}; valid: {', '.join(METHODS)}")


def _mse_threshold(
    hist: np.ndarray, width: float, levels: int, bounds: tuple[float, float] | None = None
) -> float:
    n = len(hist)
    centers = (np.arange(n) + 0.5) * width
    best_t, best_err = n * width, math.inf
    for k in np.unique(np.linspace(max(n // 64, 1), n, 128).astype(int)):
        t = k * width
        if bounds is None:
            step = t / (levels - 1)
        else:  # asymmetric: 255 steps over the clipped range, zero included
            step = (min(max(bounds[1], 0.0), t) + min(max(-bounds[0], 0.0), t)) / 255.0 or t / 255.0
        inside = hist[:k].sum()
        clipped = hist[k:] @ (centers[k:] - t) ** 2
        err = inside * step * step / 12.0 + clipped
        if err < best_err:
            best_t, best_err = t, err
    return float(best_t)


def _entropy_threshold(hist: np.ndarray, width: float, levels: int) -> float:
    """TensorRT's KL search, over thresholds that keep at least 99.9 % of the values.

    The floor guards against discrete or zero-heavy distributions (image pixels, ReLU outputs),
    for which the plain KL search picks a threshold that clips most of the signal.
    """
    n = len(hist)
    if n <= levels:
        return float(n * width)
    cdf = np.cumsum(hist) / hist.sum()
    first = max(levels, int(np.searchsorted(cdf, 0.999)) + 1)
    best_k, best_kl = n, math.inf
    stride = max((n - first) // 128, 1)
    for k in range(first, n + 1, stride):
        p = hist[:k].copy()
        p[-1] += hist[k:].sum()
        nonzero = p > 0
        # Merge k bins into `levels` groups; spread each group's mass over its nonzero bins.
        edges = np.unique(np.linspace(0, k, levels + 1).astype(int)[:-1])
        mass = np.add.reduceat(p, edges)
        cnt = np.add.reduceat(nonzero.astype(np.float64), edges)
        per = np.divide(mass, cnt, out=np.zeros_like(mass), where=cnt > 0)
        q = np.repeat(per, np.diff(np.append(edges, k))) * nonzero
        ps = p[nonzero] / p.sum()
        qs = q[nonzero] / q.sum()
        kl = float(np.sum(ps * np.log(ps / np.maximum(qs, 1e-12))))
        if kl < best_kl:
            best_k, best_kl = k, kl
    return float(best_k * width)


def collect_ranges(
    model: ir.Model,
    data: Iterable[Mapping[str, np.ndarray]],
    values: Sequence[str] | None = None,
    method: Method = "minmax",
    *,
    percentile: float = 99.99,
    num_bins: int = 2048,
    quiet: bool = False,
    max_chunk_bytes: int = 256 << 20,
    exact: bool = False,
    asymmetric: bool = False,
    workers: Any = None,
) -> CalibrationTable:
    """Observe ``values`` on ``data`` through onnxruntime and return their ranges.

    Args:
        model: the float model (not modified).
        data: feeds ``{input_name: array}`` (a Dataset, a list, any iterable, or an onnxruntime
            CalibrationDataReader). One-shot iterators are kept in memory for the second phase.
        values: tensor names of the main graph; ``None`` means every float tensor (graph inputs
            and node outputs).
        method: "minmax", "percentile", "entropy" or "mse" (see the module docstring).
        percentile: for "percentile", the share (in %) of ``|x|`` kept unclipped.
        num_bins: histogram bins for exact histograms (the sketch uses 4096 over a range that
            doubles as needed: at least 2048 over the observed range).
        quiet: no progress bars.
        max_chunk_bytes: largest total size of the tensors fetched at once for exact histograms.
        exact: histograms of every value (the tensors are fetched in chunks, one session over
            the data per chunk) instead of the one-pass sketch; models below opset 11 always.
        asymmetric: the ranges are for an asymmetric 8-bit grid (uint8 with a zero point):
            "mse" counts its real step (see :func:`threshold_from_histogram`'s ``bounds``).
        workers: a :class:`onnxopt.quant.trials.WorkerSpec`: with more than one local worker, or
            Ray, the one-pass statistics are collected on contiguous data shards in parallel
            (one single-threaded session per worker) and merged; the same table as one pass.

    Raises:
        ValueError: an unknown method or a bad option.
        KeyError: a name in ``values`` that is not a main-graph value.
        DataError: no feeds.

    """
    return collect_methods(
        model, data, values, (method,), percentile=percentile, num_bins=num_bins, quiet=quiet,
        max_chunk_bytes=max_chunk_bytes, exact=exact, asymmetric=asymmetric, workers=workers,
    )[method]


def collect_methods(
    model: ir.Model,
    data: Iterable[Mapping[str, np.ndarray]],
    values: Sequence[str] | None = None,
    methods: Sequence[str] = METHODS,
    *,
    percentile: float = 99.99,
    num_bins: int = 2048,
    quiet: bool = False,
    max_chunk_bytes: int = 256 << 20,
    exact: bool = False,
    asymmetric: bool = False,
    workers: Any = None,
) -> dict[str, CalibrationTable]:
    """:func:`collect_ranges` for several methods from one pass over the data: method -> table.

    The min/max and the histograms are collected once; each method only computes its
    thresholds from them (``asymmetric`` applies to "mse").
    """
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"unknown calibration method {method!r}; valid: {', '.join(METHODS)}")
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    if num_bins < 128:
        raise ValueError(f"num_bins must be >= 128, got {num_bins}")
    typed = _typed_clone(model)
    names = list(dict.fromkeys(values)) if values is not None else float_values(typed)
    if not names:
        return {m: CalibrationTable({}, m, 0) for m in methods}
    histogram = any(m != "minmax" for m in methods)
    sketch = histogram and not exact and typed.opset_imports.get("", 0) >= _SKETCH_OPSET
    if histogram and not sketch:
        data = _reiterable(data)  # a second pass over the data follows
    elif hasattr(data, "get_next"):  # an onnxruntime CalibrationDataReader, read once
        data = iter(data.get_next, None)
    parallel = workers is not None and (workers.kind == "ray" or workers.count > 1)
    if parallel and (sketch or not histogram) and hasattr(data, "__len__") and len(data) > 1:  # type: ignore[arg-type]
        ranges, sizes, count, sketches = _minmax_parallel(typed, list(data), names, quiet, sketch, workers)
    else:
        ranges, sizes, count, sketches = _minmax_phase(typed, data, names, quiet, sketch)
    # Tensors with an infinite bound (masks of -inf, overflow) get no range: they stay float.
    observed = [n for n in names if math.isfinite(ranges[n][0]) and math.isfinite(ranges[n][1])]
    hists = {}
    if histogram:
        if sketch:
            hists = {n: (sketches[n].counts, sketches[n].top) for n in observed}
        else:
            absmax = {n: max(abs(ranges[n][0]), abs(ranges[n][1])) for n in observed}
            chunked = _histogram_phase(typed, data, observed, absmax, sizes, num_bins, max_chunk_bytes, quiet)
            hists = {n: (chunked[n], absmax[n]) for n in observed}
    tables = {}
    for method in methods:
        table = {}
        for name in observed:
            lo, hi = ranges[name]
            if method != "minmax":
                bounds = (lo, hi) if asymmetric else None
                t = threshold_from_histogram(*hists[name], method, percentile=percentile, bounds=bounds)
                lo, hi = max(lo, -t), min(hi, t)
            table[name] = (float(lo), float(hi))
        logger.debug("calibrated %d tensors on %d feeds (%s)", len(table), count, method)
        tables[method] = CalibrationTable(table, method, count)
    return tables


def cached_ranges(
    model: ir.Model,
    data: Dataset | None,
    values: Sequence[str] | None = None,
    method: Method = "minmax",
    *,
    cache: MutableMapping[Any, Any] | None,
    quiet: bool = False,
    workers: Any = None,
    **kw: Any,
) -> CalibrationTable:
    """:func:`collect_ranges` on ``data``, cached in ``cache`` (a pass context's cache).

    The key is the method, its options, the tensors asked for and a fingerprint of the graph
    (nodes and the identity of every weight tensor), so a later pass asking the same of an
    unchanged model reuses the table, and a model that a pass rewrote in between is measured anew.

    Args:
        model: the model to calibrate (not modified).
        data: the calibration feeds.
        values: tensor names to observe (None: every float tensor).
        method: the calibration method.
        cache: where tables are kept between calls; None: nothing is cached.
        quiet: no progress bar.
        workers: where to collect (:func:`collect_ranges`); not part of the key (the same table).
        **kw: method options for :func:`collect_ranges` (``percentile``).

    Raises:
        DataError: no calibration data.

    """
    if data is None:
        raise DataError("calibration data is needed (pass --calib DATA or calibration=...)")
    key = (
        "calibration",
        method,
        tuple(sorted(kw.items())),
        tuple(values) if values is not None else None,
        fingerprint(model),
    )
    table = cache.get(key) if cache is not None else None
    if table is None:
        table = collect_ranges(model, data, values, method, quiet=quiet, workers=workers, **kw)
        if cache is not None:
            cache[key] = table
    return table


def method_options(method: str, *, percentile: float, asymmetric: bool) -> dict[str, Any]:
    """The options of ``method`` as :func:`cached_ranges` keys them (percentile, asymmetric mse)."""
    if method == "percentile":
        return {"percentile": percentile}
    if method == "mse" and asymmetric:
        return {"asymmetric": True}
    return {}


def cached_methods(
    model: ir.Model,
    data: Dataset | None,
    methods: Sequence[str] = METHODS,
    *,
    cache: MutableMapping[Any, Any] | None,
    quiet: bool = False,
    percentile: float = 99.99,
    asymmetric: bool = False,
    workers: Any = None,
) -> dict[str, CalibrationTable]:
    """Tables of several methods (every float tensor), missing ones from one pass over ``data``.

    Each is cached under the key :func:`cached_ranges` uses for that method with the options of
    :func:`method_options`, so either function finds what the other computed.
    """
    if data is None:
        raise DataError("calibration data is needed (pass --calib DATA or calibration=...)")
    fp = fingerprint(model)
    keys = {
        m: ("calibration", m, tuple(sorted(method_options(m, percentile=percentile, asymmetric=asymmetric).items())),
            None, fp)
        for m in methods
    }
    tables = {m: cache[keys[m]] for m in methods if cache is not None and keys[m] in cache}
    missing = [m for m in methods if m not in tables]
    if missing:
        got = collect_methods(model, data, None, missing, percentile=percentile, quiet=quiet, asymmetric=asymmetric,
                              workers=workers)  # fmt: skip
        for m in missing:
            tables[m] = got[m]
            if cache is not None:
                cache[keys[m]] = got[m]
    return tables


def fingerprint(model: ir.Model) -> tuple:
    """Changes when a pass rewrites nodes or changes a weight's values.

    Weights count by content (a digest), not identity: the quantize engine's SmoothQuant writes
    new weight tensors on every build, and ``mixed`` builds many plans of one model, each of
    which must find the calibration of the first (blake2b hashes ~1 GB/s: 0.1 s for a 90 MB
    encoder, small next to one calibration pass).
    """
    nodes = tuple((n.op_type, n.name, tuple(v.name for v in n.inputs if v is not None)) for n in model.graph)
    weights = tuple((name, _digest(v.const_value)) for name, v in model.graph.initializers.items())
    return nodes, weights


def _digest(tensor: ir.TensorProtocol | None) -> str:
    if tensor is None:
        return ""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    h.update(tensor.tobytes())
    return h.hexdigest()
