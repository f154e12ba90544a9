"""The labels file: import into labels/L<n>.csv against the layer's current features.json, re-import,
tampered files refused in one line with nothing written, corrupt CSVs, and the "% alive interpretable" count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attnsae import layout
from attnsae.errors import UserError
from attnsae.features.labels import Rating, import_labels, interpretable, labels_csv, read_labels
from attnsae.formats.features import content_hash
from helpers import OFFLINE_ENV, assert_one_line_error, invoke

LAYER = 3
CARDED = [2, 7, 9]
TAGS = ["induction", "previous_token"]
HEADER = "feature,answer,family,note,rater,date,content_hash\n"


def features_doc(layer: int = LAYER, cards: list[int] = CARDED) -> dict:
    """The parts of a features.json document that an import reads (the page tests build a whole one)."""
    doc = {"format": "attnsae-dashboards", "version": 2, "layer": layer,
           "tag_definitions": {tag: {"threshold": 0.3} for tag in TAGS},
           "cards": [{"feature": f} for f in cards]}
    return {**doc, "content_hash": content_hash(doc)}


@pytest.fixture()
def roots(tmp_path) -> tuple[Path, Path]:
    """(dashboards root holding layer 3's features.json, labels root)."""
    dashboards = tmp_path / "dashboards"
    path = layout.features_file(LAYER, dashboards)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(features_doc()))
    return dashboards, tmp_path / "labels"


def page_hash(dashboards: Path) -> str:
    return json.loads(layout.features_file(LAYER, dashboards).read_text())["content_hash"]


def labels_file(folder: Path, dashboards: Path, rater: str = "ada", ratings: list | None = None, **changes) -> Path:
    data = {"format": "attnsae-labels", "version": 1, "layer": LAYER, "content_hash": page_hash(dashboards),
            "rater": rater, "ratings": ratings if ratings is not None else [
                {"feature": 2, "answer": "yes", "family": "induction", "note": "A B ... A, \"quoted\", comma",
                 "date": "2026-05-01"},
                {"feature": 7, "answer": "unsure", "family": "", "note": "", "date": "2026-05-02"}]}
    path = folder / f"labels-{rater[:20] or 'nobody'}-{len(list(folder.glob('labels-*')))}.json"
    path.write_text(json.dumps({**data, **changes}))
    return path


def rating(feature: int, answer: str, date: str = "2026-05-01") -> dict:
    return {"feature": feature, "answer": answer, "family": "", "note": "", "date": date}




def test_import_round_trip(roots, tmp_path):
    dashboards, labels_root = roots
    path, count = import_labels(labels_file(tmp_path, dashboards), dashboards, labels_root)
    assert (path, count) == (labels_root / "L3.csv", 2)
    h = page_hash(dashboards)
    assert path.read_text() == (HEADER + f'2,yes,induction,"A B ... A, ""quoted"", comma",ada,2026-05-01,{h}\n'
                                f"7,unsure,,,ada,2026-05-02,{h}\n")
    assert read_labels(LAYER, labels_root) == [
        Rating(2, "yes", "induction", 'A B ... A, "quoted", comma', "ada", "2026-05-01", h),
        Rating(7, "unsure", "", "", "ada", "2026-05-02", h)]


def test_reimport_replaces_the_raters_rows_and_keeps_the_others(roots, tmp_path):
    dashboards, labels_root = roots
    import_labels(labels_file(tmp_path, dashboards), dashboards, labels_root)
    import_labels(labels_file(tmp_path, dashboards, "bob", [rating(2, "no"), rating(9, "yes")]), dashboards,
                  labels_root)
    path, count = import_labels(labels_file(tmp_path, dashboards, "ada", [rating(2, "no", "2026-05-03")]),
                                dashboards, labels_root)
    assert count == 1
    rows = [(r.feature, r.rater, r.answer, r.date) for r in read_labels(LAYER, labels_root)]
    assert rows == [(2, "ada", "no", "2026-05-03"), (2, "bob", "no", "2026-05-01"), (7, "ada", "unsure", "2026-05-02"),
                    (9, "bob", "yes", "2026-05-01")]


