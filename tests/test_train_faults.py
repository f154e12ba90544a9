"""Faults during training end in one line and leave nothing half-done.

- a NaN/Inf loss (NaN l1_coeff, a diverging LR) stops the run naming the layer and the step; no SAE
  folder or curves are written and the last good checkpoint stays;
- activation rows holding NaN/Inf are dropped and counted; too many of them stop the run;
- a damaged checkpoint file is named in one line that never advises weights_only=False;
- SIGTERM/SIGINT save a checkpoint at the end of the step and stop in one line; rerunning resumes
  bit for bit, in process and through the `attnsae train` command.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from attnsae import layout
from attnsae.config import SAEConfig
from attnsae.data.activations import DiskActivations
from attnsae.errors import UserError
from attnsae.formats.sae_cfg import CFG_FILE, WEIGHTS_FILE
from attnsae.sae.autoencoder import SAE
from attnsae.sae.checkpoints import TrainingInterrupted
from attnsae.sae.training import NonFinite, make_optimizer, resample_dead, train_layer, train_saes
from helpers import read_tiny_params

LAYER = 3
D_IN = 16
CACHE_ROWS = 3000

pytestmark = pytest.mark.usefixtures("one_thread")


def sparse_rows(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=gen) * (torch.rand(n, D_IN, generator=gen) < 0.3)


def nan_every(rows: torch.Tensor, period: int) -> torch.Tensor:
    """``rows`` where rows 0, period, 2*period, ... hold one NaN or (every other one) one Inf."""
    rows = rows.clone()
    rows[::period, 0] = math.nan
    rows[period :: 2 * period, 1] = math.inf
    return rows


def write_cache(activations_dir: Path, rows: torch.Tensor) -> Path:
    """One layer's cache in the format the activations stage writes (meta as train_layer needs it)."""
    folder = layout.activations_dir(LAYER, activations_dir)
    folder.mkdir(parents=True)
    save_file({"z": rows.to(torch.bfloat16)}, str(folder / "shard_00000.safetensors"))
    meta = {"layer": LAYER, "hook_name": f"blocks.{LAYER}.attn.hook_z", "d_in": rows.shape[1], "rows": len(rows),
            "context_size": 8, "model": "test", "model_source": "test", "dataset": "random rows"}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture()
def activations(tmp_path) -> Path:
    acts = tmp_path / "acts"
    write_cache(acts, sparse_rows(CACHE_ROWS))
    return acts


def config(**changes) -> SAEConfig:
    """60 steps resampling at 20 and 40 (as in test_resume.py)."""
    base = dict(d_sae=128, l1_coeff=10.0, lr=3e-2, batch_size=128, train_tokens=128 * 60, warmup_steps=5,
                resample_every=20, dead_window=10, max_resamples=2, resample_inputs=512, buffer_rows=1024, log_every=3,
                device="cpu")
    return SAEConfig(**{**base, **changes})


def diverging(**changes) -> SAEConfig:
    """lr 1e9: Adam moves every weight by ~lr, so the loss overflows at step 1. params.yaml refuses it (lr <= 1); set
    past the check, it stands for any run that diverges, which training must still stop in one line."""
    return config(**changes).model_copy(update={"lr": 1e9})


def one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and "Traceback" not in text, text
    return text


