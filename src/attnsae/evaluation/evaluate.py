"""The `evaluate` stage: every metric of docs/design.md 4 for each layer's SAE, on the evaluation and held-out splits.

Reads ``models/base``, ``data/tokens`` and the SAE folders; writes, per layer, ``reports/metrics/L<n>.json``,
``reports/metrics_heldout/L<n>.json`` and ``reports/density/L<n>.csv``, which report, publish and verify read back
with ``formats.metrics`` (their names, types and readers). Every path: layout.py.

All layers are measured in one pass over the rows, because the clean forward pass is the same for each. Per
batch, the model runs once, clean, keeping what each SAE's block receives; then, for each layer L, the rest of
the model runs twice from block L:
- hook_z replaced by the SAE reconstruction ([b,p,h,d] -> [b*p, h*d] -> SAE -> back; the SAE reads the clean z),
- hook_z set to zero (the attention output becomes b_O).
Losses are mean next-token cross-entropy over all positions, kept as sums per row, so that each reported L is
a mean over all evaluation tokens (loss recovered is a ratio of those means) and each has a standard error
from a bootstrap over rows (``bootstrap_se``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from attnsae.config import EvaluateConfig
from attnsae.data.activations import flatten_heads, rows_as_tensor, unflatten_heads
from attnsae.data.models import hook_z_name, load_bridge, resolve_device
from attnsae.data.tokenization import load_rows
from attnsae.errors import UserError
from attnsae.files import write_json_atomic, write_text_atomic
from attnsae.formats.metrics import SE_METRICS, density_csv
from attnsae.formats.model_info import ModelInfo, read_model_info
from attnsae.formats.tokens_meta import read_tokens_meta
from attnsae.sae.autoencoder import SAE, load_sae

# What each evaluation row contributes: summed over its next-token predictions (CE) or its tokens (KL, L0).
ROW_SUMS = ("ce_clean", "ce_sae", "ce_zero", "kl_sae", "kl_zero", "l0", "predictions", "tokens")
BOOTSTRAP_CHUNK = 1 << 22  # resampled row indices drawn at a time, bounding the bootstrap's memory


@dataclass
class Totals:
    """Sums over evaluation tokens, filled batch by batch: per row for the metrics with a standard error, over all
    tokens for the reconstruction and firing statistics."""

    d_sae: int
    d_in: int

    def __post_init__(self) -> None:
        self.rows: dict[str, list[np.ndarray]] = {key: [] for key in ROW_SUMS}
        self.tokens = 0  # activations (every position)
        self.squared_error = 0.0
        self.x_sum = torch.zeros(self.d_in, dtype=torch.float64)
        self.x_sq_sum = torch.zeros(self.d_in, dtype=torch.float64)
        self.fires = torch.zeros(self.d_sae, dtype=torch.float64)

    def add_activations(self, x: torch.Tensor, x_hat: torch.Tensor, features: torch.Tensor, batch: int) -> None:
        """One batch's hook_z (``batch`` rows, flattened to [rows * positions, d_in]) and its SAE's output."""
        x64 = x.double().cpu()
        self.tokens += len(x)
        self.squared_error += (x_hat - x).pow(2).sum().item()
        self.x_sum += x64.sum(0)
        self.x_sq_sum += x64.pow(2).sum(0)
        fired = features > 0
        self.add_rows(l0=fired.sum(-1).view(batch, -1).sum(-1).double().cpu().numpy())
        self.fires += fired.sum(0).double().cpu()

    def add_rows(self, **sums: np.ndarray) -> None:
        for key, values in sums.items():
            self.rows[key].append(np.asarray(values, dtype=np.float64))

    def row_sums(self) -> dict[str, np.ndarray]:
        return {key: np.concatenate(parts) if parts else np.zeros(0) for key, parts in self.rows.items()}


def token_ce(log_probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-position next-token cross-entropy from log-probabilities [batch, pos, vocab]: [batch, pos-1]."""
    return -log_probs[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1)


def kl_div(clean_log_probs: torch.Tensor, other_log_probs: torch.Tensor,
           clean_probs: torch.Tensor | None = None) -> torch.Tensor:
    """KL(clean || other) per position from log-probabilities [..., vocab]: [...]. ``clean_probs``: the clean
    log-probabilities' exp, when it is at hand (a batch's clean pass is compared with several others)."""
    p = clean_log_probs.exp() if clean_probs is None else clean_probs
    return torch.einsum("...v,...v->...", p, clean_log_probs - other_log_probs)


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().log_softmax(-1)


