"""Simplify: exact graph clean-ups; BatchNormalization and per-channel Mul/Add folded into Conv/Gemm.

Algebra of the fold: BatchNormalization(y) = s * y + (B - mean * s), with
s = scale / sqrt(var + eps) per channel. For y = Conv(x, W, b): s * y = Conv(x, s * W, s * b),
so W' = s * W (per output channel) and b' = s * (b - mean) + B. For Gemm the same holds along
its output features, with beta folded into the new bias. A Mul by a per-channel constant c is the
same fold with s = c and no shift; an Add of a per-channel constant t shifts the bias only
(re-parameterisable blocks such as MobileOne export their branch scales this way, and a quantizer
would otherwise insert a Q/DQ pair after the Conv, the Mul and the Add). Outputs change only by
float rounding.
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
    fold_affine: bool = option(True, "fold Mul/Add by per-channel constants into a preceding Conv/Gemm")
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
            inlined = len(model.functions)
            common.InlinePass()(model)
            report.count("functions_inlined", inlined - len(model.functions))
        sequence_ops = sorted({n.op_type for n in model.graph.all_nodes() if n.op_type in _SEQUENCE_OPS})
        if cfg.fold_constants and sequence_ops:
            report.skip(f"constant folding skipped: sequence ops ({', '.join(sequence_ops)})")
        elif cfg.fold_constants:
            grown = _folding_grows_weights(model, cfg.max_fold_elements)
            if grown > 0:
                report.skip(
                    f"constant folding skipped: it would add {grown:,} weight bytes (folded copies of "
                    "weights that other nodes still read)"
                )
            else:
                _fold(model, cfg.max_fold_elements)
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
        if cfg.fold_affine:
            for node in list(model.graph):
                if node.op_type in ("Mul", "Add") and node.domain == "" and _fold_affine(model.graph, node, self.name):
                    report.count("affine_folded")
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


def _fold(model: ir.Model, max_elements: int) -> None:
    def should_fold(node: ir.Node) -> bool | None:
        # onnxscript keeps every ConstantOfShape (it may make a large tensor from a small one); a
        # constant shape of at most max_elements is folded, so a chain that computes Pad's pads
        # from constants (torch's F.pad export) becomes one constant and shape inference sees it.
        if node.op_type != "ConstantOfShape" or node.domain not in ("", "ai.onnx"):
            return None
        shape = node.inputs[0].const_value if node.inputs and node.inputs[0] is not None else None
        return True if shape is not None and int(np.prod(shape.numpy())) <= max_elements else None

    fold_constants(
        model, onnx_shape_inference=False, input_size_limit=max_elements, output_size_limit=max_elements,
        should_fold=should_fold,
    )


def _folding_grows_weights(model: ir.Model, max_elements: int) -> int:
    """Weight bytes constant folding would add (> 0: it folds copies of weights still read
    elsewhere, e.g. Unsqueeze(W) beside W in both branches of an If), tried on a clone."""
    trial = model.clone()  # tensors are shared, nodes copied: cheap
    _fold(trial, max_elements)
    ir.passes.Sequential(common.RemoveUnusedNodesPass(), common.DeduplicateInitializersPass())(trial)
    return _ir_utils.parameter_count(trial)[1] - _ir_utils.parameter_count(model)[1]


class _IdentityEliminationPass(common.IdentityEliminationPass):
    """onnx-ir's Identity elimination, except where ``y = Identity(x)`` must stay.

    - x and y are both outputs: onnx-ir then makes one value two graph outputs (a Scan/Loop
      body's state and its scan output, or two model outputs) and drops a name; onnxruntime
      computes such Scan bodies wrongly.
    - y is a graph output and x is not made by a node of the same graph (an outer-scope value,
      an initializer or a graph input): in an If/Loop/Scan body the output would then name a
      value no node of the body produces, which the checker refuses (silero VAD's If branches
      end this way); in the main graph the Identity costs nothing.
    """

    def _try_eliminate_identity_node(self, node: ir.Node) -> bool:
        if node.op_type == "Identity" and node.domain == "" and len(node.inputs) == 1:
            source = node.inputs[0]
            output = node.outputs[0]
            if source is not None and source.is_graph_output() and output.is_graph_output():
                return False
            if source is not None and output.is_graph_output():
                producer = source.producer()
                if producer is None or producer.graph is not node.graph:
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
    s = scale / np.sqrt(var + bn.attributes.get_float("epsilon", 1e-5))
    return _fold_into(graph, bn, producer, s, b_bn - mean * s, pass_name, "_bnfold")


def _fold_affine(graph: ir.Graph, node: ir.Node, pass_name: str) -> bool:
    """Fold ``y = Conv/Gemm(...) * c`` or ``+ c`` (c constant per output channel); whether it did."""
    for i in (0, 1):
        x, const = node.inputs[i], _constant(node, 1 - i)
        producer = x.producer() if x is not None else None
        if const is None or producer is None or producer.op_type not in ("Conv", "Gemm") or producer.domain != "":
            continue
        if len(x.uses()) != 1 or x.is_graph_output() or len(producer.outputs) != 1:
            return False
        weight = _ir_utils.constant_input(producer, 1)
        if weight is None or producer.inputs[0] is None:
            return False
        if len(producer.inputs) > 2 and producer.inputs[2] is not None and _ir_utils.constant_input(producer, 2) is None:
            return False
        w = _ir_utils.constant_array(weight)
        c = _ir_utils.constant_array(const)
        n_out = _out_channels(producer, w)
        per_channel = _per_channel(c, rank=w.ndim if producer.op_type == "Conv" else 2, n_out=n_out)
        if per_channel is None or c.dtype != w.dtype or n_out is None:
            return False
        if node.op_type == "Mul":
            s, t = per_channel, np.zeros(n_out)
        else:
            s, t = np.ones(n_out), per_channel
        return _fold_into(graph, node, producer, s, t, pass_name, "_affinefold") is None
    return False


def _constant(node: ir.Node, index: int) -> ir.Value | None:
    """Return a constant initializer, or the output of a Constant node with a known value (read only).

    A direct call on an un-lifted model keeps Constant nodes of < 16 elements (the pipeline
    lifts every one first, :mod:`onnxopt.normalize`); constant folding gives them a value.
    """
    value = node.inputs[index]
    if _ir_utils.from_constant_node(value) and value.const_value is not None:
        return value
    return _ir_utils.constant_input(node, index)


def _out_channels(producer: ir.Node, w: np.ndarray) -> int | None:
    if producer.op_type == "Conv":
        return int(w.shape[0])
    if w.ndim != 2 or producer.attributes.get_int("transA", 0):
        return None
    return int(w.shape[0] if producer.attributes.get_int("transB", 0) else w.shape[1])


def _per_channel(c: np.ndarray, rank: int, n_out: int | None) -> np.ndarray | None:
    """``c`` as a float64 vector over output channels (axis 1 of a rank-``rank`` output), or None."""
    if n_out is None or c.ndim > rank or not np.issubdtype(c.dtype, np.floating):
        return None
    shape = (1,) * (rank - c.ndim) + c.shape
    if any(d != 1 for k, d in enumerate(shape) if k != 1) or shape[1] not in (1, n_out):
        return None
    return np.broadcast_to(c.astype(np.float64).reshape(-1), (n_out,)).copy()


def _fold_into(graph: ir.Graph, node: ir.Node, producer: ir.Node, s: np.ndarray, t: np.ndarray,
               pass_name: str, suffix: str) -> str | None:
    """Replace ``node(producer(x))`` = ``s * producer(x) + t`` (per output channel) by ``producer``."""
    weight = _ir_utils.constant_input(producer, 1)
    bias = _ir_utils.constant_input(producer, 2) if len(producer.inputs) > 2 else None
    w = _ir_utils.constant_array(weight)
    dtype = w.dtype
    w64 = w.astype(np.float64)
    n_out = s.shape[0]
    if producer.op_type == "Conv":
        if w.shape[0] != n_out:
            return f"weight has {w.shape[0]} output channels, the folded node {n_out}"
        new_w = w64 * s.reshape((-1,) + (1,) * (w.ndim - 1))
        old_b = _ir_utils.constant_array(bias).astype(np.float64) if bias is not None else np.zeros(n_out)
    else:
        if producer.attributes.get_int("transA", 0) not in (0, 1) or w.ndim != 2:
            return "Gemm weight is not 2-D"
        trans_b = producer.attributes.get_int("transB", 0)
        if (w.shape[0] if trans_b else w.shape[1]) != n_out:
            return "Gemm output features do not match the folded node's channels"
        new_w = w64 * (s[:, None] if trans_b else s[None, :])
        beta = producer.attributes.get_float("beta", 1.0)
        old_c = _ir_utils.constant_array(bias).astype(np.float64) if bias is not None else np.zeros(n_out)
        if old_c.size not in (1, n_out):
            return "Gemm bias is not per output feature"
        old_b = np.broadcast_to(old_c.reshape(-1), (n_out,)) * beta
        producer.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
    new_b = s * old_b + t
    def renamed(name: str) -> str:  # a second fold into the same Conv keeps one suffix (unique_name numbers it)
        return name if name.endswith(suffix) else name + suffix

    w_value = ir.Value(name=renamed(weight.name), const_value=ir.tensor(new_w.astype(dtype)))
    b_value = ir.Value(name=renamed(bias.name if bias is not None else weight.name + "_bias"),
                       const_value=ir.tensor(new_b.astype(dtype)))
    for v in (w_value, b_value):
        v.name = _ir_utils.unique_name(graph, v.name)
        v.shape = ir.Shape(v.const_value.shape)
        v.dtype = v.const_value.dtype
        graph.register_initializer(v)
    producer.replace_input_with(1, w_value)
    if len(producer.inputs) <= 2:
        producer.resize_inputs(3)
    producer.replace_input_with(2, b_value)
    _ir_utils.tag(producer, pass_name)
    old, new = node.outputs[0], producer.outputs[0]
    keep_name = old.name if old.is_graph_output() else None
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    if keep_name is not None:  # a graph output keeps its name
        old.name = None
        new.name = keep_name
    graph.remove(node, safe=True)
    return None
