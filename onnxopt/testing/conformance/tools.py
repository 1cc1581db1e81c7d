"""The optimizers under test, by name: our passes and recipes, and the anchors.

A tool takes the path of a model file and writes its result to another path. Names:
    - ``<pass>``: one registered onnxopt pass (``onnxopt.pass_base.all_passes()``);
    - ``recipe:<name>``: one built-in recipe (``onnxopt.recipes.RECIPES``);
    - ``onnxsim``, ``onnxslim``: the anchors' simplifiers with their default options;
    - ``occ-fp16``: onnxconverter-common's ``convert_float_to_float16(keep_io_types=True)``;
    - ``selftest:<how>``: deliberately broken tools (sleep, die, raise, invalid, wrong) that test
      the harness's own verdicts.

Each tool declares how its output is judged (``kind``): ``lossless`` (the case's tolerance,
widened to the pass's declared tolerance), ``fp16`` (rtol 1e-2, atol 1e-3 scaled by the largest
expected magnitude) or ``lossy`` (non-float outputs exact; float outputs cosine >= 0.99 and
relative L2 error <= 0.1, the budget given to the pass through the context).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence
from typing import Any

__all__ = [
    "ANCHORS",
    "LOSSY_MAX_REL_L2",
    "LOSSY_MIN_COSINE",
    "ToolResult",
    "apply_tool",
    "our_tools",
    "tool_kind",
]

ANCHORS = ("onnxsim", "onnxslim", "occ-fp16")
LOSSY_MIN_COSINE = 0.99
LOSSY_MAX_REL_L2 = 0.1
_FP16_WORDS = ("fp16", "float16", "half")


@dataclasses.dataclass
class ToolResult:
    """What a tool did: whether it changed the model, and its reasons for what it left alone."""

    modified: bool
    reasons: str = ""


def our_tools() -> list[str]:
    """Every registered pass, then every recipe that is not just one pass with default options."""
    from onnxopt import pass_base, recipes

    passes = pass_base.all_passes()
    tools = list(passes)
    for name, recipe in sorted(recipes.RECIPES.items()):
        steps = recipe.steps
        if len(steps) == 1 and steps[0].name in passes and not steps[0].options:
            continue  # the same run as the pass itself
        tools.append(f"recipe:{name}")
    return tools


def _steps(tool: str) -> Sequence[Any]:
    from onnxopt import recipes

    if tool.startswith("recipe:"):
        return recipes.get_recipe(tool.split(":", 1)[1]).steps
    return (recipes.Step(tool),)


def tool_kind(tool: str) -> tuple[str, tuple[float, float]]:
    """(``lossless`` | ``fp16`` | ``lossy``, declared (rtol, atol)) of ``tool``."""
    if tool in ("onnxsim", "onnxslim") or tool.startswith("selftest:"):
        return "lossless", (1e-4, 1e-5)
    if tool == "occ-fp16":
        return "fp16", (1e-2, 1e-3)
    from onnxopt import pass_base

    classes = [pass_base.get(step.name) for step in _steps(tool)]
    if all(c.lossless for c in classes):
        return "lossless", (max(c.tolerance[0] for c in classes), max(c.tolerance[1] for c in classes))
    names = [tool, *(c.name for c in classes)]
    lossy = [n for c, n in zip(classes, names[1:], strict=True) if not c.lossless]
    if all(any(w in n for w in _FP16_WORDS) for n in lossy):
        return "fp16", (1e-2, 1e-3)
    return "lossy", (0.0, 0.0)


def apply_tool(tool: str, src: pathlib.Path, dst: pathlib.Path, feeds: list[dict[str, Any]]) -> ToolResult:
    """Run ``tool`` on the model at ``src`` and write the result to ``dst``.

    ``feeds`` are the case's inputs, given to our passes as calibration data. Any exception
    raised here is the tool's crash.
    """
    if tool.startswith("selftest:"):
        return _selftest(tool, src, dst)
    if tool == "onnxsim":
        import onnx
        import onnxsim

        model = onnx.load(str(src))
        out, _ok = onnxsim.simplify(model)
        onnx.save(out, str(dst))
        return ToolResult(_graph_changed(model, out))
    if tool == "onnxslim":
        import onnx
        import onnxslim

        model = onnx.load(str(src))
        before = onnx.load(str(src))
        out = onnxslim.slim(model)
        onnx.save(out, str(dst))
        return ToolResult(_graph_changed(before, out))
    if tool == "occ-fp16":
        import onnx
        from onnxconverter_common import float16

        model = onnx.load(str(src))
        before = onnx.load(str(src))
        out = float16.convert_float_to_float16(model, keep_io_types=True)
        onnx.save(out, str(dst))
        return ToolResult(_graph_changed(before, out))
    return _apply_ours(tool, src, dst, feeds)


def _selftest(tool: str, src: pathlib.Path, dst: pathlib.Path) -> ToolResult:
    """Deliberately broken tools, so the harness's own verdicts can be tested."""
    import os
    import time

    import onnx

    model = onnx.load(str(src))
    what = tool.split(":", 1)[1]
    if what == "sleep":
        time.sleep(3600)
    elif what == "die":
        os._exit(3)  # the worker process dies
    elif what == "raise":
        raise RuntimeError("selftest crash")
    elif what == "invalid":
        model.graph.node[0].op_type = "NoSuchOp"
    elif what == "wrong":  # scale the first float output by 2
        out = model.graph.output[0]
        scaled = out.name + "_unscaled"
        for node in model.graph.node:
            node.output[:] = [scaled if o == out.name else o for o in node.output]
        two = onnx.helper.make_tensor("selftest_two", out.type.tensor_type.elem_type, [], [2])
        model.graph.initializer.append(two)
        model.graph.node.append(onnx.helper.make_node("Mul", [scaled, "selftest_two"], [out.name]))
    elif what != "identity":
        raise ValueError(f"unknown selftest tool {tool!r}")
    onnx.save(model, str(dst))
    return ToolResult(what != "identity")


