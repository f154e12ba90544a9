"""`attnsae plan`: what a profile costs before it runs: tokens, steps, FLOPs, memory and time.

Cost model (docs/design.md 7): an SAE training step costs 12 * d_in * d_sae FLOP per token (forward 4,
backward 8); the LM forward costs 2 FLOP per parameter per token, once per token for all selected
layers when they share one pass (the activation cache's tokens for a disk cache). The time estimate
divides FLOPs by matmul throughput measured on this device at the SAE's shape: real steps reach a
fraction of that (82% for the CPU SAE step in BENCHMARKS.md), so read it as optimistic.

The evaluate stage (evaluation/evaluate.py) over T evaluation and held-out tokens: one clean pass for all layers, then
for each layer L the rest of the model twice (SAE, zeroed), 2 * n_params * T * (1 + (n_layers - deepest)/n_layers
+ sum_L 2 (n_layers - L)/n_layers): the clean logits run on again from the deepest layer's block.

The dashboards (features/dashboards.py) of layer L over T tokens: the model up to layer L once (its layer tensors kept
for the shown examples' DFA), 2 * n_params * (L+1)/n_layers * T; the SAE's and the null's encoders,
2 * d_in * (d_sae + null) * T, and the family statistics' reads of every firing feature, at most as much again.
Memory: 16 bytes per nonzero activation (16 * L0 * T) plus one batch's activations (batch tokens x d_sae x 4 B).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from attnsae import config, preflight
from attnsae.config import SAEConfig
from attnsae.preflight import ADAM_BYTES_PER_PARAM, DASHBOARD_L0, FIRING_BYTES, human_bytes

SAE_STEP_FLOP_PER_TOKEN_PER_PARAM = 12  # x d_in * d_sae


@dataclass(frozen=True)
class LayerPlan:
    layer: int
    d_sae: int
    tokens: int
    steps: int
    sae_flop: float
    sae_bytes: int
    buffer_bytes: int


def plan_layer(layer: int, cfg: SAEConfig, d_in: int) -> LayerPlan:
    steps = cfg.steps
    tokens = steps * cfg.batch_size
    params = 2 * d_in * cfg.d_sae + cfg.d_sae + d_in
    return LayerPlan(
        layer=layer,
        d_sae=cfg.d_sae,
        tokens=tokens,
        steps=steps,
        sae_flop=float(SAE_STEP_FLOP_PER_TOKEN_PER_PARAM * d_in * cfg.d_sae * tokens),
        sae_bytes=params * ADAM_BYTES_PER_PARAM,
        buffer_bytes=cfg.buffer_rows * d_in * 2,  # bf16 rows
    )


def lm_forward_flop(n_params: int, tokens: int, passes: int) -> float:
    return 2.0 * n_params * tokens * passes


def measure_matmul_flops(device: torch.device, d_in: int, d_sae: int, batch: int, dtype: torch.dtype) -> float:
    """FLOP/s of [batch, d_in] @ [d_in, d_sae] on ``device`` (a short measurement, a few hundred ms)."""
    a = torch.randn(batch, d_in, device=device, dtype=dtype)
    b = torch.randn(d_in, d_sae, device=device, dtype=dtype)
    (a @ b).sum().item()
    repeats, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.3 or repeats < 3:
        c = a @ b
        repeats += 1
    c.sum().item()  # waits for the device
    return 2.0 * batch * d_in * d_sae * repeats / (time.perf_counter() - start)


CPU_MATMUL_BATCH = 256  # rows of the measured matmul on a CPU
CPU_PROBE_BATCH = 64  # rows per measured step on a CPU: about a second at GPT-2 Small's width


def measure_step_tokens_per_s(cfg: SAEConfig, d_in: int, device: torch.device, repeats: int = 2) -> tuple[float, int]:
    """(tokens/s, batch) of the recipe's training step, ``LayerTrainer.step`` (forward, backward, decoder
    projection, Adam), at ``cfg``'s width, architecture and precision, on steps that neither log nor resample. On a
    CPU the batch is capped at ``CPU_PROBE_BATCH`` rows (a lower bound there: small batches use the CPU less well)."""
    from attnsae.sae.training import LayerTrainer, matmul_precision

    batch = cfg.batch_size if device.type == "cuda" else min(cfg.batch_size, CPU_PROBE_BATCH)
    never = 10**9
    # sae.compile is measured on GPUs only: compiling for a CPU probe of three steps would take longer than training
    probe = cfg.model_copy(update={"batch_size": batch, "train_tokens": batch * never, "buffer_rows": 2 * batch,
                                   "resample_every": never, "dead_window": 1, "log_every": never,
                                   "compile": cfg.compile and device.type == "cuda"})
    trainer = LayerTrainer(probe, d_in, device)
    rows = torch.randn(batch, d_in, device=device)

    class SameBatch:
        @staticmethod
        def next_batch() -> torch.Tensor:
            return rows

    with matmul_precision(cfg.precision):
        trainer.step(1, SameBatch)  # warm-up
        trainer.check_finite(1)  # waits for the device
        start = time.perf_counter()
        for step in range(2, 2 + repeats):
            trainer.step(step, SameBatch)
        trainer.check_finite(1 + repeats)
    return batch * repeats / (time.perf_counter() - start), batch


def processes_time(layer_plans: list[LayerPlan], step_rate: float, widest: int, forward_rate: float,
                   processes: int) -> float:
    """Seconds of training with ``processes`` processes, layers dealt in turn (launcher.py): the slowest rank's
    SAE steps (``step_rate`` tokens/s at width ``widest``, scaled by width) plus its own model forward over the
    tokens (``forward_rate`` tokens/s)."""
    ranks = [layer_plans[r::processes] for r in range(min(processes, len(layer_plans)))]
    return max(sum(lp.tokens * lp.d_sae / widest / step_rate for lp in rank)
               + max(lp.tokens for lp in rank) / forward_rate
               for rank in ranks)


def human_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def describe_plan(params: dict[str, Any], device: torch.device, processes: int | None = None) -> list[str]:
    """The lines `attnsae plan` prints for a params file; measures this device's matmul throughput and the
    training step. ``processes``: also the time with that many (default: distributed.nproc_per_node)."""
    shape = preflight.check_params(params)
    source = config.model_config(params).source
    d_in = shape.d_in
    layer_plans = [plan_layer(n, config.sae_config(params, n), d_in) for n in config.layers(params)]
    widest = max(lp.d_sae for lp in layer_plans)
    batch = config.sae_config(params, layer_plans[0].layer).batch_size
    if device.type == "cpu":  # a CPU reaches its matmul rate at small batches, and seconds per repeat at big ones
        batch = min(batch, CPU_MATMUL_BATCH)
    rates = {"fp32": measure_matmul_flops(device, d_in, widest, batch, torch.float32)}
    if device.type == "cuda":
        rates["bf16"] = measure_matmul_flops(device, d_in, widest, batch, torch.bfloat16)

    lines = [
        f"profile {params.get('profile', 'custom')}: model {source}, device {device}",
        f"model: {shape.architecture}, {shape.n_params / 1e6:,.1f}M parameters, {shape.n_layers} layers, "
        f"{shape.n_heads} heads x {shape.d_head} ({shape.n_kv_heads} key/value heads), hook_z width {d_in} "
        "(from its config.json)",
        f"{'layer':>5} {'d_sae':>7} {'tokens':>15} {'steps':>10} {'SAE PFLOP':>10} {'SAE+Adam':>11} {'buffer':>11}",
    ]
    for lp in layer_plans:
        lines.append(
            f"{lp.layer:>5} {lp.d_sae:>7} {lp.tokens:>15,} {lp.steps:>10,} {lp.sae_flop / 1e15:>10.2f} "
            f"{human_bytes(lp.sae_bytes):>11} {human_bytes(lp.buffer_bytes):>11}"
        )
    sae_flop = sum(lp.sae_flop for lp in layer_plans)
    tokens = max(lp.tokens for lp in layer_plans)
    cache = config.activations_config(params)
    if cache.source == "disk":  # the model runs once over the cache; training passes over it repeatedly
        tokens = min(tokens, cache.tokens)
    shared = lm_forward_flop(shape.n_params, tokens, 1)
    separate = lm_forward_flop(shape.n_params, tokens, len(layer_plans))
    memory = sum(lp.sae_bytes + lp.buffer_bytes for lp in layer_plans)
    lines.append(
        f"total: SAE training {sae_flop / 1e15:.2f} PFLOP; LM forward over {tokens:,} tokens "
        f"{shared / 1e15:.2f} PFLOP with one pass for all layers ({separate / 1e15:.2f} PFLOP with a pass per layer)"
    )
    lines.append(f"memory for all SAEs with Adam state and all buffers at once: {human_bytes(memory)}")
    largest = max(preflight.stage_needs(params, shape), key=lambda stage: stage.bytes)
    lines.append(f"largest stage in memory (a lower bound, what check-params sets against the machine): "
                 f"{largest.stage} {human_bytes(largest.bytes)}")
    # a checkpoint holds weights and both Adam moments (not gradients: 12 of the 16 bytes per parameter) and the buffers
    checkpoint = sum(lp.sae_bytes * 3 // 4 + lp.buffer_bytes for lp in layer_plans)
    lines.append(f"size of one training checkpoint (SAEs, Adam state, shuffled buffers): {human_bytes(checkpoint)}")
    measured = ", ".join(f"{name} {rate / 1e12:.2f} TFLOP/s" for name, rate in rates.items())
    lines.append(f"measured matmul [{batch},{d_in}]x[{d_in},{widest}] on {device}: {measured}")
    for name, rate in rates.items():
        lines.append(f"time at the {name} matmul roofline (optimistic; see BENCHMARKS.md for achieved fractions): "
                     f"{human_duration((sae_flop + shared) / rate)}")
    if cache.source == "disk":
        lines.append(f"disk for the activation cache (bf16): {human_bytes(tokens * d_in * 2 * len(layer_plans))}")
    lines += step_lines(params, layer_plans, shape, device, rates, processes)
    lines += evaluate_lines(params, layer_plans, shape, rates["fp32"])
    lines += dashboards_lines(params, layer_plans, shape, rates["fp32"])
    return lines


def step_lines(params: dict[str, Any], layer_plans: list[LayerPlan], shape, device: torch.device,
               rates: dict[str, float], processes: int | None) -> list[str]:
    """The measured training step, and the training time it gives for one process and for ``processes``."""
    from attnsae.sae.objectives import resolve_kernel

    widest = max(layer_plans, key=lambda lp: lp.d_sae)
    cfg = config.sae_config(params, widest.layer)
    rate, batch = measure_step_tokens_per_s(cfg, shape.d_in, device)
    flop_rate = rate * SAE_STEP_FLOP_PER_TOKEN_PER_PARAM * shape.d_in * widest.d_sae
    roofline = rates["bf16" if cfg.precision == "bf16" and "bf16" in rates else "fp32"]
    kernel = resolve_kernel(cfg, device)
    lines = [f"measured training step ({cfg.architecture}, {cfg.precision}, {kernel} kernel, d_sae {widest.d_sae}, "
             f"batch {batch}) on "
             f"{device}: {rate:,.0f} tokens/s = {flop_rate / 1e12:.2f} TFLOP/s, {flop_rate / roofline:.0%} of the "
             f"measured matmul rate"]
    if config.activations_config(params).source != "stream":
        return lines
    forward = measure_forward(params, device)
    forward_rate = forward.tokens_per_s
    scaled = (f", {forward.blocks_timed} of {forward.blocks} blocks timed"
              if forward.blocks_timed < forward.blocks else "")
    lines.append(f"measured harvesting forward (hook_z at layers {', '.join(map(str, config.layers(params)))}, "
                 f"{forward.rows} rows of {forward.length}{scaled}) on {device}: {forward_rate:,.0f} tokens/s")
    counts = sorted({1, processes or config.distributed_config(params).nproc_per_node})
    times = ", ".join(f"{n} process{'es' if n > 1 else ''} "
                      f"{human_duration(processes_time(layer_plans, rate, widest.d_sae, forward_rate, n))}"
                      for n in counts if n <= len(layer_plans))
    lines.append(f"training time at the measured step and forward, each process with its own model forward: {times}")
    return lines


# On a CPU the measured forward is one row of at most CPU_FORWARD_TOKENS tokens through at most CPU_FORWARD_BLOCKS
# blocks, scaled to the blocks the stage runs (a model's blocks have one shape, so each costs alike), a rough figure
# there: one row uses the cores less well than a batch, and a short row spends less on attention per token than the
# profile's context (little beside the weights' matmuls at these widths). Gemma 2 2B's forward over its 1,024 tokens
# took a minute, and with all 26 blocks (fp32 weights) `attnsae plan` peaked at 13 GB of memory; with 2 (Gemma 2's two
# kinds of attention, sliding and global) at 6 GB. Here 2 blocks scaled gave 72-117 ms per block and forward against
# 135 for all 26 (after a warm-up): the same order, and the CPU figure is for a sense of scale, not for planning.
CPU_FORWARD_ROWS = 1
CPU_FORWARD_TOKENS = 128
CPU_FORWARD_BLOCKS = 2


@dataclass(frozen=True)
class ForwardTiming:
    tokens_per_s: float  # through all the blocks the stage runs (``blocks``)
    rows: int
    length: int  # tokens per row
    blocks_timed: int
    blocks: int


def measure_forward(params: dict[str, Any], device: torch.device, repeats: int | None = None) -> ForwardTiming:
    """The harvesting forward the stream trainer runs (data/harvest.py: hook_z at the profile's layers, stopping after
    the last), timed on the profile's model built from its config.json alone: its blocks up to the last of those
    layers, weights zeroed (a forward's time does not depend on their values), at ``model.precision``,
    ``activations.batch_rows`` rows of the profile's context per forward (on a CPU ``CPU_FORWARD_ROWS`` of at most
    ``CPU_FORWARD_TOKENS``, through at most ``CPU_FORWARD_BLOCKS`` blocks and scaled to all), over ``repeats``
    forwards (default: two) after a warm-up (the first call pays CUDA's start-up, or on a CPU a slower first pass)."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from attnsae.data.harvest import HarvestingForward, attention_implementation
    from attnsae.data.model_sources import source_config

    layers = config.layers(params)
    blocks = max(layers) + 1  # the forward stops there: later blocks never run
    context = config.tokenize_config(params).context_size
    if device.type == "cuda":
        rows, timed = config.activations_config(params).batch_rows, blocks
    else:
        rows, context, timed = CPU_FORWARD_ROWS, min(context, CPU_FORWARD_TOKENS), min(blocks, CPU_FORWARD_BLOCKS)
    layers = sorted({layer for layer in layers if layer < timed} | {timed - 1})
    model_config = source_config(config.model_config(params).source)
    model_config.num_hidden_layers = timed
    with torch.device(device), no_init_weights():  # weights allocated, not drawn: buffers (rotary tables) as built
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32,
                                                 attn_implementation=attention_implementation(model_config))
    model.eval()
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
    repeats = repeats or 2
    harvest = HarvestingForward(model, layers, config.model_config(params).precision)
    tokens = torch.zeros(rows, context, dtype=torch.long, device=device)
    next(iter(harvest(tokens).values())).sum().item()  # the warm-up, waited for
    start = time.perf_counter()
    for _ in range(repeats):
        found = harvest(tokens)
    next(iter(found.values())).sum().item()  # waits for the device
    seconds = (time.perf_counter() - start) * blocks / timed
    return ForwardTiming(rows * context * repeats / seconds, rows, context, timed, blocks)


