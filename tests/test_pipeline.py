"""End to end: a real `dvc repro` of the tiny profile in a fresh git repository.

Checks the metrics files, the MLflow runs (one parent, a child per layer with curves and final
metrics; tags linking them to git and dvc.lock; a registry version per SAE), that each SAE folder
loads back, that a second repro does nothing, and that changing one layer's L1 coefficient re-runs
only that layer's stages.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from attnsae.sae.autoencoder import load_sae
from helpers import run, stages_run, status_after_changing

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pipeline(tiny_pipeline):
    """The session's one run of the tiny pipeline (tests/conftest.py), shared with tests/test_verify.py."""
    return tiny_pipeline


def test_first_repro_runs_every_stage(pipeline):
    root, _, first = pipeline
    assert stages_run(first) == {
        "params", "model", "corpus", "tokenize", "activations", "train@1", "train@2", "evaluate",
        "dashboards@1", "dashboards@2", "report", "publish@1", "publish@2",
    }
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert {"model", "train@1", "evaluate", "report"} <= set(lock["stages"])


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


def stage_runs(runs, stage: str) -> dict[str, object]:
    """The layers' runs of one stage (train or evaluate), by layer."""
    found = [r for r in runs
             if r.data.tags.get("attnsae.stage") == stage and r.data.tags.get("attnsae.layer") != "none"]
    assert len({r.data.tags["attnsae.layer"] for r in found}) == len(found), f"two {stage} runs of one layer"
    return {r.data.tags["attnsae.layer"]: r for r in found}


def test_mlflow_has_a_parent_and_a_run_per_stage_and_layer(pipeline):
    from mlflow.tracking import MlflowClient

    root, _, _ = pipeline
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("attnsae").experiment_id])
    parents = [r for r in runs if r.data.tags.get("attnsae.layer") == "none"]
    trains, evaluations = stage_runs(runs, "train"), stage_runs(runs, "evaluate")
    assert len(parents) == 1 and sorted(trains) == sorted(evaluations) == ["1", "2"]
    for child in [*trains.values(), *evaluations.values()]:
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert child.info.status == "FINISHED"
    for layer, train in trains.items():
        history = client.get_metric_history(train.info.run_id, "train/loss")
        curve_rows = (root / f"reports/curves/L{layer}.csv").read_text().strip().splitlines()[1:]
        assert len(history) == len(curve_rows) >= 5 and history[-1].step > history[0].step  # each point once
        assert train.data.params["l1_coeff"] in ("0.01", "0.02")
        assert {"loss_recovered", "l0"} <= set(evaluations[layer].data.metrics)


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
        assert (tags["attnsae.git_commit"], tags["attnsae.git_dirty"], tags["attnsae.profile"]) == (
            commit, "false", "tiny")
    assert parent.data.tags["attnsae.dvc_stage.report"] == "report"
    assert parent.data.params["per_layer.L2.l1_coeff"] == "0.02"  # params.yaml, flattened, to compare runs by
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"layers.csv", "report.md", "params.yaml"}
    trains, evaluations = stage_runs(runs, "train"), stage_runs(runs, "evaluate")
    for layer in (1, 2):
        train, evaluation = trains[str(layer)], evaluations[str(layer)]
        assert train.data.tags["attnsae.dvc_stage.train"] == f"train@{layer}"
        assert evaluation.data.tags["attnsae.dvc_stage.evaluate"] == "evaluate"
        recorded = next(o["md5"] for o in lock[f"train@{layer}"]["outs"] if o["path"] == f"models/sae/L{layer}")
        assert train.data.tags["attnsae.dvc_md5"] == recorded == evaluation.data.tags["attnsae.evaluated_sae_dvc_md5"]
        assert train.data.tags["attnsae.sae_path"] == f"models/sae/L{layer}"
        metrics = json.loads((root / f"reports/metrics/L{layer}.json").read_text())
        assert parent.data.metrics[f"L{layer}/loss_recovered"] == evaluation.data.metrics["loss_recovered"] \
            == metrics["loss_recovered"]
        (version,) = client.search_model_versions(f"name='attnsae-tiny-gpt2-L{layer}'")
        assert (version.run_id, version.source) == (train.info.run_id, f"runs:/{train.info.run_id}/sae")
        assert (version.tags["attnsae.dvc_md5"], version.tags["attnsae.sae_path"]) == (recorded, f"models/sae/L{layer}")
        # weights stay in DVC
        assert [a.path for a in client.list_artifacts(train.info.run_id, "sae")] == ["sae/cfg.json"]


def test_second_repro_does_nothing_and_one_layer_change_retrains_only_it(pipeline):
    root, env, _ = pipeline
    second = run(["dvc", "repro"], root, env)
    assert stages_run(second) == set()
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["per_layer"]["L2"] = {"l1_coeff": 0.05}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = run(["dvc", "repro"], root, env)
    assert stages_run(third) == {"params", "train@2", "evaluate", "dashboards@2", "report", "publish@2"}


