"""The training step on the dense and the sparse kernel (``sae.kernel``), in one run on one device, against the
matmul roofline measured in the same run.

    python bench/sparse_step.py                 # CPU, fp32
    python bench/sparse_step.py --device cuda   # GPU: fp32, and bf16 with and without sae.compile

Each line times ``LayerTrainer.step`` itself (forward, AuxK where the architecture has it, backward, decoder
projection, Adam, the dead-feature counts) on one fixed batch, on steps that neither log nor resample, through
bench/throughput.py's ``sae_step_tokens_per_s``:
- TopK at the quickstart's shape (576 -> 2304, k 20) and at GPT-2 Small's (768 -> 24576, k 16, 32, 64);
- BatchTopK (k 32) and JumpReLU (thresholds leaving about 32 latents per row) at GPT-2 Small's; the standard recipe
  (ReLU + L1) there too, at its start (about half the latents fire on random rows: what the sparse kernel costs
  before the penalty has acted; auto keeps it dense).
No latent is dead on these steps, so the sparse kernel skips AuxK's work, which the dense one always does (its loss
term is multiplied by zero: no read back to the host).
"dense-step FLOPs" counts the dense step's five d_in x d_sae matmuls (10 * d_in * d_sae per token) to show how far
each step is from the roofline.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import matmul_gflops, sae_step_tokens_per_s  # noqa: E402

TOPK_SHAPES = [("quickstart", 576, 2304, 20), ("gpt2-small", 768, 24576, 16), ("gpt2-small", 768, 24576, 32),
               ("gpt2-small", 768, 24576, 64)]
OTHER_ARCHITECTURES = [("batchtopk", {"k": 32}), ("jumprelu", {"l0_coeff": 1e-3}), ("standard", {"l1_coeff": 1.0})]


def compare(label: str, d_in: int, d_sae: int, batch: int, repeats: int, device: torch.device,
            variants: list[tuple[str, dict]], recipe: dict) -> None:
    """One line: each variant's tokens/s, the first being the baseline the others are multiples of."""
    dtype = torch.bfloat16 if any(v.get("precision") == "bf16" for _, v in variants) else torch.float32
    roofline = matmul_gflops(batch, d_in, d_sae, dtype, repeats, device) * 1e9
    rates = [(name, sae_step_tokens_per_s(d_in, d_sae, batch, repeats, device, **options, **recipe))
             for name, options in variants]
    (baseline_name, baseline), flop = rates[0], 10 * d_in * d_sae
    shown = "; ".join(f"{name} {rate:,.0f} tok/s ({rate * flop / roofline:.0%} in dense-step FLOPs"
                      + (f", {rate / baseline:.2f}x {baseline_name})" if i else ")")
                      for i, (name, rate) in enumerate(rates))
    print(f"{label} {d_in}->{d_sae}, batch {batch}: {str(dtype).removeprefix('torch.')} matmul "
          f"{roofline / 1e12:.2f} TFLOP/s; {shown}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device: {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    runs = [("fp32", [("dense", {"kernel": "dense"}), ("sparse", {"kernel": "sparse"})])]
    if device.type == "cuda":  # the dense step's best (BENCHMARKS.md: bf16 + sae.compile) against the sparse one
        runs.append(("bf16", [("dense compiled", {"kernel": "dense", "precision": "bf16", "compiled": True}),
                              ("sparse", {"kernel": "sparse", "precision": "bf16"}),
                              ("sparse compiled", {"kernel": "sparse", "precision": "bf16", "compiled": True})]))
    for precision, variants in runs:
        for label, d_in, d_sae, k in TOPK_SHAPES:
            batch = 512 if label == "quickstart" and device.type == "cpu" else args.batch  # the quickstart's batch
            compare(f"{precision} topk k {k} {label}", d_in, d_sae, batch, args.repeats, device, variants,
                    {"architecture": "topk", "k": k})
        for architecture, recipe in OTHER_ARCHITECTURES:
            compare(f"{precision} {architecture} gpt2-small", 768, 24576, args.batch, args.repeats, device, variants,
                    {"architecture": architecture, **recipe})


if __name__ == "__main__":
    main()
