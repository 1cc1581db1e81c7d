"""The torch-free half of distillation: teacher, training samples, teacher outputs, parameters.

The ``teacher`` pass stores the model it sees (serialized, so later in-place edits cannot reach
it) as the pass context's ``teacher``; the ``distill`` pass reads it there
unless its ``teacher`` option names a file. Teacher outputs are computed once with onnxruntime,
batch by batch, and reused for every epoch.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import tqdm

from onnxopt import _ir_utils
from onnxopt.errors import DataError
from onnxopt.runtime import data
from onnxopt.runtime import sessions as runtime
from onnxopt.runtime.data import Dataset
from onnxopt.runtime.validation import is_probability

__all__ = [
    "agreement",
    "augment_images",
    "choose_hints",
    "image_inputs",
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
    teacher: ir.Model | bytes,
    inputs: Mapping[str, np.ndarray],
    batch_size: int,
    *,
    quiet: bool = False,
    extra: Sequence[str] = (),
) -> list[np.ndarray]:
    """The teacher's outputs (one array per graph output, then one per ``extra`` value name).

    Axis 0 indexes samples; run in onnxruntime. ``extra`` names intermediate values of the
    teacher (hint layers), exposed as outputs on an in-memory copy.
    """
    n = next(iter(inputs.values())).shape[0]
    if extra:
        teacher = _with_outputs(teacher, extra)
    # Written into arrays sized for all n samples once the first batch shows the per-sample
    # shapes: hint features can be GBs (2.4 GB for 6,000 PP-OCR cls crops), and a list of
    # chunks concatenated at the end would hold them twice.
    results: list[np.ndarray] = []
    with runtime.session(teacher) as handle:
        starts = range(0, n, batch_size)
        for start in tqdm.tqdm(starts, desc="teacher", unit="batch", disable=quiet or len(starts) < 8, leave=False):
            out = handle.run({k: v[start : start + batch_size] for k, v in inputs.items()})
            arrays = [np.asarray(out[name]) for name in handle.output_names]
            rows = min(batch_size, n - start)
            if not results:
                results = [np.empty((n, *a.shape[1:]), dtype=a.dtype) for a in arrays]
            for name, target, array in zip(handle.output_names, results, arrays, strict=True):
                if array.ndim == 0 or array.shape != (rows, *target.shape[1:]):
                    raise DataError(
                        f"teacher output {name!r}: batch at sample {start} has shape {list(array.shape)}, "
                        f"expected {[rows, *target.shape[1:]]} "
                        "(one row per sample, the same sample shape in every batch)"
                    )
                target[start : start + rows] = array
    return results


def first_layers_parameters(model: ir.Model, share: float) -> set[str]:
    """Names of the initializers (weight, bias) read by the first ``round(share * n)`` of the main
    graph's ``n`` Conv/Gemm/MatMul nodes, in graph order."""
    layers = [n for n in model.graph if n.op_type in _HINT_OPS]
    return {v.name for node in layers[: round(share * len(layers))] for v in node.inputs[1:]
            if v is not None and v.is_initializer()}


