"""A sweep over one layer's L1 coefficient as queued DVC experiments, on a copy of the session's tiny pipeline.

`dvc exp run --queue -S per_layer.L2.l1_coeff=...` once per value, then `dvc exp run --run-all`: the queued
experiments run in temporary copies under .dvc/tmp/exps/, yet each lands in the main repository's MLflow
store as its own parent run; `dvc exp show` gives the table and `dvc plots diff` the L0 / loss-recovered
frontier of the experiments.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import yaml

from helpers import run

pytestmark = pytest.mark.integration

# Two experiments: a sweep's queue, run and comparison as with more (each one more takes about 45 s of CI).
VALUES = (0.005, 0.1)  # none equal to the baseline's L2 value, so every experiment retrains L2


@pytest.fixture(scope="module")
def sweep(tiny_pipeline, tmp_path_factory):
    source, env, _ = tiny_pipeline
    root = tmp_path_factory.mktemp("sweep") / "repo"
    shutil.copytree(source, root, symlinks=True)  # experiments commit; the session's repository stays as it is
    (root / "mlflow.db").unlink(missing_ok=True)
    shutil.rmtree(root / "mlruns", ignore_errors=True)
    with open(root / ".gitignore", "a") as f:
        f.write("/mlflow.db\n/mlruns/\n")
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-q", "-m", "baseline"], root, env)
    names = []
    for value in VALUES:
        # up to `report` (the frontier's data): publish@2 would only add a process per experiment to CI time
        out = run(["dvc", "exp", "run", "--queue", "report", "-S", f"per_layer.L2.l1_coeff={value}"], root, env)
        names.append(re.search(r"Queued experiment '([^']+)'", out).group(1))
    run(["dvc", "exp", "run", "--run-all"], root, env)
    return root, env, names


def experiments(root, env) -> dict[str, dict]:
    """name -> the experiment's data (params, metrics, outs) from `dvc exp show --json`."""
    table = json.loads(run(["dvc", "exp", "show", "--json"], root, env))
    baseline = next(entry for entry in table if entry.get("experiments"))
    return {exp["name"]: exp["revs"][0] for exp in baseline["experiments"]}


def test_exp_show_lists_every_experiment(sweep):
    root, env, names = sweep
    found = experiments(root, env)
    assert sorted(found) == sorted(names)
    for name, value in zip(names, VALUES):
        data = found[name]["data"]
        assert data["params"]["params.yaml"]["data"]["per_layer"]["L2"]["l1_coeff"] == value
        assert 0 < data["metrics"]["reports/metrics/L2.json"]["data"]["l0"] < 256


def test_each_experiment_is_a_parent_run_in_the_main_store(sweep):
    from mlflow.tracking import MlflowClient

    root, env, names = sweep
    assert not list((root / ".dvc/tmp/exps").rglob("mlflow.db"))
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("attnsae").experiment_id])
    parents = {r.data.tags.get("attnsae.dvc_exp_name"): r for r in runs if r.data.tags["attnsae.layer"] == "none"}
    assert sorted(parents) == sorted(names)
    found = experiments(root, env)
    versions = {v.run_id: v for v in client.search_model_versions("name='attnsae-tiny-gpt2-L2'")}
    for name, value in zip(names, VALUES):
        parent = parents[name]
        assert parent.data.params["per_layer.L2.l1_coeff"] == str(value)
        assert parent.data.metrics["L2/l0"] == found[name]["data"]["metrics"]["reports/metrics/L2.json"]["data"]["l0"]
        (child,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
                    and r.data.tags.get("attnsae.stage") == "train"]
        assert child.data.tags["attnsae.layer"] == "2" and child.data.params["l1_coeff"] == str(value)
        lock = yaml.safe_load(run(["git", "show", f"{found[name]['rev']}:dvc.lock"], root, env))
        recorded = next(o["md5"] for o in lock["stages"]["train@2"]["outs"] if o["path"] == "models/sae/L2")
        assert child.data.tags["attnsae.dvc_md5"] == recorded == versions[child.info.run_id].tags["attnsae.dvc_md5"]


def test_plots_draw_each_experiments_layers_l0_against_loss_recovered(sweep, tmp_path):
    root, env, names = sweep
    rendered = json.loads(run(["dvc", "plots", "diff", *names, "--targets", "layers_l0_loss_recovered", "--json"],
                              root, env))
    assert not rendered.get("errors")
    points = rendered["data"]["layers_l0_loss_recovered"][0]["content"]["data"]["values"]
    assert {p["rev"] for p in points} == set(names)
    assert all({"l0", "loss_recovered", "layer"} <= set(p) for p in points)
    run(["dvc", "plots", "diff", *names, "--targets", "layers_l0_loss_recovered", "-o", str(tmp_path / "plots")],
        root, env)
    page = (tmp_path / "plots" / "index.html").read_text()
    assert "loss recovered" in page and all(name in page for name in names)
