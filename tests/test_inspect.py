"""`attnsae inspect`: an SAE on text of your own (features/inspection.py).

- rows: the tokenize stage's rows (separator first), the last shorter row kept;
- per token, on three families (GPT-2's folded value bias, Llama's grouped value heads, Gemma 2's soft-capping and
  norms around attention): the features, the reconstruction's error and the next token's CE with the SAE spliced in
  and with hook_z zeroed equal the independent evaluator's, written with plain transformers (1e-4); each feature's
  head and source are the largest of a slow DFA written out term by term;
- over the text: the evaluate stage's metrics on the same rows;
- the command: what it prints and writes, and one line for each bad input.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from attnsae.cli import main
from attnsae.data.models import hook_z_name, load_bridge
from attnsae.errors import UserError
from attnsae.evaluation.evaluate import evaluate_sae
from attnsae.features import attribution
from attnsae.features.inspection import (
    FeatureNotes,
    context_size_for,
    inspect_rows,
    report_lines,
    strongest_sources,
    text_rows,
    token_label,
)
from attnsae.formats.model_info import read_model_info
from attnsae.formats.sae_cfg import sae_cfg
from attnsae.sae.autoencoder import SAE, save_sae
from helpers import OFFLINE_ENV, TINY_EVAL_CFG, TINY_EVAL_LAYER, assert_one_line_error, invoke
from independent_eval import (
    folded_value_bias,
    independent_hook_z,
    load_hf_model,
    replacing_z,
    sae_features,
    sae_reconstruction,
)
from test_family_features import random_sae
from test_model_families import VOCAB, random_family_model

TOL = 1e-4
LAYER = 1


def test_text_rows_start_with_the_separator_and_keep_the_last_short_row():
    rows = text_rows(list(range(10, 17)), separator=0, context_size=4)
    assert [r.tolist() for r in rows] == [[0, 10, 11, 12], [0, 13, 14, 15], [0, 16]]
    assert [r.tolist() for r in text_rows([5, 6, 7], 1, 4)] == [[1, 5, 6, 7]]


@pytest.mark.parametrize("tokens, size, fragment", [([], 8, "no tokens"), ([1, 2], 1, "context size 1")])
def test_text_rows_refuse_what_makes_no_row(tokens, size, fragment):
    with pytest.raises(UserError, match=fragment):
        text_rows(tokens, 0, size)


def test_the_row_length_is_as_asked_else_the_saes_else_the_models():
    assert context_size_for(None, 128, 1024, "m") == 128
    assert context_size_for(None, 2048, 1024, "m") == 1024  # never longer than the model takes
    assert context_size_for(None, None, 512, "m") == 512
    assert context_size_for(64, 128, 1024, "m") == 64
    with pytest.raises(UserError, match="--context-size 2000: m takes at most 1024"):
        context_size_for(2000, 128, 1024, "m")
    with pytest.raises(UserError, match="give --context-size"):
        context_size_for(None, None, None, "m")


def test_token_labels_are_quoted_escaped_and_cut():
    assert token_label(" Mr") == '" Mr"'
    assert token_label("\n") == '"\\n"'
    assert token_label("x" * 40) == '"' + "x" * 13 + '…"'
    assert len(token_label("x" * 40)) == 16


# ---------------------------------------------------------------------------------------------------
# Per token, against plain transformers


@pytest.fixture(scope="module", params=["gpt2", "llama", "gemma2"])
def family(tmp_path_factory, request):
    folder = tmp_path_factory.mktemp("inspect") / request.param
    random_family_model(request.param, folder)
    bridge, info = load_bridge(folder, torch.device("cpu"))
    return request.param, load_hf_model(folder), bridge, info


def independent_token_ce(model, layer: int, tokens: np.ndarray, replace=None) -> torch.Tensor:
    """Per position, the next token's CE from plain transformers, hook_z replaced by ``replace(hook_z)``."""
    bias = folded_value_bias(model, layer)
    ids = torch.as_tensor(tokens[None], dtype=torch.long)

    def swap(z_raw: torch.Tensor) -> torch.Tensor:
        hook_z = z_raw if bias is None else z_raw - bias
        out = replace(hook_z)
        return out if bias is None else out + bias

    with torch.no_grad():
        if replace is None:
            logits = model(ids).logits
        else:
            with replacing_z(model, layer, swap):
                logits = model(ids).logits
    return torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="none")


