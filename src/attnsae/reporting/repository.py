"""Git and DVC state of the repository a stage runs in: where it is, which commit, what DVC tells the stage.

Two roots matter, and inside ``dvc exp run`` they differ:
- the *project root* is the copy of the repository the stage runs in (the working folder's git top
  level): its params.yaml, dvc.yaml and git state say what ran. Queued and ``--temp`` experiments run
  in a temporary copy under ``<repo>/.dvc/tmp/exps/``.
- the *main repository*, which a path inside ``.dvc/tmp/exps/`` is mapped back to, outlives those copies.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

EXP_COPIES = (".dvc", "tmp", "exps")  # where DVC puts the temporary copies of queued/--temp experiments
WRITTEN_BY_DVC = ("dvc.lock", ".gitignore")  # DVC rewrites these as stages run: they do not make a run "dirty"


def _git(cwd: Path, *args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError, NotADirectoryError):
        return ""


def project_root() -> Path:
    """The copy of the repository this stage runs in (an experiment's temporary copy, if it is one)."""
    cwd = Path.cwd().resolve()
    top = _git(cwd, "rev-parse", "--show-toplevel")
    if top:
        return Path(top)
    return Path(os.environ["DVC_ROOT"]).resolve() if os.environ.get("DVC_ROOT") else cwd


def main_repository(path: Path) -> Path:
    """``<repo>/.dvc/tmp/exps/<copy>/...`` -> ``<repo>``; any other path is returned as it is."""
    parts = path.parts
    for i in range(len(parts) - len(EXP_COPIES) + 1):
        if parts[i : i + len(EXP_COPIES)] == EXP_COPIES:
            return Path(*parts[:i])
    return path


def dvc_outputs(root: Path) -> list[str]:
    """The outputs dvc.yaml declares, relative to ``root`` (DVC's own reading of the pipeline)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            return [Path(os.path.relpath(out.fs_path, root)).as_posix() for out in repo.index.outs]
    except DvcException:  # not a DVC repository, or a dvc.yaml DVC cannot read: nothing to leave out
        return []


def _inside(path: str, folders: list[str]) -> bool:
    return any(path == f or path.startswith(f + "/") for f in folders)


def git_state(root: Path) -> dict[str, str]:
    """HEAD, and whether tracked files differ from it. What DVC writes (dvc.lock, the stages' outputs)
    is left out: it changes while the pipeline runs, and says nothing about the code and params used."""
    changed = [p for p in _git(root, "diff", "--name-only", "HEAD").splitlines() if Path(p).name not in WRITTEN_BY_DVC]
    if changed:  # reading the pipeline costs a second, so only when there is something to sort out
        outputs = dvc_outputs(root)
        changed = [p for p in changed if not _inside(p, outputs)]
    return {
        "commit": _git(root, "rev-parse", "HEAD") or "none",
        "dirty": "true" if changed else "false",
        "dirty_files": " ".join(sorted(changed))[:500],
    }


def dvc_state(env: dict[str, str] | None = None) -> dict[str, str]:
    """What DVC tells a stage's command about itself: the stage, and the experiment it belongs to."""
    env = os.environ if env is None else env
    return {
        "stage": env.get("DVC_STAGE", ""),
        "exp_name": env.get("DVC_EXP_NAME", ""),
        "exp_baseline": env.get("DVC_EXP_BASELINE_REV", ""),
    }


def dvc_md5(path: str | Path) -> str:
    """The md5 DVC records in dvc.lock for this output (``<md5>.dir`` for a folder).

    Computed with DVC's own hashing (dvc_data), so a stage can know it before DVC writes dvc.lock,
    which happens only after the stage's command has finished.
    """
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs import MemoryFileSystem
    from dvc_objects.fs.local import LocalFileSystem

    staging = HashFileDB(MemoryFileSystem(), "/attnsae-md5", hash_name="md5")  # nothing is written to the cache
    _, _, obj = build(staging, os.path.abspath(path), LocalFileSystem(), "md5", dry_run=True)
    return obj.hash_info.value
