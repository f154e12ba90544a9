"""The sparse SAE step (sae/sparse.py) against the dense one, in one run on one device, against its matmul roofline.

    python bench/sparse_step.py                 # CPU: TopK at the quickstart's shape and GPT-2 Small's (k 16, 32, 64),
                                                # BatchTopK and JumpReLU at GPT-2 Small's (about 32 latents per row)
    python bench/sparse_step.py --device cuda   # the same on a GPU

Each step: the TopK forward, the MSE, backward and an Adam step, on one fixed batch (so only the step is timed),
fp32. Dense: the activation over the dense pre-activation and ``f @ W_dec`` (autograd through dense matmuls), as the
objectives' main losses compute it today (JumpReLU with its L0 term). Sparse: the dense pre-activation, then
``SelectedPreActivations`` and ``embedding_bag`` over the selected latents (JumpReLU: ``SelectedJumpReLU``). JumpReLU's
thresholds are set to the pre-activation quantile that leaves about 32 latents per row, bandwidth 0.001. AuxK is left out of both (it is the same extra work either way until
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
from attnsae.sae.objectives import JumpReLUFunction, StepFunction, batch_topk  # noqa: E402
from attnsae.sae.sparse import (  # noqa: E402
    SelectedJumpReLU,
    SelectedPreActivations,
    batch_topk_selection,
    encode,
    jumprelu_selection,
    selected_values,
    sparse_decode,
    topk_indices,
)

BANDWIDTH = 0.001

SHAPES = [("quickstart", 576, 2304, 20), ("gpt2-small", 768, 24576, 16), ("gpt2-small", 768, 24576, 32),
          ("gpt2-small", 768, 24576, 64)]


def dense_step_loss(sae: SAE, x: torch.Tensor, k: int) -> torch.Tensor:
    return reconstruction_loss(sae, x, row_topk(sae.pre_activation(x), k)).mse


def sparse_step_loss(sae: SAE, x: torch.Tensor, k: int) -> torch.Tensor:
    _, idx, values = selected_values(sae, x, topk_indices(k))
    return (sparse_decode(sae.W_dec, idx, values) + sae.b_dec - x).pow(2).sum(-1).mean()


def dense_batchtopk_loss(sae: SAE, x: torch.Tensor, k: int) -> torch.Tensor:
    return reconstruction_loss(sae, x, batch_topk(sae.pre_activation(x), k)).mse


def sparse_batchtopk_loss(sae: SAE, x: torch.Tensor, k: int) -> torch.Tensor:
    centred, pre = encode(sae, x)
    idx, mask = batch_topk_selection(k)(pre)
    values = SelectedPreActivations.apply(pre, centred, sae.W_enc, sae.b_enc, idx).relu() * mask
    return (sparse_decode(sae.W_dec, idx, values) + sae.b_dec - x).pow(2).sum(-1).mean()


def dense_jumprelu_loss(sae: SAE, x: torch.Tensor, k: int) -> torch.Tensor:
    pre = sae.pre_activation(x)
    f = JumpReLUFunction.apply(pre, sae.threshold, BANDWIDTH)
    l0 = StepFunction.apply(pre, sae.threshold, BANDWIDTH).sum(-1).mean()
    return reconstruction_loss(sae, x, f).mse + 1e-3 * l0


def sparse_jumprelu_loss(sae: SAE, x: torch.Tensor, k: int) -> torch.Tensor:
    centred, pre = encode(sae, x)
    idx, mask = jumprelu_selection(sae.threshold.detach(), BANDWIDTH)(pre)
    values = SelectedPreActivations.apply(pre, centred, sae.W_enc, sae.b_enc, idx)
    f, step = SelectedJumpReLU.apply(values, sae.threshold, idx, mask, BANDWIDTH)
    return (sparse_decode(sae.W_dec, idx, f) + sae.b_dec - x).pow(2).sum(-1).mean() + 1e-3 * step.sum(-1).mean()


def step_seconds(loss_fn, d_in: int, d_sae: int, k: int, batch: int, repeats: int, device: torch.device,
                 kind: str = "standard") -> float:
    gen = torch.Generator().manual_seed(0)
    sae = SAE(d_in, d_sae, generator=gen, kind=kind).to(device)
    x = torch.randn(batch, d_in, generator=gen).to(device)
    if kind == "jumprelu":  # thresholds that leave about k latents per row on this batch
        with torch.no_grad():
            pre = sae.pre_activation(x)
            sae.threshold.fill_(float(pre.flatten().kthvalue(pre.numel() - k * batch).values))
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
        print(f"topk {label} {d_in}->{d_sae} k {k}: fp32 matmul {roofline / 1e12:.2f} TFLOP/s; "
              f"dense step {args.batch / dense:,.0f} tok/s ({flop / dense / roofline:.0%} of the roofline in "
              f"dense-step FLOPs); sparse step {args.batch / sparse:,.0f} tok/s, {dense / sparse:.2f}x dense")
    for kind, dense_fn, sparse_fn in (("batchtopk", dense_batchtopk_loss, sparse_batchtopk_loss),
                                      ("jumprelu", dense_jumprelu_loss, sparse_jumprelu_loss)):
        d_in, d_sae, k = 768, 24576, 32
        model_kind = "jumprelu" if kind == "jumprelu" else "standard"
        dense = step_seconds(dense_fn, d_in, d_sae, k, args.batch, args.repeats, device, model_kind)
        sparse = step_seconds(sparse_fn, d_in, d_sae, k, args.batch, args.repeats, device, model_kind)
        print(f"{kind} gpt2-small {d_in}->{d_sae} about {k} per row: dense step {args.batch / dense:,.0f} tok/s; "
              f"sparse step {args.batch / sparse:,.0f} tok/s, {dense / sparse:.2f}x dense")


if __name__ == "__main__":
    main()
