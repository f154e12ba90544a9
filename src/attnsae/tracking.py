"""MLflow bookkeeping: one parent run per pipeline run, one child run per layer.

DVC owns data and weights; MLflow owns runs, params, curves, final metrics, small artifacts and the
model registry's pointers to SAEs (a version per trained SAE: its run and the md5 DVC records for its
folder; the weights themselves stay in DVC).

Two roots matter, and inside ``dvc exp run`` they differ:
- the *project root* is the copy of the repository the stage runs in (the working folder's git top
  level): its params.yaml, dvc.yaml and git state say what ran. Queued and ``--temp`` experiments run
  in a temporary copy under ``<repo>/.dvc/tmp/exps/``.
- the *store root* is the main repository, where the SQLite store ``mlflow.db`` lives, so runs made
  in those temporary copies are not lost with them. DVC 3 sets ``DVC_ROOT`` to the main repository
  for experiments as well; a path inside ``.dvc/tmp/exps/`` is mapped back to its repository anyway.
``MLFLOW_TRACKING_URI`` (e.g. a team ``mlflow server``) replaces the SQLite store.

A pipeline run is identified by the git commit, the content of params.yaml and dvc.yaml, and the DVC
experiment's name when there is one: every stage of one ``dvc repro`` or one experiment finds the same
parent, and the train and evaluate stages of a layer log to the same child run.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PIPELINE_KEY_TAG = "attnsae.pipeline_key"
LAYER_TAG = "attnsae.layer"
EXPERIMENT = "attnsae"
DVC_MD5_TAG = "attnsae.dvc_md5"  # the md5 dvc.lock records for the layer's SAE folder
SAE_PATH_TAG = "attnsae.sae_path"
EXP_COPIES = (".dvc", "tmp", "exps")  # where DVC puts the temporary copies of queued/--temp experiments
WRITTEN_BY_DVC = ("dvc.lock", ".gitignore")  # DVC rewrites these as stages run: they do not make a run "dirty"


# ---------------------------------------------------------------- where things are


def _git(cwd: Path, *args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError, NotADirectoryError):
        return ""


def project_root() -> Path:
    """The copy of the repository this stage runs in (an experiment's temporary copy, if it is one)."""
    cwd = Path.cwd().resolve()
    top = _git(cwd, "rev-parse", "--show-toplevel")
    if top:
        return Path(top)
    return Path(os.environ["DVC_ROOT"]).resolve() if os.environ.get("DVC_ROOT") else cwd


def main_repository(path: Path) -> Path:
    """``<repo>/.dvc/tmp/exps/<copy>/...`` -> ``<repo>``; any other path is returned as it is."""
    parts = path.parts
    for i in range(len(parts) - len(EXP_COPIES) + 1):
        if parts[i : i + len(EXP_COPIES)] == EXP_COPIES:
            return Path(*parts[:i])
    return path


def store_root() -> Path:
    """The main repository, where the SQLite store lives (never an experiment's temporary copy)."""
    root = Path(os.environ["DVC_ROOT"]) if os.environ.get("DVC_ROOT") else project_root()
    return main_repository(root.resolve())


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store_root() / 'mlflow.db'}"


# ---------------------------------------------------------------- what identifies a run


