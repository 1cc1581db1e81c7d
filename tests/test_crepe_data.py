"""benchmarks/crepe_data.py: the synthesized frames carry the pitch their labels say, and the scores
follow CREPE's decoding (the benchmark's #18 numbers on CREPE rest on both)."""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import crepe_data as cd  # noqa: E402 - a benchmark script, imported from its folder


def _autocorrelation(x: np.ndarray, lags: np.ndarray) -> np.ndarray:
    lags = np.round(lags).astype(int)
    return np.array([np.dot(row[:-lag], row[lag:]) / (row.size - lag) for row, lag in zip(x, lags, strict=True)])


def test_frames_are_normalized_and_periodic_at_their_label():
    x, f0 = cd.synthesize(200, seed=5)
    assert x.shape == (200, cd.WINDOW) and x.dtype == np.float32
    # zero mean, unit variance per frame, as torchcrepe.preprocess gives; float32 rounding only
    np.testing.assert_allclose(x.mean(axis=1), 0.0, atol=1e-6)
    np.testing.assert_allclose(x.std(axis=1), 1.0, atol=1e-5)
    assert f0.min() >= 60.0 * 0.999 and f0.max() <= 1200.0 * 1.001
    period = cd.SAMPLE_RATE / f0
    at_label = _autocorrelation(x, period)
    # A harmonic tone repeats after one period; three quarters of a period falls between its
    # harmonics' peaks, so a frame whose label is its f0 correlates better at the label. Noise
    # (SNR down to 5 dB) and vibrato lower both; 5 % of the frames may lose. (All 200 win with
    # this seed; labels 386 cents sharp, period x 0.8, would win in 77 %, so a wrong label fails.)
    assert np.mean(at_label > _autocorrelation(x, 0.75 * period)) >= 0.95


def test_pitch_is_the_weighted_average_around_the_top_bin():
    probs = np.zeros((3, cd.BINS), np.float32)
    probs[0, 100] = 0.9  # one bin
    probs[1, 200:202] = 0.5  # halfway between two bins
    probs[2, [50, 300]] = [0.2, 0.8]  # a far second peak is outside the 9-bin window
    got = cd.pitch_cents(probs)
    np.testing.assert_allclose(got, [cd.BIN_CENTS[100], cd.BIN_CENTS[200] + 10.0, cd.BIN_CENTS[300]], atol=1e-9)


def test_rpa_and_agreement_use_50_cents():
    probs = np.zeros((4, cd.BINS), np.float32)
    probs[np.arange(4), [100, 102, 103, 150]] = 1.0  # 0, 40, 60 and 1,000 cents above bin 100
    f0 = np.full(4, 10.0 * 2 ** (cd.BIN_CENTS[100] / 1200))
    assert cd.rpa(probs, f0) == pytest.approx(0.5)
    ref = np.zeros_like(probs)
    ref[:, 100] = 1.0
    assert cd.agreement(probs, ref) == {"agree": 0.5, "same_bin": 0.25}
