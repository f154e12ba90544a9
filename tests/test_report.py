"""The report's comparison, the report files, the model cards and the publish stage.

Runs on small generated folders (a fake pinned model, token metadata, metrics JSON, an 8 -> 16 SAE);
no model is loaded.
"""

from __future__ import annotations

import csv
import hashlib
import html.parser
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from attnsae.cli import main
from attnsae.errors import UserError
from attnsae.evaluation import comparison
from attnsae.features.labels import import_labels
from attnsae.formats.features import content_hash, families_of
from attnsae.formats.sae_cfg import sae_cfg
from attnsae.reporting import publish, report
from attnsae.sae.autoencoder import SAE, load_sae, save_sae
from helpers import REPO

# docs/design.md 2, transcribed by hand (a second, independent copy of the anchor table).
DESIGN_TABLE = """
| 0 | 24576 | 1.8 | 3 | 99% | 13% | 97% |
| 1 | 24576 | 0.8 | 20 | 78% | 49% | 87% |
| 2 | 24576 | 1.0 | 16 | 90% | 20% | 95% |
| 3 | 24576 | 0.9 | 15 | 84% | 8% | 75% |
| 4 | 24576 | 1.1 | 15 | 88% | 5% | 100% |
| 5 | 49152 | 1.0 | 20 | 85% | 40% | 82% |
| 6 | 24576 | 1.1 | 19 | 82% | 28% | 75% |
| 7 | 49152 | 1.1 | 19 | 83% | 58% | 70% |
| 8 | 24576 | 1.3 | 20 | 76% | 37% | 64% |
| 9 | 24576 | 1.2 | 21 | 83% | 48% | 85% |
| 10 | 24576 | 1.3 | 16 | 85% | 41% | 81% |
| 11 | 24576 | 3.0 | 8 | 89% | 84% | 66% |
"""

GPT2_SMALL = {"source": "gpt2", "name": "gpt2 (openai-community/gpt2@test)", "n_layers": 12, "n_heads": 12,
              "d_head": 64}
SMOLLM2 = {"source": "smollm2-135m", "name": "SmolLM2-135M-Instruct (test)", "n_layers": 30, "n_heads": 9, "d_head": 64}
TINY = {"source": "tiny-gpt2", "name": "tiny-gpt2 (random weights, seed 0)", "n_layers": 4, "n_heads": 4, "d_head": 16}


def metrics_for(layer: int, model: dict, **values) -> dict:
    base = {
        "layer": layer, "hook_name": f"blocks.{layer}.attn.hook_z", "model": model["name"], "d_sae": 24576,
        "eval_rows": 32, "l0": 10.0 + layer, "loss_recovered": 0.8, "ce_clean": 3.3, "ce_sae": 3.4, "ce_zero": 3.8,
        "ce_increase": 0.1, "ce_increase_zero": 0.5, "kl_sae": 0.1, "kl_zero": 0.5, "kl_score": 0.8, "mse": 1.5,
        "explained_variance": 0.7, "dead_fraction": 0.25, "dead_fraction_tokens": 4096, "dense_fraction": 0.01,
        "dense_threshold": 0.1, "eval_tokens": 4096,
    }
    return {**base, **values}


