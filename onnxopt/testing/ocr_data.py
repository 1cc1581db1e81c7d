"""Real PP-OCR models and real feeds for benchmarking onnxopt's quantization / fp16 passes.

The ``rapidocr-onnxruntime`` package ships three PP-OCR models (text detection, text-direction
classification, recognition) together with the Python pipeline that drives them. This module

* locates those models (:func:`model_paths`),
* runs the package's own pipeline over images with its onnxruntime sessions wrapped, so that
  every tensor fed to the detector and the classifier is recorded and written as one ``.npz``
  per feed -- the folder-of-npz DATA format onnxopt reads (:func:`capture_feeds`),
* renders a held-out evaluation set of text images with known ground truth
  (:func:`make_eval_images`; the shared images are for calibration only), and
* judges a (quantized, fp16, ...) detector / classifier end to end by the character error rate
  of the whole pipeline with those models swapped in (:func:`ocr_quality`).

CLI (run as a plain file)::

    python -m onnxopt.testing.ocr_data models
    python -m onnxopt.testing.ocr_data capture --out DIR
    python -m onnxopt.testing.ocr_data cer --det X.onnx --cls Y.onnx

The calibration images live in ``<repo>/../shared/data/ocr`` unless the environment variable
``ONNXOPT_OCR_DATA`` names another folder (holding ``gt.json`` and ``images/``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
import time
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

DATA_ENV = "ONNXOPT_OCR_DATA"
"""Environment variable overriding the folder of the shared calibration images."""

CACHE_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "ocr" / ".cache"
"""Default home of everything generated here (ignored by git)."""

STAGES = ("det", "cls", "rec")
_PACKAGE = "rapidocr_onnxruntime"


# --------------------------------------------------------------------------------------------
# models


def _package_dir() -> Path:
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"{_PACKAGE} is not installed (pip install rapidocr-onnxruntime)")
    return Path(spec.origin).resolve().parent


def model_paths() -> dict[str, Path]:
    """The ONNX models shipped inside the installed ``rapidocr_onnxruntime`` package.

    Returns ``{"det": ..., "cls": ..., "rec": ...}`` as the package's own ``config.yaml``
    names them (``rec`` only if present). Raises ``FileNotFoundError`` if the detector or the
    direction classifier is missing.
    """
    import yaml  # a dependency of rapidocr_onnxruntime

    pkg = _package_dir()
    config = yaml.safe_load((pkg / "config.yaml").read_text(encoding="utf-8"))
    found: dict[str, Path] = {}
    for stage, section in (("det", "Det"), ("cls", "Cls"), ("rec", "Rec")):
        path = pkg / config[section]["model_path"]
        if path.is_file():
            found[stage] = path
        elif stage != "rec":
            raise FileNotFoundError(f"{_PACKAGE} has no {stage} model at {path}")
    return found


def model_facts(path: Path) -> dict[str, Any]:
    """Opsets, graph inputs/outputs and op-type counts of one ONNX model."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    initializers = {t.name for t in graph.initializer}

    def dims(value: Any) -> list[int | str]:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    ops: dict[str, int] = {}
    for node in graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {
        "path": str(path),
        "bytes": path.stat().st_size,
        "ir_version": model.ir_version,
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "inputs": {i.name: dims(i) for i in graph.input if i.name not in initializers},
        "outputs": {o.name: dims(o) for o in graph.output},
        "nodes": len(graph.node),
        "initializers": len(graph.initializer),
        "op_types": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
    }


# --------------------------------------------------------------------------------------------
# data locations


def default_data_dir() -> Path:
    """Folder of the shared calibration images: ``$ONNXOPT_OCR_DATA`` or ``../shared/data/ocr``."""
    override = os.environ.get(DATA_ENV)
    if override:
        return Path(override).expanduser().resolve()
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "ocr"  # <repo>/../shared


