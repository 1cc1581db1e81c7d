"""Load and save models on onnx-ir: external data, the 2 GB limit, safe paths, atomic writes.

Guarantees:
    - ``load_model`` never writes; it refuses external-data locations that are absolute or
      escape the model's folder, and files that are not ONNX models, with one-line errors.
    - ``save_model`` and ``write_atomic`` write into a temporary folder beside the destination
      (:func:`staging_dir`) and rename the finished files into place, so a failure leaves no
      partial output behind. Every file onnxopt writes is created there with a plain ``open``,
      so it gets the permissions any new file of the user gets (0o666 less the umask; not the
      0o600 of ``tempfile.mkstemp``).
"""

from __future__ import annotations

import contextlib
import math
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator

import google.protobuf.message
import onnx
import onnx_ir as ir

from onnxopt.errors import ModelLoadError, OutputPathError

__all__ = [
    "PROTOBUF_LIMIT",
    "check_model_file",
    "external_tensors",
    "load_model",
    "model_nbytes",
    "check_output_path",
    "release_external",
    "save_model",
    "serialized_size",
    "staging_dir",
    "write_atomic",
]

PROTOBUF_LIMIT = 2**31 - 1
# Leave head room for the graph itself: above this many weight bytes we save external data.
_AUTO_EXTERNAL_BYTES = 1_800_000_000


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX model (with its external data, memory-mapped lazily) from ``path``.

    Raises:
        ModelLoadError: missing file, not a protobuf, not an ONNX model, or unsafe/missing
            external data.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: model file not found")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a folder, expected an .onnx file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (google.protobuf.message.DecodeError, RuntimeError, ValueError) as err:
        raise ModelLoadError(f"{path}: not a valid ONNX protobuf ({_first_line(err)})") from err
    if not proto.HasField("graph") or proto.ir_version <= 0 or not proto.opset_import:
        raise ModelLoadError(
            f"{path}: not an ONNX model (no graph, IR version or opset import; "
            "truncated or not a model file?)"
        )
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as err:
        try:  # the checker usually names the problem better (e.g. a name defined twice)
            onnx.checker.check_model(proto)
        except onnx.checker.ValidationError as why:
            raise ModelLoadError(f"{path}: invalid ONNX model ({_first_line(why)})") from err
        raise ModelLoadError(f"{path}: cannot read model ({_first_line(err)})") from err
    ir.external_data.set_base_dir(model.graph, str(path.parent))
    _check_external_data(model, path)
    return model


def check_model_file(path: str | os.PathLike) -> None:
    """Refuse a model that ``onnx.checker`` rejects (by path, so external data and > 2 GB work).

    Catches what would otherwise fail deep inside a pass or onnxruntime: cycles, names defined
    twice, dangling inputs, missing initializers, unknown ops, undeclared domains, tensors whose
    data does not fit their shape, a graph without outputs.

    Raises:
        ModelLoadError: one line naming the problem.
    """
    path = pathlib.Path(path)
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise ModelLoadError(f"{path}: invalid ONNX model ({_first_line(err)})") from err
    proto = onnx.load(str(path), load_external_data=False)
    if not proto.graph.output:
        raise ModelLoadError(f"{path}: invalid ONNX model (the graph has no outputs)")


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def external_tensors(model: ir.Model) -> list[ir.ExternalTensor]:
    """Every tensor of the model (initializers in all graphs) stored as external data."""
    found = []
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                found.append(value.const_value)
    for node in model.graph.all_nodes():
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
                found.append(attr.value)
    return found


def _check_external_data(model: ir.Model, path: pathlib.Path) -> None:
    base = path.parent.resolve()
    for tensor in external_tensors(model):
        location = tensor.location
        name = tensor.name or "<unnamed>"
        if os.path.isabs(location) or pathlib.PurePath(location).anchor:
            raise ModelLoadError(
                f"{path}: tensor {name!r} has an absolute external-data location {location!r}; "
                "only paths inside the model's folder are allowed"
            )
        target = (base / location).resolve()
        if base != target and base not in target.parents:
            raise ModelLoadError(
                f"{path}: tensor {name!r} external-data location {location!r} escapes the "
                "model's folder"
            )
        if not target.is_file():
            raise ModelLoadError(
                f"{path}: tensor {name!r} external-data file {location!r} not found"
            )
        expected = _expected_nbytes(tensor)
        if tensor.length is not None and expected is not None and tensor.length != expected:
            raise ModelLoadError(
                f"{path}: tensor {name!r} external-data length {tensor.length} does not match its "
                f"shape and dtype ({expected} bytes)"
            )
        length = tensor.length if tensor.length is not None else (expected or 0)
        needed = (tensor.offset or 0) + length
        if target.stat().st_size < needed:
            raise ModelLoadError(
                f"{path}: tensor {name!r} needs bytes up to {needed} of {location!r}, "
                f"file has {target.stat().st_size}"
            )


def _expected_nbytes(tensor: ir.ExternalTensor) -> int | None:
    """Bytes a tensor's shape and dtype call for (None for strings and unknown sizes)."""
    try:
        size = math.prod(int(d) for d in tensor.shape)
        return math.ceil(size * tensor.dtype.itemsize)
    except (TypeError, ValueError, AttributeError):
        return None