def make_run(root: Path, model: dict, metrics: dict[int, dict]) -> dict[str, Path]:
    """The folders the report stage reads: pinned model info, token metadata, metrics, density."""
    dirs = {name: root / name
            for name in ("model", "tokens", "metrics", "density", "sae", "out", "dashboards", "labels")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    info = {**model, "vocab_size": 50257, "bos_token_id": 0, "sha256": {}}
    (dirs["model"] / "attnsae_model.json").write_text(json.dumps(info))
    tokens = {"corpus": "hf:Skylion007/openwebtext (streamed)", "context_size": 128, "bos_token_id": 0,
              "eval_fraction": 0.05, "split_seed": 49, "documents": {"train": 900, "eval": 40},
              "rows": {"train": 964, "eval": 32}, "tokens": {"train": 123456, "eval": 4096}}
    (dirs["tokens"] / "meta.json").write_text(json.dumps(tokens))
    for layer, m in metrics.items():
        (dirs["metrics"] / f"L{layer}.json").write_text(json.dumps(m))
        (dirs["density"] / f"L{layer}.csv").write_text("log10_density,features\n-3.0,5\n-2.0,9\n-1.0,2\n")
    return dirs


def build(dirs: dict[str, Path], layers: list[int], compare: str) -> str:
    return report.build_report(layers, dirs["out"], compare, metrics_dir=dirs["metrics"], density_dir=dirs["density"],
                               model_dir=dirs["model"], tokens_dir=dirs["tokens"], sae_root=dirs["sae"],
                               dashboards_root=dirs["dashboards"], labels_root=dirs["labels"],
                               frontier_file=dirs["out"] / "frontier.csv").markdown


def table_rows(markdown: str, first_cell: str) -> list[list[str]]:
    """Rows (as cells) of the Markdown table whose header starts with ``first_cell``."""
    tables = re.findall(r"(\| " + re.escape(first_cell) + r" \|.*?)(?:\n\n|\Z)", markdown, flags=re.DOTALL)
    lines = tables[0].strip().splitlines()
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


class LayerRows(html.parser.HTMLParser):
    """Counts <tr> in the <tbody> of table#layers."""

    def __init__(self):
        super().__init__()
        self.stack: list[tuple[str, str | None]] = []
        self.rows = 0

    def handle_starttag(self, tag, attrs):
        if tag == "tr" and ("tbody", None) in self.stack and ("table", "layers") in self.stack:
            self.rows += 1
        self.stack.append((tag, dict(attrs).get("id") if tag == "table" else None))

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop()[0] != tag:
            pass


def layer_rows(page: str) -> int:
    parser = LayerRows()
    parser.feed(page)
    return parser.rows


# ---------------------------------------------------------------------------------------------------
# The published table and the comparison


def test_published_table_matches_design_md():
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in DESIGN_TABLE.strip().splitlines()]
    assert sorted(comparison.PUBLISHED_GPT2_SMALL) == list(range(12))
    for layer, d_sae, l1, l0, recovered, dead, interpretable in rows:
        row = comparison.PUBLISHED_GPT2_SMALL[int(layer)]
        assert row["d_sae"] == int(d_sae)
        assert row["l1_coeff"] == float(l1)
        assert row["l0"] == float(l0)
        assert row["loss_recovered"] == pytest.approx(int(recovered[:-1]) / 100)
        assert row["dead_fraction"] == pytest.approx(int(dead[:-1]) / 100)
        assert row["alive_interpretable"] == pytest.approx(int(interpretable[:-1]) / 100)
        assert row["explained_variance"] is None  # not published
    assert comparison.PUBLISHED_EVAL_TOKENS == 5 * 512 * 128


def test_difference():
    assert comparison.difference(16.5, 16.0) == pytest.approx(0.5)
    assert comparison.difference(0.8, 0.85) == pytest.approx(-0.05)
    assert comparison.difference(0.7, None) is None
    assert comparison.difference(None, 0.7) is None


@pytest.mark.parametrize("model", [SMOLLM2, TINY], ids=["smollm2", "tiny-gpt2"])
def test_published_refused_for_other_models(model):
    d_in = model["n_heads"] * model["d_head"]
    with pytest.raises(UserError) as err:
        comparison.resolve_reference("published", [1], model["source"], model["name"], model["n_layers"], d_in)
    message = str(err.value)
    assert "GPT-2 Small" in message and model["name"] in message and "allowed: auto, published, none" in message
    assert "\n" not in message
    # "auto" skips the comparison instead, and says why
    reference, note = comparison.resolve_reference("auto", [1], model["source"], model["name"], model["n_layers"], d_in)
    assert reference is None and "GPT-2 Small" in note


def test_auto_compares_gpt2_small_with_published():
    reference, note = comparison.resolve_reference("auto", [0, 5], "gpt2", "gpt2", 12, 768)
    assert reference.label == "published" and "published table" in note
    assert reference.get(5, "d_sae") == 49152 and reference.get(5, "explained_variance") is None


def test_none_compares_nothing():
    assert comparison.resolve_reference("none", [0], "gpt2", "gpt2", 12, 768)[0] is None


def test_folder_reference(tmp_path):
    (tmp_path / "L3.json").write_text(json.dumps(metrics_for(3, SMOLLM2, l0=12.0)))
    reference, _ = comparison.resolve_reference(str(tmp_path), [3, 10], "smollm2-135m", SMOLLM2["name"], 30, 576)
    assert reference.get(3, "l0") == 12.0
    assert reference.get(10, "l0") is None
    assert any("L10" in n for n in reference.notes)  # the missing layer is named
    other, _ = comparison.resolve_reference(str(tmp_path), [3], "smollm2-135m", "another model", 30, 576)
    assert any("measured on" in n for n in other.notes)  # a different model is pointed out


def test_folder_reference_errors(tmp_path):
    with pytest.raises(UserError,
                       match=r"report\.compare: '.*nosuch' is not a folder \(allowed: auto, published, none"):
        comparison.folder_reference(tmp_path / "nosuch", [3], "m")
    with pytest.raises(UserError, match=r"holds none of L3\.json, L10\.json"):
        comparison.folder_reference(tmp_path, [3, 10], "m")
    (tmp_path / "L3.json").write_text("{not json")
    with pytest.raises(UserError, match=r"L3\.json: corrupt JSON"):
        comparison.folder_reference(tmp_path, [3], "m")


