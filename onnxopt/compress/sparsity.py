"""Per-layer sparsity for gradual magnitude pruning (Deep Compression's prune -> retrain loop).

One global threshold ``t`` on each weight's magnitude *relative to its layer's spread*,
``|w| / std(W_layer)`` (Han et al. 2015 prune a layer at ``quality * std``), so a layer whose
BatchNorm folding left it at a small scale is not emptied by a raw-magnitude threshold (measured
on PP-OCR's direction classifier: 80 % global raw-magnitude pruning zeroed two whole layers).
Each layer's fraction is capped (``caps``: e.g. lower for depthwise and output layers, which
hold few weights per output); ``t`` rises until the weighted total reaches the target or every
layer sits at its cap.

:func:`allocate_by_sensitivity` allocates from measured curves instead (Han et al. 2015 chose
their per-layer thresholds from a sensitivity analysis): the caller prunes one tensor at a time
to a few fractions and measures a loss (e.g. KL to the unpruned model's outputs on held-back
data); one loss level is shared by every tensor, so insensitive tensors (PP-OCR cls's
squeeze-excitation layers: 44 % of its weights) take most of the pruning and sensitive ones
(its depthwise and projection layers) keep more. Pure numpy; the measuring and the training
between pruning steps live with the caller.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["allocate", "allocate_by_sensitivity", "allocate_uniform", "prune_smallest"]


def allocate(
    weights: Mapping[str, np.ndarray], target: float, caps: Mapping[str, float] | None = None
) -> dict[str, float]:
    """Per-tensor pruning fractions whose size-weighted mean is ``target`` (as near as caps allow).

    Args:
        weights: tensors by name (any shapes); a tensor of all-equal values has std 0 and is
            scored by raw magnitude.
        target: overall fraction of weights to remove, in [0, 1).
        caps: most any one tensor may lose (default 1.0); ``0`` leaves a tensor dense.

    Returns:
        ``{name: fraction}``; apply with :func:`prune_smallest`. When the caps cannot reach
        ``target`` every tensor is at its cap.

    Raises:
        ValueError: ``target`` outside [0, 1), a cap outside [0, 1], or no weights.

    """
    if not 0.0 <= target < 1.0:
        raise ValueError(f"target sparsity must be in [0, 1), got {target}")
    caps = dict(caps or {})
    for name, cap in caps.items():
        if not 0.0 <= cap <= 1.0:
            raise ValueError(f"cap of {name!r} must be in [0, 1], got {cap}")
    if not weights:
        raise ValueError("allocate needs at least one weight tensor")
    scores = {}
    for name, w in weights.items():
        a = np.abs(np.asarray(w, dtype=np.float64)).reshape(-1)
        spread = float(np.std(w))
        scores[name] = np.sort(a / spread if spread > 0 else a)
    total = sum(s.size for s in scores.values())
    need = round(target * total)

    def dropped(t: float) -> dict[str, int]:
        return {
            n: min(int(np.searchsorted(s, t, side="right")), int(np.floor(caps.get(n, 1.0) * s.size)))
            for n, s in scores.items()
        }

    candidates = np.unique(np.concatenate(list(scores.values())))
    lo, hi = 0, candidates.size - 1  # smallest threshold whose capped drop count reaches need
    while lo < hi:
        mid = (lo + hi) // 2
        if sum(dropped(candidates[mid]).values()) >= need:
            hi = mid
        else:
            lo = mid + 1
    counts = dropped(candidates[lo]) if need else dict.fromkeys(scores, 0)
    return {n: counts[n] / scores[n].size for n in scores}


def allocate_uniform(sizes: Sequence[int], caps: Sequence[float], need: int) -> list[float]:
    """One fraction ``f`` for every tensor (each at most its cap), the smallest whose zeros reach ``need``.

    Zeros per tensor are counted as :func:`prune_smallest` makes them (``round(f * size)``). When
    the caps cannot reach ``need`` every tensor is at its cap.
    """
    def removed(f: float) -> int:
        return sum(round(min(f, c) * n) for n, c in zip(sizes, caps, strict=True))

    lo, hi = 0.0, 1.0
    if removed(hi) < need:
        return list(caps)
    for _ in range(60):  # removed() is monotone in f
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if removed(mid) < need else (lo, mid)
    return [min(hi, c) for c in caps]


def allocate_by_sensitivity(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    sizes: Mapping[str, int],
    target: float,
    caps: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Per-tensor pruning fractions at one shared loss level, whose size-weighted mean is ``target``.

    Args:
        curves: ``{name: (fractions, losses)}``: the loss measured after pruning only that
            tensor to each fraction (fractions ascending in (0, 1]; at fraction 0 the loss is
            taken as 0). The loss is made monotone (running maximum) and interpolated
            linearly between the points; a tensor is never pruned beyond its last point.
        sizes: element count of every tensor in ``curves``.
        target: overall fraction of the weights in ``curves`` to remove, in [0, 1).
        caps: most any one tensor may lose (default 1.0); ``0`` leaves a tensor dense.

    Returns:
        ``{name: fraction}``: each tensor's largest fraction whose interpolated loss is at most
        ``eps``, for the smallest ``eps`` that reaches ``target`` (bisection). When the last
        points and caps cannot reach ``target`` every tensor is at min(last point, cap).

    Raises:
        ValueError: ``target`` outside [0, 1), a cap outside [0, 1], a curve with fractions
            not ascending in (0, 1], a negative or NaN loss, or no curves.

    """
    if not 0.0 <= target < 1.0:
        raise ValueError(f"target sparsity must be in [0, 1), got {target}")
    if not curves:
        raise ValueError("allocate_by_sensitivity needs at least one curve")
    caps = dict(caps or {})
    for name, cap in caps.items():
        if not 0.0 <= cap <= 1.0:
            raise ValueError(f"cap of {name!r} must be in [0, 1], got {cap}")
    points: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, (fractions, losses) in curves.items():
        f = np.asarray(fractions, dtype=np.float64)
        loss = np.asarray(losses, dtype=np.float64)
        if f.ndim != 1 or f.shape != loss.shape or f.size == 0:
            raise ValueError(f"curve of {name!r}: fractions and losses must be equal-length 1-D sequences")
        if f[0] <= 0.0 or f[-1] > 1.0 or (np.diff(f) <= 0).any():
            raise ValueError(f"curve of {name!r}: fractions must ascend within (0, 1], got {f.tolist()}")
        if np.isnan(loss).any() or (loss < 0).any():
            raise ValueError(f"curve of {name!r}: losses must be >= 0, got {loss.tolist()}")
        points[name] = (np.concatenate([[0.0], f]), np.maximum.accumulate(np.concatenate([[0.0], loss])))
    size = {n: int(sizes[n]) for n in points}
    total = sum(size.values())

    def fractions_at(eps: float) -> dict[str, float]:
        out = {}
        for n, (f, loss) in points.items():
            i = int(np.searchsorted(loss, eps, side="right")) - 1  # last point with loss <= eps
            frac = f[i]
            if i + 1 < f.size and loss[i + 1] > loss[i]:  # part of the way to the next point
                frac += (eps - loss[i]) / (loss[i + 1] - loss[i]) * (f[i + 1] - f[i])
            out[n] = min(float(frac), caps.get(n, 1.0))
        return out

    def removed(eps: float) -> float:
        return sum(fr * size[n] for n, fr in fractions_at(eps).items())

    need = target * total
    if need == 0:
        return dict.fromkeys(points, 0.0)
    hi = max(float(loss[-1]) for _, loss in points.values())
    if removed(hi) < need:
        return fractions_at(hi)
    lo = 0.0
    for _ in range(100):  # removed() is monotone in eps
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if removed(mid) < need else (lo, mid)
    return fractions_at(hi)


def prune_smallest(w: np.ndarray, fraction: float) -> np.ndarray:
    """A copy of ``w`` with its ``round(fraction * size)`` smallest-magnitude entries set to 0.

    Entries already zero count as the smallest, so pruning an already pruned tensor to a
    higher fraction keeps the earlier zeros (the masks of a gradual schedule only grow).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    flat = np.array(w, copy=True).reshape(-1)
    n = round(fraction * flat.size)
    if n:
        flat[np.argpartition(np.abs(flat), n - 1)[:n]] = 0
    return flat.reshape(np.shape(w))
