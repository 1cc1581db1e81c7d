"""A fast, deterministic subset of the conformance run (the full run: benchmarks/conformance.py).

Cases: the If/Loop/Scan generators and the ops our passes rewrite most (Conv, Gemm, MatMul,
BatchNormalization) plus generator modules and model folders drawn with a fixed seed. Every
pass runs on all of them, every recipe on the first few. Each (case, tool) runs in a worker
process with a timeout; the verdict rules are in harness.py and the tolerances in tools.py.
"""

from __future__ import annotations

import collections
import random

import onnx
import pytest

from onnxopt.testing.conformance import cases as _cases
from onnxopt.testing.conformance import harness, tools
from onnxopt.testing.conformance.cases import Case

SEED = 20261128
FIXED_MODULES = ["if_", "loop", "scan", "conv", "gemm", "matmul", "batch_normalization"]
RANDOM_MODULES = 8
NODE_CASES = 30
FOLDER_CASES = 6
RECIPE_CASES = 6
TIMEOUT = 60.0

_all_tools = tools.our_tools()
PASSES = [t for t in _all_tools if not t.startswith("recipe:")]
RECIPES = [t for t in _all_tools if t.startswith("recipe:")]

# (tool, case key) pairs that fail today, each with the owner's issue text; listed so the suite
# stays green while the owner fixes them. strict xfail: a fixed pair turns the test red until it
# is removed from here.
KNOWN: dict[str, dict[str, str]] = {}


def select_cases() -> list[Case]:
    rng = random.Random(SEED)
    others = [m for m in _cases.node_modules() if m not in FIXED_MODULES]
    modules = FIXED_MODULES + sorted(rng.sample(others, RANDOM_MODULES))
    node = _cases.node_cases(modules)
    control = [c for c in node if c.name.startswith(("test_if", "test_loop", "test_scan"))]
    rest = [c for c in node if c not in control]
    chosen = control + rng.sample(rest, max(0, min(len(rest), NODE_CASES - len(control))))
    folders = _cases.folder_cases()
    chosen += rng.sample(folders, FOLDER_CASES)
    return sorted(chosen, key=lambda c: c.key)


@pytest.fixture(scope="module")
def run():
    chosen = select_cases()
    originals = harness.run_tasks([(c, "original", True) for c in chosen], timeout=TIMEOUT, quiet=True)
    status = {o.case: o for o in originals}
    eligible = [c for c in chosen if status[c.key].status == "eligible"]
    full = {c.key: "full checker" not in status[c.key].detail for c in eligible}
    tasks = [(c, t, full[c.key]) for t in PASSES for c in eligible]
    tasks += [(c, t, full[c.key]) for t in RECIPES for c in eligible[:RECIPE_CASES]]
    tasks += [(eligible[0], f"selftest:{how}", True) for how in ("identity", "wrong", "invalid", "raise", "die")]
    by_tool = collections.defaultdict(list)
    for o in harness.run_tasks(tasks, timeout=TIMEOUT, quiet=True):
        by_tool[o.tool].append(o)
    return chosen, originals, eligible, by_tool


def test_selection_is_deterministic_and_mostly_eligible(run):
    chosen, originals, eligible, _ = run
    assert [c.key for c in select_cases()] == [c.key for c in chosen]
    # Cases fed bfloat16/float8/int4 arrays are ineligible: onnxruntime's Python API cannot take them.
    assert len(chosen) >= NODE_CASES and len(eligible) >= 0.6 * len(chosen), [
        (o.case, o.detail) for o in originals if o.status != "eligible"
    ]
    assert any(c.name == "test_if" for c in eligible) and any(c.name == "test_loop11" for c in eligible)


def test_harness_detects_broken_tools(run):
    *_, by_tool = run
    verdict = {t: by_tool[f"selftest:{t}"][0].status for t in ("identity", "wrong", "invalid", "raise", "die")}
    assert verdict == {
        "identity": "unchanged",
        "wrong": "wrong",
        "invalid": "invalid",
        "raise": "crashed",
        "die": "crashed",
    }


def test_a_hanging_tool_is_a_timeout():
    case = Case("ident", "selftest", onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        ), opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8
    ).SerializeToString(), ())
    [outcome] = harness.run_tasks([(case, "selftest:sleep", True)], workers=1, timeout=3, quiet=True)
    assert outcome.status == "timeout"


def known(tool: str) -> dict[str, str]:
    """Known failures of a pass; a recipe inherits those of its passes."""
    if not tool.startswith("recipe:"):
        return KNOWN.get(tool, {})
    from onnxopt import recipes

    found: dict[str, str] = {}
    for step in recipes.get_recipe(tool.split(":", 1)[1]).steps:
        found.update({case: f"{step.name}: {why}" for case, why in KNOWN.get(step.name, {}).items()})
    return found


def _check(by_tool, tool):
    bad = [o for o in by_tool[tool] if o.status in harness.BAD]
    assert by_tool[tool], f"{tool} ran on no case"
    expected = known(tool)
    unexpected = [o for o in bad if o.case not in expected]
    assert not unexpected, "\n".join(f"{o.status} {o.case}: {o.detail}" for o in unexpected)
    tried = {o.case for o in by_tool[tool]}
    if not tool.startswith("recipe:"):
        for case in set(expected) & tried:
            if not any(o.case == case for o in bad):
                pytest.fail(f"{tool} on {case} passes now: remove it from KNOWN")
    if bad:
        pytest.xfail("; ".join(f"{o.case}: {expected[o.case]}" for o in bad))


@pytest.mark.parametrize("tool", PASSES)
def test_pass_never_crashes_writes_invalid_or_wrong_models(run, tool):
    _check(run[3], tool)


@pytest.mark.parametrize("tool", RECIPES)
def test_recipe_never_crashes_writes_invalid_or_wrong_models(run, tool):
    _check(run[3], tool)
