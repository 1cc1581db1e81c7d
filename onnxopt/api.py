"""The Python entry points: :func:`optimize` and :func:`validate`."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import onnx_ir as ir

from onnxopt import config as _config
from onnxopt import export as _export
from onnxopt import io as _io
from onnxopt import pipeline, recipes
from onnxopt.context import Metric, PassContext, Target
from onnxopt.errors import DataError, ModelLoadError, OnnxOptError
from onnxopt.quant import trials as _trials
from onnxopt.report import writer as report
from onnxopt.runtime import data as _data
from onnxopt.runtime import feedgen, validation
from onnxopt.runtime import sessions as runtime

__all__ = ["OptimizeResult", "optimize", "parse_pass_spec", "validate"]

logger = logging.getLogger(__name__)
# Without a budget, a result whose worst output cosine to the input model is below this is called
# out: every lossy recipe aims at >= 0.98, so 0.9 is far outside any result it is built to give.
BROKEN_COSINE = 0.9

PassSpec = str | tuple[str, dict[str, Any]] | recipes.Step


@dataclasses.dataclass
class OptimizeResult:
    """What :func:`optimize` produced.

    ``validation`` is None when the final check was skipped (no data was given and the input
    model does not run on generated feeds); ``notes`` then says so.
    """

    output: pathlib.Path
    model: ir.Model
    reports: list
    validation: validation.ValidationReport | None
    failures: list[str]
    export: _export.ExportResult | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when the final model met every threshold asked for."""
        return not self.failures

    @property
    def report(self) -> list[dict[str, Any]]:
        """Per pass: what changed, bytes, time, measured error (JSON-ready)."""
        return [r.to_json() for r in self.reports]


def parse_pass_spec(spec: PassSpec) -> recipes.Step:
    """``"name"``, ``"name:k=v,k2=v2"``, ``("name", {...})`` or a Step -> Step."""
    if isinstance(spec, recipes.Step):
        return spec
    if isinstance(spec, tuple):
        return recipes.Step(spec[0], dict(spec[1]))
    name, _, opts = spec.partition(":")
    return recipes.Step(name.strip(), _config.parse_options(opts) if opts else {})


