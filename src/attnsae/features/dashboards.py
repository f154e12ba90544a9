"""The `dashboards@L` stage: a page per layer to look at an SAE's features and rate them, and every number behind it.

Reads ``models/base``, ``data/tokens`` (the held-out evaluation split, which no SAE trained on) and an SAE folder;
writes ``reports/dashboards/L<n>/`` (imported SAEs: ``reports/imported/dashboards/L<n>/``) holding
``features.json`` (every number the page shows; format: formats/features.py and docs/features-json.md; read back with
``read_features``) and ``index.html`` (pages.py), a static page that works from file:// with no server
and no network. Every path: layout.py.

How the numbers are made, in one pass over the dashboard tokens:
- each batch of rows runs the model up to layer L (``attribution.capture_layer``: z, attention pattern, values)
  and the SAE's encoder; every nonzero activation is kept as a (row, position, feature, value) triple. Top
  examples, interval samples, densities and histograms are then exact, from those triples sorted by feature,
  with no dense tokens x d_sae matrix. Memory: 16 bytes per nonzero activation, i.e. 16 x L0 x tokens
  (L0 20 over 1M tokens: 320 MB), plus one batch's activations (batch tokens x d_sae x 4 bytes) and the
  family statistics' working set (families.py);
- the same batch feeds the corpus family statistics (families.CorpusFamilyStats), for the SAE and for the
  null encoder of random directions behind every tag's percentile;
- the pass keeps each batch's layer tensors (``BatchCaptures``) while all of them fit in ``CAPTURE_BUDGET_BYTES``
  (the quickstart's 256 rows: ~300 MB), for the direct feature attribution (DFA, attribution.py) of every shown
  example at its own token; beyond that, the batches holding a shown example run again, with the same rows, so
  the numbers are the same either way.
- "alive": fired at least once on the first ``evaluate.max_rows`` evaluation rows, the tokens and the rule of
  evaluate's ``dead_fraction``. Cards: the first ``dashboards.first_n`` alive features by id, as the post rated,
  ``dashboards.random_n`` alive features drawn at random (a rating sample apart from index order), those in
  ``dashboards.features``, and each family's best feature (the families section ranks every tag's features).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from attnsae.config import DashboardsConfig
from attnsae.data.activations import rows_as_tensor
from attnsae.data.models import hook_z_name, load_bridge, load_tokenizer, resolve_device
from attnsae.data.tokenization import load_rows
from attnsae.errors import UserError
from attnsae.evaluation.evaluate import load_sae_for_model
from attnsae.features import attribution, families
from attnsae.features.pages import render_layer_page
from attnsae.files import atomic_dir
from attnsae.formats.features import (
    FEATURES_FILE,
    FORMAT,
    VERSION,
    content_hash,
    families_of,
    features_json_text,
    rounded,
    tag_counts,
)
from attnsae.sae.autoencoder import SAE

PAGE_FILE = "index.html"
RANDOM_SAMPLE_STREAM = 2**40  # the random rating sample: [seed, this]; the intervals draw from [seed, feature]
WINDOW_BEFORE, WINDOW_AFTER = 16, 4  # tokens shown around an example's own token

LOGIT_DEFINITION = (
    "The direct effect of one unit of the feature on the next-token logits: its decoder row, written by each head "
    "through W_O (sum_h W_dec[f,h] W_O^h) and the norm the block applies to the attention output where it has one, "
    "through the final norm as the model applies it (LayerNorm centres, then multiplies by its weight; RMSNorm "
    "multiplies by its gain, Gemma's 1 + w; per-token scales are left out, which keeps the ranking exact) and the "
    "unembedding W_U, before any final logit soft-capping."
)
DFA_DEFINITION = (
    "Direct feature attribution at an example's own token d: DFA[s,h] = A^h[d,s] (v^h[s] . W_enc^h[:,f]), the part "
    "of the feature's pre-activation that head h moves from source position s. Summed over s and h it is "
    "(x - b_dec) . W_enc[:,f] + b_dec . W_enc[:,f], so pre-activation = sum DFA + bias remainder, where the "
    "bias remainder b_enc[f] - b_dec . W_enc[:,f] is what no source position explains."
)


TAG_RULE = (
    "A feature gets a tag when its score reaches the tag's threshold and its percentile against the null baseline "
    "reaches the null percentile; a feature that never fires on the dashboard tokens gets no tags (its scores are "
    "still listed): there is nothing on this page to check a tag against."
)


@dataclass
class Firings:
    """Every nonzero activation of the pass, sorted by feature and, within a feature, by descending value."""

    rows: np.ndarray  # int32
    positions: np.ndarray  # int32
    features: np.ndarray  # int32
    values: np.ndarray  # float32
    offsets: np.ndarray  # [d_sae + 1]: feature f's firings are [offsets[f], offsets[f+1])

    @classmethod
    def from_parts(cls, parts: list[tuple[np.ndarray, ...]], d_sae: int) -> Firings:
        rows, positions, features, values = (np.concatenate([p[i] for p in parts]) for i in range(4))
        order = np.lexsort((-values, features))
        counts = np.bincount(features, minlength=d_sae)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        return cls(rows[order], positions[order], features[order], values[order], offsets)

    def of(self, feature: int) -> slice:
        return slice(int(self.offsets[feature]), int(self.offsets[feature + 1]))

    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    def max_values(self) -> np.ndarray:
        maxima = np.zeros(len(self.offsets) - 1, dtype=np.float32)
        fired = self.counts() > 0
        maxima[fired] = self.values[self.offsets[:-1][fired]]  # the first of each feature's firings is its largest
        return maxima


CAPTURE_BUDGET_BYTES = 1 << 30


class BatchCaptures:
    """The scan's layer tensors by batch (its first row), all kept when all fit in ``CAPTURE_BUDGET_BYTES`` and
    none otherwise; a batch not kept is captured again from the same rows."""

    def __init__(self, n_rows: int, batch_rows: int) -> None:
        self.n_rows, self.batch_rows = n_rows, batch_rows
        self.kept: dict[int, attribution.LayerTensors] = {}
        self.keeping: bool | None = None  # decided on the first batch

    def offer(self, start: int, t: attribution.LayerTensors) -> None:
        if self.keeping is None:
            per_row = sum(x.element_size() * x.numel() for x in (t.tokens, t.z, t.pattern, t.v)) / len(t.tokens)
            self.keeping = per_row * self.n_rows <= CAPTURE_BUDGET_BYTES
        if self.keeping:
            self.kept[start] = t

    def batch_start(self, row: int) -> int:
        return row - row % self.batch_rows

    def get(self, bridge, rows: np.ndarray, start: int, layer: int, device: torch.device) -> attribution.LayerTensors:
        if start in self.kept:
            return self.kept[start]
        return attribution.capture_layer(bridge, rows_as_tensor(rows[start : start + self.batch_rows], device), layer)


@dataclass
class Scan:
    """What the one pass over the dashboard tokens leaves behind."""

    firings: Firings
    fired_on_alive_tokens: np.ndarray  # bool [d_sae]
    stats: families.CorpusFamilyStats
    null: SAE
    null_stats: families.CorpusFamilyStats
    captures: BatchCaptures


@torch.inference_mode()
def scan(bridge, sae: SAE, layer: int, rows: np.ndarray, alive_rows: int, cfg: DashboardsConfig,
         device: torch.device, make_null=families.null_encoder) -> Scan:
    n_heads = bridge.cfg.n_heads
    stats = families.CorpusFamilyStats(sae, n_heads)
    null = null_stats = None
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    parts = []
    captures = BatchCaptures(len(rows), cfg.batch_rows)
    for start in range(0, len(rows), cfg.batch_rows):
        tokens = rows_as_tensor(rows[start : start + cfg.batch_rows], device)
        t = attribution.capture_layer(bridge, tokens, layer)
        captures.offer(start, t)
        batch, positions = tokens.shape
        acts = sae.encode(t.x).view(batch, positions, -1)
        b, s, f = acts.nonzero(as_tuple=True)
        parts.append(((b + start).int().cpu().numpy(), s.int().cpu().numpy(), f.int().cpu().numpy(),
                      acts[b, s, f].float().cpu().numpy()))
        if start < alive_rows:
            fired |= (acts[: alive_rows - start] > 0).flatten(0, 1).any(0).cpu()
        if null is None:  # the null is made as sparse as the features on the first batch
            null = make_null(sae, cfg.null_directions, cfg.seed, first_batch=t.x)
            null_stats = families.CorpusFamilyStats(null, n_heads)
        stats.add(t, acts)
        null_stats.add(t, null.encode(t.x).view(batch, positions, -1))
    return Scan(Firings.from_parts(parts, sae.d_sae), fired.numpy(), stats, null, null_stats, captures)


def document_ids(rows: np.ndarray, bos: int) -> np.ndarray:
    """The document of every token, [rows, positions]: rows are cut from one stream doc0 [BOS] doc1 [BOS] ...
    that starts a document at its first token; each row's position 0 is a BOS added to the row, not a separator."""
    separators = rows == bos
    separators[:, 0] = False
    return np.cumsum(separators.ravel()).reshape(rows.shape)