def slow_dfa(t: attribution.LayerTensors, sae: SAE, position: int, feature: int) -> torch.Tensor:
    """DFA_f[d=position, s, h] = A[h, d, s] * (v[s, h] . W_enc^h[:, f]), term by term, [S, H]."""
    n_heads, d_head = t.z.shape[2], t.z.shape[3]
    out = torch.zeros(t.z.shape[1], n_heads)
    for s in range(position + 1):
        for h in range(n_heads):
            w = sae.W_enc.detach()[h * d_head : (h + 1) * d_head, feature]
            out[s, h] = t.pattern[0, h, position, s] * (t.v[0, s, h] @ w)
    return out


def test_each_token_agrees_with_plain_transformers(family):
    name, model, bridge, info = family
    sae = random_sae(info.d_in)
    row = np.random.default_rng(1).integers(0, VOCAB - 1, size=14)
    row[0] = info.bos_token_id
    inspection = inspect_rows(bridge, sae, LAYER, [row], str, top=4, context_size=16)
    readings = inspection.rows[0]
    assert [r.token_id for r in readings] == row.tolist() and [r.position for r in readings] == list(range(14))

    weights = {k: v.detach() for k, v in sae.state_dict().items()}
    x = independent_hook_z(model, LAYER, row[None])
    f = sae_features(weights, x)
    x_hat = sae_reconstruction(weights, f)
    error = ((x_hat - x).pow(2).sum(-1) / x.pow(2).sum(-1)).tolist()
    torch.testing.assert_close(torch.tensor([r.relative_error for r in readings]), torch.tensor(error),
                               atol=TOL, rtol=0, msg=name)
    for r in readings:
        top = f[r.position].topk(4)
        shown = [(h.feature, h.activation) for h in r.features]
        expected = [(i, v) for i, v in zip(top.indices.tolist(), top.values.tolist()) if v > 0]
        assert [i for i, _ in shown] == [i for i, _ in expected], (name, r.position)
        np.testing.assert_allclose([v for _, v in shown], [v for _, v in expected], atol=TOL)

    clean = independent_token_ce(model, LAYER, row)
    spliced = independent_token_ce(model, LAYER, row, lambda z: sae_reconstruction(weights, sae_features(weights, z)))
    zeroed = independent_token_ce(model, LAYER, row, torch.zeros_like)
    assert readings[-1].ce_increase_next is None and readings[-1].ce_increase_zero_next is None
    torch.testing.assert_close(torch.tensor([r.ce_increase_next for r in readings[:-1]]), spliced - clean,
                               atol=TOL, rtol=0, msg=name)
    torch.testing.assert_close(torch.tensor([r.ce_increase_zero_next for r in readings[:-1]]), zeroed - clean,
                               atol=TOL, rtol=0, msg=name)
    assert (zeroed - clean).abs().max() > 10 * TOL  # the layer matters on this row: the comparison can fail

    t = attribution.capture_layer(bridge, torch.as_tensor(row[None], dtype=torch.long), LAYER)
    hits = [(r.position, h) for r in readings for h in r.features]
    assert len(hits) > 10
    for position, hit in hits:
        reference = slow_dfa(t, sae, position, hit.feature)
        by_source = reference[: position + 1].sum(1)  # the sources up to the token itself
        assert (hit.head, hit.source) == (int(reference.sum(0).argmax()), int(by_source.argmax()))
        assert hit.head_dfa == pytest.approx(float(reference.sum(0).max()), abs=TOL)
        assert hit.source_dfa == pytest.approx(float(by_source.max()), abs=TOL)


def test_a_source_is_never_a_later_token_even_when_every_earlier_one_pulls_down():
    """One head, d_head 1, W_enc = 1: DFA[d, s] = A[d, s] * v[s]; at position 0 the only source counts -1, which is
    less than the zeros the causal pattern leaves at later positions."""
    sae = SAE(1, 1)
    with torch.no_grad():
        sae.W_enc.fill_(1.0)
    v = torch.tensor([-1.0, 2.0, 5.0]).view(1, 3, 1, 1)
    pattern = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]).view(1, 1, 3, 3)
    t = attribution.LayerTensors(tokens=torch.zeros(1, 3), z=torch.zeros(1, 3, 1, 1), pattern=pattern, v=v)
    head, head_dfa, source, source_dfa = strongest_sources(t, sae, torch.tensor([0, 1, 2]), torch.tensor([0, 0, 0]))
    assert source.tolist() == [0, 1, 2] and head.tolist() == [0, 0, 0]
    assert source_dfa.tolist() == pytest.approx([-1.0, 1.0, 2.5])
    assert head_dfa.tolist() == pytest.approx([-1.0, 0.5, 2.9])


