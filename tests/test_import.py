"""`attnsae import`: published-structure files served over loopback HTTP, pins, refusals, evaluation;
and SAE folders written by older SAELens versions.

The hub is not reachable here, so each test writes files of the published structure (a torch.save'd
state dict plus its _cfg.json, named by the recipe) and serves them from 127.0.0.1 the way the hub serves a
repository's files (``/<repo>/resolve/<revision>/<file>`` with the ETag and commit headers huggingface_hub reads).
"""

from __future__ import annotations

import hashlib
import json
import socket
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from attnsae.errors import UserError
from attnsae.evaluation import paper_saes
from attnsae.evaluation.evaluate import evaluate_sae
from attnsae.evaluation.paper_saes import PAPER_SAES, REVISION, PaperSAE, import_layer
from attnsae.formats.sae_cfg import CFG_FILE, SPARSITY_FILE, WEIGHTS_FILE
from attnsae.sae.autoencoder import load_sae
from helpers import REPO, TINY_EVAL_CFG, TINY_EVAL_LAYER, assert_one_line_error, invoke, perfect_sae

D_SAE = 64  # small stand-in for 24576; d_in stays GPT-2's 768 so the real CLI checks apply unchanged

# The twelve file names as the hub lists them (commit e6c769b, L5 from 1afc0f5, L8 from 97e0da0).
HUB_NAMES = [
    "gpt2-small_L0_Hcat_z_lr1.20e-03_l11.80e+00_ds24576_bs4096_dc1.00e-06_rsanthropic_rie25000_nr4_v9",
    "gpt2-small_L1_Hcat_z_lr1.20e-03_l18.00e-01_ds24576_bs4096_dc1.00e-06_rsanthropic_rie25000_nr4_v5",
    "gpt2-small_L2_Hcat_z_lr1.20e-03_l11.00e+00_ds24576_bs4096_dc1.00e-06_rsanthropic_rie25000_nr4_v4",
    "gpt2-small_L3_Hcat_z_lr1.20e-03_l19.00e-01_ds24576_bs4096_dc1.00e-06_rsanthropic_rie25000_nr4_v9",
    "gpt2-small_L4_Hcat_z_lr1.20e-03_l11.10e+00_ds24576_bs4096_dc1.00e-06_rsanthropic_rie25000_nr4_v7",
    "gpt2-small_L5_Hcat_z_lr1.20e-03_l11.00e+00_ds49152_bs4096_dc1.00e-06_rsanthropic_rie25000_nr4_v9",
    "gpt2-small_L6_Hcat_z_lr1.20e-03_l11.10e+00_ds24576_bs4096_dc1.00e-06_rsanthropic_rie25000_nr4_v9",
    "gpt2-small_L7_Hcat_z_lr1.20e-03_l11.10e+00_ds49152_bs4096_dc1.00e-06_rsanthropic_rie25000_nr4_v9",
    "gpt2-small_L8_Hcat_z_lr1.20e-03_l11.30e+00_ds24576_bs4096_dc1.00e-05_rsanthropic_rie25000_nr4_v6",
    "gpt2-small_L9_Hcat_z_lr1.20e-03_l11.20e+00_ds24576_bs4096_dc1.00e-06_rsanthropic_rie25000_nr4_v9",
    "gpt2-small_L10_Hcat_z_lr1.20e-03_l11.30e+00_ds24576_bs4096_dc1.00e-05_rsanthropic_rie25000_nr4_v9",
    "gpt2-small_L11_Hcat_z_lr1.20e-03_l13.00e+00_ds24576_bs4096_dc3.16e-06_rsanthropic_rie25000_nr4_v9",
]


# ---------------------------------------------------------------------------------------------------
# Published-structure files and a loopback server


