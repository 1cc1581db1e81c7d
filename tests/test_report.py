"""The report: the JSON holds the payload; the HTML page is a readable view of the same payload.

The page must open with a headline (verdict against the budget, size, latency, fidelity), give
every pass a table, keep per-layer records in collapsible sortable tables, show no Python
reprs, escape every name and work offline. The runs use the bundled digits CNN (real model,
real calibration and evaluation data) through the same CLI a user types.
"""

from __future__ import annotations

import copy
import html
import json
import re
from html.parser import HTMLParser

import pytest

from onnxopt.cli import main
from onnxopt.report import humanize
from onnxopt.report.writer import write_report
from tests.conftest import model_path

# A budget the INT8 CNN meets: the real-model bar of tests/tolerances (cosine >= 0.99).
MET = "0.99"
# A budget INT8 cannot meet: cosine = 1 - rel_l2**2 / 2 for small errors, so 1 - 1e-7 needs a
# relative L2 error below 4.5e-4, an order of magnitude below one 8-bit step (1/255 = 3.9e-3)
# of the quantized activations' range.
MISSED = "0.9999999"

_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}


class _Page(HTMLParser):
    """The page's visible text, and for every table the tags and classes it sits in."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, str]] = []
        self.text: list[str] = []
        self.tables: list[tuple[str, list[tuple[str, str]]]] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        cls = dict(attrs).get("class") or ""
        if tag == "table":
            self.tables.append((cls, list(self.stack)))
        if tag not in _VOID:
            self.stack.append((tag, cls))

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID:
            return
        while self.stack:
            if self.stack.pop()[0] == tag:
                break

    def handle_data(self, data: str) -> None:
        if not any(t in ("style", "script") for t, _ in self.stack):
            self.text.append(data)

    def visible(self) -> str:
        return "".join(self.text)


def _optimize(tmp_path, name: str, budget: str, suffix: str) -> tuple[int, str]:
    report = tmp_path / f"{name}.{suffix}"
    code = main([
        "-q", "optimize", str(model_path("digits_cnn.onnx")), "-o", str(tmp_path / f"{name}.onnx"),
        "--recipe", "int8", "--calib", str(model_path("digits_cnn_calib.npz")),
        "--eval", str(model_path("digits_cnn_eval.npz")), "--min-cosine", budget,
        "--report", str(report),
    ])  # fmt: skip
    return code, report.read_text()


@pytest.fixture(scope="module")
def met(tmp_path_factory):
    """One INT8 run that meets its budget: the JSON payload and the HTML page of that payload."""
    tmp = tmp_path_factory.mktemp("report")
    code, text = _optimize(tmp, "met", MET, "json")
    assert code == 0
    payload = json.loads(text)
    before = copy.deepcopy(payload)
    page = write_report(tmp / "met.html", payload).read_text()
    assert payload == before  # rendering never changes the payload
    return payload, page


def _headline(page: str) -> str:
    return page[page.index("<h2>Summary</h2>") : page.index("<h2>Passes</h2>")]


def test_json_report_holds_the_payload(met):
    payload, _ = met
    assert set(payload) == {
        "input", "output", "passes", "validation", "failures", "budget", "notes", "export", "environment",
    }  # fmt: skip
    assert payload["budget"] == {"min_cosine": float(MET), "max_error": None, "min_metric": None}
    assert [p["pass"] for p in payload["passes"]] == ["simplify", "quantize"]
    assert payload["failures"] == [] and payload["validation"]["latency"] == {}


def test_headline_shows_verdict_sizes_latency_and_fidelity(met):
    payload, page = met
    head = _headline(page)
    assert "class='verdict pass'" in head and ">PASS<" in head and f"cosine &ge; {MET}" in head
    sizes = payload["validation"]["sizes"]
    assert f"{sizes['reference_bytes']:,} B" in head and f"{sizes['candidate_bytes']:,} B" in head
    first, last = payload["passes"][0]["before"], payload["passes"][-1]["after"]
    assert f"{first['weight_bytes']:,} B" in head and f"{last['weight_bytes']:,} B" in head
    metrics = payload["validation"]["outputs"]["CPUExecutionProvider"]["logits"]
    assert f"{metrics['cosine']:.6f}" in head
    assert f"{metrics['ref_accuracy'] * 100:.2f} % &rarr; {metrics['cand_accuracy'] * 100:.2f} %" in head
    # The final validation did not time the models: the headline says so and invents nothing;
    # the quantize pass did time its input and output, and that measurement is shown as such.
    assert "not measured by the final validation" in head
    timed = next(r for r in payload["passes"][1]["records"] if r["item"] == "latency")
    assert "latency, quantize pass" in head and f"{humanize.number(timed['int8_ms'])} ms" in head


def test_failing_budget_is_a_red_verdict_with_every_failure(tmp_path):
    code, page = _optimize(tmp_path, "missed", MISSED, "html")
    assert code == 1
    head = _headline(page)
    assert "class='verdict fail'" in head and ">FAIL<" in head and f"cosine &ge; {MISSED}" in head
    assert "cosine" in head and "&lt; 0.9999999" in head  # the failure line itself, escaped
    assert re.search(r"<td class='num bad'>0\.9999\d+</td>", head)  # the cosine cell is red
    assert ">missed<" in head and "class='verdict pass'" not in page


def test_every_pass_has_a_readable_table_and_no_reprs(met):
    payload, page = met
    passes = payload["passes"]
    assert page.count("class='kv pass-table'") == len(passes)
    for i, p in enumerate(passes, 1):
        assert f"<h3>{i}. {p['pass']}<span class='chip {p['status']}'>" in page
    simplify, quantize = passes
    assert f"{simplify['counts']['batchnorm_folded']} BatchNorm folded" in page
    assert f"{quantize['counts']['quantized_Conv']} Conv quantized" in page
    fid = simplify["fidelity"]
    assert f"= {humanize.number(fid['noise_multiple_max_abs'])}&times; the floor" in page
    assert f"{simplify['before']['nodes']} &rarr; {simplify['after']['nodes']}" in page
    text = _Page(page).visible()
    for repr_mark in ("{'", '{"', "[{", "{}", "[]", "Counter("):
        assert repr_mark not in text, repr_mark
    assert not re.search(r"\b(None|True|False)\b", text)
    for note in quantize["notes"]:
        assert note in text


def test_details_are_collapsible_sortable_and_the_page_is_self_contained(met):
    payload, page = met
    parsed = _Page(page)
    sortable = [stack for cls, stack in parsed.tables if "sortable" in cls.split()]
    # quantize records 8 per-tensor SQNR rows: at least that group is a sortable table.
    assert sortable
    for stack in sortable:
        tags = [t for t, _ in stack]
        assert "details" in tags  # collapsible
        assert stack[-1] == ("div", "scroll")  # wide or long tables scroll inside their box
    text = parsed.visible()
    for rec in payload["passes"][1]["records"]:
        assert rec["item"] in text
    assert "<script>" in page and "table.sortable thead th" in page
    assert not re.search(r"(src|href)\s*=\s*['\"](?!data:)", page)  # nothing fetched: works offline
    assert "<link" not in page and "@import" not in page and "url(" not in page


def _hostile_payload() -> dict:
    evil = "<script>alert('x')</script>"
    return {
        "input": f"in{evil}.onnx",
        "output": "out.onnx",
        "passes": [
            {
                "pass": f"p{evil}", "status": "rolled-back", "modified": False,
                "error": f"checker failed: {evil}", "seconds": 0.5,
                "counts": {f"odd{evil}": 2}, "skipped": {f"reason {evil}": 3},
                "before": {"nodes": 4, "weight_bytes": 100}, "after": {"nodes": 4, "weight_bytes": 100},
                "fidelity": {}, "notes": [f"note & {evil}"],
                "records": [
                    {"item": f"t{evil}", "sqnr_db": 40.0, "extra": {"a": 1, "b": [1, 2]}},
                    {"item": "plain", "sqnr_db": 30.5, "extra": {"a": 2, "b": []}},
                ],
                "figures": [{"title": f"fig {evil}", "png_base64": "iVBORw0KGgo="}],
            }
        ],
        "validation": {
            "num_feeds": 4, "rtol": 1e-3, "atol": 1e-4,
            "sizes": {"reference_bytes": 2048, "candidate_bytes": 1024}, "skipped_providers": [],
            "latency": {"CPUExecutionProvider": {
                "ref_median_ms": 2.0, "ref_p90_ms": 2.5, "cand_median_ms": 1.0, "cand_p90_ms": 1.25, "ratio": 0.5,
            }},
            "outputs": {"CPUExecutionProvider": {f"y{evil}": {
                "max_abs": 0.01, "cosine": 0.9999896, "rel_l2": 0.004, "nonfinite": 0, "top1": 1.0,
            }}},
            "noise_level": None, "noise_floor": {},
        },
        "failures": [f"CPUExecutionProvider output {'y' + evil!r}: cosine 0.999990 < 0.99999"],
        "budget": {"min_cosine": 0.99999, "max_error": None, "min_metric": None},
        "notes": [],
        "export": {
            "path": "out.onnx", "format": "onnx", "files": ["out.onnx"], "bytes": 1024, "ort_level": None, "check": {},
        },
        "environment": {
            "cpu": {"model": f"cpu {evil}", "flags": [], "flags_known": False}, "versions": {},
        },
    }  # fmt: skip


def test_names_are_escaped_and_errors_and_measured_latency_are_visible(tmp_path):
    page = write_report(tmp_path / "r.html", _hostile_payload()).read_text()
    assert page.count("<script") == 1  # only the page's own sorting script
    assert "alert('x')" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "<span class='chip rolled-back'>" in page
    assert "<span class='bad'>checker failed: &lt;script&gt;" in page
    assert "note &amp; &lt;script&gt;" in page
    # Nested values read as text; a measured latency is shown, not "not measured".
    assert "a: 1, b: 1, 2" in page and "a: 2, b: none" in page
    assert "latency, CPU (median)" in page and "not measured" not in page
    assert "2 ms" in page and "1 ms" in page and "0.500x" in page
    # 0.9999896 to 6 places would print 0.999990, which reads as meeting 0.99999: more places.
    assert "0.999989600" in page and "class='verdict fail'" in page and ">missed<" in page


def test_validate_report_as_html_shows_measured_latency(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "o.onnx"
    src, data = str(model_path("digits_cnn.onnx")), str(model_path("digits_cnn_eval.npz"))
    assert main(["-q", "optimize", src, "-o", str(out)]) == 0
    args = ["validate", src, str(out), "--data", data]
    assert main(["-q", *args, "--runs", "3", "--json", "v.json"]) == 0
    payload = json.loads((tmp_path / "v.json").read_text())
    page = write_report(tmp_path / "v.html", payload).read_text()
    lat = payload["latency"]["CPUExecutionProvider"]
    assert "onnxopt validation report" in page and ">MEASURED<" in page
    assert f"{humanize.number(lat['ref_median_ms'])} ms" in page and "not measured" not in page
    assert f"{payload['sizes']['reference_bytes']:,} B" in page


def test_humanize_reads_like_text():
    assert humanize.change("batchnorm_folded", 3) == "3 BatchNorm folded"
    assert humanize.change("zeroed_weights", 21709) == "21,709 weights zeroed"
    assert humanize.change("quantized_Conv", 3) == "3 Conv quantized"
    assert humanize.change("split_gemm", 2) == "2 Gemm split"
    assert humanize.label("accumulated_sqnr_db") == "accumulated SQNR (dB)"
    assert humanize.label("bytes_after") == "bytes after"
    times = " \u00d7 "
    shape = times.join(["32", "16", "3", "3"])
    assert humanize.value({"k": 16, "axis": None, "shape": [32, 16, 3, 3]}) == f"k: 16, axis: —, shape: {shape}"
    assert humanize.value([{"a": 1}, {"a": 2}]) == "a: 1; a: 2"
    assert humanize.value(list(range(30))).endswith("… (6 more)")
    assert humanize.number(0.99991234, "cosine") == "0.999912"
    assert humanize.number(1207552.0) == "1,207,552" and humanize.number(3.0994e-06) == "3.1e-06"
    assert humanize.nbytes(118357) == "118,357 B (115.6 KiB)"
    assert humanize.ratio(40224, 118357) == "0.340x (-66.0 %)"
    assert humanize.sort_value([32, 16, 3, 3]) == 32 * 16 * 3 * 3 and humanize.sort_value("x") is None
    assert html.escape(humanize.value(True)) == "yes"
