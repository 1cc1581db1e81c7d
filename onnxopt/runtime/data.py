"""Calibration and evaluation data: every form DESIGN.md lists, checked against the model inputs.

Forms accepted by :func:`load_data`:
    - ``.npz`` whose keys are input names and whose first axis indexes samples (an optional
      ``label`` key holds labels); arrays of the model's rank are cut into batches along axis 0,
      arrays of rank + 1 give one feed per entry;
    - a folder of ``.npz`` files, one feed each (shapes may differ between files), sorted order;
    - a folder of ``.npy`` files named after the inputs (samples on axis 0, like an ``.npz``);
    - a folder of onnx ``test_data_set_*`` folders holding ``input_*.pb`` (and ``output_*.pb``);
    - from Python: an iterable of ``{input_name: array}`` dicts, or an
      ``onnxruntime.quantization.CalibrationDataReader`` (anything with ``get_next()``).

Each feed is checked against the model's inputs: names, dtype, rank and static dimensions.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Union

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.errors import DataError

__all__ = [
    "LABEL_KEYS",
    "Dataset",
    "Feed",
    "InputSpec",
    "check_feed",
    "input_signature",
    "load_data",
    "random_data",
    "value_kind",
]

Feed = dict[str, np.ndarray]
DataSource = Union[str, os.PathLike, Iterable[Mapping[str, np.ndarray]], Any, "Dataset"]
LABEL_KEYS = ("label", "labels")
# Largest random feed (bytes per input) random_data makes; a declared [2**40, 4] input is refused.
_RANDOM_FEED_LIMIT = 1 << 30


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """A graph input: name, numpy dtype, and dims (int for static, str/None for symbolic).

    ``kind`` is ``tensor``, ``sequence`` (a list of tensors of ``dtype``; ``shape`` is that of
    an element, when declared), ``optional`` or ``optional-sequence`` (the value or None).
    """

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None
    kind: str = "tensor"

    def describe(self) -> str:
        """For error messages: ``input[batch,64] float32``."""
        dims = "?" if self.shape is None else ",".join("?" if d is None else str(d) for d in self.shape)
        text = f"{self.name}[{dims}] {self.dtype}"
        return text if self.kind == "tensor" else f"{text} ({self.kind})"


def input_signature(model: ir.Model) -> list[InputSpec]:
    """The model's real inputs (graph inputs that are not initializers)."""
    specs = []
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        shape = None
        if value.shape is not None:
            # A negative static dim (PP-OCR cls declares batch as -1) means "any size".
            shape = tuple(
                (d if d >= 0 else None) if isinstance(d, int) else (d.value if d.value else None)
                for d in value.shape
            )
        specs.append(InputSpec(value.name, np.dtype(dtype), shape, value_kind(value.type)))
    return specs


def value_kind(type_: ir.TypeProtocol | None) -> str:
    """tensor, sequence, optional or optional-sequence: the kind of a graph input's type."""
    if isinstance(type_, ir.OptionalType):
        return "optional-sequence" if isinstance(type_.elem_type, ir.SequenceType) else "optional"
    if isinstance(type_, ir.SequenceType):
        return "sequence"
    return "tensor"


class Dataset:
    """A re-iterable collection of feeds, with optional labels and expected outputs.

    Iterating twice reads the source twice (files are not all held in memory).
    """

    def __init__(
        self,
        factory: Callable[[], Iterator[Feed]],
        length: int,
        source: str,
        *,
        labels: np.ndarray | None = None,
        expected: list[list[np.ndarray]] | None = None,
        samples_per_feed: Sequence[int] | None = None,
    ) -> None:
        self._factory = factory
        self._length = length
        self.source = source
        self.labels = labels
        self.expected = expected
        # How many of ``labels`` each feed holds (take() keeps the labels of the feeds it keeps).
        self.samples_per_feed = list(samples_per_feed) if samples_per_feed is not None else None

    def __iter__(self) -> Iterator[Feed]:
        return self._factory()

    def __len__(self) -> int:
        return self._length

    def __repr__(self) -> str:
        return f"Dataset({self.source!r}, {self._length} feeds)"

    def take(self, n: int) -> Dataset:
        """The first ``n`` feeds, with their labels (where the samples per feed are known) and
        expected outputs."""
        n = min(n, self._length)

        def factory() -> Iterator[Feed]:
            for i, feed in enumerate(self._factory()):
                if i >= n:
                    return
                yield feed

        labels, spf = None, None
        if self.labels is not None and self.samples_per_feed is not None:
            spf = self.samples_per_feed[:n]
            labels = self.labels[: sum(spf)]
        expected = self.expected[:n] if self.expected is not None else None
        return Dataset(factory, n, f"{self.source}[:{n}]", labels=labels, expected=expected, samples_per_feed=spf)

    @classmethod
    def from_feeds(cls, feeds: Sequence[Feed], source: str = "<feeds>", **kw: Any) -> Dataset:
        """A dataset over feeds already in memory."""
        feeds = list(feeds)
        return cls(lambda: iter(feeds), len(feeds), source, **kw)


