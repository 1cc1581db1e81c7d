"""Run passes in order; after each one check the model and roll back a pass that broke it.

After every pass: ``onnx.checker`` (full check, which includes strict shape inference) on the
result; for passes declared lossless, outputs compared with the pass's input on the context's
data (or seeded random feeds) at the pass's tolerance widened by this machine's float noise on
that model (the noise floor, see :mod:`onnxopt.runtime.validation`: the input model run with
onnxruntime's optimisations off vs on, measured once and reused until a lossy pass changes the
function); for lossy passes, the error against the pass's input is measured and recorded. A pass that raises or fails a check is rolled back: the
model goes on as it was before that pass, and the report says why.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import pathlib
import tempfile
import time
from collections.abc import Sequence

import onnx
import onnx_ir as ir
import tqdm

from onnxopt import _ir_utils, normalize
from onnxopt import io as _io
from onnxopt.errors import DataError, ModelLoadError
from onnxopt.pass_base import OptPass, PassReport
from onnxopt.runtime import feedgen, validation
from onnxopt.runtime import sessions as runtime

__all__ = ["PipelineResult", "check_model", "model_stats", "noise_level", "run"]

logger = logging.getLogger(__name__)

# Feeds used to check each pass (a few are enough to catch a broken rewrite).
CHECK_FEEDS = 8


@dataclasses.dataclass
class PipelineResult:
    """The final model and one report per pass, in order.

    ``lifted`` says which Constant-node weights became initializers before the first pass
    (also a note on the first report, so the CLI, JSON and HTML reports show it).
    """

    model: ir.Model
    reports: list[PassReport]
    lifted: normalize.LiftResult | None = None

    def to_json(self) -> list[dict]:
        """The reports as JSON-serialisable dicts."""
        return [r.to_json() for r in self.reports]


def model_stats(model: ir.Model) -> dict[str, int]:
    """Nodes, parameters and weight bytes (main graph and subgraphs)."""
    params, nbytes = _ir_utils.parameter_count(model)
    return {"nodes": sum(1 for _ in model.graph.all_nodes()), "parameters": params, "weight_bytes": nbytes}


def check_model(model: ir.Model) -> None:
    """``onnx.checker`` with full_check (strict shape inference); raises on an invalid model."""
    if not runtime.fits_in_memory(model) or _io.external_tensors(model):
        # External-data locations are relative to a folder the checker knows only from a path
        # (and > 2 GB cannot be one protobuf): check a saved copy by path, as onnx does.
        with tempfile.TemporaryDirectory(prefix="onnxopt-check-") as tmp:
            path = pathlib.Path(tmp) / "model.onnx"
            _io.save_model(model, path, external_data=True)
            onnx.checker.check_model(str(path), full_check=True)
        return
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)


def run(
    model: ir.Model,
    passes: Sequence[OptPass],
    *,
    check: bool = True,
    strict: bool = False,
) -> PipelineResult:
    """Run ``passes`` on ``model`` (in place where a pass succeeds) and return the result.

    Before the first pass, Constant nodes holding tensors become initializers
    (:func:`onnxopt.normalize.lift_constants`, exact), so every pass finds its weights.

    Args:
        model: the model; passes edit it in place, so pass a copy to keep the original.
        passes: pass instances, sharing one context.
        check: run the checker and numerical comparison after every pass.
        strict: re-raise a pass's exception instead of rolling back.
    """
    reports: list[PassReport] = []
    noise = _NoiseCache()
    # Lossy passes are also measured against the pipeline's input, so every step says how far
    # the model has drifted so far (tensors are shared: the copy costs the graph, not the weights).
    original = _snapshot(model) if check and any(not p.lossless for p in passes) else None
    # Weights may be initializers or Constant nodes; passes read initializers only (exact).
    lifted = normalize.lift_constants(model) if passes else None
    if lifted is not None and lifted.note():
        logger.info("normalize: %s", lifted.note())
    bar = tqdm.tqdm(passes, desc="passes", unit="pass", disable=_quiet(passes) or len(passes) < 2, leave=False)
    for p in bar:
        bar.set_postfix_str(p.name)
        before_stats = model_stats(model)
        snapshot = _snapshot(model)
        t0 = time.perf_counter()
        attempt: PassReport | None = None
        try:
            report = p(model)
            if not isinstance(report, PassReport):
                report = _wrap(p, report)
            attempt = report
            if report.model is not model:
                model = report.model
            _unmap(model, snapshot)
            if check and report.modified:
                check_model(model)
                _check_numerics(p, snapshot, model, report, noise)
                if not p.lossless and original is not None:
                    _check_cumulative(p, original, model, report)
        except Exception as err:
            if strict:
                raise
            cause = err.__cause__ if isinstance(err, ir.passes.PassError) and err.__cause__ else err
            message = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
            logger.warning("%s: rolled back: %s", p.name, message)
            model = snapshot
            report = p.new_report(model)
            report.status = "rolled-back"
            report.error = f"{type(cause).__name__}: {message}"
            report.modified = False
            if attempt is not None:  # what the rejected result measured (deviation, noise floor)
                report.fidelity = dict(attempt.fidelity)
        else:
            if not report.modified:
                report.status = "unchanged"
            elif not p.lossless:
                noise.floor = None  # the function changed: the next lossless check measures again
        report.seconds = time.perf_counter() - t0
        report.before = before_stats
        report.after = model_stats(model)
        report.model = model
        logger.info("%s: %s", p.name, report.summary())
        reports.append(report)
    if lifted is not None and lifted.note():
        reports[0].notes.insert(0, lifted.note())
    return PipelineResult(model, reports, lifted)


def _snapshot(model: ir.Model) -> ir.Model:
    """A copy to roll back to. ``Model.clone`` shares type and shape objects with the original,
    and ``value.dtype = ...`` mutates the shared type in place, so those are copied too; tensors
    stay shared (passes replace tensors, they do not write into them)."""
    clone = model.clone()
    for graph in clone.graphs():
        values = list(graph.inputs) + list(graph.initializers.values())
        values += [out for node in graph for out in node.outputs]
        for value in values:
            if value.type is not None:
                value.type = copy.deepcopy(value.type)
            if value.shape is not None:
                value.shape = copy.deepcopy(value.shape)
    return clone


def _unmap(*models: ir.Model) -> None:
    """Unmap the external-data files a pass read (the pages would otherwise stay in RSS)."""
    for model in models:
        for tensor in _io.external_tensors(model):
            _io.release_external(tensor)


def _quiet(passes: Sequence[OptPass]) -> bool:
    return any(p.context.quiet for p in passes)


def _wrap(p: OptPass, result: ir.passes.PassResult) -> PassReport:
    report = p.new_report(result.model)
    report.modified = result.modified
    return report


@dataclasses.dataclass
class _NoiseCache:
    """The noise floor of the current model's function on the check feeds (None: not measured)."""

    floor: dict | None = None
    level: str | None = None


