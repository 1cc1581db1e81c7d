"""Sensitivity: budgets, measured per-node loss (onnxruntime), the SQNR estimate, rank agreement."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import pytest
from onnxopt.passes.mixed import int8_quantizer

from onnxopt.context import PassContext
from onnxopt.quant import planner as precision_plan
from onnxopt.quant import sensitivity
from onnxopt.quant.sensitivity import Budget
from onnxopt.runtime import data


def _w(rng: np.random.Generator, *shape: int) -> str:
    return ",".join(f"{v:.5f}" for v in rng.standard_normal(shape).ravel())


def two_layer(rng: np.random.Generator) -> ir.Model:
    model = ir.from_onnx_text(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 8] x) => (float[N, 4] y)
        <float[8, 8] w1 = {{{_w(rng, 8, 8)}}}, float[8, 4] w2 = {{{_w(rng, 8, 4)}}}> {{
            h = MatMul(x, w1)
            r = Relu(h)
            y = MatMul(r, w2)
        }}""")
    precision_plan.name_nodes(model)
    return model


def scale_weight(factor_by_node: dict[str, float]):
    """A 'lowering' with a known effect: node n's weight is multiplied by factor_by_node[n]."""

    def lower(model: ir.Model, names: frozenset[str]) -> ir.Model:
        for node in model.graph:
            if node.name in names and node.op_type == "MatMul":
                w = node.inputs[1]
                w.const_value = ir.tensor(w.const_value.numpy() * factor_by_node[node.name], name=w.name)
        return model

    return lower


def feeds(rng: np.random.Generator, n: int = 4) -> list[dict[str, np.ndarray]]:
    return [{"x": rng.standard_normal((5, 8)).astype(np.float32)} for _ in range(n)]


def test_budget_needs_a_bound_and_checks_ranges():
    with pytest.raises(ValueError, match="needs min_cosine"):
        Budget()
    with pytest.raises(ValueError, match="min_metric"):
        Budget(metric=lambda r, c: 1.0)
    with pytest.raises(ValueError, match="min_cosine"):
        Budget(min_cosine=2.0)
    with pytest.raises(ValueError, match="max_error"):
        Budget(max_error=-1.0)


def test_budget_from_bounds_precedence():
    metric = lambda r, c: 1.0
    assert Budget.from_bounds(metric=metric, min_metric=0.5, max_error=1.0, default_min_cosine=0.9).metric is metric
    assert Budget.from_bounds(max_error=0.1, min_cosine=0.5, default_min_cosine=0.9).max_error == 0.1
    assert Budget.from_bounds(min_cosine=0.5, default_min_cosine=0.9).min_cosine == 0.5
    assert Budget.from_bounds(default_min_cosine=0.9).min_cosine == 0.9


def test_measure_scores_and_flags_nonfinite(rng):
    ref = [{"y": rng.standard_normal((4, 3))} for _ in range(3)]
    same = measure = sensitivity.measure(ref, ref, Budget(min_cosine=0.999))
    assert same.ok and abs(measure.loss) < 1e-12 and same.max_abs == 0.0
    noisy = [{"y": r["y"] + 0.5 * rng.standard_normal((4, 3))} for r in ref]
    m = sensitivity.measure(ref, noisy, Budget(min_cosine=0.999))
    assert not m.ok and m.loss == pytest.approx(1 - m.cosine)
    assert sensitivity.measure(ref, noisy, Budget(max_error=100.0)).ok
    bad = [{"y": np.full((4, 3), np.nan)} for _ in ref]
    assert sensitivity.measure(ref, bad, Budget(max_error=100.0)).loss == math.inf


