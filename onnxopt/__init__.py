"""onnxopt: optimize ONNX models and prove the result on onnxruntime."""

from __future__ import annotations

from onnxopt.api import OptimizeResult, optimize, validate
from onnxopt.errors import (
    DataError,
    ModelLoadError,
    OnnxOptError,
    OutputPathError,
    ProviderError,
    ValidationFailed,
)
from onnxopt.modelinfo import describe_model as inspect

__all__ = [
    "DataError",
    "ModelLoadError",
    "OnnxOptError",
    "OptimizeResult",
    "OutputPathError",
    "ProviderError",
    "ValidationFailed",
    "__version__",
    "inspect",
    "optimize",
    "validate",
]

__version__ = "0.1.0"
