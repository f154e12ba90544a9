"""How each ``sae.architecture`` trains: its training-time activation, what it adds to the loss, the state it
keeps between steps, and the SAE it is saved as (one of autoencoder.py's kinds, which SAELens loads).

- standard (docs/design.md 3): f = ReLU(pre); loss = MSE + l1_coeff * L1. Saved as standard.
- topk (Gao et al. 2024, arXiv 2406.04093): each row keeps its k largest pre-activations (ReLU'd);
  loss = MSE + auxk_alpha * AuxK. Saved as topk with k.
- batchtopk (Bussmann et al. 2024, arXiv 2412.06410): the batch keeps its k * B largest, so rows vary around k;
  the same AuxK. At inference a single threshold replaces the batch: the EMA of the smallest kept activation.
  Saved as jumprelu with that threshold for every feature.
- jumprelu (Rajamanoharan et al. 2024, arXiv 2407.14435): f = pre * H(pre - threshold), one threshold per
  feature, learned through straight-through estimators with a rectangle kernel; loss = MSE + l0_coeff * L0.
  It trains on inputs scaled to unit mean squared norm (as the paper does, so its constants mean the same on
  any model), and the scale is folded into the saved weights. Saved as jumprelu.

AuxK (Gao et al. appendix A.2, as dictionary_learning's TopK trainer computes it): the aux_k largest
pre-activations of dead features (no firing for auxk_dead_tokens tokens) reconstruct the main residual,
detached, without b_dec; its squared error is divided by the residual's total variance.

MSE and L1 are docs/design.md 3's: summed over dimensions/features, averaged over the batch. Every step stays on the
device (no reads back to the host), so a GPU never waits on the CPU; the sparse kernel's varying-count selections
(BatchTopK, JumpReLU, standard) read their widest row's count back once per step.

Each loss runs on one of two kernels (``sae.kernel``) that compute the same function: dense, through [B, d_sae]
matrices; sparse (sparse.py), through the latents the activation keeps. A varying-count selection wider than
``SPARSE_WIDEST_SHARE`` of d_sae (JumpReLU's and ReLU's first steps, where half the latents fire) runs that step dense
when auto chose the sparse kernel (``kernel: sparse`` runs every step sparse).
"""

from __future__ import annotations

import torch

from attnsae.config import SAEConfig
from attnsae.sae import sparse
from attnsae.sae.autoencoder import SAE, SAEOutput, reconstruction_loss, row_topk
from attnsae.sae.sharding import WHOLE_BATCH, Shard

GEOMETRIC_MEDIAN_STEPS = 100  # Weiszfeld iterations for b_dec's initial value

# sae.kernel auto: the kernel whose step measured faster, per device type and architecture (bench/sparse_step.py,
# BENCHMARKS.md). CPU: the sparse step ran 2.2x to 4.3x the dense one for TopK, BatchTopK and JumpReLU at
# GPT-2 Small's and the quickstart's shapes; the standard recipe's ReLU keeps about half the latents until the L1
# penalty has acted, so it stays dense. CUDA: dense (bf16, compiled: bench/gpu.py) until the sparse step is
# measured there.
FASTER_KERNEL = {"cpu": {"standard": "dense", "topk": "sparse", "batchtopk": "sparse", "jumprelu": "sparse"}}
SPARSE_WIDEST_SHARE = 0.25  # under auto, a selection keeping more than this share of d_sae in a row runs dense


def resolve_kernel(cfg: SAEConfig, device: torch.device) -> str:
    """The kernel ``cfg`` trains with on ``device``: its ``kernel``, or for auto the one measured faster."""
    if cfg.kernel != "auto":
        return cfg.kernel
    return FASTER_KERNEL.get(device.type, {}).get(cfg.architecture, "dense")


def geometric_median(x: torch.Tensor, steps: int = GEOMETRIC_MEDIAN_STEPS) -> torch.Tensor:
    """The point minimising the summed distance to the rows of ``x`` (Weiszfeld's iteration, from the mean)."""
    median = x.mean(0)
    for _ in range(steps):
        weights = 1.0 / (x - median).norm(dim=-1).clamp_min(1e-8)
        median = (weights[:, None] * x).sum(0) / weights.sum()
    return median


def batch_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """ReLU of the k * rows largest pre-activations of the whole batch, zero elsewhere."""
    flat = pre.relu().flatten()
    top = flat.topk(min(k * pre.shape[0], flat.numel()))
    return torch.zeros_like(flat).scatter(0, top.indices, top.values).view_as(pre)


def rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """pre * H(pre - threshold). The pre-activation gets the true gradient; the threshold, whose true gradient is
    zero almost everywhere, gets the straight-through estimate -(threshold / bandwidth) * rect((pre - threshold)
    / bandwidth) (the paper's eq. 11)."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        pre, threshold = ctx.saved_tensors
        kernel = rectangle((pre - threshold) / ctx.bandwidth)
        grad_threshold = (-(threshold / ctx.bandwidth) * kernel * grad).sum(0)
        return (pre > threshold) * grad, grad_threshold, None


class StepFunction(torch.autograd.Function):
    """H(pre - threshold), whose L0 the loss counts; the threshold gets -(1 / bandwidth) * rect(...) (eq. 12)."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        pre, threshold = ctx.saved_tensors
        kernel = rectangle((pre - threshold) / ctx.bandwidth)
        return None, (-(1.0 / ctx.bandwidth) * kernel * grad).sum(0), None


def auxk_loss(sae: SAE, pre: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor, aux_k: int) -> torch.Tensor:
    """The dead features' best reconstruction of ``residual`` (detached), as a fraction of its total variance;
    0 when no feature is dead."""
    candidates = pre.relu().masked_fill(~dead, -torch.inf)
    top = candidates.topk(min(aux_k, pre.shape[-1]), dim=-1)
    values = torch.where(torch.isfinite(top.values), top.values, 0.0)  # fewer dead features than aux_k
    aux_features = torch.zeros_like(pre).scatter(-1, top.indices, values)
    error = ((aux_features @ sae.W_dec).float() - residual).pow(2).sum(-1).mean()
    variance = (residual - residual.mean(0)).pow(2).sum(-1).mean()  # a constant: the residual is detached
    return error * torch.where(variance > 0, 1 / variance, 0.0) * dead.any()


def tied_sae(d_in: int, d_sae: int, generator: torch.Generator, kind: str = "standard", k: int | None = None) -> SAE:
    """The recipe's initial decoder (unit rows), with the encoder its transpose (Gao et al. 2024)."""
    sae = SAE(d_in, d_sae, generator=generator, kind=kind, k=k)
    with torch.no_grad():
        sae.W_enc.copy_(sae.W_dec.T)
    return sae


def as_jumprelu(sae: SAE, threshold: torch.Tensor, input_scale: float = 1.0) -> SAE:
    """A jumprelu SAE on unscaled inputs computing what ``sae`` computes on inputs scaled by ``input_scale`` (c),
    with ``threshold``: pre(c x) = (x - b_dec / c) @ (c W_enc) + b_enc, and decoding to c x divides W_dec and
    b_dec by c."""
    c = input_scale
    out = SAE(sae.d_in, sae.d_sae, kind="jumprelu").to(sae.W_enc.device)
    with torch.no_grad():
        out.W_enc.copy_(sae.W_enc * c)
        out.b_enc.copy_(sae.b_enc)
        out.threshold.copy_(threshold)
        out.W_dec.copy_(sae.W_dec / c)
        out.b_dec.copy_(sae.b_dec / c)
    return out


