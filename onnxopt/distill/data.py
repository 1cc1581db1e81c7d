"""The torch-free half of distillation: teacher, training samples, teacher outputs, parameters.

The ``teacher`` pass stores the model it sees (serialized, so later in-place edits cannot reach
it) as the pass context's ``teacher``; the ``distill`` pass reads it there
unless its ``teacher`` option names a file. Teacher outputs are computed once with onnxruntime,
batch by batch, and reused for every epoch.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir
import tqdm

from onnxopt import _ir_utils
from onnxopt.errors import DataError
from onnxopt.runtime import data
from onnxopt.runtime import sessions as runtime
from onnxopt.runtime.data import Dataset

__all__ = [
    "agreement",
    "select_trainable",
    "stack_samples",
    "static_batch",
    "teacher_outputs",
]

logger = logging.getLogger(__name__)

# Inputs of these ops are statistics or shapes, not parameters (BatchNorm mean and variance).
_NOT_PARAMETERS = {"BatchNormalization": (3, 4)}


def static_batch(model: ir.Model) -> int:
    """The fixed size of the inputs' axis 0 (0 when it is symbolic for every input).

    Raises:
        DataError: an input without axis 0 (a scalar), or inputs whose fixed axis 0 differ.

    """
    sizes = set()
    for spec in data.input_signature(model):
        if spec.shape is not None and len(spec.shape) == 0:
            raise DataError(f"distill needs a batch axis; input {spec.describe()} is a scalar")
        if spec.shape and isinstance(spec.shape[0], int):
            sizes.add(spec.shape[0])
    if len(sizes) > 1:
        raise DataError(f"distill: inputs have different fixed batch sizes {sorted(sizes)}")
    return sizes.pop() if sizes else 0


def stack_samples(
    dataset: Dataset, max_samples: int = 0, static: int = 0
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """All feeds of ``dataset`` concatenated along axis 0, and its labels (if any, aligned).

    With a fixed batch size ``static``, the samples are cut to a multiple of it.

    Raises:
        DataError: feeds whose shapes differ beyond axis 0, labels of another length, or fewer
            samples than one fixed-size batch.

    """
    parts: dict[str, list[np.ndarray]] = {}
    for feed in dataset:
        for name, array in feed.items():
            parts.setdefault(name, []).append(np.asarray(array))
    if not parts:
        raise DataError(f"{dataset.source}: no feeds to distill on")
    inputs = {}
    for name, arrays in parts.items():
        tails = {a.shape[1:] for a in arrays}
        if len(tails) > 1:
            raise DataError(
                f"{dataset.source}: distill needs one sample shape per input; {name!r} has {sorted(tails)}"
            )
        inputs[name] = np.concatenate(arrays, axis=0)
    n = {a.shape[0] for a in inputs.values()}
    if len(n) > 1:
        raise DataError(f"{dataset.source}: inputs have different numbers of samples {sorted(n)}")
    count = n.pop()
    labels = dataset.labels
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if labels.shape[0] != count:
            raise DataError(f"{dataset.source}: {labels.shape[0]} labels for {count} samples")
    keep = min(count, max_samples) if max_samples else count
    if static:
        if keep < static:
            raise DataError(f"{dataset.source}: {keep} samples, fewer than the model's fixed batch of {static}")
        keep -= keep % static
    if keep < count:
        inputs = {k: v[:keep] for k, v in inputs.items()}
        labels = labels[:keep] if labels is not None else None
    return inputs, labels


def teacher_outputs(
    teacher: ir.Model | bytes, inputs: Mapping[str, np.ndarray], batch_size: int, *, quiet: bool = False
) -> list[np.ndarray]:
    """The teacher's outputs (one array per graph output, axis 0 = samples), run in onnxruntime."""
    n = next(iter(inputs.values())).shape[0]
    chunks: list[list[np.ndarray]] = []
    with runtime.session(teacher) as handle:
        starts = range(0, n, batch_size)
        for start in tqdm.tqdm(starts, desc="teacher", unit="batch", disable=quiet or len(starts) < 8, leave=False):
            out = handle.run({k: v[start : start + batch_size] for k, v in inputs.items()})
            chunks.append([out[name] for name in handle.output_names])
    return [np.concatenate([c[i] for c in chunks], axis=0) for i in range(len(chunks[0]))]


def select_trainable(model: ir.Model, include: str, exclude: str) -> tuple[list[str], dict[str, str]]:
    """Initializers to train and, for the float ones left alone, why.

    A parameter is a float32 initializer of rank >= 1 that some node of the main graph reads
    (BatchNorm running mean/variance excluded), whose name matches ``include`` (if given) and
    not ``exclude`` (if given).
    """
    users: dict[str, list[tuple[str, int]]] = {}
    for node in model.graph:
        for i, value in enumerate(node.inputs):
            if value is not None and value.is_initializer():
                users.setdefault(value.name, []).append((node.op_type, i))
    chosen, skipped = [], {}
    for name, value in model.graph.initializers.items():
        if not _ir_utils.is_float_dtype(value.dtype) or name not in users or value.is_graph_input():
            continue
        if value.dtype != ir.DataType.FLOAT:
            skipped[name] = f"{value.dtype.name} initializers are not trained (float32 only)"
        elif value.const_value is None or len(value.const_value.shape) == 0:
            skipped[name] = "scalar constant"
        elif all(i in _NOT_PARAMETERS.get(op, ()) for op, i in users[name]):
            skipped[name] = "normalisation statistic"
        elif include and not re.search(include, name):
            skipped[name] = "not matched by include"
        elif exclude and re.search(exclude, name):
            skipped[name] = "matched by exclude"
        else:
            chosen.append(name)
    return chosen, skipped


def agreement(student: np.ndarray, teacher: np.ndarray, labels: np.ndarray | None) -> dict[str, float]:
    """Top-1 agreement with the teacher (and accuracy against labels) for class-score outputs."""
    if student.ndim != 2 or student.shape[1] < 2:
        err = float(np.linalg.norm(student - teacher) / (np.linalg.norm(teacher) + 1e-12))
        return {"rel_l2": err}
    top = student.argmax(axis=1)
    out = {"top1_agreement": float((top == teacher.argmax(axis=1)).mean())}
    if labels is not None:
        out["accuracy"] = float((top == labels).mean())
    return out