def load_image_set(data_dir: Path) -> tuple[list[Path], dict[str, Any]]:
    """The images of a folder with a ``gt.json`` (keyed by image stem, each with a ``path``)."""
    gt_file = data_dir / "gt.json"
    if not gt_file.is_file():
        raise FileNotFoundError(f"no gt.json in {data_dir} (set {DATA_ENV} to override)")
    gt: dict[str, Any] = json.loads(gt_file.read_text(encoding="utf-8"))
    images = [data_dir / gt[key]["path"] for key in sorted(gt)]
    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"images listed in {gt_file} are missing: {missing[:3]}")
    return images, gt


# --------------------------------------------------------------------------------------------
# the rapidocr pipeline and its sessions


def _make_engine(det: Path | None = None, cls: Path | None = None, rec: Path | None = None) -> Any:
    """A ``RapidOCR`` engine with its default config, optionally with other model files."""
    from rapidocr_onnxruntime import RapidOCR

    overrides: dict[str, str] = {}
    for stage, path in (("det", det), ("cls", cls), ("rec", rec)):
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"{stage} model not found: {path}")
            overrides[f"{stage}_model_path"] = str(path.resolve())
    return RapidOCR(**overrides)


def _ort_wrapper(engine: Any, stage: str) -> Any:
    """rapidocr's ``OrtInferSession`` of one stage (``infer`` of det/cls, ``session`` of rec)."""
    if stage == "det":
        return engine.text_det.infer
    if stage == "cls":
        return engine.text_cls.infer
    return engine.text_rec.session


