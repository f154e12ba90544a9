"""MLflow bookkeeping: one parent run per pipeline run, one child run per stage execution of a layer.

DVC owns data and weights; MLflow owns runs, params, curves, final metrics, small artifacts and the
model registry's pointers to SAEs (a version per trained SAE: its run and the md5 DVC records for its
folder; the weights themselves stay in DVC).

The store is the SQLite file ``mlflow.db`` in the main repository (see attnsae.reporting.repository: never an
experiment's temporary copy), with artifacts in ``mlruns`` next to it; ``MLFLOW_TRACKING_URI`` (e.g. a
team ``mlflow server``) replaces it. ``ATTNSAE_TRACKING`` says what to do when the store is unusable:
``required`` (default: fail in one line before any work), ``optional`` (warn, run without logging; a store
that fails once the stage has begun ends its logging, not the stage) or ``off`` (never log). It is an
environment variable, not a params.yaml key, because tracking changes no output: a params key would either be
read behind DVC's back or retrain every stage when toggled.

A pipeline run is identified by the git commit, the content of params.yaml and dvc.yaml, and the DVC
experiment's name when there is one: every stage of one ``dvc repro`` or one experiment finds the same
parent.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import re
import sqlite3
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from attnsae.errors import UserError, innermost_cause
from attnsae.reporting.repository import dvc_md5, dvc_state, git_state, main_repository, project_root

PIPELINE_KEY_TAG = "attnsae.pipeline_key"
LAYER_TAG = "attnsae.layer"
STAGE_TAG = "attnsae.stage"  # train, evaluate or dashboards: which stage's execution a child run records
SUPERSEDED_TAG = "attnsae.superseded_by"  # on a deleted earlier attempt: the run that replaced it
EXPERIMENT = "attnsae"
DVC_MD5_TAG = "attnsae.dvc_md5"  # the md5 dvc.lock records for the layer's SAE folder
SAE_PATH_TAG = "attnsae.sae_path"
MODE_VARIABLE = "ATTNSAE_TRACKING"
MODES = ("required", "optional", "off")
PROBE_TIMEOUT_S = 5
PROBE_ENDPOINT = "/api/2.0/mlflow/experiments/search"
# MLflow retries a failed request 7 times with growing pauses (~4 minutes) before it gives up. Two retries
# and 15 s per attempt end a stage within a minute when the server goes away mid-stage; a user's own
# setting of these variables wins.
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
SQLITE_HEADER = b"SQLite format 3\x00"
# MLflow retries creating its database engine 10 times over ~100 s (for a database server still starting); a
# SQLite file that cannot be opened stays so: one attempt, not a silent 100 s wait (its warnings are muted).
SQLITE_ENGINE_ATTEMPTS = 1


# ---------------------------------------------------------------- where the store is


def store_root() -> Path:
    """The main repository, where the SQLite store lives (never an experiment's temporary copy)."""
    root = Path(os.environ["DVC_ROOT"]) if os.environ.get("DVC_ROOT") else project_root()
    return main_repository(root.resolve())


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store_root() / 'mlflow.db'}"


