"""The HTML view of a report payload: one self-contained page that reads as a report.

The page shows the same payload the JSON report holds, in this order:

1. a headline: the verdict against the accuracy budget (and every missed threshold), size,
   nodes, weight bytes and latency of the input vs the output model, and fidelity per
   execution provider and output (cosine, max abs, top-1 agreement, task accuracy);
2. one table per pass: status, what changed, what was skipped and why, nodes / parameters /
   weight bytes before and after, time, fidelity to the pass's input (for a lossless pass,
   its deviation in multiples of the machine's float noise floor), the error, the notes;
3. per-layer details (the passes' records), in collapsible, sortable tables that scroll inside
   their box;
4. the plots the passes made, and the environment the numbers were measured in.

It also renders an ``onnxopt validate --json X.html`` payload (a validation report alone).
No external assets: the styles and the few lines of sorting script are inline, so the file
works offline. Every text from the payload is HTML-escaped; numbers, lists and nested dicts
are written as text (:mod:`onnxopt.report.humanize`), never as Python reprs. Nothing is
estimated: a value the payload does not hold (latency, when it was not measured) says so.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from onnxopt.report import humanize as hz

__all__ = ["render"]

# Rows per details table; the JSON report holds every record.
MAX_ROWS = 2000
# A details table with at most this many rows starts open.
OPEN_ROWS = 15

_STYLE = """
:root{--ok:#1a7f37;--bad:#cf222e;--muted:#59636e;--line:#d1d9e0;--bg2:#f6f8fa}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;
max-width:1200px;margin:0 auto;padding:20px 24px 40px}
h1{font-size:22px;margin:0 0 2px}
h2{font-size:18px;margin:30px 0 10px;padding-bottom:4px;border-bottom:1px solid var(--line)}
h3{font-size:15px;margin:18px 0 6px}
.sub{color:var(--muted);margin:0 0 12px;overflow-wrap:anywhere}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}
th,td{border:1px solid var(--line);padding:3px 8px;text-align:left;vertical-align:top;
overflow-wrap:break-word}
thead th,table.kv th{background:var(--bg2);font-weight:600}
table.kv{width:100%}
table.kv th{width:12em}
td.nowrap{white-space:nowrap}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.good{background:#effbf2;color:var(--ok);font-weight:600}
td.bad{background:#fff0ef;color:var(--bad);font-weight:600}
.verdict{border-radius:8px;padding:10px 16px;margin:10px 0 14px;border:1px solid}
.verdict .word{font-size:22px;font-weight:700;letter-spacing:.5px;margin-right:12px}
.verdict.pass{background:#dafbe1;border-color:#4ac26b}.verdict.pass .word{color:var(--ok)}
.verdict.fail{background:#ffebe9;border-color:#ff8182}.verdict.fail .word{color:var(--bad)}
.verdict.none{background:var(--bg2);border-color:var(--line)}.verdict.none .word{color:var(--muted)}
.verdict ul{margin:6px 0 0;padding-left:20px}
.chip{display:inline-block;border-radius:10px;padding:0 8px;font-size:12px;font-weight:600;
border:1px solid;margin-left:6px;vertical-align:1px}
.chip.ok{color:var(--ok);border-color:#4ac26b}
.chip.unchanged{color:var(--muted);border-color:var(--line)}
.chip.rolled-back,.chip.failed{color:var(--bad);border-color:#ff8182}
.good{color:var(--ok)}.bad{color:var(--bad);font-weight:600}.muted{color:var(--muted)}
.scroll{overflow:auto;max-height:36em;width:fit-content;max-width:100%;
border:1px solid var(--line);margin:6px 0 14px}
.scroll table{margin:0;border-style:hidden}
.wide{overflow-x:auto}
.scroll thead th{position:sticky;top:0;box-shadow:0 1px 0 var(--line)}
table.sortable thead th{cursor:pointer;user-select:none;white-space:nowrap}
table.sortable thead th:hover{background:#eaeef2}
th[data-dir=asc]::after{content:" \\25B2"}th[data-dir=desc]::after{content:" \\25BC"}
details{margin:4px 0 8px}summary{cursor:pointer;font-weight:600;padding:2px 0}
summary .muted{font-weight:400}
ul.plain{margin:0;padding-left:18px}
.facts{display:flex;flex-wrap:wrap;gap:0 16px;align-items:flex-start}
.facts table.kv{width:auto;min-width:260px;max-width:100%}.facts table.kv th{width:auto}
figure{margin:8px 0 18px}figcaption{font-weight:600;margin-bottom:4px}
img{max-width:100%;height:auto;border:1px solid var(--line)}
"""

# Click a column head of a sortable table to order its rows (numbers by value, text by text).
_SCRIPT = """
document.querySelectorAll('table.sortable thead th').forEach(function (th) {
  th.addEventListener('click', function () {
    var table = th.closest('table'), body = table.tBodies[0], col = th.cellIndex;
    var dir = th.dataset.dir === 'asc' ? 'desc' : 'asc';
    table.querySelectorAll('thead th').forEach(function (h) { delete h.dataset.dir; });
    th.dataset.dir = dir;
    function key(row) {
      var cell = row.cells[col];
      if (!cell) return [2, ''];
      var v = cell.dataset.v;
      return v !== undefined && v !== '' ? [0, parseFloat(v)] : [1, cell.textContent];
    }
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a), y = key(b), r;
      if (x[0] !== y[0]) return x[0] - y[0];
      r = x[0] === 0 ? x[1] - y[1] : String(x[1]).localeCompare(String(y[1]));
      return dir === 'asc' ? r : -r;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""

_BASE64 = re.compile(r"[A-Za-z0-9+/=\s]+")


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _breakable(text: str) -> str:
    """Escaped ``text`` with line-break opportunities after / . : so tensor names wrap."""
    return re.sub(r"([/.:])", r"\1<wbr>", _e(text))


def _js_number(x: float) -> str:
    """``x`` as JavaScript's parseFloat reads it (Infinity, not inf)."""
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return repr(float(x))


def _provider(name: str) -> str:
    return name[: -len("ExecutionProvider")] if name.endswith("ExecutionProvider") else name


def render(payload: Mapping[str, Any]) -> str:
    """Render the whole page for an ``optimize`` (or ``validate``) report payload."""
    validation = payload.get("validation")
    standalone = validation is None and "outputs" in payload
    if standalone:  # `onnxopt validate --json X.html`: the payload is the validation report
        validation = payload
    passes = [p for p in payload.get("passes") or [] if isinstance(p, Mapping)]
    parts = [
        "<!doctype html>",
        "<html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>onnxopt report: {_e(payload.get('input', ''))}</title>",
        f"<style>{_STYLE}</style></head><body>",
        _title(payload, passes, standalone),
        _headline(payload, validation, passes, standalone),
    ]
    if passes:
        parts.append(_passes(passes))
        parts.append(_details(passes))
        parts.append(_plots(passes))
    env = payload.get("environment") or (validation or {}).get("environment")
    if env:
        parts.append(_environment(env))
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    return "\n".join(p for p in parts if p)


def _title(
    payload: Mapping[str, Any], passes: Sequence[Mapping[str, Any]], standalone: bool
) -> str:
    if standalone:
        return "<h1>onnxopt validation report</h1><p class='sub'>reference vs candidate</p>"
    src, dst = payload.get("input", ""), payload.get("output", "")
    chain = " &rarr; ".join(_e(p.get("pass", "?")) for p in passes)
    return (
        f"<h1>onnxopt report</h1><p class='sub'>{_e(src)} &rarr; {_e(dst)}"
        + (f"<br>passes: {chain}" if chain else "")
        + "</p>"
    )


# --- 1. headline ---------------------------------------------------------------------------


def _budget_text(budget: Mapping[str, Any] | None) -> str | None:
    """Describe the budget ("cosine >= 0.995"); "" when none was given, None when not recorded."""
    if budget is None:
        return None
    terms = []
    if budget.get("min_cosine") is not None:
        terms.append(f"cosine &ge; {_e(budget['min_cosine'])}")
    if budget.get("max_error") is not None:
        terms.append(f"max abs &le; {_e(budget['max_error'])}")
    if budget.get("min_metric") is not None:
        terms.append(f"metric &ge; {_e(budget['min_metric'])}")
    return " and ".join(terms)


def _verdict(
    payload: Mapping[str, Any], validation: Mapping[str, Any] | None, standalone: bool
) -> str:
    if standalone or "failures" not in payload:
        return (
            "<div class='verdict none'><span class='word'>MEASURED</span>"
            "no budget is recorded in this report (the command line checks --min-cosine / "
            "--max-abs and exits 1 on a miss)</div>"
        )
    failures = [str(f) for f in payload.get("failures") or []]
    budget = _budget_text(payload.get("budget"))
    if failures:
        items = "".join(f"<li>{_e(f)}</li>" for f in failures)
        against = f" against the budget {budget}" if budget else ""
        n = len(failures)
        return (
            f"<div class='verdict fail'><span class='word'>FAIL</span>{n} check{'s' if n > 1 else ''} "
            f"missed{against} (the model was still written)<ul>{items}</ul></div>"
        )
    if validation is None:
        return (
            "<div class='verdict none'><span class='word'>NOT CHECKED</span>the result was not "
            "validated: no data the input model runs on (pass --eval DATA)</div>"
        )
    if budget:
        text = f"budget met: {budget}, on every provider and output"
    elif budget == "":
        text = (
            "no accuracy budget given (--min-cosine / --max-error): "
            "checked that every output is finite"
        )
    else:
        text = "no check failed"
    word = "PASS" if budget else "OK"  # "PASS" only where a budget was checked
    return f"<div class='verdict pass'><span class='word'>{word}</span>{text}</div>"


def _headline(
    payload: Mapping[str, Any],
    validation: Mapping[str, Any] | None,
    passes: Sequence[Mapping[str, Any]],
    standalone: bool,
) -> str:
    parts = ["<h2>Summary</h2>", _verdict(payload, validation, standalone)]
    parts.append(_fidelity_card(payload, validation))
    parts.append(_model_card(payload, validation, passes, standalone))
    notes = [str(n) for n in payload.get("notes") or []]
    if notes:
        parts.append(
            "<p><b>Notes</b></p><ul class='plain'>"
            + "".join(f"<li>{_e(n)}</li>" for n in notes)
            + "</ul>"
        )
    if validation:
        parts.append(_all_metrics(validation))
    return "\n".join(parts)


def _model_card(
    payload: Mapping[str, Any],
    validation: Mapping[str, Any] | None,
    passes: Sequence[Mapping[str, Any]],
    standalone: bool,
) -> str:
    left, right = ("reference", "candidate") if standalone else ("input", "output")
    rows: list[str] = []

    def row(what: str, a: str, b: str, change: str = "") -> None:
        rows.append(_row4(what, a, b, change))

    sizes = (validation or {}).get("sizes") or {}
    ref_b, cand_b = sizes.get("reference_bytes"), sizes.get("candidate_bytes")
    export = payload.get("export") or {}
    if cand_b is None and export.get("bytes") is not None:
        cand_b = export["bytes"]
    unknown = "<span class='muted'>not recorded</span>"
    row(
        "file size",
        _e(hz.nbytes(ref_b)) if ref_b is not None else unknown,
        _e(hz.nbytes(cand_b)) if cand_b is not None else unknown,
        _e(hz.ratio(cand_b, ref_b)),
    )
    if passes:
        first, last = passes[0].get("before") or {}, passes[-1].get("after") or {}
        for key, what in (
            ("nodes", "nodes"),
            ("parameters", "parameters"),
            ("weight_bytes", "weight bytes"),
        ):
            a, b = first.get(key), last.get(key)
            if a is None and b is None:
                continue
            fmt = hz.nbytes if key == "weight_bytes" else (lambda v: hz.value(v))
            row(what, _e(fmt(a)), _e(fmt(b)), _e(hz.ratio(b, a)))
    rows.extend(_latency_rows(validation, passes))
    if validation and validation.get("num_feeds") is not None:
        rows.append(
            f"<tr><th>checked on</th><td colspan='3'>{_e(hz.value(validation['num_feeds']))} feeds"
            f"{'' if standalone else ' (--eval data, else --calib, else generated)'}</td></tr>"
        )
    if export:
        files = export.get("files") or []
        plural = "s" if len(files) != 1 else ""
        what = f"{export.get('path', '')} ({export.get('format', '?')}, {len(files)} file{plural}"
        if export.get("ort_level"):
            what += f", ORT level {export['ort_level']}"
        what += ")"
        check = export.get("check") or {}
        if check:
            what += "; ORT file vs ONNX result: " + hz.value(check)
        rows.append(f"<tr><th>written</th><td colspan='3'>{_e(what)}</td></tr>")
    head = (
        f"<thead><tr><th></th><th>{left}</th><th>{right}</th><th>{right} / {left}</th></tr></thead>"
    )
    return f"<div><h3>Model</h3><table class='model'>{head}<tbody>{''.join(rows)}</tbody></table></div>"


def _row4(what: str, a: str, b: str, change: str) -> str:
    """Build one model-table row: what, input, output, output / input (all already HTML)."""
    cells = "".join(f"<td class='num'>{c}</td>" for c in (a, b, change))
    return f"<tr><th>{what}</th>{cells}</tr>"


def _ms(v: Any, what: str = "") -> str:
    tail = f" <span class='muted'>{_e(what)}</span>" if what else ""
    return f"{_e(hz.value(v))} ms{tail}"


def _latency_rows(
    validation: Mapping[str, Any] | None, passes: Sequence[Mapping[str, Any]]
) -> list[str]:
    """Latency as measured: the final validation's per provider, else what a pass measured."""
    rows = []
    latency = (validation or {}).get("latency") or {}
    for prov, lat in latency.items():
        a, b = lat.get("ref_median_ms"), lat.get("cand_median_ms")
        p90 = (lat.get("ref_p90_ms"), lat.get("cand_p90_ms"))
        where = _e(_provider(prov))
        rows.append(_row4(f"latency, {where} (median)", _ms(a), _ms(b), _e(hz.ratio(b, a))))
        if p90[0] is not None:
            ratio = _e(hz.ratio(p90[1], p90[0]))
            rows.append(_row4(f"latency, {where} (p90)", _ms(p90[0]), _ms(p90[1]), ratio))
    if latency:
        return rows
    rows.append(
        "<tr><th>latency</th><td colspan='3' class='muted'>not measured by the final validation "
        "(<code>onnxopt validate IN OUT --data EVAL --runs 50</code> measures it)</td></tr>"
    )
    for p in passes:
        for rec in p.get("records") or []:
            if rec.get("item") != "latency":
                continue
            timed = [
                (k, v) for k, v in rec.items() if k.endswith("_ms") and isinstance(v, (int, float))
            ]
            if len(timed) != 2:
                continue
            (ka, a), (kb, b) = timed
            what = (
                f"latency, {_e(p.get('pass', '?'))} pass<br>"
                "<span class='muted'>(its input vs its output, CPU)</span>"
            )
            a_text, b_text = _ms(a, hz.label(ka[:-3])), _ms(b, hz.label(kb[:-3]))
            rows.append(_row4(what, a_text, b_text, _e(hz.ratio(b, a))))
    return rows


def _fidelity_card(payload: Mapping[str, Any], validation: Mapping[str, Any] | None) -> str:
    title = (
        f"<h3>Fidelity to the {'reference' if 'failures' not in payload else 'input model'}</h3>"
    )
    if not validation:
        return f"<div>{title}<p class='muted'>not measured: the result was not validated</p></div>"
    budget = payload.get("budget") or {}
    min_cos, max_err = budget.get("min_cosine"), budget.get("max_error")
    failures = [str(f) for f in payload.get("failures") or []]
    floors = validation.get("noise_floor") or {}
    has_floor = any(floors.get(p) for p in floors)
    head = (
        "<th>provider</th><th>output</th><th>cosine</th><th>max abs</th><th>rel. L2</th>"
        "<th>top-1 agreement</th><th>accuracy input &rarr; output</th>"
        + ("<th>max abs / noise floor</th>" if has_floor else "")
        + ("<th>verdict</th>" if "failures" in payload else "")
    )
    rows = []
    for prov, per in (validation.get("outputs") or {}).items():
        for name, m in per.items():
            cos, mx = m.get("cosine"), m.get("max_abs")
            cos_cls = _cls(cos is not None and cos >= min_cos) if min_cos is not None else "num"
            mx_cls = _cls(mx is not None and mx <= max_err) if max_err is not None else "num"
            top1 = m.get("top1")
            acc = "—"
            if m.get("ref_accuracy") is not None:
                ra, ca = m["ref_accuracy"], m.get("cand_accuracy")
                acc = (
                    f"{ra * 100:.2f} % &rarr; {ca * 100:.2f} %"
                    if ca is not None
                    else f"{ra * 100:.2f} %"
                )
            cells = [
                f"<td title='{_e(prov)}'>{_e(_provider(prov))}</td>",
                f"<td>{_breakable(name)}</td>",
                f"<td class='{cos_cls}'>{_e(_cosine(cos, min_cos))}</td>",
                f"<td class='{mx_cls}'>{_e(hz.value(mx))}</td>",
                f"<td class='num'>{_e(hz.value(m.get('rel_l2')))}</td>",
                f"<td class='num'>{_percent(top1)}</td>",
                f"<td class='num'>{acc}</td>",
            ]
            if has_floor:
                floor = (floors.get(prov) or {}).get(name) or {}
                fm = floor.get("max_abs")
                multiple = _e(hz.value(mx / fm)) + "&times;" if fm and mx is not None else "—"
                cells.append(f"<td class='num'>{multiple}</td>")
            if "failures" in payload:
                # Failure lines name the output as validation writes them: "<provider> output 'y'".
                heads = (f"{prov} output {name!r}", f"{prov} output '{name}'")
                mine = [f for f in failures if f.startswith(heads)]
                over = "bad" in cos_cls or "bad" in mx_cls
                bad = bool(mine) or over or bool(m.get("nonfinite"))
                cells.append(f"<td class='{_cls(not bad)}'>{'missed' if bad else 'ok'}</td>")
            rows.append("<tr>" + "".join(cells) + "</tr>")
    skipped = validation.get("skipped_providers") or []
    extra = (
        "<p class='muted'>skipped (not available in this onnxruntime build): "
        f"{_e(', '.join(skipped))}</p>"
        if skipped
        else ""
    )
    return (
        f"<div>{title}<div class='wide'><table><thead><tr>{head}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></div>{extra}</div>"
    )


def _cosine(cos: float | None, bound: float | None) -> str:
    """Write a cosine to 6 places, or to 9 where 6 would hide which side of ``bound`` it is on."""
    if cos is None:
        return "—"
    text = hz.number(cos, "cosine")
    if bound is not None and (float(text) >= bound) != (cos >= bound):
        text = f"{cos:.9f}"
    return text


def _percent(v: Any) -> str:
    return f"{v * 100:.2f} %" if isinstance(v, (int, float)) and not isinstance(v, bool) else "—"


def _cls(ok: bool) -> str:
    return "num good" if ok else "num bad"


def _all_metrics(validation: Mapping[str, Any]) -> str:
    """Every metric of the final validation, collapsed (the headline shows the main ones)."""
    rows = [
        {"provider": _provider(prov), "output": name, **m}
        for prov, per in (validation.get("outputs") or {}).items()
        for name, m in per.items()
    ]
    if not rows:
        return ""
    tol = f"rtol {hz.value(validation.get('rtol'))}, atol {hz.value(validation.get('atol'))}"
    return (
        f"<details><summary>all output metrics <span class='muted'>({_e(tol)})</span></summary>"
        + _records_table(rows, sortable=False)
        + "</details>"
    )


# --- 2. one table per pass -----------------------------------------------------------------


def _passes(passes: Sequence[Mapping[str, Any]]) -> str:
    parts = ["<h2>Passes</h2>"]
    for i, p in enumerate(passes, 1):
        parts.append(_pass_table(i, p))
    return "\n".join(parts)


def _pass_table(i: int, p: Mapping[str, Any]) -> str:
    status = str(p.get("status", "?"))
    name = str(p.get("pass", "?"))
    fid = p.get("fidelity") or {}
    lossless = "noise_floor_max_abs" in fid
    rows: list[tuple[str, str]] = []
    status_text = {
        "ok": "ok: the model changed and passed the checks",
        "unchanged": "unchanged: nothing to do",
        "rolled-back": "rolled back: the pass's result was discarded, the model is as before it",
    }.get(status, status)
    rows.append(
        (
            "status",
            f"<span class='{'bad' if status == 'rolled-back' else ''}'>{_e(status_text)}</span>",
        )
    )
    if p.get("error"):
        rows.append(("error", f"<span class='bad'>{_e(p['error'])}</span>"))
    rows.append(("what changed", _changes(p.get("counts") or {})))
    skipped = p.get("skipped") or {}
    if skipped:
        items = "".join(
            f"<li>{_e(reason)} <span class='muted'>&times;&nbsp;{_e(hz.value(n))}</span></li>"
            for reason, n in sorted(
                skipped.items(), key=lambda kv: -kv[1] if isinstance(kv[1], (int, float)) else 0
            )
        )
        rows.append(("skipped", f"<ul class='plain'>{items}</ul>"))
    before, after = p.get("before") or {}, p.get("after") or {}
    for key, what in (
        ("nodes", "nodes"),
        ("parameters", "parameters"),
        ("weight_bytes", "weight bytes"),
    ):
        if key in before or key in after:
            a, b = before.get(key), after.get(key)
            text = f"{hz.value(a)} &rarr; {hz.value(b)}"
            if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a != b:
                delta = hz.ratio(b, a) if key != "nodes" else f"{b - a:+,}"
                text += f" <span class='muted'>({_e(delta)})</span>"
            rows.append((what, text))
    for key in sorted((set(before) | set(after)) - {"nodes", "parameters", "weight_bytes"}):
        rows.append(
            (
                _e(hz.label(key)),
                f"{_e(hz.value(before.get(key)))} &rarr; {_e(hz.value(after.get(key)))}",
            )
        )
    if p.get("seconds") is not None:
        rows.append(("time", f"{_e(hz.value(p['seconds']))} s"))
    rows.append(("fidelity to its input", _fidelity_text(fid, status)))
    if lossless:
        rows.append(("lossless check", _noise_text(fid)))
    notes = [str(n) for n in p.get("notes") or []]
    if notes:
        rows.append(
            ("notes", "<ul class='plain'>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
        )
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    kind = " <span class='muted'>lossless</span>" if lossless else ""
    return (
        f"<section class='pass'><h3>{i}. {_e(name)}"
        f"<span class='chip {_e(status)}'>{_e(status)}</span>{kind}</h3>"
        f"<table class='kv pass-table'>{body}</table></section>"
    )


def _changes(counts: Mapping[str, Any]) -> str:
    done = [(k, n) for k, n in counts.items() if n]
    zero = [k for k, n in counts.items() if not n]
    if not done and not zero:
        return "<span class='muted'>nothing</span>"
    text = ", ".join(_e(hz.change(k, n)) for k, n in done) or "<span class='muted'>nothing</span>"
    if zero:
        text += (
            " <span class='muted'>(none: "
            + ", ".join(_e(hz.change(k, 0)[2:]) for k in zero)
            + ")</span>"
        )
    return text


def _fidelity_text(fid: Mapping[str, Any], status: str) -> str:
    if not fid:
        why = "model unchanged" if status == "unchanged" else "no check ran"
        return f"<span class='muted'>not checked ({why})</span>"
    known = ("cosine", "max_abs", "rms_abs", "rel_l2")
    parts = [
        f"{hz.label(k)} {hz.number(fid[k], k)}"
        for k in known
        if isinstance(fid.get(k), (int, float))
    ]
    text = ", ".join(parts)
    if fid.get("feeds") is not None:
        text += f" on {hz.value(fid['feeds'])} feeds"
    rest = {
        k: v for k, v in fid.items() if k not in (*known, "feeds") and not k.startswith("noise_")
    }
    if rest:
        text += "; " + hz.value(rest)
    return _e(text)


def _noise_text(fid: Mapping[str, Any]) -> str:
    """Describe a lossless pass's deviation against the float noise floor and what is allowed."""
    allowed = fid.get("noise_allowed_multiple")
    mult = fid.get("noise_multiple_max_abs")
    within = (
        isinstance(mult, (int, float)) and isinstance(allowed, (int, float)) and mult <= allowed
    )
    terms = []
    for what, dev, floor, m in (
        ("max abs", fid.get("max_abs"), fid.get("noise_floor_max_abs"), mult),
        ("rms", fid.get("rms_abs"), fid.get("noise_floor_rms"), fid.get("noise_multiple_rms")),
    ):
        if m is None:
            continue
        terms.append(
            f"{what} {_e(hz.value(dev))} = {_e(hz.value(m))}&times; the floor ({_e(hz.value(floor))})"
        )
    text = "; ".join(terms)
    if allowed is not None:
        verdict = "within" if within else "above (the tolerance is allowed on top)"
        cls = "good" if within else "muted"
        text += (
            f"; allowed {_e(hz.value(allowed))}&times; the floor + tolerance: "
            f"<span class='{cls}'>{verdict}</span>"
        )
    level = fid.get("noise_level")
    if level:
        text += (
            "<br><span class='muted'>floor: the input run with onnxruntime optimisations off "
            f"vs level {_e(level)}</span>"
        )
    return text


# --- 3. per-layer details ------------------------------------------------------------------

# A group of records gets a title from a column it has (first match).
_GROUP_TITLES = (
    ("precision", "precision per node"),
    ("plan", "plans tried (the frontier)"),
    ("rank", "low-rank splits"),
    ("storage", "codebook per weight"),
    ("sparsity", "pruned weights"),
    ("channels_before", "pruned channels"),
    ("flops_before", "FLOPs per layer"),
    ("accumulated_sqnr_db", "SQNR per quantized tensor"),
    ("outlier_ratio_before", "SmoothQuant per activation"),
    ("num_heads", "fused nodes"),
    ("bits", "weight-only quantization per weight"),
    ("constraint", "distilled parameters"),
)


def _groups(records: Sequence[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    """Group records of one kind: same first two fields after ``item`` (trailing ones vary)."""
    groups: dict[tuple[str, ...], list[Mapping[str, Any]]] = {}
    for r in records:
        if isinstance(r, Mapping):
            groups.setdefault(tuple(k for k in r if k != "item")[:2], []).append(r)
    return list(groups.values())


def _group_title(rows: Sequence[Mapping[str, Any]]) -> str:
    cols = {k for r in rows for k in r}
    for col, title in _GROUP_TITLES:
        if col in cols:
            return title
    first = [k for k in rows[0] if k != "item"][:3]
    return "records: " + ", ".join(hz.label(k) for k in first)


def _details(passes: Sequence[Mapping[str, Any]]) -> str:
    parts = []
    for i, p in enumerate(passes, 1):
        records = p.get("records") or []
        if not records:
            continue
        groups = _groups(records)
        singles = [g[0] for g in groups if len(g) == 1]
        parts.append(f"<h3>{i}. {_e(p.get('pass', '?'))}</h3>")
        if singles:
            facts = "".join(_record_facts(r) for r in singles)
            names = ", ".join(_e(r.get("item", "?")) for r in singles)
            parts.append(
                f"<details open><summary>summary records <span class='muted'>{names}</span>"
                f"</summary><div class='facts'>{facts}</div></details>"
            )
        for g in groups:
            if len(g) == 1:
                continue
            shown = g[:MAX_ROWS]
            more = (
                f" <span class='muted'>(first {len(shown):,} of {len(g):,}; "
                "the JSON report has all)</span>"
                if len(g) > len(shown)
                else ""
            )
            opened = " open" if len(g) <= OPEN_ROWS else ""
            parts.append(
                f"<details{opened}><summary>{_e(_group_title(g))} <span class='muted'>{len(g):,} rows, "
                f"click a column to sort</span>{more}</summary>{_records_table(shown)}</details>"
            )
    if not parts:
        return ""
    return "<h2>Per-layer details</h2>\n" + "\n".join(parts)


def _record_facts(rec: Mapping[str, Any]) -> str:
    rows = "".join(
        f"<tr><th>{_e(hz.label(str(k)))}</th><td>{_e(hz.value(v, str(k)))}</td></tr>"
        for k, v in rec.items()
        if k != "item"
    )
    head = f"<thead><tr><th colspan='2'>{_breakable(rec.get('item', ''))}</th></tr></thead>"
    return f"<table class='kv'>{head}{rows}</table>"


def _records_table(rows: Sequence[Mapping[str, Any]], sortable: bool = True) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{_e(hz.label(str(c)))}</th>" for c in cols)
    body = []
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            key = hz.sort_value(v)
            if key is not None:
                cells.append(
                    f"<td class='num' data-v='{_js_number(key)}'>{_e(hz.value(v, str(c)))}</td>"
                )
            elif c in ("item", "output", "name"):
                text = hz.value(v, str(c))
                # Names up to 32 characters stay on one line; longer ones wrap after / . :
                cells.append(
                    f"<td class='nowrap'>{_e(text)}</td>"
                    if len(text) <= 32
                    else f"<td>{_breakable(text)}</td>"
                )
            else:
                text = hz.value(v, str(c))
                cells.append(f"<td{' class=nowrap' if len(text) <= 24 else ''}>{_e(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    cls = " class='sortable'" if sortable else ""
    return (
        f"<div class='scroll'><table{cls}><thead><tr>{head}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


# --- 4. plots and environment --------------------------------------------------------------


def _plots(passes: Sequence[Mapping[str, Any]]) -> str:
    figs = []
    for p in passes:
        for fig in p.get("figures") or []:
            data = str(fig.get("png_base64", ""))
            title = f"{p.get('pass', '?')}: {fig.get('title', '')}"
            if not _BASE64.fullmatch(data):
                figs.append(f"<p class='bad'>{_e(title)}: the figure data is not base64 PNG</p>")
                continue
            figs.append(
                f"<figure><figcaption>{_e(title)}</figcaption>"
                f"<img alt='{_e(title)}' src='data:image/png;base64,{data}'></figure>"
            )
    return "<h2>Plots</h2>\n" + "\n".join(figs) if figs else ""


def _environment(env: Mapping[str, Any]) -> str:
    cpu = env.get("cpu") or {}
    rows: list[tuple[str, Any]] = [
        ("CPU", cpu.get("model")),
        ("architecture", cpu.get("arch")),
        ("cores", cpu.get("cores")),
        ("ISA flags", " ".join(cpu.get("flags") or []) if cpu.get("flags_known") else "unknown"),
        ("int8 kernels", cpu.get("int8_dot")),
        ("OS", env.get("os")),
        ("Python", env.get("python")),
    ]
    rows += [(k, v) for k, v in (env.get("versions") or {}).items()]
    if env.get("onnxruntime_providers"):
        rows.append(("onnxruntime providers", ", ".join(env["onnxruntime_providers"])))
    body = "".join(
        f"<tr><th>{_e(k)}</th><td>{_e(hz.value(v))}</td></tr>" for k, v in rows if v is not None
    )
    return f"<h2>Environment</h2>\n<table class='kv'>{body}</table>"
