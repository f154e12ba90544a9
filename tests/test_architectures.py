"""The SAE architectures beyond the recipe (objectives.py): topk, batchtopk and jumprelu.

For each: the training forward, loss and gradients on hand-computed examples; a planted dictionary is
recovered; TopK and BatchTopK keep the L0 they are set to; training is deterministic and resumes bit for bit;
the saved folder round-trips exactly and its cfg.json is what SAELens's loader reads for that architecture.
(The independent evaluator's agreement with `evaluate` for every kind is in test_independent_eval.py.)

Everything runs on the CPU with one intra-op thread (see test_recipe.py).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from attnsae.config import SAEConfig
from attnsae.data.activations import DiskActivations
from attnsae.errors import UserError
from attnsae.formats.sae_cfg import sae_cfg
from attnsae.sae.autoencoder import SAE, load_sae, save_sae
from attnsae.sae.objectives import BatchTopKObjective, JumpReLUObjective, TopKObjective, geometric_median
from attnsae.sae.training import train_sae, train_saes
from helpers import PlantedDictionary

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
KERNELS = pytest.mark.parametrize("kernel", ["dense", "sparse"])  # the same numbers from either (sae.kernel)
COS_THRESHOLD = 0.9
MIN_RECOVERED = 0.9


def hand_sae(kind: str = "standard", k: int | None = None) -> SAE:
    """d_in 2, d_sae 3: W_enc = [[1, 0, 1], [0, 1, 1]], b_enc = [0, 0, -0.5], b_dec = 0, unit decoder rows."""
    sae = SAE(2, 3, kind=kind, k=k)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, 0.0, -0.5]))
        sae.b_dec.zero_()
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
    return sae


def close(tensor: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(tensor, torch.tensor(expected, dtype=tensor.dtype))


def cfg(architecture: str, **changes) -> SAEConfig:
    sparsity = {"topk": {"k": 1}, "batchtopk": {"k": 1}, "jumprelu": {"l0_coeff": 0.1}}[architecture]
    values = {"architecture": architecture, "d_sae": 3, "batch_size": 2, "train_tokens": 2, "buffer_rows": 4,
              "device": "cpu", **sparsity}
    return SAEConfig(**{**values, **changes})


# ---------------------------------------------------------------------------------------------------
# Hand-computed examples. x = [2, 1] gives pre = [2, 1, 2.5].


@KERNELS
def test_topk_forward_loss_and_gradients_by_hand(kernel):
    sae, objective = hand_sae("topk", k=1), TopKObjective(cfg("topk", kernel=kernel), 2, CPU)
    out = objective.loss(sae, torch.tensor([[2.0, 1.0]]), step=0)
    assert out.features.dense().tolist() == [[0.0, 0.0, 2.5]]  # only the largest pre-activation survives
    # x_hat = 2.5 * [0.6, 0.8] = [1.5, 2.0]; error [-0.5, 1.0]; no dead feature, so no AuxK
    assert out.x_hat.tolist() == [[1.5, 2.0]]
    assert out.loss.item() == pytest.approx(1.25)
    out.loss.backward()
    # dL/dx_hat = 2 * error = [-1, 2]; dL/df_2 = W_dec[2] . [-1, 2] = 1.0, the other features are not selected
    close(sae.W_dec.grad, [[0, 0], [0, 0], [-2.5, 5.0]])
    close(sae.b_enc.grad, [0, 0, 1.0])
    close(sae.W_enc.grad, [[0, 0, 2.0], [0, 0, 1.0]])
    close(sae.b_dec.grad, [-1 - 1.0, 2 - 1.0])  # decoder side minus encoder side


@KERNELS
def test_topk_auxiliary_loss_by_hand(kernel):
    """Feature 1 is dead: its activations [1, 3] on the two rows must reconstruct the residuals."""
    objective = TopKObjective(cfg("topk", aux_k=1, auxk_dead_tokens=10, batch_size=2, kernel=kernel), 2, CPU)
    objective.tokens_since_fired = torch.tensor([0, 10, 9])  # 10 tokens without firing: dead; 9: alive
    out = objective.loss(hand_sae("topk", k=1), torch.tensor([[2.0, 1.0], [1.0, 3.0]]), step=0)
    # rows: pre [2, 1, 2.5] and [1, 3, 3.5]; both keep feature 2; residuals [0.5, -1] and [-1.1, 0.2]
    # AuxK reconstructions (no b_dec): 1 * [0, 1] and 3 * [0, 1]; squared errors 4.25 and 9.05, mean 6.65
    # residual variance: deviations from the mean residual [-0.3, -0.4] are [0.8, -0.6] and [-0.8, 0.6]: 1.0
    assert out.mse.item() == pytest.approx(1.25)
    assert out.loss.item() == pytest.approx(1.25 + 6.65 / 32)


@KERNELS
def test_auxk_counts_tokens_since_each_feature_fired(kernel):
    objective = TopKObjective(cfg("topk", batch_size=2, kernel=kernel), 2, CPU)
    sae = hand_sae("topk", k=1)
    for _ in range(3):
        objective.after_step(sae, objective.loss(sae, torch.tensor([[2.0, 1.0], [1.0, 3.0]]), step=0))
    assert objective.tokens_since_fired.tolist() == [6, 6, 0]


@KERNELS
def test_batchtopk_selects_over_the_batch_and_sets_its_threshold(kernel):
    objective = BatchTopKObjective(cfg("batchtopk", kernel=kernel), 2, CPU)
    sae = hand_sae()
    out = objective.loss(sae, torch.tensor([[2.0, 1.0], [0.4, 0.3]]), step=0)
    # k * B = 2 of pre [[2, 1, 2.5], [0.4, 0.3, 0.2]]: both from the first row, none from the second
    assert out.features.dense().tolist() == [[2.0, 0.0, 2.5], [0.0, 0.0, 0.0]]
    # row errors: [3.5, 2.0] - [2, 1] -> 2.25 + 1; 0 - [0.4, 0.3] -> 0.25; mean 1.75
    assert out.loss.item() == pytest.approx(1.75)
    objective.after_step(sae, out)
    assert objective.threshold.item() == 2.0  # the first batch's smallest kept activation
    objective.after_step(sae, objective.loss(sae, torch.tensor([[1.0, 3.0], [2.0, 1.0]]), step=1))
    # second batch keeps 3.5 and 3: EMA 0.99 * 2 + 0.01 * 3
    assert objective.threshold.item() == pytest.approx(2.01)
    saved = objective.inference_sae(sae)
    assert saved.kind == "jumprelu" and saved.threshold.tolist() == pytest.approx([2.01] * 3)
    assert saved.encode(torch.tensor([[2.0, 1.0]])).tolist() == [[0.0, 0.0, 2.5]]  # 2 < 2.01 now drops


@KERNELS
def test_jumprelu_forward_loss_and_threshold_gradients_by_hand(kernel):
    objective = JumpReLUObjective(cfg("jumprelu", jumprelu_bandwidth=2.0, kernel=kernel), 2, CPU)
    sae = hand_sae("jumprelu")
    with torch.no_grad():
        sae.threshold.copy_(torch.tensor([1.5, 0.5, 3.0]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]))
    out = objective.loss(sae, torch.tensor([[2.0, 1.0]]), step=0)
    assert out.features.dense().tolist() == [[2.0, 1.0, 0.0]]  # 2.5 is under its threshold 3
    # x_hat = [2, 0] + [0.6, 0.8] = [2.6, 0.8]; error [0.6, -0.2]: 0.4; L0 2 at l0_coeff 0.1
    assert out.loss.item() == pytest.approx(0.4 + 0.1 * 2)
    out.loss.backward()
    # dL/df = W_dec @ [1.2, -0.4] = [1.2, 0.4, -0.4]; every (pre - t) / 2 is inside the rectangle (+/- 0.25)
    # JumpReLU: -(t / 2) * dL/df = [-0.9, -0.1, 0.6]; L0 step: 0.1 * -(1 / 2) = -0.05 each
    close(sae.threshold.grad, [-0.95, -0.15, 0.55])
    close(sae.b_enc.grad, [1.2, 0.4, 0.0])  # the true gradient where f passes


def test_jumprelu_l0_coeff_warms_up_linearly():
    objective = JumpReLUObjective(cfg("jumprelu", l0_coeff=1.0, sparsity_warmup_steps=4), 2, CPU)
    assert [objective.l0_coeff(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_jumprelu_saved_on_unscaled_inputs_computes_the_same():
    """Training sees x * c; the saved SAE on x gives the same features and x_hat / c."""
    objective = JumpReLUObjective(cfg("jumprelu"), 2, CPU)
    x = torch.tensor([[2.0, 1.0], [1.0, 3.0], [0.5, -1.0]])
    sae = hand_sae("jumprelu")
    objective.prepare(sae, x)
    c = objective.input_scale
    assert c == pytest.approx(1 / ((5 + 10 + 1.25) / 3) ** 0.5)
    with torch.no_grad():
        sae.threshold.copy_(torch.tensor([0.1, 0.3, 0.2]))
    saved = objective.inference_sae(sae)
    torch.testing.assert_close(saved.encode(x), sae.encode(x * c))
    torch.testing.assert_close(saved.reconstruct(x), sae.reconstruct(x * c) / c)


def test_geometric_median_is_where_the_unit_vectors_to_the_points_cancel():
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [100.0, 100.0]], dtype=torch.float64)
    median = geometric_median(points)
    directions = (points - median) / (points - median).norm(dim=-1, keepdim=True)
    assert directions.sum(0).norm() < 1e-6  # the optimality condition of the summed distance
    assert (0 < median).all() and (median < 1).all()  # the outlier barely moves it; the mean is [20.4, 20.4]


# ---------------------------------------------------------------------------------------------------
# Training end to end on a planted dictionary (64 unit directions in 32 dims, 3 active per row)


PLANTED = {
    "topk": {"k": 3, "lr": 3e-3, "auxk_dead_tokens": 256 * 50},
    "batchtopk": {"k": 3, "lr": 3e-3, "auxk_dead_tokens": 256 * 50},
    # measured: l0_coeff 0.003 keeps L0 ~25 and recovers nothing; 0.03 at lr 3e-3 recovers 92%
    "jumprelu": {"l0_coeff": 0.01, "lr": 1e-2, "beta1": 0.0, "beta2": 0.999, "jumprelu_init_threshold": 0.1,
                 "jumprelu_bandwidth": 0.1},
}


def planted_cfg(architecture: str, **changes) -> SAEConfig:
    values = {"architecture": architecture, "d_sae": 128, "batch_size": 256, "train_tokens": 256 * 1000,
              "warmup_steps": 50, "resample_every": 400, "dead_window": 200, "max_resamples": 0,
              "resample_inputs": 2048, "buffer_rows": 8192, "log_every": 100, "device": "cpu", "seed": 49,
              **PLANTED[architecture]}
    return SAEConfig(**{**values, **changes})


@pytest.fixture(scope="module", params=list(PLANTED))
def planted_run(request):
    source = PlantedDictionary(seed=0)
    cfg = planted_cfg(request.param)
    return cfg, source, train_sae(cfg, source, progress=False)


def test_planted_dictionary_is_recovered(planted_run):
    cfg, source, result = planted_run
    rows = result.sae.W_dec / result.sae.W_dec.norm(dim=-1, keepdim=True)
    cosines = (source.directions @ rows.T).max(dim=1).values
    fraction = (cosines > COS_THRESHOLD).float().mean().item()
    assert fraction >= MIN_RECOVERED, f"{cfg.architecture}: {fraction:.3f}; lowest {cosines.sort().values[:8]}"


def test_the_saved_sae_keeps_the_sparsity_it_was_set_to(planted_run):
    """TopK: exactly k per row (every pre-activation of the top k is positive here). BatchTopK: the saved
    threshold keeps the mean L0 within 20% of k on fresh rows. JumpReLU: near the 3 planted directions."""
    cfg, _, result = planted_run
    x = PlantedDictionary(seed=0).take(4096)
    l0 = (result.sae.encode(x) > 0).float().sum(-1)
    if cfg.architecture == "topk":
        assert l0.eq(cfg.k).all(), l0.unique()
    elif cfg.architecture == "batchtopk":
        assert l0.mean().item() == pytest.approx(cfg.k, rel=0.2)
        assert result.curves[-1]["l0"] == cfg.k  # in training the batch keeps exactly k per row on average
    else:
        assert 1.5 < l0.mean().item() < 6


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_is_deterministic_and_the_seed_matters(planted_run, precision):
    cfg, _, _ = planted_run
    short = cfg.model_copy(update={"train_tokens": 256 * 60, "precision": precision})
    first, second = (train_sae(short, PlantedDictionary(seed=0), progress=False) for _ in range(2))
    other = train_sae(short.model_copy(update={"seed": 8}), PlantedDictionary(seed=0), progress=False)
    for name, tensor in first.sae.state_dict().items():
        assert torch.equal(tensor, second.sae.state_dict()[name]), name
        assert not torch.equal(tensor, other.sae.state_dict()[name]) or name == "threshold", name
    assert first.curves == second.curves


class Killed(Exception):
    pass


@pytest.fixture()
def planted_cache(tmp_path):
    """Planted-dictionary rows in the activation cache's format (a source that checkpoints its position)."""
    from safetensors.torch import save_file

    folder = tmp_path / "L0"
    folder.mkdir()
    rows = PlantedDictionary(seed=0).take(256 * 50)
    save_file({"z": rows.to(torch.bfloat16)}, str(folder / "shard_00000.safetensors"))
    meta = {"layer": 0, "hook_name": "blocks.0.attn.hook_z", "d_in": rows.shape[1], "rows": len(rows),
            "context_size": 8, "model": "test", "model_source": "test", "dataset": "planted"}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