def select_trainable(
    model: ir.Model, include: str, exclude: str, tables: bool = True
) -> tuple[list[str], dict[str, str]]:
    """Initializers to train and, for the float ones left alone, why.

    A parameter is a float32 initializer of rank >= 1 that some node of the main graph reads
    (BatchNorm running mean/variance excluded), whose name matches ``include`` (if given) and
    not ``exclude`` (if given); with ``tables=False`` not one read only as a Gather's data (an
    embedding table, or the gathered factors of one the lowrank pass split: rows the training data
    never reads would get no gradient, and a [V, D] table's gradient is the largest of the model).
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
        elif not tables and all(op == "Gather" and i == 0 for op, i in users[name]):
            skipped[name] = "embedding table (tables=false)"
        elif include and not re.search(include, name):
            skipped[name] = "not matched by include"
        elif exclude and re.search(exclude, name):
            skipped[name] = "matched by exclude"
        else:
            chosen.append(name)
    return chosen, skipped


def agreement(student: np.ndarray, teacher: np.ndarray, labels: np.ndarray | None) -> dict[str, float]:
    """Top-1 agreement with the teacher (and accuracy against labels) for class-score outputs.

    For [N, positions, classes] probabilities (a CTC recogniser's softmax per step):
    ``sequence_agreement``, the share of samples whose top class agrees at every position (so
    their greedy decodings are identical), and ``position_agreement``, per position.
    """
    if student.ndim == 3 and is_probability(teacher):
        same = student.argmax(axis=-1) == teacher.argmax(axis=-1)
        return {"sequence_agreement": float(same.all(axis=1).mean()), "position_agreement": float(same.mean())}
    if student.ndim != 2 or student.shape[1] < 2:
        err = float(np.linalg.norm(student - teacher) / (np.linalg.norm(teacher) + 1e-12))
        return {"rel_l2": err}
    top = student.argmax(axis=1)
    out = {"top1_agreement": float((top == teacher.argmax(axis=1)).mean())}
    if labels is not None:
        out["accuracy"] = float((top == labels).mean())
    return out


def _with_outputs(teacher: ir.Model | bytes, names: Sequence[str]) -> ir.Model:
    model = ir.from_proto(onnx.load_from_string(teacher)) if isinstance(teacher, bytes) else teacher.clone()
    values = {v.name: v for node in model.graph for v in node.outputs if v.name}
    for name in names:
        if name not in values:
            raise DataError(f"distill: hint value {name!r} is not in the teacher")
        if values[name] not in model.graph.outputs:
            model.graph.outputs.append(values[name])
    return model


def image_inputs(inputs: Mapping[str, np.ndarray]) -> list[str]:
    """Names of the inputs that look like image batches, the ones augmentation may change.

    An input counts as an image when its samples are float arrays of shape ``[C, H, W]`` with
    ``C`` in 1..4 (grey, RGB, RGBA; NCHW as ONNX vision models take them) and ``H, W >= 8``.
    Token ids, audio frames, tabular rows and NHWC tensors do not match, so augmentation is off
    for them (an augmentation that does not preserve the label would teach the wrong thing).
    """
    found = []
    for name, array in inputs.items():
        shape = array.shape[1:]
        if np.issubdtype(array.dtype, np.floating) and len(shape) == 3 and 1 <= shape[0] <= 4 and min(shape[1:]) >= 8:
            found.append(name)
    return found


def augment_images(
    inputs: Mapping[str, np.ndarray],
    copies: int,
    rng: np.random.Generator,
    *,
    shift: float = 0.05,
    scale: float = 0.1,
    noise: float = 0.02,
) -> dict[str, np.ndarray]:
    """``copies`` randomly shifted, scaled (zoomed in = a crop, out = edge-padded) and noisy
    versions of every sample, ``copies * n`` samples per input (copy ``c`` of sample ``i`` at
    ``c * n + i``). Inputs that are not images (:func:`image_inputs`) are repeated unchanged.

    Args:
        inputs: sample arrays per input name (axis 0 = samples).
        copies: augmented copies per sample.
        rng: the random source.
        shift: largest shift as a fraction of the height / width.
        scale: largest relative zoom in or out.
        noise: Gaussian noise, standard deviation as a fraction of each sample's own.

    """
    images = set(image_inputs(inputs))
    out = {}
    for name, array in inputs.items():
        if name not in images:
            out[name] = np.concatenate([array] * copies)
            continue
        n, _, h, w = array.shape
        parts = []
        for _ in range(copies):
            zoom = np.exp(rng.uniform(-np.log1p(scale), np.log1p(scale), n))
            dy = rng.uniform(-shift, shift, n) * h
            dx = rng.uniform(-shift, shift, n) * w
            moved = np.stack([_resample(array[i], zoom[i], dy[i], dx[i]) for i in range(n)])
            sigma = noise * moved.reshape(n, -1).std(axis=1).reshape(n, 1, 1, 1)
            parts.append((moved + sigma * rng.standard_normal(moved.shape)).astype(array.dtype))
        out[name] = np.concatenate(parts)
    return out


def _resample(image: np.ndarray, zoom: float, dy: float, dx: float) -> np.ndarray:
    """Bilinear resampling of ``[C, H, W]`` about the centre, edge pixels repeated outside."""
    # Written with numpy: scipy is not a dependency and this is a few thousand small images.
    _, h, w = image.shape
    ys = np.clip((np.arange(h) - (h - 1) / 2 - dy) / zoom + (h - 1) / 2, 0, h - 1)
    xs = np.clip((np.arange(w) - (w - 1) / 2 - dx) / zoom + (w - 1) / 2, 0, w - 1)
    y0 = np.minimum(np.floor(ys).astype(int), h - 2) if h > 1 else np.zeros(h, int)
    x0 = np.minimum(np.floor(xs).astype(int), w - 2) if w > 1 else np.zeros(w, int)
    fy = (ys - y0)[:, None]
    fx = (xs - x0)[None, :]
    y1 = np.minimum(y0 + 1, h - 1)
    x1 = np.minimum(x0 + 1, w - 1)
    top = image[:, y0][:, :, x0] * (1 - fx) + image[:, y0][:, :, x1] * fx
    bottom = image[:, y1][:, :, x0] * (1 - fx) + image[:, y1][:, :, x1] * fx
    return top * (1 - fy) + bottom * fy


_HINT_OPS = ("Conv", "Gemm", "MatMul")


def choose_hints(student: ir.Model, teacher: ir.Model | bytes, spec: str) -> list[str]:
    """The intermediate values whose teacher features the student is trained to match (FitNets).

    ``spec``: ``"auto"`` picks the activation entering the Conv/Gemm/MatMul layers at one third
    and two thirds of the graph and the one entering the last such layer (the penultimate
    features): early enough to guide the lower layers, late enough to carry the decision;
    ``"auto:K"`` the inputs of K layers spread evenly (the i-th ends the i-th K-th of them);
    ``"none"`` or ``""`` none; otherwise comma-separated value names. Only values that exist by
    name in both graphs, are computed by a node (not graph inputs or weights) and are float
    are kept; named ones that fail that raise.

    Raises:
        DataError: a named hint value missing from the student or the teacher.

    """
    if spec in ("", "none"):
        return []
    count = 0  # "auto:K": K layer inputs spread evenly over the graph, the last one included
    if spec.startswith("auto:"):
        try:
            count = int(spec[5:])
        except ValueError:
            count = 0
        if count < 1:
            raise DataError(f"distill: hints {spec!r}: 'auto:K' needs a whole number K >= 1")
        spec = "auto"
    tmodel = ir.from_proto(onnx.load_from_string(teacher)) if isinstance(teacher, bytes) else teacher
    in_teacher = {v.name for node in tmodel.graph for v in node.outputs if v.name}
    produced = {v.name: v for node in student.graph for v in node.outputs if v.name}
    if spec != "auto":
        names = [n.strip() for n in spec.split(",") if n.strip()]
        for name in names:
            if name not in produced or name not in in_teacher:
                where = "student" if name not in produced else "teacher"
                raise DataError(f"distill: hint value {name!r} is not computed by a node of the {where}")
        return names
    layers = [n for n in student.graph if n.op_type in _HINT_OPS and n.inputs and n.inputs[0] is not None]
    feeds = [n.inputs[0].name for n in layers if n.inputs[0].name in produced]
    feeds = [f for f in feeds if f in in_teacher and _ir_utils.is_float_dtype(produced[f].dtype or ir.DataType.FLOAT)]
    if not feeds:
        return []
    if count:
        picks = [feeds[max(0, (i * len(feeds)) // count - 1)] for i in range(1, count + 1)]
    else:
        picks = [feeds[len(feeds) // 3], feeds[(2 * len(feeds)) // 3], feeds[-1]]
    return list(dict.fromkeys(picks))
