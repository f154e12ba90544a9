"""A stage process ends when the pipeline that started it does.

DVC runs each stage's command as its child (through ``$SHELL -c``, which usually execs the command), and deletes the
stage's outputs before it starts it. Killed alone, ``dvc repro`` exits and leaves its child running, which then
writes outputs that no dvc.lock vouches for. So a command started by DVC (which sets ``DVC_STAGE`` in its
environment) watches the process that started it, and sends itself SIGTERM when that process is gone: the training
stage checkpoints and stops (sae/checkpoints.py), the others stop, and atomic writers leave nothing half-written.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

STARTED_BY = "DVC_STAGE"  # DVC sets it for every stage command it runs
SHELLS = {"sh", "bash", "dash", "zsh", "fish", "ksh"}
POLL_SECONDS = 0.5


def follow_pipeline(environ: dict[str, str] | None = None) -> int | None:
    """When DVC started this process, watch the pipeline process in a daemon thread; returns its pid (None: not
    started by DVC, nothing watched)."""
    if STARTED_BY not in (os.environ if environ is None else environ):
        return None
    parent = os.getppid()
    if parent == 1:  # orphaned already: the pipeline died before this process got here
        os.kill(os.getpid(), signal.SIGTERM)
    pipeline = pipeline_process(parent)
    threading.Thread(target=_watch, args=(parent, pipeline), name="attnsae-lifeline", daemon=True).start()
    return pipeline


def pipeline_process(parent: int) -> int:
    """The process that runs the pipeline: the parent, or the parent's parent when the parent is a shell that did not
    exec the command (Linux tells a process's name in /proc; elsewhere the parent is taken)."""
    try:
        name = Path(f"/proc/{parent}/comm").read_text().strip()
        stat = Path(f"/proc/{parent}/stat").read_text()
    except OSError:
        return parent
    grandparent = int(stat.rsplit(")", 1)[1].split()[1])  # the fields after "(comm)": state, ppid, ...
    return grandparent if name in SHELLS and grandparent > 1 else parent


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return _state(pid) != "Z"  # a killed process waits as a zombie until its own parent reaps it


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _watch(parent: int, pipeline: int) -> None:
    while os.getppid() == parent and is_alive(pipeline):
        time.sleep(POLL_SECONDS)
    os.kill(os.getpid(), signal.SIGTERM)
