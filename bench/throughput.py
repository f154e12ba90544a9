"""Throughput of the pieces the pipeline spends its time in, against the machine's matmul roofline.

    python bench/throughput.py [--model models/base] [--d-sae 2304] [--batch 512]

Prints, in one run on one machine:
- matmul throughput of the SAE's encoder shape, fp32 and bf16 (the roofline);
- tokens/s of one recipe SAE training step (forward, backward, decoder projection, Adam), fp32,
  and the achieved FLOP/s as a fraction of the fp32 matmul roofline (12 * d_in * d_sae FLOP per token);
- tokens/s of the pinned model's forward pass capturing hook_z at the quickstart layers (if --model exists).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def matmul_gflops(m: int, k: int, n: int, dtype: torch.dtype, repeats: int) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    return 2 * m * k * n / timed(lambda: a @ b, repeats) / 1e9


def sae_step_tokens_per_s(d_in: int, d_sae: int, batch: int, repeats: int) -> float:
    from attnsae.config import SAEConfig
    from attnsae.sae import SAE
    from attnsae.train import make_optimizer

    cfg = SAEConfig(d_sae=d_sae, l1_coeff=1.0, train_tokens=batch, batch_size=batch)
    sae = SAE(d_in, d_sae, generator=torch.Generator().manual_seed(0))
    opt = make_optimizer(sae, cfg)
    x = torch.randn(batch, d_in)

    def step():
        out = sae(x, cfg.l1_coeff)
        out.loss.backward()
        sae.make_decoder_unit_norm_and_project_grad()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return batch / timed(step, repeats)


def model_tokens_per_s(model_dir: Path, layers: list[int], rows: int, context: int, repeats: int) -> float:
    from attnsae.activations import capture_z
    from attnsae.models import load_bridge

    bridge, info = load_bridge(model_dir, torch.device("cpu"))
    tokens = torch.randint(0, info.vocab_size, (rows, context))
    return rows * context / timed(lambda: capture_z(bridge, tokens, layers), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/base")
    parser.add_argument("--layers", default="3,10,17,24")
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--d-sae", type=int, default=2304)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    fp32 = matmul_gflops(args.batch, args.d_in, args.d_sae, torch.float32, args.repeats * 4)
    bf16 = matmul_gflops(args.batch, args.d_in, args.d_sae, torch.bfloat16, 1)
    print(f"matmul [{args.batch},{args.d_in}]x[{args.d_in},{args.d_sae}]: fp32 {fp32:.1f} GFLOP/s, bf16 {bf16:.1f} GFLOP/s")
    tps = sae_step_tokens_per_s(args.d_in, args.d_sae, args.batch, args.repeats * 4)
    achieved = tps * 12 * args.d_in * args.d_sae / 1e9
    print(f"SAE recipe step {args.d_in}->{args.d_sae}, batch {args.batch}, fp32: {tps:,.0f} tokens/s "
          f"= {achieved:.1f} GFLOP/s = {achieved / fp32:.0%} of the fp32 matmul roofline")
    model_dir = Path(args.model)
    if (model_dir / "attnsae_model.json").is_file():
        layers = [int(x) for x in args.layers.split(",")]
        mtps = model_tokens_per_s(model_dir, layers, rows=16, context=128, repeats=args.repeats)
        print(f"model forward capturing hook_z at layers {layers} (stops after layer {max(layers)}), fp32: {mtps:,.0f} tokens/s")


if __name__ == "__main__":
    main()
