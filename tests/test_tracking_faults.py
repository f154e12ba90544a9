"""An unusable MLflow store fails in one line before any work (or is skipped when tracking is optional):
a server that refuses connections or is not MLflow, a corrupt or read-only SQLite file, a full disk."""

from __future__ import annotations

import http.server
import importlib.util
import os
import resource
import socket
import subprocess
import sys
import threading
import time

import pytest
from click.testing import CliRunner

from attnsae.cli import main
from attnsae.errors import UserError
from attnsae.reporting import tracking

ENV = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1"}
ENV.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture()
def closed_port():
    """A loopback port that refuses connections: bound (so nothing else takes it) but not listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.fixture()
def mode(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return lambda value: monkeypatch.setenv(tracking.MODE_VARIABLE, value)


def test_a_refused_server_fails_in_one_line_within_seconds(closed_port, mode):
    mode("required")
    uri = f"http://127.0.0.1:{closed_port}"
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        tracking.check_store(uri)
    assert time.monotonic() - start < tracking.PROBE_TIMEOUT_S
    assert str(err.value) == (
        f"MLflow tracking server {uri} is not reachable (connection refused); start it, unset MLFLOW_TRACKING_URI to "
        "use the local SQLite store, or set ATTNSAE_TRACKING=optional to run without logging")


def test_mlflow_init_on_a_refused_server_prints_one_line(closed_port):
    uri = f"http://127.0.0.1:{closed_port}"
    result = CliRunner(env={"MLFLOW_DISABLE_TELEMETRY": "true"}).invoke(main, ["mlflow-init", uri])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and f"{uri} is not reachable (connection refused)" in result.output


def test_a_server_that_is_not_mlflow_is_refused(mode):
    mode("required")
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(UserError, match=r"not reachable \(HTTP 501 .*not an MLflow tracking server\)"):
            tracking.check_store(f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
        server.server_close()


def test_optional_tracking_warns_once_and_runs_unlogged(closed_port, mode, capsys):
    mode("optional")
    assert tracking.check_store(f"http://127.0.0.1:{closed_port}") is False
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("warning: this run is not logged to MLflow: MLflow tracking server")


def test_off_never_touches_the_store_and_a_wrong_mode_is_named(tmp_path, mode):
    mode("off")
    assert tracking.check_store(f"sqlite:///{tmp_path / 'missing/folder/mlflow.db'}") is False
    assert not (tmp_path / "missing").exists()
    mode("sometimes")
    with pytest.raises(UserError, match="ATTNSAE_TRACKING='sometimes' is not one of required, optional, off"):
        tracking.check_store()


def test_a_usable_sqlite_store_is_checked_without_being_created(tmp_path, mode):
    mode("required")
    assert tracking.check_store(f"sqlite:///{tmp_path / 'new/mlflow.db'}") is True
    assert not (tmp_path / "new").exists()


def test_a_file_that_is_not_sqlite_is_named(tmp_path, mode):
    mode("required")
    db = tmp_path / "mlflow.db"
    db.write_text("not a database\n")
    with pytest.raises(UserError, match=f"^MLflow store {db} is not usable \\(not a SQLite database\\); "):
        tracking.check_store(f"sqlite:///{db}")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only files and folders")
def test_a_read_only_store_is_named(tmp_path, mode):
    mode("required")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(UserError, match=f"is not usable \\(folder {folder} is not writable\\)"):
            tracking.check_store(f"sqlite:///{folder / 'mlflow.db'}")
    finally:
        folder.chmod(0o755)


def limit_file_size(size: int):
    """For a child process: writes past ``size`` bytes fail with EFBIG (Python ignores SIGXFSZ), as on a full disk."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


def test_a_full_disk_at_the_first_write_leaves_no_empty_store(tmp_path):
    db = tmp_path / "mlflow.db"
    done = subprocess.run(["attnsae", "mlflow-init", f"sqlite:///{db}"], env=ENV, capture_output=True, text=True,
                          preexec_fn=limit_file_size(100), timeout=300)
    assert done.returncode == 1
    (line,) = [s for s in done.stderr.splitlines() if "INFO" not in s]
    assert line.startswith(f"Error: MLflow store {db} failed (") and "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_full_disk_while_logging_ends_the_stage_in_one_line(tmp_path):
    db = tmp_path / "mlflow.db"
    tracking.init_store(f"sqlite:///{db}")
    code = ("import resource, sys\nfrom attnsae.reporting import tracking\nfrom attnsae.errors import UserError\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({db.stat().st_size + 65536},) * 2)\n"
            "try:\n"
            "    with tracking.layer_run(2, 'train', 'tiny') as run:\n"
            "        run.log_curves([{'step': i, 'loss': 1 / (i + 1)} for i in range(20000)])\n"
            "except UserError as err:\n"
            "    sys.exit(str(err))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**ENV, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith(f"MLflow store {db} failed (") and "Traceback" not in done.stderr


def test_mlflow_http_retries_are_bounded_unless_the_user_set_them(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    tracking.open_store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert (os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"], os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"]) == ("2", "60")


@pytest.mark.parametrize("uri, driver", [
    ("postgresql://u:p@127.0.0.1:9/db", "psycopg"),
    ("mysql://u:p@127.0.0.1:9/db", "MySQLdb"),
])
def test_a_database_store_without_its_driver_is_named_in_one_line_before_any_work(tmp_path, uri, driver):
    """attnsae installs no database driver but SQLite's: a postgresql:// or mysql:// store stops the command at its
    check, in one line, instead of a traceback at the first write."""
    if importlib.util.find_spec(driver) is not None:
        pytest.skip(f"{driver} is installed here")
    result = CliRunner(env={"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_TRACKING_URI": uri}).invoke(
        main, ["report", "--out", str(tmp_path / "report")])
    assert result.exit_code == 1
    assert result.output == (f"Error: MLflow store {uri} is not usable (its Python driver {driver} is not installed); "
                             "install the driver SQLAlchemy needs for it, unset MLFLOW_TRACKING_URI to use the local "
                             "SQLite store, or set ATTNSAE_TRACKING=optional to run without logging\n")
    assert not (tmp_path / "report").exists()
