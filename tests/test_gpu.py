"""The GPU path against the CPU path on a small case. Skipped where no CUDA device is present (CI)."""

from __future__ import annotations

import pytest
import torch

from attnsae.config import SAEConfig
from attnsae.sae.training import train_sae, use_deterministic_kernels
from helpers import PlantedDictionary

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


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_each_precision_on_the_gpu_follows_fp32(precision):
    """The same steps on the GPU in fp32 and in ``precision`` (fused Adam in both): decoder rows point the same
    way and the final losses agree within 5% (tests/test_precision.py's tolerances, there on a CPU)."""
    from attnsae.sae.training import LayerTrainer

    base = dict(d_sae=256, l1_coeff=0.3, batch_size=256, train_tokens=256 * 200, buffer_rows=2048, resample_every=400,
                dead_window=10, max_resamples=0, resample_inputs=512, warmup_steps=5, device="cuda")
    runs = {p: train_sae(SAEConfig(**base, precision=p), PlantedDictionary(seed=1), progress=False)
            for p in ("fp32", precision)}
    cosines = torch.nn.functional.cosine_similarity(runs["fp32"].sae.W_dec, runs[precision].sae.W_dec, dim=-1)
    assert cosines.mean().item() >= 0.95
    assert runs[precision].curves[-1]["loss"] == pytest.approx(runs["fp32"].curves[-1]["loss"], rel=0.05)
    trainer = LayerTrainer(SAEConfig(**base), 32, torch.device("cuda"))
    assert trainer.optimizer.defaults["fused"] is True


def test_two_cuda_ranks_when_there_are_two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    from attnsae.launcher import Worker, bind_device

    bind_device(Worker(rank=1, world_size=2, local_rank=1))
    assert torch.cuda.current_device() == 1
    torch.cuda.set_device(0)



@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "jumprelu", "standard"])
def test_the_sparse_kernel_on_the_gpu_is_the_dense_step(architecture):
    """test_sparse_step.py's first steps on CUDA, fp32 (TF32 off): the same losses and weights from either kernel;
    and a bf16 sparse run (autocast encoder, fp32 gather-sum decoder) stays finite and learns."""
    from attnsae.sae.training import LayerTrainer
    from test_sparse_step import FixedBatches, trainer_cfg

    cuda = torch.device("cuda")
    trained = {}
    for kernel in ("dense", "sparse"):
        trainer, batches = LayerTrainer(trainer_cfg(architecture, kernel), 32, cuda), FixedBatches(3)
        batches.batches = [b.to(cuda) for b in batches.batches]
        rows = [trainer.step(step, batches) for step in range(3)]
        trained[kernel] = rows, {n: p.detach().cpu() for n, p in trainer.sae.named_parameters()}
    for dense_row, sparse_row in zip(trained["dense"][0], trained["sparse"][0]):
        assert sparse_row["loss"] == pytest.approx(dense_row["loss"], rel=1e-5, abs=1e-6)
    for name, dense in trained["dense"][1].items():
        torch.testing.assert_close(trained["sparse"][1][name], dense, atol=1e-5, rtol=0, msg=name)
    bf16 = trainer_cfg(architecture, "sparse").model_copy(update={"precision": "bf16", "train_tokens": 256 * 100})
    result = train_sae(bf16, PlantedDictionary(seed=0), progress=False)
    assert result.curves[-1]["loss"] < result.curves[0]["loss"]


def test_the_harvesting_forward_on_the_gpu_is_the_bridges(tmp_path):
    from attnsae.data.activations import capture_z
    from attnsae.data.harvest import HarvestingForward, load_harvesting_model
    from attnsae.data.models import load_bridge
    from test_model_families import FAMILIES, LAYERS, VOCAB, random_family_model

    cuda = torch.device("cuda")
    tokens = torch.randint(0, VOCAB - 1, (2, 24), generator=torch.Generator().manual_seed(3)).to(cuda)
    for name in FAMILIES:
        random_family_model(name, tmp_path / name)
        bridge, _ = load_bridge(tmp_path / name, cuda)
        expected = capture_z(bridge, tokens, list(range(LAYERS)))
        got = HarvestingForward(load_harvesting_model(tmp_path / name, cuda), list(range(LAYERS)))(tokens)
        for layer in range(LAYERS):
            torch.testing.assert_close(got[layer], expected[layer], atol=1e-4, rtol=0, msg=f"{name} {layer}")


def test_inspect_on_the_gpu_reads_what_it_reads_on_the_cpu(tmp_path):
    """`attnsae inspect --device cuda`: the same features, errors, CE increases and metrics as on the CPU."""
    import numpy as np

    from attnsae.data.models import load_bridge
    from attnsae.features.inspection import inspect_rows
    from test_family_features import random_sae
    from test_model_families import VOCAB, random_family_model

    random_family_model("llama", tmp_path / "llama")
    row = np.random.default_rng(1).integers(0, VOCAB - 1, size=14)
    readings = {}
    for device in ("cpu", "cuda"):
        bridge, info = load_bridge(tmp_path / "llama", torch.device(device))
        readings[device] = inspect_rows(bridge, random_sae(info.d_in).to(device), 1, [row, row[:5]], str, top=3,
                                        context_size=16)
    cpu, gpu = readings["cpu"], readings["cuda"]
    for key, value in cpu.metrics.items():
        assert gpu.metrics[key] == pytest.approx(value, rel=1e-3, abs=1e-4), key
    for cpu_row, gpu_row in zip(cpu.rows, gpu.rows, strict=True):
        for a, b in zip(cpu_row, gpu_row, strict=True):
            assert [h.feature for h in a.features] == [h.feature for h in b.features]
            assert b.relative_error == pytest.approx(a.relative_error, abs=1e-4)
            assert (a.ce_increase_next is None) == (b.ce_increase_next is None)
            if a.ce_increase_next is not None:
                assert b.ce_increase_next == pytest.approx(a.ce_increase_next, abs=1e-4)
