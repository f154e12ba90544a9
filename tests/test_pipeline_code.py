"""dvc.lock vouches for the code: every stage lists the modules it runs, and the committed lock matches them.

A stage's code is its stage module and every attnsae module that it imports, directly or not, anywhere in
its body (read from the source, so imports inside functions count). The CLI only wires params and paths
to the stage functions, and tracking/repository only log, so neither is a stage's dep.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import pytest
import yaml
from helpers import REPO

SRC = REPO / "src" / "attnsae"
# attnsae subcommand -> the modules whose functions it calls (the stage module, and files for check-params).
COMMAND_MODULES = {
    "check-params": ("config", "files"),
    "model": ("models",),
    "corpus": ("corpus",),
    "tokenize": ("tokenization",),
    "activations": ("activations",),
    "train": ("train",),
    "evaluate": ("evaluate",),
    "dashboards": ("dashboards",),
    "report": ("report",),
    "publish": ("publish",),
    "import": ("published_saes",),
}
PIPELINES = sorted((REPO / "pipelines").glob("*.yaml"))


def imported_modules(module: str) -> set[str]:
    tree = ast.parse((SRC / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "attnsae":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("attnsae."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("attnsae.")}
    return {m for m in found if (SRC / f"{m}.py").is_file()}


def code_of(modules: tuple[str, ...]) -> set[str]:
    """The modules and everything they import, transitively, as repository paths."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += imported_modules(module)
    return {f"src/attnsae/{m}.py" for m in seen}


def stage_command(cmd: str) -> str:
    words = cmd.split()
    assert words[0] == "attnsae", cmd
    return words[1]


def stages(pipeline: Path) -> dict[str, dict]:
    return yaml.safe_load(pipeline.read_text())["stages"]


def body(stage: dict) -> dict:
    return stage.get("do", stage)  # foreach stages keep their definition under do:


@pytest.mark.parametrize("pipeline", PIPELINES, ids=[p.stem for p in PIPELINES])
def test_every_stage_lists_exactly_the_code_it_runs(pipeline):
    for name, stage in stages(pipeline).items():
        definition = body(stage)
        listed = {d for d in definition.get("deps", []) if str(d).startswith("src/")}
        expected = code_of(COMMAND_MODULES[stage_command(definition["cmd"])])
        assert listed == expected, (
            f"{pipeline.name} stage {name}: missing {sorted(expected - listed)}, not run {sorted(listed - expected)}"
        )


@pytest.mark.parametrize("pipeline", PIPELINES, ids=[p.stem for p in PIPELINES])
def test_every_stage_after_the_check_depends_on_it_and_no_param_is_a_label(pipeline):
    for name, stage in stages(pipeline).items():
        definition = body(stage)
        assert "profile" not in definition.get("params", []), f"{name}: the profile name is a label, not a param"
        if name != "params":
            assert "reports/params-check.txt" in definition.get("deps", []), f"{name} runs before the params check"


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_committed_lock_records_the_committed_code():
    """The committed results (dvc.lock, reports/) are what the committed code makes: re-run the pipeline
    (`dvc repro`) and commit dvc.lock with any change to a module a stage lists."""
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]
    pipeline = stages(REPO / "dvc.yaml")
    stale = []
    for stage_name, entry in lock.items():
        for dep in entry.get("deps", []):
            path = REPO / dep["path"]
            if dep["path"].startswith("src/") and (not path.is_file() or md5(path) != dep["md5"]):
                stale.append(f"{stage_name}: {dep['path']}")
    assert not stale, f"dvc.lock records other code than the files hold (run `dvc repro`): {stale}"
    for name, stage in pipeline.items():
        names = [k for k in lock if k == name or k.startswith(f"{name}@")]
        assert names, f"dvc.lock has no entry for stage {name}: run `dvc repro`"
        for key in names:
            listed = {d for d in body(stage).get("deps", []) if str(d).startswith("src/")}
            recorded = {d["path"] for d in lock[key].get("deps", []) if d["path"].startswith("src/")}
            assert recorded == listed, f"dvc.lock's {key} was recorded with other code deps than dvc.yaml lists"
