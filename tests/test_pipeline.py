"""End to end: a real `dvc repro` of the tiny profile in a fresh git repository.

Checks the metrics files, the MLflow runs (one parent, a child per layer with curves and final
metrics), that each SAE folder loads back, that a second repro does nothing, and that changing one
layer's L1 coefficient re-runs only that layer's stages.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from attnsae.sae import load_sae

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration


def run(cmd: list[str], cwd: Path, env: dict) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def stages_run(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
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


def test_first_repro_runs_every_stage(pipeline):
    root, _, first = pipeline
    assert stages_run(first) == {
        "model", "corpus", "tokenize", "activations", "train@1", "train@2", "evaluate@1", "evaluate@2", "report"
    }
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert {"model", "train@1", "evaluate@2", "report"} <= set(lock["stages"])


def test_metrics_files_hold_every_metric(pipeline):
    root, _, _ = pipeline
    for layer in (1, 2):
        metrics = json.loads((root / f"reports/metrics/L{layer}.json").read_text())
        for key in ("l0", "loss_recovered", "dead_fraction", "dead_fraction_tokens", "mse", "explained_variance",
                    "ce_increase", "kl_score", "dense_fraction"):
            assert key in metrics, key
        assert metrics["layer"] == layer
        assert metrics["dead_fraction_tokens"] == 16 * 64  # evaluate.max_rows x context_size of the tiny profile
        assert 0 < metrics["l0"] < 256
    report = (root / "reports/report.md").read_text()
    assert report.count("\n| ") >= 3  # header + a row per layer
    assert "<table id=\"layers\">" in (root / "reports/index.html").read_text()


def test_sae_folders_load_back(pipeline):
    root, _, _ = pipeline
    for layer in (1, 2):
        sae, cfg = load_sae(root / f"models/sae/L{layer}")
        assert cfg["hook_name"] == f"blocks.{layer}.attn.hook_z"
        assert cfg["reshape_activations"] == "hook_z"
        assert (sae.d_in, sae.d_sae) == (64, 256)


def test_mlflow_has_parent_and_child_runs_with_curves(pipeline):
    import mlflow
    from mlflow.tracking import MlflowClient

    root, _, _ = pipeline
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    client = MlflowClient()
    experiment = client.get_experiment_by_name("attnsae")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("attnsae.layer") == "none"]
    children = [r for r in runs if r.data.tags.get("attnsae.layer") in ("1", "2")]
    assert len(parents) == 1
    assert sorted(r.data.tags["attnsae.layer"] for r in children) == ["1", "2"]
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert child.info.status == "FINISHED"
        assert "loss_recovered" in child.data.metrics and "l0" in child.data.metrics
        history = client.get_metric_history(child.info.run_id, "train/loss")
        assert len(history) >= 5 and history[-1].step > history[0].step
        assert child.data.params["l1_coeff"] in ("0.01", "0.02")


def test_second_repro_does_nothing_and_one_layer_change_retrains_only_it(pipeline):
    root, env, _ = pipeline
    second = run(["dvc", "repro"], root, env)
    assert stages_run(second) == set()
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["per_layer"]["L2"] = {"l1_coeff": 0.05}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = run(["dvc", "repro"], root, env)
    assert stages_run(third) == {"train@2", "evaluate@2", "report"}
