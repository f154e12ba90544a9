"""The documentation: the MkDocs site builds in strict mode, every reference to a section of the design resolves
to a `## N.` heading of docs/design.md, and the README stays short."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

DESIGN = REPO / "docs/design.md"
# Where references to the design are looked for: every file under these folders (text files only), and these files.
SCANNED_DIRS = ["src", "tests", "bench", "docs", "profiles", "pipelines"]
SCANNED_FILES = ["README.md", "BENCHMARKS.md", "Makefile"]
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".js", ".css", ".html", ".sh", ""}
README_MAX_LINES = 250

# A mention of the design file, with the path written before it and the section number after it when there is one:
# "docs/design.md 3" anywhere, or inside docs/ a link to the design page itself with the section's anchor.
REFERENCE = re.compile(r"(?P<path>[\w./-]*)design\.md(?:[ §]*(?P<section>\d+))?")
SECTION_HEADING = re.compile(r"^## (\d+)\. \S", re.MULTILINE)


def design_sections() -> set[int]:
    return {int(n) for n in SECTION_HEADING.findall(DESIGN.read_text(encoding="utf-8"))}


def scanned_files() -> list[Path]:
    files = [REPO / name for name in SCANNED_FILES]
    for folder in SCANNED_DIRS:
        for path in sorted((REPO / folder).rglob("*")):
            if path.is_file() and path.suffix in SUFFIXES and "__pycache__" not in path.parts \
                    and not any(part.endswith(".egg-info") for part in path.parts):
                files.append(path)
    return files


def bad_references(relative: str, text: str, sections: set[int]) -> list[str]:
    """Every reference in ``text`` (the file at ``relative``, from the repository root) that does not point at a
    section of docs/design.md, as 'file:line: reason'."""
    in_docs = relative.startswith("docs/")
    # Inside docs/ a bare name (or one starting "./") is the design page itself; anywhere else the path must be
    # docs/design.md, never another copy (such as the team's notes outside the repository).
    allowed = {"", "./", "docs/"} if in_docs else {"docs/"}
    problems = []
    for number, line in enumerate(text.splitlines(), start=1):
        for match in REFERENCE.finditer(line):
            path, section = match.group("path"), match.group("section")
            if path not in allowed:
                problems.append(f"{relative}:{number}: '{match.group(0)}' is not docs/design.md")
            elif section is not None and int(section) not in sections:
                problems.append(f"{relative}:{number}: '{match.group(0)}': docs/design.md has no section {section}")
    return problems


def test_mkdocs_site_builds_strict(tmp_path):
    """`mkdocs build --strict` (mkdocs.yml also warns on broken anchors and links that leave docs/) succeeds."""
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "WARNING" not in result.stderr, result.stderr[-3000:]
    assert (tmp_path / "site" / "design" / "index.html").is_file()


def test_design_sections_are_numbered_in_order():
    numbers = [int(n) for n in SECTION_HEADING.findall(DESIGN.read_text(encoding="utf-8"))]
    assert numbers == list(range(1, len(numbers) + 1)), numbers


def test_every_design_reference_resolves():
    sections = design_sections()
    problems = []
    for path in scanned_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # not a text file
        problems += bad_references(path.relative_to(REPO).as_posix(), text, sections)
    assert not problems, "\n".join(problems)


DESIGN_NAME = "design" + ".md"  # spelled in two pieces so that this file's own examples are not references


@pytest.mark.parametrize("relative, text, flagged", [
    ("src/attnsae/x.py", f"see docs/{DESIGN_NAME} 3", False),
    ("src/attnsae/x.py", f"see docs/{DESIGN_NAME} 99", True),  # no such section
    ("src/attnsae/x.py", f"see {DESIGN_NAME} 3", True),  # outside docs/, the bare name points nowhere
    ("README.md", f"see /work/shared/{DESIGN_NAME} 3", True),  # a file a clone does not have
    ("docs/pipeline.md", f"[{DESIGN_NAME} 3]({DESIGN_NAME}#3-the-training-recipe-and-its-sources)", False),
    ("docs/pipeline.md", f"see ../{DESIGN_NAME}", True),
    ("tests/t.py", f"{DESIGN_NAME} §42", True),
])
def test_the_reference_check_catches_bad_references(relative, text, flagged):
    assert bool(bad_references(relative, text, design_sections())) is flagged


def test_readme_is_short():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def modules_missing_from(doc: str) -> list[str]:
    """Modules of src/attnsae whose file name the page never mentions (package ``__init__.py`` files aside)."""
    text = (REPO / doc).read_text(encoding="utf-8")
    package = REPO / "src" / "attnsae"
    return sorted(str(p.relative_to(package)) for p in package.rglob("*.py")
                  if p.name != "__init__.py" and f"`{p.name}`" not in text)


def test_the_architecture_map_names_every_module():
    assert modules_missing_from("docs/architecture.md") == []


def test_a_module_missing_from_the_map_is_found(tmp_path, monkeypatch):
    (tmp_path / "src" / "attnsae" / "data").mkdir(parents=True)
    (tmp_path / "src" / "attnsae" / "data" / "new_stage.py").write_text("")
    (tmp_path / "map.md").write_text("`harvest.py`")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert modules_missing_from("map.md") == ["data/new_stage.py"]
