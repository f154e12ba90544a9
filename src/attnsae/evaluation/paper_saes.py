"""Import the published GPT-2 Small attention SAEs (docs/design.md 2) into our SAE folder format.

Writes ``models/imported/L<n>`` (``import_paper_saes``), which evaluate_paper_saes@L reads with
``sae.autoencoder.load_sae``. Every path: layout.py.

The Hugging Face repo ``ckkissane/attn-saes-gpt2-small-all-layers`` holds, per layer, a ``torch.save``d
state dict ``{W_enc [768, d_sae], W_dec [d_sae, 768], b_enc [d_sae], b_dec [768]}`` and a
``<same name>_cfg.json`` with the training config. The file names spell out the recipe, so the table
below rebuilds them from the recipe values and a per-layer version suffix.

Pins, read off the hub's own pages (stored copies: this project's machines cannot reach the hub), to be
confirmed by the first import with hub access, which fails loudly on any difference:

- the revision is the repo's latest commit, 97e0da0 "update L8 run" (its commit list: 29e23ac initial,
  e6c769b all layers, 1afc0f5 "correct L5", 97e0da0); L5 (d_sae 49152) and L8 (v6) exist only from
  1afc0f5 and 97e0da0 on;
- each ``.pt`` is a Git LFS file whose sha256 the hub shows on its file page; those are pinned in paper.py;
- the ``_cfg.json`` files are plain git files, whose sha256 no public page shows. They are not
  pinned by hash; instead every value the import relies on (layer, hook, widths, recipe) must equal
  the pinned table, and the hash seen is recorded in the imported cfg.

A ``.pt`` without a pin is refused unless the caller passes its sha256 or explicitly trusts it,
and then the hash seen is recorded. Weights are read with ``torch.load(weights_only=True)``: a pickle
that holds anything but tensors and plain containers is refused, never executed.

The published files carry no feature density, so the imported folder has no ``sparsity.safetensors``
(SAELens treats it as unknown); the evaluate stage measures density on the evaluation tokens.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import urllib.parse
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from attnsae import layout
from attnsae.data import hub
from attnsae.data.models import hook_z_name
from attnsae.errors import UserError
from attnsae.evaluation import paper
from attnsae.files import sha256_file
from attnsae.formats.sae_cfg import sae_cfg
from attnsae.sae.autoencoder import SAE, WEIGHT_SHAPES, save_sae

REPO = paper.WEIGHTS_REPO
REVISION = paper.WEIGHTS_REVISION

D_IN = paper.D_IN
MODEL_NAME = paper.MODEL_SOURCE  # our model source name, as our own trained SAEs record it


@dataclass(frozen=True)
class PaperSAE:
    """One published layer: the recipe values its file name spells, and the pinned sha256 of its ``.pt``."""

    layer: int
    d_sae: int
    l1_coeff: float
    dead_cutoff: float
    version: int
    sha256: str | None  # Git LFS oid of the .pt file; None: not known, so the import asks for one
    lr: float = 1.2e-3
    batch_size: int = 4096
    resample_every: int = 25_000
    n_resamples: int = 4
    model: str = "gpt2-small"

    @property
    def stem(self) -> str:
        return (
            f"{self.model}_L{self.layer}_Hcat_z_lr{self.lr:.2e}_l1{self.l1_coeff:.2e}_ds{self.d_sae}"
            f"_bs{self.batch_size}_dc{self.dead_cutoff:.2e}_rsanthropic_rie{self.resample_every}"
            f"_nr{self.n_resamples}_v{self.version}"
        )

    @property
    def weights_file(self) -> str:
        return f"{self.stem}.pt"

    @property
    def cfg_file(self) -> str:
        return f"{self.stem}_cfg.json"


# The pinned checkpoints, one per layer, from the paper's table (paper.py).
PAPER_SAES: dict[int, PaperSAE] = {
    n: PaperSAE(n, row.d_sae, row.l1_coeff, row.dead_cutoff, row.version, row.sha256) for n, row in paper.LAYERS.items()
}

# _cfg.json keys the import cannot do without; the other recipe keys are compared when present.
REQUIRED_CFG_KEYS = ("act_name", "act_size", "dict_size", "layer")


# ---------------------------------------------------------------------------------------------------
# Pure checks


def check_revision(revision: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{40}", revision):
        raise UserError(f"--revision must be a full 40-character commit sha (pinned: {REVISION}), got {revision!r}")
    return revision


def check_sha256_text(value: str) -> str:
    text = value.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise UserError(f"--sha256 must be 64 hexadecimal characters, got {value!r}")
    return text


def file_url(endpoint: str, revision: str, name: str) -> str:
    """Where the hub serves a file of the repository at a revision (recorded as provenance)."""
    return f"{endpoint}/{REPO}/resolve/{revision}/{urllib.parse.quote(name)}"  # the names hold '+': %2B


def expected_sha256(entry: PaperSAE, override: str | None, trust_unpinned: bool) -> tuple[str | None, str]:
    """The sha256 the weights must have (None only when the caller trusts an unpinned file), and where it came from."""
    if override is not None:
        return check_sha256_text(override), "--sha256"
    if entry.sha256 is not None:
        return entry.sha256, "pinned table"
    if trust_unpinned:
        return None, "unpinned, accepted with --trust-unpinned"
    raise UserError(
        f"{entry.weights_file}: no sha256 is pinned for this file; pass --sha256 HASH to pin it, "
        "or --trust-unpinned to accept it and record the hash it has"
    )


def _same(value: Any, expected: Any) -> bool:
    if isinstance(expected, bool) or isinstance(value, bool):
        return value is expected
    if isinstance(expected, float) and isinstance(value, (int, float)):
        return math.isclose(value, expected, rel_tol=1e-6)
    return value == expected


def check_published_cfg(cfg: Any, entry: PaperSAE, d_in: int, name: str) -> None:
    """The published training config, checked against the pinned table: the values we rely on must agree."""
    if not isinstance(cfg, dict):
        raise UserError(f"{name}: expected a JSON object, got {type(cfg).__name__}")
    cfg = dict(cfg)
    if "dict_size" not in cfg and all(isinstance(cfg.get(k), int) for k in ("dict_mult", "act_size")):
        cfg["dict_size"] = cfg["dict_mult"] * cfg["act_size"]  # the width, when only the multiple is given
    expected = {
        "act_name": hook_z_name(entry.layer),
        "act_size": d_in,
        "dict_size": entry.d_sae,
        "layer": entry.layer,
        "l1_coeff": entry.l1_coeff,
        "lr": entry.lr,
        "batch_size": entry.batch_size,
        "dead_direction_cutoff": entry.dead_cutoff,
        "re_init_every": entry.resample_every,
        "num_resamples": entry.n_resamples,
        "site": "z",
        "concat_heads": True,
    }
    for key, want in expected.items():
        if key not in cfg:
            if key in REQUIRED_CFG_KEYS:
                raise UserError(f"{name}: missing key '{key}' (needs {', '.join(REQUIRED_CFG_KEYS)})")
            continue
        if not _same(cfg[key], want):
            raise UserError(f"{name}: '{key}' is {cfg[key]!r}, expected {want!r} for published layer {entry.layer}")


def check_state_dict(state: Any, d_in: int, d_sae: int, name: str) -> dict[str, torch.Tensor]:
    """Exactly W_enc, W_dec, b_enc, b_dec, finite floating-point tensors of the recipe's shapes."""
    if not isinstance(state, dict):
        raise UserError(f"{name}: holds a {type(state).__name__}, expected a state dict of {', '.join(WEIGHT_SHAPES)}")
    missing = [k for k in WEIGHT_SHAPES if k not in state]
    if missing:
        raise UserError(f"{name}: missing tensor '{missing[0]}' (expected {', '.join(WEIGHT_SHAPES)})")
    extra = sorted(str(k) for k in state if k not in WEIGHT_SHAPES)
    if extra:
        raise UserError(f"{name}: unexpected entry '{extra[0]}' (expected only {', '.join(WEIGHT_SHAPES)})")
    dims = {"d_in": d_in, "d_sae": d_sae}
    out = {}
    for key, shape_names in WEIGHT_SHAPES.items():
        tensor = state[key]
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            kind = f"a {tensor.dtype} tensor" if isinstance(tensor, torch.Tensor) else f"a {type(tensor).__name__}"
            raise UserError(f"{name}: '{key}' is {kind}, expected a floating-point tensor")
        shape = tuple(dims[s] for s in shape_names)
        if tuple(tensor.shape) != shape:
            raise UserError(f"{name}: tensor '{key}' has shape {tuple(tensor.shape)}, expected {shape}")
        if not torch.isfinite(tensor).all():
            raise UserError(f"{name}: tensor '{key}' holds non-finite values (NaN or inf)")
        out[key] = tensor.detach().to("cpu", torch.float32)
    return out


