"""The README's quick start runs and prints what the README says it prints; the docs' links resolve."""

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


def _outside_code(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_in_the_docs_resolves():
    pages = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
    checked = 0
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", _outside_code(page.read_text())):
            if re.match(r"[a-z]+:", target):
                continue  # an external URL: not checked offline
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            assert dest.exists(), f"{page.name}: link {target!r} points at a missing file"
            if anchor:
                headings = re.findall(r"^#+ (.+)$", _outside_code(dest.read_text()), flags=re.M)
                assert anchor in {_anchor(h) for h in headings}, f"{page.name}: no heading for {target!r}"
            checked += 1
    assert checked >= 10, "the link pattern found (almost) no links: the check itself is broken"
