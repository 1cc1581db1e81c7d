"""One graph that answers every plan trial: per-group precision switches as boolean graph inputs.

Building a plan's model for real (quantize a clone, serialise it, let onnxruntime load and
optimise it) costs far more than running it: on PP-OCR det one build is ~2 s and one run on 4
feeds ~0.2 s (docs/benchmarks.md). So trials are screened on a single session instead.

The screening graph is the full-INT8 model made by the real quantizer (so scales, smoothing and
Relu absorption are the quantizer's own), in which every input ``i`` of every candidate node
that reads a ``DequantizeLinear`` now reads ``Where(int8_g, DQ(..), float_i)``, where ``g`` is
the node's group and ``float_i`` is what the node reads when it stays float: the Q's input for an
activation, the float (smoothed) initializer for a weight or bias. GPU targets get a second
switch per group, ``fp16_g``, selecting ``Cast(Cast(float_i, fp16), fp32)`` (fake FP16 on the
inputs: the rounding of FP16 storage, not of FP16 arithmetic). Where the quantize engine has
per-token dynamic activations (``QuantizeConfig.dynamic_nodes``), ``dyn_g`` selects
``DQ(DynamicQuantizeLinear(x))`` on what the reader would otherwise read (per tensor: an upper
bound on per-token error; after a static DQ where the producer is INT8, as in a real build).
A trial is one ``session.run`` with a dict of booleans: no rebuild, no re-optimisation.

Why this and not per-node subgraph runs on cached activations: a plan's error compounds across
nodes, so subgraph runs must still re-run everything downstream of the first switched node;
the switch graph does exactly that in one call, keeps onnxruntime's memory planning, and lets
every worker of a pool hold one session.

The screening graph is an estimate: real INT8 kernels requantize between fused nodes and a
node kept float by the real quantizer may change the Q/DQ placement of its neighbours. Plans
chosen on it are verified on a model built for real (:mod:`onnxopt.quant.planner`).

Groups: candidates that read one and the same quantized activation (one shared Q/DQ: branches
of a residual block, the Q/K/V MatMuls of one LayerNorm output) share a precision, so a plan
never splits a Q/DQ pair between an INT8 and a float reader.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as ir_common

from onnxopt import _ir_utils

__all__ = ["IF_MIN_ELEMENTS", "LEVEL_INPUT_PREFIX", "ScreeningModel", "activation_sizes", "build", "groups_of"]

LEVEL_INPUT_PREFIX = "__onnxopt_switch"
# Activations of at least this many values are switched by an If (Q/DQ skipped when off): a Where
# computes both inputs, and an If's ~10-30 us overhead is below the Q/DQ/Where of ~128 KB.
IF_MIN_ELEMENTS = 1 << 15


@dataclasses.dataclass
class ScreeningModel:
    """The switch graph and how plans map to its boolean inputs.

    Attributes:
        model: the graph (float inputs and outputs as the original, plus one bool scalar per
            group and simulated level).
        groups: group name -> candidate node names (graph order).
        levels: the simulated non-FP32 levels ("int8", "int8-dynamic", "fp16").
        switches: (group, level) -> graph input name.
        switched_inputs: how many node inputs got a switch.

    """

    model: ir.Model
    groups: dict[str, list[str]]
    levels: tuple[str, ...]
    switches: dict[tuple[str, str], str]
    switched_inputs: int = 0

    def feed(self, plan: Mapping[str, str]) -> dict[str, np.ndarray]:
        """Boolean inputs for ``plan`` (group -> level; missing groups and "fp32": float)."""
        out = {}
        for (group, level), name in self.switches.items():
            out[name] = np.array(plan.get(group) == level)
        return out


def activation_sizes(int8_model: ir.Model, float_model: ir.Model, feed: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Elements of every quantized activation of ``int8_model``, run on ``feed`` in ``float_model``
    (the ``sizes`` of :func:`build`; one capture run)."""
    from onnxopt.runtime import sessions

    present = {v.name for v in float_model.graph.inputs} | {o.name for n in float_model.graph for o in n.outputs}
    names = sorted({n.inputs[0].name for n in int8_model.graph
                    if n.op_type == "QuantizeLinear" and n.inputs[0] is not None and n.inputs[0].name in present})  # fmt: skip
    if not names:
        return {}
    (got,) = list(sessions.capture(float_model, [dict(feed)], names))
    return {n: int(np.asarray(v).size) for n, v in got.items()}


