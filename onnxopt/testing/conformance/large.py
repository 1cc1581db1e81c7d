"""A synthetic MLP of any size, written with its weights streamed to an external-data file.

The weights are generated layer by layer and appended to ``<model>.data``; only one layer is
in memory at a time, so a > 2 GB model is built with a few hundred MB of RAM. The graph also
holds work for simplify (a constant subexpression, an Identity) so the pass has something to do.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
from onnx import TensorProto, helper

__all__ = ["run_with_peak_rss", "write_large_mlp"]


def _external(name: str, dims: list[int], location: str, offset: int, length: int) -> TensorProto:
    t = TensorProto()
    t.name = name
    t.data_type = TensorProto.FLOAT
    t.dims.extend(dims)
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def write_large_mlp(path: str | os.PathLike, *, width: int, layers: int, seed: int = 0) -> int:
    """Write ``layers`` MatMul+Add(+Relu) layers of ``width`` x ``width`` float32 weights.

    Input ``x`` is ``[batch, width]`` with a symbolic batch. Returns the weight bytes written.
    """
    path = pathlib.Path(path)
    data_name = path.name + ".data"
    rng = np.random.default_rng(seed)
    inits: list[TensorProto] = []
    nodes = []
    offset = 0
    prev = "x"
    with open(path.parent / data_name, "wb") as f:
        for i in range(layers):
            w = (rng.standard_normal((width, width), dtype=np.float32) / np.float32(np.sqrt(width)))
            f.write(w.tobytes())
            inits.append(_external(f"W{i}", [width, width], data_name, offset, w.nbytes))
            offset += w.nbytes
            del w
            b = rng.standard_normal(width, dtype=np.float32) * np.float32(0.1)
            inits.append(helper.make_tensor(f"b{i}", TensorProto.FLOAT, [width], b.tolist()))
            nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [f"mm{i}"]))
            last = i == layers - 1
            nodes.append(helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"add{i}" if not last else "pre"]))
            if not last:
                nodes.append(helper.make_node("Relu", [f"add{i}"], [f"h{i}"]))
                prev = f"h{i}"
    # Work for simplify: scale = c1 * c2 is constant (folded), and an Identity before the output.
    inits.append(helper.make_tensor("c1", TensorProto.FLOAT, [1], [0.5]))
    inits.append(helper.make_tensor("c2", TensorProto.FLOAT, [1], [2.0]))
    nodes.append(helper.make_node("Mul", ["c1", "c2"], ["scale"]))
    nodes.append(helper.make_node("Mul", ["pre", "scale"], ["scaled"]))
    nodes.append(helper.make_node("Identity", ["scaled"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "large_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return offset


def run_with_peak_rss(args: list[str], *, env: dict[str, str] | None = None) -> tuple[int, int, str]:
    """Run ``args``; (exit code, peak RSS in bytes of that process, stderr) via ``os.wait4``."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    assert proc.stderr is not None
    err = proc.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux
    return proc.returncode, usage.ru_maxrss * scale, err
