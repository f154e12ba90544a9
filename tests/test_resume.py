"""Checkpoints: a killed run resumed from its last checkpoint ends bit-for-bit equal to an uninterrupted one."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from attnsae.config import SAEConfig
from attnsae.data.activations import DiskActivations
from attnsae.sae.training import train_saes

D_IN = 16


class Killed(Exception):
    pass


@pytest.fixture()
def cache(tmp_path):
    """A layer cache on disk (the format the activations stage writes) holding sparse-ish random rows."""
    gen = torch.Generator().manual_seed(0)
    folder = tmp_path / "L0"
    folder.mkdir()
    rows = (torch.randn(3000, D_IN, generator=gen) * (torch.rand(3000, D_IN, generator=gen) < 0.3)).to(torch.bfloat16)
    save_file({"z": rows}, str(folder / "shard_00000.safetensors"))
    meta = {"layer": 0, "hook_name": "blocks.0.attn.hook_z", "d_in": D_IN, "rows": 3000, "context_size": 8,
            "model": "test", "model_source": "test", "dataset": "random rows"}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def config(**changes) -> SAEConfig:
    base = dict(d_sae=128, l1_coeff=10.0, lr=3e-2, batch_size=128, train_tokens=128 * 60, warmup_steps=5,
                resample_every=20, dead_window=10, max_resamples=2, resample_inputs=512, buffer_rows=1024,
                log_every=3, device="cpu")
    return SAEConfig(**{**base, **changes})


def weights(result) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in result.sae.state_dict().items()}


def test_killed_and_resumed_run_is_bit_identical(cache, tmp_path):
    cfg = config()
    straight = train_saes({0: cfg}, {0: DiskActivations(cache)}, progress=False)[0]
    assert any(n for _, n in straight.resampled), "the run should resample so the resume covers that state"

    ckpt = tmp_path / "ckpt" / "train.pt"

    def kill_at_47(step: int) -> None:  # after the resample at step 40
        if step == 47:
            raise Killed

    with pytest.raises(Killed):
        train_saes({0: cfg}, {0: DiskActivations(cache)}, progress=False, checkpoint=ckpt, checkpoint_every=7,
                   on_step=kill_at_47)
    assert torch.load(ckpt, weights_only=True)["step"] == 42  # the last multiple of 7 before the kill
    assert not list(ckpt.parent.glob("*.tmp"))

    steps_run = []
    resumed = train_saes({0: cfg}, {0: DiskActivations(cache)}, progress=False, checkpoint=ckpt, checkpoint_every=7,
                         on_step=steps_run.append)[0]
    assert steps_run[0] == 42 and steps_run[-1] == cfg.steps - 1
    for name, tensor in weights(straight).items():
        assert torch.equal(tensor, weights(resumed)[name]), name
    assert torch.equal(straight.log10_density, resumed.log10_density)
    assert straight.curves == resumed.curves
    assert straight.resampled == resumed.resampled


def test_checkpoint_of_another_config_is_not_resumed(cache, tmp_path):
    ckpt = tmp_path / "train.pt"

    def kill_at_15(step: int) -> None:
        if step == 15:
            raise Killed

    with pytest.raises(Killed):
        train_saes({0: config()}, {0: DiskActivations(cache)}, progress=False, checkpoint=ckpt, checkpoint_every=7,
                   on_step=kill_at_15)
    steps_run = []
    other = config(l1_coeff=9.0)
    train_saes({0: other}, {0: DiskActivations(cache)}, progress=False, checkpoint=ckpt, checkpoint_every=7,
               on_step=steps_run.append)
    assert steps_run[0] == 0
