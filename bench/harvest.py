"""The harvesting forward (data/harvest.py) against today's bridge forward (activations.capture_z), in one run on one
device: tokens/s capturing hook_z, and the largest difference between the two in fp32 (relative to the layer's
largest |hook_z|).

    python bench/harvest.py                               # CPU: the quickstart model (models/base) and gpt2-random
    python bench/harvest.py --device cuda --rows 512      # GPU: fp32 and bf16 autocast, and torch.compile

Models: SmolLM2-135M from the quickstart's models/base (layers 3, 10, 17, 24 as the quickstart captures them, and all
30), and gpt2-random (GPT-2 Small's shape, random weights, made by the model stage into /tmp), all 12 layers. Each
forward reads random token rows of 128; "x bridge" compares the two forwards at the same precision.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import timed  # noqa: E402

CONTEXT = 128


def model_folder(name: str) -> Path:
    from attnsae.config import ModelConfig
    from attnsae.data.models import prepare_model

    if name == "quickstart":
        return Path(__file__).resolve().parents[1] / "models" / "base"
    folder = Path("/tmp") / f"attnsae-bench-{name}"
    if not (folder / "attnsae_model.json").is_file():
        prepare_model(ModelConfig(source=name), folder)
    return folder


def compare(label: str, folder: Path, layers: list[int], rows: int, repeats: int, device: torch.device) -> None:
    from attnsae.data.activations import capture_z
    from attnsae.data.harvest import HarvestingForward, load_harvesting_model
    from attnsae.data.models import load_bridge

    bridge, info = load_bridge(folder, device)
    model = load_harvesting_model(folder, device)
    tokens = torch.randint(0, info.vocab_size, (rows, CONTEXT), generator=torch.Generator().manual_seed(0)).to(device)
    harvest = HarvestingForward(model, layers)
    check = tokens[: min(rows, 4)]
    expected, got = capture_z(bridge, check, layers), harvest(check)
    # per layer, the largest difference over the largest |hook_z| (the scale the 1e-5 of the tests is relative to)
    difference = max(float((got[n] - expected[n]).abs().max() / expected[n].abs().max()) for n in layers)
    precisions = [("fp32", None, "fp32")] + (
        [("bf16 autocast", torch.bfloat16, "bf16")] if device.type == "cuda" else [])
    for name, amp, precision in precisions:
        bridge_rate = rows * CONTEXT / timed(lambda amp=amp: capture_z(bridge, tokens, layers, amp), repeats, device)
        harvest = HarvestingForward(model, layers, precision)
        rate = rows * CONTEXT / timed(lambda harvest=harvest: harvest(tokens), repeats, device)
        line = (f"{label}, hook_z at {len(layers)} layers (to layer {max(layers)}), {rows} rows, {name}: bridge "
                f"{bridge_rate:,.0f} tok/s; harvesting {rate:,.0f} tok/s, {rate / bridge_rate:.2f}x")
        if device.type == "cuda":
            compiled = HarvestingForward(torch.compile(model), layers, precision)
            compiled(tokens)  # compiles
            compiled_rate = rows * CONTEXT / timed(lambda compiled=compiled: compiled(tokens), repeats, device)
            line += f"; compiled {compiled_rate:,.0f} tok/s, {compiled_rate / bridge_rate:.2f}x"
        print(line + (f"; largest |difference| to the bridge in fp32, over the layer's largest |hook_z|: "
                      f"{difference:.1e}" if amp is None else ""),
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=16, help="token rows of 128 per forward")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device: {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    quickstart = model_folder("quickstart")
    if (quickstart / "attnsae_model.json").is_file():
        compare("SmolLM2-135M", quickstart, [3, 10, 17, 24], args.rows, args.repeats, device)
        compare("SmolLM2-135M", quickstart, list(range(30)), args.rows, args.repeats, device)
    compare("gpt2-random", model_folder("gpt2-random"), list(range(12)), args.rows, args.repeats, device)


if __name__ == "__main__":
    main()