def _sqlite_file(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def _is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _artifact_root(db: Path) -> str:
    """Where a SQLite store's attnsae artifacts live: ``mlruns`` next to the database file."""
    return str(db.resolve().parent / "mlruns")


# ---------------------------------------------------------------- is the store usable


def tracking_mode() -> str:
    mode = os.environ.get(MODE_VARIABLE, "required").strip().lower() or "required"
    if mode not in MODES:
        raise UserError(f"{MODE_VARIABLE}={os.environ[MODE_VARIABLE]!r} is not one of {', '.join(MODES)}")
    return mode


def check_store(uri: str | None = None) -> bool:
    """Whether this stage logs to MLflow; call it before any work. An unusable store ends the stage in
    one line (``required``), or is reported in one line on stderr and the stage runs unlogged (``optional``)."""
    mode = tracking_mode()
    if mode == "off":
        return False
    try:
        _probe(uri or tracking_uri())
    except UserError as err:
        if mode == "required":
            raise
        print(f"warning: this run is not logged to MLflow: {err}", file=sys.stderr)
        return False
    return True


def _probe(uri: str) -> None:
    """Raise a one-line UserError unless the store answers (a server) or can be written (a SQLite file), or, for
    another database, unless its driver is installed. Other failures of a database server or Databricks are left
    to fail in one line at first use."""
    db = _sqlite_file(uri)
    problem = (_sqlite_problem(db) if db else _server_problem(uri) if _is_server(uri)
               else _database_driver_problem(uri) if _is_database(uri) else None)
    if problem:
        raise _store_error(uri, "is not reachable" if _is_server(uri) else "is not usable", problem)


def _is_database(uri: str) -> bool:
    from mlflow.store.db.db_types import DATABASE_ENGINES

    return urllib.parse.urlparse(uri).scheme.split("+")[0] in DATABASE_ENGINES


def _database_driver_problem(uri: str) -> str | None:
    """Whether SQLAlchemy can load the Python driver the URI names (postgresql://, mysql+pymysql://, ...): attnsae
    installs none but SQLite's, and a missing one would otherwise end the stage in a traceback."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        make_url(uri).get_dialect().import_dbapi()
    except (ArgumentError, NoSuchModuleError) as err:
        return f"not a database URI SQLAlchemy knows: {err}"
    except ImportError as err:
        return f"its Python driver {err.name or 'module'} is not installed"
    return None


def _server_problem(uri: str) -> str | None:
    """Why a tracking server is unusable, from one short request without MLflow's retries; None if it answers."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        response = http_request(get_default_host_creds(uri), PROBE_ENDPOINT, "POST", json={"max_results": 1},
                                max_retries=0, backoff_factor=0, timeout=PROBE_TIMEOUT_S, raise_on_status=False)
    except MlflowException as err:
        return innermost_cause(err)
    if response.status_code in (401, 403):
        return f"HTTP {response.status_code}: it refuses the credentials in MLFLOW_TRACKING_TOKEN/USERNAME/PASSWORD"
    if response.status_code != 200 or not response.headers.get("Content-Type", "").startswith("application/json"):
        return f"HTTP {response.status_code} from {PROBE_ENDPOINT}: not an MLflow tracking server"
    return None


def _sqlite_problem(db: Path) -> str | None:
    """Why a SQLite store cannot be written, checked before MLflow touches it; None if it can."""
    if db.is_dir():
        return "a folder, not a file"
    folder = db.absolute().parent
    if not folder.is_dir():  # never made for the user: a mistyped path would log to a store nobody looks at
        return f"{folder} is a file, not a folder" if folder.exists() else f"folder {folder} does not exist"
    if db.exists():
        if not os.access(db, os.W_OK):
            return "the file is read-only"
        try:
            with open(db, "rb") as f:
                header = f.read(len(SQLITE_HEADER))
        except OSError as err:
            return innermost_cause(err)
        if header and header != SQLITE_HEADER:  # an empty file is an empty SQLite database
            return "not a SQLite database"
    if not os.access(folder, os.W_OK | os.X_OK):  # SQLite writes its journal next to the file
        return f"folder {folder} is not writable"
    return _creation_problem(folder)


