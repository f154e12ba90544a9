"""The `train` stages: SAEs on hook_z, following the recipe of docs/design.md 3 exactly.

Reads ``data/activations/L<n>`` (or, streaming, ``models/base``, ``data/corpus`` and ``data/tokens``); writes
``models/sae/L<n>`` (read back with ``sae.autoencoder.load_sae`` by evaluate, report and publish),
``reports/curves/L<n>.csv`` and, while running, ``checkpoints/`` (``load_checkpoint``). Every path: layout.py.

`train@L` trains one layer from the activation cache; the streaming `train` stage trains several
layers in lockstep from one model pass. Both go through ``train_saes`` and one ``LayerTrainer`` per SAE.

Per step: LR from the cosine warm-up (restarted after each resample); loss = summed MSE + L1;
backward; project out the gradient along each decoder row and renormalise the rows; Adam step.
Every ``resample_every`` steps (at most ``max_resamples`` times) features whose firing frequency over
the last ``dead_window`` steps is <= ``dead_cutoff`` are resampled from badly reconstructed inputs.

Faults end a run in one line and never leave a result behind: a NaN/Inf loss or weight stops it
(``NonFinite``, named per layer by ``train_saes``); activation rows holding NaN/Inf are dropped and
counted (``FiniteRows``), and too many of them stop it; SIGTERM/SIGINT save a checkpoint at the end
of the step and stop it (``TrainingInterrupted``); a damaged checkpoint file is named, not unpickled.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from attnsae import layout
from attnsae.config import ModelConfig, SAEConfig
from attnsae.data.activations import RowSource, ShuffledBuffer, autocast
from attnsae.data.models import resolve_device
from attnsae.errors import UserError
from attnsae.files import write_text_atomic
from attnsae.sae.autoencoder import SAE
from attnsae.sae.checkpoints import (
    checkpoint_key,
    drop_checkpoint,
    interrupted,
    load_checkpoint,
    save_checkpoint,
    stop_signals_deferred,
)
from attnsae.sae.objectives import make_objective, resolve_kernel
from attnsae.sae.sharding import WHOLE_BATCH, Shard

RESAMPLE_ENCODER_SCALE = 0.2  # new encoder columns: this times the mean norm of alive columns
CURVE_FIELDS = ("step", "tokens", "loss", "mse", "l1", "l0", "explained_variance", "dead_fraction", "lr")
MAX_NONFINITE_ROW_FRACTION = 0.01  # more NaN/Inf activation rows than this means the activations are broken
COMPILE_BACKEND = "inductor"  # torch.compile's default; tests swap in "aot_eager" (the same graphs, no codegen)


class NonFinite(Exception):
    """A trainer's loss or weights became NaN/Inf; ``train_saes`` turns it into a ``UserError`` naming the layer.

    ``step``: where it happened, when known (otherwise the step ``train_saes`` was running).
    """

    def __init__(self, what: str, step: int | None = None):
        super().__init__(what)
        self.what, self.step = what, step


@dataclass
class TrainResult:
    sae: SAE
    log10_density: torch.Tensor  # over the last dead_window steps (or all steps if fewer)
    curves: list[dict[str, float]]
    resampled: list[tuple[int, int]] = field(default_factory=list)  # (step, features resampled)
    tokens: int = 0
    nonfinite_rows_dropped: int = 0  # activation rows holding NaN/Inf, never trained on


def cosine_warmup_lr(step_since_reset: int, lr: float, warmup_steps: int) -> float:
    """The recipe's learning rate: cosine from 0.1*lr to lr over ``warmup_steps``, then constant."""
    if warmup_steps <= 0 or step_since_reset >= warmup_steps:
        return lr
    progress = step_since_reset / warmup_steps
    return lr * (0.1 + 0.9 * 0.5 * (1.0 - math.cos(math.pi * progress)))


