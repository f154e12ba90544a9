"""MLflow bookkeeping without a pipeline: where the store lives (also from inside a DVC experiment's
temporary copy), what identifies a pipeline run, the DVC md5 of an SAE folder, the registry version,
and a fresh SQLite store opened by several processes at once."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from attnsae.reporting import repository, tracking

ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "GIT_AUTHOR_NAME": "t",
       "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
DVC_VARS = ("DVC_ROOT", "DVC_STAGE", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "MLFLOW_TRACKING_URI",
            "ATTNSAE_PIPELINE_RUN")


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, env=ENV, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture()
def clean_env(monkeypatch):
    for name in DVC_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_paths_inside_an_experiment_copy_map_to_the_main_repository(tmp_path):
    main = tmp_path / "repo"
    assert repository.main_repository(main / ".dvc/tmp/exps/tmpab12cd") == main
    assert repository.main_repository(main / ".dvc/tmp/exps/standalone/tmpx/models") == main
    assert repository.main_repository(main / "models/sae") == main / "models/sae"
    assert repository.main_repository(main / ".dvc/tmp/other") == main / ".dvc/tmp/other"


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
        assert repository.project_root() == copy.resolve()
        assert tracking.tracking_uri() == f"sqlite:///{main.resolve() / 'mlflow.db'}"
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri() == "http://127.0.0.1:5000"


def test_pipeline_key_changes_with_params_and_experiment(tmp_path, clean_env):
    (tmp_path / "params.yaml").write_text("sae: {l1_coeff: 1.0}\n")
    base = tracking.pipeline_key(tmp_path, "abc")
    assert tracking.pipeline_key(tmp_path, "abc") == base
    assert tracking.pipeline_key(tmp_path, "abc", "exp-one") not in (
        base, tracking.pipeline_key(tmp_path, "abc", "exp-two"))
    assert tracking.pipeline_key(tmp_path, "abd") != base
    (tmp_path / "params.yaml").write_text("sae: {l1_coeff: 2.0}\n")
    assert tracking.pipeline_key(tmp_path, "abc") != base


def test_dirty_ignores_what_dvc_writes(tmp_path, clean_env):
    git(tmp_path, "init", "-q")
    subprocess.run(["dvc", "init", "-q"], cwd=tmp_path, env=ENV, check=True)
    (tmp_path / "dvc.yaml").write_text("stages:\n  s:\n    cmd: echo\n    outs:\n"
                                       "      - reports/out.md:\n          cache: false\n")
    (tmp_path / "reports").mkdir()
    for name in ("params.yaml", "reports/out.md"):
        (tmp_path / name).write_text("a: 1\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "x")
    clean_env.chdir(tmp_path)
    assert repository.git_state(tmp_path)["dirty"] == "false"
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n  s:\n    cmd: echo\n")
    (tmp_path / "reports/out.md").write_text("a: 2\n")
    assert repository.git_state(tmp_path)["dirty"] == "false"
    (tmp_path / "params.yaml").write_text("a: 2\n")
    state = repository.git_state(tmp_path)
    assert (state["dirty"], state["dirty_files"], state["commit"]) == (
        "true", "params.yaml", git(tmp_path, "rev-parse", "HEAD"))


def test_flat_params_and_names():
    params = {"profile": "tiny", "layers": [1, 2], "per_layer": {"L1": {}, "L2": {"l1_coeff": 0.05}}}
    assert tracking.flat_params(params) == {
        "profile": "tiny", "layers": "[1, 2]", "per_layer.L1": "{}", "per_layer.L2.l1_coeff": "0.05",
    }
    assert tracking.registered_model_name("smollm2-135m", 3) == "attnsae-smollm2-135m-L3"
    assert tracking.registered_model_name("org/model name", 0) == "attnsae-org-model-name-L0"


def test_dvc_md5_is_what_dvc_records(tmp_path):
    git(tmp_path, "init", "-q")
    subprocess.run(["dvc", "init", "-q"], cwd=tmp_path, env=ENV, check=True)
    folder = tmp_path / "sae"
    (folder / "sub").mkdir(parents=True)
    (folder / "cfg.json").write_text('{"d_in": 4}\n')
    (folder / "sub" / "w.bin").write_bytes(bytes(range(256)) * 10)
    expected = repository.dvc_md5(folder)
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
    md5 = repository.dvc_md5(copy / "models/sae/L2")
    for child in children:
        tags = child.data.tags
        assert tags["mlflow.parentRunId"] == parents[tags["attnsae.dvc_exp_name"]].info.run_id
        assert (tags["attnsae.dvc_stage.train"], tags[tracking.DVC_MD5_TAG], tags[tracking.SAE_PATH_TAG]) == (
            "train@2", md5, "models/sae/L2")
        assert tags["attnsae.git_commit"] == git(main, "rev-parse", "HEAD")
        assert len(client.get_metric_history(child.info.run_id, "train/loss")) == 2
    # Both experiments trained the same SAE (one md5): one registry version, made by the first to register it.
    (only,) = client.search_model_versions("name='attnsae-tiny-gpt2-L2'")
    first = next(c for c in children if c.data.tags["attnsae.dvc_exp_name"] == "exp-one")
    assert (int(only.version), only.run_id, int(version.version)) == (1, first.info.run_id, 1)
    assert version.source == f"runs:/{version.run_id}/sae" and version.tags[tracking.DVC_MD5_TAG] == md5


def test_fresh_sqlite_store_opened_by_several_processes_at_once(tmp_path):
    """Without the lock, processes creating a fresh store together fail in MLflow's migrations (docs/design.md 6)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = f"from attnsae.reporting.tracking import open_store; print(open_store({uri!r})[1])"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for _ in range(4)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert all(rc == 0 for rc, _, _ in results), [err[-2000:] for _, _, err in results]
    assert {out.strip() for _, out, _ in results} == {"1"}  # one experiment, created once


