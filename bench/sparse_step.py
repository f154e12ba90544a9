"""The sparse TopK step (sae/sparse.py) against the dense one, in one run on one device, against its matmul roofline.

    python bench/sparse_step.py                 # CPU: the quickstart's shape and GPT-2 Small's (k 16, 32, 64)
    python bench/sparse_step.py --device cuda   # the same on a GPU

Each step: the TopK forward, the MSE, backward and an Adam step, on one fixed batch (so only the step is timed),
fp32. Dense: ``row_topk`` over the dense pre-activation and ``f @ W_dec`` (autograd through dense matmuls), as the
TopK objective's main loss computes it today. Sparse: the dense pre-activation, then ``SelectedPreActivations`` and
``embedding_bag`` over the k selected latents. AuxK is left out of both (it is the same extra work either way until
its own sparse form). The roofline line is the fp32 matmul [batch, d_in] x [d_in, d_sae] measured here; "dense-step
FLOPs" counts the dense step's five matmuls (10 * d_in * d_sae per token) to show how far each step is from it.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import matmul_gflops, timed  # noqa: E402

from attnsae.sae.autoencoder import SAE, reconstruction_loss, row_topk  # noqa: E402
from attnsae.sae.sparse import selected_values, sparse_decode, topk_indices  # noqa: E402

SHAPES = [("quickstart", 576, 2304, 20), ("gpt2-small", 768, 24576, 16), ("gpt2-small", 768, 24576, 32),
          ("gpt2-small", 768, 24576, 64)]


def dense_step_loss(sae: SAE, x: torch.Tensor, k: int) -> torch.Tensor:
    return reconstruction_loss(sae, x, row_topk(sae.pre_activation(x), k)).mse


def sparse_step_loss(sae: SAE, x: torch.Tensor, k: int) -> torch.Tensor:
    _, idx, values = selected_values(sae, x, topk_indices(k))
    return (sparse_decode(sae.W_dec, idx, values) + sae.b_dec - x).pow(2).sum(-1).mean()


def step_seconds(loss_fn, d_in: int, d_sae: int, k: int, batch: int, repeats: int, device: torch.device) -> float:
    gen = torch.Generator().manual_seed(0)
    sae = SAE(d_in, d_sae, generator=gen).to(device)
    x = torch.randn(batch, d_in, generator=gen).to(device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(sae, x, k).backward()
        optimizer.step()

    return timed(step, repeats, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device: {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    for label, d_in, d_sae, k in SHAPES:
        roofline = matmul_gflops(args.batch, d_in, d_sae, torch.float32, args.repeats, device) * 1e9
        dense = step_seconds(dense_step_loss, d_in, d_sae, k, args.batch, args.repeats, device)
        sparse = step_seconds(sparse_step_loss, d_in, d_sae, k, args.batch, args.repeats, device)
        flop = 10 * d_in * d_sae * args.batch  # the dense step's five matmuls
        print(f"{label} {d_in}->{d_sae} k {k}: fp32 matmul {roofline / 1e12:.2f} TFLOP/s; "
              f"dense step {args.batch / dense:,.0f} tok/s ({flop / dense / roofline:.0%} of the roofline in "
              f"dense-step FLOPs); sparse step {args.batch / sparse:,.0f} tok/s, {dense / sparse:.2f}x dense")


if __name__ == "__main__":
    main()
