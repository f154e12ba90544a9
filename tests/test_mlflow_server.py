"""A team MLflow server: a real `mlflow server` with SQLite behind it, on loopback, and six real `attnsae train`
processes of the tiny profile (one per layer, as a team would train its layers on several machines) logging to it
at the same moment. Afterwards every run, metric point, registry version and artifact is counted through the
server's REST API: none may be lost, and the six processes must agree on one parent run.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file

from attnsae.cli import main
from helpers import read_tiny_params, run

pytestmark = pytest.mark.integration

LAYERS = list(range(6))  # six writers at once: each one more costs CI a process start-up and a training run
D_IN, ROWS = 64, 8192  # the tiny profile's hook_z width (heads x d_head); rows of the synthetic cache


def mlflow_init(uri: str) -> None:
    """`attnsae mlflow-init URI`, in this process (spares a Python start-up)."""
    result = CliRunner(env={"MLFLOW_DISABLE_TELEMETRY": "true"}).invoke(main, ["mlflow-init", uri])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"mlflow-init: {uri}: "), result.output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"mlflow server exited:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"mlflow server not up after {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(url, env): the server, started on a SQLite store initialised once beforehand, stopped afterwards."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    # Without this MLflow 3 also starts a job runner and seven task consumers (~2 GB) we do not use.
    server_env = {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    backend = f"sqlite:///{folder / 'mlflow.db'}"
    mlflow_init(backend)
    url = f"http://127.0.0.1:{free_port()}"
    log = folder / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            ["mlflow", "server", "--backend-store-uri", backend, "--artifacts-destination", str(folder / "artifacts"),
             "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1], "--workers", "1"],
            cwd=folder, env=server_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        wait_until_up(url, proc, log)
        env["MLFLOW_TRACKING_URI"] = url
        mlflow_init(url)  # the attnsae experiment, created on the server once
        yield url, env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the processes it started (its own session)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, server):
    """A git repository with the tiny profile's params for six layers and a synthetic activation cache
    per layer (the format the activations stage writes), so training needs no model."""
    _, env = server
    root = tmp_path_factory.mktemp("team")
    params = read_tiny_params()
    params["layers"] = LAYERS
    params["per_layer"] = {f"L{n}": {} for n in LAYERS}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    gen = torch.Generator().manual_seed(0)
    for n in LAYERS:
        folder = root / f"data/activations/L{n}"
        folder.mkdir(parents=True)
        rows = torch.randn(ROWS, D_IN, generator=gen) * (torch.rand(ROWS, D_IN, generator=gen) < 0.3)
        save_file({"z": rows.to(torch.bfloat16)}, str(folder / "shard_00000.safetensors"))
        meta = {"layer": n, "hook_name": f"blocks.{n}.attn.hook_z", "d_in": D_IN, "rows": ROWS, "context_size": 64,
                "dtype": "bfloat16", "model": "synthetic hook_z", "model_source": "tiny-gpt2", "dataset": "synthetic"}
        (folder / "meta.json").write_text(json.dumps(meta))
    git_env = {**env, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
               "GIT_COMMITTER_EMAIL": "t@t"}
    (root / ".gitignore").write_text("/data/\n/models/\n/reports/\n")
    run(["git", "init", "-q"], root, git_env)
    run(["git", "add", "-A"], root, git_env)
    run(["git", "commit", "-q", "-m", "team"], root, git_env)
    return root


@pytest.fixture(scope="module")
def trained(server, workspace):
    """Six `attnsae train` processes started together, all logging to the server."""
    _, env = server
    env = {**env, "OMP_NUM_THREADS": "1"}  # six processes share the cores
    procs = {n: subprocess.Popen(["attnsae", "train", "--layer", str(n)], cwd=workspace, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for n in LAYERS}
    outputs = {n: p.communicate(timeout=600)[0] for n, p in procs.items()}
    failed = {n: out[-2000:] for n, out in outputs.items() if procs[n].returncode != 0}
    assert not failed, failed
    return workspace


def curves(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_every_run_is_on_the_server_under_one_parent(server, trained):
    from mlflow.tracking import MlflowClient

    url, _ = server
    client = MlflowClient(url)
    experiment_id = client.get_experiment_by_name("attnsae").experiment_id
    runs = client.search_runs([experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags["attnsae.layer"] == "none"]
    children = {int(r.data.tags["attnsae.layer"]): r for r in runs if r.data.tags["attnsae.layer"] != "none"}
    assert len(parents) == 1 and len(runs) == 1 + len(LAYERS)
    assert sorted(children) == LAYERS
    for child in children.values():
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    # The same count straight from the REST API.
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/runs/search", method="POST",
                                     data=json.dumps({"experiment_ids": [experiment_id], "max_results": 1000}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert len(json.loads(response.read())["runs"]) == 1 + len(LAYERS)


def test_every_metric_point_artifact_and_registry_version_arrived(server, trained):
    from mlflow.tracking import MlflowClient

    from attnsae.reporting.repository import dvc_md5

    url, _ = server
    client = MlflowClient(url)
    runs = client.search_runs([client.get_experiment_by_name("attnsae").experiment_id], max_results=1000)
    points = 0
    for n in LAYERS:
        child = next(r for r in runs if r.data.tags["attnsae.layer"] == str(n))
        rows = curves(trained / f"reports/curves/L{n}.csv")
        assert len(rows) >= 10
        for key in rows[0]:
            if key == "step":
                continue
            history = sorted(client.get_metric_history(child.info.run_id, f"train/{key}"), key=lambda m: m.step)
            expected = [(int(r["step"]), float(r[key])) for r in rows if r[key] != ""]
            assert [m.step for m in history] == [s for s, _ in expected], (n, key)
            assert [m.value for m in history] == pytest.approx([v for _, v in expected]), (n, key)
            points += len(history)
        assert child.data.params["layer"] == str(n)
        assert [a.path for a in client.list_artifacts(child.info.run_id, "sae")] == ["sae/cfg.json"]
        (version,) = client.search_model_versions(f"name='attnsae-tiny-gpt2-L{n}'")
        assert version.run_id == child.info.run_id
        assert version.tags["attnsae.dvc_md5"] == dvc_md5(trained / f"models/sae/L{n}") \
            == child.data.tags["attnsae.dvc_md5"]
    assert points >= len(LAYERS) * 10 * 8