# ---------------------------------------------------------------------------------------------------
# The report files


def test_report_against_published(tmp_path):
    layers = [2, 5]
    dirs = make_run(tmp_path, GPT2_SMALL,
                    {2: metrics_for(2, GPT2_SMALL, l0=16.5, loss_recovered=0.85, dead_fraction=0.25),
                     5: metrics_for(5, GPT2_SMALL, explained_variance=None)})
    markdown = build(dirs, layers, "auto")
    rows = table_rows(markdown, "layer | d_sae ours")
    header, body = rows[0], rows[2:]
    assert header[:6] == ["layer", "d_sae ours", "d_sae published", "L0 ours", "L0 published", "L0 Δ"]
    assert len(body) == len(layers)
    cells = dict(zip(header, body[0]))
    assert (cells["L0 ours"], cells["L0 published"], cells["L0 Δ"]) == ("16.5", "16.0", "+0.5")
    assert (cells["loss recovered published"], cells["loss recovered Δ"]) == ("0.900", "-0.050")
    assert (cells["dead published"], cells["dead Δ"]) == ("20.0%", "+5.0 pp")
    assert cells["explained var. published"] == "n/a" and cells["explained var. Δ"] == "n/a"
    assert dict(zip(header, body[1]))["d_sae published"] == "49152"
    assert dict(zip(header, body[1]))["explained var. ours"] == "n/a"
    assert "327,680 tokens" in markdown  # the published eval sample, next to ours
    page = (dirs["out"] / "index.html").read_text()
    assert layer_rows(page) == len(layers)
    assert "<script" not in page.lower()
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", page)  # self-contained: every image inline
    assert page.count('src="data:image/png;base64,') == 2


def test_report_provenance(tmp_path):
    dirs = make_run(tmp_path, SMOLLM2, {3: metrics_for(3, SMOLLM2), 10: metrics_for(10, SMOLLM2, eval_tokens=2048)})
    cfg = sae_cfg(d_in=8, d_sae=16, hook_name="blocks.3.attn.hook_z", layer=3, model_name="smollm2-135m",
                  context_size=128, dataset="x", extra={"attnsae": {"trained_tokens": 65536}})
    save_sae(SAE(8, 16), dirs["sae"] / "L3", cfg, torch.zeros(16))
    markdown = build(dirs, [3, 10], "none")
    assert "- model: SmolLM2-135M-Instruct (test)" in markdown
    assert "- data: hf:Skylion007/openwebtext (streamed)" in markdown
    assert "- tokenized train split: 123,456 tokens" in markdown
    assert "- SAE training tokens: L3: 65,536; L10: n/a" in markdown
    assert "- evaluation tokens: L3: 4,096; L10: 2,048" in markdown
    assert re.search(r"- git commit: (\w+|none)", markdown)
    rows = table_rows(markdown, "layer | d_sae")
    assert rows[0] == ["layer", "d_sae", "L0", "loss recovered", "dead", "explained var.", "% alive interpretable"]
    assert [row[-1] for row in rows[2:]] == ["not rated", "not rated"]  # no dashboards, no ratings
    assert "report.compare: none" in markdown


def test_report_draws_the_frontier_when_there_is_one(tmp_path):
    from attnsae.reporting import frontier

    dirs = make_run(tmp_path, SMOLLM2, {3: metrics_for(3, SMOLLM2)})
    assert "No frontier yet" in build(dirs, [3], "none")
    rows = [{"experiment": f"frontier-{a}-{v}", "architecture": a, "setting": s, "value": v, "layer": 3, "l0": l0,
             "ce_increase": 0.02, "ce_increase_se": 0.001, "loss_recovered": 0.9, "loss_recovered_se": 0.01,
             "dead_fraction": 0.05}
            for a, s, v, l0 in (("standard", "l1_coeff", 0.8, 22.0), ("topk", "k", 20, 20.0))]
    (dirs["out"] / "frontier.csv").write_text(frontier.frontier_csv(rows))
    markdown = build(dirs, [3], "none")
    assert ("## Frontier" in markdown
            and "| 3 | topk | k 20 | 20.0 | 0.0200 ± 0.0010 | 0.900 ± 0.010 | 5.0% |" in markdown)
    page = (dirs["out"] / "index.html").read_text()
    assert 'alt="frontier: L0 against CE increase and loss recovered per layer"' in page