class _RecordingSession:
    """Stands in for an ``onnxruntime.InferenceSession``: copies every feed, then runs it.

    rapidocr's ``OrtInferSession.__call__`` builds ``{input_name: array}`` and hands it to
    ``self.session.run``; replacing ``session`` on one engine's instance records exactly what
    onnxruntime receives, without patching any class globally.
    """

    def __init__(self, inner: Any, sink: list[dict[str, np.ndarray]]) -> None:
        self._inner = inner
        self._sink = sink

    def run(self, output_names: Any, input_feed: Mapping[str, Any], *args: Any, **kw: Any) -> Any:
        self._sink.append({name: np.array(value, copy=True) for name, value in input_feed.items()})
        return self._inner.run(output_names, input_feed, *args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _feed_name(index: int, width: int) -> str:
    return f"{index:0{width}d}.npz"


def capture_feeds(
    images: Sequence[Path],
    out_dir: Path,
    *,
    prefix: str = "",
    stages: Sequence[str] = ("det", "cls"),
    compress: bool = False,
) -> dict[str, Path]:
    """Run rapidocr's pipeline over ``images`` and save every det / cls feed as one ``.npz``.

    Feeds go to ``out_dir/<prefix><stage>/000.npz, 001.npz, ...`` in the order the pipeline
    made them (image by image); each file is ``{input_name: array}`` exactly as passed to
    onnxruntime, so shapes differ from file to file. Stale ``.npz`` files in those folders are
    removed first. ``out_dir/<prefix>manifest.json`` says which image each feed came from.
    ``stages`` may also include ``"rec"``. Returns ``{stage: folder}``.
    """
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; choose from {STAGES}")
    out_dir = Path(out_dir)
    engine = _make_engine()
    sinks: dict[str, list[dict[str, np.ndarray]]] = {}
    folders: dict[str, Path] = {}
    for stage in stages:
        folder = out_dir / f"{prefix}{stage}"
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.npz"):
            stale.unlink()
        folders[stage] = folder
        sinks[stage] = []
        wrapper = _ort_wrapper(engine, stage)
        wrapper.session = _RecordingSession(wrapper.session, sinks[stage])

    save = np.savez_compressed if compress else np.savez
    manifest: dict[str, list[dict[str, Any]]] = {stage: [] for stage in stages}
    for image in images:
        engine(str(image))
        for stage in stages:
            for feed in sinks[stage]:
                index = len(manifest[stage])
                save(folders[stage] / _feed_name(index, 3), **feed)
                manifest[stage].append(
                    {
                        "image": Path(image).name,
                        "shapes": {k: list(v.shape) for k, v in feed.items()},
                    }
                )
            sinks[stage].clear()

    for stage in stages:  # keep names sortable past 1000 feeds
        count = len(manifest[stage])
        width = max(3, len(str(count - 1)))
        for index, entry in enumerate(manifest[stage]):
            name = _feed_name(index, width)
            if width != 3:
                (folders[stage] / _feed_name(index, 3)).rename(folders[stage] / name)
            entry["file"] = name
    (out_dir / f"{prefix}manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return folders


# --------------------------------------------------------------------------------------------
# held-out evaluation images

_WORD_TEXT = (
    "account adapter amber anchor apple archive arrow autumn balance basket battery beacon "
    "bicycle blanket border bottle bridge bucket cabinet camera candle canvas carbon cargo "
    "cedar ceramic channel charter circuit client cobalt column copper cotton crystal delta "
    "desk dispatch district drawer engine estate fabric falcon feather filter folder forest "
    "fountain freight garage garden glass granite harbor helmet hollow island jacket journal "
    "kettle ladder lantern leather lemon library linen margin marble meadow mirror module "
    "monitor needle network notice ocean office orchard outlet packet paddle panel parcel "
    "pencil pepper permit pillow planet pocket portal powder quarter radio receipt region "
    "ribbon river rocket saddle salmon schedule sensor shelter signal silver socket spindle "
    "spring station stone studio summit supply switch tablet ticket timber tower tractor "
    "transit tunnel valley velvet vessel voltage wagon walnut window winter yellow zinc"
)
_WORDS = _WORD_TEXT.split()
_NAME_TEXT = "Anna Boris Clara Diego Elena Felix Greta Hugo Irene Jonas Karla Lukas Mona Nils"
_NAMES = _NAME_TEXT.split()
_SURNAME_TEXT = "Berg Costa Dvorak Eriksen Fischer Garcia Horvat Ivanova Jensen Kowalski Moreau"
_SURNAMES = _SURNAME_TEXT.split()
_TITLES = (
    "Shipping Manifest",
    "Service Ticket",
    "Purchase Order",
    "Stock Report",
    "Site Visit",
    "Repair Log",
    "Quote",
    "Packing Slip",
    "Expense Claim",
    "Room Booking",
)
_LABELS = ("Ref:", "Due:", "Qty:", "Site:", "Carrier:", "Phone:", "Batch:", "Status:", "Room:")
_STATUS = ("open", "closed", "pending", "shipped", "on hold", "approved")


def _random_value(rng: random.Random, label: str) -> str:
    if label == "Ref:":
        letters = "ABCDEFGHKMNPRSTUVWXZ"
        return f"{rng.choice(letters)}{rng.choice(letters)}/{rng.randint(10000, 99999)}"
    if label == "Due:":
        return f"{rng.randint(1, 28):02d}.{rng.randint(1, 12):02d}.{rng.randint(2023, 2027)}"
    if label == "Qty:":
        return f"{rng.randint(2, 480)} pcs"
    if label == "Phone:":
        return f"+{rng.randint(30, 49)} {rng.randint(100, 999)} {rng.randint(1000, 9999)}"
    if label == "Batch:":
        return f"B{rng.randint(100, 999)}-{rng.randint(10, 99)}"
    if label == "Status:":
        return rng.choice(_STATUS)
    if label == "Room:":
        return f"{rng.randint(1, 9)}.{rng.randint(10, 60)}"
    return f"{rng.choice(_WORDS).capitalize()} {rng.randint(1, 99)}"


def _random_line(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        words = rng.sample(_WORDS, rng.randint(3, 7))
        return " ".join(words).capitalize() + rng.choice((".", "", ";"))
    if kind == 1:
        count, item = rng.randint(1, 60), f"{rng.choice(_WORDS)} {rng.choice(_WORDS)}"
        return f"{count} x {item} = {rng.randint(1, 9999)}.{rng.randint(0, 99):02d} CHF"
    if kind == 2:
        first, last = rng.choice(_NAMES), rng.choice(_SURNAMES)
        return f"{first} {last}, {first.lower()}.{last.lower()}@mail.test"
    if kind == 3:
        street = f"{rng.randint(1, 250)} {rng.choice(_WORDS).capitalize()} Road"
        return f"{street}, {rng.randint(1000, 99999)} {rng.choice(_WORDS).capitalize()}"
    return f"Total {rng.randint(100, 99999):,}.{rng.randint(0, 99):02d} ({rng.randint(1, 30)}% off)"


def _font_files() -> list[Path]:
    """DejaVu TrueType fonts found on this system, sorted (empty if none)."""
    roots = [Path("/usr/share/fonts"), Path("/usr/local/share/fonts"), Path.home() / ".fonts"]
    found: set[Path] = set()
    for root in roots:
        if root.is_dir():
            found.update(p for p in root.rglob("DejaVu*.ttf") if "ExtraLight" not in p.name)
    return sorted(found)


def _load_font(fonts: Sequence[Path], rng: random.Random, size: int) -> Any:
    from PIL import ImageFont

    if fonts:
        return ImageFont.truetype(str(rng.choice(fonts)), size)
    try:  # Pillow >= 10.1 scales its bundled default font
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - old Pillow: small bitmap font only
        return ImageFont.load_default()


def make_eval_images(out_dir: Path, n: int = 12, seed: int = 0) -> Path:
    """Render ``n`` new text images with known text into ``out_dir``; return its ``gt.json``.

    Each image is a single line or a small document (a title, label/value rows, free lines) in
    a DejaVu font (PIL's default font scaled if DejaVu is absent), on a tinted background with
    light noise and blur; every sixth image is rotated 180 degrees. ``gt.json`` uses the shared
    set's format: ``{stem: {"path", "kind", "rotated180", "size", "items": [{"text", "bbox"}]}}``
    with boxes ``[x0, y0, x1, y1]`` in the saved (possibly rotated) image. Deterministic for a
    given seed and font set.
    """
    from PIL import Image, ImageDraw, ImageFilter

    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    for stale in (out_dir / "images").glob("*.png"):
        stale.unlink()
    fonts = _font_files()
    rng = random.Random(seed)
    noise_rng = np.random.default_rng(seed)
    gt: dict[str, Any] = {}
    for index in range(n):
        kind = "line" if index % 3 == 0 else "doc"
        rotated = index % 6 == 5
        size = rng.randint(18, 30)
        font = _load_font(fonts, rng, size)
        bold_font = _load_font(fonts, rng, size + 6)
        rows: list[list[tuple[str, Any]]] = []  # each row: one or two (text, font) cells
        if kind == "line":
            rows.append([(_random_line(rng), font)])
        else:
            rows.append([(rng.choice(_TITLES), bold_font)])
            for _ in range(rng.randint(3, 6)):
                if rng.random() < 0.4:
                    label = rng.choice(_LABELS)
                    rows.append([(label, font), (_random_value(rng, label), font)])
                else:
                    rows.append([(_random_line(rng), font)])

        margin = rng.randint(12, 36)
        column = margin + int(size * rng.uniform(6.5, 8.0))
        gap = int(size * rng.uniform(0.6, 1.0))
        scratch = ImageDraw.Draw(Image.new("RGB", (8, 8)))
        placed: list[tuple[str, Any, int, int]] = []
        y, width = margin, 0
        for row in rows:
            height = 0
            for cell, (text, cell_font) in enumerate(row):
                x = margin if cell == 0 else column
                x0, y0, x1, y1 = scratch.textbbox((x, y), text, font=cell_font)
                placed.append((text, cell_font, x, y))
                width, height = max(width, x1), max(height, y1 - y)
            y += height + gap
        canvas_w, canvas_h = width + margin, y - gap + margin

        background = tuple(rng.randint(225, 250) for _ in range(3))
        ink = tuple(rng.randint(0, 70) for _ in range(3))
        image = Image.new("RGB", (canvas_w, canvas_h), background)
        draw = ImageDraw.Draw(image)
        items = []
        for text, cell_font, x, y0 in placed:
            draw.text((x, y0), text, font=cell_font, fill=ink)
            items.append({"text": text, "bbox": list(draw.textbbox((x, y0), text, font=cell_font))})

        pixels = np.asarray(image, dtype=np.float32)
        pixels += noise_rng.normal(0.0, rng.uniform(2.0, 7.0), pixels.shape)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 0.7)))
        if rotated:
            image = image.transpose(Image.Transpose.ROTATE_180)
            for item in items:
                x0, y0, x1, y1 = item["bbox"]
                item["bbox"] = [canvas_w - x1, canvas_h - y1, canvas_w - x0, canvas_h - y0]

        stem = f"{index:03d}"
        image.save(out_dir / "images" / f"{stem}.png", optimize=False)
        gt[stem] = {
            "path": f"images/{stem}.png",
            "kind": kind,
            "rotated180": rotated,
            "size": [canvas_w, canvas_h],
            "items": items,
        }
    gt_file = out_dir / "gt.json"
    gt_file.write_text(json.dumps(gt, indent=1) + "\n", encoding="utf-8")
    return gt_file


