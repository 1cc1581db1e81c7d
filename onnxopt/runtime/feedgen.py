"""Generated feeds that real models accept, for the checks of a run without user data.

Without ``--eval``/``--calib``, each pass and the final model are checked on feeds made here.
Plain random values break real models (a token-type id of 2 for a table of 2 rows, a sample
rate that selects no branch, a ``split`` that does not add up), so the generator reads the
graph first. Per graph input:

- **indices**: an integer input that reaches the index input of Gather, GatherElements,
  GatherND, Scatter(Elements/ND) or OneHot, directly or through value-preserving ops (Cast,
  Identity, Reshape, Squeeze/Unsqueeze, Flatten, Expand, Transpose, Slice, Concat, Tile, Split,
  the data input of a Gather, the branches of a Where), draws within ``[0, rows)`` of that table
  (its dim along the gather axis: a constant's shape, a static shape, or another input's size);
- **masks**: inputs named like masks (``attention_mask``...), and integer inputs cast to bool,
  are 0/1, mostly ones, the first entry of the last axis always one (no fully masked row);
- **branch selectors**: an input that an ``If`` condition compares (``Equal``) with constants
  draws from those constants (silero VAD's ``sr``);
- **split sizes**: a ``Split``'s ``split`` input is a partition of the split axis;
- **dims**: batch-like names (``batch``, ``N``...) take 1-2, sequence-like names (``seq``,
  ``length``, ``time``...) 8-16, other names 32; an input reshaped to a constant shape gets
  its free dim from that shape; dims without a name share one size. :func:`runnable_feeds`
  tries further sizes (one onnxruntime session, a run per try) when the model refuses these;
- **dtypes numpy cannot draw**: bfloat16, float8, float4/6, int4/uint4, int2/uint2 through
  ``ml_dtypes`` (values drawn in float32/int8 and converted); strings from the graph's own
  string constants; sequences as lists of two tensors; optionals as their element.

Everything else is standard-normal (floats) or in ``[0, 4)`` (integers), seeded.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir

from onnxopt.errors import DataError, ModelLoadError
from onnxopt.runtime.data import Dataset, Feed, InputSpec, input_signature, value_kind

__all__ = ["generated_data", "runnable_feeds"]

logger = logging.getLogger(__name__)

# Ops whose output carries the values of the listed inputs (None: all inputs) unchanged.
_TRANSPARENT: dict[str, tuple[int, ...] | None] = {
    "Cast": (0,), "CastLike": (0,), "Identity": (0,), "Reshape": (0,), "Squeeze": (0,),
    "Unsqueeze": (0,), "Flatten": (0,), "Expand": (0,), "Transpose": (0,), "Slice": (0,),
    "Concat": None, "Tile": (0,), "Gather": (0,), "GatherElements": (0,), "Split": (0,),
    "Where": (1, 2),
}
# Ops that take indices, and which input holds them.
_INDEX_INPUT = {"Gather": 1, "GatherElements": 1, "ScatterElements": 1, "Scatter": 1,
                "GatherND": 1, "ScatterND": 1, "OneHot": 0}
# Inputs whose valid values do not depend on the rest of the feed: (op, input) -> domain.
_DOMAINS = {
    ("Div", 1): "nonzero", ("Mod", 1): "nonzero",
    ("Reshape", 1): "reshape", ("Expand", 1): "ones", ("Tile", 1): "positive",
    ("ConstantOfShape", 0): "positive",
}
# Inputs that hold axes of their op's data input (input 0): distinct, within its rank.
_AXES_INPUT = {"CumSum": 1, "CumProd": 1, "Slice": 3, **{op: 1 for op in (
    "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")}}
# From an Equal to the If condition it decides.
_TO_CONDITION = ("Not", "Cast", "Identity", "And", "Or", "Xor", "Squeeze", "Unsqueeze", "Reshape")
# Through these, a table's rows come from a constant or a graph input.
_TABLE_THROUGH = ("Cast", "CastLike", "Identity", "DequantizeLinear", "QuantizeLinear")
_MASK_WORDS = ("mask",)
_BATCH_NAMES = ("n", "b", "bs", "bsz", "nb")
_SEQ_WORDS = ("seq", "len", "token", "time", "step", "frame", "sent", "word", "past", "total", "position")
_SEQ_NAMES = ("s", "t", "l", "ts")
_OTHER_DIM = 32
# Sizes tried for dims without a name (then all non-batch dims) once the first guess fails.
_RETRY_SIZES = (1, 32, 128, 256, 512, 1024)
# A try whose feeds hold more elements than this is not made: the model must stay cheap to run.
_MAX_TRY_ELEMENTS = 1 << 20
_MAX_TRACE = 256  # values followed from one input (bounded on huge graphs)
_DEFAULT_STRINGS = ("a", "b", "c", "d")

_Bound = int | tuple[str, int] | None  # a size, (input name, axis), or unknown


@dataclasses.dataclass
class _Plan:
    """What one input's values must satisfy."""

    spec: InputSpec
    kind: str = "tensor"  # tensor | sequence | optional
    rows: list[_Bound] = dataclasses.field(default_factory=list)
    choices: list[Any] = dataclasses.field(default_factory=list)
    mask: bool = False
    split: tuple[_Bound, int] | None = None  # (size of the split axis, number of parts)
    domain: str | None = None  # a key of _DOMAINS' values, or "axes"
    axes: list[int] | None = None  # for "axes": the axes allowed (distinct draws from these)


