"""mixed at scale: the switch graph matches real builds, plans do not depend on workers, time budget."""

from __future__ import annotations

import numpy as np
import pytest
from onnxopt.passes import mixed
from onnxopt.passes.mixed import MixedConfig, MixedPass, int8_quantizer

from onnxopt import _ir_utils, pipeline
from onnxopt.context import PassContext
from onnxopt.quant import planner as precision_plan
from onnxopt.quant import screening, sensitivity, trials
from onnxopt.runtime import data, sessions
from tests.conftest import load_model, model_path

FAST = {"latency_runs": 0, "plan_feeds": 4, "eval_feeds": 8, "sqnr_feeds": 2, "plots": False}


def _transformer() -> tuple:
    model = load_model("digits_transformer.onnx")
    sig = data.input_signature(model)
    calib = data.load_data(model_path("digits_transformer_calib.npz"), sig).take(8)
    evald = data.load_data(model_path("digits_transformer_eval.npz"), sig).take(8)
    return model, calib, evald


def _plan(report) -> dict[str, str]:
    return {r["item"]: r["precision"] for r in report.records if "precision" in r}


def _summary(report) -> dict:
    return next(r for r in report.records if r["item"] == mixed.SUMMARY)


def _budget(model, calib, evald) -> float:
    """Half-way between full INT8's cosine on the evaluation feeds and 1: full INT8 misses it."""
    ctx = PassContext(calibration=calib, quiet=True)
    named = model.clone()
    _ir_utils.upgrade_opset(named, 13)
    precision_plan.name_nodes(named)
    int8 = int8_quantizer(ctx)(named.clone(), frozenset())
    feeds = list(evald)
    ref = sensitivity.run_outputs(named, feeds)
    cos8 = sensitivity.measure(ref, sensitivity.run_outputs(int8, feeds), sensitivity.Budget(min_cosine=0.0)).cosine
    assert cos8 < 1.0
    return 1 - (1 - cos8) / 2


@pytest.mark.parametrize("switch", ["where", "if"])
def test_switch_graph_reproduces_full_int8_and_float_exactly(switch):
    """All switches on: the real full-INT8 model's outputs; all off: the float model's (same session).
    ``if``: every activation switched by an If with its Q/DQ in the then-branch (large tensors)."""
    model, calib, _ = _transformer()
    _ir_utils.upgrade_opset(model, 13)
    precision_plan.name_nodes(model)
    ctx = PassContext(calibration=calib, quiet=True)
    quantize = int8_quantizer(ctx)
    full = quantize(model.clone(), frozenset())
    candidates = precision_plan.quantized_nodes(full)
    smoothed = quantize(model.clone(), frozenset(candidates))
    sizes = {v.name: 1 << 30 for n in full.graph for v in n.inputs if v is not None} if switch == "if" else None
    screen = screening.build(full, smoothed, candidates, sizes=sizes)
    ifs = sum(n.op_type == "If" for n in screen.model.graph)
    assert (ifs > 10) if switch == "if" else (ifs == 0)
    assert 1 < len(screen.groups) <= len(candidates)
    assert sorted(n for names in screen.groups.values() for n in names) == sorted(candidates)
    feeds = list(calib.take(4))
    with sessions.session(screen.model) as handle:
        on = [handle.run({**f, **screen.feed(dict.fromkeys(screen.groups, "int8"))}) for f in feeds]
        off = [handle.run({**f, **screen.feed({})}) for f in feeds]
    # Same ops on the same values in the same session settings (graph as written): bit-exact.
    for got, want in ((on, sensitivity.run_outputs(full, feeds)), (off, sensitivity.run_outputs(smoothed, feeds))):
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g["logits"], w["logits"])


@pytest.mark.parametrize("spec", [None, "0", "ray://", "x"])
def test_bad_workers_value_is_one_line_value_error(spec):
    if spec is None:
        assert trials.parse_workers(None).count == trials.cpu_count()
        return
    with pytest.raises(ValueError, match="workers must be"):
        trials.parse_workers(spec)


def _run(workers, monkeypatch=None, **options):
    if monkeypatch is not None:
        monkeypatch.setattr(mixed, "_POOL_MIN_SECONDS", 0.0)  # a pool even for this small model
    model, calib, evald = _transformer()
    budget = _budget(model, calib, evald)
    ctx = PassContext(calibration=calib, evaluation=evald, min_cosine=budget, quiet=True, workers=workers)
    result = pipeline.run(model, [MixedPass(MixedConfig(**{**FAST, **options}), ctx)], strict=True)
    return result.reports[0]


@pytest.fixture(scope="module")
def serial():
    return _run(1)


