"""Run plan trials on the screening graph: in this process, on a local process pool, or on Ray.

Every worker loads the screening model, the feeds and the reference outputs once (a process
pool's initializer; Ray: one object-store copy handed to each actor); a trial ships only its
boolean switches and returns a :class:`~onnxopt.quant.sensitivity.Measurement`. Sessions run
with one intra-op thread in every mode, so a trial's numbers do not depend on the mode or the
number of workers: the planner's decisions, and so its plan, are the same serial or parallel.
Trial-level parallelism is used instead of onnxruntime's intra-op threads because screening
runs many small independent jobs, which split across cores with no synchronisation.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import multiprocessing
import os
import pickle
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from onnxopt.errors import OnnxOptError
from onnxopt.quant.sensitivity import Budget, Measurement, measure
from onnxopt.runtime import sessions

__all__ = ["Runner", "WorkerSpec", "check_available", "cpu_count", "make_runner", "map_tasks", "parse_workers", "ray_installed"]

Feeds = list[dict[str, np.ndarray]]
Outputs = list[dict[str, np.ndarray]]
Switches = dict[str, np.ndarray]

_RAY_HINT = "pip install 'onnxopt[ray]'"


def cpu_count() -> int:
    """Cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """Where trials run: ``local`` processes (``count``; 1 = this process) or ``ray`` (``address``)."""

    kind: str = "local"
    count: int = 1
    address: str | None = None

    def describe(self) -> str:
        """``2 local workers``, ``ray (local)``, ``ray at ray://host:10001``."""
        if self.kind == "ray":
            return f"ray at {self.address}" if self.address else "ray (local)"
        return "in process" if self.count <= 1 else f"{self.count} local worker processes"


def parse_workers(spec: int | str | None) -> WorkerSpec:
    """``None``/"" (all cores), ``N``, ``"ray"`` or ``"ray://HOST:PORT"`` -> WorkerSpec.

    Raises:
        ValueError: anything else (one line naming the value).
    """
    if spec is None or spec == "":
        return WorkerSpec("local", cpu_count())
    if isinstance(spec, int) or (isinstance(spec, str) and spec.strip().isdigit()):
        n = int(spec)
        if n < 1:
            raise ValueError(f"workers must be >= 1, 'ray' or 'ray://HOST:PORT', got {spec!r}")
        return WorkerSpec("local", n)
    text = str(spec).strip()
    if text == "ray":
        return WorkerSpec("ray")
    if text.startswith("ray://") and len(text) > len("ray://"):
        return WorkerSpec("ray", address=text)
    raise ValueError(f"workers must be a number, 'ray' or 'ray://HOST:PORT', got {spec!r}")


def ray_installed() -> bool:
    """Whether Ray can be imported (without importing it: that takes seconds)."""
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def check_available(spec: WorkerSpec) -> None:
    """Raise OnnxOptError (one line naming the extra) when ``spec`` needs Ray and it is missing."""
    if spec.kind == "ray" and not ray_installed():
        raise OnnxOptError(f"--workers {spec.address or 'ray'} needs Ray: {_RAY_HINT}")


class _Worker:
    """One session on the screening model with the feeds and references of each data set."""

    def __init__(self, model: bytes, feeds: Mapping[str, Feeds], refs: Mapping[str, Outputs], budget: Budget) -> None:
        self.handle = sessions.make_session(model, threads=1, opt_level="basic")
        self.feeds = feeds
        self.refs = refs
        self.budget = budget
        self._cache: dict[str, dict] = {}  # per data set: the reference outputs in float64 (measure)
        # One warm-up run (every switch off) so that no worker's first trial pays onnxruntime's
        # first-run allocations: trials then cost the same on every worker and in every mode.
        first = next((f[0] for f in feeds.values() if f), None)
        if first is not None:
            switches = {i.name: np.array(False) for i in self.handle.session.get_inputs()
                        if i.name not in first and i.type == "tensor(bool)"}  # fmt: skip
            self.handle.run({**first, **switches})

    def run(self, data: str, switches: Switches) -> Measurement:
        outs = [self.handle.run({**feed, **switches}) for feed in self.feeds[data]]
        return measure(self.refs[data], outs, self.budget, self._cache.setdefault(data, {}))


_WORKER: _Worker | None = None  # the pool process's worker (set by its initializer)
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def _one_thread_env() -> Any:
    """Spawned workers inherit one BLAS/OpenMP thread each: a worker is one core's job (numpy's
    dot in a trial's comparison otherwise starts threads on the cores the other workers use)."""
    saved = {k: os.environ.get(k) for k in _THREAD_VARS}
    os.environ.update(dict.fromkeys(_THREAD_VARS, "1"))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _init(model: bytes, feeds: Mapping[str, Feeds], refs: Mapping[str, Outputs], budget: Budget) -> None:
    global _WORKER  # noqa: PLW0603 -- one worker per pool process, built once
    _WORKER = _Worker(model, feeds, refs, budget)


def _run(task: tuple[str, Switches]) -> Measurement:
    assert _WORKER is not None
    return _WORKER.run(*task)


