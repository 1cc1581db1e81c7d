"""Write a written-out HardSwish and the fused op on one feature map, for ``latency.py`` to time.

The chain paddle2onnx writes (``x * clip(x + 3, 0, 6) / 6``, four passes over the map) against
``HardSwish`` (one pass), which :mod:`onnxopt.fusion.activations` puts in its place::

    python benchmarks/hardswish_micro.py /tmp/hs
    python benchmarks/latency.py --feed /tmp/hs/feed.npz /tmp/hs/written.onnx /tmp/hs/hardswish.onnx --threads 1

Needs only onnx and numpy.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np
from onnx import TensorProto, helper, save


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=pathlib.Path, help="folder for written.onnx, hardswish.onnx and feed.npz")
    ap.add_argument("--shape", default="1,64,200,152", help="the feature map (PicoDet's first stage at 800x608)")
    args = ap.parse_args(argv)
    shape = [int(d) for d in args.shape.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)
    consts = [helper.make_tensor(n, TensorProto.FLOAT, [], [v]) for n, v in (("three", 3.0), ("zero", 0.0), ("six", 6.0))]
    written = helper.make_graph(
        [helper.make_node("Add", ["x", "three"], ["a"]), helper.make_node("Clip", ["a", "zero", "six"], ["b"]),
         helper.make_node("Mul", ["x", "b"], ["m"]), helper.make_node("Div", ["m", "six"], ["y"])],
        "written", [x], [y], consts)
    fused = helper.make_graph([helper.make_node("HardSwish", ["x"], ["y"])], "hardswish", [x], [y])
    for name, graph in (("written", written), ("hardswish", fused)):
        save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(args.out / f"{name}.onnx"))
    np.savez(args.out / "feed.npz", x=(np.random.default_rng(0).standard_normal(shape) * 4).astype(np.float32))
    print(f"wrote {args.out}/written.onnx, hardswish.onnx, feed.npz ({shape})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
