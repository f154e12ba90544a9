"""The code passes its own linter: ruff, at the lock's version, with pyproject.toml's rules (line length 120,
pyflakes, pycodestyle, import order, bugbear, Python >= 3.10 spellings)."""

from __future__ import annotations

import subprocess
import sys

from helpers import REPO


def ruff(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", *args], cwd=REPO, input=stdin,
                          capture_output=True, text=True, check=False)


def test_src_tests_and_bench_pass_ruff():
    result = ruff("src", "tests", "bench")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_rules_bite():
    """The control: the project's config flags a line of 121 characters and an unused import in a source file."""
    text = "import os\n\nVALUE = " + repr("x" * (121 - len("VALUE = ''"))) + "\n"
    result = ruff("--stdin-filename", "src/attnsae/example.py", "-", stdin=text)
    assert result.returncode == 1
    assert "E501" in result.stdout and "F401" in result.stdout
