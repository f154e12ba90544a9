"""The metrics of docs/design.md 4: pure functions on known answers, then evaluate_sae on a tiny GPT-2."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from attnsae.config import EvaluateConfig, TokenizeConfig
from attnsae.data.activations import capture_z
from attnsae.data.corpus import synthetic_documents
from attnsae.data.models import hook_z_name
from attnsae.data.tokenization import tokenize_corpus
from attnsae.errors import UserError
from attnsae.evaluation.evaluate import (
    SE_METRICS,
    Totals,
    block_inputs,
    bootstrap_se,
    density_histogram,
    evaluate_sae,
    evaluate_saes,
    explained_variance_from_sums,
    finish,
    kl_div,
    log_probs,
    logits_from_block,
    summed_metrics,
    token_ce,
)
from attnsae.formats.model_info import read_model_info
from attnsae.sae.autoencoder import SAE
from helpers import TINY_EVAL_CFG, TINY_EVAL_LAYER, TINY_PROFILE, perfect_sae

# ---------------------------------------------------------------------------------------------------
# Pure functions


def loss_recovered(ce_clean: float, ce_sae: float, ce_zero: float) -> float:
    """summed_metrics' loss recovered for one row of one prediction with these CEs."""
    sums = {"ce_clean": ce_clean, "ce_sae": ce_sae, "ce_zero": ce_zero, "kl_sae": 0.0, "kl_zero": 1.0, "l0": 0.0,
            "predictions": 1, "tokens": 1}
    return float(summed_metrics({k: np.float64(v) for k, v in sums.items()})["loss_recovered"])


def test_loss_recovered_known_values():
    assert loss_recovered(ce_clean=2.0, ce_sae=2.25, ce_zero=3.0) == pytest.approx(0.75)
    assert loss_recovered(ce_clean=2.0, ce_sae=2.0, ce_zero=3.0) == pytest.approx(1.0)
    assert loss_recovered(ce_clean=2.0, ce_sae=3.0, ce_zero=3.0) == pytest.approx(0.0)
    assert loss_recovered(ce_clean=2.0, ce_sae=3.5, ce_zero=3.0) == pytest.approx(-0.5)  # worse than ablation
    assert not math.isfinite(loss_recovered(ce_clean=2.0, ce_sae=2.5, ce_zero=2.0))  # zero gap: undefined


def test_token_ce_against_hand_computation():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, generator=gen)
    tokens = torch.tensor([[0, 3, 1, 4], [2, 2, 0, 1]])
    ce = token_ce(log_probs(logits), tokens)
    assert ce.shape == (2, 3)
    for b in range(2):
        for p in range(3):
            row = logits[b, p].double()
            expected = torch.logsumexp(row, 0) - row[tokens[b, p + 1]]  # predicts the *next* token
            assert ce[b, p].item() == pytest.approx(expected.item(), rel=1e-5)


def test_token_ce_uniform_logits():
    tokens = torch.tensor([[1, 0, 6]])
    ce = token_ce(log_probs(torch.zeros(1, 3, 7)), tokens)
    assert torch.allclose(ce, torch.full((1, 2), math.log(7)))


def test_kl_div_identical_logits_is_zero():
    logits = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(1)) * 4
    kl = kl_div(log_probs(logits), log_probs(logits.clone()))
    assert kl.shape == (3, 5)
    assert torch.allclose(kl, torch.zeros(3, 5), atol=1e-6)


def test_kl_div_two_token_example():
    # position 0: p = [.5, .5], q = [.75, .25]; position 1: p = [.75, .25], q = [.5, .5]
    clean = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])
    other = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0]]])
    expected0 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    expected1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    kl = kl_div(log_probs(clean), log_probs(other))
    assert kl.shape == (1, 2)
    assert kl[0, 0].item() == pytest.approx(expected0, rel=1e-5)
    assert kl[0, 1].item() == pytest.approx(expected1, rel=1e-5)
    # KL(clean || other), not the reverse: swapping the arguments changes position 0
    assert kl_div(log_probs(other), log_probs(clean))[0, 0].item() == pytest.approx(expected1, rel=1e-5)


