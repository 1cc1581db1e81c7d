"""Run optimizers over the conformance cases, each case in a worker process with a timeout.

Per case, first the original: it is eligible when it runs on onnxruntime CPU and matches the
expected outputs at the case's tolerance (onnx's runner rule). Then per eligible case and tool:
the tool writes its result (an exception is ``crashed``, except a ``PreconditionError`` from a
pass's ``requires()`` or a typed ``OnnxOptError``: documented refusals, counted as
``unchanged-with-reason``); the result must load, pass the full
checker (when the original does), build an onnxruntime session and run (else ``invalid``), and
match the expected outputs at the tool's tolerance (else ``wrong``); a worker that exceeds the
timeout is killed (``timeout``). A correct result is ``transformed-ok`` when the tool changed the
model, else ``unchanged-with-reason`` when it said why, else ``unchanged`` (nothing applied).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import pathlib
import tempfile
import time
import traceback
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from onnxopt.testing.conformance import tools as _tools
from onnxopt.testing.conformance.cases import Case

__all__ = [
    "STATUSES",
    "Outcome",
    "check_original",
    "evaluate",
    "format_table",
    "run_tasks",
    "summarize",
]

STATUSES = (
    "transformed-ok",
    "unchanged-with-reason",
    "unchanged",
    "crashed",
    "invalid",
    "wrong",
    "timeout",
)
BAD = ("crashed", "invalid", "wrong", "timeout")


@dataclasses.dataclass
class Outcome:
    """The verdict on one (case, tool) pair; tool ``original`` is the eligibility check."""

    case: str
    tool: str
    status: str
    detail: str = ""
    seconds: float = 0.0


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return f"{type(err).__name__}: {text[:300]}"


def _session(path: pathlib.Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 4
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(path: pathlib.Path, case: Case) -> list[list[Any]]:
    sess = _session(path)
    return [list(sess.run(None, feed)) for feed, _ in case.data_sets]


def _mismatch(expected: Any, got: Any, kind: str, rtol: float, atol: float, where: str) -> str | None:
    """Why ``got`` does not match ``expected`` under the tolerance ``kind``; None when it does."""
    if isinstance(expected, (list, tuple)) or expected is None:
        if expected is None or got is None:
            return None if expected is None and got is None else f"{where}: optional presence differs"
        if not isinstance(got, (list, tuple)) or len(got) != len(expected):
            return f"{where}: sequence differs"
        for i, (e, g) in enumerate(zip(expected, got, strict=True)):
            why = _mismatch(e, g, kind, rtol, atol, f"{where}[{i}]")
            if why:
                return why
        return None
    exp = np.asarray(expected)
    out = np.asarray(got)
    if exp.shape != out.shape:
        return f"{where}: shape {list(out.shape)}, expected {list(exp.shape)}"
    if exp.dtype == object or out.dtype == object:
        return None if np.array_equal(exp.astype(str), out.astype(str)) else f"{where}: strings differ"
    if exp.dtype != out.dtype:
        return f"{where}: dtype {out.dtype}, expected {exp.dtype}"
    if exp.dtype.kind not in "fc" and exp.dtype.kind in "biu":
        return None if np.array_equal(exp, out) else f"{where}: integer/bool values differ"
    e = exp.astype(np.float64)
    o = out.astype(np.float64)
    if np.allclose(o, e, rtol=rtol, atol=atol, equal_nan=True):
        return None
    if kind == "lossless":
        err = float(np.nanmax(np.abs(o - e))) if e.size else 0.0
        return f"{where}: max abs error {err:.3g} > rtol={rtol:g}, atol={atol:g}"
    if kind == "fp16":
        scale = max(1.0, float(np.nanmax(np.abs(e[np.isfinite(e)]))) if np.isfinite(e).any() else 1.0)
        if np.allclose(o, e, rtol=1e-2, atol=1e-3 * scale, equal_nan=True):
            return None
        err = float(np.nanmax(np.abs(o - e)))
        return f"{where}: fp16 max abs error {err:.3g} > rtol=1e-2, atol={1e-3 * scale:.3g}"
    finite = np.isfinite(e)
    if not np.array_equal(finite, np.isfinite(o)) or not np.array_equal(e[~finite], o[~finite], equal_nan=True):
        return f"{where}: non-finite values differ"
    a, b = e[finite], o[finite]
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    cos = 1.0 if na == nb == 0 else (float(a @ b) / (na * nb) if na and nb else 0.0)
    rel = float(np.linalg.norm(a - b) / na) if na else (0.0 if nb == 0 else np.inf)
    if cos >= _tools.LOSSY_MIN_COSINE and rel <= _tools.LOSSY_MAX_REL_L2:
        return None
    return f"{where}: cosine {cos:.4f}, relative L2 {rel:.3g} (need >= {_tools.LOSSY_MIN_COSINE}, <= {_tools.LOSSY_MAX_REL_L2})"


def _compare(case: Case, results: list[list[Any]], kind: str, rtol: float, atol: float) -> str | None:
    for k, ((_, expected), got) in enumerate(zip(case.data_sets, results, strict=True)):
        if len(got) != len(expected):
            return f"data set {k}: {len(got)} outputs, expected {len(expected)}"
        for i, (e, g) in enumerate(zip(expected, got, strict=True)):
            why = _mismatch(e, g, kind, rtol, atol, f"data set {k} output {i}")
            if why:
                return why
    return None


def _full_check(path: pathlib.Path) -> None:
    import onnx

    onnx.checker.check_model(str(path), full_check=True)


def check_original(case: Case) -> Outcome:
    """Eligibility: ``eligible`` (detail says if the full checker fails) or ``ineligible``."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onnxopt-conf-") as tmp:
        path = pathlib.Path(tmp) / "model.onnx"
        path.write_bytes(case.model)
        try:
            results = _run(path, case)
        except Exception as err:  # any onnxruntime failure makes the case ineligible
            return Outcome(case.key, "original", "ineligible", _one_line(err), time.perf_counter() - t0)
        why = _compare(case, results, "lossless", case.rtol, case.atol)
        if why:
            return Outcome(case.key, "original", "ineligible", why, time.perf_counter() - t0)
        try:
            _full_check(path)
            detail = ""
        except Exception as err:  # recorded: outputs of this case are then checked without full_check
            detail = f"full checker fails on the original: {_one_line(err)}"
    return Outcome(case.key, "original", "eligible", detail, time.perf_counter() - t0)


