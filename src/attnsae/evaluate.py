"""The `evaluate@L` stage: every metric of design.md 4 for one SAE on the held-out split.

Reads ``models/base``, ``data/tokens`` and an SAE folder; writes ``reports/metrics/L<n>.json`` and
``reports/density/L<n>.csv``, which report, publish and verify read back with ``read_metrics`` and
``read_density`` (defined here, next to the writer). Every path: layout.py.

Per batch, three forward passes of the model on the same tokens:
- clean (hook_z captured for the SAE metrics),
- hook_z replaced by the SAE reconstruction ([b,p,h,d] -> [b*p, h*d] -> SAE -> back),
- hook_z set to zero (the attention output becomes b_O).
Losses are mean next-token cross-entropy over all positions, accumulated as sums so that each
reported L is a mean over all evaluation tokens (loss recovered is a ratio of those means).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from attnsae.activations import flatten_heads, rows_as_tensor, unflatten_heads
from attnsae.config import EvaluateConfig
from attnsae.errors import UserError
from attnsae.files import read_json_object, read_text_file, write_json_atomic, write_text_atomic
from attnsae.models import ModelInfo, hook_z_name, load_bridge, read_model_info, resolve_device
from attnsae.sae import SAE, load_sae
from attnsae.tokenization import load_rows

METRIC_NAMES = (
    "l0",
    "loss_recovered",
    "ce_clean",
    "ce_sae",
    "ce_zero",
    "ce_increase",
    "ce_increase_zero",
    "kl_sae",
    "kl_zero",
    "kl_score",
    "mse",
    "explained_variance",
    "dead_fraction",
    "dense_fraction",
)


@dataclass
class Totals:
    """Sums over evaluation tokens, filled batch by batch."""

    d_sae: int
    d_in: int

    def __post_init__(self) -> None:
        self.tokens = 0  # activations (every position)
        self.predictions = 0  # next-token predictions (every position but the last of each row)
        self.ce = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
        self.kl = {"sae": 0.0, "zero": 0.0}
        self.l0 = 0.0
        self.squared_error = 0.0
        self.x_sum = torch.zeros(self.d_in, dtype=torch.float64)
        self.x_sq_sum = torch.zeros(self.d_in, dtype=torch.float64)
        self.fires = torch.zeros(self.d_sae, dtype=torch.float64)

    def add_activations(self, x: torch.Tensor, x_hat: torch.Tensor, features: torch.Tensor) -> None:
        x64 = x.double().cpu()
        self.tokens += len(x)
        self.squared_error += (x_hat - x).pow(2).sum().item()
        self.x_sum += x64.sum(0)
        self.x_sq_sum += x64.pow(2).sum(0)
        fired = features > 0
        self.l0 += fired.sum().item()
        self.fires += fired.sum(0).double().cpu()


def token_ce(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-position next-token cross-entropy, [batch, pos-1]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none").view(
        tokens.shape[0], -1
    )


def kl_div(clean_logits: torch.Tensor, other_logits: torch.Tensor) -> torch.Tensor:
    """KL(clean || other) per position, [batch, pos]."""
    log_p = clean_logits.float().log_softmax(-1)
    log_q = other_logits.float().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def loss_recovered(ce_clean: float, ce_sae: float, ce_zero: float) -> float | None:
    """(L_zero - L_sae) / (L_zero - L_clean); None when zero-ablation changes nothing."""
    gap = ce_zero - ce_clean
    return None if gap == 0 else (ce_zero - ce_sae) / gap


def explained_variance_from_sums(squared_error: float, x_sum: torch.Tensor, x_sq_sum: torch.Tensor, n: int) -> float | None:
    total = (x_sq_sum - x_sum.pow(2) / n).sum().item()
    return None if total <= 0 else 1.0 - squared_error / total


def density_histogram(log10_density: np.ndarray, bins: int) -> dict[str, list[float]]:
    """Histogram of log10 feature density over the features that fired (dead features are counted apart)."""
    alive = log10_density[np.isfinite(log10_density)]
    edges = np.linspace(-8.0, 0.0, bins + 1)
    counts, _ = np.histogram(np.clip(alive, -8.0, 0.0), bins=edges)
    return {"bin_edges": edges.tolist(), "counts": counts.tolist()}


def finish(t: Totals, dense_threshold: float) -> tuple[dict, np.ndarray]:
    ce = {k: v / t.predictions for k, v in t.ce.items()}
    kl = {k: v / t.tokens for k, v in t.kl.items()}
    density = (t.fires / t.tokens).numpy()
    with np.errstate(divide="ignore"):
        log10_density = np.log10(density)
    metrics = {
        "l0": t.l0 / t.tokens,
        "loss_recovered": loss_recovered(ce["clean"], ce["sae"], ce["zero"]),
        "ce_clean": ce["clean"],
        "ce_sae": ce["sae"],
        "ce_zero": ce["zero"],
        "ce_increase": ce["sae"] - ce["clean"],
        "ce_increase_zero": ce["zero"] - ce["clean"],
        "kl_sae": kl["sae"],
        "kl_zero": kl["zero"],
        "kl_score": None if kl["zero"] == 0 else 1.0 - kl["sae"] / kl["zero"],
        "mse": t.squared_error / t.tokens,
        "explained_variance": explained_variance_from_sums(t.squared_error, t.x_sum, t.x_sq_sum, t.tokens),
        "dead_fraction": float((t.fires == 0).double().mean()),
        "dead_fraction_tokens": t.tokens,
        "dense_fraction": float((density > dense_threshold).mean()),
        "dense_threshold": dense_threshold,
        "eval_tokens": t.tokens,
    }
    return metrics, log10_density


@torch.inference_mode()
def evaluate_sae(bridge, sae: SAE, layer: int, rows: np.ndarray, cfg: EvaluateConfig, device: torch.device) -> tuple[dict, np.ndarray]:
    if len(rows) == 0:
        raise UserError("evaluate: the evaluation split is empty (no rows); nothing to measure")
    name = hook_z_name(layer)
    sae = sae.to(device).eval()
    totals = Totals(d_sae=sae.d_sae, d_in=sae.d_in)
    captured: dict[str, torch.Tensor] = {}

    def capture(z, hook):
        captured["z"] = z.detach()

    def replace_with_sae(z, hook):
        x = flatten_heads(z.float())
        features = sae.encode(x)
        x_hat = sae.decode(features)
        totals.add_activations(x, x_hat, features)
        return unflatten_heads(x_hat, z).to(z.dtype)

    def zero(z, hook):
        return torch.zeros_like(z)

    for start in range(0, len(rows), cfg.batch_rows):
        tokens = rows_as_tensor(rows[start : start + cfg.batch_rows], device)
        clean = bridge.run_with_hooks(tokens, return_type="logits", fwd_hooks=[(name, capture)])
        if captured.get("z") is None:
            raise UserError(f"hook {name} did not fire; is layer {layer} in the model?")
        spliced = bridge.run_with_hooks(tokens, return_type="logits", fwd_hooks=[(name, replace_with_sae)])
        ablated = bridge.run_with_hooks(tokens, return_type="logits", fwd_hooks=[(name, zero)])
        for key, logits in (("clean", clean), ("sae", spliced), ("zero", ablated)):
            totals.ce[key] += token_ce(logits, tokens).sum().item()
        totals.kl["sae"] += kl_div(clean, spliced).sum().item()
        totals.kl["zero"] += kl_div(clean, ablated).sum().item()
        totals.predictions += tokens.shape[0] * (tokens.shape[1] - 1)
        captured.clear()
    return finish(totals, cfg.dense_threshold)


_HOOK_Z = re.compile(r"^blocks\.(\d+)\.attn\.hook_z$")


def sae_layer(sae_cfg: dict, sae_dir: str | Path, layer: int | None = None) -> int:
    """The layer a hook_z SAE was trained on, from its cfg.json; ``layer``, when given, must agree."""
    hook = str(sae_cfg.get("hook_name", ""))
    match = _HOOK_Z.match(hook)
    if match is None:
        raise UserError(f"{sae_dir}: hook {hook!r} is not an attention output (allowed: blocks.<L>.attn.hook_z)")
    if layer is not None and int(match.group(1)) != layer:
        raise UserError(f"{sae_dir}: the SAE was trained on {hook}, not on layer {layer}")
    return int(match.group(1))


def load_sae_for_model(sae_dir: str | Path, model_dir: str | Path, layer: int | None) -> tuple[SAE, int, ModelInfo]:
    """An SAE folder checked against the pinned model: (SAE, its layer, the model's info). ``layer`` None: the
    layer in its cfg.json."""
    sae, sae_cfg = load_sae(sae_dir)
    layer = sae_layer(sae_cfg, sae_dir, layer)
    info = read_model_info(model_dir)
    info.check_layer(layer)
    if sae.d_in != info.d_in:
        raise UserError(f"{sae_dir}: SAE d_in {sae.d_in} does not match {info.name} hook_z width {info.d_in}")
    return sae, layer, info


def evaluate_layer(
    cfg: EvaluateConfig,
    model_dir: str | Path,
    tokens_dir: str | Path,
    sae_dir: str | Path,
    layer: int | None,
    metrics_path: str | Path | None,
    density_path: str | Path | None,
) -> dict:
    """The stage: evaluate any hook_z SAE folder (ours, imported, SAELens) on the eval rows.

    ``layer`` None: the layer in the SAE's cfg.json. Writes the metrics JSON and the density CSV where
    given (None: not written) and returns the metrics.
    """
    sae, layer, info = load_sae_for_model(sae_dir, model_dir, layer)
    rows = load_rows(tokens_dir, "eval", vocab_size=info.vocab_size)  # checked before the model loads
    if cfg.max_rows:
        rows = rows[: cfg.max_rows]
    device = resolve_device(cfg.device)
    bridge, _ = load_bridge(model_dir, device)
    metrics, log10_density = evaluate_sae(bridge, sae, layer, rows, cfg, device)
    metrics = {"layer": layer, "hook_name": hook_z_name(layer), "model": info.name, "d_sae": sae.d_sae,
               "sae": str(sae_dir), "eval_rows": int(len(rows)), **metrics}
    if metrics_path is not None:
        write_json_atomic(metrics_path, metrics)
    if density_path is not None:
        write_text_atomic(density_path, density_csv(density_histogram(log10_density, cfg.density_bins)))
    return metrics


# ---------------------------------------------------------------------------------------------------
# The stage's two artifacts, written above and read back here by report, publish, verify and comparison.

_NUMBER = (int, float)
# Every key a reader of the metrics JSON may rely on, and its type; ratios are None when undefined.
METRICS_TYPES: dict[str, tuple[type, ...]] = {
    "layer": (int,),
    "hook_name": (str,),
    "model": (str,),
    "d_sae": (int,),
    "eval_rows": (int,),
    **{name: _NUMBER for name in METRIC_NAMES},
    **{name: (*_NUMBER, type(None)) for name in ("loss_recovered", "kl_score", "explained_variance")},
    "dead_fraction_tokens": (int,),
    "dense_threshold": _NUMBER,
    "eval_tokens": (int,),
}


def check_metrics(metrics: dict, path: str | Path) -> dict:
    """The metrics JSON as evaluate writes it, or one line naming the file and the first bad key."""
    for key, types in METRICS_TYPES.items():
        if key not in metrics:
            raise UserError(f"{path}: metrics file lacks '{key}' (re-run `attnsae evaluate`)")
        value = metrics[key]
        if isinstance(value, bool) or not isinstance(value, types) or (isinstance(value, float) and not math.isfinite(value)):
            allowed = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise UserError(f"{path}: metrics key '{key}' must be a finite {allowed}, got {value!r}")
    return metrics


def read_metrics(path: str | Path) -> dict:
    return check_metrics(read_json_object(path, "of metrics"), path)


def numeric_metrics(metrics: dict) -> dict[str, float]:
    """The numeric entries of a metrics JSON but the layer: the same names for every layer and run."""
    return {
        k: float(v) for k, v in metrics.items() if k != "layer" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


DENSITY_HEADER = ("log10_density", "features")


def density_csv(hist: dict[str, list[float]]) -> str:
    """One row per histogram bin: its centre and the number of alive features in it."""
    edges = hist["bin_edges"]
    lines = [",".join(DENSITY_HEADER)]
    lines += [f"{(lo + hi) / 2:.3f},{count}" for lo, hi, count in zip(edges, edges[1:], hist["counts"])]
    return "\n".join(lines) + "\n"


def read_density(path: str | Path) -> list[tuple[float, int]]:
    """(bin centre, features) rows of a density CSV; a corrupt file is one line naming it."""
    lines = read_text_file(path, written_by="evaluate").splitlines()
    if not lines or tuple(lines[0].split(",")) != DENSITY_HEADER:
        raise UserError(f"{path}: not a density histogram (expected the header {','.join(DENSITY_HEADER)})")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        try:
            centre, count = line.split(",")
            rows.append((float(centre), int(count)))
        except ValueError:
            raise UserError(f"{path}: line {number} is not 'log10_density,features' numbers: {line[:60]!r}") from None
    return rows


def format_metrics(metrics: dict) -> list[str]:
    """One terminal line per metric; dead fraction always with its token count."""
    lines = []
    for key in METRIC_NAMES:
        value = metrics.get(key)
        text = "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"
        if key == "dead_fraction":
            text += f" (over {metrics['dead_fraction_tokens']:,} tokens)"
        lines.append(f"{key:>20}: {text}")
    return lines
