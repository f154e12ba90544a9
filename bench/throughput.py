"""Throughput of the pieces the pipeline spends its time in, against the machine's matmul roofline.

    python bench/throughput.py [--model models/base] [--d-sae 2304] [--batch 512] [--device cuda]

Prints, in one run on one machine:
- matmul throughput of the SAE's encoder shape, fp32 and bf16 (the roofline);
- tokens/s of the trainer's recipe step, ``LayerTrainer.step`` (forward, backward, decoder projection,
  Adam, NaN/Inf watch, dead-feature counts), fp32, and the achieved FLOP/s as a fraction of the fp32
  matmul roofline (12 * d_in * d_sae FLOP per token);
- tokens/s of the pinned model's forward pass capturing hook_z at the quickstart layers (if --model exists).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

CPU = torch.device("cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels run asynchronously: time them to completion


def timed(fn, repeats: int, device: torch.device = CPU) -> float:
    fn()  # warm-up
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def matmul_gflops(m: int, k: int, n: int, dtype: torch.dtype, repeats: int, device: torch.device) -> float:
    a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
    return 2 * m * k * n / timed(lambda: a @ b, repeats, device) / 1e9


class FixedBatch:
    """Stands where the training buffer stands: serves one batch already on the device, so only the step is timed."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def next_batch(self) -> torch.Tensor:
        return self.x


def sae_step_tokens_per_s(d_in: int, d_sae: int, batch: int, repeats: int, device: torch.device,
                          precision: str = "fp32", compiled: bool = False, plain_adam: bool = False,
                          **recipe) -> float:
    """``LayerTrainer.step`` itself, on steps that neither log nor resample (those are rare in a real run), at
    ``precision`` and with ``sae.compile`` when ``compiled``; ``plain_adam``: Adam's per-parameter loop, as attnsae
    stepped before it used the fused kernel on CUDA. ``recipe``: other sae settings (default the standard recipe
    with l1_coeff 1; ``kernel``, ``architecture``, ``k``, ...). A jumprelu SAE's thresholds are set to leave its
    ``l0_coeff``-free steady state of about 32 latents per row on the batch (its start keeps about half)."""
    from attnsae.config import SAEConfig
    from attnsae.sae.training import LayerTrainer, matmul_precision

    never = 10**9
    recipe = recipe or {"l1_coeff": 1.0}
    cfg = SAEConfig(d_sae=d_sae, train_tokens=batch * never, batch_size=batch, buffer_rows=2 * batch,
                    resample_every=never, dead_window=1, log_every=never, precision=precision, device=device.type,
                    compile=compiled, **recipe)
    trainer = LayerTrainer(cfg, d_in, device)
    if plain_adam:
        trainer.optimizer = torch.optim.Adam(trainer.sae.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                             foreach=False, fused=False)
    x = torch.randn(batch, d_in, device=device)
    if cfg.architecture == "jumprelu":
        with torch.no_grad():
            pre = trainer.sae.pre_activation(x)
            trainer.sae.threshold.fill_(float(pre.flatten().kthvalue(pre.numel() - JUMPRELU_L0 * batch).values))
    batches = FixedBatch(x)
    steps = iter(range(1, never))  # step 0 logs
    with matmul_precision(precision):
        if compiled:
            for _ in range(3):  # compiles (and recompiles once the step number turns dynamic) before timing
                trainer.step(next(steps), batches)
        return batch / timed(lambda: trainer.step(next(steps), batches), repeats, device)


JUMPRELU_L0 = 32  # latents per row a measured jumprelu step keeps


def model_tokens_per_s(model_dir: Path, layers: list[int], rows: int, context: int, repeats: int,
                       device: torch.device) -> float:
    from attnsae.data.activations import capture_z
    from attnsae.data.models import autocast_dtype, load_bridge

    bridge, info = load_bridge(model_dir, device)
    tokens = torch.randint(0, info.vocab_size, (rows, context), device=device)
    amp = autocast_dtype("auto", device)  # what the pipeline uses: bf16 autocast on CUDA, fp32 on CPU
    return rows * context / timed(lambda: capture_z(bridge, tokens, layers, amp), repeats, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/base")
    parser.add_argument("--layers", default="3,10,17,24")
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--d-sae", type=int, default=2304)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", type=int, default=16, help="token rows of 128 per model forward")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"

    where = torch.cuda.get_device_name(device) if on_gpu else (platform.processor() or platform.machine())
    print(f"machine: {where}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    fp32 = matmul_gflops(args.batch, args.d_in, args.d_sae, torch.float32, args.repeats * 4, device)
    # bf16 on a CPU without bf16 instructions is ~80x slower than fp32: one repeat is enough to see it
    bf16 = matmul_gflops(args.batch, args.d_in, args.d_sae, torch.bfloat16, args.repeats * 4 if on_gpu else 1, device)
    print(f"matmul [{args.batch},{args.d_in}]x[{args.d_in},{args.d_sae}]: "
          f"fp32 {fp32:.1f} GFLOP/s, bf16 {bf16:.1f} GFLOP/s")
    tps = sae_step_tokens_per_s(args.d_in, args.d_sae, args.batch, args.repeats * 4, device)
    achieved = tps * 12 * args.d_in * args.d_sae / 1e9
    print(f"SAE recipe step {args.d_in}->{args.d_sae}, batch {args.batch}, fp32: {tps:,.0f} tokens/s "
          f"= {achieved:.1f} GFLOP/s = {achieved / fp32:.0%} of the fp32 matmul roofline")
    model_dir = Path(args.model)
    if (model_dir / "attnsae_model.json").is_file():
        layers = [int(x) for x in args.layers.split(",")]
        mtps = model_tokens_per_s(model_dir, layers, rows=args.rows, context=128, repeats=args.repeats, device=device)
        precision = "bf16 autocast" if on_gpu else "fp32"
        print(f"model forward capturing hook_z at layers {layers} (stops after layer {max(layers)}), {precision}: "
              f"{mtps:,.0f} tokens/s")


if __name__ == "__main__":
    main()
