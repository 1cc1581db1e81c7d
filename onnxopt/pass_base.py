"""The pass base class, its report, the pass context and the registry of pass names."""

from __future__ import annotations

import collections
import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any, ClassVar, Generic, TypeVar

import onnx_ir as ir

from onnxopt import config as _config
from onnxopt.context import PassContext
from onnxopt.outcome import Outcome

__all__ = [
    "EmptyConfig",
    "OptPass",
    "PassReport",
    "all_passes",
    "get",
    "make",
    "register",
]

C = TypeVar("C")


@dataclasses.dataclass(frozen=True)
class EmptyConfig:
    """A pass without options."""


@dataclasses.dataclass
class PassReport(ir.passes.PassResult):
    """What one pass did: counts of changes, reasons for skips, per-item records.

    The pipeline fills the measured fields (time, sizes, error, status) after the pass ran.
    """

    pass_name: str = ""
    counts: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    skipped: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    # Filled by the pipeline.
    status: str = "ok"  # ok | unchanged | rolled-back
    error: str = ""
    seconds: float = 0.0
    before: dict[str, int] = dataclasses.field(default_factory=dict)
    after: dict[str, int] = dataclasses.field(default_factory=dict)
    fidelity: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Plots for the HTML report: {"title": str, "png_base64": str} (rendered by onnxopt.report).
    figures: list[dict[str, str]] = dataclasses.field(default_factory=list)

    def count(self, what: str, n: int = 1) -> None:
        """Record ``n`` changes of kind ``what``; a counted change marks the model modified."""
        self.counts[what] += n
        if n:
            self.modified = True

    def skip(self, reason: str, n: int = 1) -> None:
        """Record that ``n`` candidates were left alone for ``reason``."""
        self.skipped[reason] += n

    def record(self, item: str, **fields: Any) -> None:
        """Per-item detail (a tensor, a node) for the JSON report."""
        self.records.append({"item": item, **fields})

    def note(self, text: str) -> None:
        """A free-text remark shown with the pass summary (e.g. a measured slow-down)."""
        self.notes.append(text)

    def absorb(self, outcome: Outcome) -> None:
        """Copy what an engine did into this report (its counts mark the model modified)."""
        for what, n in outcome.counts.items():
            self.count(what, n)
        for reason, n in outcome.skipped.items():
            self.skip(reason, n)
        self.records.extend(outcome.records)
        self.notes.extend(outcome.notes)

    def summary(self) -> str:
        """One line: status, counts, skips."""
        parts = [self.status]
        if self.counts:
            parts.append(", ".join(f"{k}={v}" for k, v in sorted(self.counts.items())))
        if self.skipped:
            parts.append("skipped: " + ", ".join(f"{k} ({v})" for k, v in self.skipped.most_common()))
        if self.error:
            parts.append(f"error: {self.error}")
        return "; ".join(parts)

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable dict (the model itself is left out)."""
        return {
            "pass": self.pass_name,
            "status": self.status,
            "modified": bool(self.modified),
            "error": self.error,
            "seconds": round(self.seconds, 4),
            "counts": dict(self.counts),
            "skipped": dict(self.skipped),
            "before": self.before,
            "after": self.after,
            "fidelity": self.fidelity,
            "notes": self.notes,
            "records": _jsonable(self.records),
            **({"figures": self.figures} if self.figures else {}),
        }


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalar
        return obj.item()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


class OptPass(ir.passes.InPlacePass, Generic[C]):
    """Base of every onnxopt pass: a name, a typed config, a context, and a report.

    Subclasses set ``config_class`` and implement ``call(model) -> PassReport``. Lossless
    passes (``lossless = True``) are checked numerically by the pipeline against their input
    at ``tolerance`` (rtol, atol); lossy passes get their error measured and recorded.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = EmptyConfig
    lossless: ClassVar[bool] = False
    needs_calibration: ClassVar[bool] = False
    tolerance: ClassVar[tuple[float, float]] = (1e-4, 1e-5)

    def __init__(self, config: C | None = None, context: PassContext | None = None) -> None:
        self.config: C = config if config is not None else self.config_class()
        self.context = context if context is not None else PassContext()

    def __repr__(self) -> str:
        return f"{self.name}({self.config})"

    def needs_data(self) -> bool:
        """Whether this pass, with its config, needs calibration data (default: ``needs_calibration``)."""
        return self.needs_calibration

    def new_report(self, model: ir.Model) -> PassReport:
        """An empty report for this pass."""
        return PassReport(model=model, modified=False, pass_name=self.name)

    def call(self, model: ir.Model) -> PassReport:  # pragma: no cover - abstract
        """Transform ``model`` in place and return what was done."""
        raise NotImplementedError


_REGISTRY: dict[str, type[OptPass]] = {}


def register(name: str):
    """Class decorator: register a pass under a stable kebab-case CLI ``name``."""

    def wrap(cls: type[OptPass]) -> type[OptPass]:
        if name in _REGISTRY:
            raise ValueError(f"pass name {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _load_all() -> None:
    importlib.import_module("onnxopt.passes")


def all_passes() -> dict[str, type[OptPass]]:
    """Every registered pass, by name."""
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def get(name: str) -> type[OptPass]:
    """The pass class registered as ``name``.

    Raises:
        KeyError: unknown name, with the known names listed.
    """
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown pass {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def make(name: str, options: Mapping[str, Any] | None = None, context: PassContext | None = None) -> OptPass:
    """Instantiate pass ``name`` with ``options`` validated against its config class."""
    cls = get(name)
    config = _config.from_dict(cls.config_class, options or {}, owner=name)
    return cls(config, context)
