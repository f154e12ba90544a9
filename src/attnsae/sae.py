"""The sparse autoencoder and its on-disk format (SAELens's folder layout).

Every SAE encodes the same pre-activation and decodes the same way; the activation function is what
its ``kind`` (SAELens's inference ``architecture``) names:

    pre   = (x - b_dec) @ W_enc + b_enc
    f     = ReLU(pre)                          standard (the recipe of design.md 3)
          = ReLU(pre) on each row's k largest  topk
          = ReLU(pre) * (pre > threshold)      jumprelu (threshold per feature)
    x_hat = f @ W_dec + b_dec

The recipe's loss is mean_batch(sum_dims((x_hat - x)^2)) + l1_coeff * mean_batch(sum_features(f)); the
other architectures' training (BatchTopK, JumpReLU's straight-through threshold) lives in objectives.py,
and each saves as one of these kinds.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnsae.errors import UserError
from attnsae.files import atomic_dir, read_json_object, read_safetensors, write_safetensors

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
WEIGHT_SHAPES = {"W_enc": ("d_in", "d_sae"), "W_dec": ("d_sae", "d_in"), "b_enc": ("d_sae",), "b_dec": ("d_in",)}
KINDS = ("standard", "topk", "jumprelu")  # SAELens's inference architectures that attnsae computes
THRESHOLD = "threshold"  # jumprelu's extra tensor [d_sae]


@dataclass
class SAEOutput:
    x_hat: torch.Tensor
    features: torch.Tensor
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
    x_hat = sae.decode(f)
    mse = (x_hat.float() - x.float()).pow(2).sum(-1).mean()  # in fp32 whatever the matmuls ran in
    l1 = f.float().sum(-1).mean()
    return SAEOutput(x_hat=x_hat, features=f, mse=mse, l1=l1, loss=mse + l1_coeff * l1)


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
    kind: str = "standard",
    k: int | None = None,
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
    by_kind = {"k": k, "rescale_acts_by_decoder_norm": False} if kind == "topk" else {}
    return {
        "architecture": kind,
        **by_kind,
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


def save_sae(sae: SAE, folder: str | Path, cfg: dict[str, Any], log10_density: torch.Tensor | None) -> None:
    """Write the folder atomically: readers see the old folder or the complete new one.

    ``log10_density`` None writes no sparsity file (SAELens reads its absence as "unknown"), for SAEs
    whose feature density nobody measured, such as imported ones.
    """
    with atomic_dir(folder) as tmp:
        state = {name: tensor.detach().to("cpu", torch.float32).contiguous() for name, tensor in sae.state_dict().items()}
        write_safetensors(tmp / WEIGHTS_FILE, state)
        if log10_density is not None:
            density = log10_density.detach().to("cpu", torch.float32).contiguous()
            write_safetensors(tmp / SPARSITY_FILE, {"sparsity": density})
        (tmp / CFG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")


# Folders written by older SAELens versions name some keys differently; SAELens's own loader renames
# them the same way. Later names win when a cfg has both.
LEGACY_CFG_KEYS = {
    "hook_point": "hook_name",
    "hook_point_layer": "hook_layer",
    "hook_point_head_index": "hook_head_index",
    "activation_fn_str": "activation_fn",
}
# SAELens 6 keeps these under "metadata" (its 6.0 pre-releases: "meta"); we and older versions at the top.
METADATA_KEYS = ("model_name", "hook_name", "hook_layer")
METADATA_SECTIONS = ("metadata", "meta")
# Tensors that multiply the feature activations before decoding (older SAELens always stored one of ones).
SCALING_TENSORS = ("scaling_factor", "finetuning_scaling_factor")
# What attnsae's SAE computes; anything else would be evaluated wrongly, so it is refused.
SUPPORTED = {
    "architecture": KINDS,
    "activation_fn": ("relu",),
    "normalize_activations": ("none",),
    "reshape_activations": ("none", "hook_z"),
}


def upgrade_cfg(cfg: dict[str, Any]) -> dict[str, Any]:
    """The cfg under current SAELens key names; one that attnsae wrote comes back equal."""
    out = dict(cfg)
    for old, new in LEGACY_CFG_KEYS.items():
        if old in out:
            value = out.pop(old)
            out.setdefault(new, value)
    for section in METADATA_SECTIONS:
        meta = out.get(section)
        if isinstance(meta, dict):
            for key in METADATA_KEYS:
                if key in meta:
                    out.setdefault(key, meta[key])
    if "d_sae" not in out and _is_int(out.get("d_in")) and _is_int(out.get("expansion_factor")):
        out["d_sae"] = out["d_in"] * out["expansion_factor"]  # the oldest runner configs had no d_sae
    if isinstance(out.get("normalize_activations"), bool):  # a flag before it named a method
        out["normalize_activations"] = "expected_average_only_in" if out["normalize_activations"] else "none"
    if "reshape_activations" not in out and str(out.get("hook_name", "")).endswith("_z"):
        out["reshape_activations"] = "hook_z"  # before SAELens 6, a hook name ending in _z switched it on
    kwargs = out.get("activation_fn_kwargs")
    if out.get("activation_fn") == "topk" and isinstance(kwargs, dict) and "k" in kwargs:
        out.update(architecture="topk", activation_fn="relu", k=kwargs["k"])  # before SAELens 6: an activation
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def cfg_value(cfg: dict[str, Any], key: str, default: Any = None) -> Any:
    """A value of an SAE's cfg.json from the top level, else from the metadata section (SAELens 6 keeps some there)."""
    if key in cfg:
        return cfg[key]
    for section in METADATA_SECTIONS:
        meta = cfg.get(section)
        if isinstance(meta, dict) and key in meta:
            return meta[key]
    return default


