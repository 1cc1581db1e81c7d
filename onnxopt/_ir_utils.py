"""Graph helpers shared by passes: node iteration, constants, names, provenance."""

from __future__ import annotations

import collections
import functools
from collections.abc import Iterable, Iterator

import numpy as np
import onnx
import onnx.version_converter
import onnx_ir as ir
from onnx_ir.passes.common import _c_api_utils

__all__ = [
    "PROVENANCE_KEY",
    "constant_array",
    "constant_input",
    "from_constant_node",
    "infer_types",
    "is_float_dtype",
    "iter_nodes",
    "op_counts",
    "parameter_count",
    "tag",
    "unique_name",
    "upgrade_opset",
    "upgrade_opset_proto",
]

PROVENANCE_KEY = "pkg.onnxopt.pass"


def iter_nodes(
    model: ir.Model, op_types: Iterable[str] | None = None, *, subgraphs: bool = True
) -> Iterator[ir.Node]:
    """Yield the nodes of the main graph (and its subgraphs), default ONNX domain only if filtered.

    The list is materialised first, so the caller may edit the graph while iterating.
    """
    wanted = frozenset(op_types) if op_types is not None else None
    nodes = list(model.graph.all_nodes()) if subgraphs else list(model.graph)
    for node in nodes:
        if wanted is None or (node.op_type in wanted and node.domain in ("", "ai.onnx")):
            yield node


def constant_input(node: ir.Node, index: int) -> ir.Value | None:
    """Return input ``index`` of ``node`` if it is an initializer with a value, else ``None``.

    Graph inputs that are also initializers (overridable at run time) are not constants. The
    output of a Constant node is not returned either: passes write new tensors into
    ``value.const_value``, which reaches the saved model only for an initializer. The pipeline
    lifts Constant nodes into initializers before its first pass (:mod:`onnxopt.normalize`);
    :func:`from_constant_node` tells a caller that skips such a value why.
    """
    if index >= len(node.inputs):
        return None
    value = node.inputs[index]
    if value is None or value.const_value is None or not value.is_initializer():
        return None
    if value.is_graph_input():
        return None
    return value


def from_constant_node(value: ir.Value | None) -> bool:
    """Whether ``value`` is the output of a Constant node (a weight not lifted to an initializer)."""
    producer = value.producer() if value is not None else None
    return producer is not None and producer.op_type == "Constant" and producer.domain == ""


def constant_array(value: ir.Value) -> np.ndarray:
    """The numpy array of a constant value (raises if it has none)."""
    if value.const_value is None:
        raise ValueError(f"value {value.name!r} is not a constant")
    return value.const_value.numpy()


def is_float_dtype(dtype: ir.DataType | None) -> bool:
    """True for float32/float16/bfloat16/float64."""
    return dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)


def unique_name(graph: ir.Graph, base: str, taken: set[str] | None = None) -> str:
    """A value name derived from ``base`` that no value in ``graph`` (or ``taken``) uses yet."""
    used = taken if taken is not None else _value_names(graph)
    name = base
    i = 1
    while name in used:
        name = f"{base}_{i}"
        i += 1
    used.add(name)
    return name


def upgrade_opset_proto(proto: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """``proto`` converted to default opset ``target`` by onnx's version converter, node names kept.

    The converter re-creates some nodes without their names and splits others (Softmax-11 ->
    Softmax-13 + Reshape); each gets back the name of the node that made its first output, made
    unique (onnxruntime refuses a model with two nodes of one name).
    """
    names = {n.output[0]: n.name for n in proto.graph.node if n.name and n.output}
    converted = onnx.version_converter.convert_version(proto, target)
    taken = {n.name for n in converted.graph.node if n.name}
    for node in converted.graph.node:
        if not node.name and node.output and node.output[0] in names:
            base = names[node.output[0]]
            name = base
            i = 1
            while name in taken:
                name = f"{base}_{i}"
                i += 1
            node.name = name
            taken.add(name)
    return converted


def upgrade_opset(model: ir.Model, target: int) -> bool:
    """Upgrade ``model``'s default opset to ``target`` in place (names kept); False if already there."""
    if model.opset_imports.get("", 0) >= target:
        return False
    model.graph = ir.from_proto(upgrade_opset_proto(ir.to_proto(model), target)).graph
    return True


def _value_names(graph: ir.Graph) -> set[str]:
    names = {v.name for v in graph.inputs if v.name}
    names |= set(graph.initializers)
    for node in graph.all_nodes():
        names |= {v.name for v in node.outputs if v.name}
    return names


def tag(node: ir.Node, pass_name: str) -> ir.Node:
    """Mark ``node`` as created by ``pass_name`` (read back by ``onnxopt inspect``)."""
    node.metadata_props[PROVENANCE_KEY] = pass_name
    return node


def op_counts(model: ir.Model) -> collections.Counter[str]:
    """Counter of op types over the main graph and all subgraphs."""
    return collections.Counter(n.op_type for n in model.graph.all_nodes())


def parameter_count(model: ir.Model) -> tuple[int, int]:
    """(number of parameters, bytes) over the initializers of the main graph and its subgraphs."""
    params = 0
    nbytes = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None:
                continue
            params += tensor.size
            nbytes += tensor.nbytes
    return params, nbytes


def infer_types(model: ir.Model, *, strict: bool = False) -> int:
    """Fill in missing value types and shapes with ``onnx.shape_inference``; returns how many.

    Unlike onnx-ir's ShapeInferencePass, which sets ``dtype`` and so turns sequence and
    optional values into tensors, this copies whole types and only where a value has none, so
    it never rewrites what the model declares. Large weights are left out of the proto that
    goes to the C API (onnx-ir's helper), so models over 2 GB work too.

    Raises:
        onnx.shape_inference.InferenceError: only with ``strict=True``.
    """
    infer = functools.partial(
        onnx.shape_inference.infer_shapes, check_type=False, strict_mode=strict, data_prop=True
    )
    inferred = ir.serde.deserialize_model(_c_api_utils.call_onnx_api(infer, model))
    filled = 0
    for graph, inferred_graph in zip(model.graphs(), inferred.graphs()):
        known = ir.convenience.create_value_mapping(inferred_graph)
        for name, value in ir.convenience.create_value_mapping(graph).items():
            new = known.get(name)
            if new is None:
                continue
            if value.type is None and new.type is not None:
                value.type = new.type
                filled += 1
            if value.shape is None and new.shape is not None and value.type == new.type:
                value.shape = new.shape
                filled += 1
    return filled
