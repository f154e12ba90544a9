"""attnsae's SAE folders in SAELens itself: `sae_lens.SAE.load_from_disk` reads each kind attnsae writes (standard,
TopK, JumpReLU; a trained folder with its sparsity file, a published one with its model card) and its ``encode`` and
``decode`` on hook_z equal attnsae's.

SAELens needs transformer-lens < 4 and attnsae runs 4.3, so SAELens runs in a subprocess with its own pinned
packages (tests/saelens/requirements.txt, fetched from PyPI once per test run) ahead of attnsae's environment, as a
user with SAELens installed would run it; tests/saelens/check.py imports nothing of attnsae.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from attnsae.data.models import hook_z_name
from attnsae.formats.sae_cfg import KINDS, sae_cfg
from attnsae.sae.autoencoder import SAE, load_sae, save_sae

SAELENS = Path(__file__).parent / "saelens"  # its pins and the script it runs
HEADS, D_HEAD, D_SAE, K, LAYER = 4, 8, 48, 5, 3


def run_saelens(site: Path, jobs: list[tuple[Path, Path, Path]]) -> list[dict]:
    """tests/saelens/check.py on each (SAE folder, inputs, outputs): what SAELens made of each folder."""
    env = {**os.environ, "PYTHONPATH": str(site)}  # SAELens's transformer-lens 3 ahead of attnsae's 4
    args = [str(part) for job in jobs for part in job]
    result = subprocess.run([sys.executable, str(SAELENS / "check.py"), *args], capture_output=True, text=True,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def random_sae(kind: str, seed: int) -> SAE:
    gen = torch.Generator().manual_seed(seed)
    sae = SAE(HEADS * D_HEAD, D_SAE, generator=gen, kind=kind, k=K if kind == "topk" else None)
    with torch.no_grad():
        sae.b_enc.copy_(0.3 * torch.randn(D_SAE, generator=gen))
        sae.b_dec.copy_(0.3 * torch.randn(HEADS * D_HEAD, generator=gen))
        if kind == "jumprelu":
            sae.threshold.copy_(torch.rand(D_SAE, generator=gen))
    return sae


def attnsae_outputs(folder: Path, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What attnsae computes from the folder: features [batch, positions, d_sae] and the reconstruction as z's shape."""
    sae, _ = load_sae(folder)
    x = z.reshape(-1, sae.d_in)
    with torch.no_grad():
        features = sae.encode(x)
        return features.reshape(*z.shape[:2], -1), sae.decode(features).reshape(z.shape)


def compare(site: Path, folders: dict[str, Path], z: torch.Tensor, tmp_path: Path) -> dict[str, dict]:
    save_file({"z": z}, str(tmp_path / "z.safetensors"))
    jobs = [(folder, tmp_path / "z.safetensors", tmp_path / f"{name}.out.safetensors")
            for name, folder in folders.items()]
    facts = dict(zip(folders, run_saelens(site, jobs), strict=True))
    for name, folder in folders.items():
        theirs = load_file(str(tmp_path / f"{name}.out.safetensors"))
        features, reconstruction = attnsae_outputs(folder, z)
        assert (features > 0).any() and (features == 0).any(), name  # both firing and silent: the check can fail
        torch.testing.assert_close(theirs["features"], features, atol=1e-6, rtol=0, msg=name)
        torch.testing.assert_close(theirs["reconstruction"], reconstruction, atol=1e-6, rtol=0, msg=name)
    return facts


def test_saelens_loads_every_kind_attnsae_writes_and_computes_the_same(saelens_site, tmp_path):
    folders = {}
    for seed, kind in enumerate(KINDS):
        cfg = sae_cfg(d_in=HEADS * D_HEAD, d_sae=D_SAE, hook_name=hook_z_name(LAYER), layer=LAYER, model_name="tiny",
                      context_size=16, dataset="synthetic", kind=kind, k=K if kind == "topk" else None)
        folders[kind] = tmp_path / kind
        save_sae(random_sae(kind, seed), folders[kind], cfg, None)
    z = torch.randn(2, 6, HEADS, D_HEAD, generator=torch.Generator().manual_seed(9))
    facts = compare(saelens_site, folders, z, tmp_path)
    for kind, seen in facts.items():
        assert (seen["architecture"], seen["d_in"], seen["d_sae"], seen["hook_name"]) == (
            kind, HEADS * D_HEAD, D_SAE, hook_z_name(LAYER)), seen
    assert {seen["sae_lens"] for seen in facts.values()} == {"6.54.12"}


@pytest.mark.integration
def test_saelens_loads_the_pipelines_trained_and_published_folders(saelens_site, tiny_pipeline, tmp_path):
    from attnsae import layout
    from attnsae.formats.model_info import read_model_info

    root, _, _ = tiny_pipeline
    info = read_model_info(root / layout.MODEL_DIR)
    folders = {"trained": root / layout.sae_dir(2), "published": root / layout.published_dir(2)}
    assert (folders["trained"] / "sparsity.safetensors").is_file() and (folders["published"] / "README.md").is_file()
    z = torch.randn(2, 6, info.n_heads, info.d_head, generator=torch.Generator().manual_seed(4))
    facts = compare(saelens_site, folders, z, tmp_path)
    assert all(seen["hook_name"] == hook_z_name(2) for seen in facts.values())
