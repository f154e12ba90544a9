"""The sparse autoencoder of the recipe (design.md 3) and its on-disk format (SAELens's folder layout).

    f     = ReLU((x - b_dec) @ W_enc + b_enc)
    x_hat = f @ W_dec + b_dec
    loss  = mean_batch(sum_dims((x_hat - x)^2)) + l1_coeff * mean_batch(sum_features(f))
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from attnsae.errors import UserError
from attnsae.files import atomic_dir

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
WEIGHT_SHAPES = {"W_enc": ("d_in", "d_sae"), "W_dec": ("d_sae", "d_in"), "b_enc": ("d_sae",), "b_dec": ("d_in",)}


@dataclass
class SAEOutput:
    x_hat: torch.Tensor
    features: torch.Tensor
    mse: torch.Tensor  # mean over batch of the summed squared error
    l1: torch.Tensor  # mean over batch of the summed feature activations
    loss: torch.Tensor


class SAE(nn.Module):
    def __init__(self, d_in: int, d_sae: int, generator: torch.Generator | None = None):
        super().__init__()
        self.d_in, self.d_sae = d_in, d_sae
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        nn.init.kaiming_uniform_(self.W_enc, generator=generator)
        nn.init.kaiming_uniform_(self.W_dec, generator=generator)
        with torch.no_grad():
            self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor, l1_coeff: float = 0.0) -> SAEOutput:
        f = self.encode(x)
        x_hat = self.decode(f)
        mse = (x_hat - x).pow(2).sum(-1).mean()
        l1 = f.sum(-1).mean()
        return SAEOutput(x_hat=x_hat, features=f, mse=mse, l1=l1, loss=mse + l1_coeff * l1)

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


def cosine_warmup_lr(step_since_reset: int, lr: float, warmup_steps: int) -> float:
    """Cosine from 0.1*lr to lr over ``warmup_steps``, then constant."""
    if warmup_steps <= 0 or step_since_reset >= warmup_steps:
        return lr
    progress = step_since_reset / warmup_steps
    return lr * (0.1 + 0.9 * 0.5 * (1.0 - math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------------------
# The folder format: cfg.json + sae_weights.safetensors + sparsity.safetensors (what SAELens loads).


def sae_cfg(
    *,
    d_in: int,
    d_sae: int,
    hook_name: str,
    layer: int,
    model_name: str,
    context_size: int,
    dataset: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    metadata = {
        "model_name": model_name,
        "hook_name": hook_name,
        "hook_head_index": None,
        "context_size": context_size,
        "prepend_bos": True,
        "dataset_path": dataset,
        "model_from_pretrained_kwargs": {},
        **(extra or {}),
    }
    return {
        "architecture": "standard",
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "hook_z",
        # Older SAELens readers look for these at the top level.
        "hook_name": hook_name,
        "hook_layer": layer,
        "model_name": model_name,
        "context_size": context_size,
        "dataset_path": dataset,
        "metadata": metadata,
    }


def save_sae(sae: SAE, folder: str | Path, cfg: dict[str, Any], log10_density: torch.Tensor) -> None:
    """Write the folder atomically: readers see the old folder or the complete new one."""
    with atomic_dir(folder) as tmp:
        state = {name: getattr(sae, name).detach().to("cpu", torch.float32).contiguous() for name in WEIGHT_SHAPES}
        save_file(state, str(tmp / WEIGHTS_FILE))
        save_file({"sparsity": log10_density.detach().to("cpu", torch.float32).contiguous()}, str(tmp / SPARSITY_FILE))
        (tmp / CFG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")


def read_sae_cfg(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / CFG_FILE
    if not path.is_file():
        raise UserError(f"{folder}: not an SAE folder (no {CFG_FILE}; expected {CFG_FILE} and {WEIGHTS_FILE})")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: corrupt JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: expected a JSON object with d_in and d_sae, got {type(cfg).__name__}")
    for key in ("d_in", "d_sae"):
        if not isinstance(cfg.get(key), int):
            raise UserError(f"{path}: '{key}' must be an integer, got {cfg.get(key)!r}")
    return cfg


def load_sae(folder: str | Path) -> tuple[SAE, dict[str, Any]]:
    folder = Path(folder)
    cfg = read_sae_cfg(folder)
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise UserError(f"{folder}: missing {WEIGHTS_FILE}")
    try:
        state = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for truncated or garbled files
        raise UserError(f"{path}: corrupt safetensors file ({err})") from None
    dims = {"d_in": cfg["d_in"], "d_sae": cfg["d_sae"]}
    for name, shape_names in WEIGHT_SHAPES.items():
        expected = tuple(dims[s] for s in shape_names)
        if name not in state:
            raise UserError(f"{path}: missing tensor '{name}' (expected {', '.join(WEIGHT_SHAPES)})")
        if tuple(state[name].shape) != expected:
            raise UserError(f"{path}: tensor '{name}' has shape {tuple(state[name].shape)}, cfg.json says {expected}")
    sae = SAE(cfg["d_in"], cfg["d_sae"])
    sae.load_state_dict({k: state[k].float() for k in WEIGHT_SHAPES})
    return sae, cfg


def load_log10_density(folder: str | Path) -> torch.Tensor | None:
    path = Path(folder) / SPARSITY_FILE
    return load_file(str(path))["sparsity"] if path.is_file() else None