def rating_sets(alive: np.ndarray, first_n: int, random_n: int, seed: int) -> dict[str, list[int]]:
    """The features people rate: the first ``first_n`` alive ones (as the post rated) and ``random_n`` alive ones
    drawn at random with ``seed`` (a sample that does not depend on index order), each sorted."""
    alive_ids = np.flatnonzero(alive)
    drawn = np.random.default_rng([seed, RANDOM_SAMPLE_STREAM]).choice(
        alive_ids, size=min(random_n, len(alive_ids)), replace=False)
    return {"first_n": [int(f) for f in alive_ids[:first_n]], "random": sorted(int(f) for f in drawn)}


def card_features(rated: dict[str, list[int]], listed: list[int], d_sae: int,
                  best: dict[str, int | None] | None = None) -> list[tuple[int, str]]:
    """(feature, why it has a card), in feature order: the rating sets' features (``rating_sets``: "first_n",
    "random"), those listed, and each family's best feature (``best``: tag -> feature) as "best <tag>" (the first
    reason a feature has wins)."""
    for f in listed:
        if f >= d_sae:
            raise UserError(f"dashboards.features: feature {f} is not in this SAE (ids 0..{d_sae - 1})")
    chosen = {f: "first_n" for f in rated["first_n"]}
    for f in listed:
        chosen.setdefault(f, "listed")
    for f in rated["random"]:
        chosen.setdefault(f, "random")
    for tag, f in (best or {}).items():
        if f is not None:
            chosen.setdefault(f, f"best {tag}")
    return sorted(chosen.items())