def evaluate(
    case: Case, tool: str, original_full_check: bool = True, keep: pathlib.Path | None = None
) -> Outcome:
    """Run ``tool`` on ``case`` and classify the result (runs inside a worker process).

    ``keep``: copy the tool's output model there (for further checks by the caller).
    """
    t0 = time.perf_counter()
    kind, (p_rtol, p_atol) = _tools.tool_kind(tool)
    rtol, atol = max(case.rtol, p_rtol), max(case.atol, p_atol)
    with tempfile.TemporaryDirectory(prefix="onnxopt-conf-") as tmp:
        src = pathlib.Path(tmp) / "in" / "model.onnx"
        dst = pathlib.Path(tmp) / "out" / "model.onnx"
        src.parent.mkdir()
        dst.parent.mkdir()
        src.write_bytes(case.model)
        feeds = [feed for feed, _ in case.data_sets]

        def done(status: str, detail: str = "") -> Outcome:
            return Outcome(case.key, tool, status, detail, time.perf_counter() - t0)

        try:
            result = _tools.apply_tool(tool, src, dst, feeds)
        except Exception as err:  # the tool's crash is what we count
            refusal = _refusal(err)
            if refusal is not None:
                return done("unchanged-with-reason", f"refused: {refusal}")
            return done("crashed", f"{_one_line(err)} [{_where(err)}]")
        if keep is not None and dst.exists():
            keep.write_bytes(dst.read_bytes())  # the tools under test write one self-contained file
        if src.read_bytes() != case.model:
            return done("invalid", "the tool modified its input file")
        try:
            import onnx

            onnx.load(str(dst))
            if original_full_check:
                _full_check(dst)
            results = _run(dst, case)
        except Exception as err:  # load, checker or onnxruntime failure: the output is invalid
            return done("invalid", _one_line(err))
        why = _compare(case, results, kind, rtol, atol)
        if why:
            return done("wrong", why)
        if result.modified:
            return done("transformed-ok")
        if result.reasons:
            return done("unchanged-with-reason", result.reasons[:300])
        return done("unchanged")


