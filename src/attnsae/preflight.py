"""What `attnsae check-params` (the pipeline's first stage) judges beyond each value's own range.

DVC deletes a stage's outputs before it runs the stage, so whatever would make a stage fail has to be known here,
before the first stage that holds results. ``config.validate`` checks each value and the rules between values; this
module adds what follows from the model and from the machine:

- the model's bounds: layers below its layer count, the context within its positions, logit tokens within its
  vocabulary. Read from the model's config.json (``data.model_sources``), so no weights are downloaded;
  and the report's reference: the published table only for GPT-2 Small, a metrics folder that exists;
- the devices: a section that asks for ``cuda`` needs a CUDA device on this machine;
- the resources: a lower bound on each stage's memory (on the device it will run on) and on the activation cache's
  disk, against what this machine has. A lower bound counts only the buffers a stage certainly holds at once, so a
  run refused here could never have fit; one that passes may still run out (docs/pipeline.md: the params check).

The checks read params.yaml and the machine, and the check's output file does not depend on either: a passing check
never makes a later stage run again.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnsae import config, layout
from attnsae.data import model_sources
from attnsae.errors import UserError
from attnsae.evaluation.comparison import KEYWORDS, published_reference
from attnsae.formats.model_info import ModelShape

PARAMS = config.PARAMS_FILE
FP32, BF16 = 4, 2  # bytes per value
ADAM_BYTES_PER_PARAM = 16  # fp32 weight, gradient and two moments
FIRING_BYTES = 16  # one firing the dashboards keep: row, position, feature (int32 each), value (float32)
DASHBOARD_L0 = 20  # firings per token assumed where L0 is not set (the post's SAEs fire 3 to 23)
DEVICE_KEYS = ("model.device", "sae.device", "evaluate.device", "dashboards.device")  # every device a stage reads


@dataclass(frozen=True)
class Machine:
    """What this machine offers the stages."""

    memory_bytes: int
    cuda_memory_bytes: int | None  # of the first CUDA device; None: no CUDA device
    cache_disk_bytes: int  # free where the activation cache goes, plus what the cache there holds now (DVC deletes it)


@dataclass(frozen=True)
class Need:
    """One buffer a stage holds: the params key that sizes it, its bytes, and what it is, in words."""

    key: str
    bytes: int
    what: str


@dataclass(frozen=True)
class StageNeeds:
    stage: str
    device_key: str  # the params key of the device it runs on
    needs: tuple[Need, ...]

    @property
    def bytes(self) -> int:
        return sum(need.bytes for need in self.needs)


def check(params: dict[str, Any], machine: Machine) -> None:
    """Everything `attnsae check-params` judges: each value, the model's bounds, the devices, memory and disk."""
    shape = check_params(params)
    check_devices(params, machine)
    check_fits(params, shape, machine)


def check_params(params: dict[str, Any]) -> ModelShape:
    """What the params file alone decides, whatever the machine (`attnsae plan` prices runs for other machines);
    returns the model's shape, read from its config.json."""
    config.validate(params)
    shape = model_sources.source_shape(config.model_config(params).source)
    check_model_bounds(params, shape)
    check_report_reference(params, shape)
    return shape


def check_report_reference(params: dict[str, Any], shape: ModelShape) -> None:
    """``report.compare``: the published table only for GPT-2 Small, and a folder that exists, unless a stage makes it
    (the paper's SAEs' metrics): the report stage would otherwise find out after DVC deleted the report."""
    compare, source = config.report_config(params).compare, config.model_config(params).source
    if compare == "published":
        published_reference(source, source, shape.n_layers, shape.d_in)  # one line naming what is allowed
    elif compare not in KEYWORDS and not Path(compare).is_dir() and layout.stage_output_holding(compare) is None:
        raise UserError(f"{PARAMS}: bad value for 'report.compare': {compare!r} is not a folder (allowed: auto, "
                        f"published, none, or a folder of L<n>.json metrics files)")


