"""Reference vs candidate on onnxruntime execution providers: fidelity, latency and size.

Both models run on the same feeds on each requested provider (``ORT_DISABLE_ALL`` by default,
so the graphs are compared as written). Per output: max abs, mean abs, RMS, max rel, relative L2,
cosine, the fraction of elements outside ``atol + rtol * |ref|``, non-finite values, and top-1
agreement for class-score outputs ([batch, classes]); with labels, the task accuracy of both.

Noise floor (``compare(..., noise_level=...)``): the reference also runs with onnxruntime's own
graph optimisations on, and its difference from itself, per output, is the float noise of *this*
machine's kernels on *this* model (onnxruntime folds BatchNorm into Conv, picks NCHWc layouts
and blocked GEMMs: the same re-associations a lossless rewrite makes). A lossless rewrite then
passes when, per output,

    every element: |cand - ref| <= atol + rtol * |ref| + NOISE_MULTIPLE * floor_max_abs
    and            rms(cand - ref) <= rtol * rms(ref) + atol + NOISE_MULTIPLE * floor_rms

With a zero floor (tiny models, where onnxruntime changes nothing) this is the plain
rtol/atol test. The RMS test catches coherent errors (a bias channel dropped, a 1e-3 error in
one channel) that stay below the largest single-element noise.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt import io as _io
from onnxopt.errors import ValidationFailed
from onnxopt.runtime import data as _data
from onnxopt.runtime import environment
from onnxopt.runtime import latency as _latency
from onnxopt.runtime import sessions as runtime

__all__ = [
    "NOISE_MULTIPLE",
    "OutputMetrics",
    "ValidationReport",
    "compare",
    "file_size",
    "output_metrics",
]

ModelLike = ir.Model | str | os.PathLike

# How far a lossless rewrite may deviate, in multiples of the reference's own noise floor.
# onnxruntime's optimised graph is one sample of a legitimate re-association; another one (more
# folds, other weights rounded) differs from it by a factor of order one: the maximum of N
# noise-like deviations grows as sqrt(2 ln N) times their spread, and a rewrite that rounds twice
# as many weights doubles the spread. 4 covers both. Measured on AMD EPYC (avx2, avx512f,
# avx512_vnni), onnxruntime 1.32.0, PP-OCR det, 8 check feeds: simplify's 58 folds reach 0.42x /
# 0.68x the floor (max abs / RMS) on calibration feeds and 1.26x / 1.90x on held-out ones; the
# bugs tests/test_noise_floor.py plants land at >= 39x.
NOISE_MULTIPLE = 4.0
CHUNK_VALUES = 1 << 22  # output_metrics works through outputs in float64 pieces of this many values


@dataclasses.dataclass
class OutputMetrics:
    """Fidelity of one output, over all feeds."""

    max_abs: float
    mean_abs: float
    max_rel: float
    rel_l2: float
    cosine: float
    mismatch_frac: float
    nonfinite: int
    top1: float | None = None
    ref_accuracy: float | None = None
    cand_accuracy: float | None = None
    rms_abs: float = 0.0  # root mean square of the difference
    ref_rms: float = 0.0  # root mean square of the reference (the scale rtol applies to)


def dot(a: np.ndarray, b: np.ndarray) -> float:
    """``a . b`` of 1-D arrays, the same bits whatever the BLAS thread count (einsum's own loop,
    not BLAS): a trial measured in a one-thread worker must equal the one measured here. Summed
    over pieces of :data:`CHUNK_VALUES`, as :func:`output_metrics` goes through outputs."""
    total = 0.0
    for i in range(0, max(a.size, 1), CHUNK_VALUES):
        total += float(np.einsum("i,i->", a[i : i + CHUNK_VALUES], b[i : i + CHUNK_VALUES]))
    return total


def norm(a: np.ndarray) -> float:
    """Euclidean norm of a 1-D array, thread-count independent as :func:`dot`."""
    return math.sqrt(dot(a, a))


def output_metrics(
    ref: Sequence[np.ndarray],
    cand: Sequence[np.ndarray],
    *,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    labels: np.ndarray | None = None,
) -> OutputMetrics:
    """Metrics of ``cand`` against ``ref``; each a list of per-feed arrays of the same shapes.

    ``top1``: for class scores [N, classes], the share of samples with the same top class; for
    probabilities over positions [N, positions, classes] (a softmax per step, as CTC
    recognisers end), the share whose top class agrees at every position.

    A sequence output (a list of arrays per feed) is compared element by element, flattened;
    a string output exactly: ``ref`` is taken as ones and ``cand`` as 1 where it agrees, 0
    where not (cosine 1 and max abs 0 only when every string matches).
    """
    for r, c in zip(ref, cand):
        if _shape(r) != _shape(c):
            raise ValueError(f"output shapes differ: reference {_shape(r)}, candidate {_shape(c)}")
    flat_a = [_flat(r) for r in ref]
    flat_b = [_flat(c) for c in cand]
    if any(x.dtype.kind in "OSU" for x in flat_a + flat_b):  # strings: agree or not
        same = [np.asarray(x == y, dtype=np.float64).ravel() for x, y in zip(flat_a, flat_b, strict=True)]
        flat_b = same
        flat_a = [np.ones_like(x) for x in same]
    size_a, size_b = sum(x.size for x in flat_a), sum(x.size for x in flat_b)
    if size_a == 0:  # nothing to compare: only the candidate's non-finite values count
        return OutputMetrics(0.0, 0.0, 0.0, 0.0, 1.0, 0.0, sum(
            int(np.count_nonzero(~np.isfinite(np.asarray(x, dtype=np.float64)))) for x in flat_b))
    if size_a != size_b:
        raise ValueError(f"output sizes differ: reference {size_a} values, candidate {size_b}")
    # In float64 chunks of at most 2**22 values, summed: the whole output in float64 at once cost
    # several copies of it (PP-OCR rec's [N, 40, 6625] on 2,500 samples: a 24 GB peak).
    acc = dict.fromkeys(("nonfinite", "abs", "aa", "bb", "ab", "dd", "sq", "rr", "mismatch"), 0.0)
    max_abs = max_rel = -math.inf
    with np.errstate(all="ignore"):
        for a, b in _chunks(flat_a, flat_b, CHUNK_VALUES):
            # Non-finite where the reference is finite: NaN/inf the input model makes itself is not a fault.
            acc["nonfinite"] += np.count_nonzero(~np.isfinite(b) & np.isfinite(a))
            diff = np.abs(a - b)
            diff[np.isnan(diff) & (np.isnan(a) & np.isnan(b))] = 0.0  # NaN in both: agree
            max_abs = _max(max_abs, float(np.max(diff)))
            max_rel = _max(max_rel, float(np.max(diff / np.maximum(np.abs(a), 1e-12))))
            acc["abs"] += float(np.sum(diff))
            acc["aa"] += dot(a, a)
            acc["bb"] += dot(b, b)
            acc["ab"] += dot(a, b)
            acc["dd"] += dot(a - b, a - b)
            acc["sq"] += float(np.sum(np.square(diff)))
            acc["rr"] += float(np.sum(np.square(a)))
            acc["mismatch"] += np.count_nonzero(~(diff <= atol + rtol * np.abs(a)))
        n = size_a
        mean_abs = acc["abs"] / n
        norm_a, norm_b = math.sqrt(acc["aa"]), math.sqrt(acc["bb"])
        rel_l2 = float(math.sqrt(acc["dd"]) / norm_a) if norm_a > 0 else (0.0 if norm_b == 0 else math.inf)
        if norm_a == 0 and norm_b == 0:
            cosine = 1.0
        elif norm_a == 0 or norm_b == 0:
            cosine = 0.0
        else:
            cosine = float(acc["ab"] / (norm_a * norm_b))
        mismatch = float(acc["mismatch"] / n)
        rms_abs = math.sqrt(acc["sq"] / n)
        ref_rms = math.sqrt(acc["rr"] / n)
        nonfinite = int(acc["nonfinite"])
    metrics = OutputMetrics(
        max_abs, mean_abs, max_rel, rel_l2, cosine, mismatch, nonfinite, rms_abs=rms_abs, ref_rms=ref_rms
    )
    if all(isinstance(r, np.ndarray) and r.ndim == 2 and r.shape[1] >= 2 for r in ref) and np.issubdtype(
        np.asarray(ref[0]).dtype, np.floating
    ):
        top_ref = np.concatenate([np.argmax(r, axis=1) for r in ref])
        top_cand = np.concatenate([np.argmax(c, axis=1) for c in cand])
        metrics.top1 = float(np.mean(top_ref == top_cand))
        if labels is not None and len(labels) == len(top_ref):
            metrics.ref_accuracy = float(np.mean(top_ref == labels))
            metrics.cand_accuracy = float(np.mean(top_cand == labels))
    elif all(isinstance(r, np.ndarray) and r.ndim == 3 and is_probability(r) for r in ref):
        # [N, positions, classes] softmax (a CTC recogniser): a sample agrees where its top class
        # agrees at every position, i.e. its greedy decoding is the same text.
        same = [np.all(np.argmax(r, axis=-1) == np.argmax(c, axis=-1), axis=1) for r, c in zip(ref, cand, strict=True)]
        metrics.top1 = float(np.mean(np.concatenate(same)))
    return metrics


def _chunks(flat_a: Sequence[np.ndarray], flat_b: Sequence[np.ndarray], size: int):
    """The two concatenations in float64, in aligned pieces ``[k * size, (k + 1) * size)``.

    The pieces follow positions in the whole concatenation, not the feeds, so that a sum over
    pieces is :func:`dot`'s sum over the concatenated array, bit for bit (a trial worker that
    holds the whole reference must measure what this measures)."""
    for start in range(0, sum(x.size for x in flat_a), size):
        yield _piece(flat_a, start, size), _piece(flat_b, start, size)


def _piece(flat: Sequence[np.ndarray], start: int, size: int) -> np.ndarray:
    parts, offset = [], 0
    for x in flat:
        lo, hi = max(start - offset, 0), min(start + size - offset, x.size)
        if lo < hi:
            parts.append(np.asarray(x[lo:hi], dtype=np.float64))
        offset += x.size
        if offset >= start + size:
            break
    return np.concatenate(parts) if len(parts) != 1 else parts[0]


def _max(x: float, y: float) -> float:
    """max that propagates NaN, as np.max over the whole array did."""
    return x if math.isnan(x) else (y if math.isnan(y) else max(x, y))


def is_probability(t: object) -> bool:
    """Whether ``t`` ([N, classes] or [N, positions, classes]) holds probabilities over its last
    axis (softmax output) rather than logits or features.

    The distill pass tempers such outputs as log-probabilities (tempering probabilities as if they
    were logits flattens them to near-uniform targets; PP-OCR's classifier and recogniser end in
    Softmax), and a 3-D one is a sequence of class decisions. The row-sum tolerance is float32
    rounding of a softmax over a few thousand classes (PP-OCR rec: 6,625).
    """
    if not isinstance(t, np.ndarray) or t.ndim not in (2, 3) or t.shape[-1] < 2 or not t.size:
        return False
    if not np.issubdtype(t.dtype, np.floating) or t.min() < 0:
        return False
    return bool(np.allclose(t.sum(axis=-1, dtype=np.float64), 1.0, atol=1e-3))


def _shape(x: Any) -> Any:
    """The shape of an array; for a sequence (list) the shapes of its elements; None: ()."""
    if isinstance(x, (list, tuple)):
        return tuple(_shape(e) for e in x)
    return () if x is None else np.shape(x)


def _flat(x: Any) -> np.ndarray:
    """An output's values as one flat array (a sequence's elements concatenated)."""
    if isinstance(x, (list, tuple)):
        parts = [_flat(e) for e in x]
        return np.concatenate(parts) if parts else np.zeros(0)
    return np.zeros(0) if x is None else np.asarray(x).ravel()


@dataclasses.dataclass
class ValidationReport:
    """Per provider and output: fidelity; per provider: latency; and file sizes."""

    outputs: dict[str, dict[str, OutputMetrics]]  # provider -> output name -> metrics
    latency: dict[str, dict[str, float]]  # provider -> {ref_median_ms, ref_p90_ms, cand_..., ratio}
    skipped_providers: list[str]
    sizes: dict[str, int]
    num_feeds: int
    rtol: float
    atol: float
    # The reference against itself at ``noise_level`` (provider -> output -> metrics), when measured.
    noise: dict[str, dict[str, OutputMetrics]] = dataclasses.field(default_factory=dict)
    noise_level: str | None = None

    def worst(self, field: str) -> float:
        """Worst value of a metric over providers and outputs (max for errors, min for cosine)."""
        values = [getattr(m, field) for per in self.outputs.values() for m in per.values()]
        values = [v for v in values if v is not None]
        if not values:
            return math.nan
        if field in ("cosine", "top1", "cand_accuracy"):
            return min(values, key=lambda v: -math.inf if math.isnan(v) else v)
        return max(values, key=lambda v: math.inf if math.isnan(v) else v)

    def failures(self, *, min_cosine: float | None = None, max_abs: float | None = None) -> list[str]:
        """Thresholds missed (and tolerance mismatches when neither threshold is given)."""
        missed = []
        for provider, per in self.outputs.items():
            for name, m in per.items():
                if m.nonfinite:
                    missed.append(f"{provider} output {name!r}: {m.nonfinite} non-finite values")
                if min_cosine is not None and not m.cosine >= min_cosine:
                    missed.append(f"{provider} output {name!r}: cosine {m.cosine:.6f} < {min_cosine}")
                if max_abs is not None and not m.max_abs <= max_abs:
                    missed.append(f"{provider} output {name!r}: max abs {m.max_abs:.3g} > {max_abs}")
                if min_cosine is None and max_abs is None:
                    missed += self._tolerance_misses(provider, name, m)
        return missed

    def _tolerance_misses(self, provider: str, name: str, m: OutputMetrics) -> list[str]:
        floor = self.noise.get(provider, {}).get(name)
        if floor is None:
            if m.mismatch_frac > 0:
                return [
                    f"{provider} output {name!r}: {m.mismatch_frac:.2%} of elements outside "
                    f"rtol={self.rtol}, atol={self.atol} (max abs {m.max_abs:.3g})"
                ]
            return []
        # mismatch_frac was counted against atol + NOISE_MULTIPLE * floor max abs (see compare).
        where = f"{provider} output {name!r}"
        noise = f"noise floor max abs {floor.max_abs:.3g}, rms {floor.rms_abs:.3g}"
        if m.mismatch_frac > 0:
            return [
                f"{where}: {m.mismatch_frac:.2%} of elements outside rtol={self.rtol}, atol={self.atol} "
                f"+ {NOISE_MULTIPLE:g} x noise floor (max abs {m.max_abs:.3g}; {noise})"
            ]
        rms_bound = self.rtol * m.ref_rms + self.atol + NOISE_MULTIPLE * _finite(floor.rms_abs)
        if not m.rms_abs <= rms_bound:
            return [
                f"{where}: rms deviation {m.rms_abs:.3g} > {rms_bound:.3g} = rtol x rms(ref) + atol "
                f"+ {NOISE_MULTIPLE:g} x noise floor rms ({noise})"
            ]
        return []

    def noise_multiples(self) -> tuple[float, float]:
        """Worst (max abs, RMS) deviation in multiples of the noise floor, over providers and
        outputs; (nan, nan) when no floor was measured, inf where the floor is zero."""
        worst = [math.nan, math.nan]
        for provider, per in self.outputs.items():
            for name, m in per.items():
                floor = self.noise.get(provider, {}).get(name)
                if floor is None:
                    continue
                for i, (dev, ref) in enumerate(((m.max_abs, floor.max_abs), (m.rms_abs, floor.rms_abs))):
                    ratio = dev / ref if ref > 0 else (0.0 if dev == 0 else math.inf)
                    if math.isnan(worst[i]) or ratio > worst[i]:
                        worst[i] = ratio
        return worst[0], worst[1]

    def assert_ok(self, *, min_cosine: float | None = None, max_abs: float | None = None) -> None:
        """Raise :class:`ValidationFailed` listing every missed threshold."""
        missed = self.failures(min_cosine=min_cosine, max_abs=max_abs)
        if missed:
            raise ValidationFailed("; ".join(missed))

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable dict, with the environment measured in (CPU, ISA flags, versions)."""
        return {
            "environment": environment.environment(),
            "num_feeds": self.num_feeds,
            "rtol": self.rtol,
            "atol": self.atol,
            "sizes": self.sizes,
            "skipped_providers": self.skipped_providers,
            "latency": self.latency,
            "outputs": {
                p: {n: dataclasses.asdict(m) for n, m in per.items()} for p, per in self.outputs.items()
            },
            "noise_level": self.noise_level,
            "noise_floor": {
                p: {n: {"max_abs": m.max_abs, "rms_abs": m.rms_abs} for n, m in per.items()}
                for p, per in self.noise.items()
            },
        }

    def table(self) -> str:
        """Human-readable summary, one line per provider and output."""
        lines = []
        s = self.sizes
        if s:
            lines.append(
                f"size: reference {s['reference_bytes']:,} B, candidate {s['candidate_bytes']:,} B "
                f"({s['candidate_bytes'] / max(s['reference_bytes'], 1):.3f}x)"
            )
        for provider, per in self.outputs.items():
            for name, m in per.items():
                extra = f" top1={m.top1:.4f}" if m.top1 is not None else ""
                if m.ref_accuracy is not None:
                    extra += f" acc ref={m.ref_accuracy:.4f} cand={m.cand_accuracy:.4f}"
                lines.append(
                    f"{provider} {name}: max_abs={m.max_abs:.3g} mean_abs={m.mean_abs:.3g} "
                    f"rel_l2={m.rel_l2:.3g} cosine={m.cosine:.6f}{extra}"
                )
            lat = self.latency.get(provider)
            if lat:
                lines.append(
                    f"{provider} latency ms: reference median {lat['ref_median_ms']:.3f} "
                    f"p90 {lat['ref_p90_ms']:.3f}, candidate median {lat['cand_median_ms']:.3f} "
                    f"p90 {lat['cand_p90_ms']:.3f} (ratio {lat['ratio']:.3f})"
                )
        for provider in self.skipped_providers:
            lines.append(f"{provider}: skipped (not available in this onnxruntime build)")
        return "\n".join(lines)