@pytest.mark.parametrize("architecture, precision", [(a, "fp32") for a in PLANTED] + [(a, "bf16") for a in PLANTED])
def test_killed_and_resumed_run_is_bit_identical(architecture, precision, planted_cache, tmp_path):
    """Killed mid-run and resumed from the last checkpoint; the AuxK counters, BatchTopK's threshold and
    JumpReLU's input scale come back with the weights (a short dead window makes AuxK act). In every precision
    (sae.precision): bf16 autocast is as deterministic on a CPU as fp32."""
    cfg = planted_cfg(architecture, train_tokens=256 * 40, log_every=3, precision=precision,
                      **({"auxk_dead_tokens": 256 * 2} if architecture != "jumprelu" else {}))
    straight = train_saes({0: cfg}, {0: DiskActivations(planted_cache)}, progress=False)[0]
    ckpt = tmp_path / "train.pt"

    def kill_at_23(step: int) -> None:
        if step == 23:
            raise Killed

    with pytest.raises(Killed):
        train_saes({0: cfg}, {0: DiskActivations(planted_cache)}, progress=False, checkpoint=ckpt, checkpoint_every=7,
                   on_step=kill_at_23)
    resumed = train_saes({0: cfg}, {0: DiskActivations(planted_cache)}, progress=False, checkpoint=ckpt,
                         checkpoint_every=7)[0]
    for name, tensor in straight.sae.state_dict().items():
        assert torch.equal(tensor, resumed.sae.state_dict()[name]), name
    assert straight.curves == resumed.curves