def capped(*caps: int) -> int:
    """The smallest of the caps that are set (0: no cap), or 0 when none is."""
    return min((c for c in caps if c), default=0)


def evaluate_lines(params: dict[str, Any], layer_plans: list[LayerPlan], shape, fp32_rate: float) -> list[str]:
    """What the evaluate stage costs: the clean pass once, and the rest of the model twice per layer."""
    cfg = config.evaluate_config(params)
    tokenize = config.tokenize_config(params)
    rows = capped(cfg.max_rows, tokenize.max_eval_rows)
    heldout = capped(cfg.max_rows, tokenize.max_heldout_rows) if tokenize.heldout_sources else 0
    if not rows or (tokenize.heldout_sources and not heldout):
        return ["evaluate: every evaluation (or held-out) row (not capped by evaluate.max_rows or tokenize): cost "
                "unknown until `attnsae tokenize` has run"]
    tokens = (rows + heldout) * tokenize.context_size
    deepest = max(lp.layer for lp in layer_plans)
    passes = 1 + (shape.n_layers - deepest) / shape.n_layers + sum(2 * (shape.n_layers - lp.layer) / shape.n_layers
                                                                   for lp in layer_plans)
    apart = sum(lp.layer / shape.n_layers + 3 * (shape.n_layers - lp.layer) / shape.n_layers for lp in layer_plans)
    flop = lm_forward_flop(shape.n_params, tokens, 1) * passes
    return [f"evaluate: {tokens:,} tokens ({rows:,} evaluation + {heldout:,} held-out rows), {passes:.1f} model "
            f"passes per token for all layers ({apart:.1f} evaluated apart): {flop / 1e12:.2f} TFLOP, "
            f"{human_duration(flop / fp32_rate)} at the fp32 matmul roofline"]