def test_report_shows_standard_errors_and_the_heldout_source(tmp_path):
    ours = {3: metrics_for(3, SMOLLM2, l0=16.0, l0_se=0.25, loss_recovered=0.8, loss_recovered_se=0.012,
                           ce_increase=0.05, ce_increase_se=0.004),
            10: metrics_for(10, SMOLLM2)}  # written before evaluate made standard errors
    dirs = make_run(tmp_path, SMOLLM2, ours)
    meta = json.loads((dirs["tokens"] / "meta.json").read_text())
    meta |= {"heldout_sources": ["npm:brown"], "balanced_train_rows": 900,
             "source_tokens": {"train": {"npm:sotu": 61728, "npm:factbook": 61728}}}
    (dirs["tokens"] / "meta.json").write_text(json.dumps(meta))
    heldout = tmp_path / "heldout"
    heldout.mkdir()
    (heldout / "L3.json").write_text(json.dumps({**metrics_for(3, SMOLLM2, l0=20.0, l0_se=0.5, loss_recovered=0.6,
                                                               ce_increase=0.09), "split": "heldout",
                                                 "sources": ["npm:brown"], "eval_tokens": 2048}))
    (heldout / "L10.json").write_text(json.dumps({"layer": 10, "split": "heldout", "sources": []}))
    written = report.build_report([3, 10], dirs["out"], "none", metrics_dir=dirs["metrics"], heldout_dir=heldout,
                                  density_dir=dirs["density"], model_dir=dirs["model"], tokens_dir=dirs["tokens"],
                                  sae_root=dirs["sae"], dashboards_root=dirs["dashboards"], labels_root=dirs["labels"])
    rows = table_rows(written.markdown, "layer | d_sae")
    cells = dict(zip(rows[0], rows[2]))
    assert cells["L0"] == "16.0 ± 0.2" and cells["loss recovered"] == "0.800 ± 0.012"
    assert dict(zip(rows[0], rows[3]))["L0"] == "20.0"  # no standard error in the file, none shown
    heldout_rows = table_rows(written.markdown, "layer | L0 in-dist")
    assert heldout_rows[0] == ["layer", "L0 in-dist", "L0 held-out", "CE increase (nats) in-dist",
                               "CE increase (nats) held-out", "loss recovered in-dist", "loss recovered held-out",
                               "L0 held-out / in-dist"]
    assert heldout_rows[2] == ["3", "16.0 ± 0.2", "20.0 ± 0.5", "0.0500 ± 0.0040", "0.0900", "0.800 ± 0.012",
                               "0.600", "1.25x"]
    assert heldout_rows[3][2] == "n/a" and heldout_rows[3][-1] == "n/a"
    assert "- held-out source: npm:brown (no SAE trained on it)" in written.markdown
    assert "- held-out evaluation tokens: L3: 2,048; L10: n/a" in written.markdown
    assert ("- train mixture: npm:sotu 50%, npm:factbook 50% of all its rows; its first 900 rows hold each source in "
            "its weighted share") in written.markdown
    assert written.per_layer[0]["heldout/l0"] == 20.0 and "heldout/l0" not in written.per_layer[1]
    page = (dirs["out"] / "index.html").read_text()
    assert '<table id="heldout">' in page and "20.0 ± 0.5" in page


def write_dashboard(dirs: dict[str, Path], layer: int, tags: list[list[str]], first_alive: list[int],
                    listed: list[int], fields: dict | None = None, sample: tuple[int, ...] = ()) -> str:
    """A layer's features.json with what the report reads (tags per feature, the cards and why they have one, the
    rating sets: the first alive features and a random ``sample``)."""
    scores = {tag: [round(0.5 + f / 100, 2) for f in range(len(tags))] for tag in ("induction", "previous_token")}
    doc = {"format": "attnsae-dashboards", "version": 2, "layer": layer, **(fields or {}),
           "tag_definitions": {"induction": {}, "previous_token": {}},
           "summary": {"tags": tags, "scores": scores},
           "families": families_of(tags, scores),
           "rating_sets": {"first_n": {"rule": "first", "features": first_alive},
                           "random": {"rule": "random", "features": list(sample)}},
           "cards": [{"feature": f, "reason": "first_n"} for f in first_alive] +
                    [{"feature": f, "reason": "listed"} for f in listed] +
                    [{"feature": f, "reason": "random"} for f in sample if f not in first_alive]}
    doc["content_hash"] = content_hash(doc)
    path = dirs["dashboards"] / f"L{layer}" / "features.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(doc))
    return doc["content_hash"]


