"""Pull instead of retrain: push the tiny run to a DVC remote, clone elsewhere, pull, `attnsae verify`.

The integration tests reuse the session's tiny pipeline run (tests/conftest.py) on a copy: commit, tag,
`dvc push` to a local remote, `git clone`, `dvc pull` of what the README names, verify, `dvc repro --dry`;
other repositories fetch one layer with `dvc artifacts get` / `dvc import` at a tag. The unit tests cover the
artifacts section of dvc.yaml and verify's comparisons.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from attnsae import config
from attnsae.errors import UserError
from attnsae.evaluation.verify import (
    Check,
    compare_copies,
    compare_listings,
    compare_metrics,
    metric_tolerance,
    subtree,
    summarize,
)
from attnsae.profiles import artifact_name, artifacts_section, profile_pipeline, render_pipeline
from helpers import REPO, run, stages_run

# What the README tells a new user to pull: the SAE folders, their dashboards (the report reads them), and what
# `attnsae verify` re-evaluates them on.
PULL = ["dvc", "pull", "model", "tokenize", "train", "publish", "dashboards"]
WEIGHTS = "models/sae/L1/sae_weights.safetensors"


# ----------------------------------------------------------------------------------------------------------
# Integration: one push, one clone, shared by the tests below


@pytest.fixture(scope="module")
def registry(tiny_pipeline, tmp_path_factory):
    root, env, _ = tiny_pipeline
    base = tmp_path_factory.mktemp("registry")
    origin, storage, clone = base / "origin", base / "storage", base / "clone"
    shutil.copytree(root, origin, symlinks=True)  # the shared run stays as it is
    (origin / ".gitignore").write_text("/mlflow.db\n/mlruns/\n")
    run(["dvc", "remote", "add", "-d", "storage", str(storage)], origin, env)
    run(["git", "add", "-A"], origin, env)
    run(["git", "commit", "-q", "-m", "tiny run"], origin, env)
    for layer in (1, 2):  # a version tag per artifact, in the format `dvc artifacts get --rev` looks up
        run(["git", "tag", "-a", f"{artifact_name('tiny', layer)}@v1.0.0", "-m", f"layer {layer}"], origin, env)
    pushed = run(["dvc", "push"], origin, env)
    run(["git", "clone", "-q", str(origin), str(clone)], base, env)
    pulled = run(PULL, clone, env)
    return SimpleNamespace(base=base, origin=origin, storage=storage, clone=clone, env=env, pushed=pushed,
                           pulled=pulled)


def attnsae(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["attnsae", *args], cwd=cwd, env=env, capture_output=True, text=True, check=False)


def dir_listing(repo: Path, md5: str) -> list[dict]:
    """The .dir object (file list) of a directory output, from a repo's DVC cache."""
    return json.loads((repo / ".dvc/cache/files/md5" / md5[:2] / md5[2:]).read_text())


def in_storage(storage: Path, md5: str) -> bool:
    return (storage / "files/md5" / md5[:2] / md5[2:]).is_file()


@pytest.mark.integration
def test_push_sends_every_output_but_the_activation_cache(registry):
    lock = yaml.safe_load((registry.origin / "dvc.lock").read_text())
    outs = {o["path"]: o["md5"] for stage in lock["stages"].values() for o in stage.get("outs", []) if "md5" in o}
    activations = outs.pop("data/activations")
    assert not in_storage(registry.storage, activations)
    assert not any(in_storage(registry.storage, f["md5"]) for f in dir_listing(registry.origin, activations))
    for path in ("models/base", "data/corpus", "data/tokens", "models/sae/L1", "models/published/L2",
                 "reports/dashboards/L1"):
        assert in_storage(registry.storage, outs[path]), path
        assert all(in_storage(registry.storage, f["md5"]) for f in dir_listing(registry.origin, outs[path])), path
    assert not (registry.clone / "data/activations").exists()


