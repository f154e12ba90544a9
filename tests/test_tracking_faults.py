"""An unusable MLflow store fails in one line before any work (or is skipped when tracking is optional):
a server that refuses connections or is not MLflow, a corrupt or read-only SQLite file, a full disk."""

from __future__ import annotations

import http.server
import importlib.util
import os
import re
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
    assert tracking.check_store(f"sqlite:///{tmp_path / 'mlflow.db'}") is True
    assert list(tmp_path.iterdir()) == []  # nor is the file that tried the folder left behind


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


def test_under_optional_tracking_a_store_that_fills_up_mid_stage_ends_the_logging_not_the_stage(tmp_path):
    """The store passes the check, then the disk fills while the stage logs: one warning line, later logging calls
    do nothing, the stage's own work goes on to its end and exits 0."""
    db = tmp_path / "mlflow.db"
    tracking.init_store(f"sqlite:///{db}")
    code = ("import resource\nfrom attnsae.reporting import tracking\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({db.stat().st_size + 65536},) * 2)\n"
            "with tracking.layer_run(2, 'train', 'tiny') as run:\n"
            "    run.log_curves([{'step': i, 'loss': 1 / (i + 1)} for i in range(20000)])\n"
            "    assert run.stopped\n"
            "    run.log_metrics({'l0': 3.0})\n"
            "    print('the stage finished its work')\n"
            "print(tracking.log_report('tiny', {}, [{'layer': 2, 'l0': 3.0}], []))\n")
    env = {**ENV, "MLFLOW_TRACKING_URI": f"sqlite:///{db}", "ATTNSAE_TRACKING": "optional"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "the stage finished its work"
    warnings = [s for s in done.stderr.splitlines() if s.startswith("warning: ")]
    assert warnings and all(s.startswith("warning: MLflow logging stopped, the stage goes on unlogged: "
                                         f"MLflow store {db} failed (") for s in warnings)
    assert "Traceback" not in done.stderr


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


# A store that fails slowly: found by running the quickstart's `attnsae report` against such stores. The command's
# work is replaced by a record of whether it ran, as the store must be checked before it.
QUICK_S = 20  # generous: these stores took 108 s (MLflow retrying to open the file) before they failed
on_linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")


@pytest.fixture()
def report_with_store(monkeypatch, tiny_params_file, tmp_path):
    """Run `attnsae report` with MLFLOW_TRACKING_URI and ATTNSAE_TRACKING set: (result, seconds, whether it built)."""
    from attnsae.reporting.report import Report

    built = []
    monkeypatch.setattr("attnsae.reporting.report.build_report",
                        lambda *args: built.append(args) or Report("# report", [], []))

    def run(uri: str, tracking_mode: str):
        runner = CliRunner(env={"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_TRACKING_URI": uri,
                                tracking.MODE_VARIABLE: tracking_mode})
        start = time.monotonic()
        result = runner.invoke(main, ["report", "--params", str(tiny_params_file), "--out", str(tmp_path / "report")])
        return result, time.monotonic() - start, bool(built)

    return run


@on_linux
def test_a_store_in_a_folder_where_no_file_can_be_created_fails_in_one_line_before_any_work(report_with_store):
    """/proc exists and os.access calls it writable for root, but no file can be created there."""
    result, seconds, built = report_with_store("sqlite:////proc/attnsae-test.db", "required")
    assert (result.exit_code, built) == (1, False) and seconds < QUICK_S
    (line,) = result.stderr.splitlines()
    assert line.startswith("Error: MLflow store /proc/attnsae-test.db is not usable (") and "folder /proc" in line
    assert line.endswith(", or set ATTNSAE_TRACKING=optional to run without logging")


@on_linux
def test_optional_tracking_runs_on_past_a_store_where_no_file_can_be_created(report_with_store):
    result, seconds, built = report_with_store("sqlite:////proc/attnsae-test.db", "optional")
    assert (result.exit_code, built) == (0, True) and seconds < QUICK_S
    (line,) = result.stderr.splitlines()
    assert line.startswith("warning: this run is not logged to MLflow: MLflow store /proc/attnsae-test.db is not "
                           "usable (") and "folder /proc" in line
    assert "=optional" not in line and result.stdout == "# report\n"


@pytest.mark.parametrize("tracking_mode", ["required", "optional"])
def test_a_store_in_a_missing_folder_is_named_not_created(report_with_store, tmp_path, tracking_mode):
    folder = tmp_path / "some/missing/folder"
    result, seconds, built = report_with_store(f"sqlite:///{folder / 'mlflow.db'}", tracking_mode)
    (line,) = result.stderr.splitlines()
    problem = (f"MLflow store {folder / 'mlflow.db'} is not usable (folder {folder} does not exist); create that "
               "folder or point MLFLOW_TRACKING_URI at a file in an existing folder, or set ATTNSAE_TRACKING=")
    if tracking_mode == "required":
        assert (result.exit_code, built) == (1, False)
        assert line == f"Error: {problem}optional to run without logging"
    else:
        assert (result.exit_code, built) == (0, True)
        assert line == f"warning: this run is not logged to MLflow: {problem}off never to log"
    assert seconds < QUICK_S and not (tmp_path / "some").exists()


@on_linux
def test_a_sqlite_file_that_cannot_be_opened_fails_at_once_even_past_the_check(monkeypatch, mode):
    """Should a store pass the check and still not open (it changed in between), MLflow's ten attempts to open it
    (~100 s) are cut to one. In optional mode the message offers what is left: off."""
    from mlflow.store.db import utils as db_utils

    mode("optional")
    monkeypatch.setattr(db_utils, "MAX_RETRY_COUNT", db_utils.MAX_RETRY_COUNT)  # restored after the test
    monkeypatch.setattr(tracking, "_probe", lambda uri: None)
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        tracking.open_store("sqlite:////proc/attnsae-test.db")
    assert time.monotonic() - start < QUICK_S
    assert str(err.value).startswith("MLflow store /proc/attnsae-test.db failed (unable to open database file); ")
    assert str(err.value).endswith(", or set ATTNSAE_TRACKING=off never to log")


@on_linux
@pytest.mark.parametrize("tracking_mode", ["required", "optional"])
def test_a_store_that_will_not_open_past_the_check_stops_the_stage_unless_tracking_is_optional(
        monkeypatch, mode, capsys, tracking_mode):
    from mlflow.store.db import utils as db_utils

    mode(tracking_mode)
    monkeypatch.setattr(db_utils, "MAX_RETRY_COUNT", db_utils.MAX_RETRY_COUNT)  # restored after the test
    monkeypatch.setattr(tracking, "_probe", lambda uri: None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////proc/attnsae-test.db")
    failed = "MLflow store /proc/attnsae-test.db failed (unable to open database file); "
    if tracking_mode == "required":
        with pytest.raises(UserError, match=re.escape(failed)), tracking.layer_run(2, "train", "tiny"):
            pass
        return
    with tracking.layer_run(2, "train", "tiny") as run:
        assert run is None
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"warning: MLflow logging stopped, the stage goes on unlogged: {failed}")
