"""Data-free runs of every recipe over a 1-in-20 sample of the ONNX backend node cases.

For each sampled case that onnxruntime runs correctly (the eligibility rule of
onnxopt/testing/conformance/harness.py), the case's model is written to a folder with its own data sets as
``test_data_set_*`` folders, and the ``onnxopt`` command runs on it:

    onnxopt optimize case.onnx -o out.onnx --recipe R                 # every recipe, no data
    onnxopt optimize case.onnx -o out.onnx --recipe R --calib <case>  # recipes needing calibration

The sample is deterministic: the eligible node cases sorted by name, every ``--every``-th one
from ``--offset``. A recipe that needs calibration data refuses to run without it (exit 2, its
documented refusal); it is run with the case's own inputs as ``--calib`` (and no ``--eval``)
instead. compress-distill needs torch and is left out.

With ``--model PATH`` (repeatable) the same commands run on those models instead of the
conformance sample; ``--model-calib DATA`` is then the ``--calib`` of the recipes that need it
(benchmarks/export_minilm.py writes a MiniLM export and its calibration sentences).

Usage::

    python benchmarks/datafree.py                      # table of exit codes, per case and recipe
    python benchmarks/datafree.py --every 20 --offset 0 --workers 2 --out /tmp/datafree
    python benchmarks/datafree.py --model /tmp/minilm.onnx --model-calib /tmp/minilm_calib.npz

Prints the CPU and onnxruntime version, one row per case (exit code per recipe, ``0`` is success)
and a summary row; every non-zero exit is listed with the last line of its stderr.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import pathlib
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]

from onnxopt.testing.conformance import cases as _cases
from onnxopt.testing.conformance import harness

SKIP_RECIPES = ("compress-distill",)  # needs torch (the distill extra)


def cpu_name() -> str:
    """The CPU model name and its relevant ISA flags, from /proc/cpuinfo where there is one."""
    try:
        info = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "")
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"{model or platform.machine()} ({', '.join(isa) or 'no AVX2'}; {len(info.split('processor')) - 1} cores)"


def recipes() -> tuple[list[str], set[str]]:
    """(recipe names, the ones needing calibration), compress-distill excepted."""
    from onnxopt import pass_base
    from onnxopt import recipes as _recipes

    pass_base.all_passes()
    names = [n for n in sorted(_recipes.RECIPES) if n not in SKIP_RECIPES]
    needs = {
        n for n in names
        if any(pass_base.get(s.name).needs_calibration for s in _recipes.RECIPES[n].steps)
    }
    return names, needs


def eligible_cases(out: pathlib.Path, workers: int) -> list[_cases.Case]:
    """Node cases onnxruntime runs correctly (cached in ``out/eligibility.json`` per version)."""
    import onnx
    import onnxruntime

    versions = {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    all_cases = _cases.node_cases()
    path = out / "eligibility.json"
    cached: dict[str, str] = {}
    if path.exists():
        doc = json.loads(path.read_text())
        if doc.get("versions") == versions:
            cached = doc["cases"]
    todo = [c for c in all_cases if c.key not in cached]
    if todo:
        for o in harness.run_tasks([(c, "original", True) for c in todo], workers=workers, desc="originals"):
            cached[o.case] = o.status
        path.write_text(json.dumps({"versions": versions, "cases": cached}, indent=1, sort_keys=True))
    return sorted((c for c in all_cases if cached[c.key] == "eligible"), key=lambda c: c.key)


def write_case(case: _cases.Case, folder: pathlib.Path) -> pathlib.Path:
    """``folder/model.onnx`` and ``folder/data/test_data_set_*/input_*.pb``; returns the model path."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(case.model)
    path = folder / "model.onnx"
    path.write_bytes(case.model)
    names = [v.name for v in model.graph.input]
    types = {v.name: v.type for v in model.graph.input}
    for k, (feed, _) in enumerate(case.data_sets):
        ds = folder / "data" / f"test_data_set_{k}"
        ds.mkdir(parents=True)
        for i, name in enumerate(n for n in names if n in feed):
            value = feed[name]
            if types[name].HasField("sequence_type"):
                proto: Any = numpy_helper.from_list(list(value), name)
            elif types[name].HasField("optional_type"):
                proto = numpy_helper.from_optional(value, name)
            else:
                proto = numpy_helper.from_array(value, name)
            (ds / f"input_{i}.pb").write_bytes(proto.SerializeToString())
    return path