@pytest.mark.integration
def test_clone_pulls_verifies_and_has_nothing_to_reproduce(registry):
    clone, env = registry.clone, registry.env
    result = attnsae(["verify"], clone, env)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith("verify: OK: 10 checks passed (layers 1, 2:")
    for layer in (1, 2):
        assert sum(line.startswith(f"L{layer} ") for line in lines) == 4  # sae hash, published hash, copy, metrics
    assert not any(" FAIL " in line for line in lines)
    assert run(["git", "status", "--porcelain"], clone, env) == ""  # the re-evaluation wrote nothing in the repo

    dry = run(["dvc", "repro", "--allow-missing", "--dry"], clone, env)
    assert stages_run(dry) == set()
    assert "Data and pipelines are up to date." in dry
    # `dvc status` reports only what was never pulled: the corpus (not named in the pull) and the activation
    # cache (never pushed), as missing outputs and as missing deps of the stages that read them.
    status = json.loads(run(["dvc", "status", "--json"], clone, env))
    changed = {path for entries in status.values() for entry in entries for group in entry.values() for path in group}
    assert changed <= {"data/corpus", "data/activations", "data/activations/L1", "data/activations/L2"}, status


@pytest.mark.integration
def test_other_repositories_get_one_layer_at_a_tag(registry):
    env, base = registry.env, registry.base
    source = base / "source"  # a clone without a DVC cache: every byte must come from the remote
    run(["git", "clone", "-q", str(registry.origin), str(source)], base, env)
    published = registry.origin / "models/published"

    got = base / "got"
    run(["dvc", "artifacts", "get", str(source), "tiny-sae-L1", "--rev", "v1.0.0", "-o", str(got)], base, env)
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in (published / "L1").iterdir())
    for path in got.iterdir():
        assert path.read_bytes() == (published / "L1" / path.name).read_bytes()

    consumer = base / "consumer"
    consumer.mkdir()
    run(["git", "init", "-q"], consumer, env)
    run(["dvc", "init", "-q"], consumer, env)
    run(["dvc", "import", str(source), "models/published/L2", "--rev", "tiny-sae-L2@v1.0.0", "-o", "sae-L2"],
        consumer, env)
    assert (consumer / "sae-L2/sae_weights.safetensors").read_bytes() \
        == (published / "L2/sae_weights.safetensors").read_bytes()
    pinned = yaml.safe_load((consumer / "sae-L2.dvc").read_text())["deps"][0]["repo"]
    tagged = run(["git", "rev-list", "-n", "1", "tiny-sae-L2@v1.0.0"], registry.origin, env).strip()
    assert (pinned["rev"], pinned["rev_lock"]) == ("tiny-sae-L2@v1.0.0", tagged)


@pytest.mark.integration
def test_verify_fails_with_one_line_per_mismatch(registry):
    clone, env = registry.clone, registry.env
    weights, metrics = clone / WEIGHTS, clone / "reports/metrics/L2.json"
    weights_bytes, metrics_text = weights.read_bytes(), metrics.read_text()
    recorded = json.loads(metrics_text)
    try:
        weights.write_bytes(weights_bytes[:-1] + bytes([weights_bytes[-1] ^ 1]))  # one bit of the last weight
        metrics.write_text(json.dumps({**recorded, "loss_recovered": recorded["loss_recovered"] + 0.5}))
        result = attnsae(["verify"], clone, env)
    finally:
        weights.write_bytes(weights_bytes)
        metrics.write_text(metrics_text)
    assert result.returncode == 1, result.stdout + result.stderr
    failures = [line for line in result.stdout.splitlines() if " FAIL " in line]
    assert len(failures) == 2, result.stdout
    weights_line, metrics_line = failures
    sae_files = {f["relpath"]: f["md5"] for f in dir_listing(clone, yaml.safe_load(
        (clone / "dvc.lock").read_text())["stages"]["train@1"]["outs"][0]["md5"])}
    assert weights_line.startswith("L1 ") \
        and f"{WEIGHTS}: md5 expected {sae_files['sae_weights.safetensors']}, found " in weights_line
    assert metrics_line.startswith("L2 ") and "reports/metrics/L2.json: loss_recovered expected " in metrics_line
    assert "skip  reports/metrics/L1.json" in result.stdout  # a changed SAE is not re-evaluated
    assert result.stdout.strip().splitlines()[-1].startswith("verify: FAILED: 2 of 9 checks failed, 1 skipped")


@pytest.mark.integration
def test_verify_rejects_a_layer_outside_the_params(registry):
    result = attnsae(["verify", "--layer", "7", "--no-evaluate"], registry.clone, registry.env)
    assert result.returncode == 1
    assert result.stderr.strip() == "Error: --layer 7: not a layer of params.yaml (allowed: 1, 2)"


# ----------------------------------------------------------------------------------------------------------
# Unit: the artifacts section of dvc.yaml