@pytest.mark.parametrize("changed, stages", [
    ("sae/training.py", {"train@1", "train@2"}),
    # dashboards loads the SAE checked against the model with it; report and publish read evaluate's files
    # through formats/metrics.py, so they are not stale
    ("evaluation/evaluate.py", {"evaluate", "dashboards@1", "dashboards@2"}),
    # the SAE's maths and weights; the report reads each SAE's cfg.json through formats/sae_cfg.py
    ("sae/autoencoder.py",
     {"train@1", "train@2", "evaluate", "dashboards@1", "dashboards@2", "publish@1", "publish@2"}),
    ("features/families.py", {"dashboards@1", "dashboards@2"}),  # the tag maths: report reads features.json only
    ("features/pages.py", {"dashboards@1", "dashboards@2"}),  # the page renderer
    ("features/assets/page.js", {"dashboards@1", "dashboards@2"}),  # the page's script, shipped as package data
    ("formats/features.py", {"dashboards@1", "dashboards@2", "report"}),  # its writer and its reader
    ("launcher.py", set()),  # starts torchrun workers for `train --stream`: no stage of this pipeline runs it
])
def test_a_changed_byte_of_code_makes_exactly_its_stages_stale(pipeline, changed, stages):
    """dvc.lock vouches for the code: a stage whose code changed is stale, every other stage is not. (What
    follows a stale stage reruns only if its output then changes: DVC compares the outputs' hashes.)"""
    root, env, _ = pipeline
    path = root / "src" / "attnsae" / changed
    dep = f"src/attnsae/{changed}" if path.suffix == ".py" else f"src/attnsae/{Path(changed).parent}"  # a data folder
    status = status_after_changing(path, root, env)
    assert set(status) == stages
    assert all({"changed deps": {dep: "modified"}} in status[stage] for stage in stages)
    assert json.loads(run(["dvc", "status", "--json"], root, env)) == {}


def _with_layer(params: dict, layer: int) -> None:
    params["layers"].append(layer)
    params["per_layer"][f"L{layer}"] = {}


def _set(section: str, key: str, value):
    return lambda params: params[section].__setitem__(key, value)


def _results(root: Path) -> dict[Path, bytes]:
    """Every file of models/, data/ and reports/ but the params check's own (DVC deletes it before the check runs)."""
    files = [p for folder in ("models", "data", "reports") for p in (root / folder).rglob("*")
             if p.is_file() and p.name != "params-check.txt"]
    return {p: p.read_bytes() for p in sorted(files)}


# (change, the stage `dvc repro` is asked for, what the one line says): probes of issue 21, each of which had DVC
# delete that stage's outputs before the stage itself failed; one per kind of check (a value's own range, the
# model's bounds from its config.json, the machine's memory). The other rules are unit-tested (test_params_ranges.py,
# test_preflight.py): the check-params stage runs them all, so what this shows for one holds for each.
BAD_PARAMS = [
    (_set("sae", "lr", -0.001), None,
     "params.yaml: bad value for 'sae.lr': must be a finite number > 0 and <= 1 (got -0.001)"),
    (lambda params: _with_layer(params, 99), "activations",
     "params.yaml: bad value for 'layers': layer 99 is not in tiny-gpt2 (allowed: 0 to 3)"),
    (_set("sae", "buffer_rows", 2**31), "train@1",  # 2**31 rows of 64 bf16 values: 256 GiB
     "params.yaml: stage train@1 needs at least 256.0 GiB of machine memory"),
]


@pytest.mark.parametrize(("change", "target", "expected"), BAD_PARAMS,
                         ids=lambda v: str(v)[:40] if isinstance(v, str) else None)
def test_a_bad_param_stops_the_pipeline_before_any_result_is_deleted(pipeline, change, target, expected):
    """DVC deletes a stage's outputs before running it: the params stage must refuse the value first."""
    root, env, _ = pipeline
    if "machine memory" in expected and os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >= 256 * 2**30:
        pytest.skip("this machine has the memory the probe asks for")
    before = _results(root)
    original = (root / "params.yaml").read_text()
    params = yaml.safe_load(original)
    change(params)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        failed = subprocess.run(["dvc", "repro", *([target] if target else [])], cwd=root, env=env,
                                capture_output=True, text=True)
    finally:
        (root / "params.yaml").write_text(original)
    assert failed.returncode != 0
    errors = [line for line in (failed.stderr + failed.stdout).splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and expected in errors[0], failed.stderr + failed.stdout
    assert stages_run(failed.stdout) == {"params"}
    assert _results(root) == before  # every result is still there, unchanged
    assert stages_run(run(["dvc", "repro"], root, env)) == {"params"}  # the check passes again; nothing else reruns