def test_explained_variance_from_sums_matches_direct():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(40, 6, generator=gen, dtype=torch.float64) * torch.arange(1, 7) + 3.0
    x_hat = x + 0.3 * torch.randn(40, 6, generator=gen, dtype=torch.float64)
    squared_error = (x - x_hat).pow(2).sum().item()
    direct = 1.0 - squared_error / (x - x.mean(0)).pow(2).sum().item()
    got = explained_variance_from_sums(squared_error, x.sum(0), x.pow(2).sum(0), len(x))
    assert got == pytest.approx(direct, rel=1e-9)
    assert 0.9 < got < 1.0
    assert explained_variance_from_sums(0.0, x.sum(0), x.pow(2).sum(0), len(x)) == pytest.approx(1.0)


def test_explained_variance_constant_input_is_none():
    x = torch.ones(5, 3, dtype=torch.float64)
    assert explained_variance_from_sums(1.0, x.sum(0), x.pow(2).sum(0), 5) is None


def test_finish_on_hand_built_totals():
    t = Totals(d_sae=4, d_in=2)
    # 2 rows of 5 tokens; feature 0 never fires, 1 fires once, 2 on five tokens, 3 on every token
    features = torch.zeros(10, 4)
    features[3, 1] = 0.7
    features[:5, 2] = 1.0
    features[:, 3] = 2.0
    x = torch.arange(20, dtype=torch.float32).view(10, 2)
    x_hat = x + 0.5  # squared error 0.25 * 20 = 5
    t.add_activations(x, x_hat, features, batch=2)
    # CE sums over each row's 4 predictions (means 2.0, 2.5, 3.0), KL over its 5 tokens (means 0.1, 0.4)
    t.add_rows(predictions=[4, 4], tokens=[5, 5], ce_clean=[7.0, 9.0], ce_sae=[10.0, 10.0], ce_zero=[12.0, 12.0],
               kl_sae=[0.5, 0.5], kl_zero=[2.0, 2.0])

    metrics, log10_density = finish(t, EvaluateConfig(dense_threshold=0.1))
    assert t.row_sums()["l0"].tolist() == [11.0, 5.0]  # features firing, summed over each row's tokens
    assert metrics["l0"] == pytest.approx((0 + 1 + 5 + 10) / 10)
    assert metrics["ce_clean"] == pytest.approx(2.0)
    assert metrics["ce_sae"] == pytest.approx(2.5)
    assert metrics["ce_zero"] == pytest.approx(3.0)
    assert metrics["loss_recovered"] == pytest.approx(0.5)
    assert metrics["ce_increase"] == pytest.approx(0.5)
    assert metrics["ce_increase_zero"] == pytest.approx(1.0)
    assert metrics["kl_sae"] == pytest.approx(0.1)
    assert metrics["kl_zero"] == pytest.approx(0.4)
    assert metrics["kl_score"] == pytest.approx(0.75)
    assert metrics["mse"] == pytest.approx(0.5)  # summed over dims, mean over tokens
    direct_ev = 1 - 5.0 / (x.double() - x.double().mean(0)).pow(2).sum().item()
    assert metrics["explained_variance"] == pytest.approx(direct_ev)
    assert metrics["dead_fraction"] == pytest.approx(0.25)
    assert metrics["dead_fraction_tokens"] == 10 and metrics["eval_tokens"] == 10
    # dense means strictly more than 10% of tokens: the feature at exactly 10% is not dense
    assert metrics["dense_fraction"] == pytest.approx(0.5)
    assert log10_density[0] == -np.inf
    assert log10_density[1:] == pytest.approx([-1.0, math.log10(0.5), 0.0])
    # every metric with a per-row sum has a standard error, 0 where every row agrees
    assert {k for k in metrics if k.endswith("_se")} == {f"{name}_se" for name in SE_METRICS}
    assert metrics["ce_zero_se"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["kl_sae_se"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["ce_clean_se"] > 0 and metrics["l0_se"] > 0 and metrics["bootstrap_resamples"] == 1000


def test_finish_no_kl_gap_gives_none():
    t = Totals(d_sae=1, d_in=1)
    t.add_activations(torch.tensor([[1.0], [2.0]]), torch.tensor([[1.0], [2.0]]), torch.ones(2, 1), batch=1)
    t.add_rows(predictions=[1], tokens=[2], ce_clean=[1.0], ce_sae=[1.0], ce_zero=[1.0], kl_sae=[0.0], kl_zero=[0.0])
    metrics, _ = finish(t, EvaluateConfig())
    assert metrics["kl_score"] is None and metrics["loss_recovered"] is None
    assert metrics["kl_score_se"] is None and metrics["loss_recovered_se"] is None
    assert metrics["mse"] == 0.0 and metrics["explained_variance"] == pytest.approx(1.0)


def one_prediction_rows(ce_clean, **other) -> dict[str, np.ndarray]:
    """Row sums of rows with one prediction and one token each: the row's value is its mean."""
    n = len(ce_clean)
    sums = {"ce_clean": ce_clean, "ce_sae": np.zeros(n), "ce_zero": np.ones(n), "kl_sae": np.zeros(n),
            "kl_zero": np.ones(n), "l0": np.zeros(n), "predictions": np.ones(n), "tokens": np.ones(n)}
    return {k: np.asarray(v, dtype=np.float64) for k, v in {**sums, **other}.items()}


def test_bootstrap_se_of_a_mean_is_the_analytic_standard_error():
    values = np.random.default_rng(3).normal(4.0, 0.7, size=400)
    se = bootstrap_se(one_prediction_rows(values), resamples=4000, seed=0)
    analytic = values.std(ddof=1) / math.sqrt(len(values))
    assert se["ce_clean"] == pytest.approx(analytic, rel=0.05)
    # a difference of two paired means: the SE of the per-row differences
    shifted = values + np.random.default_rng(4).normal(0.2, 0.1, size=400)
    se = bootstrap_se(one_prediction_rows(values, ce_sae=shifted), resamples=4000, seed=0)
    assert se["ce_increase"] == pytest.approx((shifted - values).std(ddof=1) / math.sqrt(400), rel=0.05)


def test_bootstrap_se_is_deterministic_given_the_seed():
    rows = one_prediction_rows(np.random.default_rng(5).normal(size=64))
    assert bootstrap_se(rows, 200, seed=1) == bootstrap_se(rows, 200, seed=1)
    assert bootstrap_se(rows, 200, seed=1)["ce_clean"] != bootstrap_se(rows, 200, seed=2)["ce_clean"]


def test_bootstrap_recomputes_ratios_as_ratios_of_means():
    """Half the rows have no zero-ablation gap of their own, so a mean of per-row ratios would be infinite; the
    ratio of the resampled means is finite whenever a resample holds a row with a gap."""
    n = 60
    gap = np.where(np.arange(n) % 2 == 0, 0.0, 2.0)
    rows = one_prediction_rows(np.zeros(n), ce_zero=gap, ce_sae=gap * 0.25 + 0.1)
    point = summed_metrics({k: v.sum() for k, v in rows.items()})["loss_recovered"]
    se = bootstrap_se(rows, 500, seed=0)["loss_recovered"]
    assert np.isfinite(point) and se is not None and 0 < se < 1


def test_density_histogram_counts():
    log10 = np.array([-np.inf, -9.0, -8.0, -7.9, -4.05, -0.5, 0.0])
    hist = density_histogram(log10, bins=8)
    assert hist["bin_edges"] == pytest.approx([-8.0, -7.0, -6.0, -5.0, -4.0, -3.0, -2.0, -1.0, 0.0])
    # dead (-inf) left out; -9 clipped into the first bin; 0 falls in the last (closed) bin
    assert hist["counts"] == [3, 0, 0, 1, 0, 0, 0, 2]


def test_density_histogram_total_is_alive_count():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.uniform(-7, 0, 100), np.full(7, -np.inf)])
    hist = density_histogram(values, bins=40)
    assert len(hist["counts"]) == 40 and len(hist["bin_edges"]) == 41
    assert sum(hist["counts"]) == 100


