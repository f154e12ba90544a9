"""`attnsae export neuronpedia` (reporting/neuronpedia.py) against Neuronpedia's published schema.

The row models below restate, field by field, the tables Neuronpedia's importer fills (hijohnnylin/neuronpedia @
ebb8426f: apps/webapp/prisma/schema.prisma, models Neuron, Activation, Explanation, Model, SourceSet, Source; which
columns are NOT NULL: its squashed migration): the names, the types, which are required. Extra keys are refused, so a
misspelt field fails here rather than being dropped silently by the importer (it keeps only known columns). Checked
on a synthetic document (every kind of card) and on the tiny pipeline's real features.json.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr

from attnsae import layout
from attnsae.cli import main
from attnsae.errors import UserError
from attnsae.reporting.neuronpedia import export_neuronpedia
from test_dashboard_pages import CARDED, LAYER, synthetic_doc

Number = StrictFloat | StrictInt  # JSON numbers: Postgres double precision takes either


class Row(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FeatureKey(Row):  # the key of table Neuron, which activations and explanations point to
    modelId: StrictStr
    layer: StrictStr  # the source id
    index: StrictStr  # a text column


class NeuronRow(FeatureKey):  # table Neuron; primary key (modelId, layer, index)
    sourceSetName: StrictStr | None = None
    creatorId: StrictStr | None = None
    maxActApprox: Number | None = None
    frac_nonzero: Number  # NOT NULL
    freq_hist_data_bar_values: list[Number] = []
    freq_hist_data_bar_heights: list[Number] = []
    logits_hist_data_bar_values: list[Number] = []
    logits_hist_data_bar_heights: list[Number] = []
    pos_str: list[StrictStr] = []
    pos_values: list[Number] = []
    neg_str: list[StrictStr] = []
    neg_values: list[Number] = []
    decoder_weights_dist: list[Number] = []


class ActivationRow(FeatureKey):  # table Activation; primary key id (no database default)
    id: StrictStr
    creatorId: StrictStr  # NOT NULL
    tokens: list[StrictStr]
    values: list[Number]
    maxValue: Number  # NOT NULL
    maxValueTokenIndex: StrictInt  # NOT NULL
    minValue: Number  # NOT NULL
    dfaValues: list[Number] = []
    dfaTargetIndex: StrictInt | None = None
    dfaMaxValue: Number | None = None
    binMin: Number | None = None
    binMax: Number | None = None
    binContains: Number | None = None
    qualifyingTokenIndex: StrictInt | None = None


class ExplanationRow(FeatureKey):  # table Explanation; primary key id (no database default)
    id: StrictStr
    authorId: StrictStr
    description: StrictStr
    typeName: StrictStr | None = None
    explanationModelName: StrictStr | None = None


class ModelRow(Row):  # model.jsonl, through Prisma create: only schema fields
    id: StrictStr
    creatorId: StrictStr
    layers: StrictInt
    neuronsPerLayer: StrictInt
    owner: StrictStr
    displayName: StrictStr = ""


class SourceSetRow(Row):
    modelId: StrictStr
    name: StrictStr
    description: StrictStr
    creatorName: StrictStr
    creatorId: StrictStr
    type: StrictStr = ""
    showDfa: StrictBool = False
    showHeadAttribution: StrictBool = False


class SourceRow(Row):
    id: StrictStr
    modelId: StrictStr
    setName: StrictStr
    creatorId: StrictStr
    num_tokens_in_prompt: StrictInt | None = None
    notes: StrictStr | None = None


TABLES = {"features": NeuronRow, "activations": ActivationRow, "explanations": ExplanationRow}
METADATA = {"model": ModelRow, "sourceset": SourceSetRow, "source": SourceRow}


def read_export(folder: Path) -> dict[str, list[dict]]:
    """Every file of an export folder as rows, each checked against its table's model; the importer's rules: plain
    JSONL metadata, gzipped JSONL batches, the same keys on every row of a file (its columns are the first row's)."""
    rows = {}
    for name, model in METADATA.items():
        lines = (folder / f"{name}.jsonl").read_text().splitlines()
        rows[name] = [model.model_validate(json.loads(line)).model_dump(exclude_unset=True) for line in lines]
    for table, model in TABLES.items():
        path = folder / table / "batch-0.jsonl.gz"
        lines = gzip.decompress(path.read_bytes()).decode().splitlines() if path.exists() else []
        parsed = [json.loads(line) for line in lines]
        assert len({tuple(row) for row in parsed}) <= 1, f"{table}: rows with different keys"
        rows[table] = [model.model_validate(row).model_dump(exclude_unset=True) for row in parsed]
    return rows


def check_references(rows: dict[str, list[dict]]) -> None:
    """What the database's foreign and primary keys demand."""
    (source,) = rows["source"]
    features = {(r["modelId"], r["layer"], r["index"]) for r in rows["features"]}
    assert len(features) == len(rows["features"])
    assert {r["layer"] for r in rows["features"]} == {source["id"]}
    for table in ("activations", "explanations"):
        assert all((r["modelId"], r["layer"], r["index"]) in features for r in rows[table]), table
        assert len({r["id"] for r in rows[table]}) == len(rows[table]), f"{table}: repeated ids"
    for r in rows["activations"]:
        assert len(r["tokens"]) == len(r["values"]) == len(r["dfaValues"])
        assert r["maxValue"] == r["values"][r["maxValueTokenIndex"]] == max(r["values"])


@pytest.fixture()
def dashboards(tmp_path) -> Path:
    doc = synthetic_doc()
    layout.features_file(LAYER, tmp_path).parent.mkdir(parents=True)
    layout.features_file(LAYER, tmp_path).write_text(json.dumps(doc))
    return tmp_path


def test_the_export_of_a_document_has_the_published_schema(dashboards, tmp_path):
    from attnsae.features.labels import Rating, labels_csv

    doc = synthetic_doc()
    labels_root = tmp_path / "labels"
    labels_root.mkdir()
    layout.labels_file(LAYER, labels_root).write_text(labels_csv([
        Rating(CARDED[0], "yes", "induction", "A B ... A", "ada", "2026-12-07", doc["content_hash"]),
        Rating(CARDED[1], "no", "", "", "ada", "2026-12-07", doc["content_hash"]),  # no note: no explanation
        Rating(CARDED[1], "yes", "", "an older page's note", "bo", "2026-12-01", "sha256:" + "0" * 64),
    ]))
    folder, counts = export_neuronpedia(LAYER, "tiny-model", dashboards, labels_root, tmp_path / "out")
    assert folder == tmp_path / "out" / "tiny-model" / f"{LAYER}-att-attnsae"
    rows = read_export(folder)
    check_references(rows)
    assert counts == {table: len(rows[table]) for table in TABLES}
    assert len(rows["features"]) == doc["d_sae"]
    shown = sum(len(c["top_examples"]) + sum(len(i["examples"]) for i in c["intervals"]) for c in doc["cards"])
    assert len(rows["activations"]) == shown
    (note,) = rows["explanations"]
    assert (note["index"], note["description"]) == (str(CARDED[0]), "A B ... A")
    card = doc["cards"][0]
    feature = rows["features"][CARDED[0]]
    assert feature["frac_nonzero"] == doc["summary"]["density"][CARDED[0]]
    assert feature["pos_str"] == [e["token"] for e in card["logits"]["top"]]
    assert feature["freq_hist_data_bar_heights"] == [float(c) for c in card["histogram"]["counts"]]
    assert rows["features"][0]["pos_str"] == []  # no card: no examples or tables in features.json
    top = [r for r in rows["activations"] if r["index"] == str(CARDED[0]) and r["binMin"] == -1]
    assert len(top) == len(card["top_examples"]) and {r["binContains"] for r in top} == {-1}
    example = card["top_examples"][0]
    own = example["position"] - example["start"]
    assert top[0]["dfaTargetIndex"] == own and top[0]["tokens"] == example["tokens"]
    assert top[0]["dfaValues"][own] == round(example["dfa"]["by_source"][example["position"]], 5)
    assert all(v == 0 for v in top[0]["dfaValues"][own + 1:])  # no DFA from tokens after the example's own


def test_the_same_document_gives_the_same_bytes_and_bad_ids_are_one_line(dashboards, tmp_path):
    first, _ = export_neuronpedia(LAYER, "m", dashboards, tmp_path / "labels", tmp_path / "a")
    second, _ = export_neuronpedia(LAYER, "m", dashboards, tmp_path / "labels", tmp_path / "b")
    for path in sorted(p for p in first.rglob("*") if p.is_file()):
        assert path.read_bytes() == (second / path.relative_to(first)).read_bytes(), path
    with pytest.raises(UserError, match=r"--model-id 'GPT 2': Neuronpedia model ids are lowercase"):
        export_neuronpedia(LAYER, "GPT 2", dashboards, tmp_path / "labels", tmp_path / "c")
    assert not (tmp_path / "c").exists()


@pytest.mark.integration
def test_the_command_on_the_tiny_pipelines_real_dashboards(tiny_pipeline, tmp_path):
    root, _, _ = tiny_pipeline
    layers = sorted(int(p.name[1:]) for p in (root / "reports" / "dashboards").glob("L*"))
    result = CliRunner().invoke(main, ["export", "neuronpedia", "--layer", str(layers[0]), "--model-id", "tiny-gpt2",
                                       "--dashboards", str(root / "reports" / "dashboards"),
                                       "--labels", str(root / "labels"), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "tiny-gpt2" / f"{layers[0]}-att-attnsae"
    assert result.output.startswith(f"export neuronpedia: L{layers[0]} -> {folder}: ")
    rows = read_export(folder)
    check_references(rows)
    assert rows["activations"] and all(r["logits_hist_data_bar_heights"] for r in rows["features"]
                                       if r["pos_str"])  # carded features carry their logit histogram


def test_the_committed_quickstart_export_has_the_published_schema_and_is_what_the_pipeline_made():
    """The quickstart's `neuronpedia` stage (pipelines/extra/quickstart.yaml) writes layer 17's export into git: its
    rows pass the schema, and dvc.lock says it was made from the committed dashboards of layer 17 and holds these
    very files."""
    import yaml

    from attnsae.reporting.repository import dvc_md5
    from helpers import REPO

    folder = REPO / "reports" / "neuronpedia" / "smollm2-135m" / "17-att-attnsae"
    rows = read_export(folder)
    check_references(rows)
    assert len(rows["features"]) == 2304 and rows["activations"]
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]
    made_from = {d["path"]: d["md5"] for d in lock["neuronpedia"]["deps"]}
    assert made_from["reports/dashboards/L17"] == lock["dashboards@17"]["outs"][0]["md5"]
    (out,) = lock["neuronpedia"]["outs"]
    assert out["path"] == "reports/neuronpedia" and out["md5"] == dvc_md5(REPO / "reports" / "neuronpedia")