def summed_metrics(totals: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The metrics with a standard error, from sums over rows (each entry one sum, or one per bootstrap resample):
    means over tokens, and the ratios of those means. A ratio whose denominator is 0 is not finite."""
    ce = {k: totals[f"ce_{k}"] / totals["predictions"] for k in ("clean", "sae", "zero")}
    kl = {k: totals[f"kl_{k}"] / totals["tokens"] for k in ("sae", "zero")}
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "l0": totals["l0"] / totals["tokens"],
            "loss_recovered": (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]),
            "ce_clean": ce["clean"],
            "ce_sae": ce["sae"],
            "ce_zero": ce["zero"],
            "ce_increase": ce["sae"] - ce["clean"],
            "ce_increase_zero": ce["zero"] - ce["clean"],
            "kl_sae": kl["sae"],
            "kl_zero": kl["zero"],
            "kl_score": 1.0 - kl["sae"] / kl["zero"],
        }


def bootstrap_se(row_sums: dict[str, np.ndarray], resamples: int, seed: int) -> dict[str, float | None]:
    """The standard error of each metric of ``summed_metrics``: the standard deviation of the metric over
    ``resamples`` resamples of the rows with replacement (seeded), each metric recomputed on each resample from
    its sums (a ratio as a ratio of means). None where a resample leaves a ratio undefined."""
    n_rows = len(row_sums["tokens"])
    rng = np.random.default_rng(seed)
    chunk = max(1, BOOTSTRAP_CHUNK // n_rows)
    draws: list[dict[str, np.ndarray]] = []
    for start in range(0, resamples, chunk):
        index = rng.integers(0, n_rows, size=(min(chunk, resamples - start), n_rows))
        draws.append(summed_metrics({key: values[index].sum(1) for key, values in row_sums.items()}))
    values = {name: np.concatenate([d[name] for d in draws]) for name in SE_METRICS}
    return {name: float(v.std(ddof=1)) if np.all(np.isfinite(v)) else None for name, v in values.items()}


def explained_variance_from_sums(squared_error: float, x_sum: torch.Tensor, x_sq_sum: torch.Tensor,
                                 n: int) -> float | None:
    total = (x_sq_sum - x_sum.pow(2) / n).sum().item()
    return None if total <= 0 else 1.0 - squared_error / total


def density_histogram(log10_density: np.ndarray, bins: int) -> dict[str, list[float]]:
    """Histogram of log10 feature density over the features that fired (dead features are counted apart)."""
    alive = log10_density[np.isfinite(log10_density)]
    edges = np.linspace(-8.0, 0.0, bins + 1)
    counts, _ = np.histogram(np.clip(alive, -8.0, 0.0), bins=edges)
    return {"bin_edges": edges.tolist(), "counts": counts.tolist()}


def finish(t: Totals, cfg: EvaluateConfig) -> tuple[dict, np.ndarray]:
    """The metrics (each with a standard error where it has one) and the log10 feature densities."""
    row_sums = t.row_sums()
    point = summed_metrics({key: values.sum() for key, values in row_sums.items()})
    se = bootstrap_se(row_sums, cfg.bootstrap_resamples, cfg.bootstrap_seed)
    density = (t.fires / t.tokens).numpy()
    with np.errstate(divide="ignore"):
        log10_density = np.log10(density)
    means = {name: float(value) if np.isfinite(value) else None for name, value in point.items()}
    metrics = {
        **means,
        "mse": t.squared_error / t.tokens,
        "explained_variance": explained_variance_from_sums(t.squared_error, t.x_sum, t.x_sq_sum, t.tokens),
        "dead_fraction": float((t.fires == 0).double().mean()),
        "dead_fraction_tokens": t.tokens,
        "dense_fraction": float((density > cfg.dense_threshold).mean()),
        "dense_threshold": cfg.dense_threshold,
        "eval_tokens": t.tokens,
        **{f"{name}_se": None if means[name] is None else se[name] for name in SE_METRICS},
        "bootstrap_resamples": cfg.bootstrap_resamples,
    }
    return metrics, log10_density


def block_inputs(bridge, tokens: torch.Tensor, layers: Sequence[int]) -> dict[int, tuple[tuple, dict]]:
    """What each block from the first of ``layers`` on receives when the model runs on ``tokens`` (its hidden states
    first, then the model's masks and position data), from one full run. Every block's own: Gemma 2's alternate
    between a sliding-window and a global mask."""
    received: dict[int, tuple[tuple, dict]] = {}

    def keeper(layer: int):
        def keep(module, args, kwargs):
            received[layer] = (args, kwargs)
        return keep

    handles = [bridge.blocks[layer].register_forward_pre_hook(keeper(layer), with_kwargs=True)
               for layer in range(min(layers), len(bridge.blocks))]
    try:
        bridge(tokens, return_type=None, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return received


def logits_from_block(bridge, layer: int, inputs: dict[int, tuple[tuple, dict]]) -> torch.Tensor:
    """The model's logits, run on from block ``layer`` given what the blocks receive (``block_inputs``): the rest of
    a full forward pass, hooks included (tests/test_metrics.py checks it against one), each block with its own masks,
    and the model's final soft-cap of the logits where it has one (Gemma 2)."""
    hidden = inputs[layer][0][0]
    for index in range(layer, len(bridge.blocks)):
        args, kwargs = inputs[index]
        out = bridge.blocks[index](hidden, *args[1:], **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    logits = bridge.unembed(bridge.ln_final(hidden))
    cap = getattr(bridge.cfg, "output_logits_soft_cap", -1.0) or -1.0
    return cap * torch.tanh(logits / cap) if cap > 0 else logits


@dataclass
class CleanPass:
    """One batch of rows run through the unmodified model: every SAE's layer compares against it."""

    tokens: torch.Tensor
    log_probs: torch.Tensor  # [batch, pos, vocab]
    probs: torch.Tensor  # its exp, once for every KL of the batch


def row_sum(values: torch.Tensor) -> np.ndarray:
    return values.double().sum(-1).cpu().numpy()


def measure_layer(bridge, sae: SAE, layer: int, inputs: dict[int, tuple[tuple, dict]], clean: CleanPass,
                  totals: Totals) -> dict[str, np.ndarray]:
    """One batch's per-row CE and KL sums with ``layer``'s hook_z replaced by the SAE's reconstruction and set to
    zero, run on from what the block receives; the SAE's activations go into ``totals``."""
    name = hook_z_name(layer)
    fired: list[bool] = []

    def replace_with_sae(z, hook):
        x = flatten_heads(z.float())
        features = sae.encode(x)
        x_hat = sae.decode(features)
        totals.add_activations(x, x_hat, features, batch=z.shape[0])
        fired.append(True)
        return unflatten_heads(x_hat, z).to(z.dtype)

    def zero(z, hook):
        return torch.zeros_like(z)

    sums = {}
    for key, hook in (("sae", replace_with_sae), ("zero", zero)):
        with bridge.hooks(fwd_hooks=[(name, hook)]):
            other = log_probs(logits_from_block(bridge, layer, inputs))
        sums[f"ce_{key}"] = row_sum(token_ce(other, clean.tokens))
        sums[f"kl_{key}"] = row_sum(kl_div(clean.log_probs, other, clean.probs))
        del other
    if not fired:
        raise UserError(f"hook {name} did not fire; is layer {layer} in the model?")
    return sums


@torch.inference_mode()
def evaluate_saes(bridge, saes: dict[int, SAE], rows: np.ndarray, cfg: EvaluateConfig,
                  device: torch.device) -> dict[int, tuple[dict, np.ndarray]]:
    """Every metric of each SAE (by its layer) on ``rows``: (metrics, log10 feature densities) per layer.

    Per batch, the model runs once, keeping what each block from the first SAE's layer on receives, and on from the
    deepest SAE's block for the clean logits; each layer then runs the rest of the model twice from its own block
    (SAE, zero). Four quickstart layers of SmolLM2's 30 cost 5.6 full passes instead of 8.4 when evaluated apart."""
    if len(rows) == 0:
        raise UserError("evaluate: the evaluation split is empty (no rows); nothing to measure")
    if not saes:
        raise UserError("evaluate: no SAE to evaluate")
    saes = {layer: sae.to(device).eval() for layer, sae in sorted(saes.items())}
    totals = {layer: Totals(d_sae=sae.d_sae, d_in=sae.d_in) for layer, sae in saes.items()}
    deepest = max(saes)
    for start in range(0, len(rows), cfg.batch_rows):
        tokens = rows_as_tensor(rows[start : start + cfg.batch_rows], device)
        entries = block_inputs(bridge, tokens, list(saes))
        clean_log_probs = log_probs(logits_from_block(bridge, deepest, entries))
        clean = CleanPass(tokens, clean_log_probs, clean_log_probs.exp())
        ce_clean = row_sum(token_ce(clean.log_probs, tokens))
        n_rows, positions = tokens.shape
        for layer, sae in saes.items():
            sums = measure_layer(bridge, sae, layer, entries, clean, totals[layer])
            totals[layer].add_rows(predictions=np.full(n_rows, positions - 1), tokens=np.full(n_rows, positions),
                                   ce_clean=ce_clean, **sums)
        del clean, entries
    return {layer: finish(t, cfg) for layer, t in totals.items()}


def evaluate_sae(bridge, sae: SAE, layer: int, rows: np.ndarray, cfg: EvaluateConfig,
                 device: torch.device) -> tuple[dict, np.ndarray]:
    """``evaluate_saes`` for one SAE."""
    return evaluate_saes(bridge, {layer: sae}, rows, cfg, device)[layer]


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


@dataclass(frozen=True)
class EvaluationFiles:
    """Where one layer's results go; None: not written."""

    metrics: str | Path | None
    density: str | Path | None = None
    heldout: str | Path | None = None  # the held-out split's metrics, or a note that the tokens have none


def evaluate_layers(cfg: EvaluateConfig, model_dir: str | Path, tokens_dir: str | Path,
                    sae_dirs: dict[int, str | Path], files: dict[int, EvaluationFiles]) -> dict[int, dict]:
    """The stage: evaluate hook_z SAE folders (ours, imported, SAELens; ``sae_dirs`` by layer, each checked against
    its cfg.json) on the first ``max_rows`` eval rows, together, and on as many held-out rows where a layer's
    ``files`` asks for them. Writes each layer's files and returns its metrics by layer."""
    if not sae_dirs:
        raise UserError("evaluate: no SAE to evaluate")
    loaded = {layer: load_sae_for_model(sae_dir, model_dir, layer) for layer, sae_dir in sae_dirs.items()}
    info = next(iter(loaded.values()))[2]
    rows = first_rows(load_rows(tokens_dir, "eval", vocab_size=info.vocab_size), cfg)  # checked before the model loads
    wants_heldout = any(f.heldout is not None for f in files.values())
    heldout_sources = read_tokens_meta(tokens_dir)["heldout_sources"] if wants_heldout else []
    heldout_rows = (first_rows(load_rows(tokens_dir, "heldout", vocab_size=info.vocab_size), cfg) if heldout_sources
                    else None)
    device = resolve_device(cfg.device)
    bridge, _ = load_bridge(model_dir, device)
    saes = {layer: sae for layer, (sae, _, _) in loaded.items()}

    def measured(split_rows: np.ndarray) -> dict[int, tuple[dict, np.ndarray]]:
        return {layer: ({"layer": layer, "hook_name": hook_z_name(layer), "model": info.name,
                         "d_sae": saes[layer].d_sae, "sae": str(sae_dirs[layer]), "eval_rows": int(len(split_rows)),
                         **metrics}, log10_density)
                for layer, (metrics, log10_density) in evaluate_saes(bridge, saes, split_rows, cfg, device).items()}

    results = measured(rows)
    heldout_results = measured(heldout_rows) if heldout_rows is not None else {}
    for layer, (metrics, log10_density) in results.items():
        where = files.get(layer, EvaluationFiles(None))
        if where.metrics is not None:
            write_json_atomic(where.metrics, metrics)
        if where.density is not None:
            write_text_atomic(where.density, density_csv(density_histogram(log10_density, cfg.density_bins)))
        if where.heldout is not None:
            heldout = {"layer": layer, "split": "heldout", "sources": heldout_sources}
            if layer in heldout_results:
                heldout = {**heldout, **heldout_results[layer][0]}
            write_json_atomic(where.heldout, heldout)
    return {layer: metrics for layer, (metrics, _) in results.items()}


def first_rows(rows: np.ndarray, cfg: EvaluateConfig) -> np.ndarray:
    return rows[: cfg.max_rows] if cfg.max_rows else rows
