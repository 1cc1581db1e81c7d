"""Write reports: JSON (machine-readable) or HTML (a readable view of the same payload).

The HTML page (:mod:`onnxopt.report.html_page`) opens with a headline (verdict against the
budget, size, latency and fidelity of input vs output), then one table per pass, the per-layer
records in collapsible sortable tables, the plots and the environment.

Every report records the environment it was measured in (CPU model, ISA flags, cores, OS and
library versions: :func:`onnxopt.runtime.environment.environment`), since latency, the integer kernels'
results and the choices made from them depend on the machine.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from onnxopt import io as _io
from onnxopt.report import html_page
from onnxopt.runtime import environment

__all__ = ["write_report"]


def write_report(path: str | os.PathLike, payload: dict[str, Any]) -> pathlib.Path:
    """Write ``payload`` as JSON or HTML (by the file suffix), atomically.

    An ``environment`` entry (this machine's) is added when the payload has none.
    """
    path = pathlib.Path(path)
    if "environment" not in payload:
        payload = {**payload, "environment": environment.environment()}
    if not path.parent.is_dir():
        from onnxopt.errors import OutputPathError

        raise OutputPathError(f"{path}: report folder {str(path.parent)!r} does not exist")
    text = _html(payload) if path.suffix.lower() in (".html", ".htm") else json.dumps(payload, indent=2, default=str)
    return _io.write_atomic(path, text)  # the mode of a new file of the user, as the model's


def _html(payload: dict[str, Any]) -> str:
    return html_page.render(payload)