def file_size(model: ModelLike) -> int:
    """Bytes on disk of a model file plus its external data, or serialized bytes of an ir.Model."""
    if isinstance(model, ir.Model):
        if not runtime.fits_in_memory(model):
            return _io.model_nbytes(model)
        return _io.serialized_size(model)
    path = pathlib.Path(model)
    total = path.stat().st_size
    locations = {t.location for t in _io.external_tensors(_io.load_model(path))}
    for loc in locations:
        total += (path.parent / loc).stat().st_size
    return total


def _as_model(model: ModelLike) -> ir.Model:
    return model if isinstance(model, ir.Model) else _io.load_model(model)


def compare(
    reference: ModelLike,
    candidate: ModelLike,
    data: Any = None,
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    require_providers: bool = False,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    latency_runs: int = 0,
    warmup: int = 5,
    threads: int | None = None,
    opt_level: runtime.OptLevel = "disable",
    max_feeds: int | None = None,
    seed: int = 0,
    noise_level: runtime.OptLevel | None = None,
    noise: Mapping[str, dict[str, OutputMetrics]] | None = None,
) -> ValidationReport:
    """Run ``reference`` and ``candidate`` on ``data`` and measure how far apart they are.

    Args:
        reference: the original model (ir.Model or path).
        candidate: the optimized model.
        data: anything :func:`onnxopt.runtime.data.load_data` takes; ``None`` uses 4 seeded random feeds.
        providers: execution providers (short names allowed); unavailable ones are reported
            as skipped, or raise with ``require_providers``.
        require_providers: make a missing provider an error.
        rtol: relative tolerance for ``mismatch_frac``.
        atol: absolute tolerance for ``mismatch_frac``.
        latency_runs: if > 0, time each model on the first feed (median and p90 in ms).
        warmup: runs before timing.
        threads: intra-op threads (None: onnxruntime's default).
        opt_level: onnxruntime graph optimisation level for both sessions.
        max_feeds: use at most this many feeds.
        seed: for random data.
        noise_level: also run the reference at this optimisation level and hold the candidate
            to the noise-aware test (module docstring); the floor is in ``report.noise``.
        noise: a floor measured before on the same reference and feeds (``report.noise`` of an
            earlier call), instead of measuring it again.
    """
    ref_model = _as_model(reference)
    cand_model = _as_model(candidate)
    signature = _data.input_signature(ref_model)
    if data is None:
        dataset = _data.random_data(signature, 4, seed=seed)
    else:
        dataset = _data.load_data(data, signature)
    if max_feeds is not None and len(dataset) > max_feeds:
        dataset = dataset.take(max_feeds)  # keeps the labels of the feeds it keeps
    labels = dataset.labels
    feeds = list(dataset)
    available, skipped = runtime.resolve_providers(providers, require=require_providers)
    outputs: dict[str, dict[str, OutputMetrics]] = {}
    floors: dict[str, dict[str, OutputMetrics]] = {}
    latency: dict[str, dict[str, float]] = {}
    ref_bytes = _session_input(reference, ref_model)
    cand_bytes = _session_input(candidate, cand_model)
    for provider in available:
        kw = {"threads": threads, "opt_level": opt_level}
        # One session at a time, so a large model and its candidate are never both loaded.
        runs: list[tuple[list[str], list[dict[str, np.ndarray]], tuple[float, float]]] = []
        for model_bytes, model in ((ref_bytes, ref_model), (cand_bytes, cand_model)):
            with runtime.session(model_bytes, provider, low_memory=not _small(model), **kw) as s:
                out = runtime.run_all(s, feeds)
                timing = (
                    _latency.median_p90(s, feeds[0], runs=latency_runs, warmup=warmup)
                    if latency_runs > 0
                    else (math.nan, math.nan)
                )
                runs.append((s.output_names, out, timing))
        (ref_names, ref_out, (r_med, r_p90)), (cand_names, cand_out, (c_med, c_p90)) = runs
        if noise is not None and provider in noise:
            floors[provider] = dict(noise[provider])
        elif noise_level is not None:
            kw_noise = {"threads": threads, "opt_level": noise_level}
            with runtime.session(ref_bytes, provider, low_memory=not _small(ref_model), **kw_noise) as s:
                noisy = runtime.run_all(s, feeds)
            floors[provider] = {
                name: output_metrics([o[name] for o in ref_out], [o[name] for o in noisy])
                for name in ref_names
            }
        per: dict[str, OutputMetrics] = {}
        for name in ref_names:
            if name not in cand_names:
                raise ValidationFailed(f"candidate has no output {name!r}")
            floor = floors.get(provider, {}).get(name)
            per[name] = output_metrics(
                [o[name] for o in ref_out],
                [o[name] for o in cand_out],
                rtol=rtol,
                atol=atol + (NOISE_MULTIPLE * _finite(floor.max_abs) if floor is not None else 0.0),
                labels=labels,
            )
        outputs[provider] = per
        if latency_runs > 0:
            latency[provider] = {
                "ref_median_ms": r_med,
                "ref_p90_ms": r_p90,
                "cand_median_ms": c_med,
                "cand_p90_ms": c_p90,
                "ratio": c_med / r_med if r_med > 0 else math.nan,
            }
    sizes = {
        "reference_bytes": file_size(reference),
        "candidate_bytes": file_size(candidate),
    }
    level = noise_level if noise_level is not None else (None if not floors else "given")
    return ValidationReport(outputs, latency, skipped, sizes, len(feeds), rtol, atol, floors, level)


def _finite(value: float) -> float:
    """A floor that is NaN/inf (the reference itself makes NaN) allows nothing extra."""
    return value if math.isfinite(value) else 0.0


def _session_input(source: ModelLike, model: ir.Model) -> bytes | str | ir.Model:
    """Serialized bytes for a small model; for a large one its own file when it came as a path
    (no temp copy), else the ir.Model (which :func:`runtime.make_session` saves to a temp folder)."""
    if _small(model):
        return ir.to_proto(model).SerializeToString()
    return str(source) if isinstance(source, (str, os.PathLike)) else model


def _small(model: ir.Model) -> bool:
    # A model with external tensors cannot go to onnxruntime as bytes (relative locations).
    return runtime.fits_in_memory(model) and not _io.external_tensors(model)
