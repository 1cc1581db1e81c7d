"""A small BERT-style encoder written with onnx.helper, in the shape the PyTorch exporter gives.

Embedding (word + position, LayerNorm), then ``layers`` post-LN encoder blocks: self-attention
with an additive padding mask ``(1 - mask) * -10000``, residual + LayerNorm, a GELU (erf) FFN,
residual + LayerNorm; the output is a [batch, classes] head on the first token. LayerNorm and
GELU are written out in primitives (ReduceMean/Sub/Pow/Sqrt/Div, Erf), as older exporters emit
them, so that onnxruntime's transformer fusions have something to fuse. Weights are seeded
random (std 0.1); used by tests/passes/test_fuse.py and benchmarks/bench_fuse.py.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["bert_feeds", "make_bert"]

_OUTLIER_CHANNELS = (3, 17)


class _Builder:
    def __init__(self, rng: np.random.Generator, outlier_scale: float = 1.0) -> None:
        self.rng = rng
        self.outlier_scale = outlier_scale
        self.normalized: set[str] = set()  # LayerNorm outputs
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def name(self, base: str) -> str:
        self.n += 1
        return f"{base}_{self.n}"

    def const(self, base: str, array: np.ndarray) -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(self, base: str, shape: tuple[int, ...], std: float = 0.1) -> str:
        return self.const(base, (self.rng.standard_normal(shape) * std).astype(np.float32))

    def op(self, op_type: str, inputs: list[str], **attrs: object) -> str:
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=self.name(op_type), **attrs))
        return out

    def layer_norm(self, x: str, hidden: int) -> str:
        mean = self.op("ReduceMean", [x], axes=[-1])
        d = self.op("Sub", [x, mean])
        sq = self.op("Pow", [d, self.const("two", np.array(2.0, np.float32))])
        var = self.op("ReduceMean", [sq], axes=[-1])
        std = self.op("Sqrt", [self.op("Add", [var, self.const("eps", np.array(1e-12, np.float32))])])
        norm = self.op("Div", [d, std])
        gamma = self.const("ln_gamma", (1.0 + 0.1 * self.rng.standard_normal(hidden)).astype(np.float32))
        beta = self.const("ln_beta", (0.1 * self.rng.standard_normal(hidden)).astype(np.float32))
        if self.outlier_scale != 1.0:  # a few channels far larger than the rest, as in trained BERTs
            for name in (gamma, beta):
                t = next(t for t in self.inits if t.name == name)
                a = numpy_helper.to_array(t).copy()
                a[list(_OUTLIER_CHANNELS)] *= self.outlier_scale
                t.CopyFrom(numpy_helper.from_array(a, name))
        out = self.op("Add", [self.op("Mul", [norm, gamma]), beta])
        self.normalized.add(out)
        return out

    def linear(self, x: str, k: int, n: int) -> str:
        w = self.weight("w", (k, n))
        if self.outlier_scale != 1.0 and x in self.normalized:  # trained weights read outlier channels lightly
            t = self.inits[-1]
            a = numpy_helper.to_array(t).copy()
            a[list(_OUTLIER_CHANNELS)] /= self.outlier_scale
            t.CopyFrom(numpy_helper.from_array(a, w))
        return self.op("Add", [self.op("MatMul", [x, w]), self.weight("b", (n,))])

    def gelu(self, x: str) -> str:
        e = self.op("Erf", [self.op("Div", [x, self.const("sqrt2", np.array(1.4142135, np.float32))])])
        one = self.op("Add", [e, self.const("one", np.array(1.0, np.float32))])
        return self.op("Mul", [self.op("Mul", [x, one]), self.const("half", np.array(0.5, np.float32))])


def make_bert(
    *,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    vocab: int = 100,
    max_seq: int = 32,
    classes: int = 4,
    seed: int = 0,
    opset: int = 17,
    outlier_scale: float = 1.0,
) -> onnx.ModelProto:
    """A BERT-style encoder (default opset 17) with inputs input_ids/attention_mask [batch, seq] int64.

    ``outlier_scale`` multiplies two channels of every LayerNorm's gamma and beta and divides the
    matching rows of the weights that read them: the outlier channels of trained transformers'
    normalized activations, which their weights read lightly (what SmoothQuant is for).
    """
    if hidden % heads:
        raise ValueError(f"hidden {hidden} is not divisible by heads {heads}")
    b = _Builder(np.random.default_rng(seed), outlier_scale)
    head_dim = hidden // heads
    def i64(*v: int) -> np.ndarray:
        return np.array(v, np.int64)

    # Embeddings: word + position (positions 0..seq-1 sliced from a table).
    words = b.op("Gather", [b.weight("word_emb", (vocab, hidden), 0.5), "input_ids"])
    seq = b.op("Gather", [b.op("Shape", ["input_ids"]), b.const("one_idx", i64(1))], axis=0)
    pos = b.op("Slice", [b.weight("pos_emb", (max_seq, hidden), 0.5), b.const("zero", i64(0)), seq,
                         b.const("ax0", i64(0))])
    x = b.layer_norm(b.op("Add", [words, pos]), hidden)
    # Additive mask [batch, 1, 1, seq]: 0 where attended, -10000 where padded.
    m = b.op("Unsqueeze", ["attention_mask", b.const("ax1", i64(1))])
    m = b.op("Cast", [b.op("Unsqueeze", [m, b.const("ax2", i64(2))])], to=TensorProto.FLOAT)
    m = b.op("Sub", [b.const("one_f", np.array(1.0, np.float32)), m])
    mask_bias = b.op("Mul", [m, b.const("neg", np.array(-10000.0, np.float32))])
    split_shape = b.const("split_shape", i64(0, 0, heads, head_dim))
    merge_shape = b.const("merge_shape", i64(0, 0, hidden))
    for _ in range(layers):
        q, k, v = (b.op("Reshape", [b.linear(x, hidden, hidden), split_shape]) for _ in range(3))
        q = b.op("Transpose", [q], perm=[0, 2, 1, 3])
        k = b.op("Transpose", [k], perm=[0, 2, 3, 1])
        v = b.op("Transpose", [v], perm=[0, 2, 1, 3])
        scores = b.op("Div", [b.op("MatMul", [q, k]), b.const("scale", np.array(np.sqrt(head_dim), np.float32))])
        probs = b.op("Softmax", [b.op("Add", [scores, mask_bias])], axis=-1)
        ctx = b.op("Transpose", [b.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
        ctx = b.op("Reshape", [ctx, merge_shape])
        x = b.layer_norm(b.op("Add", [b.linear(ctx, hidden, hidden), x]), hidden)
        ffn = b.linear(b.gelu(b.linear(x, hidden, 4 * hidden)), 4 * hidden, hidden)
        x = b.layer_norm(b.op("Add", [ffn, x]), hidden)
    first = b.op("Gather", [x, b.const("zero_idx", np.array(0, np.int64))], axis=1)
    logits = b.linear(first, hidden, classes)
    b.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="output"))
    graph = helper.make_graph(
        b.nodes,
        "bert_tiny",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="pytorch")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def bert_feeds(
    n: int, *, batch: int = 2, seq: int = 16, vocab: int = 100, seed: int = 0
) -> list[dict[str, np.ndarray]]:
    """``n`` seeded feeds: random token ids and right-padded 0/1 masks (at least 1 token kept)."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(n):
        ids = rng.integers(0, vocab, (batch, seq), dtype=np.int64)
        lengths = rng.integers(1, seq + 1, batch)
        mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
        feeds.append({"input_ids": ids, "attention_mask": mask})
    return feeds