def _creation_problem(folder: Path) -> str | None:
    """Why no file can be created in ``folder``, by creating (and removing) one. os.access says yes to root in
    any folder, /proc included, where SQLite then cannot open the file and MLflow retries for 100 s."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".attnsae-probe-"):
            pass
    except OSError as err:
        return f"no file can be created in folder {folder}: {innermost_cause(err)}"
    return None


class StoreFailed(UserError):
    """The MLflow store is unusable, or failed while in use."""


def _tolerated(err: StoreFailed) -> None:
    """Under ATTNSAE_TRACKING=optional a store that fails after the check ends the stage's logging, not the stage:
    one line on stderr. Otherwise the error stands."""
    if tracking_mode() != "optional":
        raise err
    print(f"warning: MLflow logging stopped, the stage goes on unlogged: {err}", file=sys.stderr)


def _store_error(uri: str, state: str, reason: str) -> StoreFailed:
    db = _sqlite_file(uri)
    name = f"MLflow store {db}" if db else f"MLflow tracking server {uri}" if _is_server(uri) else f"MLflow store {uri}"
    if _is_server(uri):
        fix = "start it, unset MLFLOW_TRACKING_URI to use the local SQLite store"
    elif db is None and _is_database(uri):
        fix = "install the driver SQLAlchemy needs for it, unset MLFLOW_TRACKING_URI to use the local SQLite store"
    elif db is not None and not db.absolute().parent.exists():
        fix = "create that folder or point MLFLOW_TRACKING_URI at a file in an existing folder"
    else:
        fix = "free disk space, fix its permissions or move it away, or point MLFLOW_TRACKING_URI elsewhere"
    return StoreFailed(f"{name} {state} ({reason}); {fix}, or {_mode_advice()}")


def _mode_advice() -> str:
    """What ATTNSAE_TRACKING can still change; never 'set it to optional' to a user who already did."""
    if os.environ.get(MODE_VARIABLE, "").strip().lower() == "optional":
        return f"set {MODE_VARIABLE}=off never to log"
    return f"set {MODE_VARIABLE}=optional to run without logging"


@contextlib.contextmanager
def _store_errors(uri: str) -> Iterator[None]:
    """A failing store (down, full, corrupt, read-only) ends the stage in one line naming it."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except (MlflowException, SQLAlchemyError, sqlite3.Error, OSError) as err:
        raise _store_error(uri, "failed", innermost_cause(err)) from err


def _prepare_mlflow(uri: str) -> None:
    """Bound MLflow's HTTP retries (see HTTP_LIMITS) and, for a SQLite store, its engine retries (see
    SQLITE_ENGINE_ATTEMPTS), and keep its database module from logging a traceback for each database error it
    then raises: _store_errors reports those in one line."""
    for name, value in HTTP_LIMITS.items():
        os.environ.setdefault(name, value)
    if _sqlite_file(uri):
        from mlflow.store.db import utils as db_utils

        db_utils.MAX_RETRY_COUNT = SQLITE_ENGINE_ATTEMPTS
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


# ---------------------------------------------------------------- what identifies a run


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


# ---------------------------------------------------------------- the store


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise first use of a local SQLite store across processes: MLflow creates a fresh store's tables
    in migrations, and concurrent first writers race in them (docs/design.md 6)."""
    db = _sqlite_file(uri)
    if db is None:
        yield
        return
    import fcntl

    # The lock file lives in the temp folder (writers of a local SQLite file share the machine), so the
    # repository gains no untracked file.
    name = hashlib.sha256(str(db.resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"attnsae-mlflow-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def _removing_empty_store(uri: str) -> Iterator[None]:
    """A store file that this first write created and left empty (disk full at the first page) is removed,
    with its journal: an empty mlflow.db looks like a store but holds nothing, not even MLflow's tables."""
    db = _sqlite_file(uri)
    created = db is not None and not db.exists()
    try:
        yield
    except BaseException:
        if created and db.is_file() and db.stat().st_size == 0:
            for path in (db, db.with_name(f"{db.name}-journal"), db.with_name(f"{db.name}-wal")):
                path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _first_use(uri: str) -> Iterator[None]:
    """Opening a store: checked first, then under the store lock, with failures as one line."""
    _probe(uri)
    _prepare_mlflow(uri)
    with _store_errors(uri), _store_lock(uri), _removing_empty_store(uri):
        yield


def _already_exists(err: Exception) -> bool:
    return getattr(err, "error_code", "") == "RESOURCE_ALREADY_EXISTS"