def optimize(
    model: str | os.PathLike,
    output: str | os.PathLike,
    *,
    recipe: str | None = None,
    passes: Sequence[PassSpec] = (),
    calibration: Any = None,
    evaluation: Any = None,
    target: Target = "cpu",
    min_cosine: float | None = None,
    max_error: float | None = None,
    metric: Metric | None = None,
    min_metric: float | None = None,
    report_path: str | os.PathLike | None = None,
    seed: int = 0,
    quiet: bool = False,
    external_data: bool | None = None,
    check: bool = True,
    strict: bool = False,
    export: _export.ExportOptions | None = None,
    time_budget: float | None = None,
    workers: int | str | None = None,
) -> OptimizeResult:
    """Optimize ``model`` and write the result to ``output``; the input file is never modified.

    Args:
        model: input ``.onnx`` path.
        output: output ``.onnx`` path (its folder must exist); written whole or not at all.
        recipe: a built-in recipe name or a ``.toml`` recipe file; default "simplify" when
            ``passes`` is empty too.
        passes: extra passes after the recipe's: ``"name"``, ``"name:k=v,..."`` or
            ``("name", {options})``.
        calibration: calibration data (any form :func:`onnxopt.runtime.data.load_data` takes).
        evaluation: held-out data for checks and the final validation (default: calibration).
        target: cpu, cuda or tensorrt.
        min_cosine: budget: smallest allowed output cosine to the input model.
        max_error: budget: largest allowed max-abs output error.
        metric: from Python, a score callable (reference outputs, candidate outputs) -> float.
        min_metric: the budget for ``metric``.
        report_path: write the report as JSON or HTML (by suffix).
        seed: for anything random.
        quiet: no progress bars.
        external_data: force external data on (True) / off (False); None: only above 2 GB.
        check: check the model after every pass (checker + numerics).
        strict: raise on a failing pass instead of rolling it back.
        export: output format and external-data layout (:class:`onnxopt.export.ExportOptions`);
            overrides ``external_data``. The format defaults to the suffix of ``output``
            (``.ort``: onnxruntime's ORT format, checked against the ONNX result).
        time_budget: seconds the mixed pass may plan before it returns the best verified plan
            found (None: its ``time_budget`` option, 300 s).
        workers: planning trials: None (all cores), N local processes, "ray" (a local Ray) or
            "ray://HOST:PORT" (a Ray cluster; ``pip install 'onnxopt[ray]'``).

    Raises:
        OnnxOptError: bad model, data or output path (typed subclasses).
        ValueError / KeyError: unknown pass, recipe or option.

    """
    if time_budget is not None and not time_budget > 0:
        raise ValueError(f"time_budget must be > 0 seconds, got {time_budget}")
    _trials.check_available(_trials.parse_workers(workers))  # refused before the model is read
    steps: list[recipes.Step] = []
    if recipe is not None or not passes:
        steps += list(recipes.get_recipe(recipe or "simplify").steps)
    steps += [parse_pass_spec(s) for s in passes]
    # Options are validated before the model is touched.
    recipes.build(steps, PassContext())
    out_path = _io.check_output_path(output, inputs=(model,))
    _export.format_for(out_path, export.format if export is not None else None)
    if report_path is not None:
        _io.check_output_path(report_path, inputs=(model,))
    original = _io.load_model(model)
    _io.check_model_file(model)
    signature = _data.input_signature(original)
    calib = _data.load_data(calibration, signature) if calibration is not None else None
    evald = _data.load_data(evaluation, signature) if evaluation is not None else None
    context = PassContext(
        calibration=calib,
        evaluation=evald,
        target=target,
        min_cosine=min_cosine,
        max_error=max_error,
        metric=metric,
        min_metric=min_metric,
        seed=seed,
        quiet=quiet,
        time_budget=time_budget,
        workers=workers,
    )
    pass_objs = recipes.build(steps, context)
    for p in pass_objs:
        if p.needs_data() and calib is None:
            raise DataError(f"pass {p.name!r} needs calibration data (--calib)")
    work = _io.load_model(model)
    result = pipeline.run(work, pass_objs, check=check, strict=strict)
    check_data = context.check_data
    notes: list[str] = []
    feeds = check_data if check_data is not None else _generated(model, original, seed, context, notes)
    final = None
    if feeds is not None:
        try:
            # The final check runs as deployed (onnxruntime's optimisations on): INT8 QDQ then goes
            # through the integer kernels, whose rounding and saturation the QDQ graph alone hides.
            final = validation.compare(model, result.model, feeds, seed=seed, opt_level="all")
        except Exception as err:
            if isinstance(err, OnnxOptError) or runtime.runs_on(original, feeds, "all"):
                raise
            if check_data is not None:  # the user's own data: the input model is at fault
                raise ModelLoadError(
                    f"{model}: onnxruntime cannot run the input model on the given data ({_first_line(err)})"
                ) from err
            notes.append(_skip_note(f"the input model does not run on generated feeds as deployed ({_first_line(err)})"))
    failures = final.failures(min_cosine=min_cosine, max_abs=max_error) if final is not None else []
    if min_cosine is None and max_error is None:
        failures = [f for f in failures if "non-finite" in f]
        worst = final.worst("cosine") if final is not None else math.nan
        if worst < BROKEN_COSINE:
            notes.append(
                f"WARNING: output cosine {worst:.4f} to the input model on {final.num_feeds} feeds: the "
                "result no longer computes what the input did; --min-cosine makes this an error (exit 1)"
            )
            logger.warning("output cosine %.4f to the input model", worst)
    elif final is None:
        failures.append("the accuracy budget was not checked (no data the input model runs on); pass --eval DATA")
    if metric is not None and min_metric is not None and check_data is not None:
        score = _score(metric, original, result.model, check_data)
        if not score >= min_metric:
            failures.append(f"metric {score:.6g} < {min_metric}")
    if export is None:
        mode = {None: "auto", True: "one-file", False: "off"}[external_data]
        export = _export.ExportOptions(external_data=mode)  # type: ignore[arg-type]
    written = _export.export(result.model, out_path, export, inputs=(model,))
    if written.format == "ort" and feeds is None:
        notes.append("ORT format check skipped: no feeds the input model runs on")
    elif written.format == "ort":
        # Level "all" swaps QDQ pairs for integer kernels, so compare by cosine, not bit-exactness.
        for name, m in _export.check_ort(result.model, written.path, feeds).items():
            written.check[name] = {"max_abs": m.max_abs, "cosine": m.cosine}
            if m.nonfinite or not m.cosine >= _export.ORT_MIN_COSINE:
                failures.append(
                    f"ORT format output {name!r} differs from the ONNX model: cosine {m.cosine:.6f} "
                    f"at --ort-level {written.ort_level} (INT8 on x86 without VNNI saturates unless "
                    "quantize:reduce_range=true; --ort-level basic keeps the QDQ graph as validated)"
                )
    if report_path is not None:
        report.write_report(
            report_path,
            {
                "input": str(model),
                "output": str(out_path),
                "passes": result.to_json(),
                "validation": final.to_json() if final is not None else None,
                "failures": failures,
                # The accuracy budget the failures were checked against (None: not given).
                "budget": {"min_cosine": min_cosine, "max_error": max_error,
                           "min_metric": min_metric if metric is not None else None},
                "notes": notes,
                "export": written.to_json(),
            },
        )
    for note in notes:
        logger.info("%s", note)
    return OptimizeResult(out_path, result.model, result.reports, final, failures, written, notes)