def test_the_texts_metrics_are_the_evaluate_stages_on_the_same_rows(tiny_eval_case):
    bridge, info, rows = tiny_eval_case
    sae = random_sae(info.d_in, seed=2)
    ours = inspect_rows(bridge, sae, TINY_EVAL_LAYER, list(rows), str, top=2, context_size=16).metrics
    stage, _ = evaluate_sae(bridge, sae, TINY_EVAL_LAYER, rows, TINY_EVAL_CFG, torch.device("cpu"))
    for key in ("l0", "ce_clean", "ce_sae", "ce_zero", "ce_increase", "kl_sae", "kl_zero", "loss_recovered",
                "explained_variance", "mse"):
        assert ours[key] == pytest.approx(stage[key], rel=1e-6, abs=1e-9), key
    assert ours["tokens"] == stage["eval_tokens"] == rows.size
    for key in ("l0", "loss_recovered", "ce_increase", "kl_score"):  # the same resamples of the same row sums
        assert ours[f"{key}_se"] == pytest.approx(stage[f"{key}_se"], rel=1e-5), key
    assert ours["loss_recovered_se"] > 0
    one_row = inspect_rows(bridge, sae, TINY_EVAL_LAYER, [rows[0]], str, top=2, context_size=16).metrics
    assert "loss_recovered_se" not in one_row  # no spread to measure with one row


def test_the_most_active_features_are_ranked_by_their_peak_over_every_row(tiny_eval_case):
    bridge, info, rows = tiny_eval_case
    sae = random_sae(info.d_in, seed=3)
    inspection = inspect_rows(bridge, sae, TINY_EVAL_LAYER, list(rows[:3]), str, top=1, context_size=16,
                              top_features=5)
    with torch.no_grad():  # [3, S, d_sae]
        acts = torch.stack([sae.encode(attribution.capture_layer(bridge, torch.as_tensor(r[None]).long(),
                                                                 TINY_EVAL_LAYER).x) for r in rows[:3]])
    peak = acts.amax((0, 1))
    assert [f.feature for f in inspection.top_features] == peak.topk(5).indices.tolist()
    for f in inspection.top_features:
        assert acts[f.row, f.position, f.feature] == pytest.approx(f.max_activation)
        assert f.fired_tokens == int((acts[..., f.feature] > 0).sum())


def test_the_report_names_tags_and_cards_from_the_layers_features_json(tiny_eval_case):
    bridge, info, rows = tiny_eval_case
    sae = random_sae(info.d_in, seed=4)
    inspection = inspect_rows(bridge, sae, TINY_EVAL_LAYER, [rows[0]], lambda i: f"t{i}", top=2, context_size=16,
                              top_features=3)
    first = inspection.top_features[0].feature
    tags = [["induction"] if f == first else [] for f in range(sae.d_sae)]
    notes = FeatureNotes(tags, [0.01] * sae.d_sae, {first}, "reports/dashboards/L1/index.html")
    about = {"model": "tiny", "sae": "sae", "kind": "standard", "k": None, "d_sae": sae.d_sae}
    lines = report_lines(inspection, about, notes, per_token=True)
    assert lines[0].startswith(f"L1 of tiny, SAE sae (standard, {sae.d_sae:,} features): 16 tokens in 1 row of up "
                               "to 16")
    assert lines[1].startswith("this text: L0 ")
    assert f"[induction] density 1.000%; card reports/dashboards/L1/index.html#f{first}" in lines[3]
    assert len(lines) == 3 + 3 + 1 + 16  # header, metrics, 3 most active, the per-token header, 16 tokens
    assert len(report_lines(inspection, about, None, per_token=False)) == 6
    assert lines[1].endswith("(one row: no standard errors)")
    two = inspect_rows(bridge, sae, TINY_EVAL_LAYER, list(rows[:2]), str, top=0, context_size=16)
    line = report_lines(two, about, None, per_token=False)[1]
    assert f"loss recovered {two.metrics['loss_recovered']:.3f} ± {two.metrics['loss_recovered_se']:.3f}" in line
    assert line.endswith("(± bootstrap standard errors over the 2 rows)")
    assert not any(reading.features for row in two.rows for reading in row)  # top 0: nothing attributed


# ---------------------------------------------------------------------------------------------------
# The command


