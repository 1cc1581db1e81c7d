"""Train the three bundled digits models and write them, their data and their README.

The models in this folder are small but real: they are trained on scikit-learn's bundled
copy of the UCI "Optical Recognition of Handwritten Digits" test set (1797 8x8 images,
10 classes, pixel values 0..16), so that onnxopt's passes are exercised on weights and
activations with realistic statistics rather than random ones.

This script is the only part of the project that needs PyTorch. Torch is NOT a dependency
of onnxopt and must not go into the project's own environment; make a separate one:

    python3 -m venv /path/to/torchvenv
    /path/to/torchvenv/bin/pip install torch onnx onnxruntime numpy scikit-learn onnxscript
    /path/to/torchvenv/bin/python models/train_digits.py          # writes into models/

It runs on CPU in one to two minutes and writes, for NAME in digits_mlp, digits_cnn and
digits_transformer:

    NAME.onnx          opset 17, input "input" (dynamic axis 0 named "batch"), output "logits"
    NAME_calib.npz     key "input": 128 training samples, float32, for static quantization
    NAME_eval.npz      keys "input" (float32) and "label" (int64): the held-out test split

and README.md and SHA256SUMS, with the accuracy of each exported model measured by
onnxruntime on its eval file (never by torch).

Data: pixels are divided by 16, so every model's input is plain scaled pixels in [0, 1];
no normalisation lives outside the graph. The split is a seeded stratified split of the
1797 samples into 1200 train and 597 test; the calibration set is a seeded stratified
draw of 128 samples from the train split (never from the test split).

Determinism: seeds are fixed, torch runs single-threaded with deterministic algorithms,
and the .npz files are written with fixed zip timestamps, so a rebuild with the same
versions of torch/numpy/scikit-learn should give the same bytes. Across versions or CPUs
the floating-point results (and so the .onnx hashes and accuracies) may differ slightly:
the script rewrites README.md and SHA256SUMS to match what it produced; commit all of them.

The CNN is exported with ``training=TrainingMode.PRESERVE`` on a model in eval mode: the
exporter then keeps each BatchNormalization node (in inference form) instead of folding it
into the preceding Conv, because folding BatchNorm is onnxopt's simplify pass's job.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import math
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

OPSET = 17
SEED = 0
N_TEST = 597  # 1797 - 1200
N_CALIB = 128
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- data


def load_split() -> dict[str, np.ndarray]:
    """Seeded stratified split of sklearn digits; pixels scaled to [0, 1] (divided by 16)."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # (1797, 64), row-major 8x8
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=N_TEST, stratify=y, random_state=SEED
    )
    calib_idx, _ = train_test_split(
        np.arange(len(y_train)), train_size=N_CALIB, stratify=y_train, random_state=SEED + 1
    )
    return {
        "x_train": x_train,
        "y_train": y_train,
        "x_test": x_test,
        "y_test": y_test,
        "x_calib": x_train[np.sort(calib_idx)],
    }


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like np.savez_compressed, but with fixed zip timestamps so equal data gives equal bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


# ----------------------------------------------------------------------------- models


class DigitsMLP(nn.Module):
    """64 -> 256 -> 128 -> 10, ReLU; exports as three Gemm nodes."""

    input_shape = (64,)

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=True), nn.BatchNorm2d(cout), nn.ReLU()
    )


