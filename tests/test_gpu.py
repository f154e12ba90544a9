"""The GPU path against the CPU path on a small case. Skipped where no CUDA device is present (CI)."""

from __future__ import annotations

import pytest
import torch
from helpers import PlantedDictionary

from attnsae.config import SAEConfig
from attnsae.train import train_sae, use_deterministic_kernels

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_gpu_training_matches_cpu_within_float_tolerance():
    cfgs = {
        # No resampling: a resample draw can flip on float differences and the runs would part ways.
        device: SAEConfig(d_sae=64, l1_coeff=0.1, batch_size=256, train_tokens=256 * 10, buffer_rows=2048,
                          resample_every=20, dead_window=10, max_resamples=0, resample_inputs=512, warmup_steps=5,
                          deterministic=True, device=device)
        for device in ("cpu", "cuda")
    }
    try:
        results = {device: train_sae(cfg, PlantedDictionary(seed=1), progress=False) for device, cfg in cfgs.items()}
    finally:
        use_deterministic_kernels(False)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        cpu, gpu = getattr(results["cpu"].sae, name), getattr(results["cuda"].sae, name)
        torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-4)
