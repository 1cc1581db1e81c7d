"""Deployable exports: ONNX (inline or external weights) and ORT format for mobile/edge.

ONNX weights stay inline, go to one external file, or to one file per tensor.

ORT format is written the way onnxruntime's own converter
(``python -m onnxruntime.tools.convert_onnx_models_to_ort``, "Fixed" style) writes it: an
onnxruntime CPU session loads the model at the stated graph optimization level (default
``all``, with the x86-only ``NchwcTransformer`` excluded, as the converter does for every
platform but amd64) and saves it with ``session.save_model_format=ORT``. Next to
``model.ort`` goes ``model.required_operators.config``, the operator list a reduced
(``--include_ops_by_config``) onnxruntime build needs, made with the converter's own helper.
The ``.ort`` file is then loaded again by onnxruntime as a check.

Guarantees: every file is written in a temporary folder beside the destination and renamed
into place, so a failure leaves nothing behind; above the 2 GB protobuf limit ONNX weights go
to external data automatically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pathlib
import re
import shutil
from collections.abc import Iterable
from typing import Literal

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxopt import io as _io
from onnxopt.errors import OnnxOptError, OutputPathError
from onnxopt.runtime import sessions as runtime
from onnxopt.runtime import validation

__all__ = [
    "ORT_MIN_COSINE",
    "ExportError",
    "ExportOptions",
    "ExportResult",
    "check_ort",
    "export",
    "format_for",
]

logger = logging.getLogger(__name__)

Format = Literal["onnx", "ort"]
ExternalData = Literal["auto", "off", "one-file", "per-tensor"]
Platform = Literal["generic", "amd64", "arm"]
# An ORT format file must reproduce the ONNX model's outputs at least this closely.
ORT_MIN_COSINE = 0.999


class ExportError(OnnxOptError):
    """The model cannot be written in the requested format."""


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """How :func:`export` writes a model.

    Attributes:
        format: onnx or ort; None: from the file suffix (``.ort`` -> ort, anything else -> onnx).
        external_data: auto (external only above the 2 GB limit), off, one-file
            (``<name>.data``), per-tensor (one file per tensor, named after it). ONNX only.
        size_threshold: tensors larger than this many bytes go to external data (as onnx_ir).
        ort_level: onnxruntime graph optimization level baked into an ORT format file.
        ort_platform: generic (runs on any CPU), amd64 (allows the x86 NCHWc layout),
            arm (lets QDQ INT8 nodes become ARM int8 kernels, ``session.qdqisint8allowed``).
        ort_config: write ``<stem>.required_operators.config`` beside the ``.ort`` file.
    """

    format: Format | None = None
    external_data: ExternalData = "auto"
    size_threshold: int = 1024
    ort_level: runtime.OptLevel = "all"
    ort_platform: Platform = "generic"
    ort_config: bool = True

    def __post_init__(self) -> None:
        if self.format not in (None, "onnx", "ort"):
            raise ValueError(f"format must be onnx or ort, got {self.format!r}")
        if self.external_data not in ("auto", "off", "one-file", "per-tensor"):
            raise ValueError(
                f"external_data must be auto, off, one-file or per-tensor, got {self.external_data!r}"
            )
        if self.size_threshold < 0:
            raise ValueError(f"size_threshold must be >= 0 bytes, got {self.size_threshold}")
        if self.ort_level not in ("disable", "basic", "extended", "all"):
            raise ValueError(f"ort_level must be disable, basic, extended or all, got {self.ort_level!r}")
        if self.ort_platform not in ("generic", "amd64", "arm"):
            raise ValueError(f"ort_platform must be generic, amd64 or arm, got {self.ort_platform!r}")


@dataclasses.dataclass
class ExportResult:
    """What :func:`export` wrote."""

    path: pathlib.Path
    format: Format
    files: list[pathlib.Path]
    ort_level: str | None = None
    check: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes on disk of every file written."""
        return sum(f.stat().st_size for f in self.files)

    def to_json(self) -> dict[str, object]:
        """JSON-ready summary."""
        return {
            "path": str(self.path),
            "format": self.format,
            "files": [str(f) for f in self.files],
            "bytes": self.nbytes,
            "ort_level": self.ort_level,
            "check": self.check,
        }