def _experiment_id(client, uri: str) -> str:
    from mlflow.exceptions import MlflowException

    db = _sqlite_file(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is not None:
        if db is not None:
            _reroot_artifacts(db, experiment.experiment_id, experiment.artifact_location)
        return experiment.experiment_id
    # Local store: artifacts next to the database, never in whichever folder (an experiment's temporary
    # copy) the first writer ran in. A server picks its own artifact root.
    location = _artifact_root(db) if db else None
    try:
        return client.create_experiment(EXPERIMENT, artifact_location=location)
    except MlflowException as err:  # another writer created it first
        if not _already_exists(err):
            raise
        return client.get_experiment_by_name(EXPERIMENT).experiment_id


def _reroot_artifacts(db: Path, experiment_id: str, recorded: str) -> None:
    """Point the attnsae experiment of a moved or copied repository's store at that repository's ``mlruns``.

    MLflow records absolute artifact paths (the experiment's location, each run's artifact_uri), so a
    copy of the repository would log into, and overwrite files of, the original's ``mlruns``. We own this
    SQLite file, so under the store lock its recorded paths are rewritten to this location, old runs
    included (a rerun logs into the parent run made before the move). An experiment per repository
    location would leave those old runs pointing at the original and split one history in two.
    Only a local path is rewritten: an ``mlflow-artifacts:`` root belongs to a server on this file.
    """
    root = _artifact_root(db)
    if recorded == root or not os.path.isabs(recorded):
        return
    old = recorded.rstrip("/") + "/"
    with contextlib.closing(sqlite3.connect(db, timeout=60)) as con, con:
        con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?", (root, experiment_id))
        con.execute(
            "UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) "
            "WHERE experiment_id = ? AND substr(artifact_uri, 1, ?) = ?",
            (root + "/", len(old) + 1, experiment_id, len(old), old),
        )


def open_store(uri: str | None = None):
    """An MlflowClient for ``uri`` (default: tracking_uri()) and the attnsae experiment's id, created once."""
    from mlflow.tracking import MlflowClient

    uri = uri or tracking_uri()
    with _first_use(uri):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        return client, _experiment_id(client, uri)


def init_store(uri: str | None = None) -> tuple[str, str]:
    """Prepare a store before concurrent writers use it; returns (uri, what was done).

    A SQLite file gets its tables only (a server behind it then creates the experiment with its own
    artifact root); a server gets the attnsae experiment.
    """
    from mlflow.tracking import MlflowClient

    uri = uri or tracking_uri()
    db = _sqlite_file(uri)
    if db is None:
        _, experiment_id = open_store(uri)
        return uri, f"experiment '{EXPERIMENT}' has id {experiment_id}"
    with _first_use(uri):
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)  # runs MLflow's migrations
    return uri, f"tables ready in {db}"


# ---------------------------------------------------------------- parent and child runs