def interval_bins(values: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Equal-width bins over (0, max] of one feature's firing values: (edges [n_bins+1], bin of each value)."""
    edges = np.linspace(0.0, float(values.max()), n_bins + 1)
    return edges, np.clip(np.searchsorted(edges, values, side="left") - 1, 0, n_bins - 1)


@dataclass(frozen=True)
class ExampleRef:
    row: int
    position: int
    feature: int
    activation: float


def choose_examples(firings: Firings, feature: int, cfg: DashboardsConfig) -> tuple[list[ExampleRef], list[dict]]:
    """A card's top examples and its intervals, each with random examples drawn from it (seeded by feature)."""
    span = firings.of(feature)
    rows, positions, values = firings.rows[span], firings.positions[span], firings.values[span]

    def ref(i: int) -> ExampleRef:
        return ExampleRef(int(rows[i]), int(positions[i]), feature, float(values[i]))

    top = [ref(i) for i in range(min(cfg.top_k, len(values)))]
    if len(values) == 0:
        return top, []
    edges, bins = interval_bins(values, cfg.intervals)
    rng = np.random.default_rng([cfg.seed, feature])
    intervals = []
    for k in range(cfg.intervals):
        members = np.flatnonzero(bins == k)
        drawn = rng.choice(members, size=min(cfg.interval_examples, len(members)), replace=False)
        intervals.append({"low": edges[k], "high": edges[k + 1], "firing_tokens": int(len(members)),
                          "share": len(members) / len(values), "examples": [ref(int(i)) for i in sorted(drawn)]})
    return top, intervals


@torch.inference_mode()
def attribute_examples(bridge, sae: SAE, layer: int, rows: np.ndarray, refs: list[ExampleRef], captures: BatchCaptures,
                       device: torch.device) -> dict[ExampleRef, dict]:
    """For each example: its window's activations and its DFA by source and by head, from the scan's layer tensors
    of its batch."""
    n_heads = bridge.cfg.n_heads
    w_heads = attribution.encoder_by_head(sae, n_heads)
    bias = attribution.bias_terms(sae)
    by_batch: dict[int, list[ExampleRef]] = {}
    for r in refs:
        by_batch.setdefault(captures.batch_start(r.row), []).append(r)
    out: dict[ExampleRef, dict] = {}
    for start, todo in sorted(by_batch.items()):
        t = captures.get(bridge, rows, start, layer, device)
        batch, positions = t.tokens.shape
        pre = attribution.pre_activations(sae, t.x).view(batch, positions, -1)
        acts = sae.activation(pre)  # the SAE's own activation function (ReLU, TopK or JumpReLU)
        b = torch.tensor([r.row - start for r in todo], device=device)
        d = torch.tensor([r.position for r in todo], device=device)
        f = torch.tensor([r.feature for r in todo], device=device)
        contributions = attribution.dfa(t, w_heads, b, d, f).cpu()  # [N, S, H]
        for n, r in enumerate(todo):
            lo, hi = max(0, r.position - WINDOW_BEFORE), min(positions, r.position + WINDOW_AFTER + 1)
            by_source = contributions[n, : r.position + 1].sum(-1)
            out[r] = {
                "start": lo,
                "activations": acts[b[n], lo:hi, r.feature].tolist(),
                "by_source": by_source.tolist(),
                "by_head": contributions[n].sum(0).tolist(),
                "total": float(by_source.sum()),
                "bias_remainder": float(bias[r.feature]),
                "pre_activation": float(pre[b[n], r.position, r.feature]),
            }
    return out


def logit_tables(bridge, sae: SAE, layer: int, features: list[int], n_tokens: int, token_text,
                 bins: int) -> dict[int, dict]:
    """Per feature: its ``n_tokens`` most positive and most negative logit effects, and a ``bins``-bin histogram of
    its effect on every token of the vocabulary (equal-width bins from the smallest effect to the largest)."""
    if not features:
        return {}
    index = torch.tensor(features, device=sae.W_dec.device)
    effects = attribution.logit_effects(bridge, attribution.residual_directions(bridge, sae, layer, index)).cpu()
    top, bottom = effects.topk(n_tokens, dim=-1), effects.topk(n_tokens, dim=-1, largest=False)

    def entries(values, ids):
        return [{"token": token_text(int(i)), "id": int(i), "value": float(v)} for v, i in zip(values, ids)]

    def histogram(row: torch.Tensor) -> dict:
        counts, edges = np.histogram(row.double().numpy(), bins=bins)
        return {"bin_edges": edges.tolist(), "counts": counts.tolist()}

    return {f: {"top": entries(top.values[k], top.indices[k]), "bottom": entries(bottom.values[k], bottom.indices[k]),
                "histogram": histogram(effects[k])}
            for k, f in enumerate(features)}


def example_entry(ref: ExampleRef, attributed: dict, row_tokens: list[str], document: int) -> dict:
    lo = attributed["start"]
    hi = lo + len(attributed["activations"])
    return {
        "row": ref.row, "position": ref.position, "document": document, "activation": ref.activation,
        "start": lo, "tokens": row_tokens[lo:hi], "activations": attributed["activations"],
        "dfa": {
            "sources_start": 0,
            "by_source": attributed["by_source"],
            "source_tokens": row_tokens[: ref.position + 1],
            "by_head": attributed["by_head"],
            "total": attributed["total"],
            "bias_remainder": attributed["bias_remainder"],
            "pre_activation": attributed["pre_activation"],
        },
    }


def head_dfa_share(top_examples: list[dict], n_heads: int) -> list[float]:
    """Per-head DFA summed over the top examples, as a share of the sum over heads (negative heads stay negative)."""
    summed = np.zeros(n_heads)
    for e in top_examples:
        summed += np.asarray(e["dfa"]["by_head"])
    total = summed.sum()
    return (summed / total).tolist() if total != 0 else summed.tolist()


def tag_scores(bridge, sae: SAE, layer: int, scanned: Scan, tokenizer, bos: int, cfg: DashboardsConfig
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, int]]:
    """Every tag's score per feature, its percentile against the null directions, and the probe prompts behind it."""
    probes = families.build_probes(tokenizer, bos, cfg.probe_prompts, cfg.seed)
    ours, null = families.probe_scores_many(bridge, layer, [sae, scanned.null], probes, cfg.batch_rows,
                                            [scanned.stats.max_activation, scanned.null_stats.max_activation])
    scores = {**scanned.stats.scores(), **ours}
    null_scores = {**scanned.null_stats.scores(), **null}
    pct = {tag: families.percentiles(scores[tag], null_scores[tag]) for tag in families.TAGS}
    return scores, pct, families.probe_prompt_counts(probes)


