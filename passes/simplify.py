"""Simplify: exact graph clean-ups and BatchNormalization folded into Conv/Gemm weights.

Algebra of the fold: BatchNormalization(y) = s * y + (B - mean * s), with
s = scale / sqrt(var + eps) per channel. For y = Conv(x, W, b): s * y = Conv(x, s * W, s * b),
so W' = s * W (per output channel) and b' = s * (b - mean) + B. For Gemm the same holds along
its output features, with beta folded into the new bias. Outputs change only by float rounding.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.optimizer import fold_constants

from onnxopt import _ir_utils
from onnxopt.config import option
from onnxopt.pass_base import OptPass, PassReport, register

__all__ = ["SimplifyConfig", "SimplifyPass"]

logger = logging.getLogger(__name__)


# onnxscript's folder rewrites these without regard to the opset (Unsqueeze with an axes input
# at opset 11) and crashes on a SplitToSequence whose split is a graph input (conformance run).
_SEQUENCE_OPS = frozenset({
    "ConcatFromSequence", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase",
    "SequenceInsert", "SequenceLength", "SequenceMap", "SplitToSequence",
})


@dataclasses.dataclass(frozen=True)
class SimplifyConfig:
    """Options of the simplify pass."""

    fold_constants: bool = option(True, "evaluate nodes whose inputs are all constant")
    fold_batchnorm: bool = option(True, "fold BatchNormalization into a preceding Conv/Gemm")
    cse: bool = option(True, "merge identical nodes (common subexpression elimination)")
    max_fold_elements: int = option(1 << 20, "largest constant (elements) folding may create")

    def __post_init__(self) -> None:
        if self.max_fold_elements < 0:
            raise ValueError(f"max_fold_elements must be >= 0, got {self.max_fold_elements}")


@register("simplify")
class SimplifyPass(OptPass[SimplifyConfig]):
    """Constant folding, Identity/dead-node removal, CSE, initializer dedup, BatchNorm folding.

    Changes: removes nodes and initializers; replaces Conv/Gemm weights and biases where a
        BatchNormalization is folded (new initializers ``<W>_bnfold``, ``<b>_bnfold``).
    Preserves: graph input/output names, dtypes and shapes; opset imports; subgraphs.
    Guarantees: the model is never larger in node count; each fold is counted in the report.
    Not exact: folds re-associate float arithmetic (tolerance "fp32 re-association", 1e-4/1e-5).
    """

    config_class = SimplifyConfig
    lossless = True
    tolerance = (1e-4, 1e-5)

    def call(self, model: ir.Model) -> PassReport:
        report = self.new_report(model)
        nodes_before = sum(1 for _ in model.graph.all_nodes())
        inits_before = sum(len(g.initializers) for g in model.graphs())
        cfg = self.config
        if model.functions:
            common.InlinePass()(model)
            report.count("functions_inlined", 0)
        sequence_ops = sorted({n.op_type for n in model.graph.all_nodes() if n.op_type in _SEQUENCE_OPS})
        if cfg.fold_constants and sequence_ops:
            report.skip(f"constant folding skipped: sequence ops ({', '.join(sequence_ops)})")
        elif cfg.fold_constants:
            fold_constants(
                model,
                onnx_shape_inference=False,
                input_size_limit=cfg.max_fold_elements,
                output_size_limit=cfg.max_fold_elements,
            )
        cleanup = [
            _IdentityEliminationPass(),
            common.RemoveUnusedNodesPass(),
            common.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=16),
        ]
        ir.passes.Sequential(*cleanup)(model)
        if cfg.fold_batchnorm:
            for node in list(model.graph):
                if node.op_type == "BatchNormalization" and node.domain == "":
                    reason = _fold_batchnorm(model.graph, node, self.name)
                    if reason is None:
                        report.count("batchnorm_folded")
                    else:
                        report.skip(f"BatchNormalization not folded: {reason}")
        tail = [common.RemoveUnusedNodesPass(), common.DeduplicateInitializersPass()]
        if cfg.cse:
            tail.append(common.CommonSubexpressionEliminationPass())
        tail += [common.RemoveUnusedNodesPass(), common.TopologicalSortPass()]
        ir.passes.Sequential(*tail)(model)
        nodes_after = sum(1 for _ in model.graph.all_nodes())
        inits_after = sum(len(g.initializers) for g in model.graphs())
        report.count("nodes_removed", max(nodes_before - nodes_after, 0))
        report.count("initializers_removed", max(inits_before - inits_after, 0))
        return report


class _IdentityEliminationPass(common.IdentityEliminationPass):
    """onnx-ir's Identity elimination, except ``y = Identity(x)`` where x and y are both outputs.

    onnx-ir then makes one value two graph outputs (a Scan/Loop body's state and its scan output,
    or two model outputs) and drops a name; onnxruntime computes such Scan bodies wrongly.
    """

    def _try_eliminate_identity_node(self, node: ir.Node) -> bool:
        if node.op_type == "Identity" and node.domain == "" and len(node.inputs) == 1:
            source = node.inputs[0]
            if source is not None and source.is_graph_output() and node.outputs[0].is_graph_output():
                return False
        return super()._try_eliminate_identity_node(node)


def _fold_batchnorm(graph: ir.Graph, bn: ir.Node, pass_name: str) -> str | None:
    """Fold ``bn`` into the Conv/Gemm producing its input; a reason string when not possible."""
    if len([o for o in bn.outputs if o.name]) > 1 or bn.attributes.get_int("training_mode", 0):
        return "training mode"
    producer = bn.inputs[0].producer() if bn.inputs[0] is not None else None
    if producer is None or producer.op_type not in ("Conv", "Gemm") or producer.domain != "":
        return "input is not produced by Conv or Gemm"
    if len(bn.inputs[0].uses()) != 1 or bn.inputs[0].is_graph_output():
        return "Conv/Gemm output has other users"
    params = [_ir_utils.constant_input(bn, i) for i in range(1, 5)]
    if any(p is None for p in params):
        return "BatchNormalization parameters are not constant"
    weight = _ir_utils.constant_input(producer, 1)
    if weight is None:
        return "weight is not a constant initializer"
    bias = _ir_utils.constant_input(producer, 2) if len(producer.inputs) > 2 else None
    if len(producer.inputs) > 2 and producer.inputs[2] is not None and bias is None:
        return "bias is not a constant initializer"
    scale, b_bn, mean, var = (_ir_utils.constant_array(p).astype(np.float64) for p in params)
    eps = bn.attributes.get_float("epsilon", 1e-5)
    s = scale / np.sqrt(var + eps)
    w = _ir_utils.constant_array(weight)
    dtype = w.dtype
    w64 = w.astype(np.float64)
    n_out = s.shape[0]
    if producer.op_type == "Conv":
        if w.shape[0] != n_out:
            return f"weight has {w.shape[0]} output channels, BatchNormalization {n_out}"
        new_w = w64 * s.reshape((-1,) + (1,) * (w.ndim - 1))
        old_b = _ir_utils.constant_array(bias).astype(np.float64) if bias is not None else np.zeros(n_out)
        new_b = s * (old_b - mean) + b_bn
    else:
        if producer.attributes.get_int("transA", 0) not in (0, 1) or w.ndim != 2:
            return "Gemm weight is not 2-D"
        trans_b = producer.attributes.get_int("transB", 0)
        if (w.shape[0] if trans_b else w.shape[1]) != n_out:
            return "Gemm output features do not match BatchNormalization channels"
        new_w = w64 * (s[:, None] if trans_b else s[None, :])
        beta = producer.attributes.get_float("beta", 1.0)
        old_c = _ir_utils.constant_array(bias).astype(np.float64) if bias is not None else np.zeros(n_out)
        if old_c.size not in (1, n_out):
            return "Gemm bias is not per output feature"
        old_b = np.broadcast_to(old_c.reshape(-1), (n_out,)) * beta
        new_b = s * (old_b - mean) + b_bn
        producer.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
    w_value = ir.Value(name=f"{weight.name}_bnfold", const_value=ir.tensor(new_w.astype(dtype)))
    b_value = ir.Value(name=f"{(bias.name if bias is not None else weight.name + '_bias')}_bnfold",
                       const_value=ir.tensor(new_b.astype(dtype)))
    for v in (w_value, b_value):
        v.name = _ir_utils.unique_name(graph, v.name)
        v.shape = ir.Shape(v.const_value.shape)
        v.dtype = v.const_value.dtype
        graph.register_initializer(v)
    producer.replace_input_with(1, w_value)
    if len(producer.inputs) > 2:
        producer.replace_input_with(2, b_value)
    else:
        producer.resize_inputs(3)
        producer.replace_input_with(2, b_value)
    _ir_utils.tag(producer, pass_name)
    old, new = bn.outputs[0], producer.outputs[0]
    keep_name = old.name if old.is_graph_output() else None
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    if keep_name is not None:  # a graph output keeps its name
        old.name = None
        new.name = keep_name
    graph.remove(bn, safe=True)
    return None