def make_optimizer(sae: SAE, cfg: SAEConfig) -> torch.optim.Adam:
    """Adam on the fp32 weights; on CUDA its fused kernel (one launch for all parameters instead of several per
    parameter; the update agrees with the loop to float rounding)."""
    fused = True if sae.W_enc.device.type == "cuda" else None  # None: torch's default, the loop on a CPU
    return torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=0.0,
                            fused=fused)


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """TF32 matmuls on CUDA while training with precision tf32; the global setting is restored after."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def sae_autocast(precision: str, device: torch.device):
    """bf16 autocast of the SAE's forward (its backward follows the forward's dtypes); nothing otherwise."""
    return autocast(device, torch.bfloat16 if precision == "bf16" else None)


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
    weights = per_input_squared_error(sae, inputs).double().pow(2)  # in float32 errors above ~1e19 overflow to inf
    if not torch.isfinite(weights).all():  # a diverging SAE whose loss is still finite
        raise NonFinite("the reconstruction errors overflowed while resampling")
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


class LayerTrainer:
    """The recipe's state for one SAE: weights, Adam, the dead-feature window, warm-up restarts.

    ``step`` does one training step on a batch drawn from ``buffer``; several trainers can share
    one activation stream (one per layer) and advance in lockstep.
    """

    def __init__(self, cfg: SAEConfig, d_in: int, device: torch.device, shard: Shard = WHOLE_BATCH):
        self.cfg, self.device, self.shard = cfg, device, shard
        self.objective = make_objective(cfg, d_in, device, shard)
        self.loss = torch.compile(self.objective.loss, backend=COMPILE_BACKEND) if cfg.compile else self.objective.loss
        self.sae = self.objective.new_sae(torch.Generator().manual_seed(cfg.seed)).to(device)
        self.optimizer = make_optimizer(self.sae, cfg)
        self.sample_gen = torch.Generator().manual_seed(cfg.seed + 2)
        self.window_counts = torch.zeros(cfg.d_sae, device=device)
        self.window_tokens = 0
        self.density_from = max(0, cfg.steps - cfg.dead_window)
        self.density_counts = torch.zeros(cfg.d_sae, device=device)
        self.fired_in_window = torch.zeros(cfg.d_sae, dtype=torch.bool, device=device)
        self.last_warmup_start = 0
        self.curves: list[dict[str, float]] = []
        self.resampled: list[tuple[int, int]] = []
        # The first step whose loss was NaN/Inf (-1: none) and that loss, kept on the device: see watch_loss.
        self.nonfinite_step = torch.tensor(-1, device=device)
        self.nonfinite_loss = torch.tensor(0.0, device=device)

    def watch_loss(self, step: int, loss: torch.Tensor) -> None:
        """Remember the first non-finite loss without reading it back.

        Reading the loss every step (``.item()``) would make the CPU wait for the GPU each step; these
        few device ops queue behind the step instead, and ``check_finite`` reads the result on logging,
        checkpoint and resampling steps and at the end. (On the CPU they cost as little as ``.item()``.)
        """
        first = torch.isfinite(loss).logical_not_().logical_and_(self.nonfinite_step < 0)
        self.nonfinite_step.masked_fill_(first, step)
        self.nonfinite_loss = torch.where(first, loss, self.nonfinite_loss)

    def check_finite(self, step: int) -> None:
        """Raise ``NonFinite`` if a loss so far, or a weight now (after ``step``), is NaN/Inf. Waits for the device."""
        first = int(self.nonfinite_step)
        if first >= 0:
            raise NonFinite(f"loss became {float(self.nonfinite_loss)}", first)
        if not all(torch.isfinite(p).all() for p in self.sae.parameters()):
            raise NonFinite("weights became non-finite", step)

    def step(self, step: int, buffer: ShuffledBuffer) -> dict[str, float] | None:
        """One step; returns the logged row on logging steps."""
        cfg = self.cfg
        if is_check_step(step, cfg):
            self.check_finite(step)  # resampling draws inputs by their (finite) reconstruction error
            dead = dead_features(self.window_counts, self.window_tokens, cfg.dead_cutoff)
            n = 0
            if dead.any():  # drawing inputs moves the buffer's generator: only when there is something to revive
                inputs = self.objective.scaled(buffer.sample(cfg.resample_inputs))
                n = resample_dead(self.sae, self.optimizer, dead, inputs, self.sample_gen)
            self.resampled.append((step, n))
            if n:
                self.last_warmup_start = step
        if window_starts_at(step, cfg):
            self.window_counts.zero_()
            self.window_tokens = 0
            self.fired_in_window.zero_()
        lr = cosine_warmup_lr(step - self.last_warmup_start, cfg.lr, cfg.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        x = buffer.next_batch()
        if step == 0:
            self.objective.prepare(self.sae, x)  # from the whole batch, so every shard starts the same
        x = self.objective.scaled(self.shard.rows(x))
        with sae_autocast(cfg.precision, self.device):
            out = self.loss(self.sae, x, step)
        self.watch_loss(step, out.loss.detach())
        out.loss.backward()
        self.shard.average_gradients(self.sae.parameters())
        self.sae.make_decoder_unit_norm_and_project_grad()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.objective.after_step(self.sae, out)

        with torch.no_grad():
            fires = self.shard.reduce(out.features.fires_per_feature())  # over the whole batch
            self.window_counts += fires
            self.window_tokens += len(x) * self.shard.count
            self.fired_in_window |= fires > 0
            if step >= self.density_from:
                self.density_counts += fires
            if step % cfg.log_every and step != cfg.steps - 1:
                return None
            self.check_finite(step)  # never log (or pass to MLflow) a NaN curve
            shown = torch.stack([out.loss.detach().float(), out.mse.detach().float(), out.l1.detach().float(),
                                 out.features.fires_per_row().mean(),
                                 torch.tensor(explained_variance(x, out.x_hat), device=self.device)])
            loss, mse, l1, l0, ev = (self.shard.reduce(shown) / self.shard.count).tolist()  # the slices' mean
            row = {
                "step": step,
                "tokens": (step + 1) * cfg.batch_size,
                "loss": loss,
                "mse": mse / self.objective.input_scale ** 2,  # in the units of the activations
                "l1": l1,
                "l0": l0,
                "explained_variance": ev,
                "dead_fraction": (~self.fired_in_window).float().mean().item(),
                "lr": lr,
            }
        self.curves.append(row)
        return row

    def state_dict(self) -> dict:
        return {
            "sae": {k: v.cpu() for k, v in self.sae.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "sample_gen": self.sample_gen.get_state(),
            "objective": self.objective.state_dict(),
            "window_counts": self.window_counts.cpu(),
            "window_tokens": self.window_tokens,
            "density_counts": self.density_counts.cpu(),
            "fired_in_window": self.fired_in_window.cpu(),
            "last_warmup_start": self.last_warmup_start,
            "curves": self.curves,
            "resampled": self.resampled,
        }

    def load_state_dict(self, state: dict) -> None:
        self.sae.load_state_dict(state["sae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.sample_gen.set_state(state["sample_gen"])
        self.objective.load_state_dict(state["objective"])
        self.window_counts = state["window_counts"].to(self.device)
        self.window_tokens = int(state["window_tokens"])
        self.density_counts = state["density_counts"].to(self.device)
        self.fired_in_window = state["fired_in_window"].to(self.device)
        self.last_warmup_start = int(state["last_warmup_start"])
        self.curves = list(state["curves"])
        self.resampled = [tuple(r) for r in state["resampled"]]

    def result(self, nonfinite_rows_dropped: int = 0) -> TrainResult:
        cfg = self.cfg
        density_tokens = (cfg.steps - self.density_from) * cfg.batch_size
        log10_density = torch.log10(self.density_counts.cpu() / density_tokens + 1e-10)
        return TrainResult(
            sae=self.objective.inference_sae(self.sae).cpu(),
            log10_density=log10_density,
            curves=self.curves,
            resampled=self.resampled,
            tokens=cfg.steps * cfg.batch_size,
            nonfinite_rows_dropped=nonfinite_rows_dropped,
        )


class FiniteRows:
    """A ``RowSource`` that leaves out rows holding NaN/Inf (and counts them), as rows enter training.

    More than ``MAX_NONFINITE_ROW_FRACTION`` of the rows seen so far being non-finite is a broken
    source (a bad cache, a model overflowing in low precision): a ``UserError`` naming ``label``.
    """

    def __init__(self, source: RowSource, label: str):
        self.source, self.label, self.d_in = source, label, source.d_in
        self.seen = 0
        self.dropped = 0

    def take(self, n: int) -> torch.Tensor:
        parts, have = [], 0
        while have < n:
            rows = self.source.take(n - have)
            finite = rows[torch.isfinite(rows).all(-1)]
            self.seen += len(rows)
            self.dropped += len(rows) - len(finite)
            if self.dropped > MAX_NONFINITE_ROW_FRACTION * self.seen:
                raise UserError(
                    f"{self.label}: the activations are broken: {self.dropped:,} of the first {self.seen:,} rows hold "
                    f"NaN/Inf (at most {MAX_NONFINITE_ROW_FRACTION:.0%} allowed); rebuild the activation cache, "
                    "or when streaming try model.precision fp32"
                )
            parts.append(finite)
            have += len(finite)
        return torch.cat(parts)

    def state_dict(self) -> dict:
        inner = self.source.state_dict() if hasattr(self.source, "state_dict") else {}
        return {"source": inner, "seen": self.seen, "dropped": self.dropped}

    def load_state_dict(self, state: dict) -> None:
        if state["source"]:
            self.source.load_state_dict(state["source"])
        self.seen, self.dropped = int(state["seen"]), int(state["dropped"])


def _check_steps(cfg: SAEConfig) -> int:
    if cfg.steps <= 0:
        raise UserError(f"sae.train_tokens ({cfg.train_tokens}) is smaller than one batch ({cfg.batch_size})")
    return cfg.steps


def train_sae(
    cfg: SAEConfig,
    source: RowSource,
    on_log: Callable[[dict[str, float]], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train one SAE on one row source."""
    return train_saes({0: cfg}, {0: source}, progress=progress, on_log=on_log)[0]


