"""``cfg.json`` of an SAE folder in the SAELens format: its file names, how attnsae writes it, and the checked
reader that upgrades older SAELens key names and refuses what attnsae's SAE cannot compute.

The weights half of the format (safetensors, loading and saving an SAE) is in sae/autoencoder.py; what only
reads an SAE's description (the report's provenance, the evaluate command's layer) reads it here, without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from attnsae.errors import UserError
from attnsae.files import read_json_object

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
KINDS = ("standard", "topk", "jumprelu")  # SAELens's inference architectures that attnsae computes


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