def tag_definitions(cfg: DashboardsConfig, prompts: dict[str, int]) -> dict[str, dict]:
    return {tag: {**families.TAG_DEFINITIONS[tag], "threshold": getattr(cfg.tags, tag),
                  "probe_prompts": prompts.get(tag, 0)} for tag in families.TAGS}


def build_document(
    cfg: DashboardsConfig, bridge, info, sae: SAE, sae_dir: str | Path, layer: int, rows: np.ndarray,
    alive_rows: int, tokenizer, device: torch.device,
) -> dict:
    n_heads = bridge.cfg.n_heads
    scanned = scan(bridge, sae, layer, rows, alive_rows, cfg, device)
    firings = scanned.firings
    n_tokens = rows.size
    density, maxima = firings.counts() / n_tokens, firings.max_values()
    alive = scanned.fired_on_alive_tokens
    scores, pct, prompts = tag_scores(bridge, sae, layer, scanned, tokenizer, info.bos_token_id, cfg)
    tags = [t if fired else [] for t, fired in
            zip(families.assign_tags(scores, pct, cfg.tags, cfg.null_percentile), firings.counts() > 0)]

    token_text = _token_decoder(tokenizer)
    docs = document_ids(rows, info.bos_token_id)
    # ranked on the scores as features.json rounds them, so the page's order is the document's
    ranked = families_of(tags, {tag: rounded(scores[tag].tolist()) for tag in families.TAGS})
    rated = rating_sets(alive, cfg.first_n, cfg.random_n, cfg.seed)
    chosen = card_features(rated, cfg.features, sae.d_sae, {tag: family["best"] for tag, family in ranked.items()})
    picks = {f: choose_examples(firings, f, cfg) for f, _ in chosen}
    refs = {r for top, intervals in picks.values() for r in top + [e for i in intervals for e in i["examples"]]}
    attributed = attribute_examples(bridge, sae, layer, rows, sorted(refs, key=_ref_order), scanned.captures, device)
    row_text = {row: [token_text(int(t)) for t in rows[row]] for row in {r.row for r in refs}}
    logits = logit_tables(bridge, sae, layer, [f for f, _ in chosen], cfg.logit_tokens, token_text, cfg.histogram_bins)
    decoder_share = attribution.decoder_head_shares(sae, n_heads).cpu()

    def entry(r: ExampleRef) -> dict:
        return example_entry(r, attributed[r], row_text[r.row], int(docs[r.row, r.position]))

    cards = []
    for f, reason in chosen:
        top, intervals = picks[f]
        values = firings.values[firings.of(f)]
        counts, edges = np.histogram(values, bins=cfg.histogram_bins, range=(0.0, float(maxima[f]) or 1.0))
        top_entries = [entry(r) for r in top]
        cards.append({
            "feature": f, "reason": reason, "density": float(density[f]), "max_activation": float(maxima[f]),
            "firing_tokens": int(len(values)), "tags": tags[f],
            "top_examples": top_entries,
            "intervals": [{**i, "examples": [entry(r) for r in i["examples"]]} for i in intervals],
            "histogram": {"bin_edges": edges.tolist(), "counts": counts.tolist()},
            "logits": logits[f],
            "heads": {"decoder_share": decoder_share[f].tolist(), "dfa_share": head_dfa_share(top_entries, n_heads)},
        })

    doc = {
        "format": FORMAT, "version": VERSION, "content_hash": "",
        "layer": layer, "hook_name": hook_z_name(layer), "model": info.name, "sae": str(sae_dir),
        "d_sae": sae.d_sae, "n_heads": n_heads, "d_head": sae.d_in // n_heads,
        "tokens": {"split": "eval", "rows": int(rows.shape[0]), "context_size": int(rows.shape[1]),
                   "count": int(n_tokens), "documents": int(docs.max()) + 1},
        "alive": {"definition": f"fired (activation > 0) at least once on the first {alive_rows * rows.shape[1]:,} "
                                "evaluation tokens: the tokens and the rule of evaluate's dead_fraction",
                  "tokens": int(alive_rows * rows.shape[1]), "count": int(alive.sum())},
        "logit_definition": LOGIT_DEFINITION,
        "dfa_definition": DFA_DEFINITION,
        "tag_definitions": tag_definitions(cfg, prompts),
        "tag_rule": TAG_RULE,
        "null": {"directions": cfg.null_directions, "percentile": cfg.null_percentile,
                 "description": families.NULL_DESCRIPTION},
        "summary": {
            "density": density.tolist(), "max_activation": maxima.tolist(), "alive": alive.tolist(), "tags": tags,
            "scores": {tag: scores[tag].tolist() for tag in families.TAGS},
            "percentiles": {tag: pct[tag].tolist() for tag in families.TAGS},
        },
        "families": ranked,
        "rating_sets": {
            "first_n": {"rule": f"the first {cfg.first_n} alive features by id, as the post rated",
                        "features": rated["first_n"]},
            "random": {"rule": f"{cfg.random_n} alive features drawn at random (seed {cfg.seed})",
                       "features": rated["random"]},
        },
        "cards": cards,
    }
    doc = rounded(doc)
    doc["content_hash"] = content_hash(doc)
    return doc


