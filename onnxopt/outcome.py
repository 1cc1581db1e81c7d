"""What an engine did, as plain data: counts, skips, per-item records and notes.

Engines (``onnxopt.quant``, ``onnxopt.compress``, ``onnxopt.distill``) never see a pass or its
report; they fill an :class:`Outcome` and return it, and the pass copies it into its own report
with :meth:`onnxopt.pass_base.PassReport.absorb`.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

__all__ = ["Outcome"]


@dataclasses.dataclass
class Outcome:
    """Changes made (``counts``), candidates left alone with the reason, records and notes."""

    counts: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    skipped: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def count(self, what: str, n: int = 1) -> None:
        """``n`` changes of kind ``what``."""
        self.counts[what] += n

    def skip(self, reason: str, n: int = 1) -> None:
        """``n`` candidates left alone for ``reason``."""
        self.skipped[reason] += n

    def record(self, item: str, **fields: Any) -> None:
        """Per-item detail (a tensor, a node)."""
        self.records.append({"item": item, **fields})

    def note(self, text: str) -> None:
        """A free-text remark."""
        self.notes.append(text)
