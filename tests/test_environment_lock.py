"""requirements.lock is the environment: it agrees with pyproject.toml, every entry is pinned with hashes, and the
running environment holds exactly its versions (`make install` installs it with --require-hashes --no-deps)."""

from __future__ import annotations

import importlib.metadata
import re

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from helpers import REPO

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11, the lock's Python

LOCK = REPO / "requirements.lock"
INSTALLED_FIRST = {"torch"}  # by version, before the lock: the machine decides the build (Makefile)
ENTRY = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>\S+)(?P<rest>.*)$")


def locked() -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of every entry of the lock."""
    entries, current = {}, None
    for line in LOCK.read_text().splitlines():
        if match := ENTRY.match(line):
            current = canonicalize_name(match["name"])
            entries[current] = (match["version"], [])
        if current and (found := re.search(r"--hash=sha256:([0-9a-f]{64})", line)):
            entries[current][1].append(found[1])
        if not line.rstrip().endswith("\\"):
            current = None
    return entries


def direct_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]


def test_every_entry_is_pinned_with_hashes():
    lines = [line for line in LOCK.read_text().splitlines() if line and not line.startswith((" ", "#"))]
    assert lines and all(ENTRY.match(line) for line in lines), [line for line in lines if not ENTRY.match(line)]
    assert all(hashes for _, hashes in locked().values())
    assert "--index-url" not in LOCK.read_text() and "--find-links" not in LOCK.read_text()  # no machine's pip config


def test_the_lock_agrees_with_pyproject():
    entries = locked()
    for requirement in direct_requirements():
        name = canonicalize_name(requirement.name)
        (pinned,) = [s.version for s in requirement.specifier if s.operator == "=="]
        if name in INSTALLED_FIRST:
            assert name not in entries, f"{name} is installed first, by version, not from the lock"
            continue
        assert name in entries, f"{name} is in pyproject.toml but not in requirements.lock: run `make lock`"
        assert entries[name][0] == pinned, f"{name}: pyproject.toml pins {pinned}, the lock {entries[name][0]}"


def test_the_environment_is_the_lock():
    """What `make install` installed: every locked package at its locked version (a hand-installed extra is not
    checked; an upgrade or a missing package is)."""
    wrong = {}
    for name, (version, _) in locked().items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            wrong[name] = (version, installed)
    assert not wrong, f"locked vs installed (run `make install`): {wrong}"
    assert importlib.metadata.version("torch").split("+")[0] == "2.13.0"