def use_deterministic_kernels(on: bool) -> None:
    """Switch torch to deterministic kernels (cuBLAS needs its workspace setting before the first call)."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on)


def diverged(layer: int, cfg: SAEConfig, err: NonFinite, step: int, checkpoint: Path | None,
             last_saved: int | None) -> UserError:
    kept = (f"the last good checkpoint ({checkpoint}, step {last_saved}) is kept" if last_saved is not None
            else "no checkpoint of this run was saved")
    return UserError(f"train L{layer}: {err.what} at step {step} (lr {cfg.lr:g}, {cfg.sparsity()}): "
                     f"nothing written; {kept}")


def train_saes(
    cfgs: dict[int, SAEConfig],
    sources: dict[int, RowSource],
    progress: bool = True,
    on_log: Callable[[dict[str, float]], None] | None = None,
    checkpoint: Path | None = None,
    checkpoint_every: int = 0,
    on_step: Callable[[int], None] | None = None,
    shared=None,
    data_key: str = "",
    shard: Shard = WHOLE_BATCH,
) -> dict[int, TrainResult]:
    """Train one SAE per key in lockstep, each with its own buffer over its own source.

    When the sources are views of one shared stream, one model forward feeds every SAE. Each SAE's
    arithmetic and random draws are the same as when trained alone (its generators are its own).
    ``shared`` (such a stream) is saved in checkpoints with the trainers; ``data_key`` names the
    data, so a checkpoint made on other data is not resumed.

    A checkpoint is saved every ``checkpoint_every`` steps and on SIGTERM/SIGINT, which then stop the
    run with ``TrainingInterrupted``. A NaN/Inf loss or weight stops it with a ``UserError``; no
    checkpoint is saved past the last finite state. ``shard``: this process's slice of every batch when
    several train the same SAEs data-parallel (sharding.py; the launcher starts them); only the owner of
    slice 0 saves checkpoints.
    """
    first = next(iter(cfgs.values()))
    steps = _check_steps(first)
    shared_settings = ("steps", "batch_size", "buffer_rows", "device", "precision")
    for key, cfg in cfgs.items():
        if any(getattr(cfg, name) != getattr(first, name) for name in shared_settings):
            raise UserError(
                f"layers trained together must share sae.train_tokens, batch_size, buffer_rows, device and "
                f"precision (layer {key} differs)"
            )
    if first.batch_size % shard.count:
        raise UserError(f"sae.batch_size ({first.batch_size}) must be a multiple of the {shard.count} processes "
                        f"that share each batch")
    device = resolve_device(first.device)
    use_deterministic_kernels(any(cfg.deterministic for cfg in cfgs.values()))
    torch.manual_seed(first.seed)
    rows = {key: FiniteRows(sources[key], f"train L{key}") for key in cfgs}
    trainers, buffers = {}, {}
    for key, cfg in cfgs.items():
        trainers[key] = LayerTrainer(cfg, rows[key].d_in, device, shard)
        buffers[key] = ShuffledBuffer(
            rows[key], cfg.buffer_rows, cfg.batch_size, torch.Generator().manual_seed(cfg.seed + 1), device
        )
    start = 0
    run_key = checkpoint_key(cfgs, data_key)
    saved = load_checkpoint(checkpoint, run_key) if checkpoint else None
    if saved is not None:
        start = int(saved["step"])
        torch.set_rng_state(saved["torch_rng"])
        if shared is not None:
            shared.load_state_dict(saved["shared"])
        for n in trainers:
            layer_state = saved["layers"][str(n)]
            trainers[n].load_state_dict(layer_state["trainer"])
            buffers[n].load_state_dict(layer_state["buffer"])
            rows[n].load_state_dict(layer_state["source"])
        print(f"resuming from {checkpoint} at step {start}")
    last_saved = start if saved is not None else None
    label = f"train {len(cfgs)} SAEs" if len(cfgs) > 1 else f"train d_sae={first.d_sae}"
    layer, step = next(iter(cfgs)), start  # a NonFinite is about the layer and step the loops are at
    try:
        with stop_signals_deferred() as received, matmul_precision(first.precision), tqdm(
                range(start, steps), desc=label, unit="step", disable=not progress, initial=start, total=steps) as bar:
            for step in bar:
                for layer, trainer in trainers.items():
                    row = trainer.step(step, buffers[layer])
                    if row is not None and len(trainers) == 1:
                        bar.set_postfix(loss=f"{row['loss']:.3g}", l0=f"{row['l0']:.1f}")
                        if on_log:
                            on_log(row)
                if on_step:
                    on_step(step)
                done = step + 1
                if done == steps:
                    break  # a signal during the last step: the run is complete, let it finish
                if checkpoint and shard.owner and (received or (checkpoint_every and done % checkpoint_every == 0)):
                    for layer, trainer in trainers.items():  # noqa: B007 (the except below names `layer`)
                        trainer.check_finite(step)  # never checkpoint a NaN/Inf state
                    save_checkpoint(checkpoint, done, run_key, trainers, buffers, rows, shared)
                    last_saved = done
                if received:
                    raise interrupted(received[0], done, checkpoint if shard.owner else None)
        for layer, trainer in trainers.items():  # noqa: B007 (the except below names `layer`)
            trainer.check_finite(steps - 1)
    except NonFinite as err:
        at = err.step if err.step is not None else step
        raise diverged(layer, cfgs[layer], err, at, checkpoint, last_saved) from None
    return {key: trainer.result(rows[key].dropped) for key, trainer in trainers.items()}


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


def _save_layer(result: TrainResult, cfg: SAEConfig, layer: int, meta: dict, out_dir, curves_path, run) -> None:
    from attnsae.formats.sae_cfg import sae_cfg
    from attnsae.sae.autoencoder import save_sae

    cfg_json = sae_cfg(
        d_in=result.sae.d_in,
        d_sae=cfg.d_sae,
        hook_name=meta["hook_name"],
        layer=layer,
        model_name=meta["model_source"],
        context_size=meta["context_size"],
        dataset=meta["dataset"],
        kind=result.sae.kind,
        k=result.sae.k,
        extra={"attnsae": {"train": trained_recipe(cfg), "trained_tokens": result.tokens, "resampled": result.resampled,
                           "nonfinite_rows_dropped": result.nonfinite_rows_dropped}},
    )
    save_sae(result.sae, out_dir, cfg_json, result.log10_density)
    write_curves(curves_path, result.curves)
    if run is not None:
        run.log_curves(result.curves)
        run.log_artifact(Path(out_dir) / "cfg.json", "sae")
        run.log_artifact(curves_path)
        run.register_sae(out_dir, meta["model_source"], layer)  # the weights stay in DVC; the registry points at them
    final = result.curves[-1]
    print(
        f"train L{layer}: {result.tokens:,} tokens, final loss {final['loss']:.4g}, L0 {final['l0']:.1f}, "
        f"resampled {sum(n for _, n in result.resampled)}, non-finite rows dropped {result.nonfinite_rows_dropped:,}"
    )


def trained_recipe(cfg: SAEConfig) -> dict:
    """The settings as trained: ``cfg``'s recipe with the kernel auto chose on this device."""
    return {**cfg.recipe(), "kernel": resolve_kernel(cfg, resolve_device(cfg.device))}


