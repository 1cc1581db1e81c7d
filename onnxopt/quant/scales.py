"""Pure numpy quantisation arithmetic: scales, zero points, (de)quantisation, error measures.

Affine quantisation maps a real x to ``q = clip(round(x / s) + z, qmin, qmax)`` and back to
``x' = (q - z) * s``. A range ``[lo, hi]`` is first widened to contain 0, so that 0 is exactly
representable (zero padding and ReLU outputs stay exact). Symmetric int8 uses ``z = 0`` and
``s = max|x| / 127``; asymmetric uint8 uses ``s = (hi - lo) / 255``, ``z = round(-lo / s)``.
Biases are int32 with ``s_b = s_x * s_w`` (per output channel) and ``z_b = 0``, which is what
integer kernels add to their int32 accumulators.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from onnxopt.runtime import environment

__all__ = [
    "int8_dot_saturates",
    "QRANGE",
    "QType",
    "block_quantize",
    "dequantize",
    "per_channel_symmetric",
    "quantize",
    "quantize_bias",
    "relative_l2",
    "scale_zero_point",
    "sqnr_db",
]

QType = Literal["uint8", "int8", "int4", "uint4"]
QRANGE: dict[str, tuple[int, int]] = {
    "uint8": (0, 255),
    "int8": (-128, 127),
    "int4": (-8, 7),
    "uint4": (0, 15),
}
_TINY = np.float32(1e-12)


def scale_zero_point(
    lo: float, hi: float, qtype: QType = "uint8", *, symmetric: bool = False, reduce_range: bool = False
) -> tuple[np.float32, int]:
    """Per-tensor (scale, zero point) for the real range ``[lo, hi]``.

    Args:
        lo: smallest value to represent (widened to <= 0).
        hi: largest value to represent (widened to >= 0).
        qtype: the integer type.
        symmetric: zero point at the middle of the type (0 for int8, 128 for uint8).
        reduce_range: use one bit less (7-bit values), for CPUs whose int8 dot products saturate.

    Returns:
        (scale as float32 > 0, zero point as int).

    """
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    qmin, qmax = QRANGE[qtype]
    if reduce_range:
        qmin, qmax = qmin // 2, qmax // 2
    if symmetric:
        absmax = max(-lo, hi)
        zero = (qmax + qmin + 1) // 2 if qmin >= 0 else 0
        scale = np.float32(absmax / (qmax - zero)) if absmax > 0 else np.float32(1.0)
        return max(scale, _TINY), zero
    if hi == lo:
        return np.float32(1.0), int(qmin if qmin >= 0 else 0)
    scale = np.float32((hi - lo) / (qmax - qmin))
    zero = int(np.clip(round(qmin - lo / float(scale)), qmin, qmax))
    return max(scale, _TINY), zero


def quantize(x: np.ndarray, scale: np.ndarray | float, zero: np.ndarray | int, qtype: QType, axis: int | None = None) -> np.ndarray:
    """``clip(round(x / scale) + zero)`` as the integer numpy type (int8/uint8; int4 kept in int8)."""
    scale = np.asarray(scale, dtype=np.float32)
    zero = np.asarray(zero)
    if axis is not None and scale.ndim == 1:
        shape = [1] * x.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
        zero = zero.reshape(shape)
    qmin, qmax = QRANGE[qtype]
    q = np.clip(np.rint(x.astype(np.float32) / scale) + zero.astype(np.float32), qmin, qmax)
    return q.astype(np.uint8 if qtype in ("uint8", "uint4") else np.int8)


def dequantize(q: np.ndarray, scale: np.ndarray | float, zero: np.ndarray | int, axis: int | None = None) -> np.ndarray:
    """``(q - zero) * scale`` in float32 (per-channel along ``axis`` if scale is 1-D)."""
    scale = np.asarray(scale, dtype=np.float32)
    zero = np.asarray(zero, dtype=np.float32)
    if axis is not None and scale.ndim == 1:
        shape = [1] * q.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
        zero = zero.reshape(shape)
    return ((q.astype(np.float32) - zero) * scale).astype(np.float32)


def per_channel_symmetric(
    w: np.ndarray, axis: int, qtype: QType = "int8", *, reduce_range: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel weights: (q, scales[w.shape[axis]]), zero points all 0."""
    qmax = QRANGE[qtype][1] // (2 if reduce_range else 1)
    other = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
    absmax = np.abs(w).max(axis=other) if other else np.abs(w)
    scales = np.where(absmax > 0, absmax / qmax, 1.0).astype(np.float32)
    scales = np.maximum(scales, _TINY)
    return quantize(w, scales, np.zeros_like(scales, dtype=np.int32), qtype, axis), scales


