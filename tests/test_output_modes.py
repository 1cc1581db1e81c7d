"""Every file onnxopt writes gets the permissions a new file of the user gets.

That is 0o666 less the process umask for files and 0o777 less the umask for folders, whatever
wrote the file: the model (one file, external data, per-tensor weights), the ``.ort`` file and
its operator config, and the JSON / HTML reports (once written 0o600 by ``tempfile.mkstemp``
while the model beside them was 0o644). Several umasks, so that no single one hides a mode that
happens to match it.
"""

from __future__ import annotations

import os
import pathlib
import stat

import pytest

import onnxopt
from onnxopt import cli, export
from onnxopt import io as _io
from onnxopt.export import ExportOptions
from onnxopt.report.writer import write_report
from tests.conftest import load_model, model_path


@pytest.fixture(params=[0o022, 0o002, 0o027, 0o077], ids=lambda m: f"umask{m:03o}")
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _modes(folder: pathlib.Path) -> dict[str, tuple[bool, int]]:
    return {
        p.relative_to(folder).as_posix(): (p.is_dir(), stat.S_IMODE(p.stat().st_mode))
        for p in folder.rglob("*")
    }


def test_every_output_gets_the_mode_of_a_new_file(tmp_path, umask):
    out = tmp_path / "out"
    out.mkdir()
    src = model_path("digits_mlp.onnx")
    for name, report in (("opt.onnx", "opt.html"), ("opt.ort", "opt.json")):
        onnxopt.optimize(src, out / name, passes=["simplify"], report_path=out / report, quiet=True)
    assert cli.main(["validate", str(src), str(out / "opt.onnx"), "--json", str(out / "val.json")]) == 0
    model = load_model("digits_mlp.onnx")
    _io.save_model(model, out / "ext.onnx", external_data=True, size_threshold=0)
    per_tensor = ExportOptions(external_data="per-tensor", size_threshold=0)
    export.export(model, out / "pt.onnx", per_tensor)
    export.export(model, out / "m.ort", ExportOptions(ort_config=True))
    write_report(out / "r.json", {"passes": []})
    _io.write_atomic(out / "raw.bin", b"\x00\x01")

    modes = _modes(out)
    written = {name for name, (is_dir, _) in modes.items() if not is_dir}
    assert {
        "opt.onnx", "opt.html", "opt.ort", "opt.json", "val.json", "ext.onnx", "ext.onnx.data",
        "pt.onnx", "m.ort", "m.required_operators.config", "r.json", "raw.bin",
    } <= written  # fmt: skip
    assert any(name.startswith("pt.weights/") for name in written)
    assert not [n for n in modes if n.startswith(".onnxopt-")], "a staging folder was left behind"
    wrong = {
        name: oct(mode)
        for name, (is_dir, mode) in modes.items()
        if mode != (0o777 if is_dir else 0o666) & ~umask
    }
    assert not wrong, f"umask {umask:03o}: {wrong}"


def test_overwriting_a_private_report_gives_the_new_file_mode(tmp_path, umask):
    # A replaced file is a new file: it does not keep the old file's 0o600.
    path = tmp_path / "r.json"
    path.write_text("{}")
    path.chmod(0o600)
    write_report(path, {"passes": []})
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert '"passes"' in path.read_text()


def test_write_atomic_leaves_nothing_behind_on_failure(tmp_path):
    # The rename into place fails (a folder holds the name): no partial file, no staging folder.
    (tmp_path / "r.html").mkdir()
    with pytest.raises(OSError):
        _io.write_atomic(tmp_path / "r.html", "<html></html>")
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]
    assert (tmp_path / "r.html").is_dir() and not any((tmp_path / "r.html").iterdir())