def format_for(path: str | os.PathLike, fmt: Format | None = None) -> Format:
    """Return the export format for ``path``: ``fmt`` (checked against the suffix) or the suffix.

    Raises:
        ExportError: ``fmt`` contradicts the suffix (``.ort`` with onnx, ``.onnx`` with ort).
    """
    suffix = pathlib.Path(path).suffix.lower()
    by_suffix: Format | None = "ort" if suffix == ".ort" else ("onnx" if suffix == ".onnx" else None)
    if fmt is None:
        return by_suffix or "onnx"
    if by_suffix is not None and by_suffix != fmt:
        raise ExportError(f"{path}: suffix {suffix} does not match --format {fmt}")
    return fmt


def export(
    model: ir.Model,
    path: str | os.PathLike,
    options: ExportOptions | None = None,
    *,
    inputs: tuple[os.PathLike | str, ...] = (),
) -> ExportResult:
    """Write ``model`` to ``path`` as ``options`` say; ``model`` is not changed.

    Raises:
        ExportError: ORT format asked with external data, or onnxruntime cannot convert it.
        OutputPathError: missing output folder or the output would overwrite an input.
    """
    options = options or ExportOptions()
    fmt = format_for(path, options.format)
    path = _io.check_output_path(path, inputs=inputs)
    if fmt == "ort":
        if options.external_data not in ("auto", "off"):
            raise ExportError(f"{path}: ORT format keeps its weights inline; drop --external-data")
        return _export_ort(model, path, options)
    if options.external_data == "per-tensor":
        return _save_per_tensor(model, path, options.size_threshold, inputs)
    flag = {"auto": None, "off": False, "one-file": True}[options.external_data]
    if flag is False and _io.model_nbytes(model) > _io.PROTOBUF_LIMIT:
        raise ExportError(f"{path}: {_io.model_nbytes(model):,} weight bytes exceed the 2 GB protobuf limit; "
                          "use external data")
    _io.save_model(model, path, external_data=flag, size_threshold=options.size_threshold, inputs=inputs)
    files = [path]
    data_file = path.parent / (path.name + ".data")
    if _io.external_tensors(_io.load_model(path)) and data_file.exists():
        files.append(data_file)
    return ExportResult(path, "onnx", files)