def release_external(tensor: object) -> None:
    """Unmap an external tensor's data file once its values have been read.

    onnx-ir keeps the file memory-mapped after the first read, so without this every weight a
    pass reads stays resident (and counted in RSS) for the whole run; the next read maps it again.
    """
    if isinstance(tensor, ir.ExternalTensor):
        with contextlib.suppress(BufferError):  # an array still views the mapping: leave it mapped
            tensor.release()


def _internalize(model: ir.Model) -> None:
    """Read external tensors into memory so that the saved file stands on its own."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                value.const_value = ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=tensor.name)


def model_nbytes(model: ir.Model) -> int:
    """Bytes of all initializers in all graphs."""
    total = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


def check_output_path(path: str | os.PathLike, *, inputs: tuple[os.PathLike | str, ...] = ()) -> pathlib.Path:
    """Resolve ``path`` for writing; refuse a missing folder or overwriting one of ``inputs``."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise OutputPathError(f"{path}: output path is a folder, expected a file name")
    parent = path.parent if str(path.parent) else pathlib.Path(".")
    if not parent.is_dir():
        raise OutputPathError(f"{path}: output folder {str(parent)!r} does not exist")
    for other in inputs:
        if pathlib.Path(other).exists() and path.exists() and path.samefile(other):
            raise OutputPathError(f"{path}: output would overwrite the input model")
    return path


@contextlib.contextmanager
def _no_initializer_value_info(model: ir.Model):
    """Save without a value_info entry per initializer (its tensor already holds dtype and dims).

    onnx-ir writes one for every typed initializer: 848 of them in an INT8 PP-OCR det model, 3 %
    of its file. Types and shapes are restored on exit: the model is not changed. Kept where
    onnx's shape inference needs them: subgraph initializers, graph outputs, and main-graph
    initializers read inside a subgraph (outer-scope types come from value_info only; without
    them the full checker failed on conformance affine_grid_3d_align_corners_expanded).
    """
    saved = []
    graph = model.graph
    for value in graph.initializers.values():
        if value.const_value is None or value.is_graph_input() or value.is_graph_output():
            continue
        if any(use.node.graph is not graph for use in value.uses()):
            continue
        if value.type or value.shape:
            saved.append((value, value.type, value.shape))
            value.type, value.shape = None, None
    try:
        yield
    finally:
        for value, type_, shape in saved:
            value.type, value.shape = type_, shape


def serialized_size(model: ir.Model) -> int:
    """Bytes of ``model`` as :func:`save_model` writes it in one file."""
    with _no_initializer_value_info(model):
        return ir.to_proto(model).ByteSize()


def save_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    size_threshold: int = 1024,
    inputs: tuple[os.PathLike | str, ...] = (),
) -> pathlib.Path:
    """Write ``model`` to ``path`` atomically.

    Args:
        model: the model; it is not changed.
        path: destination ``.onnx`` file; its folder must exist.
        external_data: ``True`` stores tensors of ``size_threshold`` bytes or more in
            ``<name>.data`` beside the model; ``None`` does so only above the 2 GB limit.
        size_threshold: smallest tensor (bytes) moved to external data.
        inputs: paths that must not be overwritten (the input model).

    Returns:
        The path written.
    """
    path = check_output_path(path, inputs=inputs)
    if external_data is None:
        external_data = model_nbytes(model) > _AUTO_EXTERNAL_BYTES
    data_name = path.name + ".data" if external_data else None
    if not external_data:
        _internalize(model)
    with staging_dir(path.parent) as tmp_dir:
        tmp_model = tmp_dir / path.name
        with _no_initializer_value_info(model):
            ir.save(
                model,
                tmp_model,
                external_data=data_name,
                size_threshold_bytes=size_threshold,
            )
        if data_name is not None and (tmp_dir / data_name).exists():
            os.replace(tmp_dir / data_name, path.parent / data_name)
        os.replace(tmp_model, path)
    return path


@contextlib.contextmanager
def staging_dir(folder: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yield a temporary folder inside ``folder`` for output files; remove it and what is left.

    Write the files here, then ``os.replace`` each finished one into ``folder`` (same file
    system, so the rename is atomic). The folder itself is private (0o700), but files created
    in it with ``open`` get the mode any new file of the user gets: 0o666 less the umask.
    """
    tmp_dir = pathlib.Path(tempfile.mkdtemp(prefix=".onnxopt-", dir=folder))
    try:
        yield tmp_dir
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp_dir)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> pathlib.Path:
    """Write ``data`` (text as UTF-8) to ``path`` whole or not at all; its folder must exist.

    The file gets the permissions of a new file of the user (see :func:`staging_dir`).
    """
    path = pathlib.Path(path)
    with staging_dir(path.parent) as tmp_dir:
        staged = tmp_dir / path.name
        if isinstance(data, str):
            staged.write_text(data, encoding="utf-8")
        else:
            staged.write_bytes(data)
        os.replace(staged, path)
    return path