# ---------------------------------------------------------------------------------------------------
# evaluate_sae on a tiny random GPT-2


def reference_ce(bridge, rows, hooks=()):
    """Mean next-token CE over every prediction of every row, computed here without evaluate.py."""
    tokens = torch.from_numpy(rows).long()
    with torch.no_grad():
        logits = bridge.run_with_hooks(tokens, return_type="logits", fwd_hooks=list(hooks))
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             tokens[:, 1:].reshape(-1)).item()


@pytest.mark.parametrize("layer", [0, TINY_EVAL_LAYER, 3])
def test_running_on_from_a_block_is_the_rest_of_a_full_pass(tiny_eval_case, layer):
    """evaluate runs the blocks before the SAE's layer once and the rest three times: the same logits, hooks
    included, as full passes."""
    bridge, _, rows = tiny_eval_case
    tokens = torch.from_numpy(rows).long()
    zero = (hook_z_name(layer), lambda z, hook: torch.zeros_like(z))
    with torch.inference_mode():
        inputs = block_inputs(bridge, tokens, [layer])
        assert torch.equal(logits_from_block(bridge, layer, inputs), bridge(tokens, return_type="logits"))
        with bridge.hooks(fwd_hooks=[zero]):
            ablated = logits_from_block(bridge, layer, inputs)
        assert torch.equal(ablated, bridge.run_with_hooks(tokens, return_type="logits", fwd_hooks=[zero]))
        assert torch.equal(logits_from_block(bridge, layer, inputs), bridge(tokens, return_type="logits"))  # reusable