_ORT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def _export_ort(model: ir.Model, path: pathlib.Path, options: ExportOptions) -> ExportResult:
    if _io.model_nbytes(model) > _io.PROTOBUF_LIMIT:
        raise ExportError(f"{path}: ORT format (a flatbuffer) cannot hold over 2 GB of weights")
    with _io.staging_dir(path.parent) as tmp_dir:
        tmp_ort = tmp_dir / path.name
        so = ort.SessionOptions()
        so.graph_optimization_level = _ORT_LEVELS[options.ort_level]
        so.optimized_model_filepath = str(tmp_ort)
        so.log_severity_level = 3
        so.add_session_config_entry("session.save_model_format", "ORT")
        so.add_session_config_entry("session.qdqisint8allowed", "1" if options.ort_platform == "arm" else "0")
        # As onnxruntime's converter: the NCHWc layout is x86-only, so keep it out unless asked.
        disabled = ["NchwcTransformer"] if options.ort_platform != "amd64" else None
        serialized = ir.to_proto(model).SerializeToString()
        try:
            ort.InferenceSession(serialized, so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
            ort.InferenceSession(str(tmp_ort), providers=["CPUExecutionProvider"])  # loads back
        except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ExportError(f"{path}: onnxruntime cannot write/load it as ORT format: {first}") from err
        files = [path]
        config_tmp = None
        if options.ort_config:
            from onnxruntime.tools.ort_format_model import create_config_from_models

            config_tmp = tmp_dir / (path.stem + ".required_operators.config")
            helper_logger = logging.getLogger("ort_format_model.utils")
            level = helper_logger.level
            helper_logger.setLevel(logging.WARNING)  # it logs one INFO line per config written
            try:
                create_config_from_models([tmp_ort], config_tmp, enable_type_reduction=False)
            finally:
                helper_logger.setLevel(level)
            config_tmp.write_text(config_tmp.read_text().replace(str(tmp_ort), path.name))
        os.replace(tmp_ort, path)
        if config_tmp is not None:
            config_path = path.parent / config_tmp.name
            os.replace(config_tmp, config_path)
            files.append(config_path)
    logger.info("wrote %s (ORT format, optimization level %s)", path, options.ort_level)
    return ExportResult(path, "ort", files, ort_level=options.ort_level)


def check_ort(
    model: ir.Model,
    ort_path: str | os.PathLike,
    feeds: Iterable[dict[str, np.ndarray]],
    *,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> dict[str, validation.OutputMetrics]:
    """Per output: metrics of the ``.ort`` file's outputs against ``model``'s (both on CPU).

    The ONNX model runs with onnxruntime optimizations off, the ``.ort`` file as saved.
    """
    feeds = list(feeds)
    with runtime.session(model) as ref, runtime.session(str(ort_path)) as cand:
        ref_out = runtime.run_all(ref, feeds)
        cand_out = runtime.run_all(cand, feeds)
        return {
            name: validation.output_metrics(
                [o[name] for o in ref_out], [o[name] for o in cand_out], rtol=rtol, atol=atol
            )
            for name in ref.output_names
        }


def _tensor_file_name(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]", "_", name).strip("._") or "tensor"
    candidate = base
    i = 1
    while candidate.lower() in taken:
        candidate = f"{base}_{i}"
        i += 1
    taken.add(candidate.lower())
    return candidate


def _check_replaceable(path: pathlib.Path, weights_dir: pathlib.Path) -> None:
    """Refuse to replace a weights folder that holds files other than ``path``'s own tensors."""
    if not weights_dir.exists():
        return
    if not weights_dir.is_dir():
        raise OutputPathError(f"{weights_dir}: exists and is not a folder; cannot write per-tensor weights")
    owned: set[pathlib.Path] = set()
    if path.is_file():
        with contextlib.suppress(OnnxOptError):
            owned = {(path.parent / t.location).resolve() for t in _io.external_tensors(_io.load_model(path))}
    foreign = [f for f in weights_dir.iterdir() if f.resolve() not in owned]
    if foreign:
        raise OutputPathError(
            f"{weights_dir}: folder exists and holds {foreign[0].name!r}, which {path.name} does not "
            "use; remove the folder or choose another output name"
        )


def _save_per_tensor(
    model: ir.Model, path: pathlib.Path, size_threshold: int, inputs: tuple[os.PathLike | str, ...]
) -> ExportResult:
    """ONNX with each initializer larger than ``size_threshold`` bytes in its own file."""
    data_dir_name = path.stem + ".weights"
    _check_replaceable(path, path.parent / data_dir_name)
    originals: list[tuple[ir.Value, ir.TensorProtocol]] = []
    files = [path]
    with _io.staging_dir(path.parent) as tmp_dir:
        try:
            (tmp_dir / data_dir_name).mkdir()
            taken: set[str] = set()
            for graph in model.graphs():
                for value in graph.initializers.values():
                    tensor = value.const_value
                    if tensor is None or tensor.nbytes <= size_threshold:
                        continue
                    location = f"{data_dir_name}/{_tensor_file_name(value.name or 'tensor', taken)}"
                    with open(tmp_dir / location, "wb") as f:
                        f.write(tensor.tobytes())
                    originals.append((value, tensor))
                    value.const_value = ir.ExternalTensor(
                        location, offset=0, length=tensor.nbytes, dtype=tensor.dtype,
                        shape=tensor.shape, name=tensor.name, base_dir=str(path.parent),
                    )
            ir.save(model, tmp_dir / path.name)
            final_dir = path.parent / data_dir_name
            if final_dir.exists():
                shutil.rmtree(final_dir)
            if originals:
                os.replace(tmp_dir / data_dir_name, final_dir)
                files += sorted(final_dir.iterdir())
            os.replace(tmp_dir / path.name, path)
        finally:
            for value, tensor in originals:
                value.const_value = tensor
    return ExportResult(path, "onnx", files)