def check_model_bounds(params: dict[str, Any], shape: ModelShape) -> None:
    source = config.model_config(params).source
    for layer in config.layers(params):
        if layer >= shape.n_layers:
            raise UserError(f"{PARAMS}: bad value for 'layers': layer {layer} is not in {source} "
                            f"(allowed: 0 to {shape.n_layers - 1})")
    context = config.tokenize_config(params).context_size
    if context > shape.n_positions:
        raise UserError(f"{PARAMS}: bad value for 'tokenize.context_size': {source} takes at most {shape.n_positions} "
                        f"positions (allowed: 2 to {shape.n_positions}, got {context})")
    logit_tokens = config.dashboards_config(params).logit_tokens
    if logit_tokens > shape.vocab_size:
        raise UserError(f"{PARAMS}: bad value for 'dashboards.logit_tokens': {source} has {shape.vocab_size} tokens "
                        f"(allowed: 1 to {shape.vocab_size}, got {logit_tokens})")


def device_setting(params: dict[str, Any], key: str) -> str:
    section, _ = key.split(".")
    return config.section(params, section).device


def runs_on_cuda(params: dict[str, Any], key: str, machine: Machine) -> bool:
    setting = device_setting(params, key)
    return setting == "cuda" or (setting == "auto" and machine.cuda_memory_bytes is not None)


def check_devices(params: dict[str, Any], machine: Machine) -> None:
    if machine.cuda_memory_bytes is not None:
        return
    for key in DEVICE_KEYS:
        if device_setting(params, key) == "cuda":
            raise UserError(f"{PARAMS}: bad value for '{key}': this machine has no CUDA device "
                            f"(allowed here: auto, cpu; got 'cuda')")


def stage_needs(params: dict[str, Any], shape: ModelShape) -> list[StageNeeds]:
    """A lower bound on what each stage holds in memory at once, buffer by buffer."""
    layers = config.layers(params)
    saes = {layer: config.sae_config(params, layer) for layer in layers}
    tokenize = config.tokenize_config(params)
    cache = config.activations_config(params)
    model = Need("model.source", shape.n_params * FP32, f"{config.model_config(params).source}'s fp32 weights")
    stages = []
    if cache.source == "disk":
        shards = len(layers) * min(cache.shard_tokens, cache.tokens) * shape.d_in * BF16
        stages.append(StageNeeds("activations", "model.device", (
            model, Need("activations.shard_tokens", shards, "a bf16 shard of hook_z per layer"),
            _logits(shape, cache.batch_rows, tokenize.context_size, "activations.batch_rows"))))
        stages += [StageNeeds(f"train@{layer}", "sae.device",
                              (*_sae_kept(saes[layer], shape.d_in, _width_key(params, layer)),
                               *_sae_step(saes[layer], shape.d_in)))
                   for layer in layers]
    else:  # one process keeps every layer's SAE and buffer beside the model, and steps one layer at a time
        kept = tuple(need for layer in layers for need in _sae_kept(saes[layer], shape.d_in, _width_key(params, layer)))
        step = max((_sae_step(saes[layer], shape.d_in) for layer in layers),
                   key=lambda needs: sum(n.bytes for n in needs))
        stages.append(StageNeeds("train", "sae.device", (model, *kept, *step)))
    evaluate = config.evaluate_config(params)
    stages.append(StageNeeds("evaluate", "evaluate.device", (
        model, _logits(shape, evaluate.batch_rows, tokenize.context_size, "evaluate.batch_rows"))))
    dashboards = config.dashboards_config(params)
    rows = min((r for r in (dashboards.max_rows, tokenize.max_eval_rows) if r), default=0)  # 0: unknown until tokenized
    for layer in layers:
        cfg = saes[layer]
        l0 = cfg.k if cfg.k is not None else DASHBOARD_L0
        stages.append(StageNeeds(f"dashboards@{layer}", "dashboards.device", (
            model,
            Need("sae.d_sae", (2 * shape.d_in * cfg.d_sae + cfg.d_sae) * FP32, f"layer {layer}'s SAE"),
            Need("dashboards.null_directions", 2 * shape.d_in * dashboards.null_directions * FP32,
                 "the null's encoder"),
            Need("dashboards.max_rows", FIRING_BYTES * l0 * rows * tokenize.context_size,
                 f"the firings of {rows:,} rows at L0 {l0}"),
            Need("dashboards.batch_rows", dashboards.batch_rows * tokenize.context_size
                 * (cfg.d_sae + dashboards.null_directions) * FP32, "one batch's SAE and null activations"))))
    return stages