def groups_of(int8_model: ir.Model, candidates: Sequence[str]) -> dict[str, list[str]]:
    """Candidates reading one shared quantized activation form a group (union-find); graph order."""
    wanted = set(candidates)
    parent = {n: n for n in candidates}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    readers: dict[int, str] = {}
    for node in int8_model.graph:
        if node.name not in wanted:
            continue
        for value in node.inputs:
            q = _activation_q(value)
            if q is None:
                continue
            if id(q) in readers:
                a, b = find(readers[id(q)]), find(node.name)
                if a != b:
                    parent[b] = a
            else:
                readers[id(q)] = node.name
    order = [n.name for n in int8_model.graph if n.name in wanted]
    groups: dict[str, list[str]] = {}
    first: dict[str, str] = {}
    for name in order:
        root = find(name)
        first.setdefault(root, name)
        groups.setdefault(first[root], []).append(name)
    return groups


def _activation_q(value: ir.Value | None) -> ir.Node | None:
    """The QuantizeLinear behind a DequantizeLinear output (an activation), else None."""
    if value is None or value.producer() is None or value.producer().op_type != "DequantizeLinear":
        return None
    src = value.producer().inputs[0]
    if src is None or src.producer() is None or src.producer().op_type != "QuantizeLinear":
        return None
    return src.producer()


def _other_levels(add, levels, switch_values, group, chosen, plain, base):  # noqa: ANN001, ANN202
    """A reader's activation input under FP16 (fake, on what it reads) and dynamic INT8 (on x)."""
    if "fp16" in levels:
        half = add("Cast", [chosen], f"{base}_f16", to=ir.DataType.FLOAT16)[0]
        back = add("Cast", [half], f"{base}_f16f32", to=ir.DataType.FLOAT)[0]
        chosen = add("Where", [switch_values[(group, "fp16")], back, chosen], f"{base}_sel16")[0]
    if "int8-dynamic" in levels:  # on what the reader gets: a real build quantizes a static DQ's output again
        y, scale, zero = add("DynamicQuantizeLinear", [chosen], f"{base}_dyn")
        dynamic = add("DequantizeLinear", [y, scale, zero], f"{base}_dyndq")[0]
        chosen = add("Where", [switch_values[(group, "int8-dynamic")], dynamic, chosen], f"{base}_seldyn")[0]
    return chosen


def _branch(q: ir.Node, dq: ir.Node, plain: ir.Value, cond: ir.Value, fresh) -> ir.Value:  # noqa: ANN001
    """``If(cond)``: then ``DQ(Q(plain))`` (copies of ``q``/``dq`` reading the outer scope), else ``plain``."""

    def copy(node: ir.Node, inputs: list) -> ir.Node:
        out = ir.node(node.op_type, inputs, attributes={k: a.value for k, a in node.attributes.items()}, domain=node.domain,
                      name=fresh(f"{node.name}_if"))  # fmt: skip
        out.outputs[0].name = fresh(f"{node.outputs[0].name}_if")
        if node.outputs[0].dtype is not None:
            out.outputs[0].dtype = node.outputs[0].dtype
        out.outputs[0].shape = node.outputs[0].shape
        return out

    q2 = copy(q, [plain, *q.inputs[1:]])
    dq2 = copy(dq, [q2.outputs[0], *dq.inputs[1:]])
    same = ir.node("Identity", [plain], name=fresh(f"{plain.name}_float"))
    same.outputs[0].name = fresh(f"{plain.name}_float")
    same.outputs[0].dtype, same.outputs[0].shape = plain.dtype or ir.DataType.FLOAT, plain.shape
    then = ir.Graph([], [dq2.outputs[0]], nodes=[q2, dq2], name=fresh(f"{plain.name}_int8"))
    orelse = ir.Graph([], [same.outputs[0]], nodes=[same], name=fresh(f"{plain.name}_fp32"))
    node = ir.node("If", [cond], attributes={"then_branch": then, "else_branch": orelse}, name=fresh(f"{plain.name}_if"))
    out = node.outputs[0]
    out.name = fresh(f"{plain.name}_sel")
    out.dtype, out.shape = dq.outputs[0].dtype or ir.DataType.FLOAT, dq.outputs[0].shape
    if dq2.outputs[0].dtype is None:  # a branch output needs its type
        dq2.outputs[0].dtype = out.dtype
    return out


