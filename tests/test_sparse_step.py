"""The sparse SAE step (sae/sparse.py) against the dense one: the same loss, the same gradient for every weight and
the same weights after an Adam step, in fp32 to float rounding (issue 23, item 1).

Tolerance: 1e-5 relative to each tensor's largest entry. Both paths compute each selected pre-activation with the
same dense matmul; the gradients sum the same products in another order (index_add and a sparse matmul against
dense matmuls over mostly-zero rows), so they agree to a few float32 ulps of their scale.
"""

from __future__ import annotations

import pytest
import torch

from attnsae.sae.autoencoder import SAE, reconstruction_loss, row_topk
from attnsae.sae.sparse import dense_features, selected_values, sparse_decode, topk_indices

TOL = 1e-5
SHAPES = [(16, 96, 4, 64), (32, 256, 20, 128), (8, 40, 40, 32)]  # d_in, d_sae, k, batch (the last: k = d_sae)


def random_sae(d_in: int, d_sae: int, seed: int) -> SAE:
    gen = torch.Generator().manual_seed(seed)
    sae = SAE(d_in, d_sae, generator=gen, kind="topk", k=1)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=gen)
        sae.b_dec.normal_(0, 0.1, generator=gen)
    return sae


def dense_loss(sae: SAE, x: torch.Tensor, k: int) -> torch.Tensor:
    return reconstruction_loss(sae, x, row_topk(sae.pre_activation(x), k)).mse


def sparse_loss(sae: SAE, x: torch.Tensor, k: int) -> torch.Tensor:
    _, idx, values = selected_values(sae, x, topk_indices(k))
    x_hat = sparse_decode(sae.W_dec, idx, values) + sae.b_dec
    return (x_hat - x).pow(2).sum(-1).mean()


def gradients(sae: SAE, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    sae.zero_grad()
    loss.backward()
    return {name: param.grad.clone() for name, param in sae.named_parameters()}


def assert_close_scaled(ours: torch.Tensor, reference: torch.Tensor, what: str) -> None:
    scale = reference.abs().max().clamp_min(1e-12)
    torch.testing.assert_close(ours / scale, reference / scale, atol=TOL, rtol=0, msg=what)


@pytest.mark.parametrize("d_in, d_sae, k, batch", SHAPES)
def test_sparse_topk_step_has_the_dense_loss_and_gradients(d_in, d_sae, k, batch):
    sae = random_sae(d_in, d_sae, seed=d_sae)
    x = torch.randn(batch, d_in, generator=torch.Generator().manual_seed(1))
    dense, sparse = dense_loss(sae, x, k), sparse_loss(sae, x, k)
    assert_close_scaled(sparse.detach(), dense.detach(), "loss")
    dense_grads, sparse_grads = gradients(sae, dense), gradients(sae, sparse_loss(sae, x, k))
    assert set(sparse_grads) == {"W_enc", "W_dec", "b_enc", "b_dec"}
    for name in dense_grads:
        assert dense_grads[name].abs().max() > 0, name  # every weight is trained: the comparison means something
        assert_close_scaled(sparse_grads[name], dense_grads[name], name)


def test_one_adam_step_moves_the_weights_alike():
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
    trained = []
    for loss in (dense_loss, sparse_loss):
        sae = random_sae(16, 96, seed=3)
        optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3, betas=(0.9, 0.999))
        loss(sae, x, 4).backward()
        optimizer.step()
        trained.append({name: param.detach().clone() for name, param in sae.named_parameters()})
    for name in trained[0]:
        # Adam's first step moves each weight by lr * sign(grad): equal gradients give equal weights, bar a gradient
        # within rounding of 0, whose sign may differ (none here: checked by the tolerance on every entry)
        torch.testing.assert_close(trained[1][name], trained[0][name], atol=1e-6, rtol=0, msg=name)


def test_dense_features_are_the_row_topk_activations():
    sae = random_sae(16, 96, seed=4)
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        pre, idx, values = selected_values(sae, x, topk_indices(6))
        torch.testing.assert_close(dense_features(idx, values, 96), row_topk(pre, 6), atol=0, rtol=0)


