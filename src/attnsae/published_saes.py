"""Import the published GPT-2 Small attention SAEs (design.md 2) into our SAE folder format.

The Hugging Face repo ``ckkissane/attn-saes-gpt2-small-all-layers`` holds, per layer, a ``torch.save``d
state dict ``{W_enc [768, d_sae], W_dec [d_sae, 768], b_enc [d_sae], b_dec [768]}`` and a
``<same name>_cfg.json`` with the training config. The file names spell out the recipe, so the table
below rebuilds them from the recipe values and a per-layer version suffix.

Pins, read off the hub's own pages (stored copies: this project's machines cannot reach the hub), to be
confirmed by the first import with hub access, which fails loudly on any difference:

- the revision is the repo's latest commit, 97e0da0 "update L8 run" (its commit list: 29e23ac initial,
  e6c769b all layers, 1afc0f5 "correct L5", 97e0da0); L5 (d_sae 49152) and L8 (v6) exist only from
  1afc0f5 and 97e0da0 on;
- each ``.pt`` is a Git LFS file whose sha256 the hub shows on its file page; those are pinned here;
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

import http.client
import json
import math
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from attnsae.errors import UserError
from attnsae.files import sha256_file
from attnsae.models import hook_z_name
from attnsae.sae import SAE, WEIGHT_SHAPES, sae_cfg, save_sae

REPO = "ckkissane/attn-saes-gpt2-small-all-layers"
# https://huggingface.co/ckkissane/attn-saes-gpt2-small-all-layers/commits/97e0da0e9182695e9813d15ea32184da83f5c874
REVISION = "97e0da0e9182695e9813d15ea32184da83f5c874"
DEFAULT_BASE_URL = "https://huggingface.co/{repo}/resolve/{revision}/"
HUB_HOST = "huggingface.co"

D_IN = 768  # GPT-2 Small hook_z: 12 heads x 64, concatenated
MODEL_NAME = "gpt2"  # our model source name, as our own trained SAEs record it
CONTEXT_SIZE = 128
DATASET = "Skylion007/openwebtext"
DOWNLOAD_TIMEOUT_S = 60


@dataclass(frozen=True)
class PublishedSAE:
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


def _table(*entries: PublishedSAE) -> dict[int, PublishedSAE]:
    return {e.layer: e for e in entries}


# sha256 from each file's page, https://huggingface.co/ckkissane/attn-saes-gpt2-small-all-layers/blob/main/<file>
# ("Git LFS Details"), with main at REVISION.
PUBLISHED: dict[int, PublishedSAE] = _table(
    PublishedSAE(0, 24576, 1.8, 1e-6, 9, "b822b5e489757eb94e18b0ba4bdb9ca9ff04eef25ff9c9cd824026b5d5edf38f"),
    PublishedSAE(1, 24576, 0.8, 1e-6, 5, "48f07690fa645b6fb8db5cbc7b9a981847ac132d1684d9b82bd15d3befe205fc"),
    PublishedSAE(2, 24576, 1.0, 1e-6, 4, "6f3541a135a32f2c69de8e7bd5d5fd184b3696c4bf8421b51e855bb2e4630e5e"),
    PublishedSAE(3, 24576, 0.9, 1e-6, 9, "0fd318e6fe6b33bd7fd0ece3e4d06df945ad3217ff84aa707f5dddedb44b4bcf"),
    PublishedSAE(4, 24576, 1.1, 1e-6, 7, "74f68e3d0afafef447e83c0aaa77085c83b18f562c407aa76265fc24dc3c3dcf"),
    PublishedSAE(5, 49152, 1.0, 1e-6, 9, "5fc134321b85ecf653ed67c0a3fd36998c88c0073f77403a320db6f1244c263d"),
    PublishedSAE(6, 24576, 1.1, 1e-6, 9, "33aad2927d141bcb4aa1306648dd497f125bb00af0ca9c15fb54ad7ca27a4a26"),
    PublishedSAE(7, 49152, 1.1, 1e-6, 9, "d6829f8d529c4444a3d3d9b72418181811282215705be4b5010b41a7edb54770"),
    PublishedSAE(8, 24576, 1.3, 1e-5, 6, "43ae59496e61e5845a42fa8cea5da0f58f5852003340a434e33cef0f9145ff8e"),
    PublishedSAE(9, 24576, 1.2, 1e-6, 9, "0aecf46e40ea4db5fcc5247bf0da81354192b697a1614a3aff9ee978cf1e2d7f"),
    PublishedSAE(10, 24576, 1.3, 1e-5, 9, "887e17c99430f925b36a645819d1275e58ccd534b9612f5c6614bb215840a8a9"),
    PublishedSAE(11, 24576, 3.0, 3.16e-6, 9, "0aae765f1116d42a1a319af1db93cb2f6e134ec292bb0eccd43bd4021834fefe"),
)

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


def base_url_for(base_url: str | None, revision: str) -> str:
    """The URL prefix of the files; ``{repo}`` and ``{revision}`` in it are filled in."""
    url = (base_url or DEFAULT_BASE_URL).replace("{repo}", REPO).replace("{revision}", revision)
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UserError(f"--base-url must be an http(s) URL like http://127.0.0.1:8000/, got {base_url!r}")
    return url if url.endswith("/") else url + "/"


def file_url(base: str, name: str) -> str:
    return base + urllib.parse.quote(name)  # the names hold '+', which must travel as %2B


def expected_sha256(entry: PublishedSAE, override: str | None, trust_unpinned: bool) -> tuple[str | None, str]:
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


def check_published_cfg(cfg: Any, entry: PublishedSAE, d_in: int, name: str) -> None:
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


def hub_offline(url: str) -> bool:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    host = urllib.parse.urlsplit(url).hostname or ""
    return offline and (host == HUB_HOST or host.endswith("." + HUB_HOST))


def download(url: str, dest: Path, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Stream ``url`` into ``dest``; any failure is one line naming the URL."""
    request = urllib.request.Request(url, headers={"User-Agent": "attnsae-import"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, open(dest, "wb") as f:
            expected = response.headers.get("Content-Length")
            received = 0
            while block := response.read(1 << 20):
                f.write(block)
                received += len(block)
    except urllib.error.HTTPError as err:
        raise UserError(f"{url}: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:  # refused, reset, timed out, cut
        reason = getattr(err, "reason", None) or err
        raise UserError(f"could not download {url}: {reason}") from None
    if expected is not None and expected.isdigit() and int(expected) != received:
        raise UserError(f"{url}: download cut short ({received:,} of {int(expected):,} bytes)")


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
            f"{name}: refused by torch.load(weights_only=True), not a plain tensor state dict ({load_error_reason(err)})"
        ) from None


def import_layer(
    entry: PublishedSAE,
    out_dir: str | Path,
    *,
    revision: str = REVISION,
    base_url: str | None = None,
    sha256: str | None = None,
    trust_unpinned: bool = False,
    d_in: int = D_IN,
    model_name: str = MODEL_NAME,
) -> dict[str, Any]:
    """Fetch, check and convert one layer; the folder appears complete or not at all. Returns the provenance."""
    out_dir = Path(out_dir)
    revision = check_revision(revision)
    base = base_url_for(base_url, revision)
    want, pin_source = expected_sha256(entry, sha256, trust_unpinned)
    if hub_offline(base):
        raise UserError("the published SAEs come from the Hugging Face hub, and HF_HUB_OFFLINE is set "
                        "(unset it, or pass --base-url to a mirror)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.download-") as tmp:
        cfg_path, weights_path = Path(tmp) / "cfg.json", Path(tmp) / "weights.pt"
        download(file_url(base, entry.cfg_file), cfg_path)  # the small file first: fail before 150 MB
        try:
            published_cfg = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{entry.cfg_file}: not valid JSON ({err})") from None
        check_published_cfg(published_cfg, entry, d_in, entry.cfg_file)
        download(file_url(base, entry.weights_file), weights_path)
        seen = sha256_file(weights_path)
        if want is not None and seen != want:
            raise UserError(f"{entry.weights_file}: sha256 {seen} does not match the pinned {want} ({pin_source})")
        weights = check_state_dict(load_weights(weights_path, entry.weights_file), d_in, entry.d_sae,
                                   entry.weights_file)
        provenance = {
            "repo": REPO,
            "revision": revision,
            "url": file_url(base, entry.weights_file),
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
            model_name=model_name, context_size=CONTEXT_SIZE, dataset=DATASET,
            extra={"attnsae": {"imported": provenance}},
        )
        save_sae(sae, out_dir, cfg, None)
    return provenance


def import_published(
    layers: list[int],
    out_root: str | Path,
    *,
    pins: Mapping[int, PublishedSAE] | None = None,
    **options: Any,
) -> dict[int, dict[str, Any]]:
    """Import each layer into ``out_root/L<layer>``, one complete folder at a time."""
    table = PUBLISHED if pins is None else pins  # read at call time, so a test can swap the table
    unknown = [n for n in layers if n not in table]
    if unknown:
        allowed = ", ".join(str(n) for n in sorted(table))
        raise UserError(f"layer {unknown[0]} is not in the published set (allowed: {allowed})")
    return {n: import_layer(table[n], Path(out_root) / f"L{n}", **options) for n in layers}
