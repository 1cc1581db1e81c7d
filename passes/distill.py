"""Knowledge distillation: fine-tune a compressed student's weights against its ONNX teacher.

The classic recipe (Hinton et al. 2015) on an ONNX model: the teacher (the model before
compression, run in onnxruntime, outputs computed once) supplies soft targets; the student (the
model this pass receives) is evaluated in torch by :mod:`onnxopt.distill.torch_graph` and its float
initializers are trained to minimise ``(1 - alpha) * CE(labels) + alpha * tau^2 *
KL(softmax(teacher / tau) || softmax(student / tau))`` (``alpha = 1`` without labels; MSE or
cosine for outputs that are not class scores). Compression constraints are kept during
training (:mod:`onnxopt.distill.train`): pruned zeros stay zero, clustered tensors train their
centroids (Deep Compression's trained quantization), low-rank factors keep their shapes.

torch is an optional extra (``pip install 'onnxopt[distill]'``): it is imported inside
``call`` only, so importing the passes never needs it.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxopt import io as _io
from onnxopt.config import option
from onnxopt.distill import data as distill_data
from onnxopt.errors import OnnxOptError
from onnxopt.pass_base import OptPass, PassReport, register
from onnxopt.runtime import sessions as runtime

__all__ = ["DistillConfig", "DistillPass"]

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'onnxopt[distill]'"


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Options of the distill pass."""

    teacher: str = option("", "teacher .onnx path; default: the model recorded by the `teacher` pass")
    tau: float = option(4.0, "softmax temperature of the distillation term, > 0")
    alpha: float = option(0.9, "weight of the distillation term in [0, 1] (1 - alpha: labels' CE)")
    epochs: int = option(30, "training epochs over the calibration data, >= 1")
    lr: float = option(1e-3, "Adam learning rate, > 0")
    batch_size: int = option(64, "samples per training step, >= 1")
    patience: int = option(5, "stop after this many epochs without held-out improvement (0: never)")
    val_fraction: float = option(0.2, "share of the samples held out for early stopping, in [0, 0.5]")
    loss: Literal["auto", "kl", "mse", "cosine"] = option(
        "auto",
        "output loss: auto (KL for [N, classes] logits or softmax outputs; MSE for sigmoid scores in "
        "[0, 1] and other outputs), kl, mse, cosine",
    )
    include: str = option("", "regular expression: train only initializers whose name matches")
    exclude: str = option("", "regular expression: never train initializers whose name matches")
    tables: bool = option(True, "train embedding tables (initializers read only as a Gather's data); false "
                          "keeps them, and the lowrank pass's gathered table factors, as they are")
    freeze_first: float = option(
        0.0, "share of the Conv/Gemm/MatMul layers, first in graph order, whose weights and biases are "
        "not trained (0: none)"
    )
    warmup: float = option(
        0.0, "share of the training steps over which the LR rises linearly from 0, then a per-step cosine "
        "decay to 0 (0: no warm-up, a per-epoch cosine decay)"
    )
    max_codebook: int = option(256, "a tensor with at most this many distinct values trains as a codebook")
    max_samples: int = option(0, "use at most this many calibration samples (0: all)")
    threads: int = option(0, "torch intra-op threads while training (0: torch's default)")
    check_atol: float = option(1e-4, "written ONNX vs trained torch model: largest allowed max-abs difference")
    augment: int = option(
        8, "augmented copies of each training sample (random shift, zoom in/out, noise); only for "
        "image inputs (float [N, C<=4, H>=8, W>=8]), off otherwise; 0: off"
    )
    augment_to: int = option(
        0, "augment only up to this many training samples: fewer copies (down to none) when the data "
        "already holds more (0: always `augment` copies)"
    )
    augment_shift: float = option(0.05, "augmentation: largest shift, as a fraction of height / width")
    augment_scale: float = option(0.1, "augmentation: largest relative zoom in (a crop) or out")
    augment_noise: float = option(0.02, "augmentation: Gaussian noise, as a fraction of each sample's std")
    hints: str = option(
        "auto", "FitNets hint layers: auto (the inputs of the layers at 1/3, 2/3 and the last), auto:K (K "
        "layer inputs spread evenly, the last included), none, "
        "or comma-separated value names present in student and teacher"
    )
    hint_weight: float = option(1.0, "weight of the hint (intermediate feature) loss, >= 0")

    def __post_init__(self) -> None:
        checks = [
            ("tau", self.tau > 0, "> 0"),
            ("alpha", 0.0 <= self.alpha <= 1.0, "in [0, 1]"),
            ("epochs", self.epochs >= 1, ">= 1"),
            ("lr", self.lr > 0, "> 0"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("patience", self.patience >= 0, ">= 0"),
            ("val_fraction", 0.0 <= self.val_fraction <= 0.5, "in [0, 0.5]"),
            ("max_codebook", 2 <= self.max_codebook <= 65536, "in 2..65536"),
            ("max_samples", self.max_samples >= 0, ">= 0"),
            ("freeze_first", 0.0 <= self.freeze_first < 1.0, "in [0, 1)"),
            ("warmup", 0.0 <= self.warmup < 1.0, "in [0, 1)"),
            ("threads", self.threads >= 0, ">= 0"),
            ("check_atol", self.check_atol > 0, "> 0"),
            ("augment", self.augment >= 0, ">= 0"),
            ("augment_to", self.augment_to >= 0, ">= 0"),
            ("augment_shift", 0.0 <= self.augment_shift < 0.5, "in [0, 0.5)"),
            ("augment_scale", 0.0 <= self.augment_scale < 1.0, "in [0, 1)"),
            ("augment_noise", self.augment_noise >= 0, ">= 0"),
            ("hint_weight", self.hint_weight >= 0, ">= 0"),
        ]
        for field, ok, valid in checks:
            if not ok:
                raise ValueError(f"{field} must be {valid}, got {getattr(self, field)!r}")
        for field in ("include", "exclude"):
            pattern = getattr(self, field)
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"{field}: invalid regular expression {pattern!r} ({err})") from None