@pytest.mark.parametrize(("changes", "expected"), [
    ({"layer": 10}, "holds the dashboards of layer 10, not of layer 3 (copied from another layer?)"),
    ({"sae": "models/sae/L10"}, "holds the dashboards of the SAE 'models/sae/L10', not of models/sae/L3"),
])
def test_a_features_json_of_another_layer_or_sae_is_refused(tmp_path, changes, expected):
    """Measured: L10's features.json copied into L3's folder put L10's tag counts in L3's row."""
    dirs = make_run(tmp_path, SMOLLM2, {3: {**metrics_for(3, SMOLLM2), "sae": "models/sae/L3"}})
    write_dashboard(dirs, 3, [[]], first_alive=[0], listed=[], fields={"sae": "models/sae/L3", **changes})
    with pytest.raises(UserError) as err:
        build(dirs, [3], "none")
    assert str(err.value) == (f"{dirs['dashboards'] / 'L3' / 'features.json'}: {expected}; "
                              "re-run `attnsae dashboards --layer 3`")
    assert not (dirs["out"] / "report.md").exists()


@pytest.mark.parametrize("kind", ["metrics", "heldout"])
def test_metrics_of_another_layer_are_refused(tmp_path, kind):
    dirs = make_run(tmp_path, SMOLLM2,
                    {3: metrics_for(10, SMOLLM2)} if kind == "metrics" else {3: metrics_for(3, SMOLLM2)})
    heldout = tmp_path / "heldout"
    heldout.mkdir()
    (heldout / "L3.json").write_text(json.dumps({**metrics_for(10 if kind == "heldout" else 3, SMOLLM2),
                                                 "split": "heldout", "sources": ["npm:brown"]}))
    with pytest.raises(UserError, match=r"L3\.json: holds the metrics of layer 10, not of layer 3 "
                                        r"\(copied from another layer\?\)"):
        report.build_report([3], dirs["out"], "none", metrics_dir=dirs["metrics"], heldout_dir=heldout,
                            density_dir=dirs["density"], model_dir=dirs["model"], tokens_dir=dirs["tokens"],
                            sae_root=dirs["sae"], dashboards_root=dirs["dashboards"], labels_root=dirs["labels"])


def test_interpretable_column_counts_only_peoples_ratings_of_the_first_alive(tmp_path):
    dirs = make_run(tmp_path, SMOLLM2, {3: metrics_for(3, SMOLLM2), 10: metrics_for(10, SMOLLM2)})
    tags = [["induction"], [], ["induction", "previous_token"], ["previous_token"], []]
    page = write_dashboard(dirs, 3, tags, first_alive=[0, 2, 3], listed=[4])
    write_dashboard(dirs, 10, tags, first_alive=[0, 1], listed=[])
    ratings = [{"feature": f, "answer": a, "family": "", "note": "", "date": "2026-11-30"}
               for f, a in ((0, "yes"), (2, "no"), (3, "unsure"), (4, "yes"))]  # 4 has a card but is not first_n
    exported = tmp_path / "labels-L3.json"
    exported.write_text(json.dumps({"format": "attnsae-labels", "version": 1, "layer": 3, "content_hash": page,
                                    "rater": "ada", "ratings": ratings}))
    import_labels(exported, dirs["dashboards"], dirs["labels"])
    markdown = build(dirs, [3, 10], "none")
    rows = table_rows(markdown, "layer | d_sae")
    assert [row[-1] for row in rows[2:]] == ["33% (1/3 rated)", "not rated"]  # unsure is rated, not yes
    tag_rows = table_rows(markdown, "layer | induction")
    assert tag_rows[0] == ["layer", "induction", "previous_token", "untagged"]
    assert tag_rows[2] == ["3", "2", "2", "2"] and tag_rows[3] == ["10", "2", "2", "2"]
    # each family's best feature (scores 0.50 + f / 100): induction on 0 and 2, previous_token on 2 and 3
    family_rows = re.findall(r"\| layer \| induction \| previous_token \|\n.*\n(.*)\n(.*)", markdown)
    assert family_rows == [("| 3 | 2 (0.52) | 3 (0.53) |", "| 10 | 2 (0.52) | 3 (0.53) |")]
    page_html = (dirs["out"] / "index.html").read_text()
    assert 'href="../dashboards/L3/index.html"' in page_html and 'href="../dashboards/L10/index.html"' in page_html


