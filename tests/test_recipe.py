"""The training recipe of docs/design.md 3, end to end through ``train_sae`` on small synthetic data.

- a planted sparse dictionary is recovered by the trained decoder (and the criterion rejects an
  untrained SAE, an unrelated dictionary and an SAE trained without the L1 penalty);
- training is bit-for-bit deterministic for a given config and seed, resampling included;
- the LR the optimizer actually steps with follows the cosine warm-up, restarted after a resample;
- features that die under a strong L1 penalty are resampled at the first check and come back.

Everything runs on the CPU with one intra-op thread: on a busy 2-core machine two threads contend
and make these tiny matmuls ~10x slower; the thread count is restored afterwards.
"""

from __future__ import annotations

import math

import pytest
import torch

import attnsae.sae.training as train_module
from attnsae.config import SAEConfig
from attnsae.sae.autoencoder import SAE
from attnsae.sae.training import TrainResult, train_sae
from helpers import PlantedDictionary

COS_THRESHOLD = 0.9
MIN_RECOVERED = 0.9


pytestmark = pytest.mark.usefixtures("one_thread")


def best_cosines(W_dec: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """For each true direction, the largest cosine similarity with any decoder row."""
    rows = W_dec.detach() / W_dec.detach().norm(dim=-1, keepdim=True)
    return (directions @ rows.T).max(dim=1).values


def recovered_fraction(W_dec: torch.Tensor, directions: torch.Tensor) -> float:
    return (best_cosines(W_dec, directions) > COS_THRESHOLD).float().mean().item()


# ---------------------------------------------------------------------------------------------------
# 1. Planted dictionary


def planted_cfg(**overrides) -> SAEConfig:
    values = {
        "d_sae": 128, "l1_coeff": 0.2, "lr": 3e-3, "batch_size": 256, "train_tokens": 256 * 1000,
        "warmup_steps": 50, "resample_every": 400, "dead_window": 200, "max_resamples": 2,
        "resample_inputs": 2048, "buffer_rows": 8192, "log_every": 100, "device": "cpu", "seed": 49,
    }
    return SAEConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def planted_run() -> tuple[PlantedDictionary, TrainResult]:
    source = PlantedDictionary(seed=0)
    return source, train_sae(planted_cfg(), source, progress=False)


def test_planted_dictionary_is_recovered(planted_run):
    source, result = planted_run
    cosines = best_cosines(result.sae.W_dec, source.directions)
    fraction = (cosines > COS_THRESHOLD).float().mean().item()
    # measured: 64/64 directions above 0.9 (min cosine ~0.94) for this config and seed
    assert fraction >= MIN_RECOVERED, f"recovered {fraction:.3f}; cosines sorted: {cosines.sort().values[:10]}"
    # a sparse code: close to the 3 planted directions per row, far from the 128 available features
    assert result.curves[-1]["l0"] < 20


def test_recovery_criterion_rejects_untrained_sae(planted_run):
    source, _ = planted_run
    untrained = SAE(source.d_in, planted_cfg().d_sae, generator=torch.Generator().manual_seed(planted_cfg().seed))
    assert recovered_fraction(untrained.W_dec, source.directions) < 0.1


def test_recovery_criterion_rejects_unrelated_dictionary(planted_run):
    _, result = planted_run
    unrelated = PlantedDictionary(seed=12345).directions
    assert recovered_fraction(result.sae.W_dec, unrelated) < 0.1


def test_without_l1_penalty_the_dictionary_is_not_recovered():
    # same data and schedule, l1_coeff 0: a dense code reconstructs well but its rows are not the atoms
    source = PlantedDictionary(seed=0)
    result = train_sae(planted_cfg(l1_coeff=0.0), source, progress=False)
    assert result.curves[-1]["explained_variance"] > 0.99
    assert recovered_fraction(result.sae.W_dec, source.directions) < 0.5


# ---------------------------------------------------------------------------------------------------
# Shared by 2-4: a short run whose strong L1 penalty kills features before the first check at step 60


def dying_cfg(**overrides) -> SAEConfig:
    values = {
        "d_sae": 64, "l1_coeff": 5.0, "lr": 1e-2, "batch_size": 128, "train_tokens": 128 * 200,
        "warmup_steps": 20, "resample_every": 60, "dead_window": 30, "max_resamples": 3,
        "resample_inputs": 1024, "buffer_rows": 4096, "log_every": 1, "device": "cpu", "seed": 7,
    }
    return SAEConfig(**{**values, **overrides})


WEIGHTS = ("W_enc", "W_dec", "b_enc", "b_dec")


# ---------------------------------------------------------------------------------------------------
# 2. Determinism


def test_training_is_bit_identical_for_the_same_config_seed_and_data():
    cfg = dying_cfg()
    first = train_sae(cfg, PlantedDictionary(seed=0), progress=False)
    second = train_sae(cfg, PlantedDictionary(seed=0), progress=False)
    assert sum(n for _, n in first.resampled) > 0, f"no feature was resampled: {first.resampled}"
    assert first.resampled == second.resampled
    for name in WEIGHTS:
        assert torch.equal(getattr(first.sae, name), getattr(second.sae, name)), name
    assert torch.equal(first.log10_density, second.log10_density)
    assert first.curves == second.curves


def test_a_different_seed_gives_different_weights():
    first = train_sae(dying_cfg(), PlantedDictionary(seed=0), progress=False)
    other = train_sae(dying_cfg(seed=8), PlantedDictionary(seed=0), progress=False)
    for name in WEIGHTS:
        assert not torch.equal(getattr(first.sae, name), getattr(other.sae, name)), name


def test_the_seed_alone_sets_the_initial_weights():
    # one step: the weights are the init plus one Adam step of at most ~0.1*lr per entry, so two
    # one-step runs on different data agree to ~2*0.1*lr when they share the seed and not otherwise
    cfg = dying_cfg(train_tokens=128)
    tolerance = 2 * 0.1 * cfg.lr * 1.01
    a = train_sae(cfg, PlantedDictionary(seed=0), progress=False).sae
    b = train_sae(cfg, PlantedDictionary(seed=1), progress=False).sae
    c = train_sae(dying_cfg(train_tokens=128, seed=8), PlantedDictionary(seed=0), progress=False).sae
    for name in ("W_enc", "W_dec"):
        assert (getattr(a, name) - getattr(b, name)).abs().max() <= tolerance, name
        assert (getattr(a, name) - getattr(c, name)).abs().max() > 0.1, name


# ---------------------------------------------------------------------------------------------------
# 3. The LR schedule as the optimizer sees it


def test_lr_schedule_applied_by_the_trainer(monkeypatch):
    applied: list[float] = []
    make_optimizer = train_module.make_optimizer

    def recording_optimizer(sae, cfg):
        optimizer = make_optimizer(sae, cfg)
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: applied.append(opt.param_groups[0]["lr"]))
        return optimizer

    monkeypatch.setattr(train_module, "make_optimizer", recording_optimizer)
    cfg = dying_cfg()
    W, base = cfg.warmup_steps, cfg.lr
    result = train_sae(cfg, PlantedDictionary(seed=0), progress=False)

    assert len(applied) == cfg.steps
    logged = {int(row["step"]): row["lr"] for row in result.curves}
    assert sorted(logged) == list(range(cfg.steps))  # log_every 1
    assert [logged[s] for s in range(cfg.steps)] == applied  # the logged LR is the one stepped with

    def exact(value: float):
        return pytest.approx(value, rel=1e-12, abs=0.0)

    assert applied[0] == exact(0.1 * base)
    assert applied[W // 2] == exact(0.55 * base)
    assert applied[W] == exact(base)
    assert applied[W - 1] < base
    assert applied[cfg.resample_every - 1] == exact(base)

    restarts = [step for step, n in result.resampled if n > 0]
    assert restarts and restarts[0] == cfg.resample_every, result.resampled
    for step, n in result.resampled:
        if n > 0:  # the warm-up starts again at the resample step itself
            assert applied[step] == exact(0.1 * base)
            if step + W < cfg.steps:
                assert applied[step + W // 2] == exact(0.55 * base)
                assert applied[step + W] == exact(base)
        else:  # a check that resampled nothing keeps the LR
            assert applied[step] == exact(base)

    # every step: cosine from 0.1*lr to lr over W steps since the last restart, then constant
    last = 0
    for step in range(cfg.steps):
        if step in restarts:
            last = step
        since = step - last
        expected = base if since >= W else base * (0.1 + 0.45 * (1.0 - math.cos(math.pi * since / W)))
        assert applied[step] == exact(expected), step


# ---------------------------------------------------------------------------------------------------
# 4. Resampling end to end


def test_dead_features_are_resampled_at_the_first_check_and_revived():
    cfg = dying_cfg()
    result = train_sae(cfg, PlantedDictionary(seed=0), progress=False)
    dead_fraction = {int(row["step"]): row["dead_fraction"] for row in result.curves}

    first_step, first_count = result.resampled[0]
    assert first_step == cfg.resample_every
    assert 0 < first_count < cfg.d_sae
    # with cutoff 1e-6 over 30*128 tokens, dead == never fired in the window, which the curves log
    # at the window's last step; every dead feature has a candidate input (1024 inputs > 64 features)
    assert first_count == round(dead_fraction[cfg.resample_every - 1] * cfg.d_sae)
    # the revived features fire again: fewer are dead at the second check than were resampled at the first
    second_step, second_count = result.resampled[1]
    assert second_step == 2 * cfg.resample_every
    assert second_count == round(dead_fraction[2 * cfg.resample_every - 1] * cfg.d_sae)
    assert second_count < first_count

    norms = result.sae.W_dec.detach().norm(dim=-1)
    # rows are normalised before each Adam step, so the final rows are off by at most one step
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-2, rtol=0.0), (norms - 1).abs().max()


def test_a_check_with_nothing_dead_leaves_the_batches_alone(monkeypatch):
    """Drawing resampling inputs moves the buffer's generator, so a check that finds no dead feature must draw
    none: otherwise every later batch differs from the recipe's (the committed quickstart SAEs would change)."""
    from attnsae.data.activations import ShuffledBuffer

    draws = []
    sample = ShuffledBuffer.sample
    monkeypatch.setattr(ShuffledBuffer, "sample", lambda self, n: draws.append(n) or sample(self, n))
    cfg = dying_cfg(l1_coeff=0.0)  # no penalty: nothing dies
    result = train_sae(cfg, PlantedDictionary(seed=0), progress=False)
    assert result.resampled == [(60, 0), (120, 0), (180, 0)] and draws == []
    draws.clear()
    dying = train_sae(dying_cfg(), PlantedDictionary(seed=0), progress=False)
    assert len(draws) == sum(1 for _, n in dying.resampled if n)  # one draw per check that revives something


def test_deterministic_switch_is_applied_and_recorded():
    """sae.deterministic turns on torch's deterministic kernels for the run; its value is in the config
    that is logged to MLflow (cfg.model_dump()) and written into cfg.json."""
    from attnsae.sae.training import use_deterministic_kernels

    source = PlantedDictionary(seed=3)
    cfg = SAEConfig(d_sae=16, l1_coeff=0.1, batch_size=64, train_tokens=64 * 3, buffer_rows=512,
                    resample_every=10, dead_window=5, warmup_steps=2, deterministic=True, device="cpu")
    try:
        train_sae(cfg, source, progress=False)
        assert torch.are_deterministic_algorithms_enabled()
        assert cfg.model_dump()["deterministic"] is True
    finally:
        use_deterministic_kernels(False)
    assert not torch.are_deterministic_algorithms_enabled()
