"""The passes, one per module; importing this package registers them all."""

from __future__ import annotations

from onnxopt.pass_base import all_passes, get, make
from onnxopt.passes import fp16, fuse, lowrank, shape_inference, simplify

__all__ = ["all_passes", "fp16", "fuse", "get", "lowrank", "make", "shape_inference", "simplify"]
