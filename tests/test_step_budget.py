"""Per-step honesty of lossy recipes: every compression step says how far the model has drifted
from the input model on the --eval data, and a result past the accuracy budget is flagged (CLI
exit 1, ``OptimizeResult.failures`` in Python) while the written model is still whole and valid.

On the bundled digits MLP (the deep-compression recipe runs in a few seconds).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxopt
from onnxopt import io
from onnxopt.cli import main
from onnxopt.pipeline import CHECK_FEEDS
from onnxopt.runtime import data
from onnxopt.runtime import sessions as runtime
from tests.conftest import model_path

MLP = model_path("digits_mlp.onnx")
CALIB = model_path("digits_mlp_calib.npz")
EVAL = model_path("digits_mlp_eval.npz")
# 80% of the weights pruned and the rest shared by 16 values cannot keep the logits within
# cosine 1 - 1e-6 of FP32 (the pruned weights alone carry far more than 1e-6 of the energy):
# a budget the recipe is bound to miss, without depending on how much exactly it loses.
UNREACHABLE = "0.999999"


def _top1(path, feeds: data.Dataset) -> np.ndarray:
    with runtime.session(io.load_model(path), opt_level="disable") as handle:
        return np.concatenate([next(iter(handle.run(f).values())).argmax(1) for f in feeds])


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    out = tmp_path_factory.mktemp("budget") / "mlp.dc.onnx"
    result = onnxopt.optimize(
        MLP, out, recipe="deep-compression", calibration=CALIB, evaluation=EVAL,
        min_cosine=float(UNREACHABLE), quiet=True,
    )
    return out, result


def test_every_lossy_step_reports_agreement_with_the_input_model_on_eval_data(compressed):
    out, result = compressed
    lossy = {r.pass_name: r for r in result.reports if r.pass_name in ("prune", "cluster")}
    assert set(lossy) == {"prune", "cluster"}
    for rep in lossy.values():
        assert rep.fidelity["data"] == "evaluation"
        assert 0.0 < rep.fidelity["cumulative_cosine"] < 1.0
        assert 0.0 <= rep.fidelity["cumulative_top1"] <= 1.0
    # The last step's agreement is the written model's, recomputed here in onnxruntime on the
    # same feeds (the first CHECK_FEEDS eval batches, both sessions unoptimised: same kernels,
    # so the decisions are the same ones, not just close).
    feeds = data.load_data(EVAL, data.input_signature(io.load_model(MLP))).take(CHECK_FEEDS)
    agree = float((_top1(MLP, feeds) == _top1(out, feeds)).mean())
    assert lossy["cluster"].fidelity["cumulative_top1"] == pytest.approx(agree, abs=1e-12)


def test_missed_budget_is_flagged_per_step_and_in_the_result_and_the_model_is_still_valid(compressed):
    out, result = compressed
    assert not result.passed
    assert any("cosine" in f and UNREACHABLE in f for f in result.failures)
    notes = [n for r in result.reports for n in r.notes if "past the accuracy budget" in n]
    assert notes  # the step that crossed the budget says so
    onnx.checker.check_model(str(out), full_check=True)
    feeds = data.load_data(EVAL, data.input_signature(io.load_model(MLP))).take(2)
    assert _top1(out, feeds).shape[0] > 0  # whole, and onnxruntime runs it


def test_cli_exits_1_on_a_missed_budget_and_0_within_it(tmp_path, capsys):
    out = tmp_path / "mlp.dc.onnx"
    common = ["optimize", str(MLP), "-o", str(out), "--recipe", "deep-compression", "--calib", str(CALIB),
              "--eval", str(EVAL), "-q"]
    assert main([*common, "--min-cosine", UNREACHABLE]) == 1
    err = capsys.readouterr().err
    assert "budget missed" in err and UNREACHABLE in err
    onnx.checker.check_model(str(out), full_check=True)
    # Cosine >= 0: logits pointing the opposite way would take a sign flip of the whole output.
    assert main([*common, "--min-cosine", "0"]) == 0
