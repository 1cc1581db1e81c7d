"""onnxruntime sessions: provider names, threads, optimisation level, models of any size."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxopt import io as _io
from onnxopt.errors import ProviderError

__all__ = [
    "PROVIDER_ALIASES",
    "OptLevel",
    "SessionHandle",
    "available_providers",
    "capture",
    "fits_in_memory",
    "in_memory_limit",
    "make_session",
    "resolve_providers",
    "run_all",
    "runs_on",
    "session",
]

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}
OptLevel = Literal["disable", "basic", "extended", "all"]
_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
# The one in-memory limit, in weight bytes (see in_memory_limit). Code reads it through
# in_memory_limit() / fits_in_memory(); tests lower it with monkeypatch.
_IN_MEMORY_LIMIT = 256_000_000


def in_memory_limit() -> int:
    """Weight bytes above which a model goes to onnxruntime and the checker as a saved copy.

    Below it a model travels as serialized bytes, and two sessions may be live at once; above
    it onnxopt saves a copy with external data, turns the CPU arena off and times one model at
    a time (a protobuf plus its bytes are two more copies of every weight in RAM, and above
    2 GB one protobuf cannot hold the model at all).
    """
    return _IN_MEMORY_LIMIT


def fits_in_memory(*models: ir.Model) -> bool:
    """Whether the weights of ``models``, together, stay within :func:`in_memory_limit`."""
    return sum(_io.model_nbytes(m) for m in models) <= _IN_MEMORY_LIMIT


def available_providers() -> list[str]:
    """Execution providers of the installed onnxruntime build."""
    return list(ort.get_available_providers())


def resolve_providers(names: Iterable[str], *, require: bool = False) -> tuple[list[str], list[str]]:
    """Map short names (cpu, cuda, tensorrt) to provider names; split into (available, skipped).

    Raises:
        ProviderError: an unknown name, or (``require=True``) a provider that is not available.
    """
    have = set(available_providers())
    ok, skipped = [], []
    for name in names:
        full = PROVIDER_ALIASES.get(name.lower(), name)
        if not full.endswith("ExecutionProvider"):
            raise ProviderError(
                f"unknown execution provider {name!r}; use one of {', '.join(PROVIDER_ALIASES)}"
            )
        if full in have:
            ok.append(full)
        elif require:
            raise ProviderError(
                f"execution provider {full} is not available (installed onnxruntime has: "
                f"{', '.join(sorted(have))})"
            )
        else:
            skipped.append(full)
    return ok, skipped


class SessionHandle:
    """An InferenceSession plus the temp folder (if any) that holds its model file."""

    def __init__(self, session: ort.InferenceSession, tmp_dir: pathlib.Path | None) -> None:
        self.session = session
        self._tmp_dir = tmp_dir
        self.output_names = [o.name for o in session.get_outputs()]

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one feed; outputs by name."""
        return dict(zip(self.output_names, self.session.run(None, feed)))

    def close(self) -> None:
        """Drop the session and its temp files."""
        self.session = None  # type: ignore[assignment]
        if self._tmp_dir is not None:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
            self._tmp_dir = None

    def __enter__(self) -> SessionHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_session(
    model: ir.Model | str | os.PathLike | bytes,
    provider: str = "CPUExecutionProvider",
    *,
    threads: int | None = None,
    opt_level: OptLevel = "disable",
    optimized_model_path: str | os.PathLike | None = None,
    priority_order: bool = False,
    low_memory: bool | None = None,
) -> SessionHandle:
    """An onnxruntime session on ``model`` (an ir.Model, a path or serialized bytes).

    ``opt_level`` defaults to "disable" so that validation compares the graphs as written;
    "all" measures what a deployment gets. ``low_memory`` turns onnxruntime's CPU memory arena
    off and runs nodes in graph order: a float16 model on CPU casts its weights to float32 at
    run time, and in the default order all those casts run first, then stay in the arena (a
    2.4 GB model peaked at 6.2 GB for one run, 1.5 GB this way); ``None`` does so for an
    ir.Model or bytes above :func:`in_memory_limit` (a path's caller says).
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = _LEVELS[opt_level]
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    if priority_order:  # run nodes in graph order: instrumented models free activations early
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    if low_memory is None:
        low_memory = _nbytes(model) > in_memory_limit()
    if low_memory:
        options.enable_cpu_mem_arena = False
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    tmp_dir = None
    target: str | bytes
    if isinstance(model, ir.Model):
        # External tensors keep a relative location that onnxruntime cannot resolve for a model
        # given as bytes, so such models go through a temp folder too.
        if not fits_in_memory(model) or _io.external_tensors(model):
            tmp_dir = pathlib.Path(tempfile.mkdtemp(prefix="onnxopt-session-"))
            _io.save_model(model, tmp_dir / "model.onnx", external_data=True)
            target = str(tmp_dir / "model.onnx")
        else:
            target = ir.to_proto(model).SerializeToString()
    elif isinstance(model, bytes):
        target = model
    else:
        target = str(model)
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(target, options, providers=providers)
    except Exception:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return SessionHandle(session, tmp_dir)


def _nbytes(model: ir.Model | str | os.PathLike | bytes) -> int:
    """Weight bytes of an ir.Model, length of bytes, 0 for a path (its caller decides)."""
    if isinstance(model, ir.Model):
        return _io.model_nbytes(model)
    return len(model) if isinstance(model, bytes) else 0


def run_all(handle: SessionHandle, feeds: Iterable[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Run every feed; a list of output dicts."""
    return [handle.run(feed) for feed in feeds]


