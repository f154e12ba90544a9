"""The architecture holds: the import contracts of pyproject.toml pass, and they do fail on the imports they forbid.

`lint-imports` (import-linter) checks the layers (a module imports only from its own layer or below), that the
format modules need no torch, that the report does not reach the code making the files it reads, and that no
sibling modules or packages import each other in a circle. The failing cases run it on a copy of the package
with one import added, so the contracts are shown to bite, not only to pass.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """lint-imports with ``root``'s pyproject.toml, analysing the attnsae package under ``root``/src."""
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True, text=True)


def package_copy(tmp_path: Path) -> Path:
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(REPO / "src" / "attnsae", tmp_path / "src" / "attnsae",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def add_import(root: Path, module: str, line: str) -> None:
    path = root / "src" / Path(*module.split(".")).with_suffix(".py")
    path.write_text(path.read_text() + f"\n{line}\n")


def test_the_package_keeps_every_import_contract():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "4 kept, 0 broken" in result.stdout


def test_the_copy_is_what_lint_imports_analyses(tmp_path):
    """The failing cases below mean something only if lint-imports reads the copy, not the installed package."""
    root = package_copy(tmp_path)
    add_import(root, "attnsae.errors", "import attnsae.cli  # noqa")
    assert "attnsae.errors -> attnsae.cli" in lint_imports(root).stdout


@pytest.mark.parametrize("module, line, contract", [
    # the training maths reaching the launcher: editing how workers start would retrain every layer
    ("attnsae.sae.objectives", "from attnsae.launcher import this_worker  # noqa", "Layers"),
    # a format reaching a stage
    ("attnsae.formats.metrics", "from attnsae.evaluation import evaluate  # noqa", "Layers"),
    # a format needing torch
    ("attnsae.formats.features", "import torch  # noqa", "Formats are light"),
    # the report reaching the tag maths through the features package (allowed by the layers, not by its contract)
    ("attnsae.reporting.report", "from attnsae.features import families  # noqa", "The report reads files"),
    # the circle of the old layout: the labels file's code importing the stage that renders the pages
    ("attnsae.features.labels", "from attnsae.features import dashboards  # noqa", "No circles"),
])
def test_an_import_against_the_architecture_breaks_its_contract(tmp_path, module, line, contract):
    root = package_copy(tmp_path)
    add_import(root, module, line)
    result = lint_imports(root)
    assert result.returncode != 0
    broken = [row for row in result.stdout.splitlines() if row.endswith(" BROKEN")]
    assert any(row.startswith(contract) for row in broken), result.stdout[-3000:]


def test_reading_the_format_modules_loads_no_torch():
    code = ("import sys\nimport attnsae.formats.features, attnsae.formats.metrics\n"
            "assert 'torch' not in sys.modules, 'torch was imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