def outputs(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "sae", tmp_path / "curves.csv"


def assert_same_training(a, b) -> None:
    for name, tensor in a.sae.state_dict().items():
        assert torch.equal(tensor, b.sae.state_dict()[name]), name
    assert torch.equal(a.log10_density, b.log10_density)
    assert a.curves == b.curves and a.resampled == b.resampled
    assert a.nonfinite_rows_dropped == b.nonfinite_rows_dropped


# ---------------------------------------------------------------------------------------------------
# Non-finite loss and weights


def test_nan_l1_coeff_stops_at_step_0_and_writes_nothing(activations, tmp_path):
    values = config().model_dump() | {"l1_coeff": math.nan}
    cfg = SAEConfig.model_construct(**values)  # validation rejects NaN: this is what a bypass would train
    sae_dir, curves = outputs(tmp_path)
    with pytest.raises(UserError) as info:
        train_layer(cfg, LAYER, activations, sae_dir, curves, checkpoint=tmp_path / "ckpt.pt", checkpoint_every=5)
    message = one_line(info.value)
    assert message.startswith(f"train L{LAYER}: loss became nan at step 0 (lr 0.03, l1_coeff nan): nothing written")
    assert message.endswith("no checkpoint of this run was saved")
    assert not sae_dir.exists() and not curves.exists() and not (tmp_path / "ckpt.pt").exists()


def test_diverging_lr_stops_naming_layer_and_step_and_keeps_the_last_good_checkpoint(activations, tmp_path):
    cfg = diverging(log_every=1)
    sae_dir, curves = outputs(tmp_path)
    ckpt = tmp_path / "checkpoints" / "train-L3.pt"
    for attempt in range(2):  # the rerun resumes the kept checkpoint and stops the same way
        with pytest.raises(UserError) as info:
            train_layer(cfg, LAYER, activations, sae_dir, curves, checkpoint=ckpt, checkpoint_every=1)
        assert one_line(info.value) == (
            f"train L{LAYER}: loss became inf at step 1 (lr 1e+09, l1_coeff 10): nothing written; "
            f"the last good checkpoint ({ckpt}, step 1) is kept"
        ), attempt
        assert not sae_dir.exists() and not curves.exists()
        saved = torch.load(ckpt, weights_only=True)
        assert saved["step"] == 1
        assert all(torch.isfinite(w).all() for w in saved["layers"][str(LAYER)]["trainer"]["sae"].values())


def test_nonfinite_loss_between_checks_is_named_by_its_own_step_and_never_checkpointed(activations, tmp_path):
    # the loss (inf from step 1) is read back only on logging/checkpoint steps: here the checkpoint at step 3
    cfg = diverging(log_every=10)
    ckpt = tmp_path / "train.pt"
    with pytest.raises(UserError) as info:
        train_saes({LAYER: cfg}, {LAYER: DiskActivations(layout.activations_dir(LAYER, activations))}, progress=False,
                   checkpoint=ckpt, checkpoint_every=3)
    assert one_line(info.value).startswith(f"train L{LAYER}: loss became inf at step 1 ")
    assert not ckpt.exists()


def test_resampling_a_diverged_sae_raises_nonfinite_not_a_torch_error():
    sae = SAE(4, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.W_enc.mul_(1e30)  # finite weights whose reconstruction errors overflow
    optimizer = make_optimizer(sae, SAEConfig(d_sae=6, l1_coeff=0.1, train_tokens=64, batch_size=8, buffer_rows=16))
    dead = torch.tensor([True, False, False, False, False, False])
    with pytest.raises(NonFinite):
        resample_dead(sae, optimizer, dead, torch.randn(20, 4) + 1.0, torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------------
# Non-finite activation rows


def test_nonfinite_rows_are_dropped_and_counted(tmp_path):
    rows = nan_every(sparse_rows(CACHE_ROWS), 150)  # 20 of 3000 rows (0.67%)
    source = DiskActivations(write_cache(tmp_path / "acts", rows))
    result = train_saes({LAYER: config()}, {LAYER: source}, progress=False)[LAYER]

    bad = ~torch.isfinite(rows).all(-1)
    expected = source.epochs * int(bad.sum()) + int(bad[: source.position].sum())  # over every row read
    assert source.epochs >= 1 and expected > 20
    assert result.nonfinite_rows_dropped == expected
    assert all(torch.isfinite(p).all() for p in result.sae.parameters())
    assert all(math.isfinite(row["loss"]) for row in result.curves)


def test_dropped_row_count_is_in_the_sae_cfg_and_the_final_line(tmp_path, capsys):
    acts = tmp_path / "acts"
    write_cache(acts, nan_every(sparse_rows(CACHE_ROWS), 150))
    sae_dir, curves = outputs(tmp_path)
    result = train_layer(config(), LAYER, acts, sae_dir, curves)
    assert result.nonfinite_rows_dropped > 0
    metadata = json.loads((sae_dir / CFG_FILE).read_text())["metadata"]
    assert metadata["attnsae"]["nonfinite_rows_dropped"] == result.nonfinite_rows_dropped
    final = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"train L{LAYER}: ")][0]
    assert final.endswith(f"non-finite rows dropped {result.nonfinite_rows_dropped:,}")


def test_too_many_nonfinite_rows_stop_naming_the_layer(tmp_path):
    acts = tmp_path / "acts"
    write_cache(acts, nan_every(sparse_rows(CACHE_ROWS), 50))  # 2%
    sae_dir, curves = outputs(tmp_path)
    with pytest.raises(UserError) as info:
        train_layer(config(), LAYER, acts, sae_dir, curves)
    message = one_line(info.value)
    assert message.startswith(f"train L{LAYER}: the activations are broken: ")
    assert "NaN/Inf" in message and "1%" in message
    assert not sae_dir.exists() and not curves.exists()


# ---------------------------------------------------------------------------------------------------
# Corrupt checkpoints


def damage(path: Path, kind: str) -> None:
    torch.save({"key": "0123456789abcdef", "weights": torch.randn(4000)}, path)
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbled":
        path.write_bytes(data[:200] + bytes(range(256))[:60] + data[260:])
    elif kind == "random bytes":
        path.write_bytes(os.urandom(1000))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "a tensor":
        torch.save(torch.zeros(3), path)


@pytest.mark.parametrize("kind, reason", [
    ("truncated", "truncated archive"),
    ("garbled", "damaged contents"),
    ("random bytes", "not a torch checkpoint"),
    ("empty", "empty file"),
    ("a tensor", "not a training checkpoint"),
])
def test_corrupt_checkpoint_is_named_in_one_line(activations, tmp_path, kind, reason):
    ckpt = tmp_path / "checkpoints" / "train-L3.pt"
    ckpt.parent.mkdir()
    damage(ckpt, kind)
    before = ckpt.read_bytes()
    with pytest.raises(UserError) as info:
        train_saes({LAYER: config()}, {LAYER: DiskActivations(layout.activations_dir(LAYER, activations))},
                   progress=False, checkpoint=ckpt, checkpoint_every=7)
    message = one_line(info.value)
    assert message == f"{ckpt}: corrupt checkpoint ({reason}); delete it to start this training from step 0"
    assert "weights_only" not in message
    assert ckpt.read_bytes() == before  # the user decides what to do with it


# ---------------------------------------------------------------------------------------------------
# Preemption


@pytest.mark.parametrize("signum, every", [(signal.SIGTERM, 7), (signal.SIGINT, 0)],
                         ids=["SIGTERM", "SIGINT-no-periodic-checkpoints"])
def test_signal_saves_a_checkpoint_and_the_resumed_run_is_bit_identical(tmp_path, signum, every):
    # NaN rows too, so the dropped-row count is part of what is saved and resumed
    cache = write_cache(tmp_path / "acts", nan_every(sparse_rows(CACHE_ROWS), 150))
    cfg = config()
    straight = train_saes({LAYER: cfg}, {LAYER: DiskActivations(cache)}, progress=False)[LAYER]
    assert any(n for _, n in straight.resampled) and straight.nonfinite_rows_dropped > 0

    def signal_at_47(step: int) -> None:  # after the resample at step 40
        if step == 47:
            os.kill(os.getpid(), signum)

    ckpt = tmp_path / "ckpt" / "train.pt"
    handler_before = signal.getsignal(signum)
    with pytest.raises(TrainingInterrupted) as info:
        train_saes({LAYER: cfg}, {LAYER: DiskActivations(cache)}, progress=False, checkpoint=ckpt,
                   checkpoint_every=every, on_step=signal_at_47)
    assert isinstance(info.value, UserError) and info.value.signum == signum
    assert one_line(info.value) == (f"train: interrupted by {signum.name} at step 48; checkpoint saved to {ckpt}; "
                                    "run the same command again to resume")
    assert signal.getsignal(signum) is handler_before
    assert torch.load(ckpt, weights_only=True)["step"] == 48

    steps_run: list[int] = []
    resumed = train_saes({LAYER: cfg}, {LAYER: DiskActivations(cache)}, progress=False, checkpoint=ckpt,
                         checkpoint_every=every, on_step=steps_run.append)[LAYER]
    assert steps_run[0] == 48 and steps_run[-1] == cfg.steps - 1
    assert signal.getsignal(signum) is handler_before
    assert_same_training(straight, resumed)


def test_signal_without_a_checkpoint_path_says_nothing_is_kept(activations):
    def sigterm_at_5(step: int) -> None:
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted) as info:
        train_saes({LAYER: config()}, {LAYER: DiskActivations(layout.activations_dir(LAYER, activations))},
                   progress=False, on_step=sigterm_at_5)
    assert one_line(info.value) == (
        "train: interrupted by SIGTERM at step 6; no checkpoint file was given, so nothing is kept"
    )