def _where(err: BaseException) -> str:
    """``file:line`` where it failed, and the innermost frame of onnxopt code if elsewhere."""
    frames = traceback.extract_tb(err.__traceback__)
    cause = err.__cause__ or err.__context__
    if cause is not None and cause.__traceback__ is not None:
        frames += traceback.extract_tb(cause.__traceback__)
    last = frames[-1]
    text = f"{pathlib.Path(last.filename).name}:{last.lineno}"
    ours = [
        f"{pathlib.Path(f.filename).name}:{f.lineno} ({f.name})"
        for f in frames
        if ("/onnxopt/" in f.filename or "/passes/" in f.filename) and not f.filename.endswith(
            ("pipeline.py", "pass_base.py", "tools.py")
        )
    ]
    if ours:
        text += " via " + " > ".join(dict.fromkeys(ours[-4:]))
    return text


def _refusal(err: BaseException) -> str | None:
    """A documented refusal, not a crash: ``requires()`` raising PreconditionError, or a typed
    one-line ``OnnxOptError`` (e.g. a missing optional dependency)."""
    import onnx_ir as ir

    from onnxopt.errors import OnnxOptError

    for e in (err, err.__cause__):
        if isinstance(e, (ir.passes.PreconditionError, OnnxOptError)):
            return _one_line(e)
    return None


def _init_worker() -> None:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)


def run_tasks(
    tasks: Sequence[tuple[Case, str, bool]],
    *,
    workers: int = 2,
    timeout: float = 120.0,
    quiet: bool = False,
    desc: str = "cases",
) -> list[Outcome]:
    """Run (case, tool, original_full_check) tasks in a process pool with a per-task timeout.

    ``tool == "original"`` runs the eligibility check. A worker that passes the timeout or dies
    is replaced (pebble kills it); its task is ``timeout`` or ``crashed``.
    """
    import multiprocessing

    import pebble
    import tqdm

    outcomes: list[Outcome] = []
    ctx = multiprocessing.get_context("spawn")  # a clean process: no onnxruntime state forked
    with pebble.ProcessPool(max_workers=workers, max_tasks=500, initializer=_init_worker, context=ctx) as pool:
        futures = {}
        for case, tool, full in tasks:
            if tool == "original":
                fut = pool.schedule(check_original, args=(case,), timeout=timeout)
            else:
                fut = pool.schedule(evaluate, args=(case, tool, full), timeout=timeout)
            futures[fut] = (case, tool)
        bar = tqdm.tqdm(total=len(futures), desc=desc, unit="task", disable=quiet)
        for fut in concurrent.futures.as_completed(futures):
            case, tool = futures[fut]
            try:
                outcomes.append(fut.result())
            except concurrent.futures.TimeoutError:
                outcomes.append(Outcome(case.key, tool, "timeout", f"more than {timeout:g} s", timeout))
            except pebble.ProcessExpired as err:
                outcomes.append(Outcome(case.key, tool, "crashed", f"worker died: {err}"))
            except Exception as err:  # an error raised while reporting back (e.g. unpicklable)
                outcomes.append(Outcome(case.key, tool, "crashed", f"harness: {_one_line(err)}"))
            bar.update(1)
        bar.close()
    return sorted(outcomes, key=lambda o: (o.tool, o.case))


def summarize(outcomes: Iterable[Outcome]) -> dict[str, collections.Counter[str]]:
    """Counts per tool: ``tried`` and one entry per status."""
    counts: dict[str, collections.Counter[str]] = {}
    for o in outcomes:
        c = counts.setdefault(o.tool, collections.Counter())
        c["tried"] += 1
        c[o.status] += 1
    return counts


def format_table(counts: dict[str, collections.Counter[str]], tools: Sequence[str]) -> str:
    """A markdown table: one row per tool, with the share of tried cases that came out correct."""
    head = ["tool", "tried", *STATUSES, "valid & correct"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for tool in tools:
        c = counts.get(tool, collections.Counter())
        tried = c["tried"]
        good = tried - sum(c[s] for s in BAD)
        share = f"{100.0 * good / tried:.1f}%" if tried else "-"
        lines.append("| " + " | ".join([tool, str(tried), *(str(c[s]) for s in STATUSES), share]) + " |")
    return "\n".join(lines)