def generated_data(
    model: ir.Model,
    n: int = 2,
    *,
    seed: int = 0,
    dims: Mapping[str, int] | None = None,
    attempt: int = 0,
) -> Dataset:
    """``n`` seeded feeds for ``model`` that respect what its graph says about each input.

    Args:
        model: the model whose graph inputs are fed (not modified).
        n: number of feeds.
        seed: for every random draw.
        dims: sizes of symbolic dims by name (override the guesses).
        attempt: 0 for the first guess of the free dims; ``k > 0`` sets them to the k-th
            retry size (see :func:`runnable_feeds`).

    Raises:
        DataError: an input whose type cannot be generated, or feeds that would be too large.

    """
    plans = _plans(model)
    strings = _graph_strings(model)
    fixed = _fixed_dims(model, plans)
    rng = np.random.default_rng(seed)
    feeds = [_feed(plans, rng, dict(dims or {}), fixed, attempt, strings) for _ in range(n)]
    return Dataset.from_feeds(feeds, f"generated(seed={seed})")


def runnable_feeds(
    model: ir.Model,
    n: int = 2,
    *,
    seed: int = 0,
    cache: MutableMapping[Any, Any] | None = None,
    source: str | os.PathLike | None = None,
) -> Dataset:
    """Generated feeds that onnxruntime runs ``model`` on, or :class:`DataError` saying why.

    The first guess is tried first; when the model refuses it, the free dims take the retry
    sizes in turn (tries above ``_MAX_TRY_ELEMENTS`` are not made). All runs share one
    session (on ``source``, the model's file, when given: no temp copy of a large model).
    ``cache`` (a pass context's) remembers the try that worked, or why none did, keyed by the
    input signature and seed, so later checks of the same run need no probe.

    Raises:
        ModelLoadError: onnxruntime cannot load ``model`` at all (no feed could help).
        DataError: no generated feeds work (the message has onnxruntime's first complaint), or
            an input cannot be generated (too large).

    """
    from onnxopt.runtime import sessions as runtime

    key = ("feedgen.attempt", tuple(map(repr, input_signature(model))), seed)
    if cache is not None and key in cache:
        known = cache[key]
        if isinstance(known, tuple):  # it failed before, and an equivalent model fails the same way
            raise (ModelLoadError if known[0] == "load" else DataError)(known[1])
        return generated_data(model, n, seed=seed, attempt=known)

    def fail(kind: str, why: str) -> str:
        if cache is not None:
            cache[key] = (kind, why)
        return why

    try:
        first = generated_data(model, n, seed=seed, attempt=0)
    except DataError as err:
        raise DataError(fail("feeds", str(err))) from err
    try:
        handle = runtime.make_session(source if source is not None else model)
    except Exception as err:  # no feeds involved: the model itself is at fault
        why = f"onnxruntime cannot run the input model: it does not load ({_first_line(err)})"
        raise ModelLoadError(fail("load", why)) from err
    import onnxruntime as ort

    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # a refused try is expected: keep onnxruntime's error log quiet
    first_error = ""
    try:
        for attempt in range(len(_RETRY_SIZES) + 1):
            try:
                data = first if attempt == 0 else generated_data(model, n, seed=seed, attempt=attempt)
            except DataError as err:
                logger.debug("generated feeds, try %d: %s", attempt, err)
                continue
            feeds = list(data)
            if attempt and sum(_elements(f) for f in feeds[:1]) > _MAX_TRY_ELEMENTS:
                continue
            try:
                for feed in feeds:
                    handle.session.run(None, feed, quiet)
            except Exception as err:  # onnxruntime rejects these values or sizes
                unfed = _unfed(feeds[0])
                first_error = first_error or unfed or _first_line(err)
                logger.debug("generated feeds, try %d: %s", attempt, _first_line(err))
                if unfed:  # other sizes cannot help
                    break
                continue
            if cache is not None:
                cache[key] = attempt
            return data
    finally:
        handle.close()
    raise DataError(fail("feeds", f"the model does not run on generated feeds ({first_error})"))


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:300]