def _skip_note(why: str) -> str:
    return f"final check skipped: {why}; pass --eval DATA to check the result on real data"


def _generated(
    path: str | os.PathLike, model: ir.Model, seed: int, context: PassContext, notes: list[str]
) -> _data.Dataset | None:
    """Generated feeds the input model runs on, or None with the reason added to ``notes``.

    Raises:
        ModelLoadError: onnxruntime cannot load the input model (no feed could help).

    """
    try:
        return feedgen.runnable_feeds(model, 4, seed=seed, cache=context.cache, source=path)
    except ModelLoadError as err:
        raise ModelLoadError(f"{path}: {err}") from err
    except DataError as err:
        notes.append(_skip_note(str(err)))
        return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:300]


def _score(metric: Metric, ref: ir.Model, cand: ir.Model, data: _data.Dataset) -> float:
    with runtime.session(ref) as r, runtime.session(cand) as c:
        feeds = list(data)
        return float(metric(runtime.run_all(r, feeds), runtime.run_all(c, feeds)))


def validate(
    reference: str | os.PathLike | ir.Model,
    candidate: str | os.PathLike | ir.Model,
    data: Any = None,
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    require_providers: bool = False,
    min_cosine: float | None = None,
    max_abs: float | None = None,
    latency_runs: int = 30,
    threads: int | None = None,
    opt_level: str = "disable",
    seed: int = 0,
) -> validation.ValidationReport:
    """Compare ``candidate`` with ``reference`` on ``data`` on each provider.

    Without ``data``, on 4 feeds generated from the reference's graph
    (:func:`onnxopt.runtime.feedgen.runnable_feeds`).

    Returns the report; check ``report.failures(min_cosine=..., max_abs=...)`` or call
    ``report.assert_ok(...)`` to raise :class:`onnxopt.errors.ValidationFailed`.
    """
    if isinstance(reference, (str, os.PathLike)) and not pathlib.Path(reference).exists():
        raise OnnxOptError(f"{reference}: model file not found")
    if data is None:
        ref = reference if isinstance(reference, ir.Model) else _io.load_model(reference)
        try:
            source = None if isinstance(reference, ir.Model) else reference
            data = feedgen.runnable_feeds(ref, 4, seed=seed, source=source)
        except DataError as err:
            raise DataError(f"{reference}: cannot validate without data: {err}; pass data (--data)") from err
    return validation.compare(
        reference,
        candidate,
        data,
        providers=providers,
        require_providers=require_providers,
        latency_runs=latency_runs,
        threads=threads,
        opt_level=opt_level,  # type: ignore[arg-type]
        seed=seed,
    )