def _log_params(run, cfg: SAEConfig, layer: int, meta: dict) -> None:
    if run is not None:
        run.log_params({"layer": layer, "hook_name": meta["hook_name"], "model": meta["model"],
                        **trained_recipe(cfg)})


@dataclass(frozen=True)
class CachedActivations:
    """train@L's data: one layer's activation cache under ``root`` (the cache pipeline)."""

    root: str | Path


@dataclass(frozen=True)
class StreamedActivations:
    """The stream pipeline's data: the model run on the fly over the corpus's train documents, one forward pass
    per ``batch_rows`` token rows feeding every layer's SAE."""

    model_cfg: ModelConfig
    batch_rows: int
    model_dir: str | Path
    corpus_dir: str | Path
    tokens_dir: str | Path


def train_layer(
    cfg: SAEConfig,
    layer: int,
    activations_dir: str | Path,
    out_dir: str | Path,
    curves_path: str | Path,
    run=None,
    checkpoint: Path | None = None,
    checkpoint_every: int = 0,
) -> TrainResult:
    """The stage, from the disk cache: read the layer's activations, train, write the SAE folder and curves."""
    from attnsae.data.activations import DiskActivations

    source = DiskActivations(layout.activations_dir(layer, activations_dir))
    _log_params(run, cfg, layer, source.meta)
    result = train_saes({layer: cfg}, {layer: source}, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
                        data_key=json.dumps(source.meta, sort_keys=True))[layer]
    _save_layer(result, cfg, layer, source.meta, out_dir, curves_path, run)
    drop_checkpoint(checkpoint)
    print(f"train L{layer}: {result.tokens / len(source):.1f} passes over the {len(source):,}-row cache")
    return result