def _unfed(feed: Feed) -> str:
    """Why onnxruntime's Python API cannot take ``feed``: an ml_dtypes array (float8, int4...)."""
    for name, value in feed.items():
        dtype = getattr(value, "dtype", None)
        if dtype is not None and dtype.type.__module__.startswith("ml_dtypes"):
            return f"onnxruntime's Python API takes no {dtype} arrays (input {name!r})"
    return ""


def _elements(feed: Feed) -> int:
    total = 0
    for value in feed.values():
        items = value if isinstance(value, list) else [value]
        total += sum(int(np.asarray(v).size) for v in items if v is not None)
    return total


# ---------------------------------------------------------------- what the graph says


def _plans(model: ir.Model) -> list[_Plan]:
    plans = []
    by_name = {v.name: v for v in model.graph.inputs}
    for spec in input_signature(model):
        value = by_name[spec.name]
        plan = _Plan(spec, kind=value_kind(value.type))
        if any(w in spec.name.lower() for w in _MASK_WORDS):
            plan.mask = True
        _trace(value, plan)
        plans.append(plan)
    return plans


def _trace(start: ir.Value, plan: _Plan) -> None:
    """Follow ``start`` through value-preserving ops and note every constraint on its values."""
    seen = {id(start)}
    todo = [start]
    while todo and len(seen) < _MAX_TRACE:
        value = todo.pop()
        for use in value.uses():
            node, idx = use.node, use.idx
            op = node.op_type if node.domain in ("", "ai.onnx") else ""
            if _INDEX_INPUT.get(op) == idx:
                plan.rows.append(_rows(node))
            if op == "Split" and idx == 1:
                axis = _int_attr(node, "axis", 0)
                plan.split = (_dim_of(node.inputs[0], axis), len(node.outputs))
            if op == "Cast" and _int_attr(node, "to", 0) == ir.DataType.BOOL:
                plan.mask = True
            if (op, idx) in _DOMAINS:
                plan.domain = _DOMAINS[(op, idx)]
            if _AXES_INPUT.get(op) == idx or (op in ("Squeeze", "Unsqueeze") and idx == 1):
                _axes_domain(node, value, plan)
            if op == "Equal" and _reaches_if(node.outputs[0]):
                other = node.inputs[1 - idx] if len(node.inputs) == 2 else None
                const = _const_array(other) if other is not None else None
                if const is not None and const.size and const.dtype.kind in "iub":
                    plan.choices += [c.item() for c in const.ravel()]
            allowed = _TRANSPARENT.get(op, ())
            if allowed is None or idx in allowed:
                for out in node.outputs:
                    if id(out) not in seen:
                        seen.add(id(out))
                        todo.append(out)