def dvc_outputs(root: Path) -> list[str]:
    """The outputs dvc.yaml declares, relative to ``root`` (DVC's own reading of the pipeline)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            return [Path(os.path.relpath(out.fs_path, root)).as_posix() for out in repo.index.outs]
    except DvcException:  # not a DVC repository, or a dvc.yaml DVC cannot read: nothing to leave out
        return []


def _inside(path: str, folders: list[str]) -> bool:
    return any(path == f or path.startswith(f + "/") for f in folders)


def git_state(root: Path) -> dict[str, str]:
    """HEAD, and whether tracked files differ from it. What DVC writes (dvc.lock, the stages' outputs)
    is left out: it changes while the pipeline runs, and says nothing about the code and params used."""
    changed = [p for p in _git(root, "diff", "--name-only", "HEAD").splitlines() if Path(p).name not in WRITTEN_BY_DVC]
    if changed:  # reading the pipeline costs a second, so only when there is something to sort out
        outputs = dvc_outputs(root)
        changed = [p for p in changed if not _inside(p, outputs)]
    return {
        "commit": _git(root, "rev-parse", "HEAD") or "none",
        "dirty": "true" if changed else "false",
        "dirty_files": " ".join(sorted(changed))[:500],
    }


def dvc_state(env: dict[str, str] | None = None) -> dict[str, str]:
    """What DVC tells a stage's command about itself: the stage, and the experiment it belongs to."""
    env = os.environ if env is None else env
    return {
        "stage": env.get("DVC_STAGE", ""),
        "exp_name": env.get("DVC_EXP_NAME", ""),
        "exp_baseline": env.get("DVC_EXP_BASELINE_REV", ""),
    }


def pipeline_key(root: Path, commit: str, exp_name: str = "") -> str:
    override = os.environ.get("ATTNSAE_PIPELINE_RUN")
    if override:
        return override
    digest = hashlib.sha256(commit.encode())
    for name in ("params.yaml", "dvc.yaml"):
        path = root / name
        digest.update(path.read_bytes() if path.is_file() else b"")
    # Two experiments with equal params are still two experiments: each gets its own parent run.
    digest.update(exp_name.encode())
    return digest.hexdigest()[:16]


def run_tags(profile: str, git: dict[str, str], dvc: dict[str, str]) -> dict[str, str]:
    tags = {
        "attnsae.profile": profile,
        "attnsae.git_commit": git["commit"],
        "attnsae.git_dirty": git["dirty"],
        "mlflow.source.git.commit": git["commit"],
    }
    if git.get("dirty_files"):
        tags["attnsae.git_dirty_files"] = git["dirty_files"]
    if dvc["exp_name"]:
        tags["attnsae.dvc_exp_name"] = dvc["exp_name"]
        tags["attnsae.dvc_exp_baseline"] = dvc["exp_baseline"]
    return tags


def flat_params(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """params.yaml as MLflow params (``per_layer.L2.l1_coeff``), so a sweep's runs line up in the UI."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flat_params(value, f"{name}."))
        else:
            flat[name] = str(value)[:6000]
    return flat


def registered_model_name(model_source: str, layer: int) -> str:
    """One registered model per base model and layer; its versions are the SAEs trained for that site."""
    return f"attnsae-{re.sub(r'[^A-Za-z0-9._-]+', '-', model_source)}-L{layer}"


def dvc_md5(path: str | Path) -> str:
    """The md5 DVC records in dvc.lock for this output (``<md5>.dir`` for a folder).

    Computed with DVC's own hashing (dvc_data), so a stage can know it before DVC writes dvc.lock,
    which happens only after the stage's command has finished.
    """
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs import MemoryFileSystem
    from dvc_objects.fs.local import LocalFileSystem

    staging = HashFileDB(MemoryFileSystem(), "/attnsae-md5", hash_name="md5")  # nothing is written to the cache
    _, _, obj = build(staging, os.path.abspath(path), LocalFileSystem(), "md5", dry_run=True)
    return obj.hash_info.value


def layer_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics JSON: the same names for every layer and every run."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if k != "layer" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def layer_table_csv(per_layer: list[dict[str, Any]]) -> str:
    """One row per layer (layer, l0, loss_recovered, ...): the report's table as data for plots and MLflow."""
    columns = ["layer"]
    for metrics in per_layer:
        columns += [k for k in layer_metrics(metrics) if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for metrics in per_layer:
        writer.writerow({"layer": metrics["layer"], **layer_metrics(metrics)})
    return buf.getvalue()


# ---------------------------------------------------------------- the store


def _sqlite_file(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise first use of a local SQLite store across processes: MLflow creates a fresh store's tables
    in migrations, and concurrent first writers race in them (design.md 6)."""
    db = _sqlite_file(uri)
    if db is None:
        yield
        return
    import fcntl
    import tempfile

    db.parent.mkdir(parents=True, exist_ok=True)
    # The lock file lives in the temp folder (writers of a local SQLite file share the machine), so the
    # repository gains no untracked file.
    name = hashlib.sha256(str(db.resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"attnsae-mlflow-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _already_exists(err: Exception) -> bool:
    return getattr(err, "error_code", "") == "RESOURCE_ALREADY_EXISTS"


def _experiment_id(client, uri: str) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        return experiment.experiment_id
    db = _sqlite_file(uri)
    # Local store: artifacts next to the database, never in whichever folder (an experiment's temporary
    # copy) the first writer ran in. A server picks its own artifact root.
    location = str(db.parent / "mlruns") if db else None
    try:
        return client.create_experiment(EXPERIMENT, artifact_location=location)
    except MlflowException as err:  # another writer created it first
        if not _already_exists(err):
            raise
        return client.get_experiment_by_name(EXPERIMENT).experiment_id


def open_store(uri: str | None = None):
    """An MlflowClient for ``uri`` (default: tracking_uri()) and the attnsae experiment's id, created once."""
    from mlflow.tracking import MlflowClient

    uri = uri or tracking_uri()
    with _store_lock(uri):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        return client, _experiment_id(client, uri)


def init_store(uri: str | None = None) -> tuple[str, str]:
    """Prepare a store before concurrent writers use it; returns (uri, what was done).

    A SQLite file gets its tables only (a server behind it then creates the experiment with its own
    artifact root); a server gets the attnsae experiment.
    """
    from mlflow.tracking import MlflowClient

    uri = uri or tracking_uri()
    if _sqlite_file(uri):
        with _store_lock(uri):
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)  # runs MLflow's migrations
        return uri, f"tables ready in {_sqlite_file(uri)}"
    _, experiment_id = open_store(uri)
    return uri, f"experiment '{EXPERIMENT}' has id {experiment_id}"


# ---------------------------------------------------------------- parent and child runs


class LayerRun:
    """The child run of one layer inside the current pipeline's parent run."""

    def __init__(self, client, run_id: str, tags: dict[str, str] | None = None):
        self.client, self.run_id, self.tags = client, run_id, tags or {}

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
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def register_sae(self, sae_dir: str | Path, model_source: str, layer: int):
        """Tag the run with the SAE folder's DVC md5 and add a registry version pointing at this run.

        The version's source is ``runs:/<run>/sae`` (the run's cfg.json); the weights stay in DVC,
        found by the version's tags (folder and md5).
        """
        from mlflow.exceptions import MlflowException

        md5, path = dvc_md5(sae_dir), _relative(Path(sae_dir))
        self.set_tags({DVC_MD5_TAG: md5, SAE_PATH_TAG: path})
        name = registered_model_name(model_source, layer)
        try:
            description = f"Attention SAEs (hook_z) of {model_source}, layer {layer}"
            self.client.create_registered_model(name, description=description)
        except MlflowException as err:
            if not _already_exists(err):
                raise
        keep = ("attnsae.profile", "attnsae.git_commit", "attnsae.git_dirty", "attnsae.dvc_exp_name")
        tags = {**{k: v for k, v in self.tags.items() if k in keep}, DVC_MD5_TAG: md5, SAE_PATH_TAG: path}
        return self.client.create_model_version(
            name, source=f"runs:/{self.run_id}/sae", run_id=self.run_id, tags=tags,
            description=f"{path} (DVC md5 {md5}); fetch the weights with `dvc pull {path}`",
        )

    def tag_evaluated_sae(self, sae_dir: str | Path) -> None:
        """Which SAE folder the logged metrics belong to, by its DVC md5."""
        self.set_tags({
            "attnsae.evaluated_sae_dvc_md5": dvc_md5(sae_dir),
            "attnsae.evaluated_sae_path": _relative(Path(sae_dir)),
        })


def _relative(path: Path) -> str:
    try:
        return path.resolve().relative_to(project_root()).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def _find_run(client, experiment_id: str, filter_string: str):
    runs = client.search_runs([experiment_id], filter_string=filter_string, max_results=1,
                              order_by=["attributes.start_time ASC"])
    return runs[0] if runs else None


def _parents(client, experiment_id: str, key: str) -> list:
    query = f"tags.`{PIPELINE_KEY_TAG}` = '{key}' and tags.`{LAYER_TAG}` = 'none'"
    found = client.search_runs([experiment_id], filter_string=query, max_results=1000)
    return sorted(found, key=lambda r: (r.info.start_time, r.info.run_id))


def _inactive(client, run_id: str, err: Exception) -> bool:
    """Whether ``err`` only says that the run was deleted meanwhile (a duplicate parent being settled)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).info.lifecycle_stage == "deleted"
    except MlflowException:
        return False


def _on_parent(client, run_id: str, action, *args, **kwargs) -> None:
    from mlflow.exceptions import MlflowException

    try:
        action(run_id, *args, **kwargs)
    except MlflowException as err:
        if not _inactive(client, run_id, err):
            raise


def _settle_parent(client, experiment_id: str, key: str) -> str:
    """The pipeline's one parent: the earliest of the parents that writers starting together created.

    Every writer applies the same rule to the same set, so they converge on one parent and delete the
    others; a child that pointed at a deleted one moves when it settles again at its end.
    """
    first, *extra = _parents(client, experiment_id, key)
    for run in extra:
        _on_parent(client, run.info.run_id, client.delete_run)
    return first.info.run_id


class Pipeline:
    """The current pipeline run: its store, key, tags and parent run (created by the first stage that asks)."""

    def __init__(self, profile: str, params: dict[str, Any] | None = None):
        self.client, self.experiment_id = open_store()
        root = project_root()
        git, self.dvc = git_state(root), dvc_state()
        self.key = pipeline_key(root, git["commit"], self.dvc["exp_name"])
        self.tags = run_tags(profile, git, self.dvc)
        if not _parents(self.client, self.experiment_id, self.key):
            label = self.dvc["exp_name"] or profile
            run = self.client.create_run(
                self.experiment_id, run_name=f"{label} {git['commit'][:8]} {self.key[:6]}",
                tags={**self.tags, PIPELINE_KEY_TAG: self.key, LAYER_TAG: "none"},
            )
            _on_parent(self.client, run.info.run_id, self._log_inputs, root, params)
        self.parent_id = _settle_parent(self.client, self.experiment_id, self.key)

    def _log_inputs(self, run_id: str, root: Path, params: dict[str, Any] | None) -> None:
        from mlflow.entities import Param

        flat = [Param(k, v) for k, v in flat_params(params or {}).items()]
        for i in range(0, len(flat), 100):
            self.client.log_batch(run_id, params=flat[i : i + 100])
        if (root / "params.yaml").is_file():
            self.client.log_artifact(run_id, str(root / "params.yaml"))

    def settle(self) -> str:
        self.parent_id = _settle_parent(self.client, self.experiment_id, self.key)
        return self.parent_id

    def set_parent_status(self, status: str) -> None:
        if status == "RUNNING":
            _on_parent(self.client, self.parent_id, self.client.update_run, status=status)
        else:
            _on_parent(self.client, self.parent_id, self.client.set_terminated, status=status)

    def stage_tags(self, stage: str, state: str) -> dict[str, str]:
        tags = {f"attnsae.stage.{stage}": state}
        if self.dvc["stage"]:
            tags[f"attnsae.dvc_stage.{stage}"] = self.dvc["stage"]  # e.g. train@3
        return tags


@contextlib.contextmanager
def layer_run(layer: int, stage: str, profile: str, params: dict[str, Any] | None = None) -> Iterator[LayerRun]:
    """Open (or reopen) the child run of ``layer``; it is marked finished, or failed if the stage raises."""
    pipe = Pipeline(profile, params)
    client = pipe.client
    child = _find_run(
        client, pipe.experiment_id, f"tags.`{PIPELINE_KEY_TAG}` = '{pipe.key}' and tags.`{LAYER_TAG}` = '{layer}'",
    )
    if child is None:
        child = client.create_run(
            pipe.experiment_id,
            run_name=f"L{layer}",
            tags={**pipe.tags, PIPELINE_KEY_TAG: pipe.key, LAYER_TAG: str(layer), "mlflow.parentRunId": pipe.parent_id},
        )
    run_id = child.info.run_id
    run = LayerRun(client, run_id, pipe.tags)
    client.update_run(run_id, status="RUNNING")
    pipe.set_parent_status("RUNNING")
    run.set_tags({**pipe.tags, **pipe.stage_tags(stage, "running")})

    def close(status: str) -> None:
        run.set_tags({"mlflow.parentRunId": pipe.settle()})
        client.set_terminated(run_id, status=status)
        pipe.set_parent_status(status)

    try:
        yield run
    except BaseException:
        close("FAILED")
        raise
    run.set_tags(pipe.stage_tags(stage, "done"))
    close("FINISHED")


def log_report(profile: str, params: dict[str, Any], per_layer: list[dict[str, Any]], files: list[Path]) -> str:
    """Log the report stage's outcome to the pipeline's parent run: each layer's metrics as ``L<n>/<name>``,
    the per-layer table and the report files as artifacts. Returns the parent's run id."""
    from mlflow.entities import Metric

    pipe = Pipeline(profile, params)
    now = int(time.time() * 1000)
    metrics = [Metric(f"L{m['layer']}/{k}", v, now, 0) for m in per_layer for k, v in layer_metrics(m).items()]
    for i in range(0, len(metrics), 1000):
        pipe.client.log_batch(pipe.parent_id, metrics=metrics[i : i + 1000])
    for path in files:
        pipe.client.log_artifact(pipe.parent_id, str(path))
    LayerRun(pipe.client, pipe.parent_id).set_tags(pipe.stage_tags("report", "done"))
    pipe.set_parent_status("FINISHED")
    return pipe.parent_id