# ---------------------------------------------------------------- idempotent stage runs, moved repositories

PARAMS = {"profile": "tiny", "per_layer": {"L2": {"l1_coeff": 0.05}}}
CURVE = [{"step": 0, "loss": 2.0}, {"step": 10, "loss": 1.0}, {"step": 20, "loss": 0.5}]


def make_repo(root: Path) -> Path:
    """A committed repository with params.yaml and a layer-2 SAE folder (cfg.json only)."""
    (root / "models/sae/L2").mkdir(parents=True)
    (root / "models/sae/L2/cfg.json").write_text('{"d_in": 4}\n')
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    git(root, "init", "-q")
    git(root, "add", "params.yaml")
    git(root, "commit", "-qm", "base")
    return root


@pytest.fixture()
def repo(tmp_path, clean_env):
    root = make_repo(tmp_path / "repo")
    clean_env.chdir(root)
    return root


def store(root: Path):
    return tracking.open_store(f"sqlite:///{root.resolve() / 'mlflow.db'}")


def stage_runs(root: Path, stage: str, view: str = "active") -> list:
    from mlflow.entities import ViewType

    client, experiment_id = store(root)
    kind = {"active": ViewType.ACTIVE_ONLY, "deleted": ViewType.DELETED_ONLY}[view]
    return client.search_runs([experiment_id], f"tags.`{tracking.STAGE_TAG}` = '{stage}'", run_view_type=kind)


def train_once(curve=CURVE):
    with tracking.layer_run(2, "train", "tiny", params=PARAMS) as run:
        run.log_curves(curve)
        return run.run_id, run.register_sae("models/sae/L2", "tiny-gpt2", 2)


