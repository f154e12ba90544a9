"""The sparse autoencoder and its weights on disk (SAELens's folder layout; its cfg.json: formats/sae_cfg.py).

Every SAE encodes the same pre-activation and decodes the same way; the activation function is what
its ``kind`` (SAELens's inference ``architecture``) names:

    pre   = (x - b_dec) @ W_enc + b_enc
    f     = ReLU(pre)                          standard (the recipe of docs/design.md 3)
          = ReLU(pre) on each row's k largest  topk
          = ReLU(pre) * (pre > threshold)      jumprelu (threshold per feature)
    x_hat = f @ W_dec + b_dec

The recipe's loss is mean_batch(sum_dims((x_hat - x)^2)) + l1_coeff * mean_batch(sum_features(f)); the
other architectures' training (BatchTopK, JumpReLU's straight-through threshold) lives in objectives.py,
and each saves as one of these kinds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnsae.errors import UserError
from attnsae.files import atomic_dir, read_safetensors, write_safetensors
from attnsae.formats.sae_cfg import (
    CFG_FILE,
    KINDS,
    SCALING_TENSORS,
    SPARSITY_FILE,
    WEIGHTS_FILE,
    cfg_value,
    read_sae_cfg,
)

WEIGHT_SHAPES = {"W_enc": ("d_in", "d_sae"), "W_dec": ("d_sae", "d_in"), "b_enc": ("d_sae",), "b_dec": ("d_in",)}
THRESHOLD = "threshold"  # jumprelu's extra tensor [d_sae]


@dataclass
class DenseFeatures:
    """A batch's feature activations as a [B, d_sae] matrix (sparse.SparseFeatures: the same, as the kept latents)."""

    f: torch.Tensor

    def fires_per_feature(self) -> torch.Tensor:
        """[d_sae]: how many rows each feature fired on (as floats)."""
        return (self.f > 0).sum(0).float()

    def fires_per_row(self) -> torch.Tensor:
        """[B]: how many features fired on each row, its L0 (as floats)."""
        return (self.f > 0).sum(-1).float()

    def smallest_active(self) -> torch.Tensor:
        """The smallest positive activation in the batch (inf when none fired)."""
        return torch.where(self.f > 0, self.f, torch.inf).min()

    def dense(self) -> torch.Tensor:
        return self.f


@dataclass
class SAEOutput:
    x_hat: torch.Tensor
    features: DenseFeatures  # or sparse.SparseFeatures
    mse: torch.Tensor  # mean over batch of the summed squared error
    l1: torch.Tensor  # mean over batch of the summed feature activations
    loss: torch.Tensor


def row_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """ReLU of each row's k largest pre-activations, zero elsewhere (SAELens's TopK activation)."""
    top = pre.topk(min(k, pre.shape[-1]), dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())


class SAE(nn.Module):
    def __init__(self, d_in: int, d_sae: int, generator: torch.Generator | None = None, kind: str = "standard",
                 k: int | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r} is not one of {KINDS}")
        if (kind == "topk") != (k is not None):
            raise ValueError("k is given exactly when kind is topk")
        self.d_in, self.d_sae, self.kind, self.k = d_in, d_sae, kind, k
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        if kind == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(d_sae))
        nn.init.kaiming_uniform_(self.W_enc, generator=generator)
        nn.init.kaiming_uniform_(self.W_dec, generator=generator)
        with torch.no_grad():
            self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True)

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        if self.kind == "topk":
            return row_topk(pre, self.k)
        if self.kind == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold)
        return torch.relu(pre)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.pre_activation(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor, l1_coeff: float = 0.0) -> SAEOutput:
        f = self.encode(x)
        return reconstruction_loss(self, x, f, l1_coeff)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @torch.no_grad()
    def make_decoder_unit_norm_and_project_grad(self) -> None:
        """Before the optimizer step: drop the gradient component along each W_dec row, set rows to unit norm.

        Removing the parallel component keeps Adam from spending its step on changing the row norm,
        which the normalisation would undo anyway.
        """
        unit = self.W_dec / self.W_dec.norm(dim=-1, keepdim=True)
        if self.W_dec.grad is not None:
            parallel = (self.W_dec.grad * unit).sum(-1, keepdim=True)
            self.W_dec.grad -= parallel * unit
        self.W_dec.copy_(unit)


def reconstruction_loss(sae: SAE, x: torch.Tensor, f: torch.Tensor, l1_coeff: float = 0.0) -> SAEOutput:
    """Decode ``f`` and score it: summed squared error and L1, each a mean over the batch."""
    return scored(x, sae.decode(f), DenseFeatures(f), f, l1_coeff)


def scored(x: torch.Tensor, x_hat: torch.Tensor, features, active: torch.Tensor, l1_coeff: float) -> SAEOutput:
    """The output for reconstruction ``x_hat`` of ``x`` by ``features``, whose nonzero activations ``active`` holds
    (dense or the kept latents' values): summed squared error and L1, each a mean over the batch."""
    mse = (x_hat.float() - x.float()).pow(2).sum(-1).mean()  # in fp32 whatever the matmuls ran in
    l1 = active.float().sum(-1).mean()
    return SAEOutput(x_hat=x_hat, features=features, mse=mse, l1=l1, loss=mse + l1_coeff * l1)


# ---------------------------------------------------------------------------------------------------
# The folder format: cfg.json + sae_weights.safetensors + sparsity.safetensors (what SAELens loads).


