"""Normalise how weights are stored: tensors held by Constant nodes become initializers.

Exporters store the same weight two ways: as a graph initializer, or as the ``value`` of a
``Constant`` node (Paddle, some torch exports). Passes find weights with
:func:`onnxopt._ir_utils.constant_input`, which returns initializers only, because passes write
new tensors into ``value.const_value`` and that only reaches the saved model for an initializer.
The pipeline therefore lifts Constant nodes into initializers once, before its first pass, so that
every pass sees a weight as a weight however it was stored.

Exact: an initializer and a Constant node with the same tensor define the same value (onnxruntime
turns Constant nodes into initializers itself when it loads a model); the output value keeps its
name, type and metadata, so no consumer changes. The tensor object is moved, not copied: a
memory-mapped external tensor stays mapped and is not read.

Left as nodes: a Constant whose output is a graph output (an initializer cannot be one without
becoming overridable), ``sparse_value`` and string constants (not weights), Constants inside
functions (functions have no initializers), and every Constant of a model with IR version < 4
(there every initializer must also be a graph input, i.e. overridable at run time).
Constants inside subgraphs (If/Loop/Scan bodies) become initializers of that subgraph, which
onnx's checker and onnxruntime both accept.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any

import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass

__all__ = ["LiftResult", "lift_constants"]

logger = logging.getLogger(__name__)

# Attributes whose tensor is lifted; value_string(s) and sparse_value stay in their nodes.
_LIFTED_ATTRIBUTES = frozenset({"value", "value_float", "value_floats", "value_int", "value_ints"})
# Below IR version 4 an initializer must also be listed as a graph input.
_MIN_IR_VERSION = 4


@dataclasses.dataclass
class LiftResult:
    """What :func:`lift_constants` did.

    Attributes:
        lifted: Constant nodes turned into initializers.
        elements: elements of the lifted tensors.
        nbytes: bytes of the lifted tensors.
        kept: Constant nodes left in place, by reason.
        nodes_before: nodes before lifting (main graph and subgraphs).
        nodes_after: nodes after lifting.
    """

    lifted: int = 0
    elements: int = 0
    nbytes: int = 0
    kept: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    nodes_before: int = 0
    nodes_after: int = 0

    def note(self) -> str:
        """One line for a report: what was lifted and why (empty when nothing was)."""
        if not self.lifted:
            old_ir = [k for k in self.kept if k.startswith("IR version")]
            if not old_ir:
                return ""
            return (
                f"{self.kept[old_ir[0]]} Constant nodes not lifted to initializers ({old_ir[0]}: "
                "an initializer would have to become a graph input); passes skip weights stored there"
            )
        text = (
            f"weights stored in Constant nodes: {self.lifted} lifted to initializers before the "
            f"first pass ({self.elements:,} elements, {self.nbytes:,} bytes; exact), so every "
            f"pass sees them as weights; nodes {self.nodes_before} -> {self.nodes_after}"
        )
        if self.kept:
            text += "; kept as nodes: " + ", ".join(f"{k} ({v})" for k, v in self.kept.most_common())
        return text

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable dict."""
        return {
            "lifted": self.lifted,
            "elements": self.elements,
            "bytes": self.nbytes,
            "kept": dict(self.kept),
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
        }


def lift_constants(model: ir.Model) -> LiftResult:
    """Turn the tensors of Constant nodes into initializers of the graph holding the node.

    Edits ``model`` in place; running it again changes nothing. See the module docstring for
    what is lifted and what stays a node.

    Returns:
        The counts, for the pipeline's report.
    """
    result = LiftResult(nodes_before=_node_count(model))
    constants = [n for n in model.graph.all_nodes() if _is_constant(n)]
    if model.ir_version is not None and model.ir_version < _MIN_IR_VERSION:
        if constants:
            result.kept[f"IR version {model.ir_version} < {_MIN_IR_VERSION}"] = len(constants)
        result.nodes_after = result.nodes_before
        return result
    if constants:
        _LiftPass(result)(model)
        for node in model.graph.all_nodes():
            if _is_constant(node):
                result.kept[_kept_reason(node)] += 1
    result.nodes_after = _node_count(model)
    if result.lifted:
        logger.debug("lifted %d Constant nodes (%d bytes) to initializers", result.lifted, result.nbytes)
    return result


class _LiftPass(LiftConstantsToInitializersPass):
    """onnx-ir's lifting of every size, limited to numeric tensors, counting what it lifts."""

    def __init__(self, result: LiftResult) -> None:
        super().__init__(lift_all_constants=True, size_limit=0)
        self.result = result

    def _constant_node_attribute_to_tensor(
        self, node: ir.Node, attr_name: str, attr_value: ir.Attr, initializer_name: str
    ) -> ir.TensorProtocol | None:
        if attr_name not in _LIFTED_ATTRIBUTES or attr_value.is_ref():
            return None
        if attr_name == "value" and attr_value.as_tensor().dtype == ir.DataType.STRING:
            return None
        tensor = super()._constant_node_attribute_to_tensor(node, attr_name, attr_value, initializer_name)
        if tensor is not None:
            self.result.lifted += 1
            self.result.elements += tensor.size
            self.result.nbytes += tensor.nbytes
        return tensor


def _is_constant(node: ir.Node) -> bool:
    return node.op_type == "Constant" and node.domain == ""  # onnx-ir spells ai.onnx as ""


def _kept_reason(node: ir.Node) -> str:
    if node.outputs[0].is_graph_output():
        return "output is a graph output"
    names = sorted(node.attributes)
    if len(names) != 1:
        return "not exactly one attribute"
    if names[0] == "value":
        return "string tensor"
    return f"{names[0]} attribute"


def _node_count(model: ir.Model) -> int:
    return sum(1 for _ in model.graph.all_nodes())