def runs_on(
    model: ir.Model | str | os.PathLike | bytes,
    feeds: Iterable[dict[str, np.ndarray]],
    opt_level: OptLevel = "disable",
) -> bool:
    """Whether onnxruntime runs ``model`` on every one of ``feeds`` (CPU, ``opt_level``).

    Any failure counts as "does not run": callers use this to tell a model that cannot run on
    generated feeds from an error of their own.
    """
    try:
        with session(model, opt_level=opt_level) as handle:
            run_all(handle, feeds)
    except Exception:  # onnxruntime raises its own Fail/InvalidArgument/... types
        return False
    return True


@contextlib.contextmanager
def session(model: ir.Model | str | os.PathLike | bytes, provider: str = "CPUExecutionProvider", **kw):
    """Context-managed :func:`make_session`."""
    handle = make_session(model, provider, **kw)
    try:
        yield handle
    finally:
        handle.close()


def output_names(model: ir.Model) -> Sequence[str]:
    """Names of the graph outputs."""
    return [v.name for v in model.graph.outputs]


def with_outputs(model: ir.Model, names: Sequence[str]) -> ir.Model:
    """A copy of ``model`` whose graph also outputs the main-graph values ``names``.

    Raises:
        KeyError: a name that is not a value of the main graph.
    """
    clone = model.clone()
    values = {v.name: v for v in clone.graph.inputs}
    for node in clone.graph:
        for out in node.outputs:
            if out.name:
                values[out.name] = out
    existing = {v.name for v in clone.graph.outputs}
    for name in names:
        if name in existing or name in {v.name for v in clone.graph.inputs}:
            continue
        if name not in values:
            raise KeyError(f"no value named {name!r} in the main graph")
        clone.graph.outputs.append(values[name])
        existing.add(name)
    return clone


def capture(
    model: ir.Model,
    feeds: Iterable[dict[str, np.ndarray]],
    names: Sequence[str],
    *,
    provider: str = "CPUExecutionProvider",
    threads: int | None = None,
    opt_level: OptLevel = "disable",
    priority_order: bool = False,
) -> Iterable[dict[str, np.ndarray]]:
    """Yield, per feed, the values ``names`` (intermediate tensors, inputs or outputs).

    The model is instrumented in memory (values exposed as extra outputs on a clone); nothing
    is written to disk for models under the protobuf limit. One session serves every feed, and
    only one feed's tensors are alive at a time, so memory stays bounded by the model. When only
    graph inputs are asked for, they are read off the feeds and no session is built.
    """
    wanted = list(dict.fromkeys(names))
    if set(wanted) <= {v.name for v in model.graph.inputs}:  # only inputs (an embedding's ids): nothing to run
        for feed in feeds:
            yield {n: feed[n] for n in wanted if n in feed}
        return
    instrumented = with_outputs(model, wanted)
    kw = {"threads": threads, "opt_level": opt_level, "priority_order": priority_order}
    with session(instrumented, provider, **kw) as handle:
        fetch = [n for n in wanted if n in handle.output_names]
        for feed in feeds:
            outs = dict(zip(fetch, handle.session.run(fetch, feed)))
            for n in wanted:
                if n not in outs and n in feed:
                    outs[n] = feed[n]
            yield outs
