"""The dashboards stage in the real tiny pipeline: its files, its MLflow run, the report it feeds, and a rating
that goes from an exported labels file through `attnsae labels import` and `dvc repro` into the report's column."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from attnsae import layout
from attnsae.formats.features import read_features
from helpers import run, stages_run

pytestmark = pytest.mark.integration
LAYERS = (1, 2)


def test_every_layer_has_a_page_and_features_with_evaluates_alive_set(tiny_pipeline):
    root, _, _ = tiny_pipeline
    for layer in LAYERS:
        doc = read_features(root / layout.features_file(layer), layer)
        metrics = json.loads((root / layout.metrics_file(layer)).read_text())
        # one definition of alive: the same tokens and rule as evaluate's dead_fraction
        assert doc["alive"]["tokens"] == metrics["dead_fraction_tokens"]
        assert doc["alive"]["count"] == round((1 - metrics["dead_fraction"]) * metrics["d_sae"])
        first = [c["feature"] for c in doc["cards"] if c["reason"] == "first_n"]
        assert first == [f for f, alive in enumerate(doc["summary"]["alive"]) if alive][:6]  # tiny: first_n 6
        assert len(doc["summary"]["tags"]) == doc["d_sae"] == 256
        page = (root / layout.dashboard_page(layer)).read_text()
        assert page.count('class="card"') == len(doc["cards"]) and doc["content_hash"] in page


def test_the_layer_run_logs_tag_counts_and_the_page_hash(tiny_pipeline):
    from mlflow.tracking import MlflowClient

    root, _, _ = tiny_pipeline
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("attnsae").experiment_id],
                              filter_string="tags.`attnsae.stage` = 'dashboards'")
    by_layer = {}  # the latest run of each layer: other tests in this session re-run a layer's stages
    for r in sorted(runs, key=lambda r: r.info.start_time):
        by_layer[r.data.tags["attnsae.layer"]] = r
    assert sorted(by_layer) == ["1", "2"]
    for layer in LAYERS:
        found = by_layer[str(layer)]
        doc = read_features(root / layout.features_file(layer), layer)
        assert found.data.tags["attnsae.dashboard_hash"] == doc["content_hash"]
        for tag in doc["tag_definitions"]:
            assert found.data.metrics[f"dashboards/tag_{tag}"] == sum(tag in t for t in doc["summary"]["tags"])
        assert found.data.params["dashboards.first_n"] == "6"
        assert [a.path for a in client.list_artifacts(found.info.run_id, "dashboards")] == ["dashboards/features.json"]


def test_report_says_not_rated_and_counts_tags(tiny_pipeline):
    root, _, _ = tiny_pipeline
    report = (root / "reports/report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| layer | d_sae"))
    assert header.rstrip(" |").endswith("% alive interpretable")
    rows = [line for line in report.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert all(row.rstrip(" |").endswith("not rated") for row in rows[:2])
    assert "## Family tags" in report and "| layer | induction |" in report


def test_any_sae_folder_gets_the_same_dashboards_elsewhere_and_never_the_stages_folder(tiny_pipeline, tmp_path):
    """`attnsae dashboards --sae FOLDER --out DIR` (the gpt2-small pipeline's dashboards_published_saes@L) on a copy of
    layer 1's SAE: the same numbers as the stage, byte for byte but the SAE's path and the hash."""
    root, env, _ = tiny_pipeline
    imported = tmp_path / "imported" / "L1"
    shutil.copytree(root / layout.sae_dir(1), imported)
    # the stage's folder, another layer's (measured: overwritten with exit 0), or for our own SAE another layer's
    before = {p: p.read_bytes() for p in (root / layout.DASHBOARDS_DIR).rglob("*") if p.is_file()}
    for args in (["--sae", str(imported)], ["--sae", str(imported), "--out", str(layout.dashboards_dir(2))],
                 ["--layer", "1", "--out", str(layout.dashboards_dir(2))]):
        refused = subprocess.run(["attnsae", "dashboards", *args, "--no-mlflow"], cwd=root, env=env,
                                 capture_output=True, text=True)
        assert refused.returncode == 1 and "lies in the pipeline's output reports/dashboards" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in before} == before
    out = tmp_path / "out" / "L1"
    run(["attnsae", "dashboards", "--sae", str(imported), "--out", str(out), "--no-mlflow"], root, env)
    ours, theirs = (read_features(path, 1) for path in (root / layout.features_file(1), out / "features.json"))
    assert theirs["sae"] == str(imported)
    assert {k: v for k, v in theirs.items() if k not in ("sae", "content_hash")} == \
        {k: v for k, v in ours.items() if k not in ("sae", "content_hash")}
    assert json.loads(run(["dvc", "status", "--json"], root, env)) == {}  # the stage's outputs untouched


def test_head_scores_report_each_head_and_the_tag_share_on_and_off_the_induction_heads(tiny_pipeline):
    root, env, _ = tiny_pipeline
    lines = run(["attnsae", "head-scores", "--layer", "2", "--min-score", "0"], root, env).splitlines()
    scores = lines[0].split(": ", 1)[1].split(", ")
    assert [s.split()[0] for s in scores] == ["H0", "H1", "H2", "H3"]  # tiny-gpt2: 4 heads
    assert all(0.0 <= float(s.split()[1]) <= 1.0 for s in scores)
    assert lines[1] == "L2 induction heads (score >= 0.0): H0, H1, H2, H3"  # every head qualifies at 0
    doc = read_features(root / layout.features_file(2), 2)
    fired = [d > 0 for d in doc["summary"]["density"]]
    tagged = sum("induction" in t for t, f in zip(doc["summary"]["tags"], fired) if f)
    # every fired feature sits on "the induction heads" when they are all the heads
    assert f"{tagged}/{sum(fired)}" in lines[2] and lines[2].endswith("0/0 of the others")


@pytest.fixture
def copy_of_pipeline(tiny_pipeline, tmp_path):
    """The reproduced tiny pipeline, copied: ratings change its labels folder and its report."""
    root, env, _ = tiny_pipeline
    copy = tmp_path / "repo"
    shutil.copytree(root, copy, symlinks=True)
    return copy, env


def exported_labels(root, layer: int, answers: dict[int, str]) -> dict:
    """What the page's export button writes (tests/test_dashboard_pages.py drives the button itself)."""
    doc = read_features(root / layout.features_file(layer), layer)
    return {"format": "attnsae-labels", "version": 1, "layer": layer, "content_hash": doc["content_hash"],
            "rater": "ada", "ratings": [{"feature": f, "answer": a, "family": "", "note": "", "date": "2026-11-30"}
                                        for f, a in answers.items()]}


def test_imported_ratings_fill_the_reports_column_and_a_tampered_file_writes_nothing(copy_of_pipeline):
    root, env = copy_of_pipeline
    first = [c["feature"] for c in read_features(root / layout.features_file(1), 1)["cards"]
             if c["reason"] == "first_n"]
    answers = dict(zip(first[:4], ["yes", "yes", "no", "unsure"]))
    exported = root / "labels-L1.json"
    exported.write_text(json.dumps(exported_labels(root, 1, answers)))
    out = run(["attnsae", "labels", "import", str(exported)], root, env)
    assert "4 ratings" in out and (root / "labels/L1.csv").is_file()
    before = (root / "labels/L1.csv").read_bytes()

    tampered = exported_labels(root, 1, {**answers, 9999: "yes"})
    (root / "tampered.json").write_text(json.dumps(tampered))
    failed = subprocess.run(["attnsae", "labels", "import", "tampered.json"], cwd=root, env=env, capture_output=True,
                            text=True)
    assert failed.returncode == 1 and "9999" in failed.stderr and len(failed.stderr.strip().splitlines()) == 1
    assert (root / "labels/L1.csv").read_bytes() == before

    repro = run(["dvc", "repro"], root, env)
    assert stages_run(repro) == {"report"}  # ratings change the report and nothing else
    rows = [line for line in (root / "reports/report.md").read_text().splitlines() if line.startswith("| 1 |")]
    assert rows[0].rstrip(" |").endswith("50% (2/4 rated)")


def test_killing_dvc_alone_stops_the_stage_it_was_running(copy_of_pipeline):
    """Measured: `kill -TERM` of `dvc repro` alone while dashboards@3 ran; DVC exited after deleting the stage's outputs
    and `attnsae dashboards` ran on and rewrote them 20 s later, outputs no dvc.lock vouches for (lifeline.py)."""
    import signal
    import time

    import psutil

    from attnsae.lifeline import is_alive

    root, env = copy_of_pipeline
    lock = (root / "dvc.lock").read_bytes()
    dvc = subprocess.Popen(["dvc", "repro", "--force", "--single-item", "dashboards@1"], cwd=root, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    stage = None
    while stage is None:
        assert time.monotonic() < deadline and dvc.poll() is None, "the stage never started"
        stage = next((p for p in psutil.Process(dvc.pid).children(recursive=True)
                      if "dashboards" in " ".join(p.cmdline())), None)
        time.sleep(0.05)
    time.sleep(1.0)  # into its work (the tiny stage takes several seconds)
    assert is_alive(stage.pid)
    dvc.send_signal(signal.SIGTERM)  # the pipeline alone, not its process group
    dvc.wait(60)
    deadline = time.monotonic() + 10
    while is_alive(stage.pid):
        assert time.monotonic() < deadline, "the stage outlived the pipeline that started it"
        time.sleep(0.1)
    time.sleep(1.0)
    assert not (root / layout.dashboards_dir(1)).exists()  # DVC deleted it, and nothing wrote it again
    run(["dvc", "repro"], root, env)  # restores the folder (from DVC's cache, or by running the stage)
    assert (root / layout.features_file(1)).is_file()
    assert (root / "dvc.lock").read_bytes() == lock and json.loads(run(["dvc", "status", "--json"], root, env)) == {}


def test_inspect_reads_the_layers_dashboards_for_densities_tags_and_card_links(tiny_pipeline):
    root, env, _ = tiny_pipeline
    doc = read_features(root / layout.features_file(2), 2)
    lines = run(["attnsae", "inspect", "--layer", "2", "--summary", "--most-active", "1000", "the cat sat on the mat"],
                root, env).splitlines()
    assert lines[0].startswith("L2 of ") and "SAE models/sae/L2 " in lines[0]
    listed = lines[3:]
    assert listed and len(listed) == len({int(line.split()[0]) for line in listed})
    carded = {card["feature"] for card in doc["cards"]}
    for line in listed:
        feature = int(line.split()[0])
        tags = doc["summary"]["tags"][feature]
        assert f"density {doc['summary']['density'][feature]:.3%}" in line
        assert (f"; card reports/dashboards/L2/index.html#f{feature}" in line) == (feature in carded)
        assert (f"[{', '.join(tags)}]" in line) == bool(tags)
    assert any(int(line.split()[0]) in carded for line in listed)  # the card links are checked, not only absent
    assert json.loads(run(["dvc", "status", "--json"], root, env)) == {}  # inspect writes nothing of the pipeline's