def _render_line(rng: random.Random, noise_rng: np.random.Generator, fonts: Sequence[Path], scratch: Any,
                 max_words: int) -> tuple[Any, str]:
    """One rendered text-line crop (PIL RGB image) and its text, as det's boxes cut lines.

    A random line (``_random_line``), half of the time cut to 1..``max_words`` words (det often
    cuts a line into words), in a random DejaVu font and size, ink and tinted background, cut to
    the text box plus a random margin, with Gaussian noise and blur.
    """
    from PIL import Image, ImageDraw, ImageFilter

    text = _random_line(rng)
    if rng.random() < 0.5:
        words = text.split()
        start = rng.randrange(len(words))
        text = " ".join(words[start : start + rng.randint(1, max_words)])
    font = _load_font(fonts, rng, rng.randint(14, 40))
    x0, y0, x1, y1 = scratch.textbbox((0, 0), text, font=font)
    mx, my = rng.randint(0, 12), rng.randint(0, 8)
    background = tuple(rng.randint(170, 255) for _ in range(3))
    ink = tuple(rng.randint(0, 90) for _ in range(3))
    image = Image.new("RGB", (x1 - x0 + 2 * mx, y1 - y0 + 2 * my), background)
    ImageDraw.Draw(image).text((mx - x0, my - y0), text, font=font, fill=ink)
    pixels = np.asarray(image, dtype=np.float32)
    pixels += noise_rng.normal(0.0, rng.uniform(0.0, 10.0), pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 1.0))), text