def _graph_changed(before: Any, after: Any) -> bool:
    """Nodes or initializers differ (value_info, names of the producer etc. do not count)."""

    def key(model: Any) -> list[bytes]:
        g = model.graph
        return [n.SerializeToString() for n in g.node] + [t.SerializeToString() for t in g.initializer]

    return key(before) != key(after)


def _apply_ours(tool: str, src: pathlib.Path, dst: pathlib.Path, feeds: list[dict[str, Any]]) -> ToolResult:
    from onnxopt import io as _io
    from onnxopt import pipeline, recipes
    from onnxopt.context import PassContext
    from onnxopt.errors import DataError
    from onnxopt.runtime import data

    model = _io.load_model(src)
    try:
        calib = data.load_data(feeds, data.input_signature(model))
    except (DataError, ValueError, TypeError) as err:
        calib = None  # e.g. sequence inputs or NaN feeds: the API would refuse these too
        calib_error = str(err)
    context = PassContext(calibration=calib, seed=0, quiet=True, min_cosine=LOSSY_MIN_COSINE)
    passes = recipes.build(_steps(tool), context)
    missing = [p.name for p in passes if p.needs_calibration and calib is None]
    if missing:
        # optimize() refuses to run these without data; the model is left as it is.
        _io.save_model(model, dst)
        return ToolResult(False, f"{missing[0]} needs calibration data; case data rejected: {calib_error}")
    result = pipeline.run(model, passes, check=False, strict=True)
    _io.save_model(result.model, dst)
    reasons = []
    for r in result.reports:
        reasons += [f"{k} ({v})" for k, v in r.skipped.items()]
        reasons += r.notes
    return ToolResult(any(r.modified for r in result.reports), "; ".join(reasons))