def test_one_pass_keeps_what_each_block_receives(tiny_eval_case):
    """block_inputs of several layers from one run are what each layer's own run gives, and running on from an
    earlier layer's entry later still gives the full pass (no block changes what it received)."""
    bridge, _, rows = tiny_eval_case
    tokens = torch.from_numpy(rows).long()
    with torch.inference_mode():
        together = block_inputs(bridge, tokens, [0, 3, TINY_EVAL_LAYER])
        for layer in (0, TINY_EVAL_LAYER, 3):
            (args, kwargs), (alone_args, alone_kwargs) = together[layer], block_inputs(bridge, tokens, [layer])[layer]
            assert torch.equal(args[0], alone_args[0]) and kwargs.keys() == alone_kwargs.keys()
            assert torch.equal(logits_from_block(bridge, layer, together), bridge(tokens, return_type="logits"))


def test_layers_evaluated_together_match_each_alone(tiny_eval_case):
    """The evaluate stage measures all layers in one pass over the rows: each layer's metrics are those of its
    SAE evaluated alone."""
    bridge, info, rows = tiny_eval_case
    saes = {layer: SAE(info.d_in, 32, generator=torch.Generator().manual_seed(layer)) for layer in (0, TINY_EVAL_LAYER)}
    together = evaluate_saes(bridge, saes, rows, TINY_EVAL_CFG, torch.device("cpu"))
    assert sorted(together) == sorted(saes)
    for layer, sae in saes.items():
        alone, density = evaluate_sae(bridge, sae, layer, rows, TINY_EVAL_CFG, torch.device("cpu"))
        assert together[layer][0] == alone
        np.testing.assert_array_equal(together[layer][1], density)
    assert together[0][0]["ce_zero"] != together[TINY_EVAL_LAYER][0]["ce_zero"]  # the layers' own ablations