def _axes_domain(node: ir.Node, axes: ir.Value, plan: _Plan) -> None:
    """Note the axes ``axes`` may hold: any axis of the node's data input.

    For Squeeze only axes of size 1; for Unsqueeze those of the output (data rank + count).
    """
    shape = _shape_of(node.inputs[0]) if node.inputs[0] is not None else None
    if shape is None:
        return
    if node.op_type == "Squeeze":
        allowed = [i for i, d in enumerate(shape) if d == 1]
    elif node.op_type == "Unsqueeze":
        count = axes.shape[0] if axes.shape is not None and len(axes.shape) == 1 else None
        if not isinstance(count, int):
            return
        allowed = list(range(len(shape) + count))
    else:
        allowed = list(range(len(shape)))
    if allowed:
        plan.domain, plan.axes = "axes", allowed


def _rows(node: ir.Node) -> _Bound:
    """The exclusive upper bound of valid indices of an index-taking node."""
    op = node.op_type
    if op == "OneHot":
        depth = _const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        return int(depth.ravel()[0]) if depth is not None and depth.size else None
    data = node.inputs[0]
    if op in ("GatherND", "ScatterND"):
        shape = _shape_of(data)
        known = [d for d in shape or () if isinstance(d, int)]
        return min(known) if known else None
    return _dim_of(data, _int_attr(node, "axis", 0))


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return int(attr.value) if attr is not None else default


def _reaches_if(value: ir.Value, depth: int = 0) -> bool:
    """Whether ``value`` decides an If condition (directly or through logic and casts)."""
    if depth > 6:
        return False
    for use in value.uses():
        if use.node.op_type == "If" and use.idx == 0:
            return True
        if use.node.op_type in _TO_CONDITION and _reaches_if(use.node.outputs[0], depth + 1):
            return True
    return False