def random_state(d_in: int, d_sae: int, seed: int) -> OrderedDict:
    """A state dict shaped like the published ones (fp32, OrderedDict as nn.Module.state_dict returns)."""
    gen = torch.Generator().manual_seed(seed)
    return OrderedDict(
        W_enc=torch.randn(d_in, d_sae, generator=gen), b_enc=torch.randn(d_sae, generator=gen),
        W_dec=torch.randn(d_sae, d_in, generator=gen), b_dec=torch.randn(d_in, generator=gen),
    )


def published_cfg(entry: PaperSAE, d_in: int) -> dict:
    """The keys and values the published _cfg.json files hold (seen on the hub for L0 and L7)."""
    return {
        "seed": 49, "batch_size": entry.batch_size, "buffer_mult": 384, "lr": entry.lr, "num_tokens": 2_000_000_000,
        "l1_coeff": entry.l1_coeff, "beta1": 0.9, "beta2": 0.99, "dict_mult": entry.d_sae // d_in, "seq_len": 128,
        "enc_dtype": "fp32", "model_name": "gpt2-small", "site": "z", "layer": entry.layer, "device": "cuda",
        "reinit": "reinit", "head": "cat", "concat_heads": True, "resample_scheme": "anthropic",
        "anthropic_neuron_resample_scale": 0.2, "dead_direction_cutoff": entry.dead_cutoff,
        "re_init_every": entry.resample_every, "anthropic_resample_last": 12500, "resample_factor": 0.01,
        "num_resamples": entry.n_resamples, "b_dec_init": "zeros", "sched_type": "cosine_warmup",
        "sched_warmup_epochs": 1000, "model_batch_size": 512, "buffer_size": 1572864,
        "act_name": f"blocks.{entry.layer}.attn.hook_z", "act_size": d_in, "dict_size": entry.d_sae,
        "name": f"gpt2-small_{entry.layer}_{entry.d_sae}_z",
    }


def publish(folder: Path, layer: int, *, state=None, cfg=None, d_in: int = 768, d_sae: int = D_SAE, seed: int = 0,
            pin: bool | str = True) -> tuple[PaperSAE, OrderedDict]:
    """Write one layer's .pt and _cfg.json into ``folder``; the entry pins the file's real sha256 unless told."""
    real = PAPER_SAES[layer]
    entry = PaperSAE(layer, d_sae, real.l1_coeff, real.dead_cutoff, real.version, None)
    state = random_state(d_in, d_sae, seed) if state is None else state
    torch.save(state, folder / entry.weights_file)
    (folder / entry.cfg_file).write_text(json.dumps(published_cfg(entry, d_in) if cfg is None else cfg))
    digest = hashlib.sha256((folder / entry.weights_file).read_bytes()).hexdigest()
    sha = digest if pin is True else (pin or None)
    return PaperSAE(layer, d_sae, real.l1_coeff, real.dead_cutoff, real.version, sha), state


def use_table(monkeypatch, *entries: PaperSAE) -> None:
    monkeypatch.setattr(paper_saes, "PAPER_SAES", {e.layer: e for e in entries})


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


# ---------------------------------------------------------------------------------------------------
# The pinned table


def test_file_names_are_rebuilt_from_the_recipe():
    assert [PAPER_SAES[n].stem for n in range(12)] == HUB_NAMES
    assert PAPER_SAES[3].weights_file == HUB_NAMES[3] + ".pt"
    assert PAPER_SAES[3].cfg_file == HUB_NAMES[3] + "_cfg.json"


def test_every_weights_file_and_the_revision_are_pinned():
    assert len(REVISION) == 40 and int(REVISION, 16) >= 0
    shas = [PAPER_SAES[n].sha256 for n in range(12)]
    assert all(s is not None and len(s) == 64 and int(s, 16) >= 0 for s in shas)
    assert len(set(shas)) == 12