# ---------------------------------------------------------------------------------------------------
# The saved folder


def saved_cfg(kind: str, k: int | None) -> dict:
    return sae_cfg(d_in=2, d_sae=3, hook_name="blocks.0.attn.hook_z", layer=0, model_name="m", context_size=8,
                   dataset="d", kind=kind, k=k)


@pytest.mark.parametrize(("kind", "k"), [("standard", None), ("topk", 2), ("jumprelu", None)])
def test_save_load_round_trip_is_bit_exact(tmp_path, kind, k):
    sae = SAE(2, 3, generator=torch.Generator().manual_seed(0), kind=kind, k=k)
    if kind == "jumprelu":
        with torch.no_grad():
            sae.threshold.copy_(torch.tensor([0.1, 0.25, 0.3]))
    save_sae(sae, tmp_path / "sae", saved_cfg(kind, k), torch.zeros(3))
    loaded, cfg = load_sae(tmp_path / "sae")
    assert (loaded.kind, loaded.k) == (kind, k)
    assert loaded.state_dict().keys() == sae.state_dict().keys()
    for name, tensor in sae.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


@pytest.mark.parametrize(("kind", "tensor", "value"), [("jumprelu", "threshold", float("nan")),
                                                      ("standard", "W_enc", float("nan")),
                                                      ("topk", "b_enc", float("-inf"))])
