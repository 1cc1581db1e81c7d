"""INT8 embedding tables: Gather from an int8 table with one scale per row.

Algebra: a table ``E[V, D]`` (word embeddings: 30522 x 384 floats, half of a MiniLM file) is
stored as ``q[V, D]`` int8 and ``s[V, 1]`` float32 with ``s_v = max|E_v| / 127``, so every row
keeps its own grid and ``|E_v - q_v * s_v| <= s_v / 2`` elementwise. ``Gather(E, ids)`` becomes::

    Cast<float>(Gather(q, ids)) * Gather(s, ids)

which reads only the gathered rows: a DequantizeLinear of the whole table (axis 0) would
dequantize all V rows on every run. The file holds ``V * (D + 4)`` bytes instead of ``4 V D``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxopt import _ir_utils

__all__ = ["EmbeddingResult", "quantize_embeddings"]

_TINY = np.float32(1e-12)


@dataclasses.dataclass
class EmbeddingResult:
    """Tables quantized (name -> (rows, columns, max relative row error)) and bytes saved."""

    tables: dict[str, tuple[int, int, float]] = dataclasses.field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0


def _candidates(model: ir.Model, min_rows: int, allowed: Callable[[ir.Node], bool]) -> list[ir.Node]:
    nodes = []
    for node in model.graph:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or not allowed(node):
            continue
        table = _ir_utils.constant_input(node, 0)
        if table is None or node.attributes.get("axis") is not None and node.attributes["axis"].value != 0:
            continue
        shape = table.shape
        if shape is None or len(shape) != 2 or not isinstance(shape[0], int) or shape[0] < min_rows:
            continue
        if table.dtype != ir.DataType.FLOAT:
            continue
        nodes.append(node)
    return nodes


def quantize_embeddings(
    model: ir.Model,
    *,
    min_rows: int = 1024,
    pass_name: str = "quantize",
    allowed: Callable[[ir.Node], bool] = lambda node: True,
) -> EmbeddingResult:
    """Rewrite every ``Gather(E, ids)`` (axis 0) on a constant float table of >= ``min_rows`` rows
    (and for which ``allowed`` is true: the caller's node selection).

    A table also read by other nodes (a tied output projection) keeps its float copy for them.
    """
    result = EmbeddingResult()
    graph = model.graph
    taken = _ir_utils._value_names(graph) | {n.name for n in graph.all_nodes() if n.name}
    done: dict[ir.Value, tuple[ir.Value, ir.Value]] = {}
    for node in _candidates(model, min_rows, allowed):
        table = node.inputs[0]
        if table not in done:
            e = _ir_utils.constant_array(table)
            absmax = np.abs(e).max(axis=1, keepdims=True)
            scales = np.maximum(absmax / 127.0, _TINY).astype(np.float32)
            q = np.clip(np.rint(e / scales), -127, 127).astype(np.int8)
            err = np.abs(q * scales - e).max(axis=1) / np.maximum(absmax[:, 0], _TINY)
            values = []
            for suffix, array in (("_q8", q), ("_row_s", scales)):
                name = _ir_utils.unique_name(graph, f"{table.name}{suffix}", taken)
                value = ir.Value(name=name, shape=ir.Shape(array.shape),
                                 type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                                 const_value=ir.Tensor(array, name=name))
                graph.register_initializer(value)
                values.append(value)
            done[table] = (values[0], values[1])
            result.tables[table.name] = (int(e.shape[0]), int(e.shape[1]), float(err.max()))
            result.bytes_before += e.nbytes
            result.bytes_after += q.nbytes + scales.nbytes
        q_v, s_v = done[table]
        ids = node.inputs[1]
        label = node.name or "Gather"
        new_nodes = []

        def add(op: str, inputs: list[ir.Value], base: str, **attrs: object) -> ir.Value:
            name = _ir_utils.unique_name(graph, base, taken)
            n = ir.node(op, inputs, attributes=attrs, name=name)
            n.outputs[0].name = name
            _ir_utils.tag(n, pass_name)
            new_nodes.append(n)
            return n.outputs[0]

        rows = add("Gather", [q_v, ids], f"{label}_q8", axis=0)
        row_scales = add("Gather", [s_v, ids], f"{label}_row_s", axis=0)
        rows_f = add("Cast", [rows], f"{label}_f", to=ir.DataType.FLOAT)
        final = ir.node("Mul", [rows_f, row_scales], name=label)
        _ir_utils.tag(final, pass_name)
        graph.insert_before(node, [*new_nodes, final])
        out = node.outputs[0]
        out_name = out.name
        ir.convenience.replace_all_uses_with(out, final.outputs[0], replace_graph_outputs=True)
        graph.remove(node, safe=True)
        final.outputs[0].name = out_name
        final.outputs[0].type, final.outputs[0].shape = out.type, out.shape
    for table in done:
        if not table.uses() and not table.is_graph_output() and table.name in graph.initializers:
            graph.initializers.pop(table.name)
    return result