CLI_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DVC_NO_ANALYTICS": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "OMP_NUM_THREADS": "1"}
CLI_STEPS = 3000


def cli_workspace(folder: Path) -> Path:
    """A working folder for `attnsae train --layer 3` with the default paths: params.yaml, data/activations."""
    folder.mkdir()
    params = read_tiny_params()
    params["layers"] = [LAYER]
    params["per_layer"] = {f"L{LAYER}": {}}
    params["sae"].update(d_sae=64, batch_size=64, train_tokens=64 * CLI_STEPS, buffer_rows=512, resample_every=1000,
                         dead_window=500, resample_inputs=512, log_every=50, device="cpu")
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    write_cache(folder / "data" / "activations", sparse_rows(CACHE_ROWS))
    return folder


def attnsae_train(cwd: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, **CLI_ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.Popen(["attnsae", "train", "--layer", str(LAYER), "--no-mlflow", "--checkpoint-every", "100"],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err


def test_cli_killed_by_sigterm_says_so_in_one_line_and_the_rerun_completes_equal(tmp_path):
    work = cli_workspace(tmp_path / "killed")
    baseline = shutil.copytree(work, tmp_path / "straight")
    checkpoint = work / "checkpoints" / f"train-L{LAYER}.pt"

    process = attnsae_train(work)
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)  # mid-run: the first checkpoint (step 100) of 3000 steps exists
    code, _, err = finish(process)
    assert code != 0 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    said = re.fullmatch(rf"Error: train: interrupted by SIGTERM at step (\d+); checkpoint saved to "
                        rf"checkpoints/train-L{LAYER}\.pt; run the same command again to resume", errors[0])
    assert said, errors[0]
    step = int(said.group(1))
    assert 100 <= step < CLI_STEPS and torch.load(checkpoint, weights_only=True)["step"] == step
    assert not (work / "models").exists()

    code, out, err = finish(attnsae_train(work))
    assert code == 0, err
    assert f"resuming from checkpoints/train-L{LAYER}.pt at step {step}" in out
    assert not checkpoint.exists()
    code, _, err = finish(attnsae_train(baseline))
    assert code == 0, err
    weights = [load_file(str(root / "models" / "sae" / f"L{LAYER}" / WEIGHTS_FILE)) for root in (work, baseline)]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