def test_an_sae_with_a_non_finite_weight_is_refused_on_load(tmp_path, kind, tensor, value):
    """A NaN weight would make every metric NaN without an error (measured: evaluate wrote a bare NaN, exit 0)."""
    sae = SAE(2, 3, generator=torch.Generator().manual_seed(0), kind=kind, k=2 if kind == "topk" else None)
    with torch.no_grad():
        getattr(sae, tensor).view(-1)[1] = value
    save_sae(sae, tmp_path / "sae", saved_cfg(kind, sae.k), None)
    with pytest.raises(UserError) as err:
        load_sae(tmp_path / "sae")
    assert str(err.value) == (f"{tmp_path / 'sae' / 'sae_weights.safetensors'}: tensor '{tensor}' holds 1 non-finite "
                              f"value (NaN or inf); an SAE's weights must be finite numbers")


def test_cfg_json_is_what_saelens_reads(tmp_path):
    """SAELens 6 picks the class by 'architecture'; TopKSAEConfig reads 'k' and 'rescale_acts_by_decoder_norm'
    (False: our decoder rows are unit norm already); JumpReLUSAE needs a 'threshold' tensor [d_sae]."""
    topk = SAE(2, 3, kind="topk", k=2)
    save_sae(topk, tmp_path / "topk", saved_cfg("topk", 2), None)
    written = json.loads((tmp_path / "topk" / "cfg.json").read_text())
    assert (written["architecture"], written["k"], written["rescale_acts_by_decoder_norm"]) == ("topk", 2, False)
    assert set(load_file(tmp_path / "topk" / "sae_weights.safetensors")) == {"W_enc", "W_dec", "b_enc", "b_dec"}
    save_sae(SAE(2, 3, kind="jumprelu"), tmp_path / "jumprelu", saved_cfg("jumprelu", None), None)
    written = json.loads((tmp_path / "jumprelu" / "cfg.json").read_text())
    assert written["architecture"] == "jumprelu" and "k" not in written
    tensors = load_file(tmp_path / "jumprelu" / "sae_weights.safetensors")
    assert set(tensors) == {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"} and tensors["threshold"].shape == (3,)


def test_saelens_pre_6_topk_config_loads_as_topk(tmp_path):
    sae = SAE(2, 3, generator=torch.Generator().manual_seed(0))
    old = {**saved_cfg("standard", None), "activation_fn": "topk", "activation_fn_kwargs": {"k": 2}}
    save_sae(sae, tmp_path / "old", old, None)
    loaded, _ = load_sae(tmp_path / "old")
    assert (loaded.kind, loaded.k) == ("topk", 2)


@pytest.mark.parametrize(("change", "message"), [
    ({"k": 0}, "a topk SAE needs 'k', a positive integer, got 0"),
    ({"rescale_acts_by_decoder_norm": True}, "rescale_acts_by_decoder_norm true is not supported"),
    ({"architecture": "gated"}, "architecture 'gated' is not supported (allowed: standard, topk, jumprelu)"),
])
def test_unsupported_saved_configs_are_refused_in_one_line(tmp_path, change, message):
    from attnsae.errors import UserError

    save_sae(SAE(2, 3, kind="topk", k=2), tmp_path / "sae", {**saved_cfg("topk", 2), **change}, None)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_sae(tmp_path / "sae")


def test_a_jumprelu_folder_without_its_threshold_is_refused(tmp_path):
    from attnsae.errors import UserError

    save_sae(SAE(2, 3), tmp_path / "sae", saved_cfg("jumprelu", None), None)
    with pytest.raises(UserError, match="missing tensor 'threshold'"):
        load_sae(tmp_path / "sae")