def test_evaluate_perfect_sae(tiny_eval_case):
    bridge, info, rows = tiny_eval_case
    metrics, log10_density = evaluate_sae(bridge, perfect_sae(info.d_in), TINY_EVAL_LAYER, rows, TINY_EVAL_CFG,
                                          torch.device("cpu"))
    assert metrics["eval_tokens"] == rows.size == metrics["dead_fraction_tokens"]
    assert metrics["ce_clean"] == pytest.approx(reference_ce(bridge, rows), rel=1e-5)
    zero_hook = (hook_z_name(TINY_EVAL_LAYER), lambda z, hook: torch.zeros_like(z))
    assert metrics["ce_zero"] == pytest.approx(reference_ce(bridge, rows, [zero_hook]), rel=1e-5)
    # a random model barely cares about one layer, but the gap must be non-zero for the ratio below
    assert abs(metrics["ce_zero"] - metrics["ce_clean"]) > 1e-4
    assert metrics["ce_sae"] == pytest.approx(metrics["ce_clean"], abs=1e-6)
    assert metrics["loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["mse"] == pytest.approx(0.0, abs=1e-10)
    assert metrics["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["kl_sae"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["kl_zero"] > 0 and metrics["kl_score"] == pytest.approx(1.0, abs=1e-4)
    # each coordinate fires exactly one of its two features (hook_z has no exact zeros here)
    assert metrics["l0"] == pytest.approx(info.d_in)
    assert log10_density.shape == (2 * info.d_in,)


def test_evaluate_zero_output_sae(tiny_eval_case):
    bridge, info, rows = tiny_eval_case
    sae = SAE(info.d_in, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.W_dec.zero_()
    metrics, _ = evaluate_sae(bridge, sae, TINY_EVAL_LAYER, rows, TINY_EVAL_CFG, torch.device("cpu"))
    assert metrics["ce_sae"] == pytest.approx(metrics["ce_zero"], abs=1e-6)
    assert metrics["loss_recovered"] == pytest.approx(0.0, abs=1e-5)
    assert metrics["kl_sae"] == pytest.approx(metrics["kl_zero"], rel=1e-5)
    # x_hat = 0: mse is the mean squared norm of hook_z over tokens
    x = capture_z(bridge, torch.from_numpy(rows).long(), [TINY_EVAL_LAYER])[TINY_EVAL_LAYER]
    assert metrics["mse"] == pytest.approx(x.pow(2).sum(-1).mean().item(), rel=1e-5)
    # L0 matches the encoder applied to the same activations
    assert metrics["l0"] == pytest.approx((sae.encode(x) > 0).sum(-1).float().mean().item(), rel=1e-6)


def test_evaluate_empty_rows(tiny_eval_case):
    bridge, info, rows = tiny_eval_case
    with pytest.raises(UserError, match="empty"):
        evaluate_sae(bridge, perfect_sae(info.d_in), TINY_EVAL_LAYER, rows[:0], TINY_EVAL_CFG, torch.device("cpu"))


# ---------------------------------------------------------------------------------------------------
# `attnsae evaluate` on any SAE folder


@pytest.fixture(scope="module")
def sae_folder_and_tokens(tmp_path_factory, tiny_model_dir):
    from attnsae.data.models import load_tokenizer
    from attnsae.formats.sae_cfg import sae_cfg
    from attnsae.sae.autoencoder import save_sae

    root = tmp_path_factory.mktemp("evaluate-cli")
    model = tiny_model_dir(seed=0)
    info = read_model_info(model)
    docs = list(synthetic_documents(40, 1))
    tokenize_corpus(TokenizeConfig(context_size=16, eval_fraction=0.3, max_eval_rows=12), docs,
                    load_tokenizer(model), info.bos_token_id, root / "tokens")
    cfg = sae_cfg(d_in=info.d_in, d_sae=2 * info.d_in, hook_name=hook_z_name(2), layer=2, model_name="tiny-gpt2",
                  context_size=16, dataset="synthetic")
    save_sae(perfect_sae(info.d_in), root / "sae", cfg, torch.zeros(2 * info.d_in))
    return root, model


def test_cli_evaluates_any_sae_folder_taking_its_layer_from_cfg(sae_folder_and_tokens, tmp_path):
    from click.testing import CliRunner

    from attnsae.cli import main

    root, model = sae_folder_and_tokens
    out = tmp_path / "metrics.json"
    args = ["evaluate", "--params", str(TINY_PROFILE), "--sae", str(root / "sae"), "--model", str(model),
            "--tokens", str(root / "tokens"), "--max-rows", "5", "--batch-rows", "2", "--out", str(out),
            "--density", str(tmp_path / "density.csv"), "--no-mlflow"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert metrics["layer"] == 2 and metrics["hook_name"] == "blocks.2.attn.hook_z"
    assert metrics["eval_rows"] == 5 and metrics["eval_tokens"] == metrics["dead_fraction_tokens"] == 5 * 16
    assert metrics["loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    lines = result.output.splitlines()
    for key in ("l0", "loss_recovered", "ce_clean", "ce_sae", "ce_zero", "mse", "explained_variance", "dead_fraction"):
        assert any(line.strip().startswith(f"{key}:") for line in lines), key
    assert any(line.strip().startswith("dead_fraction:") and line.endswith("(over 80 tokens)") for line in lines)


def test_cli_evaluates_the_heldout_split_into_its_own_file(sae_folder_and_tokens, tmp_path):
    from click.testing import CliRunner

    from attnsae.cli import main
    from attnsae.data.models import load_tokenizer
    from attnsae.formats.metrics import read_heldout_metrics

    root, model = sae_folder_and_tokens
    docs = [("synthetic", d) for d in synthetic_documents(30, 1)] + [("other", d) for d in synthetic_documents(12, 2)]
    cfg = TokenizeConfig(context_size=16, eval_fraction=0.3, max_eval_rows=6, heldout_sources=["other"])
    tokenize_corpus(cfg, docs, load_tokenizer(model), read_model_info(model).bos_token_id, tmp_path / "tokens")
    common = ["evaluate", "--params", str(TINY_PROFILE), "--sae", str(root / "sae"), "--model", str(model),
              "--max-rows", "4", "--out", str(tmp_path / "m.json"), "--no-mlflow"]
    result = CliRunner().invoke(main, [*common, "--tokens", str(tmp_path / "tokens"), "--heldout-out",
                                       str(tmp_path / "heldout.json")])
    assert result.exit_code == 0, result.output
    heldout = read_heldout_metrics(tmp_path / "heldout.json")
    assert heldout["sources"] == ["other"] and heldout["eval_rows"] == 4 and heldout["split"] == "heldout"
    assert heldout["loss_recovered"] == pytest.approx(1.0, abs=1e-4) and heldout["l0_se"] is not None
    assert "held-out (other, 64 tokens):" in result.output
    # tokens without a held-out split: the file says so
    result = CliRunner().invoke(main, [*common, "--tokens", str(root / "tokens"), "--heldout-out",
                                       str(tmp_path / "none.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "none.json").read_text()) == {"layer": 2, "split": "heldout", "sources": []}
    assert read_heldout_metrics(tmp_path / "none.json") is None and "held-out" not in result.output


def test_cli_evaluate_refuses_a_layer_the_sae_was_not_trained_on(sae_folder_and_tokens, tmp_path):
    from click.testing import CliRunner

    from attnsae.cli import main

    root, model = sae_folder_and_tokens
    result = CliRunner().invoke(main, ["evaluate", "--params", str(TINY_PROFILE), "--layer", "1", "--sae",
                                       str(root / "sae"), "--model", str(model), "--tokens", str(root / "tokens"),
                                       "--out", str(tmp_path / "m.json"), "--no-mlflow"])
    assert result.exit_code != 0
    assert "the SAE was trained on blocks.2.attn.hook_z, not on layer 1" in result.output
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("args, message", [
    ([], "name the SAEs to evaluate: --layer (repeatable; our models/sae/L<layer>), --all-layers, or --sae FOLDER"),
    (["--sae", "x", "--all-layers"],
     "--sae names one SAE folder: give at most one --layer with it, and not --all-layers"),
    (["--sae", "x", "--layer", "1", "--layer", "2"], "--sae names one SAE folder"),
    (["--layer", "1", "--layer", "2", "--out", "m.json"], "--out, --density and --heldout-out name one SAE's files"),
    (["--all-layers", "--heldout-out", "h.json"], "--out, --density and --heldout-out name one SAE's files"),
])
def test_cli_evaluate_refuses_unclear_sae_choices_in_one_line(args, message, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from attnsae.cli import main

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["evaluate", "--params", str(TINY_PROFILE), "--no-mlflow", *args])
    assert result.exit_code != 0
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_sae_layer_needs_an_attention_output_hook():
    from attnsae.evaluation.evaluate import sae_layer

    assert sae_layer({"hook_name": "blocks.11.attn.hook_z"}, "x") == 11
    with pytest.raises(UserError, match=r"hook 'blocks.3.hook_resid_pre' is not an attention output "
                                        r"\(allowed: blocks.<L>.attn.hook_z\)"):
        sae_layer({"hook_name": "blocks.3.hook_resid_pre"}, "x")


def test_cli_evaluating_another_sae_leaves_the_pipelines_outputs_alone(sae_folder_and_tokens, tmp_path, monkeypatch):
    """`attnsae evaluate --sae OTHER` prints its metrics; it writes reports/metrics or reports/density only when
    told to write elsewhere, and refuses to overwrite the pipeline's own files."""
    from click.testing import CliRunner

    from attnsae import layout
    from attnsae.cli import main

    root, model = sae_folder_and_tokens
    monkeypatch.chdir(tmp_path)
    layout.metrics_file(2).parent.mkdir(parents=True)
    layout.metrics_file(2).write_text("the pipeline's own result\n")
    common = ["evaluate", "--params", str(TINY_PROFILE), "--sae", str(root / "sae"), "--model",
              str(model), "--tokens", str(root / "tokens"), "--max-rows", "2"]
    printed = CliRunner().invoke(main, common)
    assert printed.exit_code == 0, printed.output
    assert "not written" in printed.output and "loss_recovered" in printed.output
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["reports", "reports/metrics",
                                                                                        "reports/metrics/L2.json"]
    # every path inside a stage's outputs, this layer's or another's (measured: another layer's files were overwritten)
    for option, path in [("--out", layout.metrics_file(2)), ("--out", layout.metrics_file(10)),
                         ("--density", layout.density_file(10)), ("--heldout-out", layout.heldout_metrics_file(10)),
                         ("--out", layout.REPORT_MD), ("--density", layout.sae_dir(10) / "x.csv")]:
        refused = CliRunner().invoke(main, [*common, option, str(path)])
        assert refused.exit_code == 1
        assert refused.stderr.strip().splitlines() == [
            f"Error: {path} lies in the pipeline's output {layout.stage_output_holding(path)}, "
            f"which holds its own SAEs' results, each at its own path: "
            f"write {root / 'sae'}'s results outside the pipeline's outputs"]
    assert layout.metrics_file(2).read_text() == "the pipeline's own result\n"
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["reports", "reports/metrics",
                                                                                        "reports/metrics/L2.json"]


def written_metrics() -> dict:
    totals = Totals(d_sae=4, d_in=2)
    x = torch.arange(16, dtype=torch.float32).view(8, 2)
    totals.add_activations(x, x + 1.0, torch.ones(8, 4), batch=2)
    totals.add_rows(predictions=[3, 3], tokens=[4, 4], ce_clean=[2.0, 4.0], ce_sae=[4.0, 5.0], ce_zero=[5.0, 7.0],
                    kl_sae=[0.4, 0.6], kl_zero=[1.0, 1.5])
    metrics, _ = finish(totals, EvaluateConfig(bootstrap_resamples=50))
    return {"layer": 2, "hook_name": "blocks.2.attn.hook_z", "model": "m", "d_sae": 4, "sae": "s", "eval_rows": 2,
            **metrics}


def test_metrics_and_density_files_read_back_what_evaluate_writes(tmp_path):
    from attnsae.files import write_json_atomic
    from attnsae.formats.metrics import density_csv, read_density, read_metrics

    metrics = written_metrics()
    write_json_atomic(tmp_path / "L2.json", metrics)
    assert read_metrics(tmp_path / "L2.json") == metrics
    (tmp_path / "L2.csv").write_text(density_csv({"bin_edges": [-2.0, -1.0, 0.0], "counts": [3, 4]}))
    assert read_density(tmp_path / "L2.csv") == [(-1.5, 3), (-0.5, 4)]


@pytest.mark.parametrize("change, message", [
    ({"l0": "12"}, "metrics key 'l0' must be a finite int or float, got '12'"),
    ({"layer": 2.0}, "metrics key 'layer' must be a finite int, got 2.0"),
    ({"dead_fraction": float("nan")}, "metrics key 'dead_fraction' must be a finite int or float, got nan"),
    ({"eval_rows": True}, "metrics key 'eval_rows' must be a finite int, got True"),
    ({"mse": None}, "metrics key 'mse' must be a finite int or float, got None"),
])
def test_metrics_of_the_wrong_type_are_one_line_naming_file_and_key(tmp_path, change, message):
    from attnsae.files import write_json_atomic
    from attnsae.formats.metrics import read_metrics

    write_json_atomic(tmp_path / "L2.json", {**written_metrics(), **change})
    with pytest.raises(UserError) as err:
        read_metrics(tmp_path / "L2.json")
    assert str(err.value) == f"{tmp_path / 'L2.json'}: {message}"


def test_metrics_missing_a_key_and_garbled_density_are_one_line(tmp_path):
    from attnsae.files import write_json_atomic
    from attnsae.formats.metrics import read_density, read_metrics

    metrics = written_metrics()
    del metrics["kl_score"]
    write_json_atomic(tmp_path / "L2.json", metrics)
    with pytest.raises(UserError, match=r"L2.json: metrics file lacks 'kl_score'"):
        read_metrics(tmp_path / "L2.json")
    for text, fragment in (("x,y\n1,2\n", "expected the header"), ("log10_density,features\n-1.0,a\n", "line 2"),
                           (b"\xff\xfe", r"not UTF-8 text \(byte 0\); the file is corrupt")):
        path = tmp_path / "L2.csv"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(UserError, match=fragment):
            read_density(path)