def save_sae(sae: SAE, folder: str | Path, cfg: dict[str, Any], log10_density: torch.Tensor | None) -> None:
    """Write the folder atomically: readers see the old folder or the complete new one.

    ``log10_density`` None writes no sparsity file (SAELens reads its absence as "unknown"), for SAEs
    whose feature density nobody measured, such as imported ones.
    """
    with atomic_dir(folder) as tmp:
        state = {name: tensor.detach().to("cpu", torch.float32).contiguous()
                 for name, tensor in sae.state_dict().items()}
        write_safetensors(tmp / WEIGHTS_FILE, state)
        if log10_density is not None:
            density = log10_density.detach().to("cpu", torch.float32).contiguous()
            write_safetensors(tmp / SPARSITY_FILE, {"sparsity": density})
        (tmp / CFG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")


def _feature_scale(state: dict[str, torch.Tensor], d_sae: int, path: Path) -> torch.Tensor | None:
    """The product of the stored scaling tensors, or None when there are none or they are all ones."""
    scale = None
    for name in SCALING_TENSORS:
        if name not in state:
            continue
        tensor = state[name].float()
        if tuple(tensor.shape) != (d_sae,):
            raise UserError(f"{path}: tensor '{name}' has shape {tuple(tensor.shape)}, cfg.json says ({d_sae},)")
        if not torch.equal(tensor, torch.ones_like(tensor)):
            scale = tensor if scale is None else scale * tensor
    return scale


def load_sae(folder: str | Path) -> tuple[SAE, dict[str, Any]]:
    """The SAE and its cfg. Older SAELens forms are folded into the recipe's exact form:

    - a feature scaling tensor s: (f * s) @ W_dec = f @ (s[:, None] * W_dec), so W_dec rows absorb it;
    - apply_b_dec_to_input false: x @ W_enc + b_enc = (x - b_dec) @ W_enc + (b_enc + b_dec @ W_enc).

    Both leave the pre-activations unchanged, so they hold for every kind (topk's choice, jumprelu's mask).
    The returned cfg then describes the returned SAE (apply_b_dec_to_input true, no scaling factor).
    """
    folder = Path(folder)
    cfg = read_sae_cfg(folder)
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise UserError(f"{folder}: missing {WEIGHTS_FILE}")
    state = read_safetensors(path)
    dims = {"d_in": cfg["d_in"], "d_sae": cfg["d_sae"]}
    kind = cfg_value(cfg, "architecture", "standard")
    shapes = {**WEIGHT_SHAPES, THRESHOLD: ("d_sae",)} if kind == "jumprelu" else WEIGHT_SHAPES
    for name, shape_names in shapes.items():
        expected = tuple(dims[s] for s in shape_names)
        if name not in state:
            raise UserError(f"{path}: missing tensor '{name}' (expected {', '.join(shapes)})")
        if tuple(state[name].shape) != expected:
            raise UserError(f"{path}: tensor '{name}' has shape {tuple(state[name].shape)}, cfg.json says {expected}")
    unexpected = sorted(set(state) - set(shapes) - set(SCALING_TENSORS))
    if unexpected:
        raise UserError(f"{path}: unexpected tensor '{unexpected[0]}' (a {kind} SAE has {', '.join(shapes)})")
    for name in sorted(set(state) & (set(shapes) | set(SCALING_TENSORS))):
        # a NaN weight makes every metric NaN without an error: refuse it where it is read
        if bad := int((~torch.isfinite(state[name].float())).sum()):
            raise UserError(f"{path}: tensor '{name}' holds {bad} non-finite value{'s' if bad > 1 else ''} (NaN or "
                            f"inf); an SAE's weights must be finite numbers")
    weights = {k: state[k].float() for k in shapes}
    scale = _feature_scale(state, cfg["d_sae"], path)
    if scale is not None:
        weights["W_dec"] = weights["W_dec"] * scale[:, None]
    if cfg.get("finetuning_scaling_factor") is True and not set(SCALING_TENSORS) & set(state):
        raise UserError(f"{path}: cfg.json sets finetuning_scaling_factor but there is no scaling tensor "
                        f"(expected one of {', '.join(SCALING_TENSORS)})")
    if set(SCALING_TENSORS) & set(state) or "finetuning_scaling_factor" in cfg:
        cfg["finetuning_scaling_factor"] = False  # folded into W_dec above (or all ones)
    if not cfg_value(cfg, "apply_b_dec_to_input", True):
        shift = (weights["b_dec"].double() @ weights["W_enc"].double()).float()  # in fp64: one rounding only
        weights["b_enc"] = weights["b_enc"] + shift
        cfg["apply_b_dec_to_input"] = True
    sae = SAE(cfg["d_in"], cfg["d_sae"], kind=kind, k=cfg.get("k") if kind == "topk" else None)
    sae.load_state_dict(weights)
    return sae, cfg


def load_log10_density(folder: str | Path) -> torch.Tensor | None:
    """The stored log10 feature density [d_sae], or None when the folder has none (SAELens: unknown)."""
    path = Path(folder) / SPARSITY_FILE
    if not path.is_file():
        return None
    density = read_safetensors(path).get("sparsity")
    if density is None or density.ndim != 1:
        got = "no tensor 'sparsity'" if density is None else f"shape {tuple(density.shape)}"
        raise UserError(f"{path}: expected a tensor 'sparsity' of shape [d_sae], got {got}")
    return density
