"""Structured pruning surgery: remove output channels of a layer and the matching inputs downstream.

A plan pairs a producer P (group-1 Conv, Gemm, 2-D MatMul) with the single consumer C
(same kinds) its output reaches through channel-wise nodes only (BatchNormalization,
element-wise activations, pooling, and Flatten after a global pool). Channel c of P's output
feeds exactly the input channel c of C (for Conv, the kh*kw rows of c), so removing it from P's
weight and bias, from every BatchNormalization on the way, and from C's weight removes the
channel from the computation without touching anything else. What changes at C's output is
the removed channels' contribution; :mod:`onnxopt.compress.repair` re-fits C on calibration data.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from onnxopt import _ir_utils
from onnxopt.compress import repair

__all__ = ["ChannelPlan", "apply_plan", "find_plans"]

logger = logging.getLogger(__name__)

_ELEMENTWISE = frozenset({
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "HardSigmoid",
    "HardSwish", "Gelu", "Softplus", "Softsign", "Mish", "Identity", "Dropout", "Clip",
})
_POOL = frozenset({"MaxPool", "AveragePool", "LpPool"})
_GLOBAL_POOL = frozenset({"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})


@dataclasses.dataclass
class ChannelPlan:
    """Producer layer, the channel-wise nodes after it, and the consumer layer."""

    producer: repair.Layer
    chain: list[ir.Node]
    consumer: repair.Layer
    channels: int

    def in_axis(self) -> int:
        """Axis of the consumer's weight that indexes its input channels."""
        return {"conv": 1, "gemm_t": 1, "gemm": 0, "matmul": 0}[self.consumer.kind]


def find_plans(model: ir.Model, producers: list[ir.Node]) -> tuple[list[ChannelPlan], list[str]]:
    """Return a plan for each producer that can be pruned and a reason for each that cannot."""
    plans, reasons = [], []
    for node in producers:
        found = _plan(node)
        if isinstance(found, str):
            reasons.append(found)
        else:
            plans.append(found)
    return plans, reasons


def _plan(node: ir.Node) -> ChannelPlan | str:
    prod = repair.as_layer(node)
    if isinstance(prod, str):
        return prod
    if len(prod.weight.uses()) != 1:
        return "weight is shared by several nodes"
    channels = prod.weight.const_value.shape[prod.out_axis]
    if prod.kind != "matmul" and len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = _ir_utils.constant_input(node, 2)
        if bias is None or bias.const_value.size != channels or len(bias.uses()) != 1:
            return "bias is not a per-channel constant of its own"
    chain: list[ir.Node] = []
    value = node.outputs[0]
    pooled = prod.kind != "conv"  # 2-D outputs: Flatten is the identity
    while True:
        if value.is_graph_output():
            return "output reaches a graph output"
        uses = list(value.uses())
        if len(uses) != 1:
            return "output has several consumers (branch)"
        user = uses[0].node
        if uses[0].idx != 0:
            return f"output feeds input {uses[0].idx} of {user.op_type}"
        if user.op_type in ("Conv", "Gemm", "MatMul") and user.domain in ("", "ai.onnx"):
            cons = repair.as_layer(user)
            if isinstance(cons, str):
                return f"consumer: {cons}"
            if len(cons.weight.uses()) != 1:
                return "consumer weight is shared"
            axis = {"conv": 1, "gemm_t": 1, "gemm": 0, "matmul": 0}[cons.kind]
            if cons.weight.const_value.shape[axis] != channels:
                return "consumer input channels do not match"
            if (cons.kind == "conv") != (prod.kind == "conv" and not pooled):
                return "layout changes between producer and consumer"
            return ChannelPlan(prod, chain, cons, channels)
        reason = _chain_reason(user, pooled)
        if reason:
            return reason
        pooled = pooled or user.op_type in _GLOBAL_POOL
        chain.append(user)
        value = user.outputs[0]