# ---------------------------------------------------------------------------------------------------
# Side effects: download, load, write


def load_error_reason(err: Exception) -> str:
    """The useful part of torch.load's long message: what the restricted unpickler refused (no advice to
    turn the restriction off, which torch's message gives)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    match = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n\n|$)", text, re.DOTALL)
    reason = match.group(1) if match else (text.strip().splitlines() or [type(err).__name__])[0]
    return " ".join(reason.split())[:200]


def load_weights(path: Path, name: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for foreign objects; RuntimeError and others for garbled files
        raise UserError(
            f"{name}: refused by torch.load(weights_only=True), not a plain tensor state dict "
            f"({load_error_reason(err)})"
        ) from None


def import_layer(
    entry: PaperSAE,
    out_dir: str | Path,
    *,
    revision: str = REVISION,
    endpoint: str | None = None,
    sha256: str | None = None,
    trust_unpinned: bool = False,
    d_in: int = D_IN,
    model_name: str = MODEL_NAME,
) -> dict[str, Any]:
    """Fetch, check and convert one layer; the folder appears complete or not at all. Returns the provenance."""
    out_dir = Path(out_dir)
    revision = check_revision(revision)
    endpoint = hub.check_endpoint(endpoint)
    want, pin_source = expected_sha256(entry, sha256, trust_unpinned)
    hub.require(endpoint, "importing the published SAEs", mirror="--endpoint or HF_ENDPOINT")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.download-") as tmp:
        # the small file first: fail before 150 MB
        cfg_path = hub.download(REPO, revision, entry.cfg_file, Path(tmp), endpoint)
        try:
            published_cfg = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{entry.cfg_file}: not valid JSON ({err})") from None
        check_published_cfg(published_cfg, entry, d_in, entry.cfg_file)
        weights_path = hub.download(REPO, revision, entry.weights_file, Path(tmp), endpoint)
        seen = sha256_file(weights_path)
        if want is not None and seen != want:
            raise UserError(f"{entry.weights_file}: sha256 {seen} does not match the pinned {want} ({pin_source})")
        weights = check_state_dict(load_weights(weights_path, entry.weights_file), d_in, entry.d_sae,
                                   entry.weights_file)
        provenance = {
            "repo": REPO,
            "revision": revision,
            "url": file_url(endpoint, revision, entry.weights_file),
            "file": entry.weights_file,
            "sha256": seen,
            "sha256_checked_against": pin_source,
            "cfg_file": entry.cfg_file,
            "cfg_sha256": sha256_file(cfg_path),  # not pinned (unknown); its values were checked instead
            "published_cfg": published_cfg,
            "recipe": asdict(entry),
            "log10_density": "not published; `attnsae evaluate` measures feature density on the eval tokens",
        }
        sae = SAE(d_in, entry.d_sae)
        sae.load_state_dict(weights)
        cfg = sae_cfg(
            d_in=d_in, d_sae=entry.d_sae, hook_name=hook_z_name(entry.layer), layer=entry.layer,
            model_name=model_name, context_size=paper.CONTEXT_SIZE, dataset=paper.DATASET,
            extra={"attnsae": {"imported": provenance}},
        )
        save_sae(sae, out_dir, cfg, None)
    return provenance


def import_paper_saes(
    layers: list[int],
    out_root: str | Path,
    *,
    pins: Mapping[int, PaperSAE] | None = None,
    **options: Any,
) -> dict[int, dict[str, Any]]:
    """Import each layer into ``out_root/L<layer>``, one complete folder at a time."""
    table = PAPER_SAES if pins is None else pins  # read at call time, so a test can swap the table
    unknown = [n for n in layers if n not in table]
    if unknown:
        allowed = ", ".join(str(n) for n in sorted(table))
        raise UserError(f"layer {unknown[0]} is not in the published set (allowed: {allowed})")
    return {n: import_layer(table[n], layout.sae_dir(n, Path(out_root)), **options) for n in layers}
