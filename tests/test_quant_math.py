"""quant_math against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from onnxopt.quant import scales as qm


def test_asymmetric_uint8_scale_and_zero_point():
    scale, zero = qm.scale_zero_point(-1.0, 3.0, "uint8")
    assert scale == pytest.approx(4.0 / 255) and zero == round(1.0 / (4.0 / 255))  # 64
    # the range is widened to contain 0: [0.5, 2] -> [0, 2]
    scale, zero = qm.scale_zero_point(0.5, 2.0, "uint8")
    assert scale == pytest.approx(2.0 / 255) and zero == 0


def test_symmetric_and_reduced_ranges():
    scale, zero = qm.scale_zero_point(-2.0, 1.0, "int8", symmetric=True)
    assert scale == pytest.approx(2.0 / 127) and zero == 0
    scale, zero = qm.scale_zero_point(-2.0, 1.0, "uint8", symmetric=True)
    assert scale == pytest.approx(2.0 / 127) and zero == 128
    scale, zero = qm.scale_zero_point(-2.0, 1.0, "int8", symmetric=True, reduce_range=True)
    assert scale == pytest.approx(2.0 / 63) and zero == 0
    assert qm.scale_zero_point(0.0, 0.0, "uint8") == (1.0, 0)


def test_quantize_dequantize_round_trip_error_is_at_most_half_a_step():
    x = np.linspace(-1, 3, 1001, dtype=np.float32)
    scale, zero = qm.scale_zero_point(-1.0, 3.0, "uint8")
    q = qm.quantize(x, scale, zero, "uint8")
    assert q.dtype == np.uint8
    assert np.abs(qm.dequantize(q, scale, zero) - x).max() <= scale / 2 + 1e-6
    # zero is exact
    assert qm.dequantize(qm.quantize(np.zeros(3, np.float32), scale, zero, "uint8"), scale, zero).tolist() == [0, 0, 0]


def test_per_channel_symmetric_weights():
    w = np.array([[1.0, -2.0], [0.5, 0.25], [0.0, 0.0]], dtype=np.float32)
    q, scales = qm.per_channel_symmetric(w, axis=0)
    np.testing.assert_allclose(scales, [2.0 / 127, 0.5 / 127, 1.0], rtol=1e-6)  # all-zero row: scale 1
    assert q.dtype == np.int8
    assert q.tolist() == [[64, -127], [127, 64], [0, 0]]
    _q1, s1 = qm.per_channel_symmetric(w, axis=1)
    np.testing.assert_allclose(s1, [1.0 / 127, 2.0 / 127], rtol=1e-6)


def test_block_quantize_int4_layout_and_error():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((40, 6)).astype(np.float32)
    q, scales = qm.block_quantize(w, axis=0, block_size=16, qtype="int4")
    assert q.shape == w.shape and scales.shape == (3, 6)
    assert q.min() >= -8 and q.max() <= 7
    deq = q.astype(np.float32) * np.repeat(scales, 16, axis=0)[:40]
    assert np.all(np.abs(deq - w) <= np.repeat(scales, 16, axis=0)[:40] / 2 + 1e-6)


def test_bias_is_int32_with_product_scale():
    q, scales = qm.quantize_bias(np.array([1.0, -0.5], np.float32), 0.1, np.array([0.5, 0.25], np.float32))
    np.testing.assert_allclose(scales, [0.05, 0.025], rtol=1e-6)
    assert q.dtype == np.int32 and q.tolist() == [20, -20]


def test_sqnr():
    ref = np.ones(100)
    assert qm.sqnr_db(ref, ref) == float("inf")
    assert qm.sqnr_db(ref, ref * 1.1) == pytest.approx(20.0)  # noise 0.01 per element
    assert qm.sqnr_db(np.zeros(3), np.ones(3)) == float("-inf")
