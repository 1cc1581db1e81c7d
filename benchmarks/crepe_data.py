"""Pitched audio frames with known f0 for CREPE, and CREPE's pitch decoding and scores.

CREPE was trained and evaluated on resynthesized audio whose f0 is known by construction
(RWC-synth, MDB-stem-synth). Nothing can be downloaded here, so the frames are synthesized the
same way: harmonic tones, f0 log-uniform over 60-1200 Hz (male speech to soprano), 1-40
harmonics below 7 kHz with a random spectral tilt, a random formant-like envelope and
sometimes odd harmonics only (clarinet-like), vibrato up to 40 cents, an amplitude ramp, and
white or pink noise at 5-40 dB SNR. The label is the f0 at the frame's centre.

Each frame is 1024 samples at 16 kHz, normalized to zero mean and unit variance as
``torchcrepe.preprocess`` does. Scores follow the CREPE paper:

- pitch: the weighted average of the cents of the 9 bins around the top bin
  (``to_local_average_cents``);
- RPA, raw pitch accuracy: share of frames whose pitch is within 50 cents of the true f0;
- agreement with FP32: share of frames whose pitch is within 50 cents of FP32's pitch
  (the same tolerance, with FP32's decision in place of the label), and the stricter share
  with the same top bin.

A second held-out set, closer to real audio but without labels: speech from espeak-ng (eight
voices, random base pitch and speed, eight sentences), for agreement with FP32 on the frames FP32
calls voiced.

Usage::

    python benchmarks/crepe_data.py /tmp/crepe --train 8192 --eval 2000 --speech 12

writes ``DIR/calib.npz`` (``frames``, for ``--calib``), ``DIR/eval.npz`` (``frames``, for
``--eval``), ``DIR/eval_f0.npy`` (the labels, Hz) and with ``--speech N`` ``DIR/speech.npz``
(frames every 20 ms of N utterances; needs Debian's ``espeak-ng``).
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np

SAMPLE_RATE = 16000
WINDOW = 1024
BINS = 360
CENTS_PER_BIN = 20.0
CENTS_OFFSET = 1997.3794084376191  # cents of bin 0 (torchcrepe.convert), 10 Hz reference
BIN_CENTS = CENTS_OFFSET + CENTS_PER_BIN * np.arange(BINS)


def hz_to_cents(f: np.ndarray) -> np.ndarray:
    return 1200.0 * np.log2(np.asarray(f, dtype=np.float64) / 10.0)


def synthesize(n: int, seed: int, fmin: float = 60.0, fmax: float = 1200.0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` normalized frames [n, 1024] float32 and their centre f0 in Hz [n]."""
    rng = np.random.default_rng(seed)
    t = (np.arange(WINDOW) - WINDOW / 2) / SAMPLE_RATE  # time from the frame centre
    f0 = np.exp(rng.uniform(np.log(fmin), np.log(fmax), n))
    depth = rng.uniform(0.0, 40.0, n) * rng.integers(0, 2, n)  # cents; half the frames steady
    rate = rng.uniform(4.0, 7.0, n)
    vphase = rng.uniform(0, 2 * np.pi, n)
    # Vibrato: instantaneous frequency f(t) = b * (1 + v * sin(2 pi rate t + vphase)) with v the
    # depth as a log ratio; the phase is its integral. The base b puts f(0) at the drawn f0, the
    # label, to within v^2 / 2 (0.7 cents at 40 cents of depth).
    vib = depth / 1200.0 * np.log(2.0)
    label = f0
    base = f0 / np.exp(vib * np.sin(vphase))
    phase0 = 2 * np.pi * base[:, None] * (
        t[None, :] - (vib / (2 * np.pi * rate))[:, None]
        * (np.cos(2 * np.pi * rate[:, None] * t[None, :] + vphase[:, None]) - np.cos(vphase)[:, None])
    )
    f0 = base
    tilt = rng.uniform(0.3, 2.0, n)
    odd_only = rng.random(n) < 0.2
    formants = rng.uniform(300, 3500, (n, 2))
    widths = rng.uniform(150, 800, (n, 2))
    x = np.zeros((n, WINDOW))
    nyq_harm = np.minimum(40, np.floor(7000.0 / f0)).astype(int)
    for k in range(1, 41):
        on = (k <= np.maximum(nyq_harm, 1)) & ~(odd_only & (k % 2 == 0))
        if not on.any():
            break
        fk = k * f0
        env = 1.0 + 4.0 * np.exp(-0.5 * ((fk[:, None] - formants) / widths) ** 2).sum(axis=1)
        amp = on * k ** (-tilt) * env * np.exp(rng.normal(0.0, 0.3, n))
        x += amp[:, None] * np.sin(k * phase0 + rng.uniform(0, 2 * np.pi, n)[:, None])
    x *= 1.0 + rng.uniform(-0.5, 0.5, n)[:, None] * t[None, :] / t[-1]  # amplitude ramp, +-50 % at the ends
    noise = rng.normal(size=(n, WINDOW))
    pink = rng.random(n) < 0.5
    if pink.any():
        spec = np.fft.rfft(noise[pink], axis=1)
        spec /= np.sqrt(np.maximum(np.arange(spec.shape[1]), 1))[None, :]
        noise[pink] = np.fft.irfft(spec, n=WINDOW, axis=1)
    snr_db = rng.uniform(5.0, 40.0, n)
    scale = x.std(axis=1) / (noise.std(axis=1) * 10 ** (snr_db / 20))
    x += scale[:, None] * noise
    x -= x.mean(axis=1, keepdims=True)
    x /= np.maximum(x.std(axis=1, keepdims=True), 1e-10)
    return x.astype(np.float32), label


SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "How much wood would a woodchuck chuck if a woodchuck could chuck wood?",
    "We were away a year ago, and the rain in Spain stays mainly in the plain.",
    "Is this the right way to the station, or should we turn left at the bridge?",
    "Seven silver swans swam silently seaward on a grey November morning.",
    "I never said she stole my money; perhaps someone else did.",
    "Open the window, let the music play, and sing along with me!",
)
VOICES = ("en-us", "en", "en-gb-x-rp", "de", "fr", "es", "it", "nl")


def speech_frames(utterances: int, seed: int, hop: int = 320) -> np.ndarray:
    """Frames of speech from espeak-ng (Debian's ``espeak-ng``), 16 kHz, every ``hop`` samples.

    Voices, base pitch (``-p`` 5-95) and speed vary per utterance; there is no f0 label, so these
    frames measure agreement with FP32 only. Resampled from espeak's 22,050 Hz by FFT (band-limited).
    """
    import shutil
    import subprocess
    import tempfile
    import wave

    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng not found: apt-get install espeak-ng")
    rng = np.random.default_rng(seed)
    frames = []
    with tempfile.TemporaryDirectory() as tmp:
        wav = pathlib.Path(tmp) / "u.wav"
        for i in range(utterances):
            voice, text = VOICES[i % len(VOICES)], SENTENCES[rng.integers(len(SENTENCES))]
            cmd = ["espeak-ng", "-v", voice, "-p", str(rng.integers(5, 96)), "-s", str(rng.integers(120, 181)),
                   "-w", str(wav), text]
            subprocess.run(cmd, check=True, capture_output=True)
            with wave.open(str(wav)) as w:
                rate = w.getframerate()
                x = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float64)
            n = int(round(x.size * SAMPLE_RATE / rate))
            spec = np.fft.rfft(x)
            y = np.fft.irfft(spec[: n // 2 + 1], n=n) * n / x.size
            starts = range(0, y.size - WINDOW, hop)
            frames.append(np.stack([y[s : s + WINDOW] for s in starts]))
    x = np.concatenate(frames)
    x -= x.mean(axis=1, keepdims=True)
    x /= np.maximum(x.std(axis=1, keepdims=True), 1e-10)
    return x.astype(np.float32)


def pitch_cents(probs: np.ndarray) -> np.ndarray:
    """CREPE's local weighted average: cents of the 9 bins around the top bin, weighted by score."""
    probs = np.asarray(probs, dtype=np.float64)
    top = probs.argmax(axis=1)
    idx = np.clip(top[:, None] + np.arange(-4, 5)[None, :], 0, BINS - 1)
    w = np.take_along_axis(probs, idx, axis=1)
    return (w * BIN_CENTS[idx]).sum(axis=1) / np.maximum(w.sum(axis=1), 1e-12)


def rpa(probs: np.ndarray, f0_hz: np.ndarray) -> float:
    """Raw pitch accuracy: share of frames within 50 cents of the true f0."""
    return float(np.mean(np.abs(pitch_cents(probs) - hz_to_cents(f0_hz)) <= 50.0))


def agreement(probs: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Share of frames within 50 cents of FP32's pitch, and share with FP32's top bin."""
    return {
        "agree": float(np.mean(np.abs(pitch_cents(probs) - pitch_cents(ref)) <= 50.0)),
        "same_bin": float(np.mean(np.argmax(probs, axis=1) == np.argmax(ref, axis=1))),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("--train", type=int, default=8192)
    parser.add_argument("--eval", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speech", type=int, default=0,
                        help="also write DIR/speech.npz: frames of this many espeak-ng utterances (needs espeak-ng)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    frames, _ = synthesize(args.train, seed=1000 + args.seed)
    np.savez(args.out / "calib.npz", frames=frames)
    frames, f0 = synthesize(args.eval, seed=2000 + args.seed)
    np.savez(args.out / "eval.npz", frames=frames)
    np.save(args.out / "eval_f0.npy", f0)
    print(f"{args.out}: calib {args.train} frames, eval {args.eval} frames with f0")
    if args.speech:
        frames = speech_frames(args.speech, seed=3000 + args.seed)
        np.savez(args.out / "speech.npz", frames=frames)
        print(f"{args.out}: speech {len(frames)} frames from {args.speech} utterances")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