def dashboards_lines(params: dict[str, Any], layer_plans: list[LayerPlan], shape, fp32_rate: float) -> list[str]:
    """What the dashboards@L stages cost: FLOPs and time per layer, and the memory bound of one."""
    cfg = config.dashboards_config(params)
    tokenize = config.tokenize_config(params)
    rows = capped(cfg.max_rows, tokenize.max_eval_rows)
    if not rows:
        return ["dashboards: every evaluation row (neither dashboards.max_rows nor tokenize.max_eval_rows caps it): "
                "cost unknown until `attnsae tokenize` has run"]
    tokens = rows * tokenize.context_size
    lines = [f"dashboards: {tokens:,} tokens per layer ({rows:,} evaluation rows), {cfg.first_n} cards + "
             f"{cfg.random_n} random + {len(cfg.features)} listed + one per family, {cfg.null_directions} null "
             f"directions"]
    total = 0.0
    for lp in layer_plans:
        forward = lm_forward_flop(shape.n_params, tokens, 1) * (lp.layer + 1) / shape.n_layers
        encoders = 2 * 2.0 * shape.d_in * (lp.d_sae + cfg.null_directions) * tokens
        total += forward + encoders
        lines.append(f"  L{lp.layer}: {(forward + encoders) / 1e12:.2f} TFLOP (model {forward / 1e12:.2f}, "
                     f"encoders and family statistics {encoders / 1e12:.2f})")
    widest = max(lp.d_sae for lp in layer_plans)
    batch = cfg.batch_rows * tokenize.context_size * widest * 4
    lines.append(f"  all layers: {total / 1e12:.2f} TFLOP, {human_duration(total / fp32_rate)} at the fp32 matmul "
                 f"roofline; memory of one layer: {human_bytes(FIRING_BYTES * DASHBOARD_L0 * tokens)} of firings at "
                 f"L0 {DASHBOARD_L0} + {human_bytes(batch)} per batch")
    return lines
