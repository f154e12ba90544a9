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

SRC = REPO / "src"
# attnsae subcommand -> the modules whose functions it calls (the stage module; for check-params the checks and files).
COMMAND_MODULES = {
    "check-params": ("attnsae.preflight", "attnsae.files"),
    "model": ("attnsae.data.models",),
    "corpus": ("attnsae.data.corpus",),
    "tokenize": ("attnsae.data.tokenization",),
    "activations": ("attnsae.data.activations",),
    "train": ("attnsae.sae.training",),
    "evaluate": ("attnsae.evaluation.evaluate",),
    "dashboards": ("attnsae.features.dashboards",),
    "report": ("attnsae.reporting.report",),
    "publish": ("attnsae.reporting.publish",),
    "import": ("attnsae.evaluation.paper_saes",),
    "import --set gemma-scope-2b-att": ("attnsae.evaluation.gemma_scope",),
    "export": ("attnsae.reporting.neuronpedia",),
}
# `train --stream` places its workers with the launcher (which layers and which slice of each batch a process
# trains), so the stream pipeline's train stage runs it too; the cache pipeline's never does.
STREAM_COMMAND_MODULES = {**COMMAND_MODULES, "train": ("attnsae.sae.training", "attnsae.launcher")}
# The pipeline files, the published SAEs' stages `attnsae profile` appends to the stream pipeline for their model, and
# the stages it appends for one profile (pipelines/extra/<profile>.yaml).
PIPELINES = [*sorted((REPO / "pipelines").glob("*.yaml")), *sorted((REPO / "pipelines" / "published").glob("*.yaml")),
             *sorted((REPO / "pipelines" / "extra").glob("*.yaml"))]
# Files a module reads at run time besides its imports (package data): a stage that runs the module depends on them.
MODULE_DATA = {"attnsae.features.pages": "src/attnsae/features/assets",
               "attnsae.data.model_sources": "src/attnsae/data/known_configs"}


def module_file(module: str) -> Path | None:
    """The source file of a module of the package (None for a package or a name that is no module)."""
    path = SRC / (module.replace(".", "/") + ".py")
    return path if path.is_file() else None


def imported_modules(module: str) -> set[str]:
    """The attnsae modules that ``module`` imports anywhere in its body (imports inside functions count)."""
    tree = ast.parse(module_file(module).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "attnsae":
            for alias in node.names:  # `from attnsae.features import families` names a module
                found.add(f"{node.module}.{alias.name}" if module_file(f"{node.module}.{alias.name}") else node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "attnsae"}
    return {m for m in found if module_file(m)}


def code_of(modules: tuple[str, ...]) -> set[str]:
    """The modules and everything they import, transitively, as repository paths. Package __init__ files are
    not listed: they hold a docstring only (test_package_inits_hold_only_a_docstring), so no stage runs them."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += imported_modules(module)
    return ({module_file(m).relative_to(REPO).as_posix() for m in seen}
            | {MODULE_DATA[m] for m in seen & MODULE_DATA.keys()})


def command_modules(pipeline: Path) -> dict[str, tuple[str, ...]]:
    return COMMAND_MODULES if pipeline.stem == "cache" else STREAM_COMMAND_MODULES


def stage_command(cmd: str) -> str:
    words = cmd.split()
    assert words[0] == "attnsae", cmd
    if words[1] == "import" and "--set" in words:
        return f"import --set {words[words.index('--set') + 1]}"
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
        expected = code_of(command_modules(pipeline)[stage_command(definition["cmd"])])
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
    """The md5 dvc.lock records: of the file, or DVC's of a folder (package data)."""
    if path.is_dir():
        from attnsae.reporting.repository import dvc_md5

        return dvc_md5(path)
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
            if dep["path"].startswith("src/") and (not path.exists() or md5(path) != dep["md5"]):
                stale.append(f"{stage_name}: {dep['path']}")
    assert not stale, f"dvc.lock records other code than the files hold (run `dvc repro`): {stale}"
    for name, stage in pipeline.items():
        names = [k for k in lock if k == name or k.startswith(f"{name}@")]
        assert names, f"dvc.lock has no entry for stage {name}: run `dvc repro`"
        for key in names:
            listed = {d for d in body(stage).get("deps", []) if str(d).startswith("src/")}
            recorded = {d["path"] for d in lock[key].get("deps", []) if d["path"].startswith("src/")}
            assert recorded == listed, f"dvc.lock's {key} was recorded with other code deps than dvc.yaml lists"


def test_package_inits_hold_only_a_docstring():
    """Importing a subpackage runs its __init__.py, which no stage lists: so it must run nothing."""
    for init in (SRC / "attnsae").rglob("__init__.py"):
        body = ast.parse(init.read_text()).body
        assert len(body) <= 1 and all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body), (
            f"{init.relative_to(REPO)} runs code: move it into a module that the stages that need it import"
        )


def test_every_package_data_folder_is_some_modules_data():
    """A data folder that no module claims would change a stage's output without making it stale."""
    folders = {p.parent.relative_to(REPO).as_posix() for p in (SRC / "attnsae").rglob("*")
               if p.is_file() and p.suffix not in (".py", ".pyc")}
    assert folders <= set(MODULE_DATA.values()), \
        f"package data no module claims: {sorted(folders - set(MODULE_DATA.values()))}"


def test_the_architecture_page_lists_each_stages_code_as_it_is():
    """docs/architecture.md's 'after' column is the cache pipeline's code deps now, module for module."""
    page = (REPO / "docs" / "architecture.md").read_text().split("## Stage code deps, before and after", 1)[1]
    listed = {}
    for row in page.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] not in ("stage", "---"):
            listed[cells[0].removesuffix("@L")] = {f"src/attnsae/{m}" for m in cells[5].split(", ")}
    pipeline = stages(REPO / "pipelines" / "cache.yaml")
    assert listed.keys() == pipeline.keys()
    for name, stage in pipeline.items():
        assert listed[name] == {d for d in body(stage)["deps"] if str(d).startswith("src/")}, name
