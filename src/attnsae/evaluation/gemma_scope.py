"""Gemma Scope's attention SAEs (Lieberum et al. 2024, Google DeepMind) imported as SAE folders, to be evaluated
and given dashboards on the same tokens as ours (the gemma-2-2b profile's published-SAE stages).

Published layout (the hub repository ``google/gemma-scope-2b-pt-att``): one JumpReLU SAE per layer, width and
average L0 at ``layer_<L>/width_<W>/average_l0_<N>/params.npz``, a numpy archive of

    W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in], threshold [d_sae]

on ``blocks.L.attn.hook_z`` with the heads concatenated (d_in 2048 on Gemma 2 2B: 8 heads x 256). Their encoder
takes ``x @ W_enc + b_enc`` (no ``b_dec`` subtracted first): the folder stores ``b_enc + b_dec @ W_enc`` so that
our ``(x - b_dec) @ W_enc + b_enc`` is the same pre-activation, and the threshold then masks the same features.

The repository's commit (``--revision``: a branch, tag or commit) is resolved and recorded, and the file is
checked against the sha256 the hub lists for it; an ``.npz`` is read with ``allow_pickle=False`` (no code runs).
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attnsae import layout
from attnsae.data import hub
from attnsae.data.models import hook_z_name
from attnsae.errors import UserError
from attnsae.evaluation import published_sets
from attnsae.formats.sae_cfg import sae_cfg
from attnsae.sae.autoencoder import SAE, save_sae

REPO = published_sets.GEMMA_SCOPE.repo
MODEL_SOURCE = published_sets.GEMMA_SCOPE.model_sources[0]
N_LAYERS = 26
CONTEXT_SIZE = 1024
DATASET = "Gemma Scope's training mixture (not published as a dataset)"
TENSORS = {"W_enc": ("d_in", "d_sae"), "W_dec": ("d_sae", "d_in"), "b_enc": ("d_sae",), "b_dec": ("d_in",),
           "threshold": ("d_sae",)}
WIDTH = re.compile(r"\d+[km]?")
FOLDER = re.compile(r"layer_(\d+)/width_(\w+)/average_l0_(\d+)/params\.npz")


def published_l0s(names: list[str], layer: int, width: str) -> dict[int, str]:
    """The average L0s published for ``layer`` at ``width``, each with its file's path in the repository."""
    found = {}
    for name in names:
        match = FOLDER.fullmatch(name)
        if match and int(match[1]) == layer and match[2] == width:
            found[int(match[3])] = name
    return found


def nearest_l0(available: dict[int, str], wanted: int, layer: int, width: str) -> int:
    if not available:
        raise UserError(f"{REPO} has no SAE for layer {layer} at width {width} (its files: "
                        "layer_<L>/width_<W>/average_l0_<N>/params.npz)")
    return min(available, key=lambda l0: (abs(l0 - wanted), l0))