def test_the_sparse_step_is_bit_identical_run_to_run():
    runs = []
    for _ in range(2):
        sae = random_sae(32, 256, seed=6)
        x = torch.randn(128, 32, generator=torch.Generator().manual_seed(7))
        runs.append(gradients(sae, sparse_loss(sae, x, 20)))
    assert all(torch.equal(runs[0][name], runs[1][name]) for name in runs[0])


@pytest.mark.parametrize("dead_count", [0, 5, 60])  # none dead; fewer dead than aux_k; more
def test_sparse_auxk_has_the_dense_loss_and_gradients(dead_count):
    from attnsae.sae.objectives import auxk_loss
    from attnsae.sae.sparse import encode, sparse_auxk_loss

    sae = random_sae(16, 96, seed=8)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(9))
    residual = torch.randn(64, 16, generator=torch.Generator().manual_seed(10))
    dead = torch.zeros(96, dtype=torch.bool)
    dead[torch.randperm(96, generator=torch.Generator().manual_seed(11))[:dead_count]] = True
    dense = auxk_loss(sae, sae.pre_activation(x), residual, dead, aux_k=8)
    centred, pre = encode(sae, x)
    sparse = sparse_auxk_loss(sae, pre, centred, residual, dead, aux_k=8)
    assert_close_scaled(sparse.detach(), dense.detach(), "loss")
    if dead_count == 0:
        assert dense.item() == sparse.item() == 0.0
        return
    dense_grads = gradients(sae, dense)
    centred, pre = encode(sae, x)
    sparse_grads = gradients(sae, sparse_auxk_loss(sae, pre, centred, residual, dead, aux_k=8))
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert dense_grads[name].abs().max() > 0, name
        assert_close_scaled(sparse_grads[name], dense_grads[name], name)


def test_sparse_batchtopk_has_the_dense_loss_and_gradients():
    from attnsae.sae.objectives import batch_topk
    from attnsae.sae.sparse import SelectedPreActivations, batch_topk_selection, encode

    sae = random_sae(16, 96, seed=12)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(13))
    dense = reconstruction_loss(sae, x, batch_topk(sae.pre_activation(x), 5)).mse
    centred, pre = encode(sae, x)
    idx, mask = batch_topk_selection(5)(pre)
    assert len(set(mask.sum(-1).tolist())) > 1  # rows keep different counts: the padding is exercised
    values = SelectedPreActivations.apply(pre, centred, sae.W_enc, sae.b_enc, idx).relu() * mask
    sparse = (sparse_decode(sae.W_dec, idx, values) + sae.b_dec - x).pow(2).sum(-1).mean()
    assert_close_scaled(sparse.detach(), dense.detach(), "loss")
    dense_grads, sparse_grads = gradients(sae, dense), gradients(sae, sparse)
    for name in dense_grads:
        assert_close_scaled(sparse_grads[name], dense_grads[name], name)


def test_sparse_jumprelu_has_the_dense_loss_and_gradients_threshold_included():
    from attnsae.sae.objectives import JumpReLUFunction, StepFunction
    from attnsae.sae.sparse import SelectedJumpReLU, SelectedPreActivations, encode, jumprelu_selection

    bandwidth, l0_coeff = 0.2, 0.05
    sae = SAE(16, 96, generator=torch.Generator().manual_seed(14), kind="jumprelu")
    with torch.no_grad():
        sae.threshold.uniform_(0.1, 0.6, generator=torch.Generator().manual_seed(15))
        sae.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(16))
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(17))

    def dense_loss() -> torch.Tensor:
        pre = sae.pre_activation(x)
        f = JumpReLUFunction.apply(pre, sae.threshold, bandwidth)
        l0 = StepFunction.apply(pre, sae.threshold, bandwidth).sum(-1).mean()
        return reconstruction_loss(sae, x, f).mse + l0_coeff * l0

    def sparse_loss() -> torch.Tensor:
        centred, pre = encode(sae, x)
        idx, mask = jumprelu_selection(sae.threshold.detach(), bandwidth)(pre)
        values = SelectedPreActivations.apply(pre, centred, sae.W_enc, sae.b_enc, idx)
        f, step = SelectedJumpReLU.apply(values, sae.threshold, idx, mask, bandwidth)
        return (sparse_decode(sae.W_dec, idx, f) + sae.b_dec - x).pow(2).sum(-1).mean() + l0_coeff * step.sum(-1).mean()

    assert_close_scaled(sparse_loss().detach(), dense_loss().detach(), "loss")
    dense_grads, sparse_grads = gradients(sae, dense_loss()), gradients(sae, sparse_loss())
    assert set(sparse_grads) == {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}
    for name in dense_grads:
        assert dense_grads[name].abs().max() > 0, name
        assert_close_scaled(sparse_grads[name], dense_grads[name], name)