# Q/DQ and float16 graphs: onnxruntime's level "all" swaps them for integer / fused kernels whose
# rounding is a different function, not float noise; level "basic" (constant folding, Conv+BN and
# other exact fusions) still re-associates float arithmetic.
_NOT_FLOAT_NOISE = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})


def noise_level(model: ir.Model) -> runtime.OptLevel:
    """The onnxruntime level whose difference from level "disable" is float noise for ``model``."""
    for node in model.graph.all_nodes():
        if node.op_type in _NOT_FLOAT_NOISE or node.op_type.startswith("QLinear"):
            return "basic"
        for out in node.outputs:
            if out.dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
                return "basic"
    return "all"


def _check_cumulative(p: OptPass, original: ir.Model, after: ir.Model, report: PassReport) -> None:
    """Fidelity of the model after a lossy pass to the pipeline's input on the check data.

    Records ``cumulative_cosine`` (worst output), ``cumulative_top1`` (top-1 agreement, class-score
    outputs) and ``cumulative_accuracy`` where the check data keeps its labels (a set of more
    than CHECK_FEEDS feeds is cut to that and loses them); a step past the run's accuracy budget
    (``--min-cosine`` / ``--max-error``) gets a note saying so (the final check decides the exit).
    """
    feeds = p.context.check_data
    if feeds is None or "cosine" not in report.fidelity:
        return  # no real data, or the per-pass check was skipped (its note says why)
    if len(feeds) > CHECK_FEEDS:
        feeds = feeds.take(CHECK_FEEDS)
    result = validation.compare(original, after, feeds, rtol=1.0, atol=1.0)
    fields = {"cosine": "cosine", "top1": "top1", "accuracy": "cand_accuracy", "max_abs": "max_abs"}
    for key, metric in fields.items():
        value = result.worst(metric)
        if value == value:  # NaN: not applicable (no class outputs, no labels)
            report.fidelity[f"cumulative_{key}"] = value
    source = "evaluation" if p.context.evaluation is not None else "calibration"
    report.fidelity["data"] = source
    missed = result.failures(min_cosine=p.context.min_cosine, max_abs=p.context.max_error)
    if p.context.min_cosine is not None or p.context.max_error is not None:
        if missed:
            report.note(f"past the accuracy budget after this step: {missed[0]}")


