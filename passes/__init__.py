"""The passes, one per module; importing this package registers them all."""

from __future__ import annotations

from onnxopt.passes import (
    cluster,
    distill,
    fp16,
    fuse,
    logquant,
    lowrank,
    mixed,
    prune,
    quantize,
    quantize_weights,
    shape_inference,
    simplify,
    teacher,
)

from onnxopt.pass_base import all_passes, get, make

__all__ = ["all_passes", "cluster", "distill", "fp16", "fuse", "get", "logquant", "lowrank", "make", "mixed", "prune", "quantize", "quantize_weights", "shape_inference", "simplify", "teacher"]