@pytest.fixture(scope="module")
def sae_folder(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("inspect-cli")
    model = tiny_model_dir(seed=0)
    info = read_model_info(model)
    sae = random_sae(info.d_in, seed=5)
    cfg = sae_cfg(d_in=info.d_in, d_sae=sae.d_sae, hook_name=hook_z_name(2), layer=2, model_name="tiny-gpt2",
                  context_size=16, dataset="synthetic")
    save_sae(sae, root / "sae", cfg, None)
    return root / "sae", model


def test_the_command_prints_each_token_and_writes_the_same_numbers_to_json(sae_folder, tmp_path):
    sae, model = sae_folder
    text = "the cat sat on the mat. the cat sat on the mat."  # 47 bytes: rows of 1 + 15 tokens, the last shorter
    result = invoke("inspect", text, "--sae", sae, "--model", model, "--json", tmp_path / "out.json")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("L2 of tiny-gpt2")
    assert "51 tokens in 4 rows of up to 16" in lines[0]  # 47 tokens and a separator per row
    assert [line for line in lines if line.startswith("row ")] == ["row 0", "row 1", "row 2", "row 3"]
    written = json.loads((tmp_path / "out.json").read_text())
    assert (written["layer"], written["context_size"], written["sae"], written["d_sae"]) == (
        2, 16, str(sae), 2 * read_model_info(model).d_in)
    assert [len(r) for r in written["rows"]] == [16, 16, 16, 3]
    metrics = written["metrics"]
    assert f"L0 {metrics['l0']:.1f} ± {metrics['l0_se']:.1f}," in lines[1]
    first = written["rows"][0][1]
    expected = f"     1 {token_label(first['text']):<16} {first['relative_error']:8.3f} " \
               f"{first['ce_increase_next']:+8.4f}"
    assert lines[lines.index("row 0") + 2].startswith(expected)

    summary = CliRunner(env=OFFLINE_ENV).invoke(main, ["inspect", "--file", "-", "--sae", str(sae), "--model",
                                                       str(model), "--summary"], input=text)
    assert summary.exit_code == 0, summary.output
    assert summary.stdout.splitlines()[:2] == lines[:2]
    assert not any(line.startswith("row ") for line in summary.stdout.splitlines())


@pytest.mark.parametrize("args, fragments", [
    ([], ["give the text to inspect either as the argument or with --file"]),
    (["text", "--file", "x.txt"], ["either as the argument or with --file"]),
    (["   "], ["the text to inspect is empty"]),
    (["--file", "missing.txt"], ["--file missing.txt: No such file"]),
    (["a text", "--context-size", "5000"], ["--context-size 5000: tiny-gpt2 (random weights, seed 0) takes at most"]),
    (["a text", "--layer", "1"], ["the SAE was trained on blocks.2.attn.hook_z, not on layer 1"]),
])
def test_bad_input_is_one_line(sae_folder, args, fragments, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    sae, model = sae_folder
    assert_one_line_error(invoke("inspect", *args, "--sae", sae, "--model", model), *fragments)


def test_a_file_that_is_not_utf8_is_one_line(sae_folder, tmp_path):
    sae, model = sae_folder
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    assert_one_line_error(invoke("inspect", "--file", tmp_path / "latin1.txt", "--sae", sae, "--model", model),
                          "latin1.txt: not UTF-8 text")


def features_doc(path, sae_dir, d_sae: int, tagged: int) -> None:
    """A features.json of layer 2 for ``sae_dir`` with ``d_sae`` features, one of them tagged and carded."""
    from attnsae.formats.features import FORMAT, VERSION, content_hash, features_json_text

    doc = {"format": FORMAT, "version": VERSION, "layer": 2, "sae": str(sae_dir), "d_sae": d_sae,
           "summary": {"tags": [["induction"] if f == tagged else [] for f in range(d_sae)],
                       "density": [0.5] * d_sae},
           "cards": [{"feature": tagged}]}
    path.write_text(features_json_text({**doc, "content_hash": content_hash(doc)}))


def test_the_given_features_json_names_tags_and_must_be_of_this_saes_width(sae_folder, tmp_path):
    sae, model = sae_folder
    d_sae = 2 * read_model_info(model).d_in
    result = invoke("inspect", "the cat", "--sae", sae, "--model", model, "--summary", "--most-active", d_sae)
    assert result.exit_code == 0, result.output
    tagged = int(result.stdout.splitlines()[3].split()[0])  # the most active feature
    features_doc(tmp_path / "features.json", sae, d_sae, tagged)
    tagged_run = invoke("inspect", "the cat", "--sae", sae, "--model", model, "--summary", "--features",
                        tmp_path / "features.json")
    assert tagged_run.exit_code == 0, tagged_run.output
    assert f"[induction] density 50.000%; card {tmp_path / 'index.html'}#f{tagged}" in tagged_run.stdout.splitlines()[3]
    features_doc(tmp_path / "narrow.json", sae, 7, 0)
    assert_one_line_error(invoke("inspect", "the cat", "--sae", sae, "--model", model, "--features",
                                 tmp_path / "narrow.json"),
                          "narrow.json: holds the dashboards of an SAE of 7 features, not of this one's")
