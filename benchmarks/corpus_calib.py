"""Write a larger calibration set for an encoder: English sentences from Python's own docstrings or WordNet.

The activation-aware low-rank split fits a [K, K] second moment per layer (K up to 1536 in a
BERT FFN); the 16 calibration sentences of ``export_encoder.py --data`` give ~250 token rows, fewer
than K, so the fit sees only part of each input space. This script collects sentences from the
docstrings of the standard library's ``.py`` files (read with ``ast``, nothing imported, sorted
files, a seeded shuffle: the same sentences on every machine with the same Python), keeps plain
prose (8-25 words, no code characters), tokenizes them with the model's tokenizer and writes one
feed per sentence (batch 1, padded to the longest kept sentence, at most ``--max-tokens``) in the
``.npz`` format ``onnxopt.runtime.data.load_data`` reads. No sentence of the held-out
``eval.npz`` set can appear (those are written by hand in ``export_encoder.py``).

``--source wordnet`` takes the usage examples of WordNet 3.0 instead (the quoted sentences in the
glosses of ``/usr/share/wordnet/data.{noun,verb,adj,adv}``, Debian's ``wordnet-base`` package:
``apt-get install wordnet-base``): about 48,000 everyday sentences over the whole vocabulary, a far
broader sample of English than docstrings (kept: 5-40 words, no digits).

Usage (in the venv with transformers and the wheels, as ``export_encoder.py``)::

    python benchmarks/corpus_calib.py minilm /tmp/minilm_data/calib_corpus.npz --sentences 256
"""

from __future__ import annotations

import argparse
import ast
import os
import pathlib
import random
import re
import sys
import sysconfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

_CODE = re.compile(r"[`()\[\]{}=<>_*#@$%|\\/:;\"']|\d|\.\w")


def sentences(limit_files: int | None = None) -> list[str]:
    """Prose sentences from the standard library's docstrings, in a fixed order."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "test" not in p.parts and "site-packages" not in p.parts)
    seen: set[str] = set()
    out: list[str] = []
    for path in files[:limit_files]:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef))]
        for node in nodes:
            doc = ast.get_docstring(node)
            if not doc:
                continue
            for raw in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                words = raw.split()
                if not 8 <= len(words) <= 25 or _CODE.search(raw) or not raw[0].isupper() or not raw.endswith("."):
                    continue
                if raw not in seen:
                    seen.add(raw)
                    out.append(raw)
    return out


WORDNET = pathlib.Path("/usr/share/wordnet")


def wordnet_sentences(root: pathlib.Path = WORDNET) -> list[str]:
    """WordNet's quoted usage examples, in file order, each once."""
    if not (root / "data.noun").is_file():
        raise SystemExit(f"{root}/data.noun not found: apt-get install wordnet-base")
    seen: set[str] = set()
    out: list[str] = []
    for part in ("noun", "verb", "adj", "adv"):
        for line in (root / f"data.{part}").read_text(encoding="latin-1").splitlines():
            if line.startswith("  ") or "| " not in line:  # the license header, or no gloss
                continue
            for quoted in re.findall(r'"([^"]+)"', line.split("| ", 1)[1]):
                text = " ".join(quoted.split())
                if 5 <= len(text.split()) <= 40 and not re.search(r"\d", text) and text not in seen:
                    seen.add(text)
                    out.append(text[0].upper() + text[1:])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=("minilm", "splade-tiny", "mpnet"))
    parser.add_argument("output", type=pathlib.Path)
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source", choices=("docstrings", "wordnet"), default="docstrings")
    parser.add_argument("--cache", type=pathlib.Path, default=pathlib.Path("/tmp/onnxopt-checkpoints"))
    args = parser.parse_args()

    import numpy as np
    from export_encoder import HELD_OUT, NAMES, model_path
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path(args.model, args.cache))
    names = tuple(n for n in NAMES if n in tokenizer.model_input_names)
    pool = [s for s in (wordnet_sentences() if args.source == "wordnet" else sentences()) if s not in HELD_OUT]
    random.Random(args.seed).shuffle(pool)
    kept = [s for s in pool if len(tokenizer(s)["input_ids"]) <= args.max_tokens][: args.sentences]
    if len(kept) < args.sentences:
        raise SystemExit(f"only {len(kept)} sentences qualify, asked for {args.sentences}")
    tok = tokenizer(kept, padding=True, return_tensors="np")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.output, **{n: tok[n].astype(np.int64)[:, None, :] for n in names})
    rows = int(tok["attention_mask"].sum())
    origin = (f"{WORDNET} usage examples" if args.source == "wordnet"
              else f"{sysconfig.get_paths()['stdlib']} docstrings")
    print(f"wrote {args.output}: {len(kept)} sentences, {rows} tokens ({tok['input_ids'].shape[1]} per feed "
          f"with padding), from {origin}; first: {kept[0]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
