"""Run by tests/test_saelens.py with SAELens ahead on the path: load an SAE folder with SAELens itself and run it.

    python check.py SAE_FOLDER INPUTS OUTPUTS [SAE_FOLDER INPUTS OUTPUTS ...]

INPUTS: a safetensors file with ``z`` [batch, positions, heads, d_head] (hook_z as the model gives it). Writes
OUTPUTS (safetensors: ``features`` [batch, positions, d_sae] and ``reconstruction``, SAELens's ``encode`` and
``decode``) and prints what SAELens made of the folder as one JSON line, a line per folder in order (one process
for all: importing SAELens takes seconds). Imports nothing of attnsae.
"""

import json
import sys

import sae_lens
import torch
from sae_lens import SAE
from safetensors.torch import load_file, save_file


def check(folder: str, inputs: str, outputs: str) -> dict:
    sae = SAE.load_from_disk(folder, device="cpu")
    z = load_file(inputs)["z"]
    with torch.no_grad():
        features = sae.encode(z)
        reconstruction = sae.decode(features)
    save_file({"features": features.contiguous(), "reconstruction": reconstruction.contiguous()}, outputs)
    return {
        "sae_lens": sae_lens.__version__,
        "class": type(sae).__name__,
        "architecture": sae.cfg.architecture(),
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "hook_name": sae.cfg.metadata.hook_name,
    }


args = sys.argv[1:]
for start in range(0, len(args), 3):
    print(json.dumps(check(*args[start : start + 3])))