def test_node_sensitivity_ranks_the_node_that_hurts_more_first(rng):
    model = two_layer(rng)
    names = [n.name for n in model.graph if n.op_type == "MatMul"]
    lower = scale_weight({names[0]: 0.999, names[1]: 0.5 + 0.0})
    # Scaling every output by 0.5 keeps the cosine: use max error as the budget instead.
    cache: dict = {}
    result = sensitivity.node_sensitivity(model, names, lower, feeds(rng), Budget(max_error=1e9), cache=cache, key="t")
    assert result[names[1]].loss > result[names[0]].loss > 0
    again = sensitivity.node_sensitivity(model, names, lower, feeds(rng), Budget(max_error=1e9), cache=cache, key="t")
    assert again is result  # cached in the cache


def test_int8_sensitivity_through_the_quantize_pass(rng):
    model = two_layer(rng)
    f = feeds(rng, 6)
    ctx = PassContext(calibration=data.Dataset.from_feeds(f), quiet=True)
    quantize = int8_quantizer(ctx, "minmax")
    candidates = precision_plan.quantized_nodes(quantize(model.clone(), frozenset()))
    assert {"MatMul_0", "MatMul_2"} <= set(candidates)
    result = sensitivity.node_sensitivity(
        model, candidates, lambda m, names: quantize(m, frozenset(candidates) - names), f, Budget(min_cosine=0.9)
    )
    # loss = 1 - cosine with one node INT8: measured 5e-5 / 1.2e-5 (QDQ math, the same on any CPU
    # up to float noise); 0.05 is 1000x.
    assert all(0 <= r.loss < 0.05 and r.ok for r in result.values())


def test_sqnr_estimate_matches_uniform_quantization_noise(rng):
    model = ir.from_onnx_text("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N] x) => (float[N] y) { y = Relu(x) }""")
    precision_plan.name_nodes(model)
    f = [{"x": rng.uniform(0, 1, 200_000).astype(np.float32)}]
    est = sensitivity.estimate_sqnr(model, ["Relu_0"], {"y": (0.0, 1.0)}, f)
    # Uniform x on [0, 1], step s = 1/255: signal 1/3, noise s^2/12 -> 10*log10(4 / s^2) dB.
    expected = 10 * math.log10(4 * 255**2)
    assert est["Relu_0"] == pytest.approx(expected, abs=0.3)


def test_rank_agreement():
    a = {"p": 1.0, "q": 2.0, "r": 3.0, "s": 4.0}
    assert sensitivity.rank_agreement(a, a) == pytest.approx(1.0)
    assert sensitivity.rank_agreement(a, {k: -v for k, v in a.items()}) == pytest.approx(-1.0)
    assert math.isnan(sensitivity.rank_agreement({"p": 1.0}, {"p": 2.0}))


def test_lean_trial_metrics_equal_the_full_ones(rng):
    """A trial worker's measure (cached float64 reference, cosine and max abs only) gives the same
    numbers as output_metrics: the same float64 formulas on the same arrays."""
    from onnxopt.quant import sensitivity

    ref = [{"y": rng.standard_normal((3, 7, 11)).astype(np.float32), "z": rng.standard_normal((2, 5)).astype(np.float32)}
           for _ in range(3)]
    cand = [{k: (v + 0.01 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in r.items()} for r in ref]
    cand[1]["y"][0, 0, 0] = np.inf  # a non-finite value where the reference is finite
    ref[2]["z"][0, 0] = cand[2]["z"][0, 0] = np.nan  # NaN in both: agree
    budget = sensitivity.Budget(min_cosine=0.5)
    cache: dict = {}
    for _ in range(2):  # the second call reads the cached reference
        lean = sensitivity.measure(ref, cand, budget, cache)
        full = sensitivity.measure(ref, cand, budget)
        np.testing.assert_equal((lean.cosine, lean.max_abs, lean.nonfinite, lean.ok),
                                (full.cosine, full.max_abs, full.nonfinite, full.ok))  # NaN cosine equal too
    clean = [{k: np.nan_to_num(v) for k, v in c.items()} for c in cand]
    cache = {}
    assert sensitivity.measure(ref, clean, budget, cache) == sensitivity.measure(ref, clean, budget)