def test_ratings_of_the_random_sample_and_the_raters_agreement(tmp_path):
    """Two raters on the first alive features and on a random sample: each set's yes / rated, and Cohen's kappa over
    the features both rated. By hand: first alive, observed 3/4, chance 0.5 * 0.25 + 0.5 * 0.75 = 0.5, kappa
    (0.75 - 0.5) / 0.5 = 0.5; sample (1, 7, 9 shared), observed 1/3, chance 1 * 1/3 = 1/3, kappa 0: no better than
    chance although they agree on one feature in three."""
    dirs = make_run(tmp_path, SMOLLM2, {3: metrics_for(3, SMOLLM2)})
    tags = [[] for _ in range(12)]
    page = write_dashboard(dirs, 3, tags, first_alive=[0, 1, 2, 3], listed=[], sample=(1, 7, 9, 11))
    answers = {"ada": {0: "yes", 1: "yes", 2: "no", 3: "no", 7: "yes", 9: "yes", 11: "no"},
               "bo": {0: "yes", 1: "no", 2: "no", 3: "no", 7: "yes", 9: "no"}}
    for rater, given in answers.items():
        exported = tmp_path / f"labels-{rater}.json"
        exported.write_text(json.dumps({"format": "attnsae-labels", "version": 1, "layer": 3, "content_hash": page,
                                        "rater": rater, "ratings": [
                                            {"feature": f, "answer": a, "family": "", "note": "", "date": "2026-12-07"}
                                            for f, a in given.items()]}))
        import_labels(exported, dirs["dashboards"], dirs["labels"])
    rows = table_rows(build(dirs, [3], "none"), "layer | first alive")
    assert rows[2] == ["3", "38% (3/8 rated) of 4", "κ 0.50 (2 raters, 4 shared answers)",
                       "57% (4/7 rated) of 4", "κ 0.00 (2 raters, 3 shared answers)"]


def test_report_refuses_published_for_smollm2(tmp_path):
    dirs = make_run(tmp_path, SMOLLM2, {3: metrics_for(3, SMOLLM2)})
    with pytest.raises(UserError, match="GPT-2 Small"):
        build(dirs, [3], "published")
    assert not (dirs["out"] / "index.html").exists()


def test_report_from_committed_quickstart_metrics(tmp_path):
    """The committed quickstart outputs render, compared with themselves as an 'earlier run'."""
    layers = sorted(int(p.stem[1:]) for p in (REPO / "reports/metrics").glob("L*.json"))
    dirs = make_run(tmp_path, SMOLLM2, {})
    shutil.copytree(REPO / "reports/metrics", dirs["metrics"], dirs_exist_ok=True)
    shutil.copytree(REPO / "reports/density", dirs["density"], dirs_exist_ok=True)
    model = json.loads((dirs["metrics"] / f"L{layers[0]}.json").read_text())["model"]
    (dirs["model"] / "attnsae_model.json").write_text(json.dumps({**SMOLLM2, "name": model, "vocab_size": 1,
                                                                  "bos_token_id": 0, "sha256": {}}))
    markdown = build(dirs, layers, str(dirs["metrics"]))
    body = table_rows(markdown, "layer | d_sae ours")[2:]
    assert [row[0] for row in body] == [str(n) for n in layers]
    assert all(row[5] == "+0.0" for row in body)  # L0 Δ against itself
    assert layer_rows((dirs["out"] / "index.html").read_text()) == len(layers)


def run_report_cli(tmp_path, monkeypatch, compare):
    """`attnsae report` in a folder laid out like the repository, with report.compare set."""
    dirs = make_run(tmp_path / "run", SMOLLM2, {3: metrics_for(3, SMOLLM2)})
    for name, target in (("model", "models/base"), ("tokens", "data/tokens"), ("metrics", "reports/metrics"),
                         ("density", "reports/density")):
        shutil.copytree(dirs[name], tmp_path / target)
    params = yaml.safe_load((REPO / "profiles/quickstart.yaml").read_text())
    params.update(layers=[3], per_layer={"L3": {}}, report={"compare": compare})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    return CliRunner().invoke(main, ["report"])


def test_cli_report_reads_report_section(tmp_path, monkeypatch):
    result = run_report_cli(tmp_path, monkeypatch, "none")
    assert result.exit_code == 0, result.output
    assert "report.compare: none" in (tmp_path / "reports/report.md").read_text()


@pytest.mark.parametrize(("compare", "fragment"), [("published", "GPT-2 Small"), ("", "report.compare"),
                                                   ("no/such/dir", "'no/such/dir' is not a folder")])
def test_cli_report_bad_compare_is_one_line(tmp_path, monkeypatch, compare, fragment):
    result = run_report_cli(tmp_path, monkeypatch, compare)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0], result.output


def test_cli_report_out_naming_a_file_is_one_line_and_keeps_the_file(tmp_path):
    """--out is the report's folder: a file there (say reports/report.md) is named in one line, not overwritten."""
    existing = tmp_path / "report.md"
    existing.write_text("kept\n")
    result = CliRunner().invoke(main, ["report", "--out", str(existing), "--no-mlflow"])
    assert result.exit_code == 1
    assert result.output == (f"Error: --out {existing}: a file; --out names the folder that receives report.md, "
                             "index.html and layers.csv (default reports)\n")
    assert existing.read_text() == "kept\n"