def _ref_order(r: ExampleRef) -> tuple[int, int, int]:
    return r.row, r.position, r.feature


def _token_decoder(tokenizer):
    cache: dict[int, str] = {}

    def text(token_id: int) -> str:
        if token_id not in cache:
            cache[token_id] = tokenizer.decode([token_id])
        return cache[token_id]

    return text


def alive_row_count(eval_max_rows: int, rows: int) -> int:
    """How many of the dashboard rows decide "alive": evaluate's (config.check_dashboards_rows keeps them covered)."""
    return min(eval_max_rows or rows, rows)


def build_dashboards(cfg: DashboardsConfig, eval_max_rows: int, model_dir: str | Path, tokens_dir: str | Path,
                     sae_dir: str | Path, layer: int | None, out_dir: str | Path) -> dict:
    """The stage: features.json and the layer page for one SAE folder (ours or imported). Returns a summary
    (layer, cards, alive, tag counts, content hash, seconds) for the log and MLflow."""
    started = time.monotonic()
    sae, layer, info = load_sae_for_model(sae_dir, model_dir, layer)
    rows = load_rows(tokens_dir, "eval", vocab_size=info.vocab_size)
    if len(rows) == 0:
        raise UserError("dashboards: the evaluation split is empty (no rows); nothing to show")
    if cfg.max_rows:
        rows = rows[: cfg.max_rows]
    alive_rows = alive_row_count(eval_max_rows, len(rows))
    device = resolve_device(cfg.device)
    bridge, _ = load_bridge(model_dir, device)
    sae = sae.to(device).eval()
    doc = build_document(cfg, bridge, info, sae, sae_dir, layer, rows, alive_rows, load_tokenizer(model_dir), device)
    page = render_layer_page(doc)
    with atomic_dir(out_dir) as tmp:
        (tmp / FEATURES_FILE).write_text(features_json_text(doc))
        (tmp / PAGE_FILE).write_text(page)
    return summarize(doc, time.monotonic() - started)


def summarize(doc: dict, seconds: float) -> dict:
    counts, untagged = tag_counts(doc)
    return {"layer": doc["layer"], "cards": len(doc["cards"]), "alive": doc["alive"]["count"], "d_sae": doc["d_sae"],
            "tag_counts": counts, "untagged": untagged, "content_hash": doc["content_hash"], "seconds": seconds}
