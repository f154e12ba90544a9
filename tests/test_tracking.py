"""MLflow bookkeeping without a pipeline: where the store lives (also from inside a DVC experiment's
temporary copy), what identifies a pipeline run, the DVC md5 of an SAE folder, the registry version,
and a fresh SQLite store opened by several processes at once."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from attnsae import tracking

ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "GIT_AUTHOR_NAME": "t",
       "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
DVC_VARS = ("DVC_ROOT", "DVC_STAGE", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "MLFLOW_TRACKING_URI", "ATTNSAE_PIPELINE_RUN")


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, env=ENV, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture()
def clean_env(monkeypatch):
    for name in DVC_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_paths_inside_an_experiment_copy_map_to_the_main_repository(tmp_path):
    main = tmp_path / "repo"
    assert tracking.main_repository(main / ".dvc/tmp/exps/tmpab12cd") == main
    assert tracking.main_repository(main / ".dvc/tmp/exps/standalone/tmpx/models") == main
    assert tracking.main_repository(main / "models/sae") == main / "models/sae"
    assert tracking.main_repository(main / ".dvc/tmp/other") == main / ".dvc/tmp/other"


def test_store_is_in_the_main_repository_and_params_come_from_the_copy(tmp_path, clean_env):
    main = tmp_path / "repo"
    copy = main / ".dvc/tmp/exps/tmpab12cd"
    copy.mkdir(parents=True)
    git(copy, "init", "-q")
    clean_env.chdir(copy)
    # Older DVC versions point DVC_ROOT at the copy; DVC 3 points it at the main repository. Both end there.
    for dvc_root in (copy, main):
        clean_env.setenv("DVC_ROOT", str(dvc_root))
        assert tracking.store_root() == main.resolve()
        assert tracking.project_root() == copy.resolve()
        assert tracking.tracking_uri() == f"sqlite:///{main.resolve() / 'mlflow.db'}"
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri() == "http://127.0.0.1:5000"


def test_pipeline_key_changes_with_params_and_experiment(tmp_path, clean_env):
    (tmp_path / "params.yaml").write_text("sae: {l1_coeff: 1.0}\n")
    base = tracking.pipeline_key(tmp_path, "abc")
    assert tracking.pipeline_key(tmp_path, "abc") == base
    assert tracking.pipeline_key(tmp_path, "abc", "exp-one") not in (base, tracking.pipeline_key(tmp_path, "abc", "exp-two"))
    assert tracking.pipeline_key(tmp_path, "abd") != base
    (tmp_path / "params.yaml").write_text("sae: {l1_coeff: 2.0}\n")
    assert tracking.pipeline_key(tmp_path, "abc") != base


def test_dirty_ignores_what_dvc_writes(tmp_path, clean_env):
    git(tmp_path, "init", "-q")
    subprocess.run(["dvc", "init", "-q"], cwd=tmp_path, env=ENV, check=True)
    (tmp_path / "dvc.yaml").write_text("stages:\n  s:\n    cmd: echo\n    outs:\n      - reports/out.md:\n          cache: false\n")
    (tmp_path / "reports").mkdir()
    for name in ("params.yaml", "reports/out.md"):
        (tmp_path / name).write_text("a: 1\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "x")
    clean_env.chdir(tmp_path)
    assert tracking.git_state(tmp_path)["dirty"] == "false"
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n  s:\n    cmd: echo\n")
    (tmp_path / "reports/out.md").write_text("a: 2\n")
    assert tracking.git_state(tmp_path)["dirty"] == "false"
    (tmp_path / "params.yaml").write_text("a: 2\n")
    state = tracking.git_state(tmp_path)
    assert (state["dirty"], state["dirty_files"], state["commit"]) == ("true", "params.yaml", git(tmp_path, "rev-parse", "HEAD"))


def test_flat_params_and_names():
    params = {"profile": "tiny", "layers": [1, 2], "per_layer": {"L1": {}, "L2": {"l1_coeff": 0.05}}}
    assert tracking.flat_params(params) == {
        "profile": "tiny", "layers": "[1, 2]", "per_layer.L1": "{}", "per_layer.L2.l1_coeff": "0.05",
    }
    assert tracking.registered_model_name("smollm2-135m", 3) == "attnsae-smollm2-135m-L3"
    assert tracking.registered_model_name("org/model name", 0) == "attnsae-org-model-name-L0"


def test_layer_table_has_one_row_per_layer_and_numeric_columns():
    table = tracking.layer_table_csv([
        {"layer": 1, "model": "m", "l0": 3.5, "loss_recovered": 0.9, "flag": True},
        {"layer": 2, "model": "m", "l0": 7.0, "loss_recovered": 0.8, "mse": 1.0},
    ])
    rows = list(csv.DictReader(io.StringIO(table)))
    assert list(rows[0]) == ["layer", "l0", "loss_recovered", "mse"]
    assert [(r["layer"], float(r["l0"]), r["mse"]) for r in rows] == [("1", 3.5, ""), ("2", 7.0, "1.0")]


def test_dvc_md5_is_what_dvc_records(tmp_path):
    git(tmp_path, "init", "-q")
    subprocess.run(["dvc", "init", "-q"], cwd=tmp_path, env=ENV, check=True)
    folder = tmp_path / "sae"
    (folder / "sub").mkdir(parents=True)
    (folder / "cfg.json").write_text('{"d_in": 4}\n')
    (folder / "sub" / "w.bin").write_bytes(bytes(range(256)) * 10)
    expected = tracking.dvc_md5(folder)
    subprocess.run(["dvc", "add", "-q", "sae"], cwd=tmp_path, env=ENV, check=True)
    recorded = yaml.safe_load((tmp_path / "sae.dvc").read_text())["outs"][0]["md5"]
    assert expected == recorded and expected.endswith(".dir")


def test_layer_run_in_an_experiment_copy_logs_to_the_main_store_and_registers(tmp_path, clean_env):
    main = tmp_path / "repo"
    main.mkdir()
    sae = main / "models/sae/L2"
    sae.mkdir(parents=True)
    (sae / "cfg.json").write_text('{"d_in": 4}\n')
    git(main, "init", "-q")
    (main / "params.yaml").write_text("profile: tiny\nper_layer: {L2: {l1_coeff: 0.05}}\n")
    git(main, "add", "params.yaml")
    git(main, "commit", "-qm", "base")
    copy = main / ".dvc/tmp/exps/tmp123"
    git(main, "clone", "-q", str(main), str(copy))
    (copy / "models/sae/L2").mkdir(parents=True)
    (copy / "models/sae/L2/cfg.json").write_text('{"d_in": 4}\n')
    clean_env.chdir(copy)
    clean_env.setenv("DVC_ROOT", str(copy))  # the worst case: the store must still land in the main repository
    clean_env.setenv("DVC_STAGE", "train@2")
    params = {"profile": "tiny", "per_layer": {"L2": {"l1_coeff": 0.05}}}
    for name in ("exp-one", "exp-two"):
        clean_env.setenv("DVC_EXP_NAME", name)
        clean_env.setenv("DVC_EXP_BASELINE_REV", git(main, "rev-parse", "HEAD"))
        with tracking.layer_run(2, "train", "tiny", params=params) as run:
            run.log_curves([{"step": 0, "loss": 2.0}, {"step": 10, "loss": 1.0}])
            version = run.register_sae("models/sae/L2", "tiny-gpt2", 2)
    assert not (copy / "mlflow.db").exists()
    client, experiment_id = tracking.open_store(f"sqlite:///{main.resolve() / 'mlflow.db'}")
    runs = client.search_runs([experiment_id])
    parents = {r.data.tags["attnsae.dvc_exp_name"]: r for r in runs if r.data.tags[tracking.LAYER_TAG] == "none"}
    assert sorted(parents) == ["exp-one", "exp-two"]
    assert parents["exp-one"].data.params["per_layer.L2.l1_coeff"] == "0.05"
    children = [r for r in runs if r.data.tags[tracking.LAYER_TAG] == "2"]
    assert len(children) == 2
    md5 = tracking.dvc_md5(copy / "models/sae/L2")
    for child in children:
        tags = child.data.tags
        assert tags["mlflow.parentRunId"] == parents[tags["attnsae.dvc_exp_name"]].info.run_id
        assert (tags["attnsae.dvc_stage.train"], tags[tracking.DVC_MD5_TAG], tags[tracking.SAE_PATH_TAG]) == (
            "train@2", md5, "models/sae/L2")
        assert tags["attnsae.git_commit"] == git(main, "rev-parse", "HEAD")
        assert len(client.get_metric_history(child.info.run_id, "train/loss")) == 2
    versions = client.search_model_versions("name='attnsae-tiny-gpt2-L2'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert {v.run_id for v in versions} == {c.info.run_id for c in children}
    assert version.source == f"runs:/{version.run_id}/sae" and version.tags[tracking.DVC_MD5_TAG] == md5


def test_fresh_sqlite_store_opened_by_several_processes_at_once(tmp_path):
    """Without the lock, processes creating a fresh store together fail in MLflow's migrations (design.md 6)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = f"from attnsae.tracking import open_store; print(open_store({uri!r})[1])"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert all(rc == 0 for rc, _, _ in results), [err[-2000:] for _, _, err in results]
    assert {out.strip() for _, out, _ in results} == {"1"}  # one experiment, created once