# ---------------------------------------------------------------------------------------------------
# Through training (objectives.py, sae.kernel): one LayerTrainer step, decoder projection and Adam included


ARCHITECTURES = {"standard": {"l1_coeff": 0.01}, "topk": {"k": 3, "auxk_dead_tokens": 256},
                 "batchtopk": {"k": 3, "auxk_dead_tokens": 256},
                 "jumprelu": {"l0_coeff": 0.01, "jumprelu_init_threshold": 0.1, "jumprelu_bandwidth": 0.1}}


def trainer_cfg(architecture: str, kernel: str):
    from attnsae.config import SAEConfig

    return SAEConfig(architecture=architecture, d_sae=128, batch_size=256, train_tokens=256 * 10, warmup_steps=0,
                     resample_every=400, dead_window=200, max_resamples=0, resample_inputs=2048, buffer_rows=512,
                     log_every=1, device="cpu", kernel=kernel, lr=3e-3, **ARCHITECTURES[architecture])


class FixedBatches:
    """A buffer serving the same planted-dictionary batches to every trainer."""

    def __init__(self, steps: int):
        from helpers import PlantedDictionary

        self.batches = [PlantedDictionary(seed=0).take(256) for _ in range(steps)]
        self.served = 0

    def next_batch(self) -> torch.Tensor:
        self.served += 1
        return self.batches[self.served - 1]


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_a_training_step_on_the_sparse_kernel_is_the_dense_step(architecture):
    """Loss, L0 and the weights after a step (Adam moves each by about lr) agree to 1e-6 absolute over the first
    steps, AuxK acting (its dead window is one batch) and JumpReLU's L0 term included; the sparse kernel really ran."""
    from attnsae.sae.sparse import SparseFeatures
    from attnsae.sae.training import LayerTrainer

    steps, trained = 3, {}
    for kernel in ("dense", "sparse"):
        trainer, batches = LayerTrainer(trainer_cfg(architecture, kernel), 32, torch.device("cpu")), FixedBatches(3)
        outputs = []
        original = trainer.loss
        trainer.loss = lambda *args, outputs=outputs, original=original: outputs.append(original(*args)) or outputs[-1]
        rows = [trainer.step(step, batches) for step in range(steps)]
        assert {type(out.features).__name__ for out in outputs} == (
            {"DenseFeatures"} if kernel == "dense" else {SparseFeatures.__name__})
        trained[kernel] = rows, {name: p.detach().clone() for name, p in trainer.sae.named_parameters()}
    (dense_rows, dense_weights), (sparse_rows, sparse_weights) = trained["dense"], trained["sparse"]
    for dense_row, sparse_row in zip(dense_rows, sparse_rows):
        for key in ("loss", "mse", "l1", "l0", "dead_fraction"):
            assert sparse_row[key] == pytest.approx(dense_row[key], rel=1e-5, abs=1e-6), key
    for name in dense_weights:
        torch.testing.assert_close(sparse_weights[name], dense_weights[name], atol=1e-6, rtol=0, msg=name)


def test_auto_picks_the_kernel_measured_faster_and_cfg_json_records_it():
    from attnsae.sae.objectives import FASTER_KERNEL, resolve_kernel
    from attnsae.sae.training import trained_recipe

    cpu = torch.device("cpu")
    for architecture in ARCHITECTURES:
        assert resolve_kernel(trainer_cfg(architecture, "auto"), cpu) == FASTER_KERNEL["cpu"][architecture]
        assert resolve_kernel(trainer_cfg(architecture, "dense"), cpu) == "dense"
    assert resolve_kernel(trainer_cfg("topk", "auto"), torch.device("cuda")) == "dense"  # not measured there yet
    assert trained_recipe(trainer_cfg("topk", "auto"))["kernel"] == "sparse"