def read_params_npz(path: Path, name: str) -> dict[str, torch.Tensor]:
    """The five tensors, float, finite, of consistent shapes; one line naming the file otherwise."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except Exception as err:  # not a zip, a pickled object array, a truncated file
        raise UserError(f"{name}: not a numpy .npz of plain arrays ({str(err).splitlines()[0][:160]})") from None
    missing = [key for key in TENSORS if key not in arrays]
    if missing:
        raise UserError(f"{name}: missing array '{missing[0]}' (expected {', '.join(TENSORS)})")
    if len(arrays) != len(TENSORS):
        extra = sorted(set(arrays) - set(TENSORS))
        raise UserError(f"{name}: unexpected array '{extra[0]}' (expected only {', '.join(TENSORS)})")
    if arrays["W_enc"].ndim != 2:
        raise UserError(f"{name}: W_enc has shape {arrays['W_enc'].shape}, expected [d_in, d_sae]")
    dims = dict(zip(("d_in", "d_sae"), arrays["W_enc"].shape))
    out = {}
    for key, shape_names in TENSORS.items():
        array, shape = arrays[key], tuple(dims[d] for d in shape_names)
        if array.shape != shape or not np.issubdtype(array.dtype, np.floating):
            raise UserError(f"{name}: '{key}' is {array.dtype} {array.shape}, expected floats of shape {shape}")
        if not np.isfinite(array).all():
            raise UserError(f"{name}: '{key}' holds non-finite values (NaN or inf)")
        out[key] = torch.from_numpy(array.astype(np.float32))
    return out


def as_sae(tensors: dict[str, torch.Tensor]) -> SAE:
    """Our JumpReLU SAE computing the same features: b_dec @ W_enc folded into b_enc (module docstring)."""
    d_in, d_sae = tensors["W_enc"].shape
    sae = SAE(d_in, d_sae, kind="jumprelu")
    folded = tensors["b_enc"].double() + tensors["b_dec"].double() @ tensors["W_enc"].double()
    sae.load_state_dict({"W_enc": tensors["W_enc"], "W_dec": tensors["W_dec"], "b_enc": folded.float(),
                         "b_dec": tensors["b_dec"], "threshold": tensors["threshold"]})
    return sae


def import_layer(layer: int, out_dir: str | Path, *, width: str, l0: int, revision: str = "main",
                 endpoint: str | None = None, d_in: int | None = None) -> dict[str, Any]:
    """Fetch, check and convert one layer's SAE (the published average L0 nearest ``l0``); the folder appears
    complete or not at all. ``d_in``: the hook_z width the SAE must have (the pinned model's). Returns the
    provenance recorded in its cfg.json."""
    if not 0 <= layer < N_LAYERS:
        raise UserError(f"layer {layer} is not in Gemma 2 2B (allowed: 0 to {N_LAYERS - 1})")
    if not WIDTH.fullmatch(width):
        raise UserError(f"--width must be a published width like 16k or 1m, got {width!r}")
    out_dir, endpoint = Path(out_dir), hub.check_endpoint(endpoint)
    hub.require(endpoint, "importing Gemma Scope's SAEs", mirror="--endpoint or HF_ENDPOINT")
    commit, files = hub.repo_files(REPO, revision, endpoint)
    available = published_l0s(list(files), layer, width)
    chosen = nearest_l0(available, l0, layer, width)
    name = available[chosen]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.download-") as tmp:
        path = hub.download(REPO, commit, name, Path(tmp), endpoint)
        if files[name].lfs_sha256 is None:
            raise UserError(f"{name}: the hub lists no sha256 for it (not a Git LFS file), so it cannot be checked")
        sha256 = files[name].check(path, f"{REPO}@{commit[:12]}")
        sae = as_sae(read_params_npz(path, name))
    if d_in is not None and sae.d_in != d_in:
        raise UserError(f"{name}: d_in {sae.d_in} does not match the model's hook_z width {d_in}")
    provenance = {"repo": REPO, "revision": commit, "file": name, "sha256": sha256,
                  "sha256_checked_against": "the hub's Git LFS listing", "width": width, "average_l0": chosen,
                  "asked_l0": l0, "available_l0s": sorted(available),
                  "b_enc": "published b_enc + b_dec @ W_enc (the published encoder does not subtract b_dec)"}
    cfg = sae_cfg(d_in=sae.d_in, d_sae=sae.d_sae, hook_name=hook_z_name(layer), layer=layer,
                  model_name=MODEL_SOURCE, context_size=CONTEXT_SIZE, dataset=DATASET, kind="jumprelu",
                  extra={"attnsae": {"imported": provenance}})
    save_sae(sae, out_dir, cfg, None)
    return provenance


def import_gemma_scope(layers: list[int], out_root: str | Path, **options: Any) -> dict[int, dict[str, Any]]:
    """Import each layer into ``out_root/L<layer>``, one complete folder at a time."""
    return {n: import_layer(n, layout.sae_dir(n, Path(out_root)), **options) for n in layers}