# ---------------------------------------------------------------------------------------------------
# Model cards and the publish stage


def small_sae(folder: Path, source: str = "smollm2-135m", dataset: str = "npm:sotu (233 docs)") -> dict:
    cfg = sae_cfg(d_in=8, d_sae=16, hook_name="blocks.3.attn.hook_z", layer=3, model_name=source, context_size=128,
                  dataset=dataset, extra={"attnsae": {"train": {"l1_coeff": 0.4}, "trained_tokens": 65536}})
    save_sae(SAE(8, 16, generator=torch.Generator().manual_seed(0)), folder, cfg, torch.linspace(-5, 0, 16))
    return cfg


def front_matter(card: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", card, flags=re.DOTALL)
    assert match, card[:200]
    return yaml.safe_load(match.group(1))


def test_card_front_matter_from_metrics(tmp_path):
    cfg = small_sae(tmp_path / "sae")
    metrics = metrics_for(3, SMOLLM2, d_sae=16, l0=15.168701171875, loss_recovered=1.0519805585282722)
    card = publish.card_text(cfg, metrics)
    front = front_matter(card)
    for key in ("license", "library_name", "base_model", "datasets", "tags", "model-index"):
        assert key in front, key
    assert front["license"] == "apache-2.0" and front["library_name"] == "saelens"
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert front["datasets"] == []  # npm text has no hub id
    results = front["model-index"][0]["results"][0]
    values = {m["type"]: m["value"] for m in results["metrics"]}
    for key, mtype, _, _ in publish.CARD_METRICS:
        assert values[mtype] == pytest.approx(metrics[key], abs=1e-6), key
    assert "4,096 tokens" in results["dataset"]["name"]
    assert "| Loss recovered | 1.052 |" in card and "| Dead features | 25.0% (over 4,096 tokens) |" in card
    assert "d_in 8, d_sae 16" in card and "training: standard, L1 coefficient 0.4; 65,536 tokens" in card
    assert "architecture: `f = ReLU(pre)`, with" in card
    assert 'SAE.load_from_disk("path/to/this/folder"' in card and "load_sae(" in card


def test_card_names_the_architecture_and_its_sparsity_setting(tmp_path):
    cfg = sae_cfg(d_in=8, d_sae=16, hook_name="blocks.3.attn.hook_z", layer=3, model_name="smollm2-135m",
                  context_size=128, dataset="d", kind="topk", k=4,
                  extra={"attnsae": {"train": {"architecture": "topk", "k": 4}, "trained_tokens": 1024}})
    card = publish.card_text(cfg, metrics_for(3, SMOLLM2, d_sae=16, l0=4.0, loss_recovered=0.9))
    assert "on each token's 4 largest pre-activations, 0 elsewhere (SAELens `topk`, k = 4)" in card
    assert "training: topk, k 4; 1,024 tokens" in card
    jumprelu = {**cfg, "architecture": "jumprelu", "attnsae": {"train": {"architecture": "batchtopk", "k": 4}}}
    card = publish.card_text(jumprelu, metrics_for(3, SMOLLM2, d_sae=16, l0=4.0, loss_recovered=0.9))
    assert "`f = ReLU(pre) * (pre > threshold)`, one threshold per feature" in card
    assert "training: batchtopk, k 4; n/a tokens" in card


def test_card_other_sources():
    for dataset in ("hf:Skylion007/openwebtext@abc (streamed)", "Skylion007/openwebtext"):
        gpt2 = publish.card_metadata({"model_name": "gpt2", "hook_name": "h", "dataset_path": dataset},
                                     metrics_for(3, GPT2_SMALL))
        assert gpt2["base_model"] == "openai-community/gpt2" and gpt2["datasets"] == ["Skylion007/openwebtext"]
        assert gpt2["model-index"][0]["results"][0]["dataset"]["type"] == "Skylion007/openwebtext"
    tiny = publish.card_metadata({"model_name": "tiny-gpt2", "hook_name": "h", "dataset_path": "synthetic"},
                                 metrics_for(1, TINY, explained_variance=None))
    assert "base_model" not in tiny  # random weights: no hub model to name
    assert "explained_variance" not in {m["type"] for m in tiny["model-index"][0]["results"][0]["metrics"]}


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_publish_layer(tmp_path):
    small_sae(tmp_path / "sae")
    (tmp_path / "L3.json").write_text(json.dumps(metrics_for(3, SMOLLM2, d_sae=16)))
    before = digest(tmp_path / "sae")
    card = publish.publish_layer(tmp_path / "sae", tmp_path / "L3.json", tmp_path / "published" / "L3")
    out = tmp_path / "published" / "L3"
    assert card == out / "README.md" and card.is_file()
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "cfg.json", "sae_weights.safetensors", "sparsity.safetensors"]
    original, _ = load_sae(tmp_path / "sae")
    copy, cfg = load_sae(out)
    assert torch.equal(original.W_enc, copy.W_enc) and cfg["hook_name"] == "blocks.3.attn.hook_z"
    assert digest(tmp_path / "sae") == before  # the train stage's folder is left as it was
    assert front_matter(card.read_text())["library_name"] == "saelens"


