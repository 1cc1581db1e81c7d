"""The torch side of the distill pass: constrained parameters, the loss, the training loop.

Constraints (detected per initializer from its values, :func:`make_param`):

- **codebook** (clustered: at most ``max_codebook`` distinct values per tensor or per output
  channel, each shared by >= 4 elements on average): trained as Deep Compression's trained
  quantization: ``W = theta[idx]`` with fixed indices, so the gradient of a centroid is the sum
  of its members' gradients and ``len(unique(W))`` can only stay or shrink. A zero centroid is
  frozen (pruned weights stay zero).
- **masked** (pruned: some exact zeros): gradient multiplied by the mask, mask re-applied after
  every step, so zeros stay exactly zero.
- **free**: any other float32 tensor. Low-rank factors are ordinary initializers and keep their
  shapes (shapes never change).

Loss (Hinton et al. 2015), per batch: ``(1 - alpha) * CE(labels, s0) + alpha * sum_o L_o`` with
``L_o = tau^2 * KL(softmax(t_o / tau) || softmax(s_o / tau))`` for class-score outputs
(rank 2, >= 2 columns; ``loss="kl"``) and MSE (``"mse"``) or ``1 - cosine`` (``"cosine"``)
otherwise; ``alpha = 1`` where there are no labels. Imports torch: only imported by the
distill pass inside ``call``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the usual torch alias
import tqdm

from onnxopt.distill.torch_graph import TorchGraph
from onnxopt.runtime.validation import is_probability

__all__ = [
    "ConstrainedParam",
    "TrainResult",
    "TrainSettings",
    "depends_on_params",
    "distill_loss",
    "make_param",
    "predict",
    "train",
]

logger = logging.getLogger(__name__)
LossKind = Literal["auto", "kl", "mse", "cosine"]


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Hyper-parameters of one distillation run (validated by the pass config)."""

    tau: float = 4.0
    alpha: float = 0.9
    epochs: int = 30
    lr: float = 1e-3
    batch_size: int = 64
    static_batch: int = 0  # > 0: the model's batch axis is fixed; every batch has exactly this size
    patience: int = 5
    seed: int = 0
    loss: LossKind = "auto"
    max_codebook: int = 256
    threads: int = 0
    quiet: bool = False
    hints: tuple[str, ...] = ()  # intermediate values matched to the teacher's (FitNets)
    hint_weight: float = 1.0
    warmup: float = 0.0  # > 0: per-batch schedule, linear warm-up over this share of the steps, then cosine


class ConstrainedParam:
    """One trainable initializer under its compression constraint."""

    def __init__(self, name: str, w: np.ndarray, kind: str, theta: np.ndarray, idx: np.ndarray | None) -> None:
        self.name = name
        self.kind = kind  # codebook | masked | free
        self.shape = w.shape
        self.theta = torch.nn.Parameter(torch.from_numpy(theta.astype(np.float32)))
        self.idx = torch.from_numpy(idx.astype(np.int64)) if idx is not None else None
        # Entries of theta that must stay exactly zero (pruned weights, zero centroids).
        self.keep = (self.theta.detach() != 0).to(torch.float32)
        self.codebook_size = int(theta.size) if kind == "codebook" else 0

    def weight(self) -> torch.Tensor:
        """The full tensor, differentiable with respect to ``theta``."""
        if self.idx is None:
            return self.theta.reshape(self.shape)
        return self.theta[self.idx].reshape(self.shape)

    def mask_grad(self) -> None:
        """Zero the gradient of entries that must stay zero (call before the optimiser step)."""
        if self.kind != "free" and self.theta.grad is not None:
            self.theta.grad.mul_(self.keep)

    def project(self) -> None:
        """Re-apply the zero constraint after a step (weight decay or momentum cannot move it)."""
        if self.kind != "free":
            with torch.no_grad():
                self.theta.mul_(self.keep)

    def numpy(self) -> np.ndarray:
        """The constrained tensor as float32 numpy, in the original shape."""
        with torch.no_grad():
            return self.weight().detach().numpy().astype(np.float32).reshape(self.shape)