def _check_numerics(
    p: OptPass, before: ir.Model, after: ir.Model, report: PassReport, noise: _NoiseCache
) -> None:
    """Lossless: outputs must match the pass input within its tolerance and the noise floor.
    Lossy: record the error."""
    feeds = p.context.check_data
    if feeds is None:
        try:
            feeds = feedgen.runnable_feeds(before, 2, seed=p.context.seed, cache=p.context.cache)
        except (DataError, ModelLoadError) as err:  # the final check decides if that is an error
            report.note(f"numerical check skipped: {err}; pass --eval DATA to check on real data")
            return
    elif len(feeds) > CHECK_FEEDS:
        feeds = feeds.take(CHECK_FEEDS)
    rtol, atol = p.tolerance
    kw: dict = {}
    if p.lossless:
        if noise.floor is None:
            noise.level = noise_level(before)
            kw["noise_level"] = noise.level
        else:
            kw["noise"] = noise.floor
    try:
        result = validation.compare(before, after, feeds, rtol=rtol, atol=atol, **kw)
    except Exception:
        if p.context.check_data is None and not runtime.runs_on(before, feeds):
            # Generated feeds can still be invalid for the model: no check, and say so.
            report.note(
                "numerical check skipped: the model does not run on generated feeds; "
                "pass --eval DATA to check on real data"
            )
            return
        raise
    worst_cos = result.worst("cosine")
    report.fidelity = {
        "max_abs": result.worst("max_abs"),
        "rms_abs": result.worst("rms_abs"),
        "rel_l2": result.worst("rel_l2"),
        "cosine": worst_cos,
        "feeds": result.num_feeds,
    }
    if p.lossless:
        noise.floor = result.noise
        floor_max = max((m.max_abs for per in result.noise.values() for m in per.values()), default=0.0)
        floor_rms = max((m.rms_abs for per in result.noise.values() for m in per.values()), default=0.0)
        x_max, x_rms = result.noise_multiples()
        report.fidelity.update({
            "noise_level": noise.level,
            "noise_floor_max_abs": floor_max,
            "noise_floor_rms": floor_rms,
            "noise_multiple_max_abs": x_max,
            "noise_multiple_rms": x_rms,
            "noise_allowed_multiple": validation.NOISE_MULTIPLE,
        })
        missed = result.failures()
        if missed:
            raise AssertionError(f"lossless pass changed the outputs: {missed[0]}")
    else:
        nonfinite = result.worst("nonfinite")
        if nonfinite:
            raise AssertionError(f"pass produced {int(nonfinite)} non-finite output values")