def test_publish_layer_refuses_mismatched_metrics(tmp_path):
    small_sae(tmp_path / "sae")
    (tmp_path / "L10.json").write_text(json.dumps(metrics_for(10, SMOLLM2, d_sae=16)))
    with pytest.raises(UserError, match=r"blocks\.10\.attn\.hook_z.*blocks\.3\.attn\.hook_z"):
        publish.publish_layer(tmp_path / "sae", tmp_path / "L10.json", tmp_path / "out")
    with pytest.raises(UserError, match="missing"):
        publish.publish_layer(tmp_path / "sae", tmp_path / "absent.json", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_publish_layer_refuses_imported_weights(tmp_path):
    cfg = small_sae(tmp_path / "sae")
    cfg["metadata"]["attnsae"] = {"imported": {"repo": "ckkissane/attn-saes-gpt2-small-all-layers"}}
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg))
    (tmp_path / "L3.json").write_text(json.dumps(metrics_for(3, SMOLLM2, d_sae=16)))
    with pytest.raises(UserError, match=r"imported weights \(ckkissane/attn-saes-gpt2-small-all-layers\)"):
        publish.publish_layer(tmp_path / "sae", tmp_path / "L3.json", tmp_path / "out")


def test_publish_layer_failure_keeps_old_folder(tmp_path, monkeypatch):
    small_sae(tmp_path / "sae")
    (tmp_path / "L3.json").write_text(json.dumps(metrics_for(3, SMOLLM2, d_sae=16)))
    out = tmp_path / "published"
    publish.publish_layer(tmp_path / "sae", tmp_path / "L3.json", out)
    before = digest(out)
    calls = []
    real_copy = shutil.copyfile

    def failing_copy(src, dst):
        calls.append(src)
        if len(calls) == 2:  # the second file of three: the new folder is half-written
            raise OSError("disk full")
        return real_copy(src, dst)

    monkeypatch.setattr(publish.shutil, "copyfile", failing_copy)
    with pytest.raises(OSError):
        publish.publish_layer(tmp_path / "sae", tmp_path / "L3.json", out)
    assert digest(out) == before  # the earlier folder, whole
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".published")] == []  # no temp left


def test_cli_publish(tmp_path, monkeypatch):
    small_sae(tmp_path / "models/sae/L3")
    (tmp_path / "reports/metrics").mkdir(parents=True)
    (tmp_path / "reports/metrics/L3.json").write_text(json.dumps(metrics_for(3, SMOLLM2, d_sae=16)))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["publish", "--layer", "L3"])
    assert result.exit_code == 0, result.output
    load_sae(tmp_path / "models/published/L3")
    assert (tmp_path / "models/published/L3/README.md").is_file()
    missing = CliRunner().invoke(main, ["publish", "--layer", "7"])
    assert missing.exit_code == 1 and len(missing.output.strip().splitlines()) == 1
    assert "models/sae/L7" in missing.output


def test_layer_table_has_one_row_per_layer_and_numeric_columns():
    table = report.layer_table_csv([
        {"layer": 1, "model": "m", "l0": 3.5, "loss_recovered": 0.9, "flag": True},
        {"layer": 2, "model": "m", "l0": 7.0, "loss_recovered": 0.8, "mse": 1.0},
    ])
    rows = list(csv.DictReader(io.StringIO(table)))
    assert list(rows[0]) == ["layer", "l0", "loss_recovered", "mse"]
    assert [(r["layer"], float(r["l0"]), r["mse"]) for r in rows] == [("1", 3.5, ""), ("2", 7.0, "1.0")]


def markdown_tables(text: str) -> list[str]:
    """Each run of consecutive lines that start with '|', joined: the markdown tables of ``text``."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append("\n".join(current))
            current = []
    return tables


def test_readme_quickstart_tables_are_copies_of_the_committed_report():
    """The README's quickstart numbers come from reports/report.md (which dvc.lock records), table for table."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- QUICKSTART-RESULTS -->")[1].split("<!-- /QUICKSTART-RESULTS -->")[0]
    report_md = (REPO / "reports" / "report.md").read_text()
    tables = markdown_tables(block)
    assert len(tables) >= 3
    for table in tables:
        assert table in report_md, table.splitlines()[0]
