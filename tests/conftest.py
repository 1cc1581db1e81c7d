"""Shared fixtures: seeded rng, bundled models, a slow marker, provider skips."""

from __future__ import annotations

import collections
import pathlib

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnxopt import io as _io

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def model_path(name: str) -> pathlib.Path:
    """Path of a bundled model or data file under models/ (skips nothing: it must exist)."""
    path = MODELS / name
    assert path.exists(), f"bundled file {path} is missing"
    return path


def load_model(name: str) -> ir.Model:
    """A fresh ir.Model of a bundled model (each call an independent copy)."""
    return _io.load_model(model_path(name))


def from_text(text: str) -> ir.Model:
    """A tiny model written as ONNX text."""
    return ir.from_onnx_text(text)


def op_counts(model: ir.Model) -> collections.Counter[str]:
    return collections.Counter(n.op_type for n in model.graph.all_nodes())


def requires_ep(provider: str):
    """Skip unless onnxruntime has ``provider`` (e.g. a GPU build on a machine with a GPU)."""
    return pytest.mark.skipif(
        provider not in ort.get_available_providers(),
        reason=f"needs {provider}, which this onnxruntime build/machine does not have (no GPU here)",
    )