def make_param(name: str, w: np.ndarray, max_codebook: int = 256) -> ConstrainedParam:
    """Detect ``w``'s constraint (codebook per tensor or per channel, zero mask, or none)."""
    w = np.asarray(w, dtype=np.float32)
    values, inverse = np.unique(w, return_inverse=True)
    if _shared(values.size, w.size, max_codebook):
        return ConstrainedParam(name, w, "codebook", values, inverse.reshape(-1))
    for axis in sorted({0, w.ndim - 1}) if w.ndim >= 2 else ():
        moved = np.moveaxis(w, axis, 0)
        rows = moved.reshape(moved.shape[0], -1)
        per_row = [np.unique(r, return_inverse=True) for r in rows]
        if _shared(max(u.size for u, _ in per_row), rows.shape[1], max_codebook):
            offsets = np.cumsum([0] + [u.size for u, _ in per_row[:-1]])
            theta = np.concatenate([u for u, _ in per_row])
            idx = np.stack([inv.reshape(-1) + off for (_, inv), off in zip(per_row, offsets, strict=True)])
            idx = np.moveaxis(idx.reshape(moved.shape), 0, axis).reshape(-1)
            return ConstrainedParam(name, w, "codebook", theta, idx)
    if (w == 0).any():
        return ConstrainedParam(name, w, "masked", w.reshape(-1).copy(), None)
    return ConstrainedParam(name, w, "free", w.reshape(-1).copy(), None)


def _shared(distinct: int, size: int, max_codebook: int) -> bool:
    return 1 < distinct <= max_codebook and size >= 4 * distinct


@dataclasses.dataclass
class TrainResult:
    """What training did: the best weights (by held-out loss) and the loss history."""

    weights: dict[str, np.ndarray]
    epochs_run: int
    best_epoch: int
    history: list[dict[str, float]]
    stopped_early: bool


def _kinds(teacher: Sequence[np.ndarray], loss: LossKind) -> list[str]:
    """Loss per output; ``kl_prob`` where the model already ends in a softmax."""
    if loss == "auto":
        # [N, classes] scores, or [N, positions, classes] probabilities (a CTC recogniser's
        # per-step softmax): KL per row / position. Other 3-D outputs (hidden states) stay MSE, and
        # so do independent per-class probabilities (sigmoid scores: all in [0, 1], rows not summing
        # to 1, e.g. CREPE's 360 pitch bins), which a softmax over them would flatten to near-uniform.
        kinds = ["kl" if ((t.ndim == 2 and t.shape[1] >= 2 and not _independent_probabilities(t))
                          or (t.ndim == 3 and is_probability(t))) else "mse"
                 for t in teacher]
    else:
        kinds = [loss] * len(teacher)
    return ["kl_prob" if k == "kl" and is_probability(t) else k for k, t in zip(kinds, teacher, strict=True)]


def _independent_probabilities(t: np.ndarray) -> bool:
    """Scores in [0, 1] that are not a distribution over the last axis (a sigmoid output)."""
    return bool(t.size) and float(t.min()) >= 0.0 and float(t.max()) <= 1.0 and not is_probability(t)


def distill_loss(
    student: Sequence[torch.Tensor],
    teacher: Sequence[torch.Tensor],
    labels: torch.Tensor | None,
    kinds: Sequence[str],
    tau: float,
    alpha: float,
    hints: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
    hint_weight: float = 1.0,
) -> torch.Tensor:
    """``(1 - alpha) * CE(labels, student[0]) + alpha * (sum of per-output distillation terms
    + hint_weight * mean of the hint terms)``.

    A hint term (FitNets, Romero et al. 2015) is the MSE between the student's and the
    teacher's intermediate features divided by the teacher features' variance, so each hint
    weighs about as much as one normalised output term whatever its scale.
    """
    total = torch.zeros(())
    if hints:
        terms = [F.mse_loss(s, t.to(s.dtype)) / (t.var() + 1e-12) for s, t in hints]
        total = total + hint_weight * sum(terms) / len(terms)
    for s, t, kind in zip(student, teacher, kinds, strict=True):
        if not s.dtype.is_floating_point:
            continue  # integer/bool outputs carry no gradient
        t = t.to(s.dtype)
        if kind == "kl_prob":  # log-probabilities are logits up to a per-row constant
            s = torch.log(s.clamp_min(1e-12))
            t = torch.log(t.clamp_min(1e-12))
        if kind in ("kl", "kl_prob"):
            s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])  # one distribution per row / position
            log_p_s = F.log_softmax(s / tau, dim=-1)
            log_p_t = F.log_softmax(t / tau, dim=-1)
            term = tau * tau * F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
        elif kind == "cosine":
            term = (1 - F.cosine_similarity(s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1), dim=1)).mean()
        else:
            term = F.mse_loss(s, t) / (t.var() + 1e-12)
        total = total + term
    if labels is None:
        return total
    logits = torch.log(student[0].clamp_min(1e-12)) if kinds[0] == "kl_prob" else student[0]
    return (1 - alpha) * F.cross_entropy(logits, labels) + alpha * total


