"""The context shared by the passes of one pipeline run: data, target, budget, cached statistics."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import numpy as np

from onnxopt.runtime.data import Dataset

__all__ = ["Metric", "PassContext", "Target"]

Target = Literal["cpu", "cuda", "tensorrt"]
# metric(reference_outputs, candidate_outputs) -> score, higher is better.
Metric = Callable[[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]], float]


@dataclasses.dataclass
class PassContext:
    """Shared by the passes of one run; passes read data from here instead of loading it.

    Attributes:
        calibration: feeds for statistics (activation ranges, sensitivity, repair).
        evaluation: held-out feeds (and labels) for the final check; falls back to calibration.
        target: where the model will run; precision choices depend on it.
        min_cosine: accuracy budget on the outputs (lossy recipes), or None.
        max_error: alternative budget: largest allowed max-abs error, or None.
        metric: from Python, any score callable (higher is better) used with ``min_metric``.
        min_metric: the budget for ``metric``.
        seed: for anything random (k-means++ init, random feeds).
        quiet: no progress bars.
        teacher: the model the ``teacher`` pass saw, as serialized ModelProto bytes (so passes
            that edit tensors in place later cannot alter it); the ``distill`` pass trains
            towards it unless its ``teacher`` option names a file. None until ``teacher`` runs.
        cache: statistics computed once and reused by later passes (keyed by the producer).
        time_budget: seconds a planning pass (mixed) may search before it returns its best
            verified plan; None: the pass's own default.
        workers: where planning trials run: None (all cores), N local processes, "ray" or
            "ray://HOST:PORT".
    """

    calibration: Dataset | None = None
    evaluation: Dataset | None = None
    target: Target = "cpu"
    min_cosine: float | None = None
    max_error: float | None = None
    metric: Metric | None = None
    min_metric: float | None = None
    seed: int = 0
    quiet: bool = False
    teacher: bytes | None = None
    cache: dict[str, Any] = dataclasses.field(default_factory=dict)
    time_budget: float | None = None
    workers: int | str | None = None

    @property
    def check_data(self) -> Dataset | None:
        """The data the pipeline checks passes on: evaluation if given, else calibration."""
        return self.evaluation if self.evaluation is not None else self.calibration