class Objective:
    """The recipe's objective (architecture standard); the others override what differs."""

    kind = "standard"

    def __init__(self, cfg: SAEConfig, d_in: int, device: torch.device, shard: Shard = WHOLE_BATCH):
        self.cfg, self.d_in, self.device, self.shard = cfg, d_in, device, shard
        self.kernel = resolve_kernel(cfg, device)
        self.widest_sparse = cfg.d_sae if cfg.kernel == "sparse" else SPARSE_WIDEST_SHARE * cfg.d_sae
        self.input_scale = 1.0  # the training inputs are x * input_scale (jumprelu only)

    def new_sae(self, generator: torch.Generator) -> SAE:
        return SAE(self.d_in, self.cfg.d_sae, generator=generator)

    def prepare(self, sae: SAE, x: torch.Tensor) -> None:
        """Data-dependent initialisation from the first batch (the recipe has none)."""

    def scaled(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def activation(self, sae: SAE, pre: torch.Tensor) -> torch.Tensor:
        return pre.relu()

    def selection(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(idx [B, m], mask [B, m] or None): the latents ``activation`` may keep nonzero in each row."""
        return sparse.padded_selection(pre > 0)

    def reconstruct(self, sae: SAE, x: torch.Tensor, l1_coeff: float = 0.0
                    ) -> tuple[SAEOutput, torch.Tensor, torch.Tensor | None]:
        """(output, pre, centred) of ``activation`` on this objective's kernel. ``centred`` (x - b_dec, what the
        sparse backward reads) is None when the step ran dense."""
        if self.kernel == "sparse":
            centred, pre = sparse.encode(sae, x)
            idx, mask = self.selection(pre)
            if idx.shape[1] <= self.widest_sparse:
                values = sparse.SelectedPreActivations.apply(pre, centred, sae.W_enc, sae.b_enc, idx).relu()
                values = values if mask is None else values * mask
                return sparse.sparse_reconstruction_loss(sae, x, idx, values, l1_coeff), pre, centred
        pre = sae.pre_activation(x)
        return reconstruction_loss(sae, x, self.activation(sae, pre), l1_coeff), pre, None

    def loss(self, sae: SAE, x: torch.Tensor, step: int) -> SAEOutput:
        return self.reconstruct(sae, x, self.cfg.l1_coeff)[0]

    def after_step(self, sae: SAE, out: SAEOutput) -> None:
        """Bookkeeping after the optimizer step."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def inference_sae(self, sae: SAE) -> SAE:
        return sae

    def saved_as(self) -> dict:
        """sae_cfg's kind and k for the saved SAE."""
        return {"kind": self.kind, "k": None}


class TopKObjective(Objective):
    kind = "topk"

    def __init__(self, cfg: SAEConfig, d_in: int, device: torch.device, shard: Shard = WHOLE_BATCH):
        super().__init__(cfg, d_in, device, shard)
        self.aux_k = cfg.aux_k or d_in // 2  # Gao et al. B.1: half the input width
        self.tokens_since_fired = torch.zeros(cfg.d_sae, dtype=torch.long, device=device)

    def new_sae(self, generator: torch.Generator) -> SAE:
        return tied_sae(self.d_in, self.cfg.d_sae, generator, **self.saved_as())

    def prepare(self, sae: SAE, x: torch.Tensor) -> None:
        with torch.no_grad():
            sae.b_dec.copy_(geometric_median(self.scaled(x)))

    def activation(self, sae: SAE, pre: torch.Tensor) -> torch.Tensor:
        return row_topk(pre, self.cfg.k)

    def selection(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return pre.topk(min(self.cfg.k, pre.shape[-1]), dim=-1).indices, None

    def loss(self, sae: SAE, x: torch.Tensor, step: int) -> SAEOutput:
        out, pre, centred = self.reconstruct(sae, x)
        dead = self.tokens_since_fired >= self.cfg.auxk_dead_tokens
        residual = (x - out.x_hat).detach()
        aux = (auxk_loss(sae, pre, residual, dead, self.aux_k) if centred is None
               else sparse.sparse_auxk_loss(sae, pre, centred, residual, dead, self.aux_k))
        out.loss = out.mse + self.cfg.auxk_alpha * aux
        return out

    @torch.no_grad()
    def after_step(self, sae: SAE, out: SAEOutput) -> None:
        fired = self.shard.reduce((out.features.fires_per_feature() > 0).to(torch.uint8), "max").bool()  # whole batch
        self.tokens_since_fired.add_(len(out.x_hat) * self.shard.count).masked_fill_(fired, 0)

    def state_dict(self) -> dict:
        return {"tokens_since_fired": self.tokens_since_fired.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.tokens_since_fired = state["tokens_since_fired"].to(self.device)

    def saved_as(self) -> dict:
        return {"kind": "topk", "k": self.cfg.k}


class BatchTopKObjective(TopKObjective):
    def __init__(self, cfg: SAEConfig, d_in: int, device: torch.device, shard: Shard = WHOLE_BATCH):
        super().__init__(cfg, d_in, device, shard)
        # float64 as in SAELens: an EMA over thousands of steps in float32 would drift in its last digits
        self.threshold = torch.tensor(0.0, dtype=torch.float64, device=device)
        self.threshold_set = torch.tensor(False, device=device)

    def new_sae(self, generator: torch.Generator) -> SAE:
        return tied_sae(self.d_in, self.cfg.d_sae, generator)  # trains as ReLU weights; saved as jumprelu

    def activation(self, sae: SAE, pre: torch.Tensor) -> torch.Tensor:
        return batch_topk(pre, self.cfg.k)

    def selection(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return sparse.batch_topk_selection(self.cfg.k)(pre)

    @torch.no_grad()
    def after_step(self, sae: SAE, out: SAEOutput) -> None:
        super().after_step(sae, out)
        smallest = self.shard.reduce(out.features.smallest_active().double(), "min")
        found = torch.isfinite(smallest)
        rate = self.cfg.threshold_ema_rate
        # The EMA starts at the first batch's value rather than at 0 (SAELens), so a short run is not biased low.
        updated = torch.where(self.threshold_set, (1 - rate) * self.threshold + rate * smallest, smallest)
        self.threshold = torch.where(found, updated, self.threshold)
        self.threshold_set |= found

    def state_dict(self) -> dict:
        return {**super().state_dict(), "threshold": self.threshold.cpu(), "threshold_set": self.threshold_set.cpu()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.threshold = state["threshold"].to(self.device)
        self.threshold_set = state["threshold_set"].to(self.device)

    def inference_sae(self, sae: SAE) -> SAE:
        return as_jumprelu(sae, torch.full((sae.d_sae,), float(self.threshold)))

    def saved_as(self) -> dict:
        return {"kind": "jumprelu", "k": None}


class JumpReLUObjective(Objective):
    kind = "jumprelu"

    def new_sae(self, generator: torch.Generator) -> SAE:
        sae = tied_sae(self.d_in, self.cfg.d_sae, generator, kind="jumprelu")
        with torch.no_grad():
            sae.threshold.fill_(self.cfg.jumprelu_init_threshold)
        return sae

    def prepare(self, sae: SAE, x: torch.Tensor) -> None:
        """Scale inputs to unit mean squared norm, and start b_dec at their geometric median."""
        self.input_scale = float(x.double().pow(2).sum(-1).mean().rsqrt())
        with torch.no_grad():
            sae.b_dec.copy_(geometric_median(self.scaled(x)))

    def scaled(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.input_scale

    def l0_coeff(self, step: int) -> float:
        warmup = self.cfg.sparsity_warmup_steps
        return self.cfg.l0_coeff * (min(1.0, (step + 1) / warmup) if warmup else 1.0)

    def loss(self, sae: SAE, x: torch.Tensor, step: int) -> SAEOutput:
        bandwidth = self.cfg.jumprelu_bandwidth
        if self.kernel == "sparse":
            centred, pre = sparse.encode(sae, x)
            # every latent whose straight-through gradient is nonzero: above its threshold or within bandwidth / 2
            idx, mask = sparse.jumprelu_selection(sae.threshold.detach(), bandwidth)(pre)
            if idx.shape[1] <= self.widest_sparse:
                values = sparse.SelectedPreActivations.apply(pre, centred, sae.W_enc, sae.b_enc, idx)
                f, fired = sparse.SelectedJumpReLU.apply(values, sae.threshold, idx, mask, bandwidth)
                out = sparse.sparse_reconstruction_loss(sae, x, idx, f)
                out.loss = out.mse + self.l0_coeff(step) * fired.float().sum(-1).mean()
                return out
        pre = sae.pre_activation(x)
        out = reconstruction_loss(sae, x, JumpReLUFunction.apply(pre, sae.threshold, bandwidth))
        l0 = StepFunction.apply(pre, sae.threshold, bandwidth).float().sum(-1).mean()  # bf16 counts only to 256
        out.loss = out.mse + self.l0_coeff(step) * l0
        return out

    @torch.no_grad()
    def after_step(self, sae: SAE, out: SAEOutput) -> None:
        sae.threshold.clamp_(min=0.0)  # so training's pre * H(pre - t) and SAELens's ReLU(pre) * H(pre - t) agree

    def state_dict(self) -> dict:
        return {"input_scale": self.input_scale}

    def load_state_dict(self, state: dict) -> None:
        self.input_scale = float(state["input_scale"])

    def inference_sae(self, sae: SAE) -> SAE:
        return as_jumprelu(sae, sae.threshold, self.input_scale)


OBJECTIVES = {"standard": Objective, "topk": TopKObjective, "batchtopk": BatchTopKObjective,
              "jumprelu": JumpReLUObjective}


def make_objective(cfg: SAEConfig, d_in: int, device: torch.device, shard: Shard = WHOLE_BATCH) -> Objective:
    return OBJECTIVES[cfg.architecture](cfg, d_in, device, shard)
