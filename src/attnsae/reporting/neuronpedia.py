"""`attnsae export neuronpedia`: a layer's dashboards in the layout Neuronpedia's importer reads, from its
features.json alone (and the layer's ratings, for explanations).

Neuronpedia imports one SAE from a folder ``<model id>/<source id>/`` (its importer: neuronpedia's
``apps/webapp/app/api/admin/import/route.ts``; the tables: ``apps/webapp/prisma/schema.prisma``):

- ``model.jsonl``, ``sourceset.jsonl``, ``source.jsonl``: one JSON object per line, the rows the features belong to;
- ``features/batch-0.jsonl.gz``: a ``Neuron`` row per feature (density, largest activation, activation and logit
  histograms, top and bottom logit tokens, the decoder's share per head);
- ``activations/batch-0.jsonl.gz``: an ``Activation`` row per shown example (its window's tokens and activations, DFA
  by source position, and its interval: ``binMin`` -1 for the top activations);
- ``explanations/batch-0.jsonl.gz``: an ``Explanation`` row per rating note people left (``labels/L<n>.csv``).

The feature tables are inserted as raw rows whose columns are the first line's keys, so every row of a file carries
the same keys (empty lists where a feature has no card). Only carded features have examples, histograms and logit
tables: features.json keeps those for cards alone. Source ids follow Neuronpedia's ``<layer>-<source set>``.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import re
from pathlib import Path

from attnsae import layout
from attnsae.errors import UserError
from attnsae.features.labels import read_labels
from attnsae.files import atomic_dir
from attnsae.formats.features import read_features

# Neuronpedia's seeded default user (its prisma/seed.ts): every imported row names a creator that must exist there.
DEFAULT_CREATOR = "clkht01d40000jv08hvalcvly"
DEFAULT_SOURCE_SET = "att-attnsae"
EXPLANATION_TYPE = "attnsae-rating-note"  # must exist in the importing Neuronpedia's explanation types
MODEL_ID = re.compile(r"[a-z0-9][a-z0-9_-]*")
DECIMALS = 5


def source_id(layer: int, source_set: str) -> str:
    return f"{layer}-{source_set}"


def row_id(*parts: object) -> str:
    """A stable id for a row Neuronpedia requires one for (25 characters like its cuids): the same export gives the
    same ids, so importing it twice adds nothing (the importer skips rows whose id exists)."""
    return "c" + hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:24]


def _round(values: list[float]) -> list[float]:
    return [round(float(v), DECIMALS) for v in values]


def bin_centres(edges: list[float]) -> list[float]:
    return _round([(a + b) / 2 for a, b in itertools.pairwise(edges)])


def feature_row(doc: dict, feature: int, card: dict | None, keys: dict) -> dict:
    """The ``Neuron`` row of one feature: every column the export writes, empty where the feature has no card."""
    summary = doc["summary"]
    logits = card["logits"] if card else {"top": [], "bottom": []}
    histogram = card["histogram"] if card else {"bin_edges": [], "counts": []}
    logit_histogram = logits.get("histogram", {"bin_edges": [], "counts": []})
    return {
        **keys, "index": str(feature),
        "maxActApprox": round(float(summary["max_activation"][feature]), DECIMALS),
        "frac_nonzero": float(summary["density"][feature]),
        "freq_hist_data_bar_values": bin_centres(histogram["bin_edges"]),
        "freq_hist_data_bar_heights": [float(c) for c in histogram["counts"]],
        "logits_hist_data_bar_values": bin_centres(logit_histogram["bin_edges"]),
        "logits_hist_data_bar_heights": [float(c) for c in logit_histogram["counts"]],
        "pos_str": [e["token"] for e in logits["top"]], "pos_values": _round([e["value"] for e in logits["top"]]),
        "neg_str": [e["token"] for e in logits["bottom"]],
        "neg_values": _round([e["value"] for e in logits["bottom"]]),
        "decoder_weights_dist": _round(card["heads"]["decoder_share"]) if card else [],
    }


def activation_row(example: dict, interval: dict | None, max_activation: float, keys: dict, feature: int,
                   kind: str, number: int) -> dict:
    """The ``Activation`` row of one shown example: its window, DFA at its own token, and its interval (the top group:
    ``binMin`` and ``binContains`` -1, ``binMax`` the feature's largest activation)."""
    values = _round(example["activations"])
    own = example["position"] - example["start"]  # the example's token within the window
    # DFA at the example's own token from each token of the window (none from the tokens after it: 0)
    by_source = _round(example["dfa"]["by_source"][example["start"]:example["position"] + 1])
    by_source += [0.0] * (len(values) - len(by_source))
    return {
        "id": row_id(keys["modelId"], keys["layer"], feature, kind, number),
        **keys, "index": str(feature),
        "tokens": example["tokens"], "values": values,
        "maxValue": max(values), "maxValueTokenIndex": values.index(max(values)), "minValue": min(values),
        "dfaValues": by_source, "dfaTargetIndex": own, "dfaMaxValue": max(by_source),
        "binMin": -1.0 if interval is None else round(float(interval["low"]), DECIMALS),
        "binMax": round(float(max_activation if interval is None else interval["high"]), DECIMALS),
        "binContains": -1.0 if interval is None else round(float(interval["share"]), DECIMALS),
        "qualifyingTokenIndex": own,
    }


def export_rows(doc: dict, notes: list, model_id: str, source_set: str, creator: str) -> dict[str, list[dict]]:
    """The rows of every file, from a features.json document and the layer's ratings (``labels.Rating``)."""
    layer = source_id(doc["layer"], source_set)
    keys = {"modelId": model_id, "layer": layer, "creatorId": creator}
    cards = {card["feature"]: card for card in doc["cards"]}
    features = [{**feature_row(doc, f, cards.get(f), keys), "sourceSetName": source_set} for f in range(doc["d_sae"])]
    activations = []
    for f, card in cards.items():
        activations += [activation_row(e, None, card["max_activation"], keys, f, "top", n)
                        for n, e in enumerate(card["top_examples"])]
        activations += [activation_row(e, interval, card["max_activation"], keys, f, f"interval{k}", n)
                        for k, interval in enumerate(card["intervals"]) for n, e in enumerate(interval["examples"])]
    explanations = [{"id": row_id(model_id, layer, rating.feature, "note", rating.rater, rating.content_hash),
                     "modelId": model_id, "layer": layer, "index": str(rating.feature), "authorId": creator,
                     "description": rating.note, "typeName": EXPLANATION_TYPE,
                     "explanationModelName": f"person: {rating.rater}"}
                    for rating in notes if rating.note and rating.feature in cards]
    return {"features": features, "activations": activations, "explanations": explanations}


def metadata_rows(doc: dict, model_id: str, source_set: str, creator: str) -> dict[str, dict]:
    """model.jsonl, sourceset.jsonl and source.jsonl: the rows the features point to (their schema's fields only)."""
    return {
        "model": {"id": model_id, "displayName": doc["model"], "creatorId": creator, "layers": 0,
                  "neuronsPerLayer": 0, "owner": ""},
        "sourceset": {"modelId": model_id, "name": source_set, "type": "attnsae",
                      "description": f"attention output (hook_z) SAEs, attnsae: {doc['d_sae']:,} features",
                      "creatorName": "attnsae", "creatorId": creator, "showDfa": True, "showHeadAttribution": True},
        "source": {"id": source_id(doc["layer"], source_set), "modelId": model_id, "setName": source_set,
                   "creatorId": creator, "num_tokens_in_prompt": doc["tokens"]["context_size"],
                   "notes": f"{doc['hook_name']}; features.json {doc['content_hash']}"},
    }


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()


def export_neuronpedia(layer: int, model_id: str, dashboards_root: Path, labels_root: Path, out_root: Path,
                       source_set: str = DEFAULT_SOURCE_SET, creator: str = DEFAULT_CREATOR) -> tuple[Path, dict]:
    """Write ``<out_root>/<model id>/<source id>/`` atomically; returns it and the row count per table."""
    if not MODEL_ID.fullmatch(model_id):
        raise UserError(f"--model-id {model_id!r}: Neuronpedia model ids are lowercase letters, digits, '-' and '_' "
                        "(e.g. gpt2-small)")
    if not MODEL_ID.fullmatch(source_set):
        raise UserError(f"--source-set {source_set!r}: lowercase letters, digits, '-' and '_' (e.g. att-kk)")
    doc = read_features(layout.features_file(layer, dashboards_root), layer)
    ratings = [r for r in read_labels(layer, labels_root) or [] if r.content_hash == doc["content_hash"]]
    rows = export_rows(doc, ratings, model_id, source_set, creator)
    folder = out_root / model_id / source_id(layer, source_set)
    with atomic_dir(folder) as tmp:
        for name, row in metadata_rows(doc, model_id, source_set, creator).items():
            (tmp / f"{name}.jsonl").write_bytes(jsonl([row]))
        for table, table_rows in rows.items():
            if table_rows:
                (tmp / table).mkdir()
                # mtime 0: the same rows give the same bytes
                (tmp / table / "batch-0.jsonl.gz").write_bytes(gzip.compress(jsonl(table_rows), 5, mtime=0))
    return folder, {table: len(table_rows) for table, table_rows in rows.items()}
