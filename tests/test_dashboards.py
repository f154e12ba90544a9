"""The dashboards stage's numbers against a slow, obviously correct reference on the tiny model.

The reference runs the model with plain hook_z capture, keeps the dense [rows, positions, features]
activations, and computes every card number with explicit loops: the stage (sparse firings, one pass,
gathered DFA) must agree with it. The DFA identity (sum over sources = pre-activation - bias) is checked
on every shown example.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnsae.config import DashboardsConfig, TagThresholds
from attnsae.data.models import load_bridge, load_tokenizer
from attnsae.errors import UserError
from attnsae.features import dashboards, families
from attnsae.sae.autoencoder import SAE
from helpers import REPO

LAYER = 1
CFG = DashboardsConfig(first_n=4, features=[5], top_k=4, intervals=3, interval_examples=2, histogram_bins=6,
                       logit_tokens=5, probe_prompts=2, null_directions=8, batch_rows=3)


@pytest.fixture(scope="module", params=["standard", "topk"])
def case(request, tiny_model_dir, one_thread):
    """(bridge, info, sae, rows, doc): the stage's document for a random SAE on 7 rows with document breaks,
    a standard (ReLU) SAE or a TopK one keeping 6 of its 24 features."""
    model_dir = tiny_model_dir(seed=0)
    bridge, info = load_bridge(model_dir, torch.device("cpu"))
    generator = torch.Generator().manual_seed(3)
    k = 6 if request.param == "topk" else None
    sae = SAE(info.d_in, 24, generator=generator, kind=request.param, k=k).requires_grad_(False)
    with torch.no_grad():
        sae.b_enc.uniform_(-0.3, 0.1, generator=generator)  # some features fire often, some rarely, some never
        sae.b_dec.normal_(0.0, 0.1, generator=generator)
    rng = np.random.default_rng(0)
    rows = rng.integers(0, info.vocab_size - 1, size=(7, 20)).astype(np.int32)
    rows[:, 0] = info.bos_token_id
    rows[1, 8] = rows[4, 3] = info.bos_token_id  # two document breaks inside rows
    doc = dashboards.build_document(CFG, bridge, info, sae, "sae-under-test", LAYER, rows, alive_rows=5,
                                    tokenizer=load_tokenizer(model_dir), device=torch.device("cpu"))
    return bridge, info, sae, rows, doc


def dense_reference(bridge, sae, rows):
    """hook_z, pattern and values of every row, and the dense activations, with nothing clever."""
    tokens = torch.tensor(rows, dtype=torch.long)
    names = [f"blocks.{LAYER}.attn.hook_{k}" for k in ("z", "pattern", "v")]
    _, cache = bridge.run_with_cache(tokens, names_filter=lambda n: n in names)
    z, pattern, v = (cache[n].float() for n in names)
    x = z.reshape(len(rows), rows.shape[1], -1)
    pre = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).detach()
    kept = pre.argsort(dim=-1, descending=True).argsort(dim=-1) < sae.k if sae.kind == "topk" else True
    return z, pattern, v, pre, torch.relu(pre) * kept


def test_summary_matches_dense_activations(case):
    bridge, info, sae, rows, doc = case
    _, _, _, _, acts = dense_reference(bridge, sae, rows)
    density = (acts > 0).float().mean((0, 1))
    assert np.allclose(doc["summary"]["density"], density.numpy(), atol=1e-6)
    assert np.allclose(doc["summary"]["max_activation"], acts.amax((0, 1)).numpy(), rtol=1e-5, atol=1e-6)
    alive = (acts[:5] > 0).any(0).any(0).numpy()  # the first alive_rows rows decide
    assert doc["summary"]["alive"] == alive.tolist()
    assert doc["alive"]["count"] == int(alive.sum()) and doc["alive"]["tokens"] == 5 * rows.shape[1]
    first = [int(f) for f in np.flatnonzero(alive)[:4]]
    best = {family["best"]: tag for tag, family in reversed(doc["families"].items()) if family["best"] is not None}
    assert [c["feature"] for c in doc["cards"]] == sorted(set(first) | {5} | set(best))
    reasons = {c["feature"]: c["reason"] for c in doc["cards"]}
    assert reasons[first[0]] == "first_n"
    assert all(reasons[f] == f"best {tag}" for f, tag in best.items() if f not in first and f != 5)


def test_each_family_is_its_features_by_score_and_its_best_has_a_card(case):
    _, _, _, _, doc = case
    summary, carded = doc["summary"], {c["feature"] for c in doc["cards"]}
    for tag, family in doc["families"].items():
        carrying = [f for f, tags in enumerate(summary["tags"]) if tag in tags]
        assert sorted(family["ranked"]) == carrying, tag
        scores = [summary["scores"][tag][f] for f in family["ranked"]]
        assert scores == sorted(scores, reverse=True), tag
        assert family["best"] == (family["ranked"][0] if carrying else None) and family["best"] in carded | {None}
    assert any(family["best"] is not None for family in doc["families"].values())  # the check checks something


def test_cards_match_a_slow_reference(case):
    bridge, info, sae, rows, doc = case
    z, pattern, v, pre, acts = dense_reference(bridge, sae, rows)
    n_heads, d_head = z.shape[2], z.shape[3]
    w_o = bridge.blocks[LAYER].attn.W_O.detach()
    for card in doc["cards"]:
        f = card["feature"]
        values = acts[:, :, f]
        firing = values[values > 0].numpy()
        assert card["firing_tokens"] == len(firing)
        # top examples: the largest activations, in order
        expected_top = np.sort(firing)[::-1][: CFG.top_k]
        assert np.allclose([e["activation"] for e in card["top_examples"]], expected_top, rtol=1e-5)
        # intervals: equal-width bins over (0, max], counted directly
        top = firing.max() if len(firing) else 0.0
        # (k * top / n, computed apart, can round across a value)
        edges = np.linspace(0.0, float(top), CFG.intervals + 1)
        for k, interval in enumerate(card["intervals"]):
            lo, hi = edges[k], edges[k + 1]
            inside = ((firing > lo) & (firing <= hi)) if k else (firing <= hi)
            assert interval["firing_tokens"] == int(inside.sum()), (f, k)
            for e in interval["examples"]:
                assert lo - 1e-5 <= e["activation"] <= hi + 1e-5
        counts, _ = np.histogram(firing, bins=CFG.histogram_bins, range=(0.0, float(top) or 1.0))
        assert card["histogram"]["counts"] == counts.tolist()
        for e in card["top_examples"] + [e for i in card["intervals"] for e in i["examples"]]:
            check_example(e, f, rows, pattern, v, pre, acts, sae, n_heads, d_head, info.bos_token_id)
        # head attribution by decoder norm, head by head
        norms = [float(sae.W_dec[f, h * d_head : (h + 1) * d_head].norm()) for h in range(n_heads)]
        assert np.allclose(card["heads"]["decoder_share"], np.array(norms) / sum(norms), atol=1e-5)
        # logit effects: decoder row through each head's W_O, centred (LayerNorm), unembedded
        residual = sum(sae.W_dec[f, h * d_head : (h + 1) * d_head] @ w_o[h] for h in range(n_heads)).detach()
        logits = (residual - residual.mean()) @ bridge.W_U.detach()
        assert [t["id"] for t in card["logits"]["top"]] == logits.topk(CFG.logit_tokens).indices.tolist()
        assert [t["id"] for t in card["logits"]["bottom"]] == (-logits).topk(CFG.logit_tokens).indices.tolist()
        counts, edges = np.histogram(logits.double().numpy(), bins=CFG.histogram_bins)  # over the whole vocabulary
        assert card["logits"]["histogram"]["counts"] == counts.tolist() and sum(counts) == len(logits)
        assert np.allclose(card["logits"]["histogram"]["bin_edges"], edges, rtol=1e-4, atol=1e-5)


def check_example(e, f, rows, pattern, v, pre, acts, sae, n_heads, d_head, bos):
    r, d = e["row"], e["position"]
    assert e["activation"] == pytest.approx(float(acts[r, d, f]), rel=1e-5)
    assert np.allclose(e["activations"], acts[r, e["start"] : e["start"] + len(e["tokens"]), f].numpy(), atol=1e-5)
    assert e["start"] <= d < e["start"] + len(e["tokens"])
    # the document: how many separators (BOS after position 0) come before, over all earlier rows and this one
    separators = sum(int((rows[i, 1:] == bos).sum()) for i in range(r)) + int((rows[r, 1 : d + 1] == bos).sum())
    assert e["document"] == separators
    # DFA, with explicit loops over sources and heads
    by_source = np.zeros(d + 1)
    by_head = np.zeros(n_heads)
    for s in range(d + 1):
        for h in range(n_heads):
            w = sae.W_enc[h * d_head : (h + 1) * d_head, f]
            contribution = float(pattern[r, h, d, s] * (v[r, s, h] @ w))
            by_source[s] += contribution
            by_head[h] += contribution
    dfa = e["dfa"]
    assert np.allclose(dfa["by_source"], by_source, atol=1e-4)
    assert np.allclose(dfa["by_head"], by_head, atol=1e-4)
    # the identity the card relies on: sources + bias remainder = pre-activation, to 1e-4
    bias = float(sae.b_enc[f] - sae.b_dec @ sae.W_enc[:, f])
    assert dfa["bias_remainder"] == pytest.approx(bias, abs=1e-5)
    assert sum(dfa["by_source"]) + dfa["bias_remainder"] == pytest.approx(float(pre[r, d, f]), abs=1e-4)
    assert sum(dfa["by_head"]) == pytest.approx(dfa["total"], abs=1e-4)
    assert dfa["pre_activation"] == pytest.approx(e["activation"], abs=1e-4)  # a firing token: ReLU passes it
    assert len(dfa["source_tokens"]) == d + 1


def test_every_feature_has_scores_percentiles_and_tags(case):
    _, _, sae, _, doc = case
    summary = doc["summary"]
    assert len(summary["tags"]) == sae.d_sae
    for tag, definition in doc["tag_definitions"].items():
        assert len(summary["scores"][tag]) == sae.d_sae
        assert all(0.0 <= p <= 100.0 for p in summary["percentiles"][tag])
        assert definition["formula"] and definition["threshold"] == getattr(CFG.tags, tag)
    never_fired = [f for f, density in enumerate(summary["density"]) if density == 0]
    assert never_fired and all(summary["tags"][f] == [] for f in never_fired)  # nothing on the page to check a tag by


def test_dfa_from_kept_batches_equals_batches_captured_again(case, monkeypatch, tiny_model_dir):
    """Beyond CAPTURE_BUDGET_BYTES the scan keeps no layer tensors and the DFA pass captures the same batches
    again: the document is the same, byte for byte."""
    bridge, info, sae, rows, doc = case
    monkeypatch.setattr(dashboards, "CAPTURE_BUDGET_BYTES", 0)
    again = dashboards.build_document(CFG, bridge, info, sae, "sae-under-test", LAYER, rows, alive_rows=5,
                                      tokenizer=load_tokenizer(tiny_model_dir(seed=0)), device=torch.device("cpu"))
    assert again == doc


def test_content_hash_covers_the_document(case):
    doc = case[-1]
    assert doc["content_hash"] == dashboards.content_hash(doc)
    changed = {**doc, "layer": doc["layer"] + 1}
    assert dashboards.content_hash(changed) != doc["content_hash"]


def test_intervals_are_positive_only_and_equal_width():
    edges, bins = dashboards.interval_bins(np.array([0.1, 0.5, 1.0, 2.0], dtype=np.float32), 4)
    assert edges.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert bins.tolist() == [0, 0, 1, 3]  # (0, 0.5], (0.5, 1.0], ..., the maximum in the last bin


def test_document_ids_count_separators_not_row_starts():
    rows = np.array([[9, 1, 2, 9], [9, 3, 9, 4]])
    assert dashboards.document_ids(rows, bos=9).tolist() == [[0, 0, 0, 1], [1, 1, 2, 2]]


def test_a_listed_feature_outside_the_sae_is_one_line():
    with pytest.raises(UserError, match=r"dashboards.features: feature 30 is not in this SAE \(ids 0..23\)"):
        dashboards.card_features({"first_n": [0, 1], "random": []}, [30], 24)


def test_the_random_rating_sample_is_seeded_alive_and_apart_from_index_order():
    alive = np.zeros(200, dtype=bool)
    alive[::3] = True  # 67 alive
    sets = dashboards.rating_sets(alive, first_n=5, random_n=10, seed=0)
    assert sets["first_n"] == [0, 3, 6, 9, 12]
    assert len(sets["random"]) == len(set(sets["random"])) == 10 and all(alive[f] for f in sets["random"])
    assert sets["random"] == sorted(sets["random"]) and max(sets["random"]) > 30  # drawn from all of them
    assert dashboards.rating_sets(alive, 5, 10, seed=0) == sets and dashboards.rating_sets(alive, 5, 10, 1) != sets
    assert len(dashboards.rating_sets(alive, 5, 500, seed=0)["random"]) == 67  # at most every alive feature
    cards = dict(dashboards.card_features(sets, [199], 200))
    assert {cards[f] for f in sets["random"] if f not in sets["first_n"]} == {"random"} and cards[199] == "listed"


def test_alive_rows_are_evaluates_rows():
    assert dashboards.alive_row_count(eval_max_rows=16, rows=64) == 16
    assert dashboards.alive_row_count(eval_max_rows=0, rows=64) == 64  # evaluate reads every row
    assert dashboards.alive_row_count(eval_max_rows=100, rows=64) == 64  # a split shorter than max_rows


def test_docs_quote_every_tag_formula_and_threshold():
    """The docs' tag table (docs/features-json.md) is what the code computes: each formula verbatim, each default
    threshold."""
    page = (REPO / "docs" / "features-json.md").read_text()
    for tag in families.TAGS:
        definition = families.TAG_DEFINITIONS[tag]
        row = next(line for line in page.splitlines() if line.startswith(f"| `{tag}` |")).replace("\\|", "|")
        assert definition["formula"] in row and row.rstrip(" |").endswith(str(getattr(TagThresholds(), tag)))