TAMPERED = {
    "wrong hash": ({"content_hash": "sha256:" + "0" * 64}, "content_hash 'sha256:000"),
    "unknown feature": ({"ratings": [rating(2, "yes"), rating(5, "yes")]}, "feature 5 has no card"),
    "bad answer": ({"ratings": [rating(2, "maybe")]}, "answer 'maybe' is not one of 'yes', 'no', 'unsure'"),
    "bad family": ({"ratings": [{**rating(2, "yes"), "family": "name_mover"}]}, "family 'name_mover'"),
    "bad date": ({"ratings": [rating(2, "yes", "2026-02-30")]}, "date '2026-02-30'"),
    "rated twice": ({"ratings": [rating(2, "yes"), rating(2, "no")]}, "feature 2 is rated twice"),
    "wrong layer": ({"layer": 4}, "layer 4 has no dashboards"),
    "empty rater": ({"rater": "  "}, "rater '  ' is empty"),
    "no ratings": ({"ratings": []}, "holds no ratings"),
    "wrong format": ({"format": "attnsae-dashboards"}, "not a labels file"),
    "extra key": ({"score": 0.9}, "unknown key 'score'"),
    "feature as text": ({"ratings": [{**rating(2, "yes"), "feature": "2"}]}, "feature '2' is not a feature id"),
    # issue 21: values that reach a file name, a message or the CSV and must still be one short line
    "400-digit layer": ({"layer": 10**400}, "layer 100000000000... (401 digits) is not a layer number"),
    "400-digit feature": ({"ratings": [{**rating(2, "yes"), "feature": -10**400}]},
                          "feature -10000000000... (401 digits) has no card"),
    "deeply nested note": ({"ratings": [{**rating(2, "yes"), "note": json.loads("[" * 500 + "]" * 500)}]},
                           "note " + "[" * 77 + "... is not text"),  # cut to 80 characters
    # what csv could not read back: a field over its 131072 characters, a carriage return it leaves unquoted
    "long note": ({"ratings": [{**rating(2, "yes"), "note": "x" * 200_000}]}, "is 200000 characters long"),
    "long rater": ({"rater": "r" * 20_000}, "rater 'rrrrrrrrrr"),
    "carriage return": ({"ratings": [{**rating(2, "yes"), "note": "one\rtwo"}]},
                        "note 'one\\rtwo' holds a carriage return"),
}


@pytest.mark.parametrize("rated_before", [False, True], ids=["no csv yet", "csv exists"])
@pytest.mark.parametrize("case", TAMPERED, ids=list(TAMPERED))
def test_a_tampered_file_fails_in_one_line_and_writes_nothing(roots, tmp_path, case, rated_before):
    dashboards, labels_root = roots
    csv_path = layout.labels_file(LAYER, labels_root)
    if rated_before:
        import_labels(labels_file(tmp_path, dashboards), dashboards, labels_root)
    before = csv_path.read_bytes() if rated_before else None
    changes, fragment = TAMPERED[case]
    bad = labels_file(tmp_path, dashboards, **changes)
    with pytest.raises(UserError) as err:
        import_labels(bad, dashboards, labels_root)
    message = str(err.value)
    assert len(message.splitlines()) == 1 and message.startswith(str(bad)) and fragment in message, message
    assert (csv_path.read_bytes() if csv_path.exists() else None) == before
    assert sorted(p.name for p in labels_root.glob("*")) == (["L3.csv"] if rated_before else [])


def test_a_page_rebuilt_since_rating_refuses_the_old_file(roots, tmp_path):
    dashboards, labels_root = roots
    old = labels_file(tmp_path, dashboards)
    layout.features_file(LAYER, dashboards).write_text(json.dumps(features_doc(cards=[2, 7, 9, 11])))
    with pytest.raises(UserError, match="rate the current page and export again"):
        import_labels(old, dashboards, labels_root)
    assert not labels_root.exists()