def _logits(shape: ModelShape, batch_rows: int, context: int, key: str) -> Need:
    return Need(key, batch_rows * context * shape.vocab_size * FP32, "one batch's fp32 logits")


def _width_key(params: dict[str, Any], layer: int) -> str:
    """Where a layer's d_sae is set: its per_layer entry, or the shared sae section."""
    entry = (params.get("per_layer") or {}).get(config.layer_key(layer)) or {}
    return f"per_layer.{config.layer_key(layer)}.d_sae" if "d_sae" in entry else "sae.d_sae"


def _sae_kept(cfg: config.SAEConfig, d_in: int, width_key: str) -> tuple[Need, ...]:
    """What training a layer holds from start to end: the SAE with its Adam state and the shuffled buffer."""
    parameters = 2 * d_in * cfg.d_sae + cfg.d_sae + d_in
    return (
        Need(width_key, parameters * ADAM_BYTES_PER_PARAM, f"the SAE of width {cfg.d_sae} with Adam state"),
        Need("sae.buffer_rows", cfg.buffer_rows * d_in * BF16, f"the shuffled buffer of {cfg.buffer_rows:,} bf16 rows"),
    )


def _sae_step(cfg: config.SAEConfig, d_in: int) -> tuple[Need, ...]:
    """What one step holds on top (the larger of a batch's activations and a resampling's inputs counts)."""
    batch = Need("sae.batch_size", 3 * cfg.batch_size * cfg.d_sae * FP32,
                 "one batch's pre-activations, activations and their gradient")
    resample = Need("sae.resample_inputs", cfg.resample_inputs * d_in * FP32,
                    "the inputs drawn to resample dead features")
    return (max(batch, resample, key=lambda need: need.bytes),)


def check_fits(params: dict[str, Any], shape: ModelShape, machine: Machine) -> None:
    for stage in stage_needs(params, shape):
        on_cuda = runs_on_cuda(params, stage.device_key, machine)
        has = machine.cuda_memory_bytes if on_cuda else machine.memory_bytes
        if stage.bytes > has:
            largest = max(stage.needs, key=lambda need: need.bytes)
            raise UserError(
                f"{PARAMS}: stage {stage.stage} needs at least {human_bytes(stage.bytes)} of "
                f"{'CUDA' if on_cuda else 'machine'} memory and this machine has {human_bytes(has)}; the largest part "
                f"is {largest.what} ({human_bytes(largest.bytes)}): lower '{largest.key}'")
    cache = config.activations_config(params)
    if cache.source == "disk":
        disk = len(config.layers(params)) * cache.tokens * shape.d_in * BF16
        if disk > machine.cache_disk_bytes:
            raise UserError(f"{PARAMS}: bad value for 'activations.tokens': the activation cache needs "
                            f"{human_bytes(disk)} of disk and {layout.ACTIVATIONS_DIR} has "
                            f"{human_bytes(machine.cache_disk_bytes)} (free, and what the cache holds now); "
                            "lower activations.tokens or use activations.source: stream")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def this_machine(root: str | Path = ".") -> Machine:
    """This machine's memory, its CUDA device's memory, and the disk the activation cache would use."""
    import torch  # only here: the checks above are pure and tested with made-up machines

    cuda = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cache = Path(root) / layout.ACTIVATIONS_DIR
    existing = next(p for p in (cache, *cache.parents) if p.exists())
    held = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) if cache.is_dir() else 0
    return Machine(memory_bytes=memory, cuda_memory_bytes=cuda,
                   cache_disk_bytes=shutil.disk_usage(existing).free + held)