def test_each_published_set_is_found_from_the_model_it_was_trained_on():
    from attnsae import config
    from attnsae.evaluation import published_sets
    from attnsae.profiles import published_set

    kissane, gemma_scope = published_sets.KISSANE, published_sets.GEMMA_SCOPE
    assert published_sets.for_model("gpt2") is published_sets.for_model("hf:openai-community/gpt2@main") is kissane
    assert published_sets.for_model("hf:google/gemma-2-2b@0123abc") is gemma_scope
    assert published_sets.for_model("smollm2-135m") is published_sets.for_model("hf:google/gemma-2-2b-it") is None
    expected = {"gpt2-small": kissane.name, "gpt2-small-topk": kissane.name, "gemma-2-2b": gemma_scope.name,
                "pythia-70m": None, "quickstart": None, "tiny": None}
    found = {name: published_set(config.read_params(REPO / "profiles" / f"{name}.yaml")) for name in expected}
    assert found == expected
    assert all((REPO / "pipelines" / "published" / f"{s.name}.yaml").is_file() for s in published_sets.SETS)


def test_table_agrees_with_the_gpt2_small_profile():
    profile = yaml.safe_load((REPO / "profiles" / "gpt2-small.yaml").read_text())
    for n, entry in PAPER_SAES.items():
        layer = {**profile["sae"], **profile["per_layer"][f"L{n}"]}
        assert (entry.d_sae, entry.l1_coeff, entry.dead_cutoff) == (
            layer["d_sae"], layer["l1_coeff"], layer["dead_cutoff"])
        assert (entry.lr, entry.batch_size, entry.resample_every, entry.n_resamples) == (
            layer["lr"], layer["batch_size"], layer["resample_every"], layer["max_resamples"])


def test_table_agrees_with_the_published_table_the_report_compares_with():
    from attnsae.evaluation.comparison import PUBLISHED_GPT2_SMALL

    assert sorted(PAPER_SAES) == sorted(PUBLISHED_GPT2_SMALL)
    for n, entry in PAPER_SAES.items():
        assert (entry.d_sae, entry.l1_coeff) == (PUBLISHED_GPT2_SMALL[n]["d_sae"], PUBLISHED_GPT2_SMALL[n]["l1_coeff"])


# ---------------------------------------------------------------------------------------------------
# The whole import through the CLI


def test_import_all_layers_through_the_cli(hub, tmp_path, monkeypatch):
    folder, url = hub
    (e0, s0), (e3, s3) = publish(folder, 0, seed=1), publish(folder, 3, seed=2)
    use_table(monkeypatch, e0, e3)
    out = tmp_path / "models" / "published"
    result = invoke("import", "--all-layers", "--endpoint", url, "--out", out)
    assert result.exit_code == 0, result.output
    assert leftovers(out) == ["L0", "L3"]  # no download or temporary folders left behind
    for entry, state in ((e0, s0), (e3, s3)):
        folder_n = out / f"L{entry.layer}"
        assert sorted(p.name for p in folder_n.iterdir()) == sorted([CFG_FILE, WEIGHTS_FILE])  # no sparsity
        sae, cfg = load_sae(folder_n)
        for name, tensor in state.items():
            assert torch.equal(getattr(sae, name), tensor), name
        assert (cfg["d_in"], cfg["d_sae"]) == (768, D_SAE)
        assert cfg["hook_name"] == f"blocks.{entry.layer}.attn.hook_z" and cfg["hook_layer"] == entry.layer
        assert cfg["reshape_activations"] == "hook_z" and cfg["model_name"] == "gpt2"
        source = cfg["metadata"]["attnsae"]["imported"]
        assert source["repo"] == "ckkissane/attn-saes-gpt2-small-all-layers" and source["revision"] == REVISION
        assert source["file"] == entry.weights_file and source["sha256"] == entry.sha256
        assert source["sha256_checked_against"] == "pinned table"
        assert source["published_cfg"]["act_name"] == cfg["hook_name"]
        assert f"L{entry.layer}" in result.output
    assert not (out / "L0" / SPARSITY_FILE).exists()