def test_a_hand_edited_features_json_refuses_every_file(roots, tmp_path):
    dashboards, labels_root = roots
    good = labels_file(tmp_path, dashboards)
    edited = {**features_doc(), "cards": [{"feature": f} for f in [*CARDED, 11]]}  # the stored hash is now stale
    layout.features_file(LAYER, dashboards).write_text(json.dumps(edited))
    with pytest.raises(UserError, match=r"L3/features\.json: its content does not match its content_hash"):
        import_labels(good, dashboards, labels_root)
    assert not labels_root.exists()


def test_another_layers_features_json_copied_here_refuses_every_file(roots, tmp_path):
    """Intact is not enough (measured: L10's features.json copied to L3 took ratings of L10's page as layer 3's)."""
    dashboards, labels_root = roots
    layout.features_file(LAYER, dashboards).write_text(json.dumps(features_doc(layer=10)))
    rated_on_l10 = labels_file(tmp_path, dashboards)  # names layer 3 and the hash of the file now there: L10's
    with pytest.raises(UserError) as err:
        import_labels(rated_on_l10, dashboards, labels_root)
    assert str(err.value) == (f"{layout.features_file(LAYER, dashboards)}: holds the dashboards of layer 10, not of "
                              f"layer 3 (copied from another layer?); re-run `attnsae dashboards --layer 3`")
    assert not labels_root.exists()


def test_not_json_is_one_line(roots, tmp_path):
    dashboards, labels_root = roots
    bad = tmp_path / "labels.json"
    bad.write_text('{"format": "attnsae-labels",')
    with pytest.raises(UserError, match=r"labels\.json: corrupt JSON"):
        import_labels(bad, dashboards, labels_root)


def hostile_file(folder: Path, dashboards: Path, case: str) -> Path:
    """Issue 21's probes: a layer of 400 or 5000 digits (json.dumps refuses to write the longer one), or
    200,000 nested brackets."""
    if case == "nested":
        path = folder / "nested.json"
        path.write_text("[" * 200_000 + "]" * 200_000)
        return path
    path = labels_file(folder, dashboards, layer="LAYER")
    path.write_text(path.read_text().replace('"LAYER"', "9" * int(case)))
    return path


HOSTILE = {
    "400": "layer 999999999999... (400 digits) is not a layer number (an integer from 0 to 9999)",
    "5000": "corrupt JSON (a 5000-digit number)",
    "nested": "corrupt JSON (nested too deeply)",
}


@pytest.mark.parametrize("case", HOSTILE, ids=["400-digit layer", "5000-digit layer", "200000 nested brackets"])
def test_a_hostile_file_is_one_line_from_the_command(roots, tmp_path, case):
    dashboards, labels_root = roots
    import_labels(labels_file(tmp_path, dashboards), dashboards, labels_root)
    csv_path = layout.labels_file(LAYER, labels_root)
    before = csv_path.read_bytes()
    bad = hostile_file(tmp_path, dashboards, case)
    result = invoke("labels", "import", bad, "--dashboards", dashboards, "--labels", labels_root)
    line = assert_one_line_error(result, f"Error: {bad}: {HOSTILE[case]}")
    assert len(line) < 200, line
    assert csv_path.read_bytes() == before


ATTNSAE = Path(sys.executable).with_name("attnsae")
OLD_PAGE = "sha256:" + "a" * 64


