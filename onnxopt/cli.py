"""The ``onnxopt`` command: optimize, validate, inspect, passes, recipes.

Exit codes: 0 success; 1 a validation threshold was missed; 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

import onnx_ir as ir

from onnxopt import __version__, api, config, pass_base, recipes
from onnxopt import modelinfo as _inspect
from onnxopt.errors import OnnxOptError, ValidationFailed
from onnxopt.export import ExportOptions

__all__ = ["main"]

logger = logging.getLogger("onnxopt")


def _parser() -> argparse.ArgumentParser:
    # -q/-v work before or after the command; SUPPRESS keeps a subcommand from resetting them.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars or summaries")
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="-v: info log and tracebacks; -vv: debug")

    parser = argparse.ArgumentParser(
        prog="onnxopt", description="Optimize ONNX models and prove the result on onnxruntime.", parents=[common]
    )
    # No parser.set_defaults(quiet=...): it would set the default on the action shared with every
    # subparser (parents share actions), and the subcommand's default would then undo a leading -q.
    parser.add_argument("--version", action="version", version=f"onnxopt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    opt = sub.add_parser("optimize", parents=[common], help="run a recipe/passes and write the optimized model")
    opt.add_argument("model", help="input .onnx")
    opt.add_argument("-o", "--output", required=True, help="output .onnx (its folder must exist)")
    opt.add_argument("--recipe", help="built-in recipe name or FILE.toml (default: simplify)")
    opt.add_argument("--pass", dest="passes", action="append", default=[], metavar="NAME[:k=v,...]",
                     help="add a pass with options (repeatable)")
    opt.add_argument("--calib", help="calibration data (.npz, folder of .npz/.npy, test_data_set folders)")
    opt.add_argument("--eval", dest="evaluation", help="held-out evaluation data (same forms)")
    opt.add_argument("--target", choices=["cpu", "cuda", "tensorrt"], default="cpu")
    budget = opt.add_mutually_exclusive_group()
    budget.add_argument("--min-cosine", type=float, help="accuracy budget: output cosine to the input model")
    budget.add_argument("--max-error", type=float, help="accuracy budget: max abs output error")
    opt.add_argument("--report", help="write the report as REPORT.json or REPORT.html")
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--time-budget", type=float, metavar="SECONDS",
                     help="mixed: plan for at most this long, then keep the best verified plan (default 300)")
    opt.add_argument("--workers", metavar="N|ray|ray://HOST:PORT",
                     help="mixed: where plan trials run: N local processes (default: all cores), "
                          "'ray' (local Ray) or 'ray://HOST:PORT' (needs pip install 'onnxopt[ray]')")
    opt.add_argument("--external-data", nargs="?", const="one-file", choices=["one-file", "per-tensor"],
                     help="store weights outside the .onnx: one-file (OUT.onnx.data, the default) or "
                          "per-tensor (OUT.weights/<tensor>); automatic above 2 GB")
    opt.add_argument("--external-threshold", type=int, default=1024, metavar="BYTES",
                     help="tensors larger than this go to external data (default 1024)")
    opt.add_argument("--format", choices=["onnx", "ort"],
                     help="output format (default: from the -o suffix; .ort is onnxruntime's mobile format)")
    opt.add_argument("--ort-level", choices=["disable", "basic", "extended", "all"], default="all",
                     help="onnxruntime optimization level baked into an .ort file (default all)")
    opt.add_argument("--no-check", action="store_true", help="skip the checks after each pass")

    val = sub.add_parser("validate", parents=[common], help="compare a candidate model with its reference")
    val.add_argument("reference")
    val.add_argument("candidate")
    val.add_argument("--data", help="feeds (default: 4 seeded feeds generated from the reference's graph)")
    val.add_argument("--providers", default="cpu", help="comma-separated: cpu,cuda,tensorrt")
    val.add_argument("--require-providers", action="store_true", help="a missing provider is an error")
    val.add_argument("--min-cosine", type=float)
    val.add_argument("--max-abs", type=float)
    val.add_argument("--runs", type=int, default=30, help="latency runs after warm-up (0: no timing)")
    val.add_argument("--threads", type=int, help="intra-op threads")
    val.add_argument("--ort-opt", choices=["disable", "basic", "extended", "all"], default="disable",
                     help="onnxruntime graph optimisation level for both models")
    val.add_argument("--json", help="write the validation report to OUT.json")

    ins = sub.add_parser("inspect", parents=[common], help="ops, parameters, bytes per tensor and per op type")
    ins.add_argument("model")
    ins.add_argument("--json", action="store_true", help="print JSON (fields: docs/cli.md 'inspect --json')")
    ins.add_argument("--ep", default="cpu", help="comma-separated execution providers whose kernels every "
                     "node is checked against (default cpu; only providers in this onnxruntime build)")

    sub.add_parser("passes", parents=[common], help="list every pass with its options and defaults")
    sub.add_parser("recipes", parents=[common], help="list every recipe with its passes")
    return parser


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING
    if verbose == 1:
        level = logging.INFO
    elif verbose >= 2:
        level = logging.DEBUG
    if quiet:
        level = logging.ERROR
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _cmd_optimize(args: argparse.Namespace) -> int:
    result = api.optimize(
        args.model,
        args.output,
        recipe=args.recipe,
        passes=args.passes,
        calibration=args.calib,
        evaluation=args.evaluation,
        target=args.target,
        min_cosine=args.min_cosine,
        max_error=args.max_error,
        report_path=args.report,
        seed=args.seed,
        quiet=args.quiet,
        check=not args.no_check,
        time_budget=args.time_budget,
        workers=args.workers,
        export=ExportOptions(
            format=args.format,
            external_data=args.external_data or "auto",
            size_threshold=args.external_threshold,
            ort_level=args.ort_level,
        ),
    )
    if not args.quiet:
        for r in result.reports:
            b, a = r.before, r.after
            print(
                f"{r.pass_name}: {r.summary()} | nodes {b['nodes']} -> {a['nodes']}, "
                f"weight bytes {b['weight_bytes']:,} -> {a['weight_bytes']:,} ({r.seconds:.2f}s)"
            )
            check = _noise_line(r.fidelity) or _cumulative_line(r.fidelity)
            if check:
                print(f"    check: {check}")
            for note in r.notes:
                print(f"    note: {note}")
        for note in result.notes:
            print(f"note: {note}")
        if result.validation is not None:
            print(result.validation.table())
        written = result.export
        extra = f" ({written.format}, {len(written.files)} files, {written.nbytes:,} bytes)" if written else ""
        print(f"wrote {result.output}{extra}")
    if not result.passed:
        for f in result.failures:
            print(f"onnxopt: budget missed: {f}", file=sys.stderr)
        return 1
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    rep = api.validate(
        args.reference,
        args.candidate,
        args.data,
        providers=providers,
        require_providers=args.require_providers,
        latency_runs=args.runs,
        threads=args.threads,
        opt_level=args.ort_opt,
    )
    if args.json:
        from onnxopt.report.writer import write_report

        write_report(args.json, rep.to_json())
    if not args.quiet:
        print(rep.table())
    if args.min_cosine is not None or args.max_abs is not None:
        missed = rep.failures(min_cosine=args.min_cosine, max_abs=args.max_abs)
    else:
        missed = [m for m in rep.failures() if "non-finite" in m]
    if missed:
        for m in missed:
            print(f"onnxopt: validation failed: {m}", file=sys.stderr)
        return 1
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    providers = tuple(p.strip() for p in args.ep.split(",") if p.strip())
    info = _inspect.describe_model(args.model, providers=providers)
    print(json.dumps(info, indent=2) if args.json else _inspect.format_text(info))
    return 0


def _cmd_passes(args: argparse.Namespace) -> int:
    for name, cls in pass_base.all_passes().items():
        doc = (cls.__doc__ or "").strip().splitlines()
        kind = "lossless" if cls.lossless else "lossy"
        calib = ", needs calibration" if cls.needs_calibration else ""
        print(f"{name} ({kind}{calib}): {doc[0] if doc else ''}")
        for row in config.describe(cls.config_class):
            print(f"    {row['name']}: {row['type']} = {row['default']}  {row['help']}")
    return 0


def _cmd_recipes(args: argparse.Namespace) -> int:
    pass_base.all_passes()
    for name, rec in sorted(recipes.RECIPES.items()):
        steps = " -> ".join(
            s.name + (":" + ",".join(f"{k}={v}" for k, v in s.options.items()) if s.options else "") for s in rec.steps
        )
        print(f"{name}: {rec.description}\n    {steps}")
    return 0


_COMMANDS = {
    "optimize": _cmd_optimize,
    "validate": _cmd_validate,
    "inspect": _cmd_inspect,
    "passes": _cmd_passes,
    "recipes": _cmd_recipes,
}


def _one_line(err: BaseException) -> str:
    if isinstance(err, KeyError) and err.args:
        text = str(err.args[0])
    else:
        text = str(err)
    if isinstance(err, ir.passes.PassError) and err.__cause__ is not None:
        text = f"{text}: {err.__cause__}"
    text = " ".join(text.split())
    return text or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``onnxopt`` console script; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    args.quiet = getattr(args, "quiet", False)
    args.verbose = getattr(args, "verbose", 0)
    _setup_logging(args.verbose, args.quiet)
    try:
        return _COMMANDS[args.command](args)
    except ValidationFailed as err:
        print(f"onnxopt: validation failed: {_one_line(err)}", file=sys.stderr)
        return 1
    except (OnnxOptError, ValueError, KeyError, ir.passes.PassError, OSError) as err:
        if args.verbose:
            raise
        print(f"onnxopt: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # an unexpected failure still gets one line (traceback with -v)
        if args.verbose:
            raise
        print(f"onnxopt: internal error: {type(err).__name__}: {_one_line(err)} (run with -v for details)",
              file=sys.stderr)
        return 2


def _cumulative_line(fidelity: dict) -> str:
    """A lossy pass's distance from the input model so far, for the summary."""
    if "cumulative_cosine" not in fidelity:
        return ""
    parts = [f"vs the input model on {fidelity['feeds']} {fidelity['data']} feeds: cosine {fidelity['cumulative_cosine']:.5f}"]
    if "cumulative_top1" in fidelity:
        parts.append(f"top-1 agreement {fidelity['cumulative_top1']:.4f}")
    if "cumulative_accuracy" in fidelity:
        parts.append(f"accuracy {fidelity['cumulative_accuracy']:.4f}")
    return ", ".join(parts)


def _noise_line(fidelity: dict) -> str:
    """A lossless pass's deviation against this machine's noise floor, for the summary."""
    if "noise_floor_max_abs" not in fidelity:
        return ""

    def times(x: float) -> str:
        return f"{x:.2f}x" if x == x and x != float("inf") else "-"

    return (
        f"max abs {fidelity['max_abs']:.2g} = {times(fidelity['noise_multiple_max_abs'])} and rms "
        f"{fidelity['rms_abs']:.2g} = {times(fidelity['noise_multiple_rms'])} the noise floor "
        f"(onnxruntime opt level {fidelity['noise_level']} vs off: max abs "
        f"{fidelity['noise_floor_max_abs']:.2g}, rms {fidelity['noise_floor_rms']:.2g}); "
        f"allowed {fidelity['noise_allowed_multiple']:g}x + tolerance"
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