def load_data(
    source: DataSource,
    signature: Sequence[InputSpec] | None = None,
    *,
    batch_size: int = 32,
) -> Dataset:
    """Open ``source`` as a :class:`Dataset`, checked against ``signature`` when given.

    Raises:
        DataError: missing path, unknown format, or data that does not fit the model's inputs.

    """
    if isinstance(source, Dataset):
        feeds = list(source)
        for feed in feeds:
            if signature is not None:
                check_feed(feed, signature, source.source)
        return Dataset.from_feeds(feeds, source.source, labels=source.labels, expected=source.expected,
                                  samples_per_feed=source.samples_per_feed)  # fmt: skip
    if isinstance(source, (str, os.PathLike)):
        return _load_path(pathlib.Path(source), signature, batch_size)
    if hasattr(source, "get_next"):
        feeds = []
        while (item := source.get_next()) is not None:
            feeds.append(dict(item))
        return _from_memory(feeds, signature, type(source).__name__)
    if isinstance(source, Mapping):
        raise DataError("data: expected an iterable of {input_name: array} dicts, got one dict")
    if isinstance(source, Iterable):
        return _from_memory([dict(item) for item in source], signature, "<iterable>")
    raise DataError(f"data: unsupported source of type {type(source).__name__}")


def _from_memory(feeds: list[Feed], signature: Sequence[InputSpec] | None, where: str) -> Dataset:
    if not feeds:
        raise DataError(f"{where}: no feeds")
    kinds = {spec.name: spec.kind for spec in signature or ()}
    feeds = [{k: _as_value(v, kinds.get(k, "tensor")) for k, v in feed.items()} for feed in feeds]
    if signature is not None:
        for i, feed in enumerate(feeds):
            check_feed(feed, signature, f"{where} item {i}")
    return Dataset.from_feeds(feeds, where)


def _as_value(value: Any, kind: str) -> Any:
    """An array; for a sequence input a list of arrays, for an optional one also None."""
    if value is None and kind.startswith("optional"):
        return None
    if kind.endswith("sequence") and isinstance(value, (list, tuple)):
        return [np.asarray(v) for v in value]
    return np.asarray(value)


def _load_path(path: pathlib.Path, signature: Sequence[InputSpec] | None, batch_size: int) -> Dataset:
    if not path.exists():
        raise DataError(f"{path}: data not found")
    if path.is_file():
        if path.suffix != ".npz":
            raise DataError(f"{path}: expected an .npz file or a folder, got a {path.suffix or 'plain'} file")
        arrays, labels = _read_npz(path)
        return _from_sample_arrays(arrays, labels, signature, batch_size, str(path))
    npz_files = sorted(path.glob("*.npz"))
    if npz_files:
        return _feed_files(npz_files, signature, str(path))
    pb_dirs = sorted(p for p in path.glob("test_data_set_*") if p.is_dir())
    if not pb_dirs and any(path.glob("input_*.pb")):
        pb_dirs = [path]
    if pb_dirs:
        return _pb_sets(pb_dirs, signature, str(path))
    npy_files = sorted(path.glob("*.npy"))
    if npy_files:
        arrays = {p.stem: _read_npy(p) for p in npy_files}
        labels = None
        for key in LABEL_KEYS:
            if key in arrays:
                labels = arrays.pop(key)
        return _from_sample_arrays(arrays, labels, signature, batch_size, str(path))
    raise DataError(f"{path}: folder holds no .npz, .npy or test_data_set_* data")


def _read_npz(path: pathlib.Path) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as err:  # zipfile, pickle and format errors all mean "not a usable npz"
        raise DataError(f"{path}: cannot read .npz ({err})") from err
    labels = None
    for key in LABEL_KEYS:
        if key in arrays:
            labels = arrays.pop(key)
    return arrays, labels


