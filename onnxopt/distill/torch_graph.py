"""Run an ONNX graph in torch, with chosen initializers replaced by trainable tensors.

Why not onnx2torch: it turns Conv/Gemm/BatchNorm into ``torch.nn`` modules with their own
parameter names (Gemm with transB=0 gets a transposed copy), so writing trained values back
into the ONNX graph by initializer name would need a per-op inverse mapping; and a packed
codebook (``Gather(codebook, indices)``) would need special handling to stay a codebook. Here
every initializer keeps its ONNX name, the graph is evaluated node by node with the functions
of :mod:`onnxopt.distill.torch_ops`, and whatever tensor the trainer passes for a name is used, so
write-back is exact and a codebook trained through ``Gather`` is Deep Compression's trained
quantization with no extra code.

Importing this module imports torch (the ``distill`` extra); the core never imports it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir
import torch

from onnxopt.distill.torch_ops import OpFn, UnsupportedOpError, build_op

__all__ = ["TorchGraph", "UnsupportedOpError"]

logger = logging.getLogger(__name__)


class TorchGraph:
    """A differentiable evaluator of one ONNX graph (main graph only; no control flow).

    Args:
        model: the model; it is read, never changed.

    Raises:
        UnsupportedOpError: a node (named, with its op type) cannot be run in torch; raised
            here, before any training, for the first such node in graph order.

    """

    def __init__(self, model: ir.Model) -> None:
        graph = model.graph
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 17))
        self.input_names = [v.name for v in graph.inputs if not v.is_initializer()]
        self.output_names = [v.name for v in graph.outputs]
        self.constants: dict[str, torch.Tensor] = {}
        for name, value in graph.initializers.items():
            if value.const_value is None:
                raise UnsupportedOpError(f"distill: initializer {name!r} has no value")
            self.constants[name] = torch.from_numpy(np.array(value.const_value.numpy()))
        self._steps: list[tuple[OpFn, list[str | None], list[str], ir.Node]] = []
        for node in graph:
            for attr in node.attributes.values():
                if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
                    raise UnsupportedOpError(
                        f"distill: cannot train through {node.op_type} node {node.name!r}: subgraphs are not supported"
                    )
            fn = build_op(node, opset)
            ins = [v.name if v is not None else None for v in node.inputs]
            outs = [v.name for v in node.outputs]
            self._steps.append((fn, ins, outs, node))
        self._free_after = _last_uses(self._steps)

    def starting_at(self, names: Sequence[str]) -> TorchGraph:
        """An evaluator of the rest of the graph, fed the intermediate values ``names``.

        The nodes that only serve to compute ``names`` (their producers and all their
        ancestors) are left out, so a caller that caches those values once (onnxruntime on a
        frozen prefix) trains the suffix without re-running the prefix forward and backward.
        The returned graph's ``input_names`` are ``names``.

        Raises:
            ValueError: a name no node produces, or a remaining node that needs another value of
                the left-out part (the cut does not separate the graph).

        """
        producer = {out: i for i, (_, _, outs, _) in enumerate(self._steps) for out in outs}
        missing = [n for n in names if n not in producer]
        if missing:
            raise ValueError(f"distill: no node produces {missing[0]!r}: cannot start the graph there")
        dropped: set[int] = set()
        todo = list(names)
        while todo:
            index = producer.get(todo.pop())
            if index is None or index in dropped:
                continue
            dropped.add(index)
            todo.extend(n for n in self._steps[index][1] if n)
        lost = {out for i in dropped for out in self._steps[i][2]} - set(names)
        for i, (_, ins, _, node) in enumerate(self._steps):
            if i not in dropped and lost.intersection(ins):
                needed = sorted(lost.intersection(ins))[0]
                raise ValueError(
                    f"distill: {node.op_type} node {node.name!r} needs {needed!r}, computed before the cut {list(names)}"
                )
        part = copy.copy(self)
        part._steps = [step for i, step in enumerate(self._steps) if i not in dropped]
        part._free_after = _last_uses(part._steps)
        part.input_names = list(names)
        return part

    def __call__(
        self,
        feeds: Mapping[str, torch.Tensor],
        weights: Mapping[str, torch.Tensor] | None = None,
        extra: Sequence[str] = (),
    ) -> list[torch.Tensor]:
        """The graph outputs for ``feeds``, using ``weights[name]`` instead of an initializer.

        The values named in ``extra`` (intermediate tensors) follow the graph outputs.

        Raises:
            UnsupportedOpError: an op fails on these inputs (names the op and node).

        """
        env: dict[str, torch.Tensor] = dict(self.constants)
        if weights:
            env.update(weights)
        env.update(feeds)
        keep = set(self.output_names).union(extra)
        for (fn, ins, outs, node), done in zip(self._steps, self._free_after, strict=True):
            args = [env[name] if name else None for name in ins]
            try:
                results = fn(args)
            except (RuntimeError, IndexError, TypeError, ValueError) as err:
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise UnsupportedOpError(
                    f"distill: {node.op_type} node {node.name!r} failed in torch: {first}"
                ) from err
            for name, value in zip(outs, results, strict=False):  # Dropout: no mask output
                if name:
                    env[name] = value
            # Drop each value after its last reader: without grad (evaluation, teacher-sized
            # batches) only the live values stay in memory, not every intermediate of the batch.
            for name in done:
                if name not in keep:
                    env.pop(name, None)
        return [env[name] for name in self.output_names] + [env[name] for name in extra]


def _last_uses(steps: Sequence[tuple[OpFn, list[str | None], list[str], ir.Node]]) -> list[list[str]]:
    """Per step, the value names no later step reads (read or, if never read, made there)."""
    last: dict[str, int] = {}
    for i, (_, ins, outs, _) in enumerate(steps):
        for name in [*ins, *outs]:
            if name:
                last[name] = i
    free: list[list[str]] = [[] for _ in steps]
    for name, i in last.items():
        free[i].append(name)
    return free