def train_layers_streaming(
    cfgs: dict[int, SAEConfig],
    data: StreamedActivations,
    out_dirs: dict[int, Path],
    curves_paths: dict[int, Path],
    runs: dict[int, object],
    checkpoint: Path | None,
    checkpoint_every: int,
    shard: Shard,
) -> dict[int, TrainResult]:
    """Train every layer in ``cfgs`` from one model forward per batch of token rows (no disk cache).

    Token rows are packed on the fly from the corpus's train documents (stored or streamed from its
    pinned sources), split as the tokenize stage split them, in source order and never repeated. With a
    ``shard`` of several processes (data parallel), only the owner of slice 0 writes the files.
    """
    from attnsae.data.activations import ModelStream
    from attnsae.data.corpus import open_documents, read_manifest
    from attnsae.data.harvest import HarvestingForward, load_harvesting_model
    from attnsae.data.models import hook_z_name, load_tokenizer
    from attnsae.data.tokenization import train_row_stream
    from attnsae.formats.model_info import read_model_info
    from attnsae.formats.tokens_meta import read_tokens_meta

    device = resolve_device(data.model_cfg.device)
    info = read_model_info(data.model_dir)
    for layer in cfgs:
        info.check_layer(layer)
    tokens_meta = read_tokens_meta(data.tokens_dir)
    rows = train_row_stream(open_documents(data.corpus_dir), tokens_meta, load_tokenizer(data.model_dir))
    harvest = HarvestingForward(load_harvesting_model(data.model_dir, device), sorted(cfgs), data.model_cfg.precision)
    stream = ModelStream(harvest, rows, data.batch_rows, info.d_in, device)
    metas = {
        layer: {
            "hook_name": hook_z_name(layer),
            "model": info.name,
            "model_source": info.source,
            "context_size": tokens_meta["context_size"],
            "dataset": tokens_meta.get("corpus", ""),
        }
        for layer in cfgs
    }
    for layer, cfg in cfgs.items():
        _log_params(runs.get(layer), cfg, layer, metas[layer])  # the caller opens runs on the owner only
    data_key = json.dumps({"corpus": read_manifest(data.corpus_dir), "tokens": tokens_meta, "model": info.source,
                           "batch_rows": data.batch_rows, "precision": data.model_cfg.precision}, sort_keys=True)
    results = train_saes(cfgs, {layer: stream.view(layer) for layer in cfgs}, checkpoint=checkpoint,
                         checkpoint_every=checkpoint_every, shared=stream, data_key=data_key, shard=shard)
    if shard.owner:
        for layer, result in results.items():
            _save_layer(result, cfgs[layer], layer, metas[layer], out_dirs[layer], curves_paths[layer],
                        runs.get(layer))
        drop_checkpoint(checkpoint)
    print(f"train: {stream.forward_passes} model forward passes ({stream.tokens:,} tokens, "
          f"{rows.documents_read:,} documents read) fed {len(cfgs)} SAEs")
    return results


def run_train_stage(
    cfgs: dict[int, SAEConfig],
    data: CachedActivations | StreamedActivations,
    out_dirs: dict[int, Path],
    curves_paths: dict[int, Path],
    runs: dict[int, object] | None = None,
    checkpoint: Path | None = None,
    checkpoint_every: int = 0,
    shard: Shard = WHOLE_BATCH,
) -> dict[int, TrainResult]:
    """The stage (`train@L` from the cache, `train` streaming): train the SAEs of ``cfgs``' layers, write each
    layer's SAE folder and curves, and log to ``runs`` (by layer; None: no MLflow)."""
    runs = runs or {}
    if isinstance(data, CachedActivations):
        if len(cfgs) != 1:
            raise UserError("the activation cache trains one layer per process; several layers share a model pass "
                            "only when streamed (--stream)")
        ((layer, cfg),) = cfgs.items()
        return {layer: train_layer(cfg, layer, data.root, out_dirs[layer], curves_paths[layer], runs.get(layer),
                                   checkpoint, checkpoint_every)}
    return train_layers_streaming(cfgs, data, out_dirs, curves_paths, runs, checkpoint, checkpoint_every, shard)