def test_artifacts_name_each_layers_published_folder(tiny_params):
    section = artifacts_section("tiny", tiny_params)
    assert list(section) == ["tiny-sae-L1", "tiny-sae-L2"]
    entry = section["tiny-sae-L2"]
    assert entry["path"] == "models/published/L2"
    assert entry["type"] == "model"
    assert entry["meta"] == {"profile": "tiny", "layer": 2, "hook_name": "blocks.2.attn.hook_z", "model": "tiny-gpt2"}
    assert "tiny" in entry["labels"] and entry["desc"]


def test_rendered_pipeline_keeps_the_pipeline_file_and_adds_its_artifacts(tiny_params):
    pipeline = (REPO / "pipelines/cache.yaml").read_text()
    rendered = render_pipeline(pipeline, "tiny", tiny_params)
    assert rendered.startswith(pipeline.rstrip())  # comments and formatting of pipelines/*.yaml kept
    parsed = yaml.safe_load(rendered)
    assert parsed["stages"] == yaml.safe_load(pipeline)["stages"]
    assert parsed["artifacts"] == artifacts_section("tiny", tiny_params)


@pytest.mark.parametrize("profile", config.list_profiles(REPO))
def test_rendered_dvc_yaml_passes_dvcs_schema(profile):
    from dvc.schema import COMPILED_MULTI_STAGE_SCHEMA

    params = config.read_params(REPO / f"profiles/{profile}.yaml")
    rendered = yaml.safe_load(profile_pipeline(REPO, profile, params))
    COMPILED_MULTI_STAGE_SCHEMA(rendered)  # raises on a key or value DVC does not accept
    published = {"gpt2-small": "kissane", "gpt2-small-topk": "kissane", "gemma-2-2b": "gemma"}.get(profile)
    imports = [stage["do"]["cmd"] for name, stage in rendered["stages"].items() if name == "import_published_saes"]
    assert len(imports) == (published is not None)  # only models with published attention SAEs get their stages
    assert all(("gemma-scope-2b-att" in cmd) == (published == "gemma") for cmd in imports)


def test_profile_names_that_dvc_cannot_use_are_refused(tiny_params):
    with pytest.raises(UserError, match=r"profile name 'my\.profile' cannot name a DVC artifact"):
        artifacts_section("my.profile", tiny_params)
    with pytest.raises(UserError, match="already has an 'artifacts' section"):
        render_pipeline("stages: {}\nartifacts: {}\n", "tiny", tiny_params)


# ----------------------------------------------------------------------------------------------------------
# Unit: verify's comparisons

RECORDED = {
    "layer": 17, "model": "m", "d_sae": 2304, "sae": "models/sae/L17", "l0": 19.2, "loss_recovered": 0.809,
    "ce_clean": 4.1006, "ce_sae": 4.1022, "ce_zero": 4.1092, "ce_increase": 0.0017, "kl_sae": 0.0113,
    "kl_zero": 0.0259, "kl_score": 0.5647, "mse": 18.6, "explained_variance": 0.48, "dead_fraction": 0.465,
    "dense_fraction": 0.035, "dense_threshold": 0.1, "eval_tokens": 4096,
}


def test_identical_metrics_pass_and_the_recorded_file_is_the_reference():
    assert compare_metrics(RECORDED, dict(RECORDED)) == []
    assert compare_metrics(RECORDED, {**RECORDED, "new_metric": 1.0, "sae": "./elsewhere"}) == []


def test_float_noise_passes_and_real_changes_fail_naming_the_metric():
    noisy = {**RECORDED, "ce_sae": RECORDED["ce_sae"] + 5e-5, "mse": RECORDED["mse"] * (1 + 5e-5),
             "l0": RECORDED["l0"] + 3 / 4096, "dead_fraction": RECORDED["dead_fraction"] + 1 / 2304}
    assert compare_metrics(RECORDED, noisy) == []
    changed = {**RECORDED, "ce_sae": RECORDED["ce_sae"] + 3e-4}
    (line,) = compare_metrics(RECORDED, changed)
    assert line.startswith("ce_sae expected 4.1022, found 4.1025") and "> tolerance 0.0001" in line


def test_exact_values_and_missing_metrics_fail():
    assert compare_metrics(RECORDED, {**RECORDED, "eval_tokens": 2048}) == ["eval_tokens expected 4096, found 2048"]
    found = dict(RECORDED)
    del found["kl_score"]
    assert compare_metrics(RECORDED, found) == ["kl_score expected 0.5647, found no such metric"]
    assert compare_metrics({**RECORDED, "loss_recovered": None}, {**RECORDED, "loss_recovered": None}) == []
    assert len(compare_metrics({**RECORDED, "loss_recovered": None}, RECORDED)) == 1
    assert len(compare_metrics(RECORDED, {**RECORDED, "l0": float("nan")})) == 1