class Runner:
    """Runs batches of trials; results in submission order, the same in every mode."""

    def __init__(
        self,
        model: bytes,
        feeds: Mapping[str, Feeds],
        refs: Mapping[str, Outputs],
        budget: Budget,
        spec: WorkerSpec,
    ) -> None:
        self.spec = spec
        self.note = ""
        self._local: _Worker | None = None
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._ray: Any = None
        self._ray_started = False
        args = (model, dict(feeds), dict(refs), budget)
        if spec.kind != "local" or spec.count > 1:
            try:
                pickle.dumps(budget)
            except (pickle.PicklingError, AttributeError, TypeError) as err:
                self.note = f"trials run in this process: the budget's metric cannot be sent to workers ({err})"
                self.spec = WorkerSpec("local", 1)
        if self.spec.kind == "ray":
            self._start_ray(args)
        elif self.spec.count > 1:
            # spawn, not fork: onnxruntime's thread pools in this process do not survive a fork.
            self._pool = _spawn_pool(self.spec.count, _init, args)
        else:
            self._local = _Worker(*args)

    @property
    def workers(self) -> int:
        """How many trials run at once."""
        if self._ray is not None:
            return len(self._ray[1])
        return self.spec.count if self._pool is not None else 1

    def _start_ray(self, args: tuple) -> None:
        ray, self._ray_started = _ray_start(self.spec)
        n = max(1, int(ray.cluster_resources().get("CPU", 1)))
        refs = [ray.put(a) for a in args]  # one object-store copy, read by every actor
        actor = ray.remote(num_cpus=1)(_Worker)
        actors = [actor.remote(*refs) for _ in range(n)]
        self._ray = (ray, actors)

    def measure(self, data: str, trials: Sequence[Switches]) -> list[Measurement]:
        """Measure each trial's switches on the data set ``data`` ("screen", ...)."""
        tasks = [(data, t) for t in trials]
        if self._local is not None:
            return [self._local.run(*t) for t in tasks]
        if self._pool is not None:
            return list(self._pool.map(_run, tasks))
        ray, actors = self._ray
        futures = [actors[i % len(actors)].run.remote(*t) for i, t in enumerate(tasks)]
        return list(ray.get(futures))

    def close(self) -> None:
        """Stop the workers (and a Ray runtime this runner started)."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
        if self._ray is not None:
            ray, actors = self._ray
            for a in actors:
                ray.kill(a)
            if self._ray_started:
                ray.shutdown()
            self._ray = None
        self._local = None

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_runner(
    model: bytes, feeds: Mapping[str, Feeds], refs: Mapping[str, Outputs], budget: Budget, spec: WorkerSpec
) -> Runner:
    """A :class:`Runner` (the model is serialized once, by the caller)."""
    return Runner(model, feeds, refs, budget, spec)


def map_tasks(fn: Any, tasks: Sequence[tuple], spec: WorkerSpec, shared: Any = None) -> list[Any]:
    """``[fn(shared, *task) for task in tasks]`` on ``spec``'s workers, results in task order.

    ``shared`` (a model, say) travels once per worker process (a pool) or once to the object
    store (Ray), each task only with its own arguments. ``fn`` must be importable (module level).
    Used for data-parallel work such as calibration shards, whose results the caller merges.
    """
    if not tasks:
        return []
    if spec.kind == "local" and (spec.count <= 1 or len(tasks) == 1):
        return [fn(shared, *t) for t in tasks]
    if spec.kind == "ray":
        ray, started = _ray_start(spec)
        try:
            ref = ray.put(shared)
            remote = ray.remote(num_cpus=1)(fn)
            return list(ray.get([remote.remote(ref, *t) for t in tasks]))
        finally:
            if started:
                ray.shutdown()
    with _spawn_pool(min(spec.count, len(tasks)), _init_shared, (shared,)) as pool:
        return list(pool.map(_call_shared, [(fn, t) for t in tasks]))


def _ray_start(spec: WorkerSpec) -> tuple[Any, bool]:
    """The ray module, initialised for ``spec`` (local or ``ray://``); whether this call started it."""
    try:
        import ray
    except ImportError as err:
        raise OnnxOptError(f"--workers ray needs Ray: {_RAY_HINT}") from err
    if ray.is_initialized():
        return ray, False
    if spec.address:
        ray.init(address=spec.address, ignore_reinit_error=True, logging_level="ERROR")
    else:
        ray.init(num_cpus=cpu_count(), include_dashboard=False, ignore_reinit_error=True,
                 logging_level="ERROR", log_to_driver=False)  # fmt: skip
    return ray, True


def _spawn_pool(count: int, initializer: Any, initargs: tuple) -> concurrent.futures.ProcessPoolExecutor:
    """``count`` spawned processes, all started now with one BLAS/OpenMP thread each.

    spawn, not fork: onnxruntime's thread pools in this process do not survive a fork. A spawn
    pool starts its processes on demand, so ``count`` tasks are submitted while the environment
    holds, one process each.
    """
    ctx = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(count, ctx, initializer=initializer, initargs=initargs)
    with _one_thread_env():
        list(pool.map(int, range(count)))
    return pool


_SHARED: Any = None  # map_tasks' shared argument in a pool process (set by its initializer)


def _init_shared(shared: Any) -> None:
    global _SHARED  # noqa: PLW0603 -- one copy per pool process
    _SHARED = shared


def _call_shared(job: tuple[Any, tuple]) -> Any:
    fn, task = job
    return fn(_SHARED, *task)
