"""The frontier for real, on a copy of the session's tiny pipeline: `attnsae frontier queue` queues a DVC
experiment per point, `dvc exp run --run-all` runs them up to evaluate, `attnsae frontier collect` writes
reports/frontier.csv from `dvc exp show`, and every architecture trained what its point asked for."""

from __future__ import annotations

import shutil

import pytest
import yaml

from attnsae.reporting import frontier
from helpers import run

pytestmark = pytest.mark.integration

POINTS = {"standard": {"values": [0.05], "settings": {}},
          "topk": {"values": [4], "settings": {"lr": 3e-3, "beta2": 0.999, "auxk_dead_tokens": 8192}}}


@pytest.fixture(scope="module")
def frontier_run(tiny_pipeline, tmp_path_factory):
    source, env, _ = tiny_pipeline
    root = tmp_path_factory.mktemp("frontier") / "repo"
    shutil.copytree(source, root, symlinks=True)  # experiments commit; the session's repository stays as it is
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["frontier"] = POINTS
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with open(root / ".gitignore", "a") as f:
        f.write("/mlflow.db\n/mlruns/\n")
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-q", "-m", "baseline with a frontier section"], root, env)
    queued = run(["attnsae", "frontier", "queue"], root, env)
    run(["dvc", "exp", "run", "--run-all"], root, env)
    collected = run(["attnsae", "frontier", "collect"], root, env)
    return root, queued, collected


def test_every_point_ran_and_was_collected(frontier_run):
    root, queued, collected = frontier_run
    assert "queued 2 experiments (frontier-standard-0.05, frontier-topk-4)" in queued
    assert "2 experiments, 4 layer points -> reports/frontier.csv" in collected
    rows = frontier.read_frontier(root / "reports" / "frontier.csv")
    assert [(r["architecture"], r["value"], r["layer"]) for r in rows] == [
        ("standard", 0.05, 1), ("standard", 0.05, 2), ("topk", 4, 1), ("topk", 4, 2)]
    for row in rows:
        assert 0 < row["l0"] and row["loss_recovered"] is not None and 0 <= row["dead_fraction"] <= 1
        if row["architecture"] == "topk":
            assert row["l0"] <= 4  # at most k per token


def test_the_points_left_the_workspace_alone(frontier_run):
    root, _, _ = frontier_run
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert params["sae"].get("architecture", "standard") == "standard" and "k" not in params["sae"]
