"""The one latency timer (onnxopt.runtime.latency): run order, warm-up, time budget, the shapes.

The order tests wrap real onnxruntime sessions in a recorder that logs which model ran; the
sessions themselves run (nothing of onnxruntime is replaced). The timing tests compare a model
with one MatMul against one with 16 chained MatMuls of the same size: the second does 16x the
arithmetic. One MatMul is 2 * 256^3 = 33.5 Mflop, at least 0.15 ms even at an AVX-512 core's
peak (~220 Gflop/s), against tens of microseconds of per-run overhead, so the expected ratio is
above 10; a median that inverts it needs most runs of one model slowed by about that factor
relative to the other's, which interleaved runs on a loaded machine do not produce.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.runtime import latency, sessions

SIZE = 256


def _chain(n: int) -> ir.Model:
    """y = x @ W @ W ... (n MatMuls), W scaled so values stay O(1)."""
    noise = np.random.default_rng(0).standard_normal((SIZE, SIZE))
    w = (np.eye(SIZE) + 0.01 * noise).astype(np.float32)
    w /= np.linalg.norm(w, 2)
    names = ["x", *(f"h{i}" for i in range(1, n)), "y"]
    nodes = [helper.make_node("MatMul", [names[i], "w"], [names[i + 1]]) for i in range(n)]
    graph = helper.make_graph(
        nodes,
        f"chain{n}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [SIZE, SIZE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [SIZE, SIZE])],
        [numpy_helper.from_array(w, "w")],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


FEED = {"x": np.random.default_rng(1).standard_normal((SIZE, SIZE)).astype(np.float32)}


class _Recorder:
    """A real session handle that also logs its label on every run."""

    def __init__(self, handle: sessions.SessionHandle, label: str, log: list[str]) -> None:
        self.handle, self.label, self.log = handle, label, log

    def run(self, feed):
        self.log.append(self.label)
        return self.handle.run(feed)


@pytest.fixture
def pair():
    log: list[str] = []
    with sessions.session(_chain(1)) as a, sessions.session(_chain(1)) as b:
        yield [_Recorder(a, "a", log), _Recorder(b, "b", log)], log


@pytest.mark.parametrize(
    ("order", "timed"),
    [("interleaved", list("abababab")), ("alternating", list("abbaabba"))],
)
def test_time_runs_warms_up_then_runs_in_order(pair, order, timed):
    handles, log = pair
    times = latency.time_runs(handles, FEED, runs=4, warmup=2, order=order)
    assert log == list("abab") + timed
    assert [len(t) for t in times] == [4, 4]
    assert all(t > 0 for per in times for t in per)


def test_budget_shrinks_runs_and_uses_the_probe_round_as_warm_up(pair):
    handles, log = pair
    # No round fits a zero budget: the floor of 3 runs, the probe round as the only warm-up.
    times = latency.time_runs(handles, FEED, runs=50, warmup=5, budget_s=0.0)
    assert [len(t) for t in times] == [3, 3]
    assert log == list("ab") + list("ababab")
    # A budget that fits everything changes nothing but the extra probe round.
    log.clear()
    times = latency.time_runs(handles, FEED, runs=4, warmup=2, budget_s=1e9)
    assert [len(t) for t in times] == [4, 4]
    assert log == list("ab") + list("abab") + list("abababab")


def test_median_p90():
    with sessions.session(_chain(1), opt_level="all") as handle:
        median, p90 = latency.median_p90(handle, FEED, runs=9, warmup=1)
    assert 0 < median <= p90


def test_medians_in_the_order_given():
    light, heavy = latency.medians([_chain(1), _chain(16)], FEED, runs=7, warmup=1)
    assert 0 < light < heavy
    heavy2, light2 = latency.medians([_chain(16), _chain(1)], FEED, runs=7, warmup=1)
    assert 0 < light2 < heavy2


def test_medians_above_the_in_memory_limit_time_one_model_at_a_time(monkeypatch):
    live, most = [0], [0]
    make = sessions.make_session

    def counting(*args, **kwargs):
        handle = make(*args, **kwargs)
        live[0] += 1
        most[0] = max(most[0], live[0])
        close = handle.close

        def closing():
            live[0] -= 1
            close()

        handle.close = closing
        return handle

    monkeypatch.setattr(sessions, "make_session", counting)
    models = [_chain(1), _chain(2)]
    assert len(latency.medians(models, FEED, runs=3, warmup=0)) == 2
    assert most[0] == 2  # below the limit: both live, timed interleaved
    both = sum(map(sessions._io.model_nbytes, models))
    monkeypatch.setattr(sessions, "_IN_MEMORY_LIMIT", both - 1)
    most[0] = 0
    assert len(latency.medians(models, FEED, runs=3, warmup=0)) == 2
    assert most[0] == 1 and live[0] == 0


def test_paired_ratio_is_candidate_over_reference():
    ref_ms, ratio = latency.paired_ratio(_chain(1), _chain(16), FEED, 7)
    assert ref_ms > 0 and ratio > 1
    ref_ms, ratio = latency.paired_ratio(_chain(16), _chain(1), FEED, 7)
    assert ref_ms > 0 and 0 < ratio < 1


def test_runs_on_and_the_in_memory_limit(monkeypatch):
    model = _chain(2)
    assert sessions.runs_on(model, [FEED])
    assert sessions.runs_on(model, [FEED], "all")
    assert not sessions.runs_on(model, [{"x": np.zeros((3, 3), np.float32)}])  # wrong shape
    assert not sessions.runs_on(onnx.ModelProto().SerializeToString(), [FEED])  # no graph
    nbytes = sessions._io.model_nbytes(model)
    assert sessions.in_memory_limit() == sessions._IN_MEMORY_LIMIT > nbytes
    assert sessions.fits_in_memory(model) and sessions.fits_in_memory()
    monkeypatch.setattr(sessions, "_IN_MEMORY_LIMIT", nbytes)
    assert sessions.in_memory_limit() == nbytes
    assert sessions.fits_in_memory(model)
    assert not sessions.fits_in_memory(model, model)  # together above it