class DigitsCNN(nn.Module):
    """[1,8,8] -> 3x(Conv3x3+BN+ReLU) with a 2x2 MaxPool -> GlobalAveragePool -> 2 Gemm."""

    input_shape = (1, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(1, 16),
            conv_bn_relu(16, 32),
            nn.MaxPool2d(2),
            conv_bn_relu(32, 64),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Sequential(nn.Flatten(1), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class EncoderLayer(nn.Module):
    """Pre-norm transformer encoder layer with attention written out (MatMul/Softmax).

    Written the way Hugging Face encoders are (separate query/key/value Linear layers, scores
    divided by sqrt(head_dim), residual added as ``sublayer(x) + x``), which is the graph
    onnxruntime's transformer optimizer recognises as self-attention: a packed QKV Linear split
    by Gather, a Mul by 1/sqrt(head_dim), or ``x + sublayer(x)`` after an Add-ending embedding
    are not matched by its Attention fusion.
    """

    def __init__(self, d: int, heads: int, ffn: int, tokens: int, dropout: float) -> None:
        super().__init__()
        self.d, self.heads, self.tokens = d, heads, tokens
        self.head_dim = d // heads
        self.norm1 = nn.LayerNorm(d)
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.ff1 = nn.Linear(d, ffn)
        self.act = nn.GELU()  # exact (erf) GELU
        self.ff2 = nn.Linear(ffn, d)
        self.drop = nn.Dropout(dropout)

    def heads_first(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, d] -> [B, H, T, hd]."""
        # Fixed shapes except the batch axis (-1), so the exported Reshapes take constant shapes.
        return x.reshape(-1, self.tokens, self.heads, self.head_dim).transpose(1, 2)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        q = self.heads_first(self.query(x))
        k = self.heads_first(self.key(x))
        v = self.heads_first(self.value(x))
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        probs = self.drop(torch.softmax(scores, dim=-1))
        out = torch.matmul(probs, v).transpose(1, 2).reshape(-1, self.tokens, self.d)
        return self.proj(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.attention(self.norm1(x))) + x
        return self.drop(self.ff2(self.drop(self.act(self.ff1(self.norm2(x)))))) + x


class DigitsTransformer(nn.Module):
    """8 row tokens of 8 pixels -> Linear(8,64) + learned positions -> 2 encoder layers
    (4 heads, FFN 128, GELU, pre-LayerNorm) -> LayerNorm -> mean over tokens -> Linear(64,10)."""

    input_shape = (8, 8)

    def __init__(self, d: int = 64, heads: int = 4, ffn: int = 128, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.pos = nn.Parameter(torch.randn(1, 8, d) * 0.02)
        self.layers = nn.ModuleList(
            EncoderLayer(d, heads, ffn, tokens=8, dropout=0.1) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x) + self.pos
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x).mean(dim=1))


# name -> (class, epochs, lr, weight decay, export training mode, summary for the README)
SPECS = {
    "digits_mlp": (
        DigitsMLP, 60, 1e-3, 1e-4, torch.onnx.TrainingMode.EVAL,
        "MLP 64-256-128-10, ReLU (3 Gemm)",
    ),
    "digits_cnn": (
        DigitsCNN, 40, 2e-3, 1e-4, torch.onnx.TrainingMode.PRESERVE,
        "CNN: 3x[Conv3x3 pad1 + BatchNorm + ReLU] (16, 32, 64 ch; MaxPool 2x2 after the 2nd), "
        "GlobalAveragePool, Flatten, Gemm 64-64 + ReLU, Gemm 64-10",
    ),
    "digits_transformer": (
        DigitsTransformer, 100, 2e-3, 1e-2, torch.onnx.TrainingMode.EVAL,
        "Transformer encoder: 8 row tokens x 8 px, Linear 8-64 + learned positions, "
        "2 pre-LN layers (4 heads, separate Q/K/V, FFN 128, exact GELU), LayerNorm, mean pool, "
        "Linear 64-10",
    ),
}


# ----------------------------------------------------------------------------- train/export


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, lr: float, wd: float,
          seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(x.reshape((-1, *model.input_shape)))
    yt = torch.from_numpy(y)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    steps_per_epoch = math.ceil(len(xt) / 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def export(model: nn.Module, path: Path, training: torch.onnx.TrainingMode) -> onnx.ModelProto:
    dummy = torch.zeros((2, *model.input_shape), dtype=torch.float32)
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        dynamo=False,  # the TorchScript exporter: plain graph, weights as initializers
        opset_version=OPSET,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        training=training,
        do_constant_folding=True,
    )
    m = onnx.load(str(path))
    m.doc_string = (
        "Trained by models/train_digits.py on scikit-learn's digits dataset "
        "(UCI Optical Recognition of Handwritten Digits); input = pixels / 16."
    )
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))
    return m


def ort_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    return float((logits.argmax(axis=1) == y).mean())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- README


def write_readme(out: Path, rows: list[dict], data: dict[str, np.ndarray]) -> None:
    lines = [
        "# models",
        "",
        "Small real models for onnxopt's tests, examples and benchmarks. All three are trained",
        "by [`train_digits.py`](train_digits.py) on scikit-learn's bundled **digits** dataset",
        "(`sklearn.datasets.load_digits`: 1797 8x8 grey-scale images of handwritten digits,",
        "10 classes; a copy of the test set of the UCI ML *Optical Recognition of Handwritten",
        "Digits* data set, distributed with scikit-learn under its BSD-3-Clause license).",
        "",
        "Every model takes plain scaled pixels: `input = pixels / 16` in [0, 1], float32, no",
        "other normalisation outside the graph. Output `logits` (float32, 10 classes, no softmax).",
        "Axis 0 of input and output is dynamic and named `batch`. Opset 17 (default domain only),",
        "weights stored as initializers; each model passes `onnx.checker.check_model(m,",
        "full_check=True)`.",
        "",
        f"Split: seeded stratified split into {len(data['y_train'])} train and "
        f"{len(data['y_test'])} held-out test samples; calibration = {len(data['x_calib'])} "
        "samples drawn (seeded, stratified) from the train split.",
        "",
        "| model | architecture | source | opset | input -> output "
        "| FP32 test acc. (onnxruntime) | params | size | ops |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ops = ", ".join(f"{k} {v}" for k, v in sorted(r["ops"].items()))
        lines.append(
            f"| `{r['name']}.onnx` | {r['summary']} | trained by `train_digits.py` on sklearn "
            f"digits (UCI, BSD-3) | {OPSET} | `input` {r['in_shape']} float32 -> "
            f"`logits` {r['out_shape']} float32 | {r['acc'] * 100:.2f}% "
            f"({r['correct']}/{r['n_eval']}) | {r['params']:,} | {r['size'] / 1024:.1f} KiB | "
            f"{ops} |"
        )
    lines += [
        "",
        "Accuracy is measured on `<name>_eval.npz` by running the exported `.onnx` in",
        "onnxruntime (CPUExecutionProvider), not in torch. Params = trainable parameters",
        "(BatchNorm running mean/variance are extra initializers, not counted).",
        "",
        "## Data files",
        "",
        "For each model `<name>`, with inputs already shaped for that model:",
        "",
        "- `<name>_calib.npz`: key `input` (float32, first axis = samples) — "
        f"{len(data['x_calib'])} training samples for static quantization calibration.",
        "- `<name>_eval.npz`: keys `input` (float32) and `label` (int64) — "
        f"the {len(data['y_test'])} held-out test samples.",
        "",
        "Load with `np.load(path)`; the key `input` is the model's input name.",
        "",
        "## Notes",
        "",
        "- `digits_cnn.onnx` keeps its three `BatchNormalization` nodes (inference form, one",
        "  output): it is exported with `training=TrainingMode.PRESERVE` so the exporter does not",
        "  fold them into the Convs — folding them is onnxopt's simplify pass's job.",
        "- `digits_transformer.onnx` has attention written out (MatMul, Softmax), opset-17",
        "  `LayerNormalization`, and exact GELU decomposed by the exporter into Div/Erf/Add/Mul.",
        "  Its attention has separate query/key/value MatMul + Add branches, scores divided by",
        "  sqrt(head_dim) and residuals added as `sublayer(x) + x`, as in Hugging Face encoders:",
        "  the pattern onnxruntime's transformer optimizer (onnxopt's `fuse` pass) fuses into",
        "  `Attention`.",
        "- The MLP's and the CNN's Linear layers are exported as `Gemm` (transB=1). The",
        "  transformer's Linear layers act on 3-D tensors and export as `MatMul` + `Add`",
        "  (its classifier head is a `Gemm`). Its `Constant` nodes hold only scalars and shape",
        "  vectors (Reshape shapes, the attention scale sqrt(head_dim), GELU's constants);",
        "  every weight is an initializer.",
        "",
        "## sha256",
        "",
        "| file | bytes | sha256 |",
        "| --- | --- | --- |",
    ]
    for f in sorted(p for p in out.iterdir() if p.suffix in (".onnx", ".npz")):
        lines.append(f"| `{f.name}` | {f.stat().st_size:,} | `{sha256(f)}` |")
    lines += [
        "",
        "The same hashes are in [`SHA256SUMS`](SHA256SUMS) (`cd models && sha256sum -c SHA256SUMS`).",
        "",
        "## Rebuild",
        "",
        "Torch is needed for this script only; keep it out of onnxopt's environment:",
        "",
        "```sh",
        "python3 -m venv /path/to/venv-with-torch",
        "/path/to/venv-with-torch/bin/pip install torch onnx onnxruntime numpy scikit-learn onnxscript",
        "/path/to/venv-with-torch/bin/python models/train_digits.py",
        "```",
        "",
        "It takes one to two minutes on CPU and rewrites every file here, this README and",
        "`SHA256SUMS` included. The build is deterministic only approximately: seeds are fixed",
        "and torch runs single-threaded with deterministic algorithms, but other versions of",
        "torch, numpy or scikit-learn, or another CPU, may change the weights in the last bits",
        "(so the `.onnx` hashes, and possibly an accuracy by a sample or two). Commit the",
        "regenerated README.md and SHA256SUMS together with the models.",
        "",
        f"Last built with: torch {torch.__version__}, onnx {onnx.__version__}, "
        f"onnxruntime {ort.__version__}, numpy {np.__version__}, "
        f"scikit-learn {sklearn_version()}, Python {sys.version.split()[0]}.",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))


def sklearn_version() -> str:
    import sklearn

    return sklearn.__version__


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=HERE, help="output folder (default: models/)")
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    data = load_split()
    rows = []
    for i, (name, (cls, epochs, lr, wd, mode, summary)) in enumerate(SPECS.items()):
        t0 = time.perf_counter()
        torch.manual_seed(SEED + 100 * i)
        model = cls()
        train(model, data["x_train"], data["y_train"], epochs, lr, wd, seed=SEED + 100 * i)
        path = out / f"{name}.onnx"
        m = export(model, path, mode)

        shape = (-1, *cls.input_shape)
        x_eval = np.ascontiguousarray(data["x_test"].reshape(shape), dtype=np.float32)
        x_calib = np.ascontiguousarray(data["x_calib"].reshape(shape), dtype=np.float32)
        save_npz(out / f"{name}_calib.npz", {INPUT_NAME: x_calib})
        save_npz(out / f"{name}_eval.npz", {INPUT_NAME: x_eval, "label": data["y_test"]})

        acc = ort_accuracy(path, x_eval, data["y_test"])
        ops = collections.Counter(n.op_type for n in m.graph.node)
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows.append(
            {
                "name": name,
                "summary": summary,
                "in_shape": "[batch, " + ", ".join(map(str, cls.input_shape)) + "]",
                "out_shape": "[batch, 10]",
                "acc": acc,
                "correct": int(round(acc * len(x_eval))),
                "n_eval": len(x_eval),
                "params": params,
                "size": path.stat().st_size,
                "ops": dict(ops),
            }
        )
        print(
            f"{name}: test accuracy (onnxruntime) {acc:.4f}, {params} params, "
            f"{path.stat().st_size} bytes, {time.perf_counter() - t0:.1f}s, ops {dict(ops)}"
        )

    files = sorted(p for p in out.iterdir() if p.suffix in (".onnx", ".npz"))
    (out / "SHA256SUMS").write_text("".join(f"{sha256(f)}  {f.name}\n" for f in files))
    write_readme(out, rows, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
