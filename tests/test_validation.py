from __future__ import annotations

import math

import numpy as np
import onnx
import pytest

import onnxopt
from onnxopt.errors import ValidationFailed
from onnxopt.runtime import validation
from onnxopt.testing.builders import conv_bn_feeds, conv_bn_model


def test_metrics_match_hand_computed_values():
    ref = [np.array([[1.0, 2.0], [3.0, 0.0]], np.float32)]
    cand = [np.array([[1.0, 2.5], [2.0, 0.5]], np.float32)]
    m = validation.output_metrics(ref, cand, rtol=0.0, atol=0.4, labels=np.array([1, 1]))
    # diffs: 0, 0.5, 1.0, 0.5
    assert m.max_abs == pytest.approx(1.0)
    assert m.mean_abs == pytest.approx(0.5)
    assert m.rel_l2 == pytest.approx(math.sqrt(0.25 + 1.0 + 0.25) / math.sqrt(1 + 4 + 9))
    cos = (1 * 1 + 2 * 2.5 + 3 * 2 + 0) / (math.sqrt(14) * math.sqrt(1 + 6.25 + 4 + 0.25))
    assert m.cosine == pytest.approx(cos)
    assert m.mismatch_frac == pytest.approx(0.75)
    assert m.max_rel == pytest.approx(0.5 / 1e-12)  # |0 - 0.5| / max(|0|, 1e-12)
    # argmax ref: [1, 0]; cand: [1, 0] -> agree; labels [1, 1] -> both 50 %
    assert m.top1 == 1.0 and m.ref_accuracy == 0.5 and m.cand_accuracy == 0.5


def test_sequence_probabilities_agree_per_sample_where_every_position_does():
    eye = np.eye(3, dtype=np.float32)
    # two feeds of different lengths (a recogniser's widths differ per batch): 2 + 1 samples
    ref = [eye[[[0, 1, 2, 0], [1, 1, 0, 2]]], eye[[[2, 2, 1]]]]
    cand = [eye[[[0, 1, 2, 0], [1, 2, 0, 2]]], eye[[[2, 2, 1]]]]  # one position of the 2nd sample differs
    assert validation.output_metrics(ref, cand).top1 == pytest.approx(2 / 3)
    hidden = [np.full((2, 4, 3), 0.5, np.float32)]  # rows summing to 1.5: not probabilities, no top-1
    assert validation.output_metrics(hidden, hidden).top1 is None


def test_metrics_in_chunks_equal_the_whole_array_in_float64(rng, monkeypatch):
    ref = [rng.standard_normal(n).astype(np.float32) for n in (5, 13, 1, 8)]
    cand = [(r + rng.standard_normal(r.size) * 0.1).astype(np.float32) for r in ref]
    ref[1][3] = cand[1][3] = np.nan  # NaN in both agrees
    monkeypatch.setattr(validation, "CHUNK_VALUES", 3)  # pieces cross the feeds' boundaries
    got = validation.output_metrics(ref, cand, rtol=1e-3, atol=1e-2)
    a = np.concatenate(ref).astype(np.float64)
    b = np.concatenate(cand).astype(np.float64)
    full = np.where(np.isnan(a) & np.isnan(b), 0.0, np.abs(a - b))
    d = full[~np.isnan(a)]
    assert got.max_abs == pytest.approx(d.max()) and got.mean_abs == pytest.approx(d.sum() / a.size)
    # (the NaN position counts as a mismatch: its tolerance rtol * |NaN| is NaN, as before)
    assert got.mismatch_frac == pytest.approx(np.count_nonzero(~(full <= 1e-2 + 1e-3 * np.abs(a))) / a.size)
    assert got.rms_abs == pytest.approx(np.sqrt(np.sum(d**2) / a.size))
    assert math.isnan(got.cosine) and got.rel_l2 == math.inf  # the NaN enters the sums, as it did before
    ref[1][3] = cand[1][3] = 1.0
    got = validation.output_metrics(ref, cand)
    a, b = np.concatenate(ref).astype(np.float64), np.concatenate(cand).astype(np.float64)
    assert got.cosine == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b), rel=1e-12)
    assert got.rel_l2 == pytest.approx(np.linalg.norm(a - b) / np.linalg.norm(a), rel=1e-12)


def test_zero_outputs_and_nonfinite_values():
    zero = [np.zeros((2, 3), np.float32)]
    assert validation.output_metrics(zero, zero).cosine == 1.0
    bad = [np.array([[np.nan, 1.0, np.inf]], np.float32)]
    m = validation.output_metrics([np.ones((1, 3), np.float32)], bad)
    assert m.nonfinite == 2


def test_compare_models_and_thresholds(tmp_path):
    ref = tmp_path / "ref.onnx"
    onnx.save(conv_bn_model(0), ref)
    other = tmp_path / "other.onnx"
    onnx.save(conv_bn_model(1), other)  # different weights: a wrong model
    np.savez(tmp_path / "d.npz", **conv_bn_feeds())
    same = onnxopt.validate(ref, ref, tmp_path / "d.npz", latency_runs=3)
    assert same.worst("max_abs") == 0.0 and same.worst("cosine") == pytest.approx(1.0)
    assert same.latency["CPUExecutionProvider"]["ref_median_ms"] > 0
    assert same.sizes["reference_bytes"] == ref.stat().st_size
    same.assert_ok(min_cosine=0.9999, max_abs=0.0)
    wrong = onnxopt.validate(ref, other, tmp_path / "d.npz", latency_runs=0)
    assert wrong.worst("cosine") < 0.99
    with pytest.raises(ValidationFailed, match="cosine"):
        wrong.assert_ok(min_cosine=0.99)


def test_unavailable_provider_is_skipped_or_required(tmp_path):
    from onnxopt.errors import ProviderError

    ref = tmp_path / "ref.onnx"
    onnx.save(conv_bn_model(0), ref)
    rep = onnxopt.validate(ref, ref, providers=["cpu", "tensorrt"], latency_runs=0)
    assert "TensorrtExecutionProvider" in rep.skipped_providers or "TensorrtExecutionProvider" in rep.outputs
    if "TensorrtExecutionProvider" in rep.skipped_providers:
        with pytest.raises(ProviderError, match="not available"):
            onnxopt.validate(ref, ref, providers=["tensorrt"], require_providers=True)
