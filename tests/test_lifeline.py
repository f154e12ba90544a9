"""A stage process that DVC started stops when DVC does (lifeline.py): measured, `kill -TERM` of `dvc repro` alone
left `attnsae dashboards` running, and it rewrote the outputs DVC had deleted 20 s later.

A stand-in for DVC starts the command the way DVC does (``$SHELL --noprofile --norc -c CMD`` with DVC_STAGE set) and
is then killed alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from attnsae import lifeline

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc (Linux)")

STAGE = textwrap.dedent("""
    import os, sys, time
    from attnsae.lifeline import follow_pipeline
    watched = follow_pipeline()
    with open(sys.argv[1], "w") as f:
        f.write(f"{os.getpid()} {watched}")
    time.sleep(60)
    open(sys.argv[2], "w").write("written after the pipeline was gone")
""")

FAKE_DVC = textwrap.dedent("""
    import os, subprocess, sys
    subprocess.run(["bash", "--noprofile", "--norc", "-c", sys.argv[1]],
                   env={**os.environ, "DVC_STAGE": "dashboards@3"})
""")


def wait_for(path: Path, seconds: float = 30) -> str:
    deadline = time.monotonic() + seconds
    while not (path.exists() and path.read_text()):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    return path.read_text()


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not lifeline.is_alive(pid):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("shell_execs", [True, False], ids=["shell execs the command", "shell stays its parent"])
def test_the_stage_stops_when_the_pipeline_process_is_killed_alone(tmp_path, shell_execs):
    script, pids, late = tmp_path / "stage.py", tmp_path / "pids", tmp_path / "late-output"
    script.write_text(STAGE)
    command = f"{sys.executable} {script} {pids} {late}" + ("" if shell_execs else "; true")
    dvc = subprocess.Popen([sys.executable, "-c", FAKE_DVC, command])
    try:
        stage, watched = map(int, wait_for(pids).split())
        assert watched == dvc.pid  # through the shell, when the shell stays
        dvc.send_signal(signal.SIGTERM)  # the pipeline alone, as `kill -TERM <dvc pid>`
        dvc.wait(10)
        assert gone_within(stage, 5), "the stage outlived the pipeline"
        assert not late.exists()
    finally:
        dvc.kill()
        if pids.exists() and lifeline.is_alive(stage := int(pids.read_text().split()[0])):
            os.kill(stage, signal.SIGKILL)  # a failed test leaves no process behind


def test_a_command_not_started_by_dvc_watches_nothing():
    """Run by hand (or under nohup), a command lives on when its shell goes."""
    assert lifeline.follow_pipeline(environ={}) is None