def attnsae_metadata(cfg: dict[str, Any]) -> dict[str, Any]:
    """What attnsae records about an SAE in its cfg.json (training config, tokens trained on, an import's
    provenance); empty for an SAE that another tool wrote."""
    meta = cfg_value(cfg, "attnsae", {})
    return meta if isinstance(meta, dict) else {}


def check_supported(cfg: dict[str, Any], path: Path) -> None:
    """Refuse what the recipe's SAE cannot compute: other architectures, activation functions, normalisations."""
    for key, allowed in SUPPORTED.items():
        value = cfg_value(cfg, key, allowed[0])
        if value is None and key in ("normalize_activations", "activation_fn"):
            value = allowed[0]  # some converted configs write null for "none"/"relu"
        if value not in allowed:
            raise UserError(
                f"{path}: {key} {value!r} is not supported (allowed: {', '.join(allowed)}); "
                "attnsae evaluates standard, topk and jumprelu SAEs on unnormalised activations only"
            )
    if cfg_value(cfg, "architecture", "standard") == "topk":
        k = cfg.get("k")
        if not _is_int(k) or k <= 0:
            raise UserError(f"{path}: a topk SAE needs 'k', a positive integer, got {k!r}")
        if cfg.get("rescale_acts_by_decoder_norm"):
            raise UserError(f"{path}: rescale_acts_by_decoder_norm true is not supported (allowed: false; "
                            "SAELens folds the decoder norms into the encoder when it saves)")
    head = cfg_value(cfg, "hook_head_index")
    if head is not None:
        raise UserError(f"{path}: hook_head_index {head!r} is not supported (allowed: null, all heads concatenated)")


def read_sae_cfg(folder: str | Path) -> dict[str, Any]:
    """cfg.json under current SAELens key names (``upgrade_cfg``), checked to describe an SAE we can evaluate."""
    folder = Path(folder)
    path = folder / CFG_FILE
    if not path.is_file():
        raise UserError(f"{folder}: not an SAE folder (no {CFG_FILE}; expected {CFG_FILE} and {WEIGHTS_FILE})")
    cfg = upgrade_cfg(read_json_object(path, "with d_in and d_sae"))
    for key in ("d_in", "d_sae"):
        if not _is_int(cfg.get(key)) or cfg[key] <= 0:
            raise UserError(f"{path}: '{key}' must be a positive integer, got {cfg.get(key)!r}")
    check_supported(cfg, path)
    return cfg


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
