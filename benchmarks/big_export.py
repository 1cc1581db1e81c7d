"""Write a synthetic 3 GiB model (6 x 512 MiB float32 initializers), reload it, run it.

The > 2 GB protobuf limit is handled by ``export`` with external data chosen automatically.
Usage: ``python benchmarks/big_export.py [--dir DIR]`` (needs ~3.5 GB of free disk).
"""

from __future__ import annotations

import argparse
import pathlib
import resource
import tempfile
import time

import numpy as np
import onnxruntime as ort

from onnxopt import export
from onnxopt import io as _io
from onnxopt.testing.builders import big_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", help="where to write (default: a temp folder, removed after)")
    args = parser.parse_args()
    n, rows, cols = 6, 2048, 65536  # 6 x 512 MiB = 3 GiB of float32
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        model = big_model(n, rows, cols)
        assert _io.model_nbytes(model) > _io.PROTOBUF_LIMIT
        t0 = time.perf_counter()
        result = export.export(model, pathlib.Path(tmp) / "big.onnx")
        t_save = time.perf_counter() - t0
        t0 = time.perf_counter()
        reloaded = _io.load_model(result.path)
        assert len(_io.external_tensors(reloaded)) == n
        sess = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
        outs = sess.run(None, {"idx": np.array([777], np.int64)})
        t_load = time.perf_counter() - t0
        ok = all(np.all(y == i * 1000 + 777) for i, y in enumerate(outs))
        sizes = [f.stat().st_size for f in result.files]
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        print(f"files {[f.name for f in result.files]} sizes {sizes}")
        print(f"save {t_save:.1f}s, reload + session + run {t_load:.1f}s, outputs correct: {ok}, "
              f"peak RSS {rss:.2f} GB")


if __name__ == "__main__":
    main()
