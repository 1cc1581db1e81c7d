"""Per-layer sparsity for gradual magnitude pruning (Deep Compression's prune -> retrain loop).

One global threshold ``t`` on each weight's magnitude *relative to its layer's spread*,
``|w| / std(W_layer)`` (Han et al. 2015 prune a layer at ``quality * std``), so a layer whose
BatchNorm folding left it at a small scale is not emptied by a raw-magnitude threshold (measured
on PP-OCR's direction classifier: 80 % global raw-magnitude pruning zeroed two whole layers).
Each layer's fraction is capped (``caps``: e.g. lower for depthwise and output layers, which
hold few weights per output); ``t`` rises until the weighted total reaches the target or every
layer sits at its cap. Pure numpy; the training between pruning steps lives with the caller.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["allocate", "prune_smallest"]


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
