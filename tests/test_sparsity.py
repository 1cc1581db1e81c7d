"""Per-layer sparsity allocation for gradual pruning (onnxopt.compress.sparsity)."""

from __future__ import annotations

import numpy as np
import pytest

from onnxopt.compress import sparsity


def _weights(rng):
    return {
        "big": rng.normal(0, 1.0, (64, 32)),
        "tiny_scale": rng.normal(0, 1e-3, (16, 8)),  # raw magnitude would empty this one first
        "depthwise": rng.normal(0, 0.5, (16, 1, 3, 3)),
    }


def test_target_is_reached_and_scales_do_not_empty_a_layer(rng):
    w = _weights(rng)
    alloc = sparsity.allocate(w, 0.8)
    total = sum(v.size for v in w.values())
    dropped = sum(round(alloc[n] * w[n].size) for n in w)
    # counts are integers per tensor; the bisection stops at the first threshold reaching the
    # target, so it may overshoot by the ties at that threshold (none with continuous values)
    assert dropped == round(0.8 * total)
    # same distribution shape: with std-relative scores each layer loses about the target share
    # (bound: a binomial-ish spread of the 128-element layer, well inside 0.15)
    assert abs(alloc["tiny_scale"] - 0.8) < 0.15


def test_caps_are_respected_and_the_rest_takes_up_the_slack(rng):
    w = _weights(rng)
    alloc = sparsity.allocate(w, 0.7, {"depthwise": 0.3, "tiny_scale": 0.0})
    assert alloc["tiny_scale"] == 0.0
    assert alloc["depthwise"] <= 0.3
    total = sum(v.size for v in w.values())
    assert sum(round(alloc[n] * w[n].size) for n in w) == round(0.7 * total)
    assert alloc["big"] > 0.7


def test_unreachable_target_leaves_every_layer_at_its_cap(rng):
    w = _weights(rng)
    alloc = sparsity.allocate(w, 0.9, dict.fromkeys(w, 0.5))
    assert all(abs(a - 0.5) <= 1 / w[n].size for n, a in alloc.items())


def test_prune_smallest_keeps_earlier_zeros_and_exact_count(rng):
    w = rng.normal(size=(10, 10))
    first = sparsity.prune_smallest(w, 0.3)
    assert (first == 0).sum() == 30
    second = sparsity.prune_smallest(first, 0.6)
    assert (second == 0).sum() == 60
    assert np.all(second[first == 0] == 0)  # masks only grow
    kept = second != 0
    assert np.array_equal(second[kept], w[kept])  # survivors untouched
    assert np.abs(w[~kept]).max() <= np.abs(w[kept]).min()
    assert (w != 0).all()  # input not modified


@pytest.mark.parametrize(("target", "caps", "message"), [
    (1.0, None, r"target sparsity must be in \[0, 1\)"),
    (0.5, {"big": 1.5}, r"cap of 'big' must be in \[0, 1\]"),
])
def test_bad_arguments(rng, target, caps, message):
    with pytest.raises(ValueError, match=message):
        sparsity.allocate(_weights(rng), target, caps)


def _curves():
    f = [0.25, 0.5, 0.75, 0.95]
    return {
        "insensitive": (f, [0.001 * x for x in f]),  # e.g. squeeze-excitation layers
        "sensitive": (f, [x * x for x in f]),
        "bumpy": (f, [0.02, 0.01, 0.3, 0.4]),  # measured noise: treated as its running maximum
    }, {"insensitive": 4000, "sensitive": 1000, "bumpy": 500}


def _interp_loss(curve, frac):
    f, loss = curve
    return float(np.interp(frac, [0.0, *f], np.maximum.accumulate([0.0, *loss])))


def test_sensitivity_shares_one_loss_level_and_reaches_the_target():
    curves, sizes = _curves()
    plan = sparsity.allocate_by_sensitivity(curves, sizes, 0.7)
    removed = sum(plan[n] * sizes[n] for n in plan) / sum(sizes.values())
    assert removed == pytest.approx(0.7, abs=1e-6)  # bisection to 2^-100 of the loss range
    assert plan["insensitive"] == pytest.approx(0.95)  # runs out of curve before the others move
    assert plan["sensitive"] < plan["bumpy"] < 0.75
    # The tensors inside their curves sit at the same interpolated loss (the shared level).
    assert _interp_loss(curves["sensitive"], plan["sensitive"]) == pytest.approx(
        _interp_loss(curves["bumpy"], plan["bumpy"]), rel=1e-6)
    # The bumpy curve's dip (0.02 then 0.01) is flattened: 0.015 loss allows up to 0.5.
    low = sparsity.allocate_by_sensitivity({"bumpy": curves["bumpy"]}, {"bumpy": 500}, 0.5)
    assert low["bumpy"] == pytest.approx(0.5)
    assert _interp_loss(curves["bumpy"], 0.4) == pytest.approx(0.02)


def test_sensitivity_caps_and_an_unreachable_target():
    curves, sizes = _curves()
    plan = sparsity.allocate_by_sensitivity(curves, sizes, 0.5, {"insensitive": 0.5, "bumpy": 0.0})
    assert plan["insensitive"] == 0.5 and plan["bumpy"] == 0.0
    assert plan["sensitive"] == pytest.approx(0.75, abs=1e-6)  # (0.5 * 5500 - 0.5 * 4000) / 1000
    full = sparsity.allocate_by_sensitivity(curves, sizes, 0.99, {"sensitive": 0.3})
    assert full == {"insensitive": pytest.approx(0.95), "sensitive": 0.3, "bumpy": pytest.approx(0.95)}
    assert sparsity.allocate_by_sensitivity(curves, sizes, 0.0) == dict.fromkeys(curves, 0.0)


@pytest.mark.parametrize(("curves", "target", "message"), [
    ({"a": ([0.5], [0.1])}, 1.0, r"target sparsity must be in \[0, 1\)"),
    ({}, 0.5, r"at least one curve"),
    ({"a": ([0.5, 0.4], [0.1, 0.2])}, 0.5, r"curve of 'a': fractions must ascend"),
    ({"a": ([0.0, 0.4], [0.1, 0.2])}, 0.5, r"curve of 'a': fractions must ascend"),
    ({"a": ([0.5], [float("nan")])}, 0.5, r"curve of 'a': losses must be >= 0"),
    ({"a": ([0.5, 0.6], [0.1])}, 0.5, r"curve of 'a': fractions and losses must be equal-length"),
])
def test_sensitivity_bad_arguments(curves, target, message):
    with pytest.raises(ValueError, match=message):
        sparsity.allocate_by_sensitivity(curves, dict.fromkeys(curves, 10), target)


def test_allocate_uniform_one_fraction_up_to_the_caps():
    sizes, caps = [100, 100, 50], [1.0, 0.2, 1.0]
    fractions = sparsity.allocate_uniform(sizes, caps, 125)
    assert fractions[1] == 0.2 and fractions[0] == fractions[2]
    assert sum(round(f * n) for f, n in zip(fractions, sizes)) >= 125
    # the capped tensor gives 20, the other two make up 105 of their 150: f = 0.7, and no less
    assert fractions[0] == pytest.approx(0.7, abs=0.01)  # counts are rounded per tensor
    assert sum(round(min(fractions[0] - 0.01, c) * n) for c, n in zip(caps, sizes)) < 125
    assert sparsity.allocate_uniform(sizes, caps, 250) == caps  # unreachable: everything at its cap