def test_two_workers_give_the_serial_plan(serial, monkeypatch):
    pooled = _run(2, monkeypatch)
    assert _summary(serial)["workers"] == "in process"
    assert _summary(pooled)["workers"] == "2 local worker processes"
    assert _summary(serial)["budget_met"] and _summary(pooled)["budget_met"]
    plan = _plan(serial)
    assert "int8" in plan.values() and "fp32" in plan.values()  # a real search, not a corner
    assert _plan(pooled) == plan
    # Every screened trial of the serial run gave the same numbers in the pool (one thread each).
    def screened(report):
        return [(r["plan"], r["loss"]) for r in report.records if str(r["item"]).startswith("plan ") and r["data"] == "screen"]
    assert set(screened(serial)) <= set(screened(pooled))


def test_ray_local_gives_the_serial_plan(serial, monkeypatch):
    pytest.importorskip("ray", reason="Ray is the optional extra: pip install 'onnxopt[ray]'")
    remote = _run("ray", monkeypatch)
    assert _summary(remote)["workers"] == "ray (local)"
    assert _plan(remote) == _plan(serial)


def test_time_budget_stops_early_and_still_writes_a_verified_model(monkeypatch, tmp_path, capsys):
    from onnxopt import cli

    out = tmp_path / "t.onnx"
    rc = cli.main([
        "optimize", str(model_path("digits_transformer.onnx")), "-o", str(out), "--recipe", "mixed",
        "--calib", str(model_path("digits_transformer_calib.npz")),
        "--eval", str(model_path("digits_transformer_eval.npz")),
        "--min-cosine", "0.99999", "--time-budget", "0.01", "--workers", "1",
    ])  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0 and out.exists()
    assert "time budget of 0.01 s reached: stopped early" in printed


def test_time_budget_must_be_positive(tmp_path, capsys):
    from onnxopt import cli

    rc = cli.main(["optimize", str(model_path("digits_mlp.onnx")), "-o", str(tmp_path / "o.onnx"), "--recipe", "mixed",
                   "--calib", str(model_path("digits_mlp_calib.npz")), "--time-budget", "0"])  # fmt: skip
    assert rc == 2
    assert "time_budget must be > 0" in capsys.readouterr().err


def test_frontier_plot_draws_screened_built_and_cut_off_plans():
    import base64
    import math

    from onnxopt.report import plots

    row = {"non_int8": 2, "size_bytes": 0, "latency_ms": None, "loss": 1e-4, "ok": True, "cut_off": False}
    rows = [
        {**row, "data": "screen"},
        {**row, "data": "evaluation", "size_bytes": 1000, "ok": False, "loss": 1e-2},
        {**row, "data": "screen", "cut_off": True, "loss": math.nan, "ok": False},
    ]
    fig = plots.frontier_figure(rows, 1e-3)
    assert base64.b64decode(fig["png_base64"])[:4] == b"\x89PNG"
    assert "screened" in fig["title"]


def test_switch_graph_levels_dynamic_and_fp16_run_and_stay_close():
    """Dynamic-INT8 and fake-FP16 switches (enabled only where the engine/target has them) run in
    onnxruntime and give finite outputs; FP16 rounding is the smaller error."""
    model, calib, _ = _transformer()
    _ir_utils.upgrade_opset(model, 13)
    precision_plan.name_nodes(model)
    quantize = int8_quantizer(PassContext(calibration=calib, quiet=True))
    full = quantize(model.clone(), frozenset())
    candidates = precision_plan.quantized_nodes(full)
    smoothed = quantize(model.clone(), frozenset(candidates))
    screen = screening.build(full, smoothed, candidates, ("int8", "int8-dynamic", "fp16"))
    feeds = list(calib.take(2))
    ref = sensitivity.run_outputs(model, feeds)
    budget = sensitivity.Budget(min_cosine=0.0)
    with sessions.session(screen.model) as handle:
        def loss(level):
            outs = [handle.run({**f, **screen.feed(dict.fromkeys(screen.groups, level))}) for f in feeds]
            return sensitivity.measure(ref, outs, budget).loss
        losses = {lv: loss(lv) for lv in ("int8", "int8-dynamic", "fp16")}
    assert all(np.isfinite(v) for v in losses.values())
    # FP16 storage rounding (2^-11 relative) is far below 8-bit rounding (2^-8 of the range).
    assert losses["fp16"] < losses["int8"]


def test_workers_ray_without_ray_is_one_line_exit_2(monkeypatch, tmp_path, capsys):
    from onnxopt import cli

    monkeypatch.setattr(trials, "ray_installed", lambda: False)
    rc = cli.main(["optimize", str(model_path("digits_mlp.onnx")), "-o", str(tmp_path / "o.onnx"), "--recipe", "mixed",
                   "--calib", str(model_path("digits_mlp_calib.npz")), "--workers", "ray"])  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'onnxopt[ray]'" in err[0]
    assert not (tmp_path / "o.onnx").exists()