def test_rerun_of_a_finished_stage_adds_no_points_and_no_registry_version(repo):
    """A kill after training finished but before DVC recorded the stage: DVC runs it again, same SAE."""
    first_id, first = train_once()
    second_id, second = train_once()
    client, _ = store(repo)
    (record,) = stage_runs(repo, "train")
    assert record.info.run_id == first_id and record.info.status == "FINISHED"  # it holds the registry version
    assert len(client.get_metric_history(first_id, "train/loss")) == len(CURVE)
    (deleted,) = stage_runs(repo, "train", "deleted")
    assert deleted.info.run_id == second_id and deleted.data.tags[tracking.SUPERSEDED_TAG] == first_id
    (version,) = client.search_model_versions("name='attnsae-tiny-gpt2-L2'")
    assert int(version.version) == int(first.version) == int(second.version) == 1 and version.run_id == first_id


def test_retrain_to_a_new_sae_replaces_the_earlier_run_and_adds_a_version(repo):
    first_id, _ = train_once()
    (repo / "models/sae/L2/cfg.json").write_text('{"d_in": 8}\n')
    second_id, second = train_once([{"step": 0, "loss": 3.0}])
    client, _ = store(repo)
    assert [r.info.run_id for r in stage_runs(repo, "train")] == [second_id]
    assert [r.info.run_id for r in stage_runs(repo, "train", "deleted")] == [first_id]
    assert [m.value for m in client.get_metric_history(second_id, "train/loss")] == [3.0]
    assert sorted(int(v.version) for v in client.search_model_versions("name='attnsae-tiny-gpt2-L2'")) == [1, 2]
    assert second.run_id == second_id


