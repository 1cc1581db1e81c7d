from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from onnxopt.cli import main
from onnxopt.testing.builders import conv_bn_feeds, conv_bn_model
from tests.conftest import model_path


@pytest.fixture
def workdir(tmp_path):
    onnx.save(conv_bn_model(), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", **conv_bn_feeds())
    return tmp_path


def _bad_inputs(d):
    data = conv_bn_model().SerializeToString()
    (d / "trunc.onnx").write_bytes(data[: len(data) // 2])
    (d / "text.onnx").write_text("this is not a model\n")
    np.savez(d / "missing_input.npz", y=np.zeros((2, 3, 8, 8), np.float32))
    np.savez(d / "wrong_shape.npz", x=np.zeros((2, 3, 9, 8), np.float32))
    np.savez(d / "wrong_dtype.npz", x=np.zeros((2, 3, 8, 8), np.float64))


CASES = {
    "missing file": (["nope.onnx"], "model file not found"),
    "truncated model": (["trunc.onnx"], "trunc.onnx: not"),
    "text file named .onnx": (["text.onnx"], "text.onnx: not"),
    "npz missing an input": (["m.onnx", "--calib", "missing_input.npz"], "missing input 'x'"),
    "wrong shape": (["m.onnx", "--calib", "wrong_shape.npz"], "dim 2 is 9, expected 8"),
    "wrong dtype": (["m.onnx", "--calib", "wrong_dtype.npz"], "dtype float64, model expects float32"),
    "unknown pass": (["m.onnx", "--pass", "simplfy"], "unknown pass 'simplfy'"),
    "unknown option": (["m.onnx", "--pass", "simplify:fold=1"], "unknown option 'fold' for simplify"),
    "unknown recipe": (["m.onnx", "--recipe", "turbo"], "unknown recipe 'turbo'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_line_and_exit_2(workdir, case, capsys, monkeypatch):
    _bad_inputs(workdir)
    monkeypatch.chdir(workdir)
    args, needle = CASES[case]
    code = main(["optimize", args[0], "-o", "out.onnx", *args[1:]])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxopt: error:") and needle in lines[0], err
    assert not (workdir / "out.onnx").exists()
    assert not [p for p in workdir.iterdir() if p.name.startswith(".onnxopt-")]


def test_output_folder_that_does_not_exist(workdir, capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    assert main(["optimize", "m.onnx", "-o", "no/such/dir/out.onnx"]) == 2
    assert "output folder 'no/such/dir' does not exist" in capsys.readouterr().err


def test_optimize_validate_inspect_round_trip(workdir, capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    assert main(["-q", "optimize", "m.onnx", "-o", "out.onnx", "--report", "r.json", "--calib", "d.npz"]) == 0
    report = json.loads((workdir / "r.json").read_text())
    assert report["passes"][0]["pass"] == "simplify" and report["passes"][0]["counts"]["batchnorm_folded"] == 1
    assert main(["validate", "m.onnx", "out.onnx", "--data", "d.npz", "--max-abs", "1e-5", "--runs", "3",
                 "--json", "v.json"]) == 0
    assert "cosine=1.000000" in capsys.readouterr().out
    validated = json.loads((workdir / "v.json").read_text())
    assert validated["num_feeds"] == 1
    # Both record the machine the numbers come from: CPU model, ISA flags, cores, versions.
    from onnxopt.runtime.environment import cpu_info

    for env in (report["environment"], validated["environment"]):
        assert env["cpu"]["model"] == cpu_info().model and env["cpu"]["flags"] == list(cpu_info().flags)
        assert env["cpu"]["cores"] == cpu_info().cores and env["versions"]["onnxruntime"] and env["os"]
    assert main(["-q", "optimize", "m.onnx", "-o", "out2.onnx", "--report", "r.html"]) == 0
    page = (workdir / "r.html").read_text()
    assert "<h2>Environment</h2>" in page and cpu_info().model in page
    # A threshold that cannot be met is exit code 1, not 2.
    onnx.save(conv_bn_model(seed=5), workdir / "other.onnx")
    assert main(["validate", "m.onnx", "other.onnx", "--data", "d.npz", "--min-cosine", "0.999", "--runs", "0"]) == 1
    assert "validation failed" in capsys.readouterr().err
    assert main(["inspect", "out.onnx", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["nodes"] == 5 and "BatchNormalization" not in info["by_op_type"]


def test_passes_and_recipes_listings(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "simplify (lossless)" in out and "fold_batchnorm: bool = True" in out
    assert main(["recipes"]) == 0
    assert "simplify:" in capsys.readouterr().out


def test_console_script_runs_as_a_process(workdir):
    proc = subprocess.run(
        [sys.executable, "-m", "onnxopt.cli", "optimize", str(workdir / "nope.onnx"), "-o", str(workdir / "o.onnx")],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_before_or_after_the_command_silences_summaries_and_bars(tmp_path, capfd, where):
    args = ["optimize", str(model_path("digits_cnn.onnx")), "-o", str(tmp_path / "q.onnx"), "--recipe", "int8",
            "--calib", str(model_path("digits_cnn_calib.npz"))]
    argv = ["-q", *args] if where == "before" else [*args, "-q"]
    assert main(argv) == 0
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)


def test_a_broken_result_without_a_budget_is_called_out(workdir, capsys, monkeypatch):
    """99 % of the conv weights zeroed: the output no longer resembles the input model's. Without a
    budget the file is still written (exit 0) but the summary says so; with one it is exit 1."""
    monkeypatch.chdir(workdir)
    args = ["optimize", "m.onnx", "-o", "out.onnx", "--eval", "d.npz", "--pass", "prune:sparsity=0.99,min_elements=0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "note: WARNING: output cosine" in out and (workdir / "out.onnx").exists()
    assert main(["optimize", "m.onnx", "-o", "out.onnx", "--eval", "d.npz", "--pass", "simplify"]) == 0
    assert "WARNING" not in capsys.readouterr().out
    assert main([*args, "--min-cosine", "0.9"]) == 1
    assert "budget missed" in capsys.readouterr().err
