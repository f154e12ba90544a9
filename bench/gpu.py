"""The GPU path in one run: the SAE step per precision, the model forward, and `train --stream` end to end, each
against the matmul rooflines measured in the same run; then the paper run's projected hours.

    python bench/gpu.py                      # on a CUDA machine: GPT-2 Small's shapes
                                             # (d_in 768, d_sae 24576, batch 4096)
    python bench/gpu.py --device cpu --quick # the same code on a CPU at tiny shapes (a smoke test, not a measurement)

Prints, in order:
- matmul [batch, d_in] x [d_in, d_sae] in fp32, TF32 and bf16: the rooflines;
- tokens/s of ``LayerTrainer.step`` (forward, backward, decoder projection, Adam; no logging or resampling steps):
  the plain step as before issue 13 (fp32, Adam's loop) and each ``sae.precision`` with fused Adam, as a fraction
  of its roofline and as a multiple of the plain step; then the fastest with ``sae.compile``;
- the same SAE trained on the same planted rows in each precision (and bf16 on the sparse kernel), scored in fp32:
  quality at equal steps;
- tokens/s of the model forward capturing hook_z at every layer (gpt2-random: GPT-2 Small's shape), fp32 and bf16
  autocast, through the bridge and through the harvesting forward the stages use (data/harvest.py);
- where the host waits for the GPU in a streamed run (CUDA's sync debug mode);
- tokens/s of the streaming trainer end to end (``train_saes`` over a ``ModelStream``: forward + buffer + steps) in
  steady state with the gpt2-small profile's rows per forward and buffer, for one layer and for all layers from one
  forward, at the best precision, then with sae.compile, then TopK k 32 on the sparse kernel;
- the paper run (12 layers x 2e9 tokens) in hours on one GPU and on eight (layers dealt to ranks in turn, each
  rank running its own forward), from the fastest end-to-end number.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import matmul_gflops, sae_step_tokens_per_s, synchronize, timed  # noqa: E402

PAPER_TOKENS = 2_000_000_000
PAPER_LAYERS = 12
# The recipe's l1_coeff (0.8 at layer 1) silences nearly every feature on the planted rows (measured on an H200:
# L0 2.9, explained variance -0.01 after 400 steps); 0.1 keeps them in a regime where precision could show.
PLANTED_L1 = 0.1


class PlantedBatches:
    """Rows that are sparse sums of ``n_true`` fixed unit directions, drawn on the device from a seeded generator:
    the same rows in the same order for every precision, so their trained SAEs can be compared."""

    def __init__(self, d_in: int, n_true: int, active: int, batch: int, device: torch.device, seed: int = 0):
        self.gen = torch.Generator(device).manual_seed(seed)
        directions = torch.randn(n_true, d_in, generator=self.gen, device=device)
        self.directions = directions / directions.norm(dim=-1, keepdim=True)
        self.active, self.batch = active, batch

    def next_batch(self) -> torch.Tensor:
        n_true, device = len(self.directions), self.directions.device
        which = torch.randint(0, n_true, (self.batch, self.active), generator=self.gen, device=device)
        magnitudes = 0.5 + torch.rand(self.batch, self.active, generator=self.gen, device=device)
        return torch.zeros(self.batch, n_true, device=device).scatter_add_(1, which, magnitudes) @ self.directions


def precision_agreement(d_in: int, d_sae: int, batch: int, steps: int, device: torch.device) -> None:
    """Trains the same SAE on the same planted rows in each precision (the layer-1 recipes of gpt2-small and
    gpt2-small-topk, warm-up shortened to fit), then scores each in fp32 on fresh rows: explained variance, L0,
    and the mean cosine between each feature's decoder direction and the fp32 run's."""
    from attnsae.config import SAEConfig, read_params, sae_config
    from attnsae.sae.training import LayerTrainer, matmul_precision

    profiles = Path(__file__).resolve().parents[1] / "profiles"
    never = 10**9
    for profile in ("gpt2-small", "gpt2-small-topk"):
        recipe = sae_config(read_params(profiles / f"{profile}.yaml"), 1).model_dump(exclude_unset=True)
        if recipe.get("architecture", "standard") == "standard":
            recipe["l1_coeff"] = PLANTED_L1
        decoders = {}
        for precision, kernel in (("fp32", "dense"), ("tf32", "dense"), ("bf16", "dense"), ("bf16", "sparse")):
            cfg = SAEConfig.model_validate({**recipe, "d_sae": d_sae, "batch_size": batch,
                                            "train_tokens": batch * steps, "warmup_steps": steps // 10,
                                            "resample_every": never, "dead_window": 1, "log_every": never,
                                            "buffer_rows": 2 * batch, "device": device.type,
                                            "precision": precision, "kernel": kernel})
            trainer = LayerTrainer(cfg, d_in, device)
            batches = PlantedBatches(d_in, 4 * d_in, 8, batch, device)
            with matmul_precision(precision):
                for step in range(steps):
                    trainer.step(step, batches)
            held_out = PlantedBatches(d_in, 4 * d_in, 8, batch, device)  # same directions, rows never trained on
            held_out.gen.manual_seed(1)
            x = trainer.objective.scaled(held_out.next_batch())
            with torch.no_grad():
                out = trainer.objective.loss(trainer.sae, x, steps)
                ev = 1 - (x - out.x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
                l0 = out.features.fires_per_row().mean()
            decoder = trainer.sae.W_dec.detach().float()
            decoders[precision, kernel] = decoder
            cosine = torch.nn.functional.cosine_similarity(decoder, decoders["fp32", "dense"], dim=-1).mean()
            print(f"quality, {profile} SAE (l1_coeff {cfg.l1_coeff}, k {cfg.k}), {precision} {kernel} kernel after "
                  f"{steps} steps: explained variance {ev:.4f}, L0 {l0:.1f}, decoder cosine to fp32 dense {cosine:.4f}")


def forward_tokens_per_s(bridge, vocab: int, layers: list[int], rows: int, amp, repeats: int,
                         device: torch.device) -> float:
    from attnsae.data.activations import capture_z

    tokens = torch.randint(0, vocab, (rows, 128), device=device)
    return rows * 128 / timed(lambda: capture_z(bridge, tokens, layers, amp), repeats, device)


def harvesting_tokens_per_s(model, vocab: int, layers: list[int], rows: int, amp, repeats: int,
                            device: torch.device) -> float:
    from attnsae.data.harvest import HarvestingForward

    harvest = HarvestingForward(model, layers, "bf16" if amp is not None else "fp32")
    tokens = torch.randint(0, vocab, (rows, 128), device=device)
    return rows * 128 / timed(lambda: harvest(tokens), repeats, device)


class Stream:
    """`attnsae train --stream` on random token rows: ``train_saes`` over a ``ModelStream``, with the gpt2-small
    profile's rows per forward and buffer size."""

    def __init__(self, model, vocab: int, d_in: int, d_sae: int, batch: int, rows_per_forward: int,
                 buffer_rows: int, device: torch.device):
        self.model, self.d_in, self.d_sae, self.batch = model, d_in, d_sae, batch
        self.rows_per_forward, self.buffer_rows, self.device = rows_per_forward, buffer_rows, device
        self.token_rows = np.random.default_rng(0).integers(0, vocab, size=(4096, 128)).astype(np.int32)

    def seconds(self, layers: list[int], precision: str, steps: int, compiled: bool = False, **recipe) -> float:
        from attnsae.config import SAEConfig
        from attnsae.data.activations import ArrayRows, ModelStream
        from attnsae.data.harvest import HarvestingForward
        from attnsae.sae.training import train_saes

        stream = ModelStream(HarvestingForward(self.model, layers, "auto"), ArrayRows(self.token_rows),
                             self.rows_per_forward, self.d_in, self.device)
        cfg = SAEConfig(d_sae=self.d_sae, train_tokens=self.batch * steps, batch_size=self.batch,
                        buffer_rows=self.buffer_rows, resample_every=10**9, dead_window=1, log_every=10**9,
                        precision=precision, device=self.device.type, compile=compiled, **(recipe or {"l1_coeff": 1.0}))
        synchronize(self.device)
        start = time.perf_counter()
        train_saes({n: cfg for n in layers}, {n: stream.view(n) for n in layers}, progress=False, shared=stream)
        synchronize(self.device)
        return time.perf_counter() - start

    def tokens_per_s(self, layers: list[int], precision: str, steps: tuple[int, int], **options) -> float:
        """Tokens per second through each layer's SAE once the buffer is full: the time of ``steps[1]`` steps less
        that of ``steps[0]`` (both runs fill the buffer first; a run of the paper's 2e9 tokens fills it once)."""
        short, long = (self.seconds(layers, precision, n, **options) for n in steps)
        return self.batch * (steps[1] - steps[0]) / (long - short)

    def host_waits(self, layers: list[int], precision: str, steps: int) -> list[tuple[int, str]]:
        """Where the host waits for the GPU in a run (CUDA's sync debug mode), most frequent first."""
        import collections
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                self.seconds(layers, precision, steps)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        places = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught
                                     if "synchroniz" in str(w.message))
        return [(n, place) for place, n in places.most_common()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and a tiny model: a smoke test")
    args = parser.parse_args()
    device = torch.device(args.device)
    quick = args.quick
    d_in, d_sae, batch, repeats = (64, 256, 256, 2) if quick else (768, 24576, 4096, 20)
    model_name = "tiny-gpt2" if quick else "gpt2-random"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}, {'quick smoke test' if quick else 'GPT-2 Small shapes'}")

    from attnsae.sae.training import matmul_precision

    roofline = {}
    for precision, dtype in (("fp32", torch.float32), ("tf32", torch.float32), ("bf16", torch.bfloat16)):
        with matmul_precision(precision):
            roofline[precision] = matmul_gflops(batch, d_in, d_sae, dtype, repeats, device) * 1e9
        print(f"matmul [{batch},{d_in}]x[{d_in},{d_sae}] {precision}: {roofline[precision] / 1e12:.1f} TFLOP/s")

    flop_per_token = 12 * d_in * d_sae
    plain = sae_step_tokens_per_s(d_in, d_sae, batch, repeats, device, "fp32", plain_adam=True)
    print(f"SAE step, plain (fp32, Adam loop): {plain:,.0f} tokens/s = "
          f"{plain * flop_per_token / roofline['fp32']:.0%} of the fp32 roofline")
    rates = {}
    for precision in ("fp32", "tf32", "bf16"):
        if precision == "bf16" and device.type == "cpu" and not quick:
            continue  # ~80x slower than fp32 on CPUs without bf16 units
        rates[precision] = sae_step_tokens_per_s(d_in, d_sae, batch, repeats, device, precision)
        print(f"SAE step, {precision} (fused Adam on CUDA): {rates[precision]:,.0f} tokens/s = "
              f"{rates[precision] * flop_per_token / roofline[precision]:.0%} of the {precision} roofline, "
              f"{rates[precision] / plain:.2f}x plain")
    best = max(rates, key=rates.get)
    if device.type == "cuda" or quick:
        compiled = sae_step_tokens_per_s(d_in, d_sae, batch, repeats, device, best, compiled=True)
        print(f"SAE step, {best} + sae.compile: {compiled:,.0f} tokens/s, {compiled / rates[best]:.2f}x without it")

    precision_agreement(d_in, d_sae, batch, 30 if quick else 400, device)

    from attnsae.config import ModelConfig, read_params
    from attnsae.data.harvest import load_harvesting_model
    from attnsae.data.models import load_bridge, prepare_model

    folder = Path("/tmp") / f"attnsae-bench-{model_name}"
    if not (folder / "attnsae_model.json").is_file():
        prepare_model(ModelConfig(source=model_name), folder)
    bridge, info = load_bridge(folder, device)
    model = load_harvesting_model(folder, device)
    layers = list(range(info.n_layers))
    paper = read_params(Path(__file__).resolve().parents[1] / "profiles" / "gpt2-small.yaml")
    forward_rows = 8 if quick else paper["activations"]["batch_rows"]
    for label, amp in (("fp32", None), ("bf16 autocast", torch.bfloat16 if device.type == "cuda" else None)):
        if amp is None and label != "fp32":
            continue
        rate = forward_tokens_per_s(bridge, info.vocab_size, layers, forward_rows, amp, max(2, repeats // 4), device)
        harvesting = harvesting_tokens_per_s(model, info.vocab_size, layers, forward_rows, amp, max(2, repeats // 4),
                                             device)
        print(f"model forward ({model_name}, hook_z at all {len(layers)} layers), {label}: bridge {rate:,.0f} "
              f"tokens/s, harvesting forward {harvesting:,.0f} tokens/s ({harvesting / rate:.2f}x)")

    rows, buffer_rows = (forward_rows, 4 * batch) if quick else (forward_rows, paper["sae"]["buffer_rows"])
    steps = (2, 6) if quick else (8, 8 + buffer_rows // 2 // batch)  # the longer run refills the buffer once
    stream = Stream(model, info.vocab_size, info.d_in, d_sae, batch, rows, buffer_rows, device)
    stream.seconds(layers, best, 2)  # warm-up
    if device.type == "cuda":
        waits = stream.host_waits(layers, best, steps[1])
        print(f"host waits for the GPU in a {steps[1]}-step run of all layers (file:line, count): "
              + (", ".join(f"{place} {n}" for n, place in waits) or "none"))
    print(f"train --stream end to end, {best}, {rows} rows per forward, buffer {buffer_rows:,} rows, steady state:")
    one = stream.tokens_per_s([layers[-1]], best, steps)
    print(f"  one layer: {one:,.0f} tokens/s")
    every = stream.tokens_per_s(layers, best, steps)
    print(f"  all {len(layers)} layers from one forward: {every:,.0f} tokens/s through each layer's SAE")
    compiled = stream.tokens_per_s(layers, best, steps, compiled=True)
    print(f"  all {len(layers)} layers, sae.compile: {compiled:,.0f} tokens/s, {compiled / every:.2f}x")
    fastest, options = (compiled, {"compiled": True}) if compiled > every else (every, {})
    if not quick:
        one_gpu = PAPER_TOKENS / fastest / 3600
        per_rank = -(-PAPER_LAYERS // 8)  # layers on the busiest of 8 ranks
        eight = PAPER_TOKENS / stream.tokens_per_s(layers[:per_rank], best, steps, **options) / 3600
        print(f"paper run ({PAPER_LAYERS} layers x {PAPER_TOKENS:.0e} tokens), {best} {options or ''}: "
              f"{one_gpu:.1f} h on one GPU, {eight:.1f} h on eight ({per_rank} layers on the busiest rank, "
              f"its own forward)")
    topk = {"architecture": "topk", "k": 32, "kernel": "sparse"}
    sparse = stream.tokens_per_s(layers, best, steps, **topk)
    print(f"  all {len(layers)} layers, TopK k 32 on the sparse kernel ({best}): {sparse:,.0f} tokens/s through each "
          f"layer's SAE" + ("" if quick else f"; the paper run's tokens with gpt2-small-topk's architecture: "
                                             f"{PAPER_TOKENS / sparse / 3600:.1f} h on one GPU"))


if __name__ == "__main__":
    main()
