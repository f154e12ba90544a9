"""The `train@L` stage: one SAE on one layer's hook_z, following the recipe of design.md 3 exactly.

Per step: LR from the cosine warm-up (restarted after each resample); loss = summed MSE + L1;
backward; project out the gradient along each decoder row and renormalise the rows; Adam step.
Every ``resample_every`` steps (at most ``max_resamples`` times) features whose firing frequency over
the last ``dead_window`` steps is <= ``dead_cutoff`` are resampled from badly reconstructed inputs.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from attnsae.activations import RowSource, ShuffledBuffer
from attnsae.config import SAEConfig
from attnsae.errors import UserError
from attnsae.files import write_text_atomic
from attnsae.models import resolve_device
from attnsae.sae import SAE, cosine_warmup_lr

RESAMPLE_ENCODER_SCALE = 0.2  # new encoder columns: this times the mean norm of alive columns
CURVE_FIELDS = ("step", "tokens", "loss", "mse", "l1", "l0", "explained_variance", "dead_fraction", "lr")


@dataclass
class TrainResult:
    sae: SAE
    log10_density: torch.Tensor  # over the last dead_window steps (or all steps if fewer)
    curves: list[dict[str, float]]
    resampled: list[tuple[int, int]] = field(default_factory=list)  # (step, features resampled)
    tokens: int = 0


def make_optimizer(sae: SAE, cfg: SAEConfig) -> torch.optim.Adam:
    return torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=0.0)


def dead_features(fire_counts: torch.Tensor, tokens_seen: int, cutoff: float) -> torch.Tensor:
    """Features whose firing frequency (fires per token) is at or below ``cutoff``."""
    return fire_counts.double() / max(tokens_seen, 1) <= cutoff


@torch.no_grad()
def per_input_squared_error(sae: SAE, inputs: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    return torch.cat([(sae.reconstruct(x) - x).pow(2).sum(-1) for x in inputs.split(chunk)])


@torch.no_grad()
def resample_dead(
    sae: SAE, optimizer: torch.optim.Adam, dead: torch.Tensor, inputs: torch.Tensor, generator: torch.Generator
) -> int:
    """Revive dead features on inputs drawn with probability proportional to (squared error)^2.

    Decoder row <- normalised (x - b_dec); encoder column <- the same direction times 0.2 times the
    mean norm of the alive encoder columns; b_enc <- 0; the Adam moments of those entries <- 0.
    Returns the number of features resampled.
    """
    dead_idx = dead.nonzero().squeeze(-1)
    if len(dead_idx) == 0:
        return 0
    weights = per_input_squared_error(sae, inputs).pow(2).double()
    candidates = int((weights > 0).sum())
    if candidates == 0:
        return 0
    dead_idx = dead_idx[:candidates]  # sampling without replacement needs at least one input per feature
    chosen = torch.multinomial(weights.cpu(), len(dead_idx), replacement=False, generator=generator)
    directions = inputs[chosen.to(inputs.device)] - sae.b_dec
    directions = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    alive = ~dead
    alive_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
    sae.W_dec[dead_idx] = directions
    sae.W_enc[:, dead_idx] = directions.T * (alive_norm * RESAMPLE_ENCODER_SCALE)
    sae.b_enc[dead_idx] = 0.0
    for param, index in ((sae.W_enc, (slice(None), dead_idx)), (sae.W_dec, dead_idx), (sae.b_enc, dead_idx)):
        state = optimizer.state.get(param, {})
        for moment in ("exp_avg", "exp_avg_sq"):
            if moment in state:
                state[moment][index] = 0.0
    return len(dead_idx)


def is_check_step(step: int, cfg: SAEConfig) -> bool:
    return step > 0 and step % cfg.resample_every == 0 and step // cfg.resample_every <= cfg.max_resamples


def window_starts_at(step: int, cfg: SAEConfig) -> bool:
    """The dead-feature window covers the last ``dead_window`` steps before each check."""
    return (step + cfg.dead_window) % cfg.resample_every == 0


def train_sae(
    cfg: SAEConfig,
    source: RowSource,
    on_log: Callable[[dict[str, float]], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    steps = cfg.steps
    if steps <= 0:
        raise UserError(f"sae.train_tokens ({cfg.train_tokens}) is smaller than one batch ({cfg.batch_size})")
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    init_gen = torch.Generator().manual_seed(cfg.seed)
    shuffle_gen = torch.Generator().manual_seed(cfg.seed + 1)
    sample_gen = torch.Generator().manual_seed(cfg.seed + 2)

    sae = SAE(source.d_in, cfg.d_sae, generator=init_gen).to(device)
    optimizer = make_optimizer(sae, cfg)
    buffer = ShuffledBuffer(source, cfg.buffer_rows, cfg.batch_size, shuffle_gen, device)

    window_counts = torch.zeros(cfg.d_sae, device=device)
    window_tokens = 0
    density_from = max(0, steps - cfg.dead_window)
    density_counts = torch.zeros(cfg.d_sae, device=device)
    ever_fired_in_window = torch.zeros(cfg.d_sae, dtype=torch.bool, device=device)
    last_warmup_start = 0
    curves: list[dict[str, float]] = []
    resampled: list[tuple[int, int]] = []

    bar = tqdm(range(steps), desc=f"train d_sae={cfg.d_sae}", unit="step", disable=not progress)
    for step in bar:
        if is_check_step(step, cfg):
            dead = dead_features(window_counts, window_tokens, cfg.dead_cutoff)
            n = resample_dead(sae, optimizer, dead, buffer.sample(cfg.resample_inputs), sample_gen) if dead.any() else 0
            resampled.append((step, n))
            if n:
                last_warmup_start = step
        if window_starts_at(step, cfg):
            window_counts.zero_()
            window_tokens = 0
            ever_fired_in_window.zero_()
        lr = cosine_warmup_lr(step - last_warmup_start, cfg.lr, cfg.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr

        x = buffer.next_batch()
        out = sae(x, cfg.l1_coeff)
        out.loss.backward()
        sae.make_decoder_unit_norm_and_project_grad()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        with torch.no_grad():
            fired = out.features > 0
            fires = fired.sum(0).float()
            window_counts += fires
            window_tokens += len(x)
            ever_fired_in_window |= fires > 0
            if step >= density_from:
                density_counts += fires
            if step % cfg.log_every == 0 or step == steps - 1:
                row = {
                    "step": step,
                    "tokens": (step + 1) * cfg.batch_size,
                    "loss": out.loss.item(),
                    "mse": out.mse.item(),
                    "l1": out.l1.item(),
                    "l0": fired.sum(-1).float().mean().item(),
                    "explained_variance": explained_variance(x, out.x_hat),
                    "dead_fraction": (~ever_fired_in_window).float().mean().item(),
                    "lr": lr,
                }
                curves.append(row)
                bar.set_postfix(loss=f"{row['loss']:.3g}", l0=f"{row['l0']:.1f}")
                if on_log:
                    on_log(row)

    density_tokens = (steps - density_from) * cfg.batch_size
    log10_density = torch.log10(density_counts.cpu() / density_tokens + 1e-10)
    return TrainResult(sae=sae.cpu(), log10_density=log10_density, curves=curves, resampled=resampled, tokens=steps * cfg.batch_size)


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """1 - sum((x - x_hat)^2) / sum((x - mean(x))^2), over the batch."""
    residual = (x - x_hat).pow(2).sum()
    total = (x - x.mean(0)).pow(2).sum()
    return (1.0 - residual / total).item() if total > 0 else math.nan


def write_curves(path: str | Path, curves: list[dict[str, float]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CURVE_FIELDS)
    writer.writeheader()
    writer.writerows(curves)
    write_text_atomic(path, buf.getvalue())


def train_layer(
    cfg: SAEConfig,
    layer: int,
    activations_dir: str | Path,
    out_dir: str | Path,
    curves_path: str | Path,
    run=None,
) -> TrainResult:
    """The stage: read the layer's activation cache, train, write the SAE folder and curves, log to ``run``."""
    from attnsae.activations import DiskActivations, layer_dir
    from attnsae.sae import save_sae, sae_cfg

    source = DiskActivations(layer_dir(activations_dir, layer))
    meta = source.meta
    if run is not None:
        run.log_params({"layer": layer, "hook_name": meta["hook_name"], "model": meta["model"], **cfg.model_dump()})
    result = train_sae(cfg, source)
    cfg_json = sae_cfg(
        d_in=source.d_in,
        d_sae=cfg.d_sae,
        hook_name=meta["hook_name"],
        layer=layer,
        model_name=meta["model_source"],
        context_size=meta["context_size"],
        dataset=meta["dataset"],
        extra={"attnsae": {"train": cfg.model_dump(), "trained_tokens": result.tokens, "resampled": result.resampled}},
    )
    save_sae(result.sae, out_dir, cfg_json, result.log10_density)
    write_curves(curves_path, result.curves)
    if run is not None:
        run.log_curves(result.curves)
        run.log_artifact(Path(out_dir) / "cfg.json", "sae")
        run.log_artifact(curves_path)
    final = result.curves[-1]
    print(
        f"train L{layer}: {result.tokens:,} tokens ({result.tokens / len(source):.1f} passes over the cache), "
        f"final loss {final['loss']:.4g}, L0 {final['l0']:.1f}, resampled {sum(n for _, n in result.resampled)}"
    )
    return result
