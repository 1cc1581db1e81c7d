"""The README's quick start runs and prints what the README says it prints."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

from tests.conftest import ROOT


def _blocks() -> list[str]:
    return re.findall(r"```\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_quick_start_prints_the_documented_op_counts(tmp_path):
    blocks = _blocks()
    command = next(b for b in blocks if "onnxopt optimize models/" in b and "pip install ." in b)
    expected = blocks[blocks.index(command) + 1]
    args = shlex.split(command.split(".venv/bin/onnxopt", 1)[1])
    out_index = args.index("-o") + 1
    args[out_index] = str(tmp_path / args[out_index])
    proc = subprocess.run(
        [sys.executable, "-m", "onnxopt.cli", *args], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    documented_lines = expected.strip().splitlines()
    # Indented detail lines (the lossless check against the noise floor) carry machine numbers.
    assert any(line.startswith("    check: max abs ") for line in lines)
    assert any(line.startswith("    check: max abs ") for line in documented_lines)
    printed = [line for line in lines if not line.startswith("    ")]
    documented = [line for line in documented_lines if not line.startswith("    ")]
    # The pass line up to its timing, and the structural facts, must be exactly as documented.
    assert printed[0].rsplit("(", 1)[0] == documented[0].rsplit("(", 1)[0]
    assert printed[1] == documented[1]
    assert printed[2].split(" max_abs=")[0] == documented[2].split(" max_abs=")[0]
    # cosine, top-1 and accuracy of a lossless simplify print the same on any CPU (1 - cosine
    # ~1e-12 is below the 6 printed decimals); max_abs (float noise, CPU-dependent) is not compared.
    assert printed[2].split("cosine=")[1] == documented[2].split("cosine=")[1]
    assert printed[-1].replace(str(tmp_path) + "/", "") == documented[-1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(b for b in _blocks() if "pytest" in b).strip()
    for part in command.split(" && "):
        part = part.replace("python3 -m venv .venv", "").strip()
        if part:
            assert part in ci, f"README test step {part!r} is not in .ci/run"