def _owner(q: ir.Node | None) -> ir.Node | None:
    """The node whose output a Q quantizes (through an absorbed Relu/Clip), or None."""
    if q is None or q.inputs[0] is None or q.inputs[0].producer() is None:
        return None
    producer = q.inputs[0].producer()
    if producer.op_type in ("Relu", "Clip") and producer.inputs[0] is not None and producer.inputs[0].producer():
        return producer.inputs[0].producer()  # absorbed into the output's range
    return producer


def build(
    int8_model: ir.Model,
    float_model: ir.Model,
    candidates: Sequence[str],
    levels: Sequence[str] = ("int8",),
    sizes: Mapping[str, int] | None = None,
) -> ScreeningModel:
    """The switch graph of ``int8_model`` (not modified); ``float_model`` gives float weights.

    Args:
        int8_model: every candidate quantized (the real quantizer's output).
        float_model: the model the quantizer starts from once smoothed (same node names), whose
            constant inputs are what a float node reads.
        candidates: quantized node names.
        levels: non-FP32 levels to simulate, from "int8", "int8-dynamic", "fp16".
        sizes: elements per float tensor on a typical feed (activation name -> size); an
            activation of at least IF_MIN_ELEMENTS gets ``If(switch, DQ(Q(x)), x)`` with the Q/DQ
            inside the then-branch, so a float trial does not compute it (a ``Where`` computes
            both inputs: on PP-OCR det's page-sized feature maps the Q/DQ of every tensor made a
            trial slower than a real build); smaller ones keep the ``Where`` (an If costs more
            than the Q/DQ of a small tensor).

    """
    model = int8_model.clone()
    graph = model.graph
    groups = groups_of(model, candidates)
    group_of = {n: g for g, names in groups.items() for n in names}
    float_nodes = {n.name: n for n in float_model.graph}
    taken = _ir_utils._value_names(graph) | {n.name for n in graph if n.name}

    def fresh(base: str) -> str:
        return _ir_utils.unique_name(graph, base, taken)

    switches: dict[tuple[str, str], str] = {}
    switch_values: dict[tuple[str, str], ir.Value] = {}
    for i, group in enumerate(groups):
        for level in levels:
            name = fresh(f"{LEVEL_INPUT_PREFIX}_{level.replace('-', '_')}_{i}")
            value = ir.Value(name=name, type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([]))
            graph.inputs.append(value)
            switches[(group, level)] = name
            switch_values[(group, level)] = value
    float_copies: dict[int, ir.Value] = {}
    new_nodes: list[ir.Node] = []

    def add(op: str, inputs: list[ir.Value], base: str, **attrs: int) -> list[ir.Value]:
        name = fresh(base)
        node = ir.node(op, inputs, attributes=attrs, name=name, num_outputs=3 if op == "DynamicQuantizeLinear" else 1)
        for j, out in enumerate(node.outputs):
            out.name = name if j == 0 else fresh(f"{name}_{j}")
        new_nodes.append(node)
        return list(node.outputs)

    def float_constant(node: ir.Node, index: int) -> ir.Value | None:
        src = float_nodes.get(node.name)
        if src is None or index >= len(src.inputs):
            return None
        value = _ir_utils.constant_input(src, index)
        if value is None:
            return None
        if id(value) not in float_copies:
            array = _ir_utils.constant_array(value)
            name = fresh(f"{value.name}_float")
            copy = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                            const_value=ir.Tensor(array, name=name))  # fmt: skip
            graph.register_initializer(copy)
            float_copies[id(value)] = copy
        return float_copies[id(value)]

    switched = 0
    ors: dict[tuple[str, ...], ir.Value] = {}
    large = {n for n, size in (sizes or {}).items() if size >= IF_MIN_ELEMENTS}
    dead: list[ir.Node] = []

    def any_int8(owners: list[str]) -> ir.Value:
        """Or of the owners' int8 switches (one value per owner set)."""
        key = tuple(sorted(set(owners)))
        if key not in ors:
            cond = switch_values[(key[0], "int8")]
            for g in key[1:]:
                cond = add("Or", [cond, switch_values[(g, "int8")]], f"{LEVEL_INPUT_PREFIX}_or")[0]
            ors[key] = cond
        return ors[key]

    # Activations: a quantized tensor exists in a real build when its producer or any reader is
    # INT8, and then every reader reads its DQ (insert.py): Where(any owner INT8, DQ, x) for all.
    for dq in [n for n in graph if n.op_type == "DequantizeLinear"]:
        q = _activation_q(dq.outputs[0])
        if q is None:
            continue
        value = dq.outputs[0]
        readers = [u.node for u in value.uses()]
        owners = [group_of[r.name] for r in readers if r.name in group_of]
        producer = _owner(q)
        if producer is not None and producer.name in group_of:
            owners.append(group_of[producer.name])
        if not owners:
            continue
        plain = q.inputs[0]
        uses = [(u.node, u.idx) for u in value.uses()]
        if (plain.name in large and not value.is_graph_output()
                and [u.node for u in q.outputs[0].uses()] == [dq]):  # fmt: skip
            chosen = _branch(q, dq, plain, any_int8(owners), fresh)
            new_nodes.append(chosen.producer())
            dead += [dq, q]
        else:
            chosen = add("Where", [any_int8(owners), value, plain], f"{value.name}_sel")[0]
        for user, idx in uses:
            chosen_for = chosen
            group = group_of.get(user.name)
            if group is not None:  # per-reader levels other than INT8/FP32
                chosen_for = _other_levels(add, levels, switch_values, group, chosen, plain, f"{user.name}_in{idx}")
            user.replace_input_with(idx, chosen_for)
            switched += 1
        if value.is_graph_output():
            name = value.name
            value.name = fresh(f"{name}_q")
            chosen.name, chosen.dtype, chosen.shape = name, value.dtype, value.shape
            for k, out in enumerate(graph.outputs):
                if out is value:
                    graph.outputs[k] = chosen
    # Constants (weights, biases, Add/Mul operands): each reader's own Where.
    for node in list(graph):
        group = group_of.get(node.name)
        if group is None:
            continue
        for index, value in enumerate(list(node.inputs)):
            if value is None or value.producer() is None or value.producer().op_type != "DequantizeLinear":
                continue
            if _activation_q(value) is not None:
                continue
            plain = float_constant(node, index)
            if plain is None:
                continue
            base = f"{node.name}_in{index}"
            int8 = switch_values[(group, "int8")]
            if "int8-dynamic" in levels:  # dynamic INT8 keeps the static INT8 weights
                int8 = add("Or", [int8, switch_values[(group, "int8-dynamic")]], f"{base}_anyint8")[0]
            chosen = add("Where", [int8, value, plain], f"{base}_sel8")[0]
            if "fp16" in levels:
                half = add("Cast", [plain], f"{base}_f16", to=ir.DataType.FLOAT16)[0]
                back = add("Cast", [half], f"{base}_f16f32", to=ir.DataType.FLOAT)[0]
                chosen = add("Where", [switch_values[(group, "fp16")], back, chosen], f"{base}_sel16")[0]
            node.replace_input_with(index, chosen)
            switched += 1
    for node in new_nodes:
        graph.append(node)
    for node in dead:  # Q/DQ pairs moved into an If's then-branch
        graph.remove(node, safe=True)
    ir_common.TopologicalSortPass()(model)
    return ScreeningModel(model, groups, tuple(levels), switches, switched)