def _deleted(client, run_id: str) -> bool:
    """Whether the run was deleted meanwhile (a duplicate parent being settled, an attempt superseded)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).info.lifecycle_stage == "deleted"
    except MlflowException:
        return False


def _unless_deleted(client, run_id: str, action, *args, **kwargs) -> None:
    from mlflow.exceptions import MlflowException

    try:
        action(run_id, *args, **kwargs)
    except MlflowException:
        if not _deleted(client, run_id):
            raise


def _logs(method):
    """A LayerRun method: a failing store ends the stage in one line naming it (under ATTNSAE_TRACKING=optional, the
    run's logging only). Writes to a run that a newer attempt of the same stage superseded while this one ran are
    dropped: that attempt's run is the record."""
    from mlflow.exceptions import MlflowException

    @functools.wraps(method)
    def logged(self: LayerRun, *args, **kwargs):
        if self.stopped:
            return None
        try:
            with _store_errors(self.store):
                try:
                    return method(self, *args, **kwargs)
                except MlflowException:
                    if _deleted(self.client, self.run_id):
                        return None
                    raise
        except StoreFailed as err:
            _tolerated(err)
            self.stopped = True
            return None

    return logged


class LayerRun:
    """The child run of one stage execution (train, evaluate or dashboards) of one layer."""

    def __init__(self, client, run_id: str, store: str, tags: dict[str, str] | None = None):
        self.client, self.run_id, self.store, self.tags = client, run_id, store, tags or {}
        self.stopped = False  # the store failed under ATTNSAE_TRACKING=optional: nothing more is logged

    @_logs
    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        values = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(values), 100):
            self.client.log_batch(self.run_id, params=values[i : i + 100])

    @_logs
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

    @_logs
    def log_metrics(self, metrics: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = [Metric(k, float(v), now, 0) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and v is not None]
        self.client.log_batch(self.run_id, metrics=values)

    @_logs
    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    @_logs
    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    @_logs
    def register_sae(self, sae_dir: str | Path, model_source: str, layer: int):
        """Tag the run with the SAE folder's DVC md5 and return the registry version of that md5, adding one
        pointing at this run when the model has none yet (a rerun that rebuilt the same SAE adds nothing).

        The version's source is ``runs:/<run>/sae`` (the run's cfg.json); the weights stay in DVC,
        found by the version's tags (folder and md5).
        """
        md5, path = dvc_md5(sae_dir), _relative(Path(sae_dir))
        self.set_tags({DVC_MD5_TAG: md5, SAE_PATH_TAG: path})
        name = registered_model_name(model_source, layer)
        existing = self._versions(name, md5) if self._has_model(name, model_source, layer) else []
        if existing:
            return existing[0]
        keep = ("attnsae.profile", "attnsae.git_commit", "attnsae.git_dirty", "attnsae.dvc_exp_name")
        tags = {**{k: v for k, v in self.tags.items() if k in keep}, DVC_MD5_TAG: md5, SAE_PATH_TAG: path}
        mine = self.client.create_model_version(
            name, source=f"runs:/{self.run_id}/sae", run_id=self.run_id, tags=tags,
            description=f"{path} (DVC md5 {md5}); fetch the weights with `dvc pull {path}`",
        )
        # Writers registering the same SAE at once all keep the lowest version and delete their own extra.
        first = self._versions(name, md5)[0]
        if first.version != mine.version:
            self.client.delete_model_version(name, mine.version)
        return first

    def _has_model(self, name: str, model_source: str, layer: int) -> bool:
        """Create the registered model unless it exists; whether it existed (and may hold versions)."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(
                name, description=f"Attention SAEs (hook_z) of {model_source}, layer {layer}"
            )
        except MlflowException as err:
            if not _already_exists(err):
                raise
            return True
        return False

    def _versions(self, name: str, md5: str) -> list:
        found = self.client.search_model_versions(f"name = '{name}' and tag.`{DVC_MD5_TAG}` = '{md5}'")
        return sorted(found, key=lambda v: int(v.version))

    @_logs
    def tag_evaluated_sae(self, sae_dir: str | Path) -> None:
        """Which SAE folder the logged metrics belong to, by its DVC md5."""
        self.set_tags({
            "attnsae.evaluated_sae_dvc_md5": dvc_md5(sae_dir),
            "attnsae.evaluated_sae_path": _relative(Path(sae_dir)),
        })

    @_logs
    def log_evaluation(self, params: dict[str, Any], metrics: dict[str, Any], metrics_file: str | Path,
                       sae_dir: str | Path, heldout: dict[str, Any] | None = None,
                       heldout_file: str | Path | None = None) -> None:
        """What the evaluate stage logs: its config as ``evaluate.*`` params, the metrics and the held-out split's
        (as ``heldout/<name>``), their files, and the md5 of the SAE folder they were measured on."""
        self.log_params({f"evaluate.{k}": v for k, v in params.items()})
        self.log_metrics({k: v for k, v in metrics.items() if k != "layer"}
                         | {f"heldout/{k}": v for k, v in (heldout or {}).items() if k != "layer"})
        self.log_artifact(metrics_file)
        if heldout_file is not None:
            self.log_artifact(heldout_file, "heldout")
        self.tag_evaluated_sae(sae_dir)


    def log_dashboards(self, params: dict[str, Any], summary: dict[str, Any], folder: str | Path) -> None:
        """What the dashboards stage logs: its config as ``dashboards.*`` params, the family-tag counts, alive and
        card counts, the stage's seconds, and the content hash the ratings of its page are tied to."""
        self.log_params({f"dashboards.{k}": v for k, v in params.items()})
        self.log_metrics({f"dashboards/tag_{tag}": n for tag, n in summary["tag_counts"].items()}
                         | {"dashboards/untagged": summary["untagged"], "dashboards/alive": summary["alive"],
                            "dashboards/cards": summary["cards"], "dashboards/seconds": summary["seconds"]})
        self.set_tags({"attnsae.dashboard_hash": summary["content_hash"]})
        self.log_artifact(Path(folder) / "features.json", "dashboards")


def _relative(path: Path) -> str:
    try:
        return path.resolve().relative_to(project_root()).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def _order(run) -> tuple[int, str]:
    return run.info.start_time, run.info.run_id


def _parents(client, experiment_id: str, key: str) -> list:
    query = f"tags.`{PIPELINE_KEY_TAG}` = '{key}' and tags.`{LAYER_TAG}` = 'none'"
    return sorted(client.search_runs([experiment_id], filter_string=query, max_results=1000), key=_order)


def _settle_parent(client, experiment_id: str, key: str) -> str:
    """The pipeline's one parent: the earliest of the parents that writers starting together created.

    Every writer applies the same rule to the same set, so they converge on one parent and delete the
    others; a child that pointed at a deleted one moves when it settles again at its end.
    """
    first, *extra = _parents(client, experiment_id, key)
    for run in extra:
        _unless_deleted(client, run.info.run_id, client.delete_run)
    return first.info.run_id


def _record(attempts: list, mine):
    """Which finished attempt of a stage stays the record: this one, unless an earlier attempt holds the
    same SAE (by DVC md5), which stays, as the registry version of that md5 points at its run."""
    md5 = mine.data.tags.get(DVC_MD5_TAG)
    same = [r for r in attempts if md5 and r.data.tags.get(DVC_MD5_TAG) == md5]
    return min(same, key=_order) if same else mine


class Pipeline:
    """The current pipeline run: its store, key, tags and parent run (created by the first stage that asks)."""

    def __init__(self, profile: str, params: dict[str, Any] | None = None):
        self.store = tracking_uri()
        self.client, self.experiment_id = open_store(self.store)
        root = project_root()
        git, self.dvc = git_state(root), dvc_state()
        self.key = pipeline_key(root, git["commit"], self.dvc["exp_name"])
        self.tags = run_tags(profile, git, self.dvc)
        with _store_errors(self.store):
            if not _parents(self.client, self.experiment_id, self.key):
                label = self.dvc["exp_name"] or profile
                run = self.client.create_run(
                    self.experiment_id, run_name=f"{label} {git['commit'][:8]} {self.key[:6]}",
                    tags={**self.tags, PIPELINE_KEY_TAG: self.key, LAYER_TAG: "none"},
                )
                _unless_deleted(self.client, run.info.run_id, self._log_inputs, root, params)
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
            _unless_deleted(self.client, self.parent_id, self.client.update_run, status=status)
        else:
            _unless_deleted(self.client, self.parent_id, self.client.set_terminated, status=status)

    def stage_tags(self, stage: str) -> dict[str, str]:
        return {f"attnsae.dvc_stage.{stage}": self.dvc["stage"]} if self.dvc["stage"] else {}  # e.g. train@3

    def start_stage(self, layer: int, stage: str) -> LayerRun:
        tags = {**self.tags, **self.stage_tags(stage), PIPELINE_KEY_TAG: self.key, LAYER_TAG: str(layer),
                STAGE_TAG: stage, "mlflow.parentRunId": self.parent_id}
        run = self.client.create_run(self.experiment_id, run_name=f"L{layer} {stage}", tags=tags)
        self.set_parent_status("RUNNING")
        return LayerRun(self.client, run.info.run_id, self.store, self.tags)

    def finish_stage(self, run: LayerRun, layer: int, stage: str, status: str) -> None:
        _unless_deleted(self.client, run.run_id, self.client.set_tag, "mlflow.parentRunId", self.settle())
        _unless_deleted(self.client, run.run_id, self.client.set_terminated, status=status)
        if status == "FINISHED":
            self._supersede(run.run_id, layer, stage)
        self.set_parent_status(status)

    def _supersede(self, run_id: str, layer: int, stage: str) -> None:
        """Delete the earlier attempts of this (pipeline, layer, stage), and this one if an earlier attempt
        stays the record (see _record). Later attempts, still running, settle when they finish."""
        query = (f"tags.`{PIPELINE_KEY_TAG}` = '{self.key}' and tags.`{LAYER_TAG}` = '{layer}'"
                 f" and tags.`{STAGE_TAG}` = '{stage}'")
        attempts = self.client.search_runs([self.experiment_id], filter_string=query, max_results=1000)
        mine = next((r for r in attempts if r.info.run_id == run_id), None)
        if mine is None:  # a newer attempt finished first and superseded this one
            return
        record = _record(attempts, mine)
        if record.info.status != "FINISHED":  # an attempt killed after it had logged all it holds
            _unless_deleted(self.client, record.info.run_id, self.client.set_terminated, status="FINISHED")
        for other in attempts:
            if other is not record and _order(other) <= _order(mine):
                _unless_deleted(self.client, other.info.run_id, self.client.set_tag, SUPERSEDED_TAG, record.info.run_id)
                _unless_deleted(self.client, other.info.run_id, self.client.delete_run)


@contextlib.contextmanager
def layer_run(layer: int, stage: str, profile: str, params: dict[str, Any] | None = None) -> Iterator[LayerRun]:
    """A fresh child run for this execution of ``stage`` on ``layer``, marked finished, or failed if it raises.

    One run per stage execution, because MLflow can neither remove a logged metric point nor change a
    param: a stage that runs again (after a kill, or by hand) can only leave one clean record in a run of
    its own. So train and evaluate of a layer log to two sibling runs, and when an execution finishes the
    earlier attempts of its (pipeline, layer, stage) are deleted (MLflow's soft delete: restorable).
    Concurrent executions of one stage never share a run.
    """
    try:
        pipe = Pipeline(profile, params)
        with _store_errors(pipe.store):
            run = pipe.start_stage(layer, stage)
    except StoreFailed as err:
        _tolerated(err)
        run = None
    if run is None:  # the stage runs unlogged
        yield None
        return
    try:
        yield run
    except BaseException:
        with contextlib.suppress(UserError):  # the stage's own error says more than a store that also failed
            with _store_errors(pipe.store):
                pipe.finish_stage(run, layer, stage, "FAILED")
        raise
    if run.stopped:
        return
    try:
        with _store_errors(pipe.store):
            pipe.finish_stage(run, layer, stage, "FINISHED")
    except StoreFailed as err:
        _tolerated(err)


def log_report(profile: str, params: dict[str, Any], per_layer: list[dict[str, Any]],
               files: list[Path]) -> str | None:
    """Log the report stage's outcome to the pipeline's parent run: each layer's metrics as ``L<n>/<name>``,
    the per-layer table and the report files as artifacts. Returns the parent's run id (None when a store that
    failed under ATTNSAE_TRACKING=optional left the report unlogged)."""
    from mlflow.entities import Metric, RunTag

    from attnsae.formats.metrics import numeric_metrics

    try:
        pipe = Pipeline(profile, params)
        with _store_errors(pipe.store):
            logged = pipe.client.get_run(pipe.parent_id).data.metrics
            now = int(time.time() * 1000)
            values = {f"L{m['layer']}/{k}": v for m in per_layer for k, v in numeric_metrics(m).items()}
            # A rerun of the report adds no second point for a value the parent already holds.
            metrics = [Metric(name, v, now, 0) for name, v in values.items() if logged.get(name) != v]
            for i in range(0, len(metrics), 1000):
                pipe.client.log_batch(pipe.parent_id, metrics=metrics[i : i + 1000])
            for path in files:
                pipe.client.log_artifact(pipe.parent_id, str(path))
            pipe.client.log_batch(pipe.parent_id,
                                  tags=[RunTag(k, v) for k, v in pipe.stage_tags("report").items()])
            pipe.set_parent_status("FINISHED")
    except StoreFailed as err:
        _tolerated(err)
        return None
    return pipe.parent_id
