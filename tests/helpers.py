"""Plain helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import torch
from click.testing import CliRunner

from attnsae import config
from attnsae.cli import main
from attnsae.config import EvaluateConfig
from attnsae.files import sha256_file
from attnsae.formats.model_info import META_FILE
from attnsae.sae.autoencoder import SAE

REPO = Path(__file__).resolve().parents[1]
TINY_PROFILE = REPO / config.PROFILES_DIR / "tiny.yaml"


def run(cmd: list[str], cwd: Path, env: dict) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def copy_project_files(root: Path) -> None:
    """What a pipeline repository needs from this one: the profiles, the pipelines, the code its stages
    list as deps (src/attnsae; the code that runs is the installed package, built from the same files), an
    empty labels folder and an empty frontier table (the report's deps: nobody has rated this repository's
    dashboards or run its frontier yet)."""
    from attnsae.reporting.frontier import frontier_csv

    for name in ("pipelines", "profiles"):
        shutil.copytree(REPO / name, root / name)
    (root / "labels").mkdir()
    shutil.copy(REPO / "labels" / "README.md", root / "labels" / "README.md")
    (root / "reports").mkdir()
    (root / "reports" / "frontier.csv").write_text(frontier_csv([]))
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))


def pipeline_repository(root: Path, env: dict, profile: str, commit: bool = True) -> None:
    """A fresh git + DVC repository at ``root`` with ``profile`` active (params.yaml and dvc.yaml written),
    committed unless ``commit`` is False (a test that edits the params first)."""
    root.mkdir(parents=True, exist_ok=True)
    copy_project_files(root)
    run(["git", "init", "-q"], root, env)
    run(["dvc", "init", "-q"], root, env)
    run(["attnsae", "profile", profile], root, env)
    if commit:
        run(["git", "add", "-A"], root, env)
        run(["git", "commit", "-q", "-m", profile], root, env)


def stages_run(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def status_after_changing(path: Path, root: Path, env: dict) -> dict:
    """`dvc status --json` of the repository at ``root`` with one byte added to ``path``, which is then restored."""
    original = path.read_bytes()
    path.write_bytes(original + b"\n")
    try:
        return json.loads(run(["dvc", "status", "--json"], root, env))
    finally:
        path.write_bytes(original)


def read_tiny_params() -> dict:
    """profiles/tiny.yaml as a fresh dict (the `tiny_params` fixture, for fixtures of a wider scope)."""
    return config.read_params(TINY_PROFILE)


# ---------------------------------------------------------------------------------------------------
# The `attnsae` command in-process, and its one-line errors

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
}


def invoke(*args):
    return CliRunner(env=OFFLINE_ENV).invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # a ClickException, not a crash
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------------
# SAEs and activations with known answers

# evaluate_sae on the `tiny_eval_case` fixture's 6 rows: a full batch and a partial one, at this layer
TINY_EVAL_CFG = EvaluateConfig(batch_rows=4, device="cpu")
TINY_EVAL_LAYER = 1


def perfect_sae(d_in: int) -> SAE:
    """ReLU(x) - ReLU(-x) = x: exact reconstruction with d_sae = 2 * d_in."""
    sae = SAE(d_in, 2 * d_in)
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


class PlantedDictionary:
    """A ``RowSource``: each row is the sum of ``active`` of ``n_true`` unit directions, magnitudes in [0.5, 1.5).

    The dictionary and the row stream come from their own seeded generators, so two sources built
    with the same seed serve the same rows in the same order.
    """

    def __init__(self, d_in: int = 32, n_true: int = 64, active: int = 3, seed: int = 0):
        self.d_in, self.n_true, self.active = d_in, n_true, active
        dictionary_gen = torch.Generator().manual_seed(seed)
        directions = torch.randn(n_true, d_in, generator=dictionary_gen)
        self.directions = directions / directions.norm(dim=-1, keepdim=True)
        self.gen = torch.Generator().manual_seed(seed + 1)

    def take(self, n: int) -> torch.Tensor:
        # `active` distinct directions per row: the first columns of a random permutation of each row
        which = torch.rand(n, self.n_true, generator=self.gen).argsort(dim=-1)[:, : self.active]
        magnitudes = 0.5 + torch.rand(n, self.active, generator=self.gen)
        coefficients = torch.zeros(n, self.n_true).scatter_(1, which, magnitudes)
        return coefficients @ self.directions


# ---------------------------------------------------------------------------------------------------
# Variants of the tiny GPT-2 (a copy of the `tiny_model_dir` folder: that one is shared)


def strong_layernorm(folder: Path) -> None:
    """Rewrite the tiny GPT-2 in ``folder`` with large, non-unit LayerNorm weights and biases.

    ``tiny_gpt2`` leaves every LayerNorm weight at 1 and draws biases with std 0.02, so folding
    ln_1.weight is invisible there and ln_1.bias @ W_V is small. Here both are large, so using
    b_V instead of b_V + ln_1.bias @ W_V (or forgetting the LN weight) is far outside tolerance.
    """
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(folder)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".ln_" in name and name.endswith(".weight"):
                param.copy_(1.0 + 0.5 * torch.randn(param.shape, generator=gen))
            elif ".ln_" in name and name.endswith(".bias"):
                param.copy_(0.5 * torch.randn(param.shape, generator=gen))
            elif name.endswith("attn.c_attn.bias"):
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))
    model.save_pretrained(folder, safe_serialization=True)
    meta_path = folder / META_FILE
    meta = json.loads(meta_path.read_text())
    meta["name"] += ", strong LayerNorm"
    meta["sha256"]["weights"] = sha256_file(folder / "model.safetensors")
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