def _const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value of a constant (an initializer that is not a graph input, or a Constant node)."""
    if value is None:
        return None
    if value.const_value is not None and not value.is_graph_input():
        return np.asarray(value.const_value.numpy())
    node = value.producer()
    if node is None or node.op_type != "Constant" or not node.attributes:
        return None
    attr = next(iter(node.attributes.values()))
    if attr.name == "value":
        return np.asarray(attr.value.numpy())
    if attr.name in ("value_int", "value_ints", "value_float", "value_floats"):
        return np.asarray(attr.value)
    return None


def _shape_of(value: ir.Value) -> list[_Bound] | None:
    """The dims of a table: a constant's shape, a static shape, or a graph input's own dims."""
    for _ in range(8):
        const = _const_array(value)
        if const is not None:
            return list(const.shape)
        if value.is_graph_input():
            shape = value.shape
            return None if shape is None else [
                d if isinstance(d, int) else (value.name, i) for i, d in enumerate(shape)
            ]
        if value.shape is not None and all(isinstance(d, int) for d in value.shape):
            return list(value.shape)
        node = value.producer()
        if node is None or node.op_type not in _TABLE_THROUGH or not node.inputs or node.inputs[0] is None:
            break
        value = node.inputs[0]
    if value.shape is not None:
        return [d if isinstance(d, int) else None for d in value.shape]
    return None


def _dim_of(value: ir.Value | None, axis: int) -> _Bound:
    shape = _shape_of(value) if value is not None else None
    if shape is None or not -len(shape) <= axis < len(shape):
        return None
    return shape[axis]


def _graph_strings(model: ir.Model) -> list[str]:
    """String constants and attributes anywhere in the graph (label maps, stop words...)."""
    found: list[str] = []
    for node in model.graph.all_nodes():
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.STRINGS:
                found += [s.decode() if isinstance(s, bytes) else str(s) for s in attr.value]
    return list(dict.fromkeys(found))[:64] or list(_DEFAULT_STRINGS)


def _fixed_dims(model: ir.Model, plans: Sequence[_Plan]) -> dict[tuple[str, int], int]:
    """Dims the graph fixes: an input reshaped to a constant shape has one possible free dim."""
    fixed: dict[tuple[str, int], int] = {}
    by_name = {v.name: v for v in model.graph.inputs}
    for plan in plans:
        shape = plan.spec.shape
        if plan.kind != "tensor" or shape is None:
            continue
        free = [i for i, d in enumerate(shape) if not isinstance(d, int)]
        if len(free) != 1:
            continue
        value = by_name[plan.spec.name]
        for use in value.uses():
            node = use.node
            while node.op_type in ("Cast", "Identity") and len(node.outputs[0].uses()) == 1:
                node = node.outputs[0].uses()[0].node
            if node.op_type != "Reshape" or len(node.inputs) < 2:
                continue
            target = _const_array(node.inputs[1])
            if target is None or target.size == 0 or (target <= 0).any():
                continue
            rest = math.prod(d for d in shape if isinstance(d, int))
            total = int(np.prod(target))
            if rest > 0 and total % rest == 0:
                fixed[(plan.spec.name, free[0])] = total // rest
                break
    return fixed


# ---------------------------------------------------------------- drawing values


def _role(name: str) -> str:
    low = name.lower()
    if "batch" in low or low in _BATCH_NAMES:
        return "batch"
    if any(w in low for w in _SEQ_WORDS) or low in _SEQ_NAMES:
        return "seq"
    return "other"


def _feed(
    plans: Sequence[_Plan],
    rng: np.random.Generator,
    dims: dict[str, int],
    fixed: Mapping[tuple[str, int], int],
    attempt: int,
    strings: Sequence[str],
) -> Feed:
    retry = _RETRY_SIZES[attempt - 1] if attempt > 0 else None
    named = dict(dims)
    batch = int(rng.integers(1, 3))
    seq = int(rng.integers(8, 17))
    for (name, axis), size in fixed.items():
        spec = next(p.spec for p in plans if p.spec.name == name)
        dim = spec.shape[axis] if spec.shape else None
        if isinstance(dim, str):
            named.setdefault(dim, size)
    shapes: dict[str, tuple[int, ...] | None] = {}
    for plan in plans:
        spec = plan.spec
        if spec.shape is None:
            shapes[spec.name] = None if plan.kind != "tensor" else ()
            continue
        shape = []
        for axis, d in enumerate(spec.shape):
            if isinstance(d, int):
                shape.append(d)
            elif (spec.name, axis) in fixed:
                shape.append(fixed[(spec.name, axis)])
            elif d is None:  # no name: one shared size
                shape.append(retry if retry is not None else (batch if axis == 0 else 16))
            else:
                role = _role(d)
                guess = {"batch": batch, "seq": seq, "other": _OTHER_DIM}[role]
                if retry is not None and role != "batch":
                    guess = retry
                shape.append(named.setdefault(d, guess))
        shapes[spec.name] = tuple(shape)
    feed: Feed = {}
    for plan in plans:
        shape = shapes[plan.spec.name]
        if plan.kind in ("sequence", "optional-sequence"):
            elem = shape if shape is not None else (3,)
            feed[plan.spec.name] = [_values(plan, elem, rng, shapes, strings) for _ in range(2)]
        else:
            feed[plan.spec.name] = _values(plan, shape or (), rng, shapes, strings)
    return feed


def _resolve(bound: _Bound, shapes: Mapping[str, tuple[int, ...] | None]) -> int | None:
    if isinstance(bound, tuple):
        shape = shapes.get(bound[0])
        return shape[bound[1]] if shape is not None and -len(shape) <= bound[1] < len(shape) else None
    return bound


def _values(
    plan: _Plan,
    shape: tuple[int, ...],
    rng: np.random.Generator,
    shapes: Mapping[str, tuple[int, ...] | None],
    strings: Sequence[str],
) -> Any:
    dtype = plan.spec.dtype
    count = math.prod(shape)
    if count * max(dtype.itemsize, 1) > 1 << 30:
        raise DataError(f"cannot generate data for input {plan.spec.describe()}: {count:,} values per feed")
    if dtype == np.dtype(object) or dtype.kind in "SU":
        return rng.choice(np.asarray(list(strings), dtype=object), size=shape)
    integer = dtype.kind in "iu" or _is_ml_int(dtype)
    if plan.split is not None and integer and len(shape) == 1:
        total = _resolve(plan.split[0], shapes)
        if total is not None and shape[0] == plan.split[1]:
            return _partition(rng, total, shape[0]).astype(dtype)
    if plan.rows and (integer or dtype == np.bool_):
        known = [r for r in (_resolve(b, shapes) for b in plan.rows) if r is not None]
        rows = min(known) if known else 1  # a table of unknown size: index 0 is always valid
        return rng.integers(0, max(rows, 1), shape).astype(dtype)
    if plan.choices and (integer or dtype == np.bool_):
        return rng.choice(np.asarray(plan.choices), size=shape).astype(dtype)
    if plan.domain is not None and integer:
        return _domain_values(plan, shape, rng).astype(dtype)
    if plan.mask:
        mask = rng.random(shape) < 0.8
        if mask.ndim:
            mask[..., 0] = True
        return mask.astype(dtype) if dtype != np.bool_ else mask
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(np.bool_)
    if integer:
        return _draw_int(rng, shape, dtype)
    if dtype.kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    if dtype.kind == "f" or _is_ml_float(dtype):
        return _draw_float(rng, shape, dtype)
    raise DataError(f"cannot generate data for input {plan.spec.name!r} of dtype {dtype}")


def _domain_values(plan: _Plan, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Values valid for the input's role alone: divisors, shapes, repeats, axes."""
    count = math.prod(shape)
    if plan.domain == "nonzero":
        return rng.integers(1, 4, shape)
    if plan.domain == "positive":
        return rng.integers(1, 3, shape)
    if plan.domain == "ones":
        return np.ones(shape, np.int64)
    if plan.domain == "reshape":  # ones and one -1: any input size fits
        target = np.ones(count, np.int64)
        if count:
            target[rng.integers(0, count)] = -1
        return target.reshape(shape)
    allowed = np.asarray(plan.axes or [0])  # "axes": distinct where there are enough
    if count > len(allowed):
        return rng.choice(allowed, size=shape)
    return rng.permutation(allowed)[:count].reshape(shape)


