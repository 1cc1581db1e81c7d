"""Pure numpy for low-rank factorisation: plain and activation-aware SVD, rank selection.

Algebra. A dense layer computes ``Y = X @ W`` with ``W`` of shape [K, N]. A rank-r split
replaces it by ``(X @ U) @ V`` with ``U`` [K, r] and ``V`` [r, N].

- Plain SVD minimises ``||W - U V||_F``: with ``W = P diag(s) Q^T`` keep the r largest s.
- Activation-aware SVD minimises ``||X W - X U V||_F`` over calibration activations. With the
  second moment ``G = X^T X = S S^T`` (Cholesky, or eigen-decomposition when Cholesky fails),
  ``||X A||_F = ||S^T A||_F`` for every A, so the best rank-r ``U V`` comes from the truncated
  SVD of ``S^T W = P diag(s) Q^T``: ``U V = S^-T P_r diag(s_r) Q_r^T``. Its relative output
  error on the calibration data is exactly ``sqrt(sum_{i>r} s_i^2 / sum_i s_i^2)``.
  A small damping ``G + d * mean(diag G) * I`` keeps ``S`` invertible; activations that are all
  zero or non-finite fall back to the plain SVD.
- Any decomposition here is ``W = L diag(s) R`` with orthonormal rows in ``R``, so the output
  error at rank r is ``sum_{i>r} s_i^2 * (l_i^T G l_i) / tr(W^T G W)`` — one curve per layer,
  used by every rank-selection rule.
- Least-squares re-fit of V for a chosen U: ``V = (U^T G U)^-1 U^T G W``.
- Error-compensated fit (sequential, as GPTQ / SVD-LLM v2 do for upstream error): once the
  layers before this one are split, the layer sees ``X'`` instead of ``X``. The rank-r ``A``
  minimising ``||X W - X' A||^2 + d ||A - W||^2`` (d = damping * mean(diag G'), a ridge towards
  ``W`` that keeps directions the calibration rows never visit as they were) is found in two
  closed-form steps: the unconstrained optimum ``A0 = (G' + d I)^-1 (X'^T X W + d W)``, then the
  best rank-r approximation of ``A0`` in the metric ``G' + d I`` (the whitened SVD above, with
  ``G'`` for ``G``), because the objective equals ``tr((A0 - A)^T (G' + d I) (A0 - A))`` plus a
  constant. With ``X' = X`` it is the activation-aware split itself.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "Decomposition",
    "LayerBudget",
    "allocate_ranks",
    "compensated_target",
    "decompose",
    "output_rel_error",
    "rank_for_energy",
    "rank_for_error",
    "rank_for_ratio",
    "refit_v",
    "weight_rel_error",
    "whiten",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Whitening:
    """``S^T`` and ``S^-T`` with ``S S^T = G + damping``; ``method`` is cholesky or eigen."""

    s_t: np.ndarray
    s_t_inv: np.ndarray
    method: str


@dataclasses.dataclass(frozen=True)
class Decomposition:
    """``W = left @ diag(sigma) @ right`` with singular values in decreasing order.

    Attributes:
        left: [K, m] (orthonormal columns for plain SVD; ``S^-T P`` when whitened).
        sigma: [m] singular values (of ``W`` or of ``S^T W``).
        right: [m, N] with orthonormal rows.
        method: "plain", or "aware-cholesky" / "aware-eigen" (whitened).
        note: why an activation-aware request fell back to plain, else "".

    """

    left: np.ndarray
    sigma: np.ndarray
    right: np.ndarray
    method: str
    note: str = ""

    @property
    def max_rank(self) -> int:
        """Number of singular values kept (min(K, N))."""
        return int(self.sigma.shape[0])

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """(U [K, r], V [r, N]) with the singular values split evenly between the two."""
        root = np.sqrt(self.sigma[:rank])
        return self.left[:, :rank] * root[None, :], root[:, None] * self.right[:rank]

    def error_curve(self, gram: np.ndarray | None) -> np.ndarray:
        """Relative error at every rank 0..m: output error with ``gram``, weight error without.

        Entry r is ``||A (W - U_r V_r)|| / ||A W||`` with ``A^T A = gram`` (or A = I).
        """
        if gram is None:
            energy = self.sigma**2 * np.einsum("km,km->m", self.left, self.left)
        else:
            energy = self.sigma**2 * np.sum((gram @ self.left) * self.left, axis=0)
        energy = np.maximum(energy, 0.0)
        total = float(energy.sum())
        tail = np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]])
        if total <= 0.0:
            return np.zeros(self.max_rank + 1)
        return np.sqrt(tail / total)


def whiten(gram: np.ndarray, damping: float) -> Whitening | str:
    """``S^T`` and its inverse for ``S S^T = gram + damping * mean(diag) * I``, or a reason string.

    Cholesky first; if it fails (not positive definite in floating point), an eigen-
    decomposition with eigenvalues clipped at ``max(damping, 1e-10) * max eigenvalue``.
    """
    k = gram.shape[0]
    if not np.all(np.isfinite(gram)):
        return "activation second moment is not finite"
    scale = float(np.trace(gram)) / k
    if scale <= 0.0:
        return "activations are all zero on the calibration data"
    damped = gram + damping * scale * np.eye(k)
    try:
        chol = np.linalg.cholesky(damped)  # damped = L L^T, so S = L
        s_t = chol.T
        inv = np.linalg.solve(s_t, np.eye(k))
        if np.all(np.isfinite(inv)):
            return Whitening(s_t, inv, "cholesky")
    except np.linalg.LinAlgError:
        logger.debug("Cholesky of the activation second moment failed; using eigh")
    lam, q = np.linalg.eigh((damped + damped.T) / 2)
    lam = np.maximum(lam, max(damping, 1e-10) * float(lam.max()))
    root = np.sqrt(lam)
    return Whitening(root[:, None] * q.T, q / root[None, :], "eigen")


def decompose(
    weight: np.ndarray, gram: np.ndarray | None = None, *, damping: float = 1e-4
) -> Decomposition:
    """SVD of ``weight`` [K, N] (float64), whitened by ``gram`` [K, K] when given.

    Falls back to the plain SVD (with ``note`` saying why) when ``gram`` cannot whiten.
    """
    w = np.asarray(weight, dtype=np.float64)
    note = ""
    if gram is not None:
        white = whiten(np.asarray(gram, dtype=np.float64), damping)
        if isinstance(white, Whitening):
            p, s, qt = np.linalg.svd(white.s_t @ w, full_matrices=False)
            return Decomposition(white.s_t_inv @ p, s, qt, f"aware-{white.method}")
        note = white
    p, s, qt = np.linalg.svd(w, full_matrices=False)
    return Decomposition(p, s, qt, "plain", note)


def refit_v(weight: np.ndarray, u: np.ndarray, gram: np.ndarray, *, damping: float = 1e-6) -> np.ndarray:
    """Least-squares ``V = argmin ||X W - X U V||`` for fixed ``U``: ``(U^T G U)^-1 U^T G W``."""
    gu = gram @ u
    normal = u.T @ gu
    normal = normal + damping * (np.trace(normal) / max(normal.shape[0], 1)) * np.eye(normal.shape[0])
    return np.linalg.solve(normal, gu.T @ np.asarray(weight, dtype=np.float64))


def compensated_target(
    weight: np.ndarray, gram_in: np.ndarray, cross: np.ndarray, *, damping: float
) -> np.ndarray:
    """``A0 = (G' + d I)^-1 (C W + d W)``: the full-rank ``A`` closest to ``X W`` from ``X'``.

    ``gram_in`` is ``G' = X'^T X'``, ``cross`` is ``C = X'^T X`` and ``d = damping * mean(diag
    G')`` (see the module docstring). Returns ``weight`` itself when ``G'`` is zero or not finite.
    """
    w = np.asarray(weight, dtype=np.float64)
    k = gram_in.shape[0]
    scale = float(np.trace(gram_in)) / k
    if not (np.all(np.isfinite(gram_in)) and np.all(np.isfinite(cross)) and scale > 0.0):
        return w
    d = max(damping, 1e-10) * scale
    return np.linalg.solve(gram_in + d * np.eye(k), cross @ w + d * w)


def weight_rel_error(weight: np.ndarray, u: np.ndarray, v: np.ndarray) -> float:
    """``||W - U V||_F / ||W||_F``."""
    w = np.asarray(weight, dtype=np.float64)
    norm = float(np.linalg.norm(w))
    return float(np.linalg.norm(w - u.astype(np.float64) @ v.astype(np.float64)) / norm) if norm else 0.0


def output_rel_error(weight: np.ndarray, u: np.ndarray, v: np.ndarray, gram: np.ndarray) -> float:
    """``||X (W - U V)||_F / ||X W||_F`` on the activations whose second moment is ``gram``."""
    w = np.asarray(weight, dtype=np.float64)
    e = w - u.astype(np.float64) @ v.astype(np.float64)
    num = float(np.sum((gram @ e) * e))
    den = float(np.sum((gram @ w) * w))
    return math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0


def rank_for_ratio(ratio: float, k: int, n: int) -> int:
    """``ceil(ratio * min(K, N))``, at least 1."""
    return max(1, math.ceil(ratio * min(k, n) - 1e-9))


def rank_for_energy(sigma: np.ndarray, energy: float) -> int:
    """Smallest r whose singular values keep at least ``energy`` of ``sum(sigma^2)``."""
    power = np.cumsum(np.asarray(sigma, dtype=np.float64) ** 2)
    if power[-1] <= 0:
        return 1
    return int(np.searchsorted(power / power[-1], energy - 1e-12) + 1)


def rank_for_error(curve: np.ndarray, max_rel_error: float) -> int:
    """Smallest r >= 1 whose relative error (``curve[r]``) is at most ``max_rel_error``."""
    ok = np.nonzero(curve[1:] <= max_rel_error)[0]
    return int(ok[0] + 1) if ok.size else len(curve) - 1


@dataclasses.dataclass(frozen=True)
class LayerBudget:
    """One layer for :func:`allocate_ranks`.

    Attributes:
        curve: relative error at ranks 0..m (``Decomposition.error_curve``).
        k: input features.
        n: output features.
        max_rank: largest rank allowed to split (where the split still pays).
        weight: cost multiplier (1 for parameters; rows per sample for FLOPs).

    """

    curve: np.ndarray
    k: int
    n: int
    max_rank: int
    weight: float = 1.0


def allocate_ranks(layers: Sequence[LayerBudget], target: float) -> tuple[list[int | None], float]:
    """Ranks (None = leave unsplit) removing at least ``target`` of the layers' total cost.

    Sensitivity allocation by a Lagrangian: each layer takes the rank minimising
    ``curve[r]^2 + lam * cost(r) / total``, and ``lam`` is bisected to the smallest value that
    meets the target, so the cheapest error per removed parameter (or FLOP) goes first.
    Returns the ranks and the fraction actually removed (lower than ``target`` if unreachable).
    """
    total = sum(layer.k * layer.n * layer.weight for layer in layers)
    if total <= 0 or not layers:
        return [None] * len(layers), 0.0

    options = []  # per layer: (squared error at ranks 1..max_rank, their costs, unsplit cost)
    for layer in layers:
        ranks_ = np.arange(1, layer.max_rank + 1)
        options.append(
            (
                np.asarray(layer.curve[1 : layer.max_rank + 1], dtype=np.float64) ** 2,
                ranks_ * (layer.k + layer.n) * layer.weight / total,
                layer.k * layer.n * layer.weight / total,
            )
        )

    def choose(lam: float) -> tuple[list[int | None], float]:
        ranks: list[int | None] = []
        kept = 0.0
        for err2, cost, full in options:
            if err2.size:
                score = err2 + lam * cost
                i = int(np.argmin(score))
                if score[i] < lam * full:
                    ranks.append(i + 1)
                    kept += float(cost[i])
                    continue
            ranks.append(None)
            kept += full
        return ranks, 1.0 - kept

    lo, hi = 0.0, 1.0
    ranks, removed = choose(hi)
    while removed < target and hi < 1e12:
        hi *= 4.0
        ranks, removed = choose(hi)
    if removed < target:
        return ranks, removed
    for _ in range(60):
        mid = (lo + hi) / 2
        if choose(mid)[1] >= target:
            hi = mid
        else:
            lo = mid
    return choose(hi)
