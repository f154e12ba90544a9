"""The `attnsae` command on bad input: exit status 1, one line naming the problem, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from attnsae import config, files
from helpers import OFFLINE_ENV, REPO, assert_one_line_error, invoke


def edited_params(path: Path, edit) -> Path:
    data = yaml.safe_load(path.read_text())
    edit(data)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def root_copy(tmp_path) -> Path:
    """A repository root with the profiles and an existing params.yaml."""
    root = tmp_path / "repo"
    shutil.copytree(REPO / "profiles", root / "profiles")
    shutil.copytree(REPO / "pipelines", root / "pipelines")
    (root / "params.yaml").write_text("# the params.yaml in place before the switch\nprofile: old\n")
    return root


# ---------------------------------------------------------------------------------------------------
# profile


def test_unknown_profile(root_copy):
    result = invoke("profile", "nosuch", "--root", root_copy)
    allowed = sorted(p.stem for p in (root_copy / "profiles").glob("*.yaml"))
    assert_one_line_error(result, "'nosuch'", f"allowed: {', '.join(allowed)}")


def test_profile_lists_names(root_copy):
    result = invoke("profile", "--root", root_copy)
    assert result.exit_code == 0
    assert result.stdout.split() == sorted(p.stem for p in (root_copy / "profiles").glob("*.yaml"))


def test_profile_rewrites_params_atomically(root_copy):
    params = root_copy / "params.yaml"
    old_inode = params.stat().st_ino
    result = invoke("profile", "tiny", "--root", root_copy)
    assert result.exit_code == 0, result.output
    assert "tiny" in result.stdout
    assert params.read_bytes() == (root_copy / "profiles" / "tiny.yaml").read_bytes()
    # replaced by rename of a complete new file, not rewritten in place; no temporary file left behind
    assert params.stat().st_ino != old_inode
    assert sorted(p.name for p in root_copy.iterdir()) == ["dvc.yaml", "params.yaml", "pipelines", "profiles"]
    from attnsae.profiles import render_pipeline

    tiny = config.read_params(root_copy / "profiles" / "tiny.yaml")
    pipeline = (root_copy / "pipelines" / "cache.yaml").read_text()
    assert (root_copy / "dvc.yaml").read_text() == render_pipeline(pipeline, "tiny", tiny)


def test_profile_interrupted_write_leaves_old_params(root_copy, monkeypatch):
    params = root_copy / "params.yaml"
    before = params.read_bytes()

    def failing_replace(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(files.os, "replace", failing_replace)
    result = invoke("profile", "tiny", "--root", root_copy)
    assert result.exit_code != 0
    assert params.read_bytes() == before
    assert sorted(p.name for p in root_copy.iterdir()) == ["params.yaml", "pipelines", "profiles"]


def test_profile_failing_validation_leaves_old_params(root_copy):
    params = root_copy / "params.yaml"
    before = params.read_bytes()
    broken = yaml.safe_load((root_copy / "profiles" / "tiny.yaml").read_text())
    broken["profile"] = "broken"
    broken["saes"] = {"d_sae": 1}  # an unknown section
    (root_copy / "profiles" / "broken.yaml").write_text(yaml.safe_dump(broken))
    result = invoke("profile", "broken", "--root", root_copy)
    assert_one_line_error(result, "unknown section 'saes'")
    assert params.read_bytes() == before


def test_profile_with_bad_key_inside_a_section_is_rejected(root_copy):
    params = root_copy / "params.yaml"
    before = params.read_bytes()
    broken = yaml.safe_load((root_copy / "profiles" / "tiny.yaml").read_text())
    broken["profile"] = "broken"
    broken["sae"]["l1_coef"] = broken["sae"].pop("l1_coeff")
    (root_copy / "profiles" / "broken.yaml").write_text(yaml.safe_dump(broken))
    result = invoke("profile", "broken", "--root", root_copy)
    assert params.read_bytes() == before
    assert_one_line_error(result, "sae.l1_coef")


# ---------------------------------------------------------------------------------------------------
# train / evaluate on bad input


def test_train_layer_not_in_per_layer(tiny_params_file, tmp_path):
    result = invoke(
        "train", "--params", tiny_params_file, "--layer", "99", "--no-mlflow", "--activations", tmp_path / "acts",
        "--out", tmp_path / "sae", "--curves", tmp_path / "curves.csv",
    )
    configured = ", ".join(yaml.safe_load(tiny_params_file.read_text())["per_layer"])
    assert_one_line_error(result, "layer 99", "per_layer", configured)
    assert not (tmp_path / "sae").exists() and not (tmp_path / "curves.csv").exists()


def test_train_bad_layer_text(tiny_params_file, tmp_path):
    result = invoke("train", "--params", tiny_params_file, "--layer", "x3", "--no-mlflow", "--activations", tmp_path)
    assert_one_line_error(result, "bad layer 'x3'")


def test_train_unknown_key_in_params(tiny_params_file, tmp_path):
    edited_params(tiny_params_file, lambda d: d["sae"].update(l1_coef=d["sae"].pop("l1_coeff")))
    layer = yaml.safe_load(tiny_params_file.read_text())["layers"][0]
    result = invoke("train", "--params", tiny_params_file, "--layer", f"L{layer}", "--no-mlflow", "--activations",
                    tmp_path)
    assert_one_line_error(result, "unknown key 'sae.l1_coef'")


def test_evaluate_unknown_key_in_params(tiny_params_file, tmp_path):
    edited_params(tiny_params_file, lambda d: d["evaluate"].update(batchrows=4))
    result = invoke("evaluate", "--params", tiny_params_file, "--layer", "1", "--no-mlflow", "--sae", tmp_path)
    assert_one_line_error(result, "unknown key 'evaluate.batchrows'")


def test_missing_params_file(tmp_path):
    result = invoke("train", "--params", tmp_path / "absent.yaml", "--layer", "1", "--no-mlflow")
    assert_one_line_error(result, "absent.yaml", "no such file")


@pytest.fixture
def corrupt_sae(tmp_path) -> Path:
    folder = tmp_path / "sae"
    folder.mkdir()
    (folder / "cfg.json").write_text('{"d_in": 64, "d_sae": ')
    (folder / "sae_weights.safetensors").write_bytes(b"\x00" * 10)
    return folder


def evaluate_args(params: Path, sae: Path, tmp_path: Path) -> list:
    return [
        "evaluate", "--params", params, "--layer", "1", "--no-mlflow", "--sae", sae, "--model", tmp_path / "model",
        "--tokens", tmp_path / "tokens", "--out", tmp_path / "metrics.json", "--density", tmp_path / "density.csv",
    ]


def test_evaluate_corrupt_sae_folder(tiny_params_file, corrupt_sae, tmp_path):
    result = invoke(*evaluate_args(tiny_params_file, corrupt_sae, tmp_path))
    assert_one_line_error(result, "cfg.json", "corrupt JSON")
    assert not (tmp_path / "metrics.json").exists()


def test_evaluate_truncated_weights(tiny_params_file, corrupt_sae, tmp_path):
    (corrupt_sae / "cfg.json").write_text(json.dumps({"d_in": 64, "d_sae": 128}))
    result = invoke(*evaluate_args(tiny_params_file, corrupt_sae, tmp_path))
    assert_one_line_error(result, "corrupt safetensors")


def test_evaluate_not_an_sae_folder(tiny_params_file, tmp_path):
    result = invoke(*evaluate_args(tiny_params_file, tmp_path / "nothing", tmp_path))
    assert_one_line_error(result, "not an SAE folder")


def test_real_process_corrupt_sae_prints_one_line(tiny_params_file, corrupt_sae, tmp_path):
    """The installed entry point, in its own process: stderr is exactly one line, stdout is empty."""
    exe = Path(sys.executable).with_name("attnsae")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "attnsae"]
    args = [str(a) for a in evaluate_args(tiny_params_file, corrupt_sae, tmp_path)]
    proc = subprocess.run(
        cmd + args, capture_output=True, text=True, cwd=tmp_path, env={**os.environ, **OFFLINE_ENV}, timeout=120
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "corrupt JSON" in lines[0], proc.stderr
