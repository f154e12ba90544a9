"""The SAE of docs/design.md 3: loss, decoder constraint, init, LR schedule, resampling, folder format."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from attnsae.config import SAEConfig
from attnsae.errors import UserError
from attnsae.formats.sae_cfg import CFG_FILE, SPARSITY_FILE, WEIGHTS_FILE, sae_cfg
from attnsae.sae.autoencoder import SAE, load_log10_density, load_sae, save_sae
from attnsae.sae.training import (
    RESAMPLE_ENCODER_SCALE,
    cosine_warmup_lr,
    dead_features,
    is_check_step,
    make_optimizer,
    resample_dead,
    train_sae,
    window_starts_at,
)


def set_weights(sae: SAE, **values: list) -> SAE:
    with torch.no_grad():
        for name, value in values.items():
            getattr(sae, name).copy_(torch.tensor(value, dtype=torch.float32))
    return sae


def hand_sae() -> SAE:
    """d_in 2, d_sae 3, weights chosen so every number below can be checked on paper."""
    return set_weights(
        SAE(2, 3),
        W_enc=[[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]],
        b_enc=[0.0, -0.5, 0.0],
        W_dec=[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]],
        b_dec=[0.5, 0.0],
    )


# ---------------------------------------------------------------------------------------------------
# Loss


def test_loss_matches_hand_computation():
    # x1 = [1.5, 1]: x - b_dec = [1, 1]; pre = [1, 1, 0] + b_enc = [1, .5, 0]; f = [1, .5, 0]
    #   x_hat = [1, 0] + [0, .5] + b_dec = [1.5, .5]; squared error 0.25; sum f = 1.5
    # x2 = [.5, 2]: x - b_dec = [0, 2]; pre = [0, 2, 2] + b_enc = [0, 1.5, 2]; f = [0, 1.5, 2]
    #   x_hat = [0, 1.5] + [2, 2] + b_dec = [2.5, 3.5]; squared error 4 + 2.25 = 6.25; sum f = 3.5
    # mse = (0.25 + 6.25) / 2 = 3.25; l1 = (1.5 + 3.5) / 2 = 2.5; loss = 3.25 + 0.1 * 2.5 = 3.5
    sae = hand_sae()
    x = torch.tensor([[1.5, 1.0], [0.5, 2.0]])
    out = sae(x, l1_coeff=0.1)
    assert torch.equal(out.features.dense(), torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.5, 2.0]]))
    assert torch.allclose(out.x_hat, torch.tensor([[1.5, 0.5], [2.5, 3.5]]))
    assert out.mse.item() == pytest.approx(3.25)
    assert out.l1.item() == pytest.approx(2.5)
    assert out.loss.item() == pytest.approx(3.5)
    assert torch.equal(sae.reconstruct(x), out.x_hat)


def test_loss_is_mean_over_batch_not_over_elements():
    sae = hand_sae()
    x = torch.tensor([[1.5, 1.0], [0.5, 2.0]])
    doubled = sae(torch.cat([x, x]), l1_coeff=0.1)
    assert doubled.loss.item() == pytest.approx(3.5)  # the same rows twice: the same mean
    assert sae(x).loss.item() == pytest.approx(3.25)  # default l1_coeff 0


# ---------------------------------------------------------------------------------------------------
# Decoder constraint


def test_decoder_unit_norm_and_gradient_projection_known_example():
    sae = SAE(2, 2)
    set_weights(sae, W_dec=[[3.0, 4.0], [0.0, 2.0]])
    sae.W_dec.grad = torch.tensor([[1.0, 1.0], [5.0, -1.0]])
    sae.make_decoder_unit_norm_and_project_grad()
    # rows: [3,4]/5 = [.6,.8]; [0,2]/2 = [0,1]
    assert torch.allclose(sae.W_dec.data, torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    # grad row 0: [1,1] - 1.4 * [.6,.8] = [.16, -.12]; row 1: [5,-1] - (-1) * [0,1] = [5, 0]
    assert torch.allclose(sae.W_dec.grad, torch.tensor([[0.16, -0.12], [5.0, 0.0]]), atol=1e-6)


def test_decoder_projection_random():
    gen = torch.Generator().manual_seed(0)
    sae = SAE(5, 7, generator=gen)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(7, 1, generator=gen) * 3 + 0.5)  # rows no longer unit norm
    grad = torch.randn(7, 5, generator=gen)
    sae.W_dec.grad = grad.clone()
    sae.make_decoder_unit_norm_and_project_grad()
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(7), atol=1e-6)
    assert torch.allclose((sae.W_dec.grad * sae.W_dec).sum(-1), torch.zeros(7), atol=1e-5)
    # only the parallel component was removed: the orthogonal part of the old gradient is kept
    unit = sae.W_dec.data
    expected = grad - (grad * unit).sum(-1, keepdim=True) * unit
    assert torch.allclose(sae.W_dec.grad, expected, atol=1e-6)


def test_decoder_normalisation_without_gradient():
    sae = SAE(2, 1)
    set_weights(sae, W_dec=[[0.0, -3.0]])
    sae.make_decoder_unit_norm_and_project_grad()
    assert sae.W_dec.grad is None
    assert torch.equal(sae.W_dec.data, torch.tensor([[0.0, -1.0]]))


# ---------------------------------------------------------------------------------------------------
# Init


def test_init_unit_decoder_rows_zero_biases():
    sae = SAE(16, 48, generator=torch.Generator().manual_seed(1))
    assert sae.W_enc.shape == (16, 48) and sae.W_dec.shape == (48, 16)
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(48), atol=1e-6)
    assert torch.equal(sae.b_enc.data, torch.zeros(48))
    assert torch.equal(sae.b_dec.data, torch.zeros(16))
    # Kaiming-uniform: bounded by sqrt(6 / fan_in) (torch's fan_in of a [16, 48] tensor is 48), not constant
    assert sae.W_enc.abs().max() <= math.sqrt(6 / 48) + 1e-6
    assert sae.W_enc.std() > 0.1 * math.sqrt(6 / 48)


def test_init_deterministic_with_seeded_generator():
    torch.manual_seed(123)
    a = SAE(8, 24, generator=torch.Generator().manual_seed(49))
    torch.manual_seed(456)  # the global RNG must not matter when a generator is given
    b = SAE(8, 24, generator=torch.Generator().manual_seed(49))
    c = SAE(8, 24, generator=torch.Generator().manual_seed(50))
    for name in ("W_enc", "W_dec"):
        assert torch.equal(getattr(a, name), getattr(b, name))
        assert not torch.equal(getattr(a, name), getattr(c, name))


# ---------------------------------------------------------------------------------------------------
# LR schedule


@pytest.mark.parametrize(("step", "fraction"), [(0, 0.1), (500, 0.55), (1000, 1.0), (2000, 1.0), (250, None)])
def test_cosine_warmup_lr(step, fraction):
    lr = 1.2e-3
    if fraction is None:  # a quarter of the way: 0.1 + 0.9 * 0.5 * (1 - cos(pi/4))
        fraction = 0.1 + 0.45 * (1 - math.cos(math.pi / 4))
    assert cosine_warmup_lr(step, lr, 1000) == pytest.approx(fraction * lr, rel=1e-12)


def test_cosine_warmup_lr_monotone_and_no_warmup():
    values = [cosine_warmup_lr(s, 1.0, 100) for s in range(0, 120)]
    assert all(a < b for a, b in zip(values[:100], values[1:101]))
    assert values[100:] == [1.0] * 20
    assert cosine_warmup_lr(0, 1.0, 0) == 1.0


class RandomRows:
    """An endless in-memory RowSource."""

    def __init__(self, d_in: int, seed: int):
        self.d_in = d_in
        self.gen = torch.Generator().manual_seed(seed)

    def take(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.d_in, generator=self.gen) + 0.5


def tiny_train_cfg(**overrides) -> SAEConfig:
    values = dict(
        d_sae=8, l1_coeff=0.01, batch_size=8, train_tokens=8 * 31, warmup_steps=4, resample_every=10, dead_window=5,
        max_resamples=2, resample_inputs=64, buffer_rows=64, log_every=1, device="cpu", seed=3,
    )
    values.update(overrides)
    return SAEConfig(**values)


def test_warmup_restarts_after_each_resample():
    # cutoff 1.0: every feature counts as dead at every check, so checks at 10 and 20 resample (not 30: max 2)
    cfg = tiny_train_cfg(dead_cutoff=1.0)
    result = train_sae(cfg, RandomRows(4, seed=0), progress=False)
    assert result.resampled == [(10, 8), (20, 8)]
    lr = {row["step"]: row["lr"] for row in result.curves}
    base = cfg.lr
    for start in (0, 10, 20):
        assert lr[start] == pytest.approx(0.1 * base)
        assert lr[start + 2] == pytest.approx(0.55 * base)
        assert lr[start + 4] == pytest.approx(base)
        assert lr[start + 9] == pytest.approx(base)
    assert lr[30] == pytest.approx(base)  # no fourth warm-up


def test_warmup_not_restarted_without_dead_features():
    cfg = tiny_train_cfg(dead_cutoff=0.0, l1_coeff=0.0)
    result = train_sae(cfg, RandomRows(4, seed=0), progress=False)
    # a check at which no feature is dead records 0 and keeps the LR constant
    assert all(n == 0 for _, n in result.resampled)
    assert all(row["lr"] == pytest.approx(cfg.lr) for row in result.curves if row["step"] >= 4)


# ---------------------------------------------------------------------------------------------------
# Dead features and resampling


def test_dead_features_frequency_cutoff_inclusive():
    counts = torch.tensor([0.0, 1.0, 5.0, 100.0])
    assert dead_features(counts, 1000, 1e-3).tolist() == [True, True, False, False]
    assert dead_features(counts, 1000, 0.0).tolist() == [True, False, False, False]
    assert dead_features(counts, 0, 1e-6).tolist() == [True, False, False, False]


def trained_sae_and_adam(d_in=4, d_sae=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sae = SAE(d_in, d_sae, generator=gen)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(d_in, generator=gen))
        sae.b_enc.copy_(torch.rand(d_sae, generator=gen) + 0.1)
    cfg = SAEConfig(d_sae=d_sae, l1_coeff=0.1, train_tokens=4096)  # only the optimizer settings matter here
    optimizer = make_optimizer(sae, cfg)
    for _ in range(3):  # a few steps so every Adam moment is non-zero
        out = sae(torch.randn(32, d_in, generator=gen) * 2, 0.1)
        out.loss.backward()
        sae.make_decoder_unit_norm_and_project_grad()
        optimizer.step()
        optimizer.zero_grad()
    return sae, optimizer


def snapshot(sae, optimizer):
    params = {n: p.detach().clone() for n, p in sae.named_parameters()}
    moments = {
        n: {m: optimizer.state[p][m].clone() for m in ("exp_avg", "exp_avg_sq")} for n, p in sae.named_parameters()
    }
    return params, moments


def test_resample_dead_sets_weights_biases_and_adam_moments():
    sae, optimizer = trained_sae_and_adam()
    before, moments_before = snapshot(sae, optimizer)
    dead = torch.tensor([False, True, False, True, False, False])
    alive = ~dead
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(50, 4, generator=gen) * 3
    alive_norm = before["W_enc"][:, alive].norm(dim=0).mean()

    n = resample_dead(sae, optimizer, dead, inputs, torch.Generator().manual_seed(7))
    assert n == 2

    candidates = inputs - before["b_dec"]
    candidates = candidates / candidates.norm(dim=-1, keepdim=True)
    chosen = []
    for f in (1, 3):
        row = sae.W_dec[f].detach()
        assert row.norm().item() == pytest.approx(1.0, abs=1e-6)
        matches = [i for i in range(len(inputs)) if torch.allclose(row, candidates[i], atol=1e-6)]
        assert len(matches) == 1, "decoder row must be a normalised (x - b_dec) of one of the inputs"
        chosen.append(matches[0])
        assert torch.allclose(sae.W_enc[:, f], row * RESAMPLE_ENCODER_SCALE * alive_norm, atol=1e-6)
        assert sae.b_enc[f].item() == 0.0
    assert chosen[0] != chosen[1]  # without replacement

    # alive features and the biases that are not resampled are untouched
    assert torch.equal(sae.W_dec[alive], before["W_dec"][alive])
    assert torch.equal(sae.W_enc[:, alive], before["W_enc"][:, alive])
    assert torch.equal(sae.b_enc[alive], before["b_enc"][alive])
    assert torch.equal(sae.b_dec, before["b_dec"])

    for moment in ("exp_avg", "exp_avg_sq"):
        state = {n: optimizer.state[p][moment] for n, p in sae.named_parameters()}
        old = {n: moments_before[n][moment] for n in moments_before}
        assert torch.all(state["W_enc"][:, dead] == 0) and torch.all(state["W_dec"][dead] == 0)
        assert torch.all(state["b_enc"][dead] == 0)
        assert torch.equal(state["W_enc"][:, alive], old["W_enc"][:, alive])
        assert torch.equal(state["W_dec"][alive], old["W_dec"][alive])
        assert torch.equal(state["b_enc"][alive], old["b_enc"][alive])
        assert torch.equal(state["b_dec"], old["b_dec"])
        assert torch.all(old["W_enc"][:, alive] != 0)  # the check above is not vacuous


def test_resample_dead_single_candidate_gives_exactly_that_input():
    sae, optimizer = trained_sae_and_adam()
    with torch.no_grad():
        sae.b_enc.zero_()  # x = b_dec -> f = 0 -> x_hat = b_dec = x: zero error, zero probability
    b_dec = sae.b_dec.detach().clone()
    inputs = b_dec.repeat(20, 1)
    special = b_dec + torch.tensor([3.0, 0.0, -4.0, 0.0])
    inputs[13] = special
    dead = torch.zeros(6, dtype=torch.bool)
    dead[2] = True
    for seed in range(5):
        n = resample_dead(sae, optimizer, dead, inputs, torch.Generator().manual_seed(seed))
        assert n == 1
        assert torch.allclose(sae.W_dec[2], torch.tensor([0.6, 0.0, -0.8, 0.0]), atol=1e-7)


def test_resample_dead_more_dead_than_candidates_revives_only_as_many():
    sae, optimizer = trained_sae_and_adam()
    with torch.no_grad():
        sae.b_enc.zero_()
    before = sae.W_dec.detach().clone()
    inputs = sae.b_dec.detach().repeat(10, 1)
    inputs[4] += torch.tensor([0.0, 2.0, 0.0, 0.0])
    dead = torch.tensor([False, True, True, True, False, False])
    n = resample_dead(sae, optimizer, dead, inputs, torch.Generator().manual_seed(0))
    assert n == 1
    assert torch.allclose(sae.W_dec[1], torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert torch.equal(sae.W_dec[2:4], before[2:4])


def test_resample_dead_nothing_dead():
    sae, optimizer = trained_sae_and_adam()
    before, _ = snapshot(sae, optimizer)
    n = resample_dead(sae, optimizer, torch.zeros(6, dtype=torch.bool), torch.randn(10, 4), torch.Generator())
    assert n == 0
    assert torch.equal(sae.W_dec, before["W_dec"])


# ---------------------------------------------------------------------------------------------------
# Check schedule for the recipe's numbers


def test_checks_and_windows_for_the_default_recipe():
    cfg = SAEConfig(d_sae=24576, l1_coeff=1.0, train_tokens=4096 * 488_281)
    assert (cfg.resample_every, cfg.max_resamples, cfg.dead_window) == (25000, 4, 12500)
    checks = [s for s in range(0, cfg.steps) if is_check_step(s, cfg)]
    assert checks == [25000, 50000, 75000, 100000]
    starts = [s for s in range(0, 100001) if window_starts_at(s, cfg)]
    assert starts == [12500, 37500, 62500, 87500]
    for check in checks:  # each check looks at exactly the last 12,500 steps
        assert max(s for s in starts if s < check) == check - 12500


# ---------------------------------------------------------------------------------------------------
# Folder format


def example_cfg(d_in=4, d_sae=6) -> dict:
    return sae_cfg(
        d_in=d_in, d_sae=d_sae, hook_name="blocks.1.attn.hook_z", layer=1, model_name="tiny", context_size=16,
        dataset="synthetic", extra={"attnsae": {"note": "test"}},
    )


def test_save_load_round_trip(tmp_path):
    sae, _ = trained_sae_and_adam()
    density = torch.tensor([-1.0, -2.5, -10.0, 0.0, -3.0, -4.0])
    folder = tmp_path / "sae"
    save_sae(sae, folder, example_cfg(), density)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]  # no temporary folders left behind
    assert sorted(p.name for p in folder.iterdir()) == sorted([CFG_FILE, WEIGHTS_FILE, SPARSITY_FILE])

    loaded, cfg = load_sae(folder)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(loaded, name), getattr(sae, name))
    assert cfg == example_cfg()
    assert cfg["reshape_activations"] == "hook_z" and cfg["d_in"] == 4 and cfg["d_sae"] == 6
    assert torch.equal(load_log10_density(folder), density)
    x = torch.randn(5, 4)
    assert torch.equal(loaded.reconstruct(x), sae.reconstruct(x))


def test_save_replaces_existing_folder(tmp_path):
    folder = tmp_path / "sae"
    save_sae(SAE(4, 6), folder, example_cfg(), torch.zeros(6))
    second = SAE(4, 8, generator=torch.Generator().manual_seed(3))
    save_sae(second, folder, example_cfg(d_sae=8), torch.zeros(8))
    loaded, cfg = load_sae(folder)
    assert cfg["d_sae"] == 8 and torch.equal(loaded.W_enc, second.W_enc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


@pytest.fixture
def saved(tmp_path):
    folder = tmp_path / "sae"
    save_sae(SAE(4, 6, generator=torch.Generator().manual_seed(0)), folder, example_cfg(), torch.zeros(6))
    return folder


def test_load_missing_cfg(saved):
    (saved / CFG_FILE).unlink()
    with pytest.raises(UserError, match="not an SAE folder"):
        load_sae(saved)


def test_load_not_a_folder(tmp_path):
    with pytest.raises(UserError, match=CFG_FILE):
        load_sae(tmp_path / "nothing")


def test_load_bad_json(saved):
    (saved / CFG_FILE).write_text('{"d_in": 4, "d_sae": ')
    with pytest.raises(UserError, match="corrupt JSON"):
        load_sae(saved)


def test_load_cfg_dims_not_integers(saved):
    (saved / CFG_FILE).write_text(json.dumps({**example_cfg(), "d_sae": "6"}))
    with pytest.raises(UserError, match="d_sae"):
        load_sae(saved)


def test_load_cfg_not_an_object(saved):
    (saved / CFG_FILE).write_text("[4, 6]\n")
    with pytest.raises(UserError):
        load_sae(saved)


def test_load_cfg_disagrees_with_tensor_shape(saved):
    (saved / CFG_FILE).write_text(json.dumps({**example_cfg(), "d_sae": 7}))
    with pytest.raises(UserError, match=r"tensor 'W_enc' has shape \(4, 6\), cfg.json says \(4, 7\)"):
        load_sae(saved)


def test_load_wrong_tensor_shape(saved):
    state = load_file(str(saved / WEIGHTS_FILE))
    state["b_dec"] = torch.zeros(5)
    save_file(state, str(saved / WEIGHTS_FILE))
    with pytest.raises(UserError, match="b_dec"):
        load_sae(saved)


def test_load_missing_tensor(saved):
    state = load_file(str(saved / WEIGHTS_FILE))
    del state["b_enc"]
    save_file(state, str(saved / WEIGHTS_FILE))
    with pytest.raises(UserError, match="missing tensor 'b_enc'"):
        load_sae(saved)


def test_load_truncated_safetensors(saved):
    path = saved / WEIGHTS_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt safetensors"):
        load_sae(saved)


def test_load_missing_weights(saved):
    (saved / WEIGHTS_FILE).unlink()
    with pytest.raises(UserError, match=f"missing {WEIGHTS_FILE}"):
        load_sae(saved)
