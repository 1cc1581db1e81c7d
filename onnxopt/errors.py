"""Typed exceptions: every user-facing failure is one of these, with a one-line message."""

from __future__ import annotations

__all__ = [
    "DataError",
    "ModelLoadError",
    "OnnxOptError",
    "OutputPathError",
    "ProviderError",
    "ValidationFailed",
]


class OnnxOptError(Exception):
    """Base class: the CLI prints ``str(err)`` on one line and exits with code 2."""


class ModelLoadError(OnnxOptError):
    """The model file is missing, unreadable, not ONNX, or its external data is unsafe."""


class OutputPathError(OnnxOptError):
    """The output path cannot be written (missing folder, same as the input, ...)."""


class DataError(OnnxOptError):
    """Calibration or evaluation data does not match the model's inputs."""


class ProviderError(OnnxOptError):
    """A required onnxruntime execution provider is not available."""


class ValidationFailed(OnnxOptError):  # noqa: N818 - reads as a verdict, like unittest's SkipTest
    """The candidate model missed a fidelity threshold (CLI exit code 1, not 2)."""