def train(
    graph: TorchGraph,
    params: Sequence[ConstrainedParam],
    inputs: Mapping[str, np.ndarray],
    teacher: Sequence[np.ndarray],
    labels: np.ndarray | None,
    val_index: np.ndarray,
    settings: TrainSettings,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train ``params`` of ``graph`` towards the cached ``teacher`` outputs.

    Args:
        graph: the student as a torch evaluator.
        params: the trainable initializers with their constraints.
        inputs: sample arrays per input name (axis 0 = samples).
        teacher: teacher outputs per graph output, computed once (axis 0 = samples).
        labels: integer class labels per sample, or None.
        val_index: samples held out for early stopping (may be empty: no early stopping).
        settings: hyper-parameters.
        on_epoch: called with each epoch's losses.

    """
    threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        return _train(graph, params, inputs, teacher, labels, val_index, settings, on_epoch)
    finally:
        torch.set_num_threads(threads)


def _train(
    graph: TorchGraph,
    params: Sequence[ConstrainedParam],
    inputs: Mapping[str, np.ndarray],
    teacher: Sequence[np.ndarray],
    labels: np.ndarray | None,
    val_index: np.ndarray,
    settings: TrainSettings,
    on_epoch: Callable[[dict[str, float]], None] | None,
) -> TrainResult:
    torch.manual_seed(settings.seed)
    n = next(iter(inputs.values())).shape[0]
    train_index = np.setdiff1d(np.arange(n), val_index)
    x = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.items()}
    hints = tuple(settings.hints)
    n_out = len(teacher) - len(hints)  # teacher: graph outputs, then the hint features
    t = [torch.from_numpy(np.ascontiguousarray(v)) for v in teacher]
    y = torch.from_numpy(labels.astype(np.int64)) if labels is not None else None
    kinds = _kinds(teacher[:n_out], settings.loss)
    optimizer = torch.optim.Adam([p.theta for p in params], lr=settings.lr)
    rng = np.random.default_rng(settings.seed)
    size = settings.static_batch or settings.batch_size
    # Batches per epoch as the loop below takes them (a static batch drops the ragged end).
    per_epoch = max(1, len(train_index) // size if settings.static_batch else -(-len(train_index) // size))
    if settings.warmup > 0:
        # One cycle per run (Smith 2018): the LR rises from 0 so that the first steps after a
        # pruning cut do not throw the kept weights far, then decays by a cosine to 0.
        steps = settings.epochs * per_epoch
        rise = max(1, round(settings.warmup * steps))

        def factor(step: int) -> float:
            if step < rise:
                return (step + 1) / rise
            return 0.5 * (1 + math.cos(math.pi * (step - rise) / max(1, steps - rise)))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    else:
        # Cosine decay over the epoch budget: large steps first, small ones to settle at the end.
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs)
    classes = kinds[0] in ("kl", "kl_prob") and t[0].ndim in (2, 3)
    out_values = sum(math.prod(v.shape[1:]) for v in t)  # per sample, outputs and hint features

    def forward(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        ti = torch.from_numpy(idx)
        weights = {p.name: p.weight() for p in params}
        out = graph({k: v[ti] for k, v in x.items()}, weights, extra=hints)
        pairs = [(s, v[ti]) for s, v in zip(out[n_out:], t[n_out:], strict=True)]
        loss = distill_loss(
            out[:n_out], [v[ti] for v in t[:n_out]], y[ti] if y is not None else None, kinds,
            settings.tau, settings.alpha, pairs, settings.hint_weight,
        )
        return loss, out[0]

    def evaluate(idx: np.ndarray) -> tuple[float, float]:
        """Held-out (loss, top-1 agreement with the teacher, per position for sequences; 1.0
        where outputs are not classes)."""
        with torch.no_grad():
            # At most 2**24 output values per chunk (64 MiB in float32), since the loss makes several
            # temporaries of the outputs' size: PP-OCR rec's [40, 6625] per sample gives chunks of
            # 63 samples; a classifier still gets 512.
            size = settings.static_batch or max(1, min(512, 2**24 // max(1, out_values)))
            stop = len(idx) - len(idx) % size if settings.static_batch else len(idx)
            loss, agree = 0.0, 0.0
            for i in range(0, stop, size):
                chunk = idx[i : i + size]
                value, first = forward(chunk)
                loss += value.item() * len(chunk)
                if classes:
                    # Sequences: the share of positions whose top class agrees. "Every position"
                    # is too coarse to steer by: one changed step of a CTC path, often one that
                    # decodes the same, drops a whole sample, and training that lowers the loss
                    # can lower it (PP-OCR rec: no epoch was ever kept).
                    same = (first.argmax(-1) == t[0][torch.from_numpy(chunk)].argmax(-1)).float()
                    agree += float(same.reshape(len(chunk), -1).mean(dim=1).sum())
            count = max(stop, 1)
            return loss / count, agree / count if classes else 1.0

    def key(loss: float, agree: float) -> tuple[float, float]:
        # Early stopping on what the user sees: held-out decisions agreeing with the teacher,
        # the held-out loss breaking ties (and deciding alone for outputs that are not classes).
        return (-agree, loss)

    if len(val_index):
        loss0, agree0 = evaluate(val_index)
        best = key(loss0, agree0)
    else:
        best = (math.inf, math.inf)
    best_state = [p.theta.detach().clone() for p in params]
    best_epoch, waited, history = 0, 0, []
    stopped = False
    bar = tqdm.trange(settings.epochs, desc="distill", unit="epoch", disable=settings.quiet, leave=False)
    for epoch in bar:
        order = train_index[rng.permutation(len(train_index))]
        running = 0.0
        for start in range(0, len(order) - len(order) % size if settings.static_batch else len(order), size):
            idx = order[start : start + size]
            optimizer.zero_grad()
            loss, _ = forward(idx)
            loss.backward()
            for p in params:
                p.mask_grad()
            optimizer.step()
            for p in params:
                p.project()
            running += loss.item() * len(idx)
            if settings.warmup > 0:
                schedule.step()
        if settings.warmup <= 0:
            schedule.step()
        row = {"epoch": epoch + 1, "train_loss": running / max(len(order), 1), "lr": schedule.get_last_lr()[0]}
        if len(val_index):
            row["val_loss"], row["val_agreement"] = evaluate(val_index)
        history.append(row)
        bar.set_postfix({k: f"{v:.1e}" if k == "lr" else round(v, 4) for k, v in row.items() if k != "epoch"})
        if on_epoch is not None:
            on_epoch(row)
        if not math.isfinite(row.get("val_loss", 0.0)) or not math.isfinite(row["train_loss"]):
            stopped = True  # a non-finite loss (e.g. masked -inf logits): keep the best weights so far
            break
        score = key(row["val_loss"], row["val_agreement"]) if len(val_index) else (row["train_loss"], 0.0)
        if score < best or not len(val_index):
            best, best_epoch, waited = score, epoch + 1, 0
            best_state = [p.theta.detach().clone() for p in params]
        else:
            waited += 1
            if settings.patience and waited >= settings.patience:
                stopped = True
                break
    with torch.no_grad():
        for p, state in zip(params, best_state, strict=True):
            p.theta.copy_(state)
    weights = {p.name: p.numpy() for p in params}
    return TrainResult(weights, len(history), best_epoch, history, stopped)


def depends_on_params(graph: TorchGraph, params: Sequence[ConstrainedParam], inputs: Mapping[str, np.ndarray]) -> bool:
    """Whether some float output has a gradient path to a trainable parameter."""
    weights = {p.name: p.weight() for p in params}
    feeds = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.items()}
    return any(o.requires_grad and o.dtype.is_floating_point for o in graph(feeds, weights))


def predict(
    graph: TorchGraph,
    params: Sequence[ConstrainedParam],
    inputs: Mapping[str, np.ndarray],
    size: int = 256,
    extra: Sequence[str] = (),
) -> list[np.ndarray]:
    """The student's outputs (torch) with the current parameters, ``size`` samples at a time,
    followed by the intermediate values named in ``extra``."""
    n = next(iter(inputs.values())).shape[0]
    chunks = []
    with torch.no_grad():
        weights = {p.name: p.weight() for p in params}
        for start in range(0, n, size):
            feeds = {k: torch.from_numpy(np.ascontiguousarray(v[start : start + size])) for k, v in inputs.items()}
            chunks.append([o.detach().numpy() for o in graph(feeds, weights, extra)])
    return [np.concatenate(parts) for parts in zip(*chunks, strict=True)]
