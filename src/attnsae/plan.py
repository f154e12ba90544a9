"""`attnsae plan`: what a profile costs before it runs: tokens, steps, FLOPs, memory and time.

Cost model (design.md 7): an SAE training step costs 12 * d_in * d_sae FLOP per token (forward 4,
backward 8); the LM forward costs 2 FLOP per parameter per token, once per token for all selected
layers when they share one pass. The time estimate divides FLOPs by matmul throughput measured on
this device at the SAE's shape, so it is a lower bound: real steps reach a fraction of it (the
fraction measured on a machine is in BENCHMARKS.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from attnsae.config import SAEConfig

# Shapes of the models the profiles name, so a plan needs no download.
MODEL_SHAPES = {
    "gpt2": {"n_params": 124_439_808, "n_layers": 12, "d_in": 768},
    "smollm2-135m": {"n_params": 134_515_008, "n_layers": 30, "d_in": 576},
    "tiny-gpt2": {"n_params": 0, "n_layers": 4, "d_in": 64},  # negligible; filled from the config when known
}
SAE_STEP_FLOP_PER_TOKEN_PER_PARAM = 12  # x d_in * d_sae
ADAM_BYTES_PER_PARAM = 16  # fp32 weight, gradient, two moments


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


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def human_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
