"""Transformer fusions through onnxruntime's maintained transformer optimizer.

``onnxruntime-tools`` is deprecated upstream; its transformer optimizer lives on, maintained, as
``onnxruntime.transformers.optimizer.optimize_model``. This pass runs it with ``opt_level=0``:
only the Python pattern fusions run, none of onnxruntime's own load-time graph optimizations
are baked into the file (those are provider-specific above level 1 and onnxruntime redoes them
when it loads the model anyway).

Attention geometry: onnxruntime's attention fusion needs the number of heads and the hidden
size, and reads them only from a constant ``[0, 0, heads, head_dim]`` Reshape target. Exports of
Hugging Face encoders write ``[batch, seq, -1, head_dim]`` (a Concat of gathered dims) instead.
Left at 0, ``num_heads``/``hidden_size`` are inferred here from the graph (``onnxopt.fusion.attention``:
the Q/K/V projection weights, the Reshape targets, the 1/sqrt(head_dim) scale constant); the
report says what was found and from where, or why nothing was. The default (SDPA) export of the
same models is first rewritten into the eager form the fusion knows (``onnxopt.fusion.attention``);
a block the fusion then does not fuse keeps its exported form.

Algebra: each fusion replaces a subgraph by one contrib kernel computing the same function:
Attention = softmax(Q K^T / sqrt(d) + mask) V with the Q/K/V projections packed into one
weight; SkipLayerNormalization = LayerNorm(x + skip + bias); BiasGelu = Gelu(x + bias);
LayerNormalization = the ReduceMean/Sub/Pow/Sqrt/Div chain. Outputs change only by float
re-association (tolerance "reassociate_fp32", 1e-4 / 1e-5 in tests/tolerances.py), provided the
attention mask holds 0/1 values (the fused kernel reads mask > 0 as "attend") and every sequence
has an attended token (an SDPA export writes zeros for a fully masked row, Attention the mean).

Portability: the fused ops (Attention, SkipLayerNormalization, BiasGelu, FastGelu,
EmbedLayerNormalization, ...) live in the ``com.microsoft`` domain. onnxruntime has kernels for
them on CPU and CUDA (see ``onnxopt inspect --ep``); other runtimes do not, and TensorRT builds
its own fusions, so the pass refuses ``target="tensorrt"``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import tempfile
from typing import Literal

import onnx
import onnx_ir as ir

from onnxopt import _ir_utils
from onnxopt import io as _io
from onnxopt.config import option
from onnxopt.fusion import attention
from onnxopt.pass_base import OptPass, PassReport, register

__all__ = ["FUSED_OPS", "FuseConfig", "FusePass"]

logger = logging.getLogger(__name__)

ModelType = Literal["auto", "bert", "bert_tf", "bert_keras", "vit", "swin", "gpt2", "gpt2_tf", "bart", "t5",
                    "tnlr", "clip", "unet", "vae", "conformer", "phi", "sam2", "mmdit"]
MaskFormat = Literal["raw", "index_end", "none"]
# Fused op types counted in the report (onnxruntime's get_fused_operator_statistics list).
FUSED_OPS = ("EmbedLayerNormalization", "Attention", "MultiHeadAttention", "Gelu", "FastGelu",
             "BiasGelu", "GemmFastGelu", "LayerNormalization", "SimplifiedLayerNormalization",
             "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "RotaryEmbedding")
_MS_DOMAIN = "com.microsoft"
# The fused LayerNormalization is written in the default domain, a standard op from opset 17.
_MIN_OPSET = 17


@dataclasses.dataclass(frozen=True)
class FuseConfig:
    """Options of the fuse pass."""

    model_type: ModelType = option("auto", "onnxruntime.transformers model type; auto: bert "
                                   "(encoders: BERT/ViT-like) when the graph has attention or layer norm")
    num_heads: int = option(0, "attention heads; 0: inferred from the graph (Reshape targets, "
                            "projection weights, scale constant)")
    hidden_size: int = option(0, "hidden size; 0: inferred from the graph (projection weights)")
    attention: bool = option(True, "fuse self-attention into Attention")
    layer_norm: bool = option(True, "fuse LayerNormalization and SkipLayerNormalization")
    skip_layer_norm: bool = option(True, "with layer_norm: also fuse residual Add + LayerNorm into "
                                   "SkipLayerNormalization (off in fuse-int8: slower than Add + LayerNormalization "
                                   "beside dynamic INT8 MatMuls on [XEON-AMX], docs/benchmarks.md)")
    gelu: bool = option(True, "fuse Gelu and BiasGelu")
    embed_layer_norm: bool = option(True, "fuse embeddings + LayerNorm into EmbedLayerNormalization")
    mask_format: MaskFormat = option("raw", "attention mask given to Attention: raw (exact for any "
                                     "0/1 mask), index_end (faster, assumes right padding), "
                                     "none (no mask input, e.g. ViT)")
    upgrade_opset: bool = option(True, f"convert models below opset {_MIN_OPSET} to {_MIN_OPSET} first "
                                 "(needed for a standard LayerNormalization)")

    def __post_init__(self) -> None:
        if self.num_heads < 0 or self.hidden_size < 0:
            raise ValueError(f"num_heads and hidden_size must be >= 0, got {self.num_heads}, {self.hidden_size}")
        if self.num_heads and self.hidden_size and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")


@register("fuse")
class FusePass(OptPass[FuseConfig]):
    """Fuse transformer subgraphs (attention, layer norms, GELU) into onnxruntime contrib ops.

    Changes: replaces matched subgraphs by com.microsoft Attention/SkipLayerNormalization/
        BiasGelu/... and default-domain LayerNormalization nodes (tagged ``fuse``); adds the
        com.microsoft opset import; may upgrade the default opset to 17; annotates value types
        and shapes (onnxruntime's symbolic shape inference, which knows the contrib ops) so
        that later passes (quantize) see the fused nodes' outputs as float tensors. Residual
        Adds before a LayerNorm get their projection input first (``x + attn`` -> ``attn + x``,
        exact), the order onnxruntime's attention pattern expects; SDPA-exported attention is
        put in the eager form first (``onnxopt.fusion.attention.canonicalize``).
    Preserves: graph input/output names, dtypes and shapes; producer name; other nodes.
    Guarantees: counts per fused op type in the report; the attention geometry used and where
        it came from (a note and an ``attention geometry`` record), or why it could not be
        inferred (a skip); a model where nothing matches (or that is not a transformer) is
        returned unchanged with the reason as a skip.
    Not exact: float re-association only (1e-4 / 1e-5), for 0/1 attention masks with at least
        one attended token per sequence; with ``mask_format=index_end`` the mask must be
        right-padded.
    """

    config_class = FuseConfig
    lossless = True
    tolerance = (1e-4, 1e-5)

    def call(self, model: ir.Model) -> PassReport:
        """Fuse ``model`` in place; unchanged, with the reason as a skip, when nothing matches."""
        report = self.new_report(model)
        reason = self._refusal(model)
        if reason is not None:
            report.skip(reason)
            return report
        model_type = "bert" if self.config.model_type == "auto" else self.config.model_type
        opset = model.opset_imports.get("", 0)
        heads, hidden, use_attention = self._geometry(model, report)
        work, touched = model, []
        if use_attention and heads and hidden:
            work = model.clone()  # tensors are shared; the rewrite stays off ``model``
            touched = attention.canonicalize(work.graph, attention.find_blocks(work.graph))
        try:
            proto, reordered = self._prepare(work, use_attention)
            before = _fused_counts(proto)
            keys_before = {_node_key(n.name, list(n.output)) for n in proto.graph.node}
            fused = _optimize(proto, model_type, self.config, heads, hidden, use_attention)
            unfused = {n.name for n in fused.graph.node if n.op_type == "Softmax"} & set(touched)
            if unfused:  # keep the exported form of blocks the fusion did not take
                report.note(f"{len(unfused)} of {len(touched)} SDPA attention block(s) were not fused after "
                            "the rewrite to the eager form; fused again from the exported form")
                proto, reordered = self._prepare(model, use_attention)
                keys_before = {_node_key(n.name, list(n.output)) for n in proto.graph.node}
                fused = _optimize(proto, model_type, self.config, heads, hidden, use_attention)
            elif touched:
                report.note(f"{len(touched)} SDPA-exported attention block(s) rewritten to the eager form "
                            "for onnxruntime's attention fusion (scale on the scores, no NaN guard, "
                            "no identity Reshape)")
        except Exception as err:  # third-party fusion code fails in many ways; the model is untouched
            report.skip(f"onnxruntime's {model_type} fusions failed: {type(err).__name__}: {err}")
            return report
        delta = {op: n - before.get(op, 0) for op, n in _fused_counts(fused).items()}
        delta = {op: n for op, n in delta.items() if n > 0}
        if not delta:
            report.skip(f"no {model_type} fusion pattern matched")
            return report
        if any(n.domain == _MS_DOMAIN for n in fused.graph.node) and not any(
            o.domain == _MS_DOMAIN for o in fused.opset_import
        ):
            fused.opset_import.append(onnx.helper.make_opsetid(_MS_DOMAIN, 1))
        typed = _infer_types(fused)
        if typed is None:
            report.note("onnxruntime's symbolic shape inference failed: fused outputs are untyped")
        else:
            fused = typed
        fused.producer_name = model.producer_name or ""
        fused.producer_version = model.producer_version or ""
        new = ir.serde.deserialize_model(fused)
        _transplant(new, model)
        for node in model.graph:
            if _node_key(node.name or "", [o.name or "" for o in node.outputs]) not in keys_before:
                _ir_utils.tag(node, self.name)
        if opset < _MIN_OPSET:
            report.note(f"default opset upgraded from {opset} to {_MIN_OPSET}")
        if reordered:
            report.note(f"{reordered} residual Add(s) before a LayerNorm reordered to (projection, residual) "
                        "for onnxruntime's attention pattern (exact: addition commutes)")
        for op, n in sorted(delta.items()):
            report.count(op, n)
        for node in model.graph:
            if node.op_type in ("Attention", "MultiHeadAttention") and node.domain == _MS_DOMAIN:
                report.record(node.name, op=node.op_type, num_heads=node.attributes.get_int("num_heads", 0))
        return report

    def _prepare(self, model: ir.Model, use_attention: bool) -> tuple[onnx.ModelProto, int]:
        """``model`` as a protobuf at opset >= 17 with residual Adds reordered; the number reordered."""
        proto = ir.to_proto(model)
        if model.opset_imports.get("", 0) < _MIN_OPSET:
            proto = _ir_utils.upgrade_opset_proto(proto, _MIN_OPSET)
        return proto, _projection_first(proto) if use_attention else 0

    def _geometry(self, model: ir.Model, report: PassReport) -> tuple[int, int, bool]:
        """(num_heads, hidden_size, fuse attention?): the options, completed from the graph."""
        cfg = self.config
        if not cfg.attention:
            return cfg.num_heads, cfg.hidden_size, False
        if cfg.num_heads and cfg.hidden_size:
            report.note(f"attention geometry given: num_heads={cfg.num_heads}, hidden_size={cfg.hidden_size}")
            return cfg.num_heads, cfg.hidden_size, True
        geo = attention.geometry(attention.find_blocks(model.graph))
        if geo.reason:
            if geo.blocks:  # attention is there, its geometry is not: say so, fuse the rest
                report.skip(f"attention: num_heads/hidden_size not inferred from the graph ({geo.reason}); "
                            "give num_heads= and hidden_size=")
            return cfg.num_heads, cfg.hidden_size, not geo.unsafe
        heads, hidden = cfg.num_heads or geo.num_heads, cfg.hidden_size or geo.hidden_size
        if hidden % heads:
            report.skip(f"attention: hidden_size {hidden} is not divisible by num_heads {heads} "
                        f"(the graph has {geo.num_heads} x {geo.hidden_size // geo.num_heads})")
            return cfg.num_heads, cfg.hidden_size, False
        given = "num_heads given, " if cfg.num_heads else "hidden_size given, " if cfg.hidden_size else ""
        sources = "; ".join(geo.sources)
        report.note(f"attention geometry: num_heads={heads}, hidden_size={hidden} ({given}inferred from "
                    f"{geo.blocks} attention block(s): {sources})")
        report.record("attention geometry", num_heads=heads, hidden_size=hidden, blocks=geo.blocks,
                      sources=list(geo.sources), given=[k for k in ("num_heads", "hidden_size") if getattr(cfg, k)])
        return heads, hidden, True

    def _refusal(self, model: ir.Model) -> str | None:
        """Why the pass leaves ``model`` alone, or None."""
        if self.context.target == "tensorrt":
            return "target tensorrt: TensorRT fuses attention itself and has no com.microsoft kernels"
        if _io.model_nbytes(model) > _io.PROTOBUF_LIMIT // 2:
            return "model over 1 GB: onnxruntime's optimizer works on one in-memory protobuf"
        ops = collections.Counter(n.op_type for n in model.graph if n.domain in ("", "ai.onnx"))
        if self.config.model_type == "auto" and not (ops["Softmax"] or ops["LayerNormalization"] or ops["ReduceMean"]):
            return "not a transformer: no Softmax, LayerNormalization or ReduceMean in the main graph"
        opset = model.opset_imports.get("", 0)
        if opset < _MIN_OPSET and not self.config.upgrade_opset:
            return f"default opset {opset} < {_MIN_OPSET} and upgrade_opset is off"
        return None


def _optimize(proto: onnx.ModelProto, model_type: str, cfg: FuseConfig, num_heads: int, hidden_size: int,
              use_attention: bool) -> onnx.ModelProto:
    """Run onnxruntime's Python fusions only (opt_level=0); ``proto`` is consumed."""
    # Imported here: it pulls in many fusion modules and is only needed when the pass runs.
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions(model_type)
    options.enable_attention = use_attention
    options.enable_layer_norm = cfg.layer_norm
    options.enable_skip_layer_norm = cfg.layer_norm and cfg.skip_layer_norm
    options.enable_bias_skip_layer_norm = cfg.layer_norm and cfg.skip_layer_norm
    options.enable_gelu = cfg.gelu
    options.enable_bias_gelu = cfg.gelu
    options.enable_embed_layer_norm = cfg.embed_layer_norm
    if cfg.mask_format == "none":
        options.disable_attention_mask()
    else:
        options.use_raw_attention_mask(cfg.mask_format == "raw")
    optimizer = optimize_model(
        proto,
        model_type=model_type,
        num_heads=num_heads,
        hidden_size=hidden_size,
        optimization_options=options,
        opt_level=0,
    )
    return optimizer.model


def _projection_first(proto: onnx.ModelProto) -> int:
    """Swap the inputs of residual Adds so the projection (MatMul + bias) branch comes first.

    onnxruntime's attention fusion starts from the residual Add before a LayerNorm and follows
    the first of its inputs that is an Add up to the attention output projection. A pre-LN block
    written ``x + attn(norm(x))`` right after an embedding that ends in an Add (token + position)
    sends it up the embedding instead, and that layer's attention is not fused. Hugging Face
    writes ``attn(...) + x``; this puts every graph in that order. Exact: float addition commutes.

    Returns:
        The number of Adds reordered (in ``proto``, in place).

    """
    producers = {out: node for node in proto.graph.node for out in node.output}
    # Inputs of a LayerNormalization, or of the ReduceMean that starts a decomposed one.
    consumers: collections.Counter[str] = collections.Counter(
        name for node in proto.graph.node if node.op_type in ("LayerNormalization", "ReduceMean")
        for name in node.input[:1]
    )
    initializers = {t.name for t in proto.graph.initializer}

    def is_projection(name: str) -> bool:  # Add(MatMul(...), bias initializer) in either order
        node = producers.get(name)
        if node is None or node.op_type != "Add" or len(node.input) != 2:
            return False
        kinds = {"const" if i in initializers else producers[i].op_type if i in producers else "" for i in node.input}
        return kinds in ({"MatMul", "const"}, {"MatMul", "Constant"})

    swapped = 0
    for node in proto.graph.node:
        if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or not consumers[node.output[0]]:
            continue
        if len(node.input) == 2 and is_projection(node.input[1]) and not is_projection(node.input[0]):
            node.input[0], node.input[1] = node.input[1], node.input[0]
            swapped += 1
    return swapped


def _infer_types(proto: onnx.ModelProto) -> onnx.ModelProto | None:
    """Types and shapes for every value, contrib op outputs included, or None if inference fails.

    onnx's own shape inference knows no com.microsoft schema, so without this the outputs of
    fused nodes (and everything downstream) are untyped for later passes such as quantize.
    """
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    # On incomplete inference it saves "sym_shape_infer_temp.onnx" into the working directory:
    # run it from a scratch folder so nothing lands beside the user's files.
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="onnxopt-fuse-") as scratch:
        os.chdir(scratch)
        try:
            return SymbolicShapeInference.infer_shapes(proto, auto_merge=True)
        except Exception as err:  # best effort: its failures come as many exception types
            logger.debug("symbolic shape inference failed: %s", err)
            return None
        finally:
            os.chdir(cwd)


def _node_key(name: str, outputs: list[str]) -> str:
    """Identify a node across the protobuf round trip: its name, or its first output if unnamed."""
    return name if name else "#" + (outputs[0] if outputs else "")


def _fused_counts(proto: onnx.ModelProto) -> collections.Counter[str]:
    return collections.Counter(n.op_type for n in proto.graph.node if n.op_type in FUSED_OPS)


def _transplant(source: ir.Model, target: ir.Model) -> None:
    """Make ``target`` (the pass's in-place model) hold ``source``'s graph and opsets."""
    target.graph = source.graph
    target.ir_version = max(target.ir_version, source.ir_version)
    target.functions.clear()
    target.functions.update(source.functions)