def test_tolerances_follow_what_each_metric_is():
    assert metric_tolerance("ce_clean", RECORDED) == 1e-4
    assert metric_tolerance("eval_tokens", RECORDED) is None
    assert metric_tolerance("dense_threshold", RECORDED) is None
    # loss recovered divides by CE_zero - CE_clean = 0.0086 nats here: 1e-4 nats per CE moves it by up to ~0.04
    assert metric_tolerance("loss_recovered", RECORDED) == pytest.approx(2e-4 * 1.809 / 0.0086)
    assert metric_tolerance("loss_recovered", {**RECORDED, "ce_zero": 14.1006}) == 1e-4  # gap 10 nats: the floor
    assert metric_tolerance("l0", RECORDED) == pytest.approx(19.2e-3)
    assert metric_tolerance("l0", {**RECORDED, "l0": 0.5}) == pytest.approx(4 / 4096)
    assert metric_tolerance("dead_fraction", RECORDED) == pytest.approx(2 / 2304)
    assert metric_tolerance("mse", RECORDED) == pytest.approx(18.6e-4)
    # a standard error moves as far as its metric can
    with_se = {**RECORDED, "loss_recovered_se": 0.3, "ce_sae_se": 0.002}
    assert metric_tolerance("loss_recovered_se", with_se) == metric_tolerance("loss_recovered", RECORDED)
    assert metric_tolerance("ce_sae_se", with_se) == 1e-4


def test_listings_name_each_differing_missing_or_extra_file():
    expected = {"m/L1/cfg.json": "a" * 32, "m/L1/w.safetensors": "b" * 32, "m/L1/s.safetensors": "c" * 32}
    assert compare_listings(expected, dict(expected)) == []
    found = {**expected, "m/L1/w.safetensors": "d" * 32, "m/L1/extra": "e" * 32}
    del found["m/L1/s.safetensors"]
    assert compare_listings(expected, found) == [
        f"m/L1/extra: not recorded in dvc.lock (md5 {'e' * 32})",
        f"m/L1/s.safetensors: missing (dvc.lock records md5 {'c' * 32})",
        f"m/L1/w.safetensors: md5 expected {'b' * 32}, found {'d' * 32}",
    ]


def test_subtree_picks_one_layer_of_a_whole_output():
    listing = {"models/sae/L1/cfg.json": "a", "models/sae/L10/cfg.json": "b", "models/sae/L1/w": "c"}
    assert subtree(listing, "models/sae/L1") == {"models/sae/L1/cfg.json": "a", "models/sae/L1/w": "c"}


def test_published_copy_must_hold_the_sae_files_unchanged():
    sae = {"models/sae/L1/cfg.json": "a", "models/sae/L1/w": "b"}
    published = {"models/published/L1/cfg.json": "a", "models/published/L1/w": "b",
                 "models/published/L1/README.md": "c"}
    assert compare_copies(sae, "models/sae/L1", published, "models/published/L1") == []
    published["models/published/L1/w"] = "x"
    assert compare_copies(sae, "models/sae/L1", published, "models/published/L1") == [
        "models/published/L1/w: expected md5 b as models/sae/L1/w, found md5 x"
    ]


def test_report_lines_and_summary():
    ok = Check(1, "hash", "models/sae/L1", note="3 files match dvc.lock")
    bad = Check(2, "metrics", "reports/metrics/L2.json", problems=["reports/metrics/L2.json: l0 expected 1, found 2"])
    skipped = Check(2, "metrics", "reports/metrics/L2.json", skipped=True, note="not re-evaluated")
    assert ok.lines() == ["L1   hash     ok    models/sae/L1: 3 files match dvc.lock"]
    assert bad.lines() == ["L2   metrics  FAIL  reports/metrics/L2.json: l0 expected 1, found 2"]
    assert summarize([ok], [1], evaluated=True) == (
        True, "verify: OK: 1 checks passed (layer 1: hashes match dvc.lock, metrics reproduced within tolerance)")
    assert summarize([ok, bad, skipped], [1, 2], evaluated=True) == (
        False, "verify: FAILED: 1 of 3 checks failed, 1 skipped (layers 1, 2)")