def test_an_attempt_killed_mid_stage_is_superseded_by_the_rerun(repo):
    code = ("import os, signal\nfrom attnsae.reporting import tracking\n"
            f"with tracking.layer_run(2, 'train', 'tiny', params={PARAMS!r}) as run:\n"
            "    run.log_curves([{'step': 0, 'loss': 9.0}])\n"
            "    print(run.run_id, flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    killed = subprocess.run([sys.executable, "-c", code], cwd=repo,
                            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    killed_id = killed.stdout.strip()
    (left,) = stage_runs(repo, "train")
    assert (left.info.run_id, left.info.status) == (killed_id, "RUNNING")
    rerun_id, _ = train_once()
    assert [r.info.run_id for r in stage_runs(repo, "train")] == [rerun_id]
    client, _ = store(repo)
    assert [m.value for m in client.get_metric_history(rerun_id, "train/loss")] == [c["loss"] for c in CURVE]
    assert client.get_run(killed_id).info.lifecycle_stage == "deleted"


def test_concurrent_attempts_of_one_stage_never_share_a_run(repo):
    with contextlib.ExitStack() as first_stack:
        first = first_stack.enter_context(tracking.layer_run(2, "train", "tiny", params=PARAMS))
        time.sleep(0.01)  # start times in distinct milliseconds: the later attempt is the later one
        with tracking.layer_run(2, "train", "tiny", params=PARAMS) as second:
            assert second.run_id != first.run_id
            first.log_curves([{"step": 0, "loss": 1.0}])
            second.log_curves([{"step": 0, "loss": 2.0}])
        first.log_curves([{"step": 1, "loss": 1.5}])  # superseded meanwhile: dropped, not an error
    client, _ = store(repo)
    assert [r.info.run_id for r in stage_runs(repo, "train")] == [second.run_id]
    assert [m.value for m in client.get_metric_history(second.run_id, "train/loss")] == [2.0]
    assert [m.value for m in client.get_metric_history(first.run_id, "train/loss")] == [1.0]


def test_evaluate_logs_to_its_own_run_and_a_rerun_replaces_it(repo):
    (repo / "metrics.json").write_text('{"layer": 2, "l0": 3.5}\n')
    train_id, _ = train_once()
    ids = []
    for _ in range(2):
        with tracking.layer_run(2, "evaluate", "tiny", params=PARAMS) as run:
            run.log_evaluation({"max_rows": 100}, {"layer": 2, "l0": 3.5, "model": "m"}, repo / "metrics.json",
                               "models/sae/L2")
            ids.append(run.run_id)
    client, _ = store(repo)
    (evaluation,) = stage_runs(repo, "evaluate")
    assert evaluation.info.run_id == ids[1]
    assert evaluation.data.params == {"evaluate.max_rows": "100"} and evaluation.data.metrics == {"l0": 3.5}
    assert len(client.get_metric_history(ids[1], "l0")) == 1
    assert [a.path for a in client.list_artifacts(ids[1])] == ["metrics.json"]
    train = client.get_run(train_id).data.tags
    assert evaluation.data.tags["attnsae.evaluated_sae_dvc_md5"] == train[tracking.DVC_MD5_TAG]
    assert evaluation.data.tags["mlflow.parentRunId"] == train["mlflow.parentRunId"]


def test_evaluate_logs_the_heldout_source_with_a_prefix(repo):
    (repo / "metrics.json").write_text('{"layer": 2, "l0": 3.5}\n')
    (repo / "heldout.json").write_text('{"layer": 2, "l0": 4.5}\n')
    train_once()
    with tracking.layer_run(2, "evaluate", "tiny", params=PARAMS) as run:
        run.log_evaluation({"max_rows": 100}, {"layer": 2, "l0": 3.5, "l0_se": 0.1}, repo / "metrics.json",
                           "models/sae/L2", {"layer": 2, "l0": 4.5, "sources": ["npm:brown"]}, repo / "heldout.json")
    client, _ = store(repo)
    (evaluation,) = stage_runs(repo, "evaluate")
    assert evaluation.data.metrics == {"l0": 3.5, "l0_se": 0.1, "heldout/l0": 4.5}
    assert [a.path for a in client.list_artifacts(run.run_id, "heldout")] == ["heldout/heldout.json"]


def test_a_rerun_report_adds_no_metric_points_to_the_parent(repo):
    (repo / "report.md").write_text("# report\n")
    parent = [tracking.log_report("tiny", PARAMS, [{"layer": 2, "l0": 3.5}], [repo / "report.md"]) for _ in range(2)]
    client, _ = store(repo)
    assert parent[0] == parent[1] and len(client.get_metric_history(parent[0], "L2/l0")) == 1


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_copied_repository_logs_artifacts_into_its_own_folder(tmp_path, clean_env):
    original = make_repo(tmp_path / "original")
    clean_env.chdir(original)
    (original / "report.md").write_text("# original\n")
    train_once()
    tracking.log_report("tiny", PARAMS, [{"layer": 2, "l0": 3.5}], [original / "report.md"])
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    before = files_of(original)
    (copy / "models/sae/L2/cfg.json").write_text('{"d_in": 8}\n')
    (copy / "report.md").write_text("# copy\n")
    # A new process, as after a move (MLflow caches each run's artifact folder in the process that used it).
    code = ("from attnsae.reporting import tracking\n"
            f"with tracking.layer_run(2, 'train', 'tiny', params={PARAMS!r}) as run:\n"
            "    run.register_sae('models/sae/L2', 'tiny-gpt2', 2)\n"
            "    run.log_artifact('models/sae/L2/cfg.json', 'sae')\n"
            f"print(run.run_id, tracking.log_report('tiny', {PARAMS!r}, [{{'layer': 2, 'l0': 4.0}}], ['report.md']))\n")
    logged = subprocess.run([sys.executable, "-c", code], cwd=copy,
                            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}, capture_output=True, text=True,
                            timeout=300)
    assert logged.returncode == 0, logged.stderr[-2000:]
    run_id, parent_id = logged.stdout.split()  # the parent was made in the original, before the copy
    assert files_of(original) == before
    client, experiment_id = store(copy)
    mlruns = copy.resolve() / "mlruns"
    assert client.get_experiment(experiment_id).artifact_location == str(mlruns)
    assert all(r.info.artifact_uri.startswith(f"{mlruns}/") for r in client.search_runs([experiment_id]))
    assert (mlruns / parent_id / "artifacts/report.md").read_text() == "# copy\n"
    assert (original / "mlruns" / parent_id / "artifacts/report.md").read_text() == "# original\n"
    assert (mlruns / run_id / "artifacts/sae/cfg.json").read_text() == '{"d_in": 8}\n'