def test_import_one_layer_by_name(hub, tmp_path, monkeypatch):
    folder, url = hub
    entry, state = publish(folder, 5)
    use_table(monkeypatch, entry)
    result = invoke("import", "--layer", "L5", "--endpoint", url, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    sae, _ = load_sae(tmp_path / "out" / "L5")
    assert torch.equal(sae.W_dec, state["W_dec"])


def test_wrong_sha256_fails_in_one_line_and_keeps_the_old_folder(hub, tmp_path, monkeypatch):
    folder, url = hub
    good, state = publish(folder, 2)
    use_table(monkeypatch, good)
    out = tmp_path / "out"
    assert invoke("import", "--layer", "2", "--endpoint", url, "--out", out).exit_code == 0
    torch.save(random_state(768, D_SAE, seed=9), folder / good.weights_file)  # the file changes on the server
    result = invoke("import", "--layer", "2", "--endpoint", url, "--out", out)
    assert_one_line_error(result, good.weights_file, "does not match the pinned", good.sha256)
    assert leftovers(out) == ["L2"]  # nothing half-written next to it
    sae, _ = load_sae(out / "L2")
    assert torch.equal(sae.W_enc, state["W_enc"])  # the earlier import is untouched


def test_wrong_sha256_first_import_leaves_nothing(hub, tmp_path, monkeypatch):
    folder, url = hub
    entry, _ = publish(folder, 4, pin="0" * 64)
    use_table(monkeypatch, entry)
    out = tmp_path / "out"
    assert_one_line_error(invoke("import", "--layer", "4", "--endpoint", url, "--out", out), "sha256")
    assert leftovers(out) == []


class Payload:
    """A pickle that would write a file when unpickled: weights_only must refuse it, never run it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "executed"))


def test_pickle_with_objects_is_refused_not_executed(hub, tmp_path, monkeypatch):
    folder, url = hub
    marker = tmp_path / "marker"
    state = random_state(768, D_SAE, 0)
    state["extra"] = Payload(str(marker))
    entry, _ = publish(folder, 1, state=state)  # pinned to this very file: only weights_only can stop it
    use_table(monkeypatch, entry)
    result = invoke("import", "--layer", "1", "--endpoint", url, "--out", tmp_path / "out")
    assert_one_line_error(result, entry.weights_file, "weights_only=True", "Unsupported global")
    assert not marker.exists()
    assert leftovers(tmp_path / "out") == []


@pytest.mark.parametrize(
    "edit, fragments",
    [
        (lambda s: s.pop("b_dec"), ["missing tensor 'b_dec'"]),
        (lambda s: s.__setitem__("W_dec", torch.zeros(D_SAE, 767)),
         ["tensor 'W_dec' has shape (64, 767)", "(64, 768)"]),
        (lambda s: s.__setitem__("W_enc", torch.zeros(768, D_SAE, dtype=torch.int32)), ["'W_enc'", "floating-point"]),
        (lambda s: s.__setitem__("threshold", torch.zeros(D_SAE)), ["unexpected entry 'threshold'"]),
        (lambda s: s["b_enc"].__setitem__(0, float("nan")), ["'b_enc'", "non-finite"]),
    ],
    ids=["missing", "shape", "dtype", "extra", "nan"],
)
def test_bad_state_dict_is_one_line(hub, tmp_path, monkeypatch, edit, fragments):
    folder, url = hub
    state = random_state(768, D_SAE, 0)
    edit(state)
    entry, _ = publish(folder, 6, state=state)
    use_table(monkeypatch, entry)
    result = invoke("import", "--layer", "6", "--endpoint", url, "--out", tmp_path / "out")
    assert_one_line_error(result, entry.weights_file, *fragments)
    assert leftovers(tmp_path / "out") == []


def test_not_a_torch_file_is_one_line(hub, tmp_path, monkeypatch):
    folder, url = hub
    entry, _ = publish(folder, 6)
    (folder / entry.weights_file).write_bytes(b"not a zip or a pickle")
    digest = hashlib.sha256(b"not a zip or a pickle").hexdigest()
    use_table(monkeypatch, PaperSAE(6, D_SAE, entry.l1_coeff, entry.dead_cutoff, entry.version, digest))
    result = invoke("import", "--layer", "6", "--endpoint", url, "--out", tmp_path / "out")
    assert_one_line_error(result, "weights_only=True")


@pytest.mark.parametrize(
    "edit, fragments",
    [
        (lambda c: c.pop("act_size"), ["missing key 'act_size'"]),
        (lambda c: c.pop("act_name"), ["missing key 'act_name'"]),
        (lambda c: c.__setitem__("layer", 4), ["'layer' is 4, expected 7"]),
        (lambda c: c.__setitem__("act_name", "blocks.7.hook_resid_pre"), ["'act_name'", "blocks.7.attn.hook_z"]),
        (lambda c: c.__setitem__("l1_coeff", 2.0), ["'l1_coeff' is 2.0, expected 1.1"]),
        (lambda c: c.__setitem__("dict_size", 128), ["'dict_size' is 128, expected 64"]),
    ],
    ids=["no-act_size", "no-act_name", "layer", "hook", "l1", "width"],
)
def test_published_cfg_is_checked_against_the_table(hub, tmp_path, monkeypatch, edit, fragments):
    folder, url = hub
    entry, _ = publish(folder, 7)
    cfg = published_cfg(entry, 768)
    edit(cfg)
    (folder / entry.cfg_file).write_text(json.dumps(cfg))
    use_table(monkeypatch, entry)
    result = invoke("import", "--layer", "7", "--endpoint", url, "--out", tmp_path / "out")
    assert_one_line_error(result, entry.cfg_file, *fragments)
    assert leftovers(tmp_path / "out") == []


def test_cfg_with_dict_mult_instead_of_dict_size(hub, tmp_path, monkeypatch):
    folder, url = hub
    entry, _ = publish(folder, 7, d_sae=768 * 2)
    cfg = published_cfg(entry, 768)
    del cfg["dict_size"]
    (folder / entry.cfg_file).write_text(json.dumps(cfg))
    use_table(monkeypatch, entry)
    result = invoke("import", "--layer", "7", "--endpoint", url, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    sae, saved = load_sae(tmp_path / "out" / "L7")  # the width comes from dict_mult x d_in
    assert (sae.d_in, sae.d_sae) == (768, 768 * 2) and (saved["d_in"], saved["d_sae"]) == (768, 768 * 2)
    assert tuple(sae.W_enc.shape) == (768, 768 * 2) and tuple(sae.W_dec.shape) == (768 * 2, 768)


def test_unpinned_file_needs_a_hash_or_explicit_trust(hub, tmp_path, monkeypatch):
    folder, url = hub
    entry, _ = publish(folder, 9, pin=False)
    real_sha = hashlib.sha256((folder / entry.weights_file).read_bytes()).hexdigest()
    use_table(monkeypatch, entry)
    out = tmp_path / "out"
    refused = invoke("import", "--layer", "9", "--endpoint", url, "--out", out)
    assert_one_line_error(refused, entry.weights_file, "no sha256 is pinned", "--sha256", "--trust-unpinned")
    assert leftovers(out) == []

    wrong = invoke("import", "--layer", "9", "--endpoint", url, "--out", out, "--sha256", "f" * 64)
    assert_one_line_error(wrong, "does not match")

    trusted = invoke("import", "--layer", "9", "--endpoint", url, "--out", out, "--trust-unpinned")
    assert trusted.exit_code == 0, trusted.output
    source = load_sae(out / "L9")[1]["metadata"]["attnsae"]["imported"]
    assert source["sha256"] == real_sha and source["sha256_checked_against"].startswith("unpinned")

    pinned = invoke("import", "--layer", "9", "--endpoint", url, "--out", out, "--sha256", real_sha.upper())
    assert pinned.exit_code == 0, pinned.output
    assert load_sae(out / "L9")[1]["metadata"]["attnsae"]["imported"]["sha256_checked_against"] == "--sha256"


@pytest.mark.parametrize(
    "args, fragments",
    [
        ([], ["--layer", "--all-layers"]),
        (["--layer", "1", "--all-layers"], ["--layer", "--all-layers"]),
        (["--layer", "1", "--layer", "L1"], ["twice"]),
        (["--layer", "12"], ["layer 12", "allowed: 0, 1"]),
        (["--layer", "x"], ["bad layer 'x'"]),
        (["--layer", "1", "--layer", "2", "--sha256", "a" * 64], ["single --layer"]),
        (["--layer", "1", "--sha256", "xyz"], ["64 hexadecimal", "'xyz'"]),
        (["--layer", "1", "--revision", "main"], ["40-character commit", "'main'"]),
        (["--layer", "1", "--endpoint", "ftp://mirror/"], ["http(s) URL", "ftp://mirror/"]),
    ],
    ids=["none", "both", "twice", "unknown", "text", "sha-two-layers", "sha-text", "revision", "scheme"],
)
def test_bad_arguments_are_one_line(tmp_path, args, fragments):
    result = invoke("import", *args, "--out", tmp_path / "out")
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "out").exists()


def test_hub_is_not_contacted_when_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = invoke("import", "--layer", "3", "--out", tmp_path / "out")
    assert_one_line_error(result, "HF_HUB_OFFLINE", "--endpoint")


def test_missing_file_on_the_server_is_one_line(hub, tmp_path, monkeypatch):
    folder, url = hub
    entry, _ = publish(folder, 10)
    (folder / entry.weights_file).unlink()
    use_table(monkeypatch, entry)
    result = invoke("import", "--layer", "10", "--endpoint", url, "--out", tmp_path / "out")
    assert_one_line_error(result, "404 Not Found", "%2B")  # '+' in the names travels percent-encoded
    assert leftovers(tmp_path / "out") == []


def test_unreachable_server_is_one_line(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    use_table(monkeypatch, PaperSAE(0, D_SAE, 1.8, 1e-6, 9, "0" * 64))
    result = invoke("import", "--layer", "0", "--endpoint", f"http://127.0.0.1:{port}", "--out", tmp_path / "out")
    assert_one_line_error(result, "needs the Hugging Face hub", f"127.0.0.1:{port}")


# ---------------------------------------------------------------------------------------------------
# An imported SAE evaluates like any other: a published-structure file for the tiny GPT-2


def test_imported_sae_evaluates_on_the_tiny_model(hub, tmp_path, tiny_eval_case):
    bridge, info, rows = tiny_eval_case
    assert info.d_in == 64  # tiny-gpt2 hook_z: 4 heads x 16
    exact = perfect_sae(info.d_in)  # ReLU(x) - ReLU(-x) = x: reconstructs hook_z exactly
    state = OrderedDict((k, getattr(exact, k).detach().clone()) for k in ("W_enc", "b_enc", "W_dec", "b_dec"))
    folder, url = hub
    entry, _ = publish(folder, TINY_EVAL_LAYER, state=state, d_in=info.d_in, d_sae=2 * info.d_in)
    import_layer(entry, tmp_path / "L1", endpoint=url, d_in=info.d_in, model_name="tiny-gpt2")

    sae, cfg = load_sae(tmp_path / "L1")
    assert cfg["model_name"] == "tiny-gpt2" and cfg["hook_name"] == f"blocks.{TINY_EVAL_LAYER}.attn.hook_z"
    metrics, _ = evaluate_sae(bridge, sae, TINY_EVAL_LAYER, rows, TINY_EVAL_CFG, torch.device("cpu"))
    assert metrics["loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["mse"] == pytest.approx(0.0, abs=1e-10)
    assert metrics["eval_tokens"] == rows.size


def test_import_refuses_a_file_for_another_width(hub, tmp_path):
    folder, url = hub
    entry, _ = publish(folder, 2, d_in=64, d_sae=128)
    with pytest.raises(UserError, match=r"'act_size' is 64, expected 768"):
        import_layer(entry, tmp_path / "L2", endpoint=url)  # GPT-2 Small's 768 by default


# ---------------------------------------------------------------------------------------------------
# SAE folders written by SAELens, including its older config keys


def write_folder(folder: Path, cfg: dict, state: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / CFG_FILE).write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / WEIGHTS_FILE))
    return folder


def small_state(seed: int = 0, d_in: int = 8, d_sae: int = 12) -> dict:
    return dict(random_state(d_in, d_sae, seed))


def saelens_reference(state: dict, x: torch.Tensor, apply_b_dec: bool = True, scale: torch.Tensor | None = None):
    """What SAELens computes for a standard SAE, written out here independently of sae/autoencoder.py."""
    sae_in = x - state["b_dec"] * apply_b_dec
    acts = torch.relu(sae_in @ state["W_enc"] + state["b_enc"])
    if scale is not None:
        acts = acts * scale
    return acts @ state["W_dec"] + state["b_dec"]


OLD_CFG = {  # the shape of cfg.json from SAELens 0.x-2.x (e.g. the jbloom GPT-2 residual SAEs)
    "model_name": "gpt2-small", "hook_point": "blocks.1.attn.hook_z", "hook_point_layer": 1,
    "hook_point_head_index": None, "dataset_path": "Skylion007/openwebtext", "is_dataset_tokenized": False,
    "context_size": 128, "d_in": 8, "expansion_factor": 1.5, "d_sae": 12, "b_dec_init_method": "geometric_median",
    "lr": 0.0004, "l1_coefficient": 8e-05, "dtype": "torch.float32", "device": "cuda", "use_ghost_grads": True,
}


def test_old_saelens_keys_load(tmp_path):
    state = small_state()
    state["scaling_factor"] = torch.ones(12)  # SAELens 0.6-3.x stored one, all ones unless fine-tuned
    sae, cfg = load_sae(write_folder(tmp_path / "old", OLD_CFG, state))
    assert cfg["hook_name"] == "blocks.1.attn.hook_z" and cfg["hook_layer"] == 1 and cfg["hook_head_index"] is None
    assert "hook_point" not in cfg and "hook_point_layer" not in cfg
    assert cfg["reshape_activations"] == "hook_z"  # implied by a hook name ending in _z before SAELens 6
    x = torch.randn(5, 8)
    assert torch.allclose(sae.reconstruct(x), saelens_reference(state, x), atol=1e-5)


def test_oldest_configs_without_d_sae_use_the_expansion_factor(tmp_path):
    cfg = {k: v for k, v in OLD_CFG.items() if k != "d_sae"} | {"expansion_factor": 2}
    sae, loaded = load_sae(write_folder(tmp_path / "old", cfg, small_state(d_sae=16)))
    assert loaded["d_sae"] == 16 == sae.d_sae


def test_saelens_3_to_5_keys_load(tmp_path):
    cfg = {
        "architecture": "standard", "d_in": 8, "d_sae": 12, "dtype": "float32", "device": "cuda",
        "model_name": "gpt2-small", "hook_name": "blocks.4.attn.hook_z", "hook_layer": 4, "hook_head_index": None,
        "activation_fn_str": "relu", "activation_fn_kwargs": {}, "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False, "sae_lens_training_version": "3.13.0", "prepend_bos": True,
        "dataset_path": "Skylion007/openwebtext", "context_size": 128, "normalize_activations": "none",
    }
    state = small_state(1)
    sae, loaded = load_sae(write_folder(tmp_path / "v3", cfg, state))
    assert loaded["activation_fn"] == "relu" and "activation_fn_str" not in loaded
    x = torch.randn(4, 8)
    assert torch.allclose(sae.reconstruct(x), saelens_reference(state, x), atol=1e-5)


def test_saelens_6_metadata_section_loads(tmp_path):
    cfg = {
        "d_in": 8, "d_sae": 12, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
        "normalize_activations": "none", "reshape_activations": "hook_z", "architecture": "standard",
        "metadata": {"model_name": "gpt2-small", "hook_name": "blocks.2.attn.hook_z", "hook_layer": 2,
                     "hook_head_index": None, "sae_lens_version": "6.5.1"},
    }
    _, loaded = load_sae(write_folder(tmp_path / "v6", cfg, small_state(2)))
    assert loaded["hook_name"] == "blocks.2.attn.hook_z" and loaded["hook_layer"] == 2


def test_apply_b_dec_to_input_false_is_folded_into_b_enc(tmp_path):
    cfg = {"d_in": 8, "d_sae": 12, "hook_name": "blocks.0.attn.hook_z", "apply_b_dec_to_input": False}
    state = small_state(3)
    sae, loaded = load_sae(write_folder(tmp_path / "nobdec", cfg, state))
    x = torch.randn(6, 8)
    assert torch.allclose(sae.reconstruct(x), saelens_reference(state, x, apply_b_dec=False), atol=1e-5)
    assert not torch.allclose(sae.reconstruct(x), saelens_reference(state, x), atol=1e-3)  # the fold mattered
    assert loaded["apply_b_dec_to_input"] is True  # the cfg describes the SAE that was returned


def test_fine_tuned_scaling_factor_is_folded_into_w_dec(tmp_path):
    cfg = {"d_in": 8, "d_sae": 12, "hook_name": "blocks.0.attn.hook_z", "finetuning_scaling_factor": True}
    state = small_state(4)
    scale = torch.rand(12, generator=torch.Generator().manual_seed(5)) + 0.5
    sae, loaded = load_sae(write_folder(tmp_path / "scaled", cfg, {**state, "finetuning_scaling_factor": scale}))
    x = torch.randn(6, 8)
    assert torch.allclose(sae.reconstruct(x), saelens_reference(state, x, scale=scale), atol=1e-5)
    assert loaded["finetuning_scaling_factor"] is False


@pytest.mark.parametrize(
    "edit, fragments",
    [
        ({"architecture": "gated"}, ["architecture 'gated'", "allowed: standard"]),
        ({"architecture": "topk"}, ["a topk SAE needs 'k', a positive integer, got None"]),
        ({"activation_fn_str": "topk"}, ["activation_fn 'topk'", "allowed: relu"]),
        ({"normalize_activations": True}, ["normalize_activations 'expected_average_only_in'", "allowed: none"]),
        ({"normalize_activations": "layer_norm"}, ["normalize_activations 'layer_norm'"]),
        ({"reshape_activations": "heads"}, ["reshape_activations 'heads'", "allowed: none, hook_z"]),
        ({"hook_point_head_index": 3}, ["hook_head_index 3", "allowed: null"]),
        ({"d_in": "8"}, ["'d_in' must be a positive integer", "'8'"]),
    ],
    ids=["gated", "topk-without-k", "topk-activation", "norm-flag", "layer-norm", "reshape", "one-head", "d_in-text"],
)
def test_configurations_we_cannot_evaluate_are_refused(tmp_path, edit, fragments):
    folder = write_folder(tmp_path / "sae", {**OLD_CFG, **edit}, small_state())
    with pytest.raises(UserError) as err:
        load_sae(folder)
    message = str(err.value)
    assert "\n" not in message and str(folder / CFG_FILE) in message
    for fragment in fragments:
        assert fragment in message, message


def test_scaling_flag_without_its_tensor_is_refused(tmp_path):
    folder = write_folder(tmp_path / "sae", {**OLD_CFG, "finetuning_scaling_factor": True}, small_state())
    with pytest.raises(UserError, match="finetuning_scaling_factor but there is no scaling tensor"):
        load_sae(folder)


def test_unexpected_tensor_is_refused(tmp_path):
    folder = write_folder(tmp_path / "sae", OLD_CFG, {**small_state(), "threshold": torch.zeros(12)})
    with pytest.raises(UserError, match="unexpected tensor 'threshold'"):
        load_sae(folder)
