"""A small BERT-style encoder written with onnx.helper, in the shape the PyTorch exporter gives.

Embedding (word + position, LayerNorm), then ``layers`` post-LN encoder blocks: self-attention
with an additive padding mask, residual + LayerNorm, a GELU (erf) FFN, residual + LayerNorm; the
output is a [batch, classes] head on the first token. Weights are seeded random (std 0.1); used
by tests/passes/test_fuse.py and benchmarks/bench_fuse.py.

``style`` picks how attention is written, after the exports of Hugging Face BERT encoders
(``torch.onnx.export``, TorchScript exporter; checked against all-MiniLM-L6-v2 exports):

- ``legacy``: Reshape to the constant ``[0, 0, heads, head_dim]``, scores ``Div`` by
  sqrt(head_dim), mask ``(1 - mask) * -10000``; LayerNorm written out in primitives
  (ReduceMean/Sub/Pow/Sqrt/Div), as older exporters emit it.
- ``hf4`` (transformers 4.x, eager): Reshape to ``Concat(batch, seq, heads, head_dim)`` with the
  batch and seq dims gathered from ``Shape``, ``Div`` by sqrt(head_dim), mask
  ``(1 - mask) * finfo(float32).min``.
- ``eager`` (transformers 5, eager attention): Reshape to ``Concat(batch, seq, -1, head_dim)``
  (no constant head count: what onnxruntime cannot read), scores ``Mul`` by 1/sqrt(head_dim),
  the boolean padding mask built once through Flatten/Gather/Reshape/And/Expand and applied
  as ``Where(mask, 0, finfo.min)``.
- ``sdpa`` (transformers 5 default, torch's scaled_dot_product_attention export): as ``eager``
  for the Reshapes and the boolean mask, but the scale split as ``head_dim**-0.25`` on Q and on
  K^T before their MatMul, ``Where(mask, 0, -inf)`` per layer, a ``Where(IsNaN(P), 0, P)`` guard
  after the Softmax and a Reshape of the context to its own shape (``Concat`` of its dims, -1).

- ``dynamo`` (torch.onnx.export(dynamo=True) of the SDPA model, transformers 5): as ``sdpa``, but
  K^T is written through 3-D (``Reshape(K, [-1, seq, head_dim])``, ``Transpose([0, 2, 1])``,
  ``Reshape([batch, heads, head_dim, seq])``) and the padding mask is picked with ``GatherND``
  from ``Cast<bool>(attention_mask)`` by broadcast (batch, key) indices, ``And``-ed with a
  shape-only ``key >= 0``.

The non-legacy styles use the LayerNormalization op (opset 17, as those exports do). GELU is
written out with Erf in every style.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["bert_feeds", "make_bert"]

_OUTLIER_CHANNELS = (3, 17)
Style = Literal["legacy", "hf4", "eager", "sdpa", "dynamo"]
_F32_MIN = float(np.finfo(np.float32).min)


class _Builder:
    def __init__(self, rng: np.random.Generator, outlier_scale: float = 1.0, fused_norm: bool = False) -> None:
        self.rng = rng
        self.outlier_scale = outlier_scale
        self.fused_norm = fused_norm  # LayerNormalization op instead of primitives
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
        if self.fused_norm:
            gamma = self.const("ln_gamma", (1.0 + 0.1 * self.rng.standard_normal(hidden)).astype(np.float32))
            beta = self.const("ln_beta", (0.1 * self.rng.standard_normal(hidden)).astype(np.float32))
            out = self.op("LayerNormalization", [x, gamma, beta], axis=-1, epsilon=1e-12)
            self.normalized.add(out)
            return out
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

    def dim(self, x: str, axis: int) -> str:
        """``Unsqueeze(Gather(Shape(x), axis))``: a dim of ``x`` as a 1-element int64 tensor."""
        gathered = self.op("Gather", [self.op("Shape", [x]), self.const("axis", np.array(axis, np.int64))], axis=0)
        return self.op("Unsqueeze", [gathered, self.const("ax0", np.array([0], np.int64))])

    def gathernd_mask(self, mask: str) -> str:
        """The dynamo export's key padding mask [batch, 1, 1, seq]: GatherND of (batch, key) indices."""
        def i64(*v: int) -> str:
            return self.const("i", np.array(v, np.int64))

        shape = self.op("Shape", [mask])
        batch = self.op("Gather", [shape, self.const("zero", np.array(0, np.int64))], axis=0)
        seq = self.op("Gather", [shape, self.const("one", np.array(1, np.int64))], axis=0)
        rows = self.op("Unsqueeze", [self.op("Range", [self.const("r0", np.array(0, np.int64)), batch,
                                                       self.const("r1", np.array(1, np.int64))]), i64(1, 2, 3)])
        keys = self.op("Unsqueeze", [self.op("Range", [self.const("r0", np.array(0, np.int64)), seq,
                                                       self.const("r1", np.array(1, np.int64))]), i64(0, 1, 2)])
        both = self.op("Shape", [self.op("Max", [rows, keys])])
        index = self.op("Concat", [self.op("Unsqueeze", [self.op("Expand", [rows, both]), i64(-1)]),
                                   self.op("Unsqueeze", [self.op("Expand", [keys, both]), i64(-1)])], axis=-1)
        picked = self.op("GatherND", [self.op("Cast", [mask], to=TensorProto.BOOL), index])
        valid = self.op("GreaterOrEqual", [keys, self.const("zero", np.array(0, np.int64))])
        return self.op("And", [valid, picked])

    def k_transposed_via_3d(self, k: str) -> str:
        """K [batch, seq, heads, head_dim] -> K^T [batch, heads, head_dim, seq] as dynamo writes it."""
        kt = self.op("Transpose", [k], perm=[0, 2, 1, 3])
        flat = self.op("Concat", [self.const("m1", np.array([-1], np.int64)), self.dim(kt, 2), self.dim(kt, 3)], axis=0)
        t = self.op("Transpose", [self.op("Reshape", [kt, flat])], perm=[0, 2, 1])
        back = self.op("Concat", [self.dim(kt, 0), self.dim(kt, 1), self.dim(kt, 3), self.dim(kt, 2)], axis=0)
        return self.op("Reshape", [t, back])

    def padding_mask(self, mask: str) -> str:
        """Build transformers 5's boolean key-padding mask [batch, 1, seq, seq] as its export writes it."""
        def i64(*v: int) -> str:
            return self.const("i", np.array(v, np.int64))

        shape = self.op("Shape", [mask])
        batch = self.op("Gather", [shape, self.const("zero", np.array(0, np.int64))], axis=0)
        seq = self.op("Gather", [shape, self.const("one", np.array(1, np.int64))], axis=0)
        rows = self.op("Unsqueeze", [self.op("Range", [self.const("r0", np.array(0, np.int64)), batch,
                                                       self.const("r1", np.array(1, np.int64))]), i64(1, 2, 3)])
        keys = self.op("Unsqueeze", [self.op("Range", [self.const("r0", np.array(0, np.int64)), seq,
                                                       self.const("r1", np.array(1, np.int64))]), i64(0, 1, 2)])
        index = self.op("Add", [keys, self.op("Mul", [rows, seq])])  # row * seq + key: [batch, 1, 1, seq]
        flat = self.op("Flatten", [self.op("Cast", [mask], to=TensorProto.BOOL)], axis=2)
        picked = self.op("Reshape", [self.op("Gather", [flat, index], axis=0), i64(-1)])
        picked = self.op("Reshape", [picked, self.op("Shape", [index])])
        valid = self.op("GreaterOrEqual", [keys, self.const("zero", np.array(0, np.int64))])
        allowed = self.op("And", [valid, picked])
        seq1 = self.op("Unsqueeze", [seq, i64(0)])
        target = self.op("Concat", [self.op("Unsqueeze", [batch, i64(0)]), i64(1), seq1, seq1], axis=0)
        return self.op("Expand", [allowed, target])


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
    style: Style = "legacy",
) -> onnx.ModelProto:
    """A BERT-style encoder (default opset 17) with inputs input_ids/attention_mask [batch, seq] int64.

    ``outlier_scale`` multiplies two channels of every LayerNorm's gamma and beta and divides the
    matching rows of the weights that read them: the outlier channels of trained transformers'
    normalized activations, which their weights read lightly (what SmoothQuant is for).
    ``style`` is how attention is written (see the module docstring); all styles compute the
    same function up to the mask value (-10000, finfo.min or -inf), for the same seed.
    """
    if hidden % heads:
        raise ValueError(f"hidden {hidden} is not divisible by heads {heads}")
    if style not in ("legacy", "hf4", "eager", "sdpa", "dynamo"):
        raise ValueError(f"unknown style {style!r}; expected legacy, hf4, eager, sdpa or dynamo")
    if style != "legacy" and opset < 17:
        raise ValueError(f"style {style!r} is written with LayerNormalization: needs opset >= 17, got {opset}")
    b = _Builder(np.random.default_rng(seed), outlier_scale, fused_norm=style != "legacy")
    head_dim = hidden // heads
    def i64(*v: int) -> np.ndarray:
        return np.array(v, np.int64)

    # Embeddings: word + position (positions 0..seq-1 sliced from a table).
    words = b.op("Gather", [b.weight("word_emb", (vocab, hidden), 0.5), "input_ids"])
    seq = b.op("Gather", [b.op("Shape", ["input_ids"]), b.const("one_idx", i64(1))], axis=0)
    pos = b.op("Slice", [b.weight("pos_emb", (max_seq, hidden), 0.5), b.const("zero", i64(0)), seq,
                         b.const("ax0", i64(0))])
    x = b.layer_norm(b.op("Add", [words, pos]), hidden)
    if style in ("legacy", "hf4"):
        # Additive mask [batch, 1, 1, seq]: 0 where attended, -10000 (finfo.min) where padded.
        m = b.op("Unsqueeze", ["attention_mask", b.const("ax1", i64(1))])
        m = b.op("Cast", [b.op("Unsqueeze", [m, b.const("ax2", i64(2))])], to=TensorProto.FLOAT)
        m = b.op("Sub", [b.const("one_f", np.array(1.0, np.float32)), m])
        low = -10000.0 if style == "legacy" else _F32_MIN
        mask_bias = b.op("Mul", [m, b.const("neg", np.array(low, np.float32))])
    else:
        allowed = b.gathernd_mask("attention_mask") if style == "dynamo" else b.padding_mask("attention_mask")
        if style == "eager":
            mask_bias = b.op("Where", [allowed, b.const("zero_f", np.array(0.0, np.float32)),
                                       b.const("min_f", np.array(_F32_MIN, np.float32))])
    if style == "legacy":
        split_shape = b.const("split_shape", i64(0, 0, heads, head_dim))
        merge_shape = b.const("merge_shape", i64(0, 0, hidden))
    for _ in range(layers):
        if style != "legacy":  # [batch, seq, heads or -1, head_dim] from the layer input's dims
            split_shape = b.op("Concat", [b.dim(x, 0), b.dim(x, 1), b.const("heads", i64(heads if style == "hf4" else -1)),
                                          b.const("head_dim", i64(head_dim))], axis=0)
            merge_shape = b.op("Concat", [b.dim(x, 0), b.dim(x, 1), b.const("minus1", i64(-1))], axis=0)
        q, k, v = (b.op("Reshape", [b.linear(x, hidden, hidden), split_shape]) for _ in range(3))
        q = b.op("Transpose", [q], perm=[0, 2, 1, 3])
        k = b.k_transposed_via_3d(k) if style == "dynamo" else b.op("Transpose", [k], perm=[0, 2, 3, 1])
        v = b.op("Transpose", [v], perm=[0, 2, 1, 3])
        if style in ("legacy", "hf4"):
            scores = b.op("Div", [b.op("MatMul", [q, k]), b.const("scale", np.array(np.sqrt(head_dim), np.float32))])
        elif style == "eager":
            scores = b.op("Mul", [b.op("MatMul", [q, k]), b.const("scale", np.array(head_dim**-0.5, np.float32))])
        else:
            root = b.const("scale", np.array(head_dim**-0.25, np.float32))
            scores = b.op("MatMul", [b.op("Mul", [q, root]), b.op("Mul", [k, root])])
            mask_bias = b.op("Where", [allowed, b.const("zero_f", np.array([0.0], np.float32)),
                                       b.const("ninf", np.array([-np.inf], np.float32))])
        probs = b.op("Softmax", [b.op("Add", [scores, mask_bias])], axis=-1)
        if style in ("sdpa", "dynamo"):
            probs = b.op("Where", [b.op("IsNaN", [probs]), b.const("zero_f", np.array([0.0], np.float32)), probs])
        ctx = b.op("MatMul", [probs, v])
        if style in ("sdpa", "dynamo"):  # the context reshaped to its own dims [batch, -1, seq, head_dim]
            own = b.op("Concat", [b.dim(ctx, 0), b.const("minus1", i64(-1)), b.dim(q, 2), b.dim(v, 3)], axis=0)
            ctx = b.op("Reshape", [ctx, own])
        ctx = b.op("Transpose", [ctx], perm=[0, 2, 1, 3])
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
