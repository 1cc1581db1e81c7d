"""Write reports: JSON (machine-readable) or HTML (tables, plus plots where passes give data).

Every report records the environment it was measured in (CPU model, ISA flags, cores, OS and
library versions: :func:`onnxopt.runtime.environment.environment`), since latency, the integer kernels'
results and the choices made from them depend on the machine.
"""

from __future__ import annotations

import html
import json
import os
import pathlib
from typing import Any

from onnxopt import io as _io
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


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>(none)</p>"
    keys = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in keys)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(k, '')))}</td>" for k in keys) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, default=str)
    return str(v)


def _html(payload: dict[str, Any]) -> str:
    parts = [
        "<!doctype html><meta charset='utf-8'><title>onnxopt report</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px;text-align:left}</style>",
        f"<h1>onnxopt report</h1><p>{html.escape(str(payload.get('input', '')))} &rarr; "
        f"{html.escape(str(payload.get('output', '')))}</p>",
    ]
    passes = payload.get("passes", [])
    summary = [
        {k: p.get(k) for k in ("pass", "status", "seconds", "counts", "skipped", "before", "after", "fidelity", "error")}
        for p in passes
    ]
    parts.append("<h2>Passes</h2>" + _table(summary))
    for p in passes:
        for fig in p.get("figures", []):
            parts.append(f"<h3>{html.escape(p['pass'])}: {html.escape(fig['title'])}</h3>")
            parts.append(f"<img src='data:image/png;base64,{fig['png_base64']}'>")
        if p.get("records"):
            parts.append(f"<h3>{html.escape(p['pass'])}: details</h3>" + _table(p["records"][:500]))
        for note in p.get("notes", []):
            parts.append(f"<p>{html.escape(note)}</p>")
    env = payload.get("environment")
    if env:
        cpu = env.get("cpu", {})
        row = {"cpu": cpu.get("model"), "arch": cpu.get("arch"), "cores": cpu.get("cores"),
               "isa flags": " ".join(cpu.get("flags", [])) if cpu.get("flags_known") else "unknown",
               "int8 kernels": cpu.get("int8_dot"), "os": env.get("os"), "python": env.get("python"),
               **{k: v for k, v in env.get("versions", {}).items()}}
        parts.append("<h2>Environment</h2>" + _table([row]))
    for note in payload.get("notes", []):
        parts.append(f"<p>note: {html.escape(note)}</p>")
    validation = payload.get("validation")
    if validation:
        rows = [
            {"provider": prov, "output": name, **metrics}
            for prov, per in validation.get("outputs", {}).items()
            for name, metrics in per.items()
        ]
        parts.append("<h2>Validation</h2>" + _table(rows))
        parts.append("<h3>Sizes</h3>" + _table([validation.get("sizes", {})]))
        if validation.get("latency"):
            parts.append("<h3>Latency</h3>" + _table([{"provider": k, **v} for k, v in validation["latency"].items()]))
    return "\n".join(parts)