def block_quantize(
    w: np.ndarray, axis: int, block_size: int, qtype: QType = "int4"
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric blockwise quantisation along ``axis`` (blocks of ``block_size``, last one padded).

    Returns:
        (q with w's shape, scales with w's shape but ``ceil(n / block_size)`` along ``axis``) —
        the layout of DequantizeLinear's ``block_size`` attribute (opset 21).

    """
    axis = axis % w.ndim
    n = w.shape[axis]
    nblocks = -(-n // block_size)
    pad = nblocks * block_size - n
    moved = np.moveaxis(w, axis, -1)
    padded = np.pad(moved, [(0, 0)] * (moved.ndim - 1) + [(0, pad)])
    blocks = padded.reshape(*moved.shape[:-1], nblocks, block_size)
    qmax = QRANGE[qtype][1]
    absmax = np.abs(blocks).max(axis=-1)
    scales = np.maximum(np.where(absmax > 0, absmax / qmax, 1.0), _TINY).astype(np.float32)
    qmin = QRANGE[qtype][0]
    q = np.clip(np.rint(blocks / scales[..., None]), qmin, qmax).astype(np.int8)
    q = q.reshape(*moved.shape[:-1], nblocks * block_size)[..., :n]
    return np.moveaxis(q, -1, axis), np.moveaxis(scales, -1, axis)


def quantize_bias(bias: np.ndarray, input_scale: float, weight_scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int32 bias and its scales ``s_x * s_w`` (one per output channel)."""
    scales = (np.float32(input_scale) * np.asarray(weight_scales, dtype=np.float32)).astype(np.float32)
    scales = np.broadcast_to(scales, bias.shape).astype(np.float32).copy()
    scales = np.maximum(scales, _TINY)
    limit = np.iinfo(np.int32).max
    q = np.clip(np.rint(bias.astype(np.float64) / scales), -limit, limit).astype(np.int32)
    return q, scales


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantisation-noise ratio in dB: ``10 log10(sum(ref^2) / sum((ref - approx)^2))``.

    ``inf`` when the two are identical; ``-inf`` when the reference is all zero but approx is not.
    """
    ref = np.asarray(reference, dtype=np.float64)
    noise = float(np.sum((ref - np.asarray(approx, dtype=np.float64)) ** 2))
    signal = float(np.sum(ref * ref))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return float(10.0 * np.log10(signal / noise))


def relative_l2(reference: np.ndarray, approx: np.ndarray) -> float:
    """``||approx - reference|| / ||reference||`` (0 when both are zero, inf when only the reference is)."""
    ref = np.asarray(reference, dtype=np.float64)
    noise = float(np.linalg.norm(np.asarray(approx, dtype=np.float64) - ref))
    signal = float(np.linalg.norm(ref))
    if noise == 0.0:
        return 0.0
    return noise / signal if signal else float("inf")


def int8_dot_saturates() -> bool:
    """Whether onnxruntime's u8s8 integer kernels saturate on this CPU.

    x86 CPUs without VNNI multiply-add uint8 x int8 pairs into int16 (``vpmaddubsw``), which
    saturates for large values; 7-bit values (reduce_range) avoid it. VNNI/AMX and ARM do not
    saturate. Where the flags cannot be read, an x86 CPU is assumed to saturate. The CPU is read
    once by :func:`onnxopt.runtime.environment.cpu_info`.
    """
    return environment.cpu_info().int8_dot_saturates
