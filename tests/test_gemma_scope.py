"""`attnsae import --set gemma-scope-2b-att`: Gemma Scope's attention SAEs in their published layout
(``layer_<L>/width_<W>/average_l0_<N>/params.npz``) served by the loopback hub, imported, checked against the hub's
sha256, and computing the published JumpReLU features; then evaluated on a tiny Gemma 2 (issue 22, item 6)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from attnsae.config import EvaluateConfig
from attnsae.data.models import load_bridge
from attnsae.evaluation.evaluate import evaluate_sae
from attnsae.sae.autoencoder import load_sae
from helpers import assert_one_line_error, invoke
from loopback_hub import COMMIT, serve
from test_model_families import random_family_model

D_IN, D_SAE = 64, 96  # the tiny Gemma 2's hook_z: 4 heads x 16


def publish(folder: Path, layer: int, l0: int, *, width: str = "16k", seed: int = 0, **changes) -> dict:
    """One SAE in Gemma Scope's layout and tensor names; thresholds positive, as trained ones are."""
    rng = np.random.default_rng(seed)
    arrays = {"W_enc": rng.normal(0, 0.3, (D_IN, D_SAE)), "W_dec": rng.normal(0, 0.1, (D_SAE, D_IN)),
              "b_enc": rng.normal(0, 0.1, D_SAE), "b_dec": rng.normal(0, 0.2, D_IN),
              "threshold": rng.uniform(0.05, 0.3, D_SAE)}
    arrays = {key: value.astype(np.float32) for key, value in arrays.items()} | changes
    path = folder / f"layer_{layer}" / f"width_{width}" / f"average_l0_{l0}" / "params.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return arrays


def gemma_import(url: str, out: Path, *args: str):
    return invoke("import", "--set", "gemma-scope-2b-att", "--endpoint", url, "--out", out, *args)


def test_import_takes_the_nearest_l0_and_computes_the_published_features(hub, tmp_path):
    folder, url = hub
    publish(folder, 1, 12, seed=1)
    arrays = publish(folder, 1, 40, seed=2)
    publish(folder, 2, 30, seed=3)  # another layer: never taken for layer 1
    result = gemma_import(url, tmp_path / "out", "--layer", "1", "--width", "16k", "--l0", "30")
    assert result.exit_code == 0, result.output
    assert "average L0 40, asked 30" in result.output
    sae, cfg = load_sae(tmp_path / "out" / "L1")
    provenance = cfg["metadata"]["attnsae"]["imported"]
    assert (cfg["architecture"], cfg["hook_name"], cfg["d_in"], cfg["d_sae"]) == ("jumprelu", "blocks.1.attn.hook_z",
                                                                                   D_IN, D_SAE)
    assert (provenance["revision"], provenance["average_l0"], provenance["available_l0s"]) == (COMMIT, 40, [12, 40])
    x = torch.randn(256, D_IN, generator=torch.Generator().manual_seed(0))
    t = {key: torch.from_numpy(value) for key, value in arrays.items()}
    pre = x @ t["W_enc"] + t["b_enc"]  # Gemma Scope's encoder: no b_dec subtracted
    published = torch.relu(pre) * (pre > t["threshold"])
    with torch.no_grad():
        ours = sae.encode(x)
        torch.testing.assert_close(ours, published, atol=1e-5, rtol=0)
        torch.testing.assert_close(sae.decode(ours), published @ t["W_dec"] + t["b_dec"], atol=1e-5, rtol=0)
    assert 0 < (published > 0).float().mean() < 1  # some features fire, some do not: the mask is exercised


def test_a_file_that_differs_from_the_hubs_sha256_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    folder = tmp_path / "hub"
    publish(folder, 3, 20)
    with serve(folder, lies={"layer_3/width_16k/average_l0_20/params.npz": "f" * 64}) as url:
        result = gemma_import(url, tmp_path / "out", "--layer", "3", "--width", "16k", "--l0", "20")
    assert_one_line_error(result, "params.npz has sha256", "the hub lists " + "f" * 64)
    assert not (tmp_path / "out" / "L3").exists()


@pytest.mark.parametrize("changes, fragment", [
    ({"threshold": np.array([object()] * D_SAE, dtype=object)}, "not a numpy .npz of plain arrays"),
    ({"b_dec": np.zeros(D_IN + 1, np.float32)}, "'b_dec' is float32 (65,), expected floats of shape (64,)"),
    ({"W_dec": np.full((D_SAE, D_IN), np.nan, np.float32)}, "'W_dec' holds non-finite values"),
    ({"extra": np.zeros(3, np.float32)}, "unexpected array 'extra'"),
])
def test_malformed_files_are_one_line(hub, tmp_path, changes, fragment):
    folder, url = hub
    publish(folder, 0, 20, **changes)
    result = gemma_import(url, tmp_path / "out", "--layer", "0", "--width", "16k", "--l0", "20")
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "out" / "L0").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--layer", "0"], "needs --width (e.g. 16k) and --l0"),
    (["--layer", "26", "--width", "16k", "--l0", "20"], "layer 26 is not in Gemma 2 2B (allowed: 0 to 25)"),
    (["--layer", "0", "--width", "16k", "--l0", "20", "--sha256", "0" * 64], "--sha256 and --trust-unpinned are for"),
    (["--layer", "0", "--width", "1k", "--l0", "20"], "has no SAE for layer 0 at width 1k"),
])
def test_bad_arguments_are_one_line(hub, tmp_path, args, fragment):
    folder, url = hub
    publish(folder, 0, 20)
    assert_one_line_error(gemma_import(url, tmp_path / "out", *args), fragment)


def test_paper_options_are_refused_for_the_other_set(tmp_path):
    assert_one_line_error(invoke("import", "--layer", "3", "--l0", "20", "--out", tmp_path / "out"),
                          "--width and --l0 are for gemma-scope-2b-att")


def test_imported_sae_evaluates_on_a_tiny_gemma2(hub, tmp_path):
    folder, url = hub
    publish(folder, 1, 20, seed=4)
    assert gemma_import(url, tmp_path / "out", "--layer", "1", "--width", "16k", "--l0", "20").exit_code == 0
    random_family_model("gemma2", tmp_path / "gemma2")
    bridge, info = load_bridge(tmp_path / "gemma2", torch.device("cpu"))
    assert info.d_in == D_IN
    sae, _ = load_sae(tmp_path / "out" / "L1")
    rows = np.random.default_rng(0).integers(0, 256, size=(4, 16)).astype(np.int32)
    rows[:, 0] = info.bos_token_id
    metrics, _ = evaluate_sae(bridge, sae, 1, rows, EvaluateConfig(batch_rows=2, device="cpu"), torch.device("cpu"))
    assert all(np.isfinite(metrics[key]) for key in ("ce_clean", "ce_sae", "ce_zero", "l0"))
    assert 0 < metrics["l0"] < D_SAE
