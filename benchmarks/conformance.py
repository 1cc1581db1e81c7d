"""Full conformance run: every pass/recipe and the anchors over the ONNX backend test cases.

Usage::

    python benchmarks/conformance.py                      # all our passes and recipes + anchors
    python benchmarks/conformance.py --tools simplify onnxsim onnxslim occ-fp16
    python benchmarks/conformance.py --sample 200 --seed 0  # a seeded subset of the cases
    python benchmarks/conformance.py --merge OUT1 OUT2      # one table from runs (later wins)

Writes ``<out>/eligibility.json`` (reused when onnx and onnxruntime versions match),
``<out>/outcomes.jsonl`` (one verdict per case and tool) and ``<out>/table.md``, and prints the
counts table and every crashed/invalid/wrong/timeout outcome of our own passes.
See onnxopt/testing/conformance/harness.py for the rules.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import random
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

from onnxopt.testing.conformance import cases as _cases
from onnxopt.testing.conformance import harness, tools


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _all_cases(suites: list[str]) -> list[_cases.Case]:
    found: list[_cases.Case] = []
    if "node" in suites:
        found += _cases.node_cases()
    if "light" in suites:
        found += _cases.light_cases()
    found += _cases.folder_cases([s for s in suites if s in _cases.DATA_SUITES])
    return found


def _eligibility(all_cases: list[_cases.Case], out: pathlib.Path, args: argparse.Namespace) -> dict[str, dict]:
    path = out / "eligibility.json"
    cached: dict[str, dict] = {}
    if path.exists():
        doc = json.loads(path.read_text())
        if doc.get("versions") == _versions():
            cached = doc["cases"]
    todo = [c for c in all_cases if c.key not in cached]
    if todo:
        results = harness.run_tasks([(c, "original", True) for c in todo], workers=args.workers,
                                    timeout=args.timeout, quiet=args.quiet, desc="originals")
        for o in results:
            cached[o.case] = {"status": o.status, "detail": o.detail}
        path.write_text(json.dumps({"versions": _versions(), "cases": cached}, indent=1, sort_keys=True))
    return cached


def _merge(paths: list[pathlib.Path], tool_names: list[str] | None) -> int:
    latest: dict[tuple[str, str], harness.Outcome] = {}  # a later run replaces an earlier verdict
    for path in paths:
        path = path / "outcomes.jsonl" if path.is_dir() else path
        for line in path.read_text().splitlines():
            o = harness.Outcome(**json.loads(line))
            latest[(o.tool, o.case)] = o
    counts = harness.summarize(latest.values())
    print(harness.format_table(counts, tool_names or sorted(counts)))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tools", nargs="*", help="default: every pass and recipe, then the anchors")
    parser.add_argument("--suites", nargs="*", default=["node", "light", *_cases.DATA_SUITES])
    parser.add_argument("--sample", type=int, help="run a seeded random subset of this many eligible cases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per case and tool")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "benchmarks" / "results" / "conformance")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--merge", nargs="*", type=pathlib.Path,
                        help="print one table from the outcomes.jsonl of earlier runs (no new run)")
    args = parser.parse_args()
    if args.merge:
        return _merge(args.merge, args.tools)
    args.out.mkdir(parents=True, exist_ok=True)
    tool_names = args.tools or [*tools.our_tools(), *tools.ANCHORS]

    t0 = time.perf_counter()
    all_cases = _all_cases(args.suites)
    elig = _eligibility(all_cases, args.out, args)
    eligible = [c for c in all_cases if elig[c.key]["status"] == "eligible"]
    print(f"{len(all_cases)} cases, {len(eligible)} run correctly on onnxruntime CPU (the denominator); "
          f"collected and checked in {time.perf_counter() - t0:.0f} s")
    if args.sample is not None and args.sample < len(eligible):
        eligible = sorted(random.Random(args.seed).sample(eligible, args.sample), key=lambda c: c.key)
        print(f"sampled {len(eligible)} eligible cases with seed {args.seed}")
    tasks = [
        (c, tool, "full checker" not in elig[c.key]["detail"]) for tool in tool_names for c in eligible
    ]
    t1 = time.perf_counter()
    outcomes = harness.run_tasks(tasks, workers=args.workers, timeout=args.timeout, quiet=args.quiet,
                                 desc="optimize+check")
    with (args.out / "outcomes.jsonl").open("w") as f:
        for o in outcomes:
            f.write(json.dumps(dataclasses.asdict(o)) + "\n")
    table = harness.format_table(harness.summarize(outcomes), tool_names)
    header = (f"{len(all_cases)} cases; {len(eligible)} eligible (original correct on onnxruntime "
              f"{_versions()['onnxruntime']} CPU); onnx {_versions()['onnx']}; timeout {args.timeout:g} s; "
              f"{time.perf_counter() - t1:.0f} s with {args.workers} workers\n\n")
    (args.out / "table.md").write_text(header + table + "\n")
    print(header + table)
    ours = set(tools.our_tools())
    bad = [o for o in outcomes if o.status in harness.BAD and o.tool in ours]
    if bad:
        print(f"\n{len(bad)} failures of our passes:")
        for o in bad:
            print(f"  {o.tool:>16}  {o.status:8} {o.case}: {o.detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