def test_raters_imported_at_once_all_keep_their_rows(roots, tmp_path):
    """Six `attnsae labels import` processes at once (issue 21): each reads L3.csv, merges and replaces it, so
    without a lock the last to write dropped the others' rows. 10,000 rows rated on an older version of the page
    make each read-merge-write take long enough (~0.15 s) that the processes overlap in every trial."""
    dashboards, labels_root = roots
    csv_path = layout.labels_file(LAYER, labels_root)
    csv_path.parent.mkdir()
    old = [Rating(n, "yes", "", "", f"old{n}", "2026-01-01", OLD_PAGE) for n in range(10_000)]
    raters = [f"rater{n}" for n in range(6)]
    files = [labels_file(tmp_path, dashboards, rater, [rating(f, "yes") for f in CARDED]) for rater in raters]
    for trial in range(2):
        csv_path.write_text(labels_csv(old))
        procs = [subprocess.Popen([str(ATTNSAE), "labels", "import", str(f), "--dashboards", str(dashboards),
                                   "--labels", str(labels_root)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env={**os.environ, **OFFLINE_ENV}) for f in files]
        outputs = [(*proc.communicate(timeout=120), proc.returncode) for proc in procs]
        assert all(code == 0 for *_, code in outputs), outputs
        ratings = read_labels(LAYER, labels_root)
        new = sorted((r.rater, r.feature) for r in ratings if r.content_hash != OLD_PAGE)
        assert new == [(rater, f) for rater in raters for f in CARDED], f"trial {trial}: rows lost"
        assert len(ratings) == len(old) + len(new)


def test_read_labels_absent_is_none(tmp_path):
    assert read_labels(LAYER, tmp_path) is None


GOOD_ROW = f"2,yes,,,ada,2026-05-01,sha256:{'a' * 64}\n"
CORRUPT = {
    "header": ("feature,answer\n" + GOOD_ROW, "line 1"),
    "answer": (HEADER + GOOD_ROW + GOOD_ROW.replace("2,yes", "3,perhaps"), "line 3: answer 'perhaps'"),
    "fields": (HEADER + "2,yes,ada\n", "line 2 has 3 fields"),
    "feature": (HEADER + GOOD_ROW.replace("2,yes", "two,yes"), "line 2: feature 'two'"),
    "date": (HEADER + GOOD_ROW.replace("2026-05-01", "May 1"), "line 2: date 'May 1'"),
    "hash": (HEADER + GOOD_ROW.replace("a" * 64, "xyz"), "line 2: content_hash"),
    "duplicate": (HEADER + GOOD_ROW + GOOD_ROW, "line 3: feature 2 rated twice"),
    "5000-digit feature": (HEADER + GOOD_ROW.replace("2,yes", "9" * 5000 + ",yes"), "line 2: feature '999999999"),
}


@pytest.mark.parametrize("case", CORRUPT, ids=list(CORRUPT))
def test_read_labels_of_a_corrupt_csv_names_the_file_and_line(tmp_path, case):
    text, fragment = CORRUPT[case]
    path = layout.labels_file(LAYER, tmp_path)
    path.write_text(text)
    with pytest.raises(UserError) as err:
        read_labels(LAYER, tmp_path)
    message = str(err.value)
    assert len(message.splitlines()) == 1 and message.startswith(str(path)) and fragment in message, message


def vote(feature: int, answer: str, rater: str = "ada", date: str = "2026-05-01", page: str = "sha256:a") -> Rating:
    return Rating(feature, answer, "", "", rater, date, page)


def test_interpretable_is_yes_over_rated_one_vote_per_feature_and_rater():
    ratings = [
        vote(0, "yes"), vote(0, "no", rater="bob"),    # two raters: two votes
        vote(1, "unsure"),                              # rated, not yes
        vote(2, "no"), vote(2, "yes", date="2026-05-02"),  # the same rater again: the later answer counts
        vote(3, "yes", page="sha256:b"),                # rated on another version of the page
        vote(40, "yes"),                                # not among the features asked about
    ]
    assert interpretable(ratings, range(30)) == (3, 5)
    assert interpretable(ratings, range(30), content_hash="sha256:a") == (2, 4)
    assert interpretable(ratings, [5, 6]) == (0, 0)  # "not rated"
    assert interpretable([], range(30)) == (0, 0)