def _read_npy(path: pathlib.Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except Exception as err:  # any read failure is a data error for the user
        raise DataError(f"{path}: cannot read .npy ({err})") from err


def _from_sample_arrays(
    arrays: dict[str, np.ndarray],
    labels: np.ndarray | None,
    signature: Sequence[InputSpec] | None,
    batch_size: int,
    where: str,
) -> Dataset:
    if not arrays:
        raise DataError(f"{where}: no input arrays")
    spec_by_name = {s.name: s for s in signature or ()}
    if signature is not None:
        _check_names(arrays, signature, where)
    per_sample = bool(spec_by_name) and all(
        s.shape is not None and arrays[s.name].ndim == len(s.shape) + 1 for s in spec_by_name.values()
    )
    # A static leading dim fixes the batch size; symbolic batch dims take ``batch_size``.
    static_batch = next(
        (s.shape[0] for s in spec_by_name.values() if s.shape and isinstance(s.shape[0], int)), None
    )
    batch = static_batch if static_batch is not None and not per_sample else batch_size
    counts = {k: (v.shape[0] if v.ndim else 0) for k, v in arrays.items()}
    if len(set(counts.values())) != 1:
        raise DataError(f"{where}: inputs have different numbers of samples: {counts}")
    n = next(iter(counts.values()))
    if n == 0:
        raise DataError(f"{where}: no samples (first axis has length 0)")
    if labels is not None and len(labels) != n:
        raise DataError(f"{where}: {len(labels)} labels for {n} samples")
    starts = list(range(n)) if per_sample else list(range(0, n, batch))

    def cut(i: int) -> Feed:
        if per_sample:
            return {k: np.asarray(v[i]) for k, v in arrays.items()}  # 0-d arrays, not numpy scalars
        return {k: v[i : i + batch] for k, v in arrays.items()}

    if spec_by_name:
        for key, arr in arrays.items():
            check_array(key, arr[0] if per_sample else arr, spec_by_name[key], where, batch_axis_free=True)
        if not per_sample and static_batch is not None and n % batch:
            raise DataError(f"{where}: {n} samples do not fill batches of the model's static batch {batch}")
    spf = [1] * n if per_sample else [min(batch, n - i) for i in starts]
    return Dataset(lambda: (cut(i) for i in starts), len(starts), where, labels=labels, samples_per_feed=spf)


def _feed_files(files: list[pathlib.Path], signature: Sequence[InputSpec] | None, where: str) -> Dataset:
    def read(p: pathlib.Path) -> Feed:
        arrays, _ = _read_npz(p)
        if signature is not None:
            check_feed(arrays, signature, str(p))
        return arrays

    read(files[0])  # fail early on the first file

    def factory() -> Iterator[Feed]:
        for p in files:
            yield read(p)

    return Dataset(factory, len(files), where)


def _pb_sets(dirs: list[pathlib.Path], signature: Sequence[InputSpec] | None, where: str) -> Dataset:
    feeds: list[Feed] = []
    expected: list[list[np.ndarray]] = []
    for d in dirs:
        inputs = sorted(d.glob("input_*.pb"), key=lambda p: int(p.stem.split("_")[1]))
        feed: Feed = {}
        for i, p in enumerate(inputs):
            spec = signature[i] if signature and i < len(signature) else None
            name, value = _read_value(p, spec.kind if spec is not None else "tensor")
            feed[name or (spec.name if spec is not None else f"input_{i}")] = value
        if signature is not None:
            check_feed(feed, signature, str(d))
        feeds.append(feed)
        outputs = sorted(d.glob("output_*.pb"), key=lambda p: int(p.stem.split("_")[1]))
        expected.append([_read_value(p, "tensor")[1] for p in outputs])
    return Dataset.from_feeds(feeds, where, expected=expected)


def _read_value(path: pathlib.Path, kind: str) -> tuple[str, Any]:
    """(name, value) of an ``input_*.pb`` holding an input of ``kind``.

    A TensorProto for tensors; for sequence and optional inputs the SequenceProto /
    OptionalProto onnx writes for them (a list of arrays; the value or None).
    """
    proto: Any = {"tensor": onnx.TensorProto, "sequence": onnx.SequenceProto}.get(kind, onnx.OptionalProto)()
    try:
        proto.ParseFromString(path.read_bytes())
        if kind == "tensor":
            return proto.name, onnx.numpy_helper.to_array(proto)
        if kind == "sequence":
            return proto.name, onnx.numpy_helper.to_list(proto)
        return proto.name, onnx.numpy_helper.to_optional(proto)
    except Exception as err:  # protobuf decode errors, segments, unsupported element types
        raise DataError(f"{path}: not a readable {type(proto).__name__} ({err})") from err


def _check_names(feed: Mapping[str, Any], signature: Sequence[InputSpec], where: str) -> None:
    names = [s.name for s in signature]
    for spec in signature:
        if spec.name not in feed:
            raise DataError(
                f"{where}: missing input {spec.name!r} (has: {', '.join(sorted(feed)) or 'nothing'};"
                f" model inputs: {', '.join(names)})"
            )
    extra = sorted(set(feed) - set(names))
    if extra:
        raise DataError(f"{where}: {extra[0]!r} is not a model input (model inputs: {', '.join(names)})")


def check_feed(feed: Mapping[str, Any], signature: Sequence[InputSpec], where: str) -> None:
    """Raise :class:`DataError` unless ``feed`` has exactly the model's inputs with fitting arrays.

    A sequence input takes a list of arrays of its element type (each checked for dtype only:
    elements may differ in shape); an optional input takes its value or None.
    """
    _check_names(feed, signature, where)
    for spec in signature:
        value = feed[spec.name]
        if spec.kind.startswith("optional") and value is None:
            continue
        if spec.kind.endswith("sequence"):
            if not isinstance(value, (list, tuple)):
                raise DataError(f"{where}: input {spec.name!r} is a sequence; expected a list of arrays")
            loose = dataclasses.replace(spec, shape=None, kind="tensor")
            for item in value:
                check_array(spec.name, np.asarray(item), loose, where)
            continue
        check_array(spec.name, np.asarray(value), spec, where)


def check_array(
    name: str, arr: np.ndarray, spec: InputSpec, where: str, *, batch_axis_free: bool = False
) -> None:
    """Check one array's dtype, rank and static dims (axis 0 free when ``batch_axis_free``).

    Values are not checked: -inf is how additive attention masks are exported, and inf/NaN in
    an input are data the model is defined on (onnxruntime runs them; calibration takes
    ranges from finite values only).
    """
    if arr.dtype != spec.dtype:
        raise DataError(f"{where}: input {name!r} has dtype {arr.dtype}, model expects {spec.dtype}")
    if spec.shape is None:
        return
    if arr.ndim != len(spec.shape):
        raise DataError(
            f"{where}: input {name!r} has shape {list(arr.shape)} (rank {arr.ndim}), model expects "
            f"rank {len(spec.shape)} {spec.describe()}"
        )
    for axis, (got, want) in enumerate(zip(arr.shape, spec.shape)):
        if batch_axis_free and axis == 0:
            continue
        if isinstance(want, int) and got != want:
            raise DataError(
                f"{where}: input {name!r} has shape {list(arr.shape)}, model expects {spec.describe()} "
                f"(dim {axis} is {got}, expected {want})"
            )


def random_data(
    signature: Sequence[InputSpec],
    n: int = 8,
    *,
    seed: int = 0,
    dims: Mapping[str, int] | None = None,
) -> Dataset:
    """``n`` seeded random feeds from the input signature, for smoke runs.

    Symbolic dims take their size from ``dims`` (by dim name), else 1. Values ignore the graph
    (integers in [0, 4)); the checks of a run without data use
    :func:`onnxopt.feedgen.generated_data`, whose values the model accepts.
    """
    dims = dict(dims or {})
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(n):
        feed = {}
        for spec in signature:
            shape = tuple(
                d if isinstance(d, int) else dims.get(d or "", 1) for d in (spec.shape or ())
            )
            nbytes = int(np.prod(shape, dtype=object)) * spec.dtype.itemsize
            if nbytes > _RANDOM_FEED_LIMIT:
                raise DataError(
                    f"cannot generate random data for input {spec.describe()}: {nbytes:,} bytes per "
                    "feed; give data (--calib/--eval) instead"
                )
            if np.issubdtype(spec.dtype, np.floating):
                feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
            elif spec.dtype == np.bool_:
                feed[spec.name] = rng.integers(0, 2, shape).astype(np.bool_)
            elif np.issubdtype(spec.dtype, np.integer):
                feed[spec.name] = rng.integers(0, 4, shape).astype(spec.dtype)
            else:
                raise DataError(f"cannot generate random data for input {spec.name!r} of dtype {spec.dtype}")
        feeds.append(feed)
    return Dataset.from_feeds(feeds, f"random(seed={seed})")