def render_cls_crops(n: int, seed: int = 0, rotate_share: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unlabeled training inputs for the PP-OCR direction classifier: rendered text lines.

    Each crop is one random line (:func:`_render_line`; the held-out renderer's vocabulary but
    its own random stream: pass a ``seed`` other than the held-out set's); a share
    ``rotate_share`` is turned 180 degrees (the classifier decides 0 vs 180). Each crop goes
    through rapidocr's own cls pre-processing (``TextClassifier.resize_norm_img``: BGR, height
    48, width <= 192, scaled to [-1, 1], zero padded on the right). Returns ``(inputs [n, 3, 48,
    192] float32, rotated [n] bool)``; ``rotated`` is how the crop was rendered, not a label the
    model must give (distillation uses the teacher's outputs). Deterministic for a seed and font
    set.
    """
    import types

    from PIL import Image, ImageDraw
    from rapidocr_onnxruntime.ch_ppocr_cls.text_cls import TextClassifier

    prep = types.SimpleNamespace(cls_image_shape=[3, 48, 192])
    fonts = _font_files()
    rng = random.Random(seed)
    noise_rng = np.random.default_rng(seed)
    out = np.zeros((n, 3, 48, 192), dtype=np.float32)
    rotated = np.zeros(n, dtype=bool)
    scratch = ImageDraw.Draw(Image.new("RGB", (8, 8)))
    for i in range(n):
        image, _ = _render_line(rng, noise_rng, fonts, scratch, max_words=3)
        if rng.random() < rotate_share:
            image = image.transpose(Image.Transpose.ROTATE_180)
            rotated[i] = True
        bgr = np.ascontiguousarray(np.asarray(image)[:, :, ::-1])  # rapidocr reads images with cv2
        out[i] = TextClassifier.resize_norm_img(prep, bgr)
    return out, rotated


def render_rec_crops(n: int, seed: int = 0, width: int = 320) -> tuple[np.ndarray, list[str]]:
    """``n`` training inputs for the PP-OCR recogniser: rendered text lines and their texts.

    The lines of :func:`render_cls_crops` (up to 4 words when cut), upright, through rapidocr's
    own rec pre-processing (``TextRecognizer.resize_norm_img``: BGR, height 48, width <= ``width``
    keeping the aspect ratio, scaled to [-1, 1], zero padded on the right; rapidocr's batches
    are at least 320 wide). A line wider than ``width`` at height 48 is replaced by another
    (rapidocr would widen the batch instead; a fixed width keeps one array). Returns ``(inputs [n, 3, 48, width] float32, texts)``.
    Deterministic for a seed and font set.
    """
    import types

    from PIL import Image, ImageDraw
    from rapidocr_onnxruntime.ch_ppocr_rec.text_recognize import TextRecognizer

    prep = types.SimpleNamespace(rec_image_shape=[3, 48, width])
    fonts = _font_files()
    rng = random.Random(seed)
    noise_rng = np.random.default_rng(seed)
    out = np.zeros((n, 3, 48, width), dtype=np.float32)
    texts: list[str] = []
    scratch = ImageDraw.Draw(Image.new("RGB", (8, 8)))
    for i in range(n):
        for _ in range(50):  # a line too long for ``width`` at height 48 is drawn again (another line)
            image, text = _render_line(rng, noise_rng, fonts, scratch, max_words=4)
            if image.width * 48 <= width * image.height:
                break
        bgr = np.ascontiguousarray(np.asarray(image)[:, :, ::-1])
        out[i] = TextRecognizer.resize_norm_img(prep, bgr, width / 48)
        texts.append(text)
    return out, texts


# --------------------------------------------------------------------------------------------
# end-to-end quality


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(
                min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b))
            )
        previous = current
    return previous[-1]


def normalize_text(text: str) -> str:
    """NFKC (the recogniser may emit full-width punctuation) and single spaces."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def _reading_order(boxes: Sequence[Sequence[float]], upside_down: bool = False) -> list[int]:
    """Indices of ``[x0, y0, x1, y1]`` boxes in reading order: rows top-down, then left-right.

    Boxes whose vertical centres lie within half a box height form one row. With
    ``upside_down`` the page is read as if turned back by 180 degrees, so that the pieces of a
    line split by the detector are joined in the order a reader sees them.
    """
    if upside_down:
        boxes = [[-b[2], -b[3], -b[0], -b[1]] for b in boxes]
    order = sorted(range(len(boxes)), key=lambda i: (boxes[i][1] + boxes[i][3]) / 2)
    rows: list[list[int]] = []
    for i in order:
        center = (boxes[i][1] + boxes[i][3]) / 2
        height = boxes[i][3] - boxes[i][1]
        if rows:
            last = boxes[rows[-1][0]]
            tolerance = 0.5 * min(height, last[3] - last[1])
            if abs(center - (last[1] + last[3]) / 2) <= tolerance:
                rows[-1].append(i)
                continue
        rows.append([i])
    return [i for row in rows for i in sorted(row, key=lambda k: boxes[k][0])]


def _joined(texts: Sequence[str], boxes: Sequence[Sequence[float]], upside_down: bool) -> str:
    return normalize_text(" ".join(texts[i] for i in _reading_order(boxes, upside_down)))


def ocr_quality(
    det_path: Path | None,
    cls_path: Path | None,
    images: Sequence[Path],
    gt: Mapping[str, Any],
) -> dict[str, Any]:
    """Character error rate of rapidocr's full pipeline with the given det / cls models.

    ``det_path`` / ``cls_path`` replace the packaged models (``None`` keeps one); the
    recogniser is always the packaged one. ``gt`` maps image stem to an entry with ``items``
    (``text`` and ``bbox``), as in ``gt.json``. Per image, recognised items and ground-truth
    items are each put in reading order (of the upright page when the entry says
    ``rotated180``) and joined with spaces (NFKC, whitespace collapsed).

    Returns ``cer`` (sum of edit distances / sum of ground-truth characters), ``cer_nospace``
    (the same with all whitespace removed: the recogniser often drops or adds spaces),
    ``det_boxes`` (boxes the detector returned), ``kept_boxes`` (after rapidocr drops
    low-confidence recognitions), ``gt_items``, ``seconds`` and a ``per_image`` list.
    """
    engine = _make_engine(det=det_path, cls=cls_path)
    detector = engine.text_det
    det_counts: list[int] = []

    class _CountingDetector:
        def __call__(self, img: np.ndarray) -> Any:
            boxes, elapse = detector(img)
            det_counts.append(0 if boxes is None else len(boxes))
            return boxes, elapse

        def __getattr__(self, name: str) -> Any:
            return getattr(detector, name)

    engine.text_det = _CountingDetector()

    per_image: list[dict[str, Any]] = []
    total = {"dist": 0, "chars": 0, "dist_ns": 0, "chars_ns": 0, "det": 0, "kept": 0, "gt": 0}
    start = time.perf_counter()
    for image in images:
        stem = Path(image).stem
        items = gt[stem]["items"]
        det_counts.clear()
        result, _ = engine(str(image))
        result = result or []
        pred_boxes = [
            [
                min(p[0] for p in r[0]),
                min(p[1] for p in r[0]),
                max(p[0] for p in r[0]),
                max(p[1] for p in r[0]),
            ]
            for r in result
        ]
        upside_down = bool(gt[stem].get("rotated180", False))
        predicted = _joined([r[1] for r in result], pred_boxes, upside_down)
        truth = _joined([it["text"] for it in items], [it["bbox"] for it in items], upside_down)
        dist = edit_distance(predicted, truth)
        dist_ns = edit_distance(predicted.replace(" ", ""), truth.replace(" ", ""))
        n_det = sum(det_counts)
        total["dist"] += dist
        total["chars"] += len(truth)
        total["dist_ns"] += dist_ns
        total["chars_ns"] += len(truth.replace(" ", ""))
        total["det"] += n_det
        total["kept"] += len(result)
        total["gt"] += len(items)
        per_image.append(
            {
                "image": stem,
                "cer": dist / max(1, len(truth)),
                "det_boxes": n_det,
                "kept_boxes": len(result),
                "gt_items": len(items),
                "text": predicted,
                "truth": truth,
            }
        )
    return {
        "cer": total["dist"] / max(1, total["chars"]),
        "cer_nospace": total["dist_ns"] / max(1, total["chars_ns"]),
        "det_boxes": total["det"],
        "kept_boxes": total["kept"],
        "gt_items": total["gt"],
        "images": len(per_image),
        "seconds": time.perf_counter() - start,
        "per_image": per_image,
    }


# --------------------------------------------------------------------------------------------
# CLI


def _folder_summary(folder: Path) -> str:
    files = sorted(folder.glob("*.npz"))
    shapes: dict[tuple[int, ...], int] = {}
    for file in files:
        with np.load(file) as npz:
            for array in npz.values():
                shapes[array.shape] = shapes.get(array.shape, 0) + 1
    total = sum(f.stat().st_size for f in files)
    listed = ", ".join(
        f"{'x'.join(map(str, s))}" + (f" (x{c})" if c > 1 else "")
        for s, c in sorted(shapes.items())
    )
    return f"{len(files)} feeds, {total / 2**20:.1f} MiB, {len(shapes)} shapes: {listed}"


def _cmd_models(_: argparse.Namespace) -> int:
    for stage, path in model_paths().items():
        facts = model_facts(path)
        print(f"{stage}: {path}")
        print(
            f"  {facts['bytes'] / 2**20:.2f} MiB, ir {facts['ir_version']}, "
            f"opsets {facts['opsets']}"
        )
        print(f"  inputs {facts['inputs']}  outputs {facts['outputs']}")
        print(f"  {facts['nodes']} nodes, {facts['initializers']} initializers")
        print(f"  ops {facts['op_types']}")
    return 0


def _cmd_capture(args: argparse.Namespace) -> int:
    out = Path(args.out)
    images, _ = load_image_set(Path(args.data) if args.data else default_data_dir())
    eval_dir = Path(args.eval_images)
    start = time.perf_counter()
    make_eval_images(eval_dir, n=args.n_eval, seed=args.seed)
    eval_images, _ = load_image_set(eval_dir)
    print(
        f"rendered {len(eval_images)} held-out images into {eval_dir} "
        f"({time.perf_counter() - start:.1f}s)"
    )
    for prefix, group in (("", images), ("eval_", eval_images)):
        start = time.perf_counter()
        folders = capture_feeds(group, out, prefix=prefix, stages=args.model or ("det", "cls"), compress=args.compress)
        print(f"captured {len(group)} images in {time.perf_counter() - start:.1f}s")
        for folder in folders.values():
            print(f"  {folder}: {_folder_summary(folder)}")
    return 0


def _report_quality(title: str, quality: Mapping[str, Any], verbose: bool) -> None:
    print(
        f"{title}: CER {quality['cer']:.4f}  CER(no spaces) {quality['cer_nospace']:.4f}  "
        f"det boxes {quality['det_boxes']}  kept {quality['kept_boxes']}  "
        f"gt items {quality['gt_items']}  "
        f"images {quality['images']}  {quality['seconds']:.1f}s"
    )
    if verbose:
        for entry in quality["per_image"]:
            print(
                f"  {entry['image']}: cer {entry['cer']:.3f} "
                f"det {entry['det_boxes']} gt {entry['gt_items']}"
            )
            if entry["cer"] > 0:
                print(f"    got:   {entry['text']}")
                print(f"    truth: {entry['truth']}")


def _cmd_cer(args: argparse.Namespace) -> int:
    eval_dir = Path(args.eval_images)
    make_eval_images(eval_dir, n=args.n_eval, seed=args.seed)
    results: dict[str, Any] = {"det": args.det, "cls": args.cls}
    det = Path(args.det) if args.det else None
    cls = Path(args.cls) if args.cls else None
    sets = {
        "heldout": eval_dir,
        "shared": Path(args.data) if args.data else default_data_dir(),
    }
    for name, folder in sets.items():
        images, gt = load_image_set(folder)
        results[name] = ocr_quality(det, cls, images, gt)
        _report_quality(f"{name} ({folder})", results[name], args.verbose)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m onnxopt.testing.ocr_data``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--data", help=f"shared image folder (default: ${DATA_ENV} or ../shared/data/ocr)"
        )
        p.add_argument(
            "--eval-images",
            default=str(CACHE_DIR / "eval_images"),
            help="where the held-out images are rendered (default: %(default)s)",
        )
        p.add_argument("--n-eval", type=int, default=12, help="held-out images to render")
        p.add_argument("--seed", type=int, default=0, help="seed of the held-out images")

    p_models = sub.add_parser("models", help="where the packaged models are, and what they hold")
    p_models.set_defaults(func=_cmd_models)

    p_cap = sub.add_parser("capture", help="record det/cls (and with --model rec, rec) feeds from shared and held-out images")
    p_cap.add_argument(
        "--out", default=str(CACHE_DIR / "feeds"), help="output folder (default: %(default)s)"
    )
    p_cap.add_argument("--compress", action="store_true", help="write compressed .npz files")
    p_cap.add_argument(
        "--model", action="append", choices=STAGES,
        help="stage whose feeds are recorded; repeat for several (default: det and cls; rec: the "
        "recogniser's text-line batches, as rapidocr feeds them)",
    )
    common(p_cap)
    p_cap.set_defaults(func=_cmd_capture)

    p_cer = sub.add_parser("cer", help="end-to-end character error rate with given det/cls models")
    p_cer.add_argument("--det", help="detector .onnx (default: the packaged one)")
    p_cer.add_argument("--cls", help="direction classifier .onnx (default: the packaged one)")
    p_cer.add_argument("--json", help="also write the full results here")
    p_cer.add_argument("-v", "--verbose", action="store_true", help="per-image results")
    common(p_cer)
    p_cer.set_defaults(func=_cmd_cer)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ModuleNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
