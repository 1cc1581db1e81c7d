"""Per-tensor choice of the calibration method, measured in onnxruntime (``calibration_method="auto"``).

Every method (minmax, percentile, entropy, mse) proposes a range for each activation tensor
from the same statistics (one pass over the data:
:func:`onnxopt.quant.calibration.collect_methods`). Which one is best differs per tensor: min/max
keeps the peaks a detector head or a CTC decoder's logits need, mse and entropy cut the long
tails of early feature maps, where rounding error dominates. So it is measured, not guessed:

1. the model is quantized with each method's table whole and run on check feeds; the table with
   the smallest output loss is the start;
2. the tensors where the methods disagree most (ratio of the widest to the narrowest proposed
   range), in graph order, up to ``max_tensors``: each other method's range for that tensor alone
   is tried on top of the current choice and kept only if the output loss drops.

Loss: ``1 - cosine`` of each output against the float model's over all check feeds (the worst
output), with onnxruntime's optimisations on, so the integer kernels that deployment runs are
what is measured. The check feeds are calibration feeds: the choice is fitted to them as the
ranges are, and the pass's final check on ``--eval`` data says how it generalises.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from onnxopt.quant.calibration import CalibrationTable
from onnxopt.runtime import sessions as runtime
from onnxopt.runtime import validation

__all__ = ["Choice", "choose"]

Build = Callable[[Mapping[str, tuple[float, float]]], ir.Model]


@dataclasses.dataclass(frozen=True)
class Choice:
    """The chosen table and how it was reached.

    Attributes:
        table: ranges per tensor (method "auto").
        start: the method whose whole table was best.
        whole: method -> output loss of its whole table.
        changed: tensor -> method whose range replaced the start's there.
        loss: output loss of the chosen table (``start``'s loss at most).
        trials: quantized models measured.

    """

    table: CalibrationTable
    start: str
    whole: dict[str, float]
    changed: dict[str, str]
    loss: float
    trials: int


def _outputs(model: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    with runtime.session(model, opt_level="all") as handle:
        return runtime.run_all(handle, [dict(f) for f in feeds])


def _loss(reference: list[dict[str, np.ndarray]], got: list[dict[str, np.ndarray]]) -> float:
    worst = 0.0
    for name in reference[0] if reference else ():
        m = validation.output_metrics([r[name] for r in reference], [g[name] for g in got])
        if m.nonfinite or not math.isfinite(m.cosine):
            return math.inf
        worst = max(worst, 1.0 - m.cosine)
    return worst


def choose(
    tables: Mapping[str, CalibrationTable],
    build: Build,
    float_model: ir.Model,
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    max_tensors: int = 24,
    quiet: bool = True,
) -> Choice:
    """Pick a range per tensor among ``tables`` (method -> table) by measured output loss.

    Args:
        tables: candidate tables over the same tensors (a tensor missing from one is skipped there).
        build: quantized model from a ranges mapping (the caller's Q/DQ insertion).
        float_model: the reference (not modified).
        feeds: check feeds.
        max_tensors: per-tensor trials are made for at most this many tensors.
        quiet: no progress bar.

    """
    reference = _outputs(float_model, feeds)
    trials = 0

    def measure(ranges: Mapping[str, tuple[float, float]]) -> float:
        nonlocal trials
        trials += 1
        return _loss(reference, _outputs(build(ranges), feeds))

    methods = list(tables)
    whole = {m: measure(tables[m].ranges) for m in tqdm(methods, desc="auto calibration: tables",
                                                        disable=quiet, leave=False)}
    start = min(methods, key=lambda m: whole[m])
    current = dict(tables[start].ranges)
    loss = whole[start]

    def width(rng: tuple[float, float]) -> float:
        return max(rng[1] - min(rng[0], 0.0), rng[1] - rng[0], 1e-30)

    spread = {}
    for name, rng in current.items():
        widths = [width(tables[m].ranges[name]) for m in methods if name in tables[m].ranges]
        spread[name] = max(widths) / min(widths) if widths else 1.0
    order = [n for n in current if spread[n] > 1.05]  # methods agree within 5 %: nothing to try
    order = sorted(order, key=lambda n: -spread[n])[:max_tensors]
    position = {n: i for i, n in enumerate(current)}
    changed: dict[str, str] = {}
    for name in tqdm(sorted(order, key=position.get), desc="auto calibration: tensors", disable=quiet,
                     leave=False):
        for m in methods:
            rng = tables[m].ranges.get(name)
            if rng is None or m == changed.get(name, start) or width(rng) == width(current[name]):
                continue
            trial = {**current, name: rng}
            got = measure(trial)
            if got < loss:
                current, loss = trial, got
                changed[name] = m
    table = CalibrationTable(current, "auto", tables[start].num_samples)
    return Choice(table, start, whole, changed, loss, trials)