def _chain_reason(node: ir.Node, pooled: bool) -> str | None:
    if node.domain not in ("", "ai.onnx"):
        return f"path goes through {node.domain}::{node.op_type}"
    if node.op_type == "BatchNormalization":
        if any(_ir_utils.constant_input(node, i) is None for i in range(1, 5)):
            return "BatchNormalization parameters are not constant"
        if any(len(node.inputs[i].uses()) != 1 for i in range(1, 5)):
            return "BatchNormalization parameters are shared"
        return None
    if node.op_type == "PRelu" or (node.op_type == "Clip" and len(node.inputs) > 1):
        extra = [v for v in node.inputs[1:] if v is not None]
        if any(v.const_value is None or v.const_value.size != 1 for v in extra):
            return f"{node.op_type} with per-channel parameters"
        return None
    if node.op_type in _ELEMENTWISE or node.op_type in _POOL or node.op_type in _GLOBAL_POOL:
        return None
    if node.op_type == "Flatten" and pooled:
        return None
    return f"path goes through {node.op_type}"


def channel_scores(plan: ChannelPlan, norm: str) -> np.ndarray:
    """Score each output channel: weight norm, times |BN scale| / sqrt(var + eps)."""
    w = plan.producer.weight.const_value.numpy().astype(np.float64)
    rows = np.moveaxis(w, plan.producer.out_axis, 0).reshape(plan.channels, -1)
    score = np.abs(rows).sum(axis=1) if norm == "l1" else np.sqrt((rows**2).sum(axis=1))
    for node in plan.chain:
        if node.op_type == "BatchNormalization":
            scale = node.inputs[1].const_value.numpy().astype(np.float64)
            var = node.inputs[4].const_value.numpy().astype(np.float64)
            score = score * np.abs(scale) / np.sqrt(var + node.attributes.get_float("epsilon", 1e-5))
    return score


def apply_plan(
    graph: ir.Graph, plan: ChannelPlan, keep: np.ndarray, stats: repair.LayerStats | None, pass_name: str
) -> str:
    """Remove the channels not in ``keep`` (bool mask); re-fit the consumer from ``stats``."""
    prod, cons = plan.producer, plan.consumer
    _slice(prod.weight, prod.out_axis, keep)
    bias = _ir_utils.constant_input(prod.node, 2) if prod.kind != "matmul" else None
    if bias is not None and bias.const_value.size == plan.channels and len(bias.uses()) == 1:
        _slice(bias, 0, keep)
    elif prod.kind != "matmul" and len(prod.node.inputs) > 2 and prod.node.inputs[2] is not None:
        raise ValueError(f"{prod.node.name}: bias is not a per-channel constant")  # excluded by find_plans
    for node in plan.chain:
        if node.op_type == "BatchNormalization":
            for i in range(1, 5):
                _slice(node.inputs[i], 0, keep)
    for value in [prod.node.outputs[0]] + [n.outputs[0] for n in plan.chain]:
        value.shape = None  # channel dim changed; shape inference fills it again
    for node in (prod.node, *plan.chain, cons.node):
        _ir_utils.tag(node, pass_name)
    w = cons.weight.const_value.numpy()
    if stats is None:
        _slice(cons.weight, plan.in_axis(), keep)
        return "not repaired"
    rows = np.repeat(keep, int(np.prod(w.shape[2:]))) if cons.kind == "conv" else keep
    new_wm, delta = repair.refit_rows(stats, cons.matrix(w.astype(np.float64)), rows)
    new_shape = list(w.shape)
    new_shape[plan.in_axis()] = int(keep.sum())
    if cons.kind == "conv":
        new_w = new_wm.T.reshape(new_shape)
    else:
        new_w = new_wm.T if cons.kind == "gemm_t" else new_wm
    cons.weight.const_value = ir.tensor(new_w.astype(w.dtype), name=cons.weight.name)
    cons.weight.shape = ir.Shape(new_w.shape)
    return "repaired; bias " + repair.add_bias(graph, cons, delta, pass_name)


def _slice(value: ir.Value, axis: int, keep: np.ndarray) -> None:
    arr = np.compress(keep, value.const_value.numpy(), axis=axis)
    value.const_value = ir.tensor(arr, name=value.name)
    value.shape = ir.Shape(arr.shape)
