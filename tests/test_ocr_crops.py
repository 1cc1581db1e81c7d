"""Rendered training crops for the PP-OCR direction classifier (ocr_data.render_cls_crops)."""

from __future__ import annotations

import numpy as np

from onnxopt import io
from onnxopt.runtime import sessions as runtime
from onnxopt.testing import ocr_data


def test_crops_have_the_classifier_input_form_and_are_deterministic():
    x, rotated = ocr_data.render_cls_crops(6, seed=3)
    assert x.shape == (6, 3, 48, 192) and x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0  # rapidocr scales pixels to [-1, 1]
    again, rotated_again = ocr_data.render_cls_crops(6, seed=3)
    assert np.array_equal(x, again) and np.array_equal(rotated, rotated_again)
    other, _ = ocr_data.render_cls_crops(6, seed=4)
    assert not np.array_equal(x, other)
    _, all_turned = ocr_data.render_cls_crops(3, seed=3, rotate_share=1.0)
    assert all_turned.all()


def test_the_real_classifier_sees_the_rendered_orientation():
    # The crops are only useful as distillation data if they look like real text lines to the
    # model: PP-OCR cls must call the 180-degree ones "180". Measured 99.1 % on 6000 crops; with
    # 40 crops at that rate, 5 or more misses (below 0.9) has probability ~1e-5.
    x, rotated = ocr_data.render_cls_crops(40, seed=7)
    with runtime.session(io.load_model(ocr_data.model_paths()["cls"])) as handle:
        probs = next(iter(handle.run({"x": x}).values()))
    assert 0.25 < rotated.mean() < 0.75
    assert ((probs.argmax(1) == 1) == rotated).mean() >= 0.9


def test_the_real_recogniser_reads_the_rendered_lines():
    # Useful as distillation data only if PP-OCR rec reads them as text: measured on 200 crops
    # (seed 7), 0.83 % character errors once spaces and full-width forms are ignored (NFKC; the
    # recogniser drops or adds spaces). 40 crops hold ~400 characters: at that rate ~3 errors
    # are expected, and 5 % (~20) would take a recogniser that fails on whole lines.
    from rapidocr_onnxruntime.ch_ppocr_rec.utils import CTCLabelDecode

    x, texts = ocr_data.render_rec_crops(40, seed=7)
    assert x.shape == (40, 3, 48, 320) and x.dtype == np.float32 and len(texts) == 40
    again, _ = ocr_data.render_rec_crops(40, seed=7)
    assert np.array_equal(x, again)
    model = io.load_model(ocr_data.model_paths()["rec"])
    chars = model.metadata_props["character"].splitlines()
    with runtime.session(model) as handle:
        probs = next(iter(handle.run({"x": x}).values()))
    read = [text for text, _ in CTCLabelDecode(character=chars)(probs)]

    def plain(text: str) -> str:
        return "".join(ocr_data.normalize_text(text).split())

    errors = sum(ocr_data.edit_distance(plain(r), plain(t)) for r, t in zip(read, texts, strict=True))
    assert errors / sum(len(plain(t)) for t in texts) <= 0.05