def _partition(rng: np.random.Generator, total: int, parts: int) -> np.ndarray:
    """``parts`` non-negative sizes adding up to ``total`` (positive where total allows)."""
    if total >= parts > 0:
        cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False)) if parts > 1 else []
        return np.diff(np.concatenate([[0], cuts, [total]])).astype(np.int64)
    return rng.multinomial(total, [1.0 / parts] * parts).astype(np.int64)


def _is_ml_int(dtype: np.dtype) -> bool:
    try:
        ml_dtypes.iinfo(dtype)
    except (TypeError, ValueError):
        return False
    return dtype.kind not in "iu"


def _is_ml_float(dtype: np.dtype) -> bool:
    try:
        ml_dtypes.finfo(dtype)
    except (TypeError, ValueError):
        return False
    return True


def _draw_int(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    info = ml_dtypes.iinfo(dtype) if _is_ml_int(dtype) else np.iinfo(dtype)
    high = min(int(info.max) + 1, 4)
    return rng.integers(0, high, shape).astype(np.int64).astype(dtype)


def _draw_float(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    if dtype.kind == "f":
        return x.astype(dtype)
    y = x.astype(dtype)  # through ml_dtypes: rounds to the format's bit patterns
    if np.isnan(y.astype(np.float32)).any():  # formats without a sign (float8_e8m0fnu)
        y = np.abs(x).astype(dtype)
    return y