class DistillDependencyError(OnnxOptError):
    """torch (the ``distill`` extra) is not installed."""


@register("distill")
class DistillPass(OptPass[DistillConfig]):
    """Train the student's float initializers towards the teacher's outputs, constraints kept.

    Changes: values of the trained float32 initializers (same names, shapes and dtypes).
    Preserves: every node, graph input/output, opset import, and every initializer not trained
        (BatchNorm statistics, integer tensors, scalars, names excluded by the options).
    Guarantees: exact zeros stay zero; a clustered tensor (<= max_codebook distinct values per
        tensor or per output channel) keeps its indices and has at most as many distinct
        values as before; the written ONNX reproduces the trained torch model within
        ``check_atol`` on held-out samples (checked in onnxruntime, else the pass raises and
        is rolled back); the weights kept are those of the best held-out epoch.
    Not exact: outputs change (towards the teacher); the report records teacher agreement
        and, with labels, accuracy on the held-out samples before and after.
    Errors: an op that cannot run in torch raises ``UnsupportedOpError`` naming op and node,
        before the model is touched; no torch raises ``DistillDependencyError``.
    """

    config_class = DistillConfig
    needs_calibration = True

    def requires(self, model: ir.Model) -> None:
        """Check that a teacher and training data are there before anything runs."""
        if not self.config.teacher and self.context.teacher is None:
            raise ir.passes.PreconditionError(
                "distill needs a teacher: set teacher=PATH or run the `teacher` pass earlier in the pipeline"
            )
        if self.context.calibration is None:
            raise ir.passes.PreconditionError("distill needs training data (calibration / --calib)")

    def call(self, model: ir.Model) -> PassReport:
        """Convert, train, check the written ONNX in onnxruntime, then write back by name."""
        try:
            from onnxopt.distill import torch_graph
            from onnxopt.distill import train as distill_torch
        except ImportError as err:
            raise DistillDependencyError(f"distill needs torch ({err}); install it with {INSTALL_HINT}") from None
        report = self.new_report(model)
        cfg = self.config
        teacher = _io.load_model(cfg.teacher) if cfg.teacher else self.context.teacher
        names, skipped = distill_data.select_trainable(model, cfg.include, cfg.exclude, cfg.tables)
        frozen = distill_data.first_layers_parameters(model, cfg.freeze_first)
        skipped.update({name: "frozen (freeze_first)" for name in names if name in frozen})
        names = [name for name in names if name not in frozen]
        for reason in skipped.values():
            report.skip(reason)
        if not names:
            report.skip("no trainable initializer")
            return report
        graph = torch_graph.TorchGraph(model)  # raises UnsupportedOpError before any change
        static = distill_data.static_batch(model)
        inputs, labels = distill_data.stack_samples(self.context.calibration, cfg.max_samples, static)
        params = [
            distill_torch.make_param(name, model.graph.initializers[name].const_value.numpy(), cfg.max_codebook)
            for name in names
        ]
        probe = {k: v[: static or 2] for k, v in inputs.items()}
        if not distill_torch.depends_on_params(graph, params, probe):
            report.skip("no float output depends on a trainable initializer")
            return report
        batch = static or cfg.batch_size
        rng = np.random.default_rng(self.context.seed)
        n = next(iter(inputs.values())).shape[0]
        n_val = round(cfg.val_fraction * n)
        n_val -= n_val % (static or 1)
        val_index = np.sort(rng.permutation(n)[:n_val])
        train_only = np.setdiff1d(np.arange(n), val_index)
        copies = cfg.augment
        images = distill_data.image_inputs(inputs) if copies else []
        if copies and not images:
            report.note("augmentation off: no input is an image batch (float [N, C<=4, H>=8, W>=8])")
        if images and cfg.augment_to:
            copies = min(copies, max(0, -(-cfg.augment_to // max(len(train_only), 1)) - 1))
            if copies < cfg.augment:
                report.note(f"augmentation: {copies} copies per sample, not {cfg.augment}: "
                            f"{len(train_only)} training samples, augment_to={cfg.augment_to}")
        if images and copies:
            # Copies of the training samples only, so the held-out samples stay unseen.
            extra = distill_data.augment_images(
                {k: v[train_only] for k, v in inputs.items()}, copies, rng,
                shift=cfg.augment_shift, scale=cfg.augment_scale, noise=cfg.augment_noise,
            )
            inputs = {k: np.concatenate([v, extra[k]]) for k, v in inputs.items()}
            if labels is not None:
                labels = np.concatenate([labels, np.tile(labels[train_only], copies)])
            total = next(iter(inputs.values())).shape[0]
            if static and total % static:
                inputs = {k: v[: total - total % static] for k, v in inputs.items()}
                labels = labels[: total - total % static] if labels is not None else None
        hints = distill_data.choose_hints(model, teacher, cfg.hints) if cfg.hint_weight > 0 else []
        if hints:  # same name, other shape (a low-rank split's middle value): not a hint
            t_probe = distill_data.teacher_outputs(teacher, probe, batch, quiet=True, extra=hints)[-len(hints) :]
            s_probe = distill_torch.predict(graph, params, probe, batch, extra=hints)[-len(hints) :]
            for name, t_val, s_val in zip(list(hints), t_probe, s_probe, strict=True):
                if t_val.shape != s_val.shape:
                    hints.remove(name)
                    report.note(f"hint {name!r} left out: student {s_val.shape[1:]} vs teacher {t_val.shape[1:]}")
        targets = distill_data.teacher_outputs(teacher, inputs, batch, quiet=self.context.quiet, extra=hints)
        check_index = val_index if len(val_index) else np.arange(min(n, max(256 - 256 % batch, batch)))
        check_inputs = {k: v[check_index] for k, v in inputs.items()}
        n_out = len(targets) - len(hints)
        before = distill_torch.predict(graph, params, check_inputs, batch)
        _check_outputs(before, targets[:n_out], cfg.teacher or "recorded teacher")
        settings = distill_torch.TrainSettings(
            tau=cfg.tau,
            alpha=cfg.alpha if labels is not None else 1.0,
            epochs=cfg.epochs,
            lr=cfg.lr,
            batch_size=cfg.batch_size,
            static_batch=static,
            patience=cfg.patience,
            seed=self.context.seed,
            loss=cfg.loss,
            threads=cfg.threads,
            quiet=self.context.quiet,
            hints=tuple(hints),
            hint_weight=cfg.hint_weight,
            warmup=cfg.warmup,
        )
        result = distill_torch.train(graph, params, inputs, targets, labels, val_index, settings)
        if result.best_epoch == 0:
            report.note(f"no epoch of {result.epochs_run} improved the held-out loss; weights left as they were")
            return report
        after = distill_torch.predict(graph, params, check_inputs, batch)
        # Write into a copy first and check it in onnxruntime; the model changes only if it passes.
        candidate = model.clone()
        _write(candidate, result.weights)
        with runtime.session(candidate) as handle:
            written = [np.concatenate(o) for o in zip(*_run_chunks(handle, check_inputs, batch), strict=True)]
        diff = max(_max_abs(w, a) for w, a in zip(written, after, strict=True))
        if not diff <= cfg.check_atol:
            raise RuntimeError(f"distill: written ONNX differs from the trained torch model by {diff:.3g}")
        _write(model, result.weights)
        check_labels = labels[check_index] if labels is not None else None
        for p in params:
            report.count("trained")
            report.count(f"trained_{p.kind}")
            zeros = int((result.weights[p.name] == 0).sum())
            report.record(p.name, constraint=p.kind, codebook=p.codebook_size, zeros=zeros)
        report.record(
            "training",
            epochs_run=result.epochs_run,
            best_epoch=result.best_epoch,
            stopped_early=result.stopped_early,
            samples=n,
            augmented=next(iter(inputs.values())).shape[0] - n,
            augmented_inputs=images,
            hints=hints,
            held_out=len(val_index),
            labels=labels is not None,
            onnx_vs_torch_max_abs=diff,
            before=distill_data.agreement(before[0], targets[0][check_index], check_labels),
            after=distill_data.agreement(after[0], targets[0][check_index], check_labels),
            history=result.history,
        )
        report.note(
            f"distilled {len(params)} tensors for {result.epochs_run} epochs (best {result.best_epoch}); "
            f"held-out before {report.records[-1]['before']}, after {report.records[-1]['after']}"
        )
        if labels is None and cfg.alpha < 1.0:
            report.note("no labels in the training data: alpha = 1 (distillation term only)")
        return report


def _run_chunks(handle: runtime.SessionHandle, inputs: dict[str, np.ndarray], size: int = 256):
    n = next(iter(inputs.values())).shape[0]
    for start in range(0, n, size):
        out = handle.run({k: v[start : start + size] for k, v in inputs.items()})
        yield [out[name] for name in handle.output_names]


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    """Largest difference, where NaN against NaN and equal infinities count as equal."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    return float(np.abs(a - b)[~same].max()) if not same.all() else 0.0


def _check_outputs(student: list[np.ndarray], teacher: list[np.ndarray], where: str) -> None:
    if len(student) != len(teacher):
        raise ValueError(f"distill: student has {len(student)} outputs, teacher ({where}) has {len(teacher)}")
    for i, (s, t) in enumerate(zip(student, teacher, strict=True)):
        if s.shape[1:] != t.shape[1:]:
            raise ValueError(f"distill: output {i} shape {s.shape[1:]} differs from the teacher's {t.shape[1:]}")


def _write(model: ir.Model, weights: dict[str, np.ndarray]) -> None:
    """Replace each initializer's value by name, keeping name, dtype and shape."""
    for name, array in weights.items():
        value = model.graph.initializers[name]
        old_shape = tuple(value.const_value.shape.numpy())
        if array.shape != old_shape:
            raise RuntimeError(f"distill: {name} changed shape {old_shape} -> {array.shape}")
        value.const_value = ir.tensor(np.ascontiguousarray(array, dtype=np.float32), name=name)
