"""End to end: a real `dvc repro` of the tiny profile in a fresh git repository.

Checks the metrics files, the MLflow runs (one parent, a child per layer with curves and final
metrics; tags linking them to git and dvc.lock; a registry version per SAE), that each SAE folder
loads back, that a second repro does nothing, and that changing one layer's L1 coefficient re-runs
only that layer's stages.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import REPO, run, stages_run  # noqa: F401  (test_pipeline_stream imports them from here)

from attnsae.sae import load_sae

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pipeline(tiny_pipeline):
    """The session's one run of the tiny pipeline (tests/conftest.py), shared with tests/test_registry.py."""
    return tiny_pipeline


def test_first_repro_runs_every_stage(pipeline):
    root, _, first = pipeline
    assert stages_run(first) == {
        "model", "corpus", "tokenize", "activations", "train@1", "train@2", "evaluate@1", "evaluate@2", "report",
        "publish@1", "publish@2",
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
        published, _ = load_sae(root / f"models/published/L{layer}")
        assert torch.equal(published.W_dec, sae.W_dec)
        card = (root / f"models/published/L{layer}/README.md").read_text()
        assert card.startswith("---\n") and "library_name: saelens" in card


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


def test_mlflow_runs_carry_git_dvc_tags_and_registered_saes(pipeline):
    """Tags link each run to the commit and to dvc.lock; each SAE is a registry version pointing at its run."""
    from mlflow.tracking import MlflowClient

    root, env, _ = pipeline
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("attnsae").experiment_id])
    commit = run(["git", "rev-parse", "HEAD"], root, env).strip()
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    parent = next(r for r in runs if r.data.tags["attnsae.layer"] == "none")
    for r in runs:
        tags = r.data.tags
        assert (tags["attnsae.git_commit"], tags["attnsae.git_dirty"], tags["attnsae.profile"]) == (commit, "false", "tiny")
    assert parent.data.tags["attnsae.dvc_stage.report"] == "report"
    assert parent.data.params["per_layer.L2.l1_coeff"] == "0.02"  # params.yaml, flattened, to compare runs by
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"layers.csv", "report.md", "params.yaml"}
    for layer in (1, 2):
        child = next(r for r in runs if r.data.tags["attnsae.layer"] == str(layer))
        tags = child.data.tags
        assert (tags["attnsae.dvc_stage.train"], tags["attnsae.dvc_stage.evaluate"]) == (f"train@{layer}", f"evaluate@{layer}")
        recorded = next(o["md5"] for o in lock[f"train@{layer}"]["outs"] if o["path"] == f"models/sae/L{layer}")
        assert tags["attnsae.dvc_md5"] == recorded == tags["attnsae.evaluated_sae_dvc_md5"]
        assert tags["attnsae.sae_path"] == f"models/sae/L{layer}"
        metrics = json.loads((root / f"reports/metrics/L{layer}.json").read_text())
        assert parent.data.metrics[f"L{layer}/loss_recovered"] == child.data.metrics["loss_recovered"] == metrics["loss_recovered"]
        (version,) = client.search_model_versions(f"name='attnsae-tiny-gpt2-L{layer}'")
        assert (version.run_id, version.source) == (child.info.run_id, f"runs:/{child.info.run_id}/sae")
        assert (version.tags["attnsae.dvc_md5"], version.tags["attnsae.sae_path"]) == (recorded, f"models/sae/L{layer}")
        assert [a.path for a in client.list_artifacts(child.info.run_id, "sae")] == ["sae/cfg.json"]  # weights stay in DVC


def test_second_repro_does_nothing_and_one_layer_change_retrains_only_it(pipeline):
    root, env, _ = pipeline
    second = run(["dvc", "repro"], root, env)
    assert stages_run(second) == set()
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["per_layer"]["L2"] = {"l1_coeff": 0.05}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = run(["dvc", "repro"], root, env)
    assert stages_run(third) == {"train@2", "evaluate@2", "report", "publish@2"}
