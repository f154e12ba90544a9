"""Training checkpoints and the signals that stop training: what lets a killed or preempted run resume.

A checkpoint holds everything a resumed run needs to continue bit for bit (trainers, buffers, sources, the RNG),
under a key made of the layers' recipes and the data, so changed settings never resume a stale one. It lives in
``checkpoints/`` (layout.py), outside every DVC output, because DVC deletes a stage's outputs before running it.
SIGTERM and SIGINT are deferred to the end of the step, which saves a checkpoint and stops in one line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch

from attnsae.config import SAEConfig
from attnsae.errors import UserError

CHECKPOINT_FORMAT = 3  # part of the checkpoint key: a checkpoint of another layout is not resumed
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(UserError):
    """SIGTERM/SIGINT stopped training at the end of a step (after saving a checkpoint when there is a path)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def checkpoint_key(cfgs: dict[int, SAEConfig], data: str = "") -> str:
    """Identifies the run a checkpoint belongs to: changed configs or data never resume a stale checkpoint."""
    layers = {str(k): c.recipe() for k, c in sorted(cfgs.items())}
    text = json.dumps({"format": CHECKPOINT_FORMAT, "data": data, **layers}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_checkpoint(path: Path, step: int, key: str, trainers: dict, buffers: dict, sources: dict, shared=None) -> None:
    """Everything a resumed run needs to continue bit for bit; the caller checks the state is finite first."""
    state = {
        "key": key,
        "step": step,
        "torch_rng": torch.get_rng_state(),
        "shared": shared.state_dict() if shared is not None else {},
        "layers": {
            str(n): {
                "trainer": trainers[n].state_dict(),
                "buffer": buffers[n].state_dict(),
                "source": sources[n].state_dict() if hasattr(sources[n], "state_dict") else {},
            }
            for n in trainers
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a kill during the save leaves the previous checkpoint intact


def corrupt_checkpoint(path: Path, reason: str) -> UserError:
    return UserError(f"{path}: corrupt checkpoint ({reason}); delete it to start this training from step 0")


def corrupt_checkpoint_reason(path: Path) -> str:
    """Why torch could not load ``path``, in our words (torch's own messages advise weights_only=False)."""
    if path.stat().st_size == 0:
        return "empty file"
    if zipfile.is_zipfile(path):
        return "damaged contents"
    with open(path, "rb") as f:
        starts_like_zip = f.read(4) == b"PK\x03\x04"  # torch.save writes a zip archive
    return "truncated archive" if starts_like_zip else "not a torch checkpoint"


def load_checkpoint(path: Path, key: str) -> dict | None:
    """The saved state if ``path`` is a checkpoint of this run (``key``); None if absent or of another run."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=True)
    except Exception:  # on damage torch raises RuntimeError, OSError, EOFError, UnpicklingError, KeyError...
        raise corrupt_checkpoint(path, corrupt_checkpoint_reason(path)) from None
    if not isinstance(state, dict) or "key" not in state:
        raise corrupt_checkpoint(path, "not a training checkpoint")
    return state if state["key"] == key else None


def drop_checkpoint(checkpoint: Path | None) -> None:
    """A finished run's checkpoint is spent: the SAE folder holds the result. A save that a kill cut short
    left its temporary file, which nothing else would remove."""
    if checkpoint is not None:
        for path in (checkpoint, checkpoint.with_name(checkpoint.name + ".tmp")):
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def stop_signals_deferred() -> Iterator[list[int]]:
    """Inside, SIGTERM and SIGINT are only recorded in the yielded list, so the loop can stop at the end
    of a step; the previous handlers come back on exit. Off the main thread (where Python cannot set
    handlers) nothing changes."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {signum: signal.signal(signum, lambda signum, frame: received.append(signum)) for signum in STOP_SIGNALS}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: set outside Python


def interrupted(signum: int, step: int, checkpoint: Path | None) -> TrainingInterrupted:
    then = (f"checkpoint saved to {checkpoint}; run the same command again to resume" if checkpoint
            else "no checkpoint file was given, so nothing is kept")
    return TrainingInterrupted(f"train: interrupted by {signal.Signals(signum).name} at step {step}; {then}", signum)
