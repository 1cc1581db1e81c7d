"""Put a model's original embedding tables back into its low-rank split: what the table split costs.

The ``lowrank`` pass replaces ``Gather(E, ids)`` by a subgraph whose last node (an ``Add`` with
exact rows, or the ``MatMul``) keeps the Gather's name and output; its helper nodes are named
``<that name>.lr_*``. This script swaps each named subgraph for the original node of the same name
(from the unsplit model) and writes the result, so ``bench_transformers.py --score`` can compare
the split with and without the tables' share of the error. An experiment, not a pass.

    python benchmarks/tables_back.py split.onnx mpnet.onnx out.onnx \\
        /bert/embeddings/word_embeddings/Gather /bert/embeddings/position_embeddings/Gather
"""

from __future__ import annotations

import argparse

import onnx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("split", help="the model the lowrank pass wrote")
    ap.add_argument("original", help="the model before the split (its Gather nodes and tables)")
    ap.add_argument("output")
    ap.add_argument("nodes", nargs="+", help="names of the original Gather nodes to restore")
    args = ap.parse_args()
    model, original = onnx.load(args.split), onnx.load(args.original)
    originals = {n.name: n for n in original.graph.node}
    tables = {t.name: t for t in original.graph.initializer}
    graph = model.graph
    for name in args.nodes:
        if name not in originals:
            raise SystemExit(f"{args.original}: no node named {name!r}")
        split = [i for i, n in enumerate(graph.node) if n.name == name or n.name.startswith(name + ".lr_")]
        if not split:
            raise SystemExit(f"{args.split}: no node named {name!r}")
        nodes = list(graph.node)
        kept = [n for i, n in enumerate(nodes) if i not in split]
        kept.insert(sum(1 for i in range(min(split)) if i not in split), originals[name])  # where the subgraph began
        del graph.node[:]
        graph.node.extend(kept)
        graph.initializer.append(tables[originals[name].input[0]])
    used = {x for n in graph.node for x in n.input}
    initializers = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    onnx.checker.check_model(model)
    onnx.save(model, args.output)
    print(f"wrote {args.output}: {len(args.nodes)} table(s) restored")


if __name__ == "__main__":
    main()
