"""MLflow bookkeeping: one parent run per pipeline run, one child run per layer.

DVC owns data and weights; MLflow owns runs, params, curves, final metrics and small artifacts.
The store is SQLite at ``<repo root>/mlflow.db`` unless ``MLFLOW_TRACKING_URI`` says otherwise; the
repo root is ``DVC_ROOT`` when DVC runs the stage, else the git top level, else the working folder.

A pipeline run is identified by the git commit plus the content of params.yaml and dvc.yaml: every
stage of one ``dvc repro`` finds the same parent, and the train and evaluate stages of a layer log to
the same child run.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

PIPELINE_KEY_TAG = "attnsae.pipeline_key"
LAYER_TAG = "attnsae.layer"
EXPERIMENT = "attnsae"


def project_root() -> Path:
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True)
        return Path(top.stdout.strip())
    except (subprocess.CalledProcessError, FileNotFoundError):
        return Path.cwd().resolve()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def git_state(root: Path) -> dict[str, str]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        except (subprocess.CalledProcessError, FileNotFoundError):
            return ""

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD") or "none", "dirty": "true" if dirty else "false"}


def pipeline_key(root: Path, commit: str) -> str:
    override = os.environ.get("ATTNSAE_PIPELINE_RUN")
    if override:
        return override
    digest = hashlib.sha256(commit.encode())
    for name in ("params.yaml", "dvc.yaml"):
        path = root / name
        digest.update(path.read_bytes() if path.is_file() else b"")
    return digest.hexdigest()[:16]


class LayerRun:
    """The child run of one layer inside the current pipeline's parent run."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        fresh = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(fresh), 100):
            self.client.log_batch(self.run_id, params=fresh[i : i + 100])

    def log_curves(self, rows: list[dict[str, float]], prefix: str = "train/") -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(f"{prefix}{k}", float(v), now, int(row["step"]))
            for row in rows
            for k, v in row.items()
            if k != "step" and v is not None
        ]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = [Metric(k, float(v), now, 0) for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None]
        self.client.log_batch(self.run_id, metrics=values)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)


def _find_run(client, experiment_id: str, filter_string: str):
    runs = client.search_runs([experiment_id], filter_string=filter_string, max_results=1, order_by=["attributes.start_time ASC"])
    return runs[0] if runs else None


@contextlib.contextmanager
def layer_run(layer: int, stage: str, profile: str) -> Iterator[LayerRun]:
    """Open (or reopen) the child run of ``layer``; it is marked finished, or failed if the stage raises."""
    import mlflow
    from mlflow.tracking import MlflowClient

    root = project_root()
    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(EXPERIMENT)
    git = git_state(root)
    key = pipeline_key(root, git["commit"])
    tags = {
        "attnsae.profile": profile,
        "attnsae.git_commit": git["commit"],
        "attnsae.git_dirty": git["dirty"],
        "mlflow.source.git.commit": git["commit"],
    }

    parent = _find_run(client, experiment_id, f"tags.`{PIPELINE_KEY_TAG}` = '{key}' and tags.`{LAYER_TAG}` = 'none'")
    if parent is None:
        parent = client.create_run(
            experiment_id,
            run_name=f"{profile} {git['commit'][:8]} {key[:6]}",
            tags={**tags, PIPELINE_KEY_TAG: key, LAYER_TAG: "none"},
        )
        params_file = root / "params.yaml"
        if params_file.is_file():
            client.log_artifact(parent.info.run_id, str(params_file))
    parent_id = parent.info.run_id
    child = _find_run(
        client,
        experiment_id,
        f"tags.`{PIPELINE_KEY_TAG}` = '{key}' and tags.`{LAYER_TAG}` = '{layer}'",
    )
    if child is None:
        child = client.create_run(
            experiment_id,
            run_name=f"L{layer}",
            tags={**tags, PIPELINE_KEY_TAG: key, LAYER_TAG: str(layer), "mlflow.parentRunId": parent_id},
        )
    run_id = child.info.run_id
    client.update_run(run_id, status="RUNNING")
    client.update_run(parent_id, status="RUNNING")
    run = LayerRun(client, run_id)
    run.set_tags({f"attnsae.stage.{stage}": "running"})
    try:
        yield run
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        client.set_terminated(parent_id, status="FAILED")
        raise
    run.set_tags({f"attnsae.stage.{stage}": "done"})
    client.set_terminated(run_id, status="FINISHED")
    client.set_terminated(parent_id, status="FINISHED")