def run_one(args: list[str], timeout: float) -> tuple[int, str]:
    """Exit code and the last stderr line of one ``onnxopt`` command."""
    try:
        done = subprocess.run(
            [str(pathlib.Path(sys.executable).with_name("onnxopt")), *args, "-q"], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return 124, f"more than {timeout:g} s"
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    return done.returncode, lines[-1] if lines else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every", type=int, default=20, help="take every N-th eligible case (default 20)")
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per command")
    parser.add_argument("--recipes", nargs="*", help="default: every recipe but compress-distill")
    parser.add_argument("--cases", nargs="*", help="only these case names (e.g. test_split_1d_uneven_split_opset18)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(tempfile.gettempdir()) / "onnxopt-datafree")
    parser.add_argument("--model", action="append", type=pathlib.Path, help="run on this model instead")
    parser.add_argument("--model-calib", type=pathlib.Path, help="--calib for --model runs of recipes needing it")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import onnxruntime

    names, needs = recipes()
    names = args.recipes or names
    if args.model:
        return run_models(args, names, needs)
    eligible = eligible_cases(args.out, args.workers)
    sample = eligible[args.offset :: args.every]
    if args.cases:
        sample = [c for c in eligible if c.name in set(args.cases)]
    print(f"CPU: {cpu_name()}; onnxruntime {onnxruntime.__version__}; python {platform.python_version()}")
    print(f"{len(eligible)} node cases run correctly on onnxruntime CPU; sample: every {args.every}-th from "
          f"{args.offset}: {len(sample)} cases")
    columns = [*names, "int8 --calib"]
    jobs: dict[tuple[str, str], list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="onnxopt-datafree-") as tmp:
        for case in sample:
            folder = pathlib.Path(tmp) / case.name
            folder.mkdir()
            model = write_case(case, folder)
            for col in columns:
                recipe = "int8" if col == "int8 --calib" else col
                out = folder / f"out-{col.replace(' ', '').replace('-', '_')}.onnx"
                cmd = ["optimize", str(model), "-o", str(out), "--recipe", recipe]
                if col == "int8 --calib" or recipe in needs:
                    cmd += ["--calib", str(folder / "data")]
                jobs[(case.name, col)] = cmd
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
            futures = {pool.submit(run_one, cmd, args.timeout): key for key, cmd in jobs.items()}
            results = {futures[f]: f.result() for f in concurrent.futures.as_completed(futures)}
    width = max([len(c.name) for c in sample] + [4])
    head = ["case".ljust(width), *columns]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for case in sample:
        print("| " + " | ".join([case.name.ljust(width), *(str(results[(case.name, c)][0]) for c in columns)]) + " |")
    zero = [sum(results[(c.name, col)][0] == 0 for c in sample) for col in columns]
    print("| " + " | ".join(["exit 0".ljust(width), *(f"{z}/{len(sample)}" for z in zero)]) + " |")
    print(f"({len(jobs)} commands in {time.perf_counter() - t0:.0f} s with {args.workers} workers; recipes "
          f"needing calibration ({', '.join(sorted(needs))}) ran with the case's own inputs as --calib)")
    bad = sorted((k, v) for k, v in results.items() if v[0] != 0)
    for (case_name, col), (code, line) in bad:
        print(f"  exit {code}  {case_name}  {col}: {line[:300]}")
    return 1 if bad else 0


def run_models(args: argparse.Namespace, names: list[str], needs: set[str]) -> int:
    """Every recipe on each ``--model``: without data, or with ``--model-calib`` where needed."""
    import onnxruntime

    print(f"CPU: {cpu_name()}; onnxruntime {onnxruntime.__version__}; python {platform.python_version()}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="onnxopt-datafree-") as tmp:
        for model in args.model:
            for recipe in names:
                cmd = ["optimize", str(model), "-o", str(pathlib.Path(tmp) / f"{model.stem}-{recipe}.onnx"),
                       "--recipe", recipe]
                if recipe in needs:
                    if args.model_calib is None:
                        results[(model.name, recipe)] = (None, "needs --model-calib")
                        continue
                    cmd += ["--calib", str(args.model_calib)]
                t0 = time.perf_counter()
                code, line = run_one(cmd, args.timeout)
                results[(model.name, recipe)] = (code, f"{line} ({time.perf_counter() - t0:.0f} s)")
    print("| model | " + " | ".join(f"{r}{' (--calib)' if r in needs else ''}" for r in names) + " |")
    print("|" + "---|" * (len(names) + 1))
    for model in args.model:
        print(f"| {model.name} | " + " | ".join(str(results[(model.name, r)][0]) for r in names) + " |")
    bad = {k: v for k, v in results.items() if v[0] != 0}
    for (model_name, recipe), (code, line) in sorted(bad.items()):
        print(f"  exit {code}  {model_name}  {recipe}: {line[:300]}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
