"""People's ratings of dashboard cards: the exported labels file, its import into ``labels/L<n>.csv``, and the
"% alive interpretable" count the report shows.

The labels file (what a layer page's "export" button downloads, ``labels-L<n>.json``)::

    {"format": "attnsae-labels", "version": 1,
     "layer": 3,                                   # the layer page that was rated (0 to MAX_LAYER)
     "content_hash": "sha256:<hex>",               # that page's features.json content_hash
     "rater": "ada",                               # non-empty (rater, note: <= MAX_TEXT characters, no CR)
     "ratings": [{"feature": 12,                   # a feature with a card on that page, at most once
                  "answer": "yes",                 # "yes" | "no" | "unsure"
                  "family": "induction",           # "" (none), a tag name of the page, or "other"
                  "note": "fires on the second A of A B ... A",
                  "date": "2026-05-01"}, ...]}     # YYYY-MM-DD: the rater's last change to this card

``attnsae labels import FILE`` (``import_labels``) checks it against the layer's current features.json, so a
rating always belongs to the page the pipeline has now, and merges it into ``labels/L<n>.csv`` (tracked by git):
columns ``feature,answer,family,note,rater,date,content_hash``, one row per rating, sorted by feature then
rater. Importing a rater's file again for the same content hash replaces that rater's rows for the features
in it; other raters' rows, and rows rated on other versions of the page, are kept. Imports run at once take
turns (a lock on the labels folder), so none loses another's rows.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import fcntl
import io
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Any

from attnsae import layout
from attnsae.errors import UserError
from attnsae.files import read_json_object, read_text_file, write_text_atomic
from attnsae.formats.features import read_features

FORMAT = "attnsae-labels"
VERSION = 1
ANSWERS = ("yes", "no", "unsure")
OTHER_FAMILY = "other"
RATING_KEYS = ("feature", "answer", "family", "note", "date")
FILE_KEYS = ("format", "version", "layer", "content_hash", "rater", "ratings")
DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
HASH = re.compile(r"sha256:[0-9a-f]{64}")
MAX_LAYER = 9999  # no model has more layers; the bound keeps a 400-digit "layer" out of file names
MAX_ID_DIGITS = 18  # of a feature id in labels/L<n>.csv: int() refuses 4300 digits, and no SAE has 10**18 features
MAX_TEXT = 10_000  # characters of a note or a rater's name: csv reads at most 131072 per field, so a longer one
# would import fine and then make labels/L<n>.csv unreadable for everyone


@dataclass(frozen=True)
class Rating:
    """One row of ``labels/L<n>.csv``: one rater's answer on one card of one version of a layer page."""

    feature: int
    answer: str
    family: str
    note: str
    rater: str
    date: str
    content_hash: str


CSV_COLUMNS = [f.name for f in fields(Rating)]


def _listing(values: Iterable[Any], limit: int = 12) -> str:
    """'0, 1, 5' or '0, 1, ... (40 in all)': what is allowed, short enough for a one-line error."""
    values = list(values)
    shown = ", ".join(repr(v) if isinstance(v, str) else str(v) for v in values[:limit])
    return shown if len(values) <= limit else f"{shown}, ... ({len(values)} in all)"


def _shown(value: Any, limit: int = 80) -> str:
    """repr(value) in one short line: a rater's file may hold a 400-digit number, a megabyte of text or a
    deeply nested list, and the error must still be one readable line (80 shows a whole sha256:<hex> hash)."""
    try:
        text = repr(value)
    except RecursionError:
        return f"a deeply nested {type(value).__name__}"
    if len(text) <= limit:
        return text
    if _is_int(value):
        return f"{text[:12]}... ({len(text.lstrip('-'))} digits)"
    return f"{text[:limit - 3]}..."


def _is_date(text: Any) -> bool:
    if not isinstance(text, str) or not DATE.fullmatch(text):
        return False
    try:
        datetime.date.fromisoformat(text)
    except ValueError:
        return False
    return True


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------------
# The page a file was rated on


@dataclass(frozen=True)
class RatedPage:
    """What a labels file is checked against: the layer's current features.json."""

    path: Path
    content_hash: str
    carded: frozenset[int]
    families: tuple[str, ...]  # "" (none), the page's tag names, "other"


def read_rated_page(labels_path: Path, layer: int, dashboards_root: Path) -> RatedPage:
    features_path = layout.features_file(layer, dashboards_root)
    if not features_path.is_file():
        raise UserError(f"{labels_path}: layer {layer} has no dashboards ({features_path} is missing; "
                        f"run `attnsae dashboards --layer {layer}` first)")

    doc = read_features(features_path, layer)
    try:
        carded = frozenset(card["feature"] for card in doc["cards"])
        families = ("", *doc["tag_definitions"], OTHER_FAMILY)
    except (KeyError, TypeError) as err:
        raise UserError(f"{features_path}: corrupt features.json (no {err})") from None
    return RatedPage(features_path, doc["content_hash"], carded, families)


# ---------------------------------------------------------------------------------------------------
# Checking an exported file: every problem is one line naming the file, the value and what is allowed


def _check_keys(where: str, data: dict, expected: tuple[str, ...]) -> None:
    missing = [key for key in expected if key not in data]
    extra = [key for key in data if key not in expected]
    if missing:
        raise UserError(f"{where}: missing key {missing[0]!r} (expected {_listing(expected)})")
    if extra:
        raise UserError(f"{where}: unknown key {_shown(extra[0])} (expected {_listing(expected)})")


def _check_header(path: Path, data: dict) -> None:
    _check_keys(str(path), data, FILE_KEYS)
    if data["format"] != FORMAT or data["version"] != VERSION:
        raise UserError(f"{path}: format {_shown(data['format'])} version {_shown(data['version'])} is not a labels "
                        f"file (expected format {FORMAT!r} version {VERSION})")
    if not _is_int(data["layer"]) or not 0 <= data["layer"] <= MAX_LAYER:
        raise UserError(f"{path}: layer {_shown(data['layer'])} is not a layer number "
                        f"(an integer from 0 to {MAX_LAYER})")
    if not isinstance(data["rater"], str) or not data["rater"].strip():
        raise UserError(f"{path}: rater {_shown(data['rater'])} is empty (the rater's name is required)")
    _check_text(f"{path}: rater", data["rater"])
    if not isinstance(data["ratings"], list) or not data["ratings"]:
        raise UserError(f"{path}: ratings {_shown(data['ratings'])} holds no ratings (expected a non-empty list)")


def _check_text(where: str, text: str) -> None:
    """Text that goes into a CSV field: short enough for csv to read back, and no carriage return, which
    csv's writer leaves unquoted (our rows end in a line feed) and its reader then takes for the end of a row."""
    if len(text) > MAX_TEXT:
        raise UserError(f"{where} {_shown(text, 40)} is {len(text)} characters long (at most {MAX_TEXT})")
    if "\r" in text:
        raise UserError(f"{where} {_shown(text, 40)} holds a carriage return (\\r): line breaks must be \\n")


def _check_rating(path: Path, index: int, rating: Any, page: RatedPage) -> None:
    where = f"{path}: ratings[{index}]"
    if not isinstance(rating, dict):
        raise UserError(f"{where} is {type(rating).__name__}, expected an object")
    _check_keys(where, rating, RATING_KEYS)
    feature, answer, family = rating["feature"], rating["answer"], rating["family"]
    if not _is_int(feature):
        raise UserError(f"{where}: feature {_shown(feature)} is not a feature id (an integer)")
    if feature not in page.carded:
        raise UserError(f"{where}: feature {_shown(feature)} has no card on the layer page "
                        f"(carded features: {_listing(sorted(page.carded))})")
    if answer not in ANSWERS:
        raise UserError(f"{where}: answer {_shown(answer)} is not one of {_listing(ANSWERS)}")
    if family not in page.families:
        raise UserError(f"{where}: family {_shown(family)} is not one of {_listing(page.families)}")
    if not isinstance(rating["note"], str):
        raise UserError(f"{where}: note {_shown(rating['note'])} is not text")
    _check_text(f"{where}: note", rating["note"])
    if not _is_date(rating["date"]):
        raise UserError(f"{where}: date {_shown(rating['date'])} is not a date (expected YYYY-MM-DD)")


def checked_ratings(path: Path, dashboards_root: Path) -> tuple[int, list[Rating]]:
    """(layer, ratings) of a labels file, checked against that layer's current features.json."""
    data = read_json_object(path, "(a labels file)")
    _check_header(path, data)
    page = read_rated_page(path, data["layer"], dashboards_root)
    if data["content_hash"] != page.content_hash:
        raise UserError(f"{path}: content_hash {_shown(data['content_hash'])} is not the current page's "
                        f"{page.content_hash!r} ({page.path}): rate the current page and export again")
    seen: set[int] = set()
    for index, rating in enumerate(data["ratings"]):
        _check_rating(path, index, rating, page)
        if rating["feature"] in seen:
            raise UserError(f"{path}: ratings[{index}]: feature {rating['feature']} is rated twice (once per file)")
        seen.add(rating["feature"])
    rater = data["rater"].strip()
    return data["layer"], [Rating(r["feature"], r["answer"], r["family"], r["note"], rater, r["date"],
                                  page.content_hash)
                           for r in data["ratings"]]


# ---------------------------------------------------------------------------------------------------
# labels/L<n>.csv


def labels_csv(ratings: list[Rating]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    writer.writerows(astuple(r) for r in sorted(ratings, key=lambda r: (r.feature, r.rater, r.date, r.content_hash)))
    return buffer.getvalue()


def _parse_row(path: Path, line: int, row: list[str]) -> Rating:
    if len(row) != len(CSV_COLUMNS):
        raise UserError(f"{path}: line {line} has {len(row)} fields, "
                        f"expected {len(CSV_COLUMNS)} ({','.join(CSV_COLUMNS)})")
    feature, answer, family, note, rater, date, page_hash = row
    if not (feature.isascii() and feature.isdigit()) or len(feature) > MAX_ID_DIGITS:
        raise UserError(f"{path}: line {line}: feature {_shown(feature)} is not a feature id "
                        f"(a number of at most {MAX_ID_DIGITS} digits)")
    if answer not in ANSWERS:
        raise UserError(f"{path}: line {line}: answer {answer!r} is not one of {_listing(ANSWERS)}")
    if not rater.strip():
        raise UserError(f"{path}: line {line}: the rater is empty")
    if not _is_date(date):
        raise UserError(f"{path}: line {line}: date {date!r} is not a date (expected YYYY-MM-DD)")
    if not HASH.fullmatch(page_hash):
        raise UserError(f"{path}: line {line}: content_hash {page_hash!r} is not sha256:<64 hex digits>")
    return Rating(int(feature), answer, family, note, rater, date, page_hash)


def read_labels(layer: int, labels_root: str | Path = layout.LABELS_DIR) -> list[Rating] | None:
    """The ratings in ``labels/L<n>.csv``; None when nobody rated the layer (no file). A corrupt file is a one-line
    error naming it and the line."""
    path = layout.labels_file(layer, Path(labels_root))
    if not path.exists():
        return None
    reader = csv.reader(io.StringIO(read_text_file(path), newline=""))
    try:
        header = next(reader, None)
        if header != CSV_COLUMNS:
            raise UserError(f"{path}: line 1 is {','.join(header or [])!r}, "
                            f"expected the header {','.join(CSV_COLUMNS)}")
        ratings, seen = [], set()
        for row in reader:
            rating = _parse_row(path, reader.line_num, row)
            key = (rating.feature, rating.rater, rating.content_hash)
            if key in seen:
                raise UserError(f"{path}: line {reader.line_num}: feature {rating.feature} rated twice by "
                                f"{rating.rater!r} on the same page")
            seen.add(key)
            ratings.append(rating)
    except csv.Error as err:
        raise UserError(f"{path}: line {reader.line_num}: corrupt CSV ({err})") from None
    return ratings


def import_labels(
    path: str | Path,
    dashboards_root: str | Path = layout.DASHBOARDS_DIR,
    labels_root: str | Path = layout.LABELS_DIR,
) -> tuple[Path, int]:
    """Check a rater's exported labels file and merge it into ``labels/L<n>.csv``; returns (that csv, rows imported).

    Any problem is a one-line UserError and nothing is written.
    """
    path = Path(path)
    layer, imported = checked_ratings(path, Path(dashboards_root))
    rater, page_hash = imported[0].rater, imported[0].content_hash
    replaced = {r.feature for r in imported}
    out = layout.labels_file(layer, Path(labels_root))
    with _locked(out.parent):
        kept = [r for r in read_labels(layer, labels_root) or []
                if not (r.rater == rater and r.content_hash == page_hash and r.feature in replaced)]
        write_text_atomic(out, labels_csv(kept + imported))
    return out, len(imported)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on the labels folder: raters' imports run at once would otherwise each read the
    CSV, merge and replace it, and the last one would drop the rows the others added. The folder itself is
    locked (flock, POSIX) rather than a lock file in it, because the folder is a DVC dependency of the report."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY)
    except OSError as err:
        raise UserError(f"{folder}: cannot open the labels folder ({err.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # closing fd releases it, and so does the kernel when a kill -9 closes it
        yield
    finally:
        os.close(fd)


def interpretable(ratings: Iterable[Rating], features: Iterable[int],
                  content_hash: str | None = None) -> tuple[int, int]:
    """(yes, rated) over ``features``: the report's "% alive interpretable" is yes / rated.

    ``features`` are the ids the column is about (the report passes the first 30 alive features). Each
    (feature, rater) pair is one vote, that rater's latest answer by date; "unsure" and "no" count as rated
    and not yes, so "% alive interpretable" = votes "yes" / all votes on those features. With
    ``content_hash``, only ratings given on that version of the page count. (0, 0) means "not rated".
    """
    votes = latest_votes(ratings, features, content_hash)
    return sum(v.answer == "yes" for v in votes.values()), len(votes)


@dataclass(frozen=True)
class Agreement:
    """How far raters agree on a set of features: Cohen's kappa over their answers (yes / no / unsure) on the
    features both rated, the mean over rater pairs when there are more than two (Light's kappa)."""

    kappa: float | None  # None: fewer than two raters share a feature, or every shared answer was one category
    raters: int  # raters with at least one vote on the features
    shared: int  # (feature, rater pair) comparisons behind kappa

    def cell(self) -> str:
        if self.raters < 2:
            return "one rater" if self.raters else "not rated"
        behind = f"{self.raters} raters, {self.shared} shared answer{'' if self.shared == 1 else 's'}"
        return f"undefined ({behind})" if self.kappa is None else f"κ {self.kappa:.2f} ({behind})"


def latest_votes(ratings: Iterable[Rating], features: Iterable[int], content_hash: str | None = None
                 ) -> dict[tuple[int, str], Rating]:
    """Each (feature, rater)'s latest rating by date among ``features`` (on the page ``content_hash`` when given)."""
    wanted = set(features)
    votes: dict[tuple[int, str], Rating] = {}
    for rating in ratings:
        if rating.feature not in wanted or (content_hash is not None and rating.content_hash != content_hash):
            continue
        key = (rating.feature, rating.rater)
        if key not in votes or (rating.date, rating.content_hash) > (votes[key].date, votes[key].content_hash):
            votes[key] = rating
    return votes


def cohen_kappa(first: list[str], second: list[str]) -> float | None:
    """Cohen's kappa of two raters' answers on the same items: (observed - chance agreement) / (1 - chance); None
    when chance agreement is 1 (both gave one and the same answer throughout: kappa is undefined)."""
    n = len(first)
    observed = sum(a == b for a, b in zip(first, second)) / n
    chance = sum((first.count(answer) / n) * (second.count(answer) / n) for answer in ANSWERS)
    return None if chance == 1 else (observed - chance) / (1 - chance)


def agreement(ratings: Iterable[Rating], features: Iterable[int], content_hash: str | None = None) -> Agreement:
    """The raters' agreement on ``features`` (each rater's latest answer per feature, as ``interpretable`` counts)."""
    votes = latest_votes(ratings, features, content_hash)
    by_rater: dict[str, dict[int, str]] = {}
    for (feature, rater), vote in votes.items():
        by_rater.setdefault(rater, {})[feature] = vote.answer
    kappas, shared = [], 0
    raters = sorted(by_rater)
    for i, a in enumerate(raters):
        for b in raters[i + 1:]:
            both = sorted(set(by_rater[a]) & set(by_rater[b]))
            if both:
                shared += len(both)
                kappa = cohen_kappa([by_rater[a][f] for f in both], [by_rater[b][f] for f in both])
                if kappa is not None:
                    kappas.append(kappa)
    return Agreement(sum(kappas) / len(kappas) if kappas else None, len(raters), shared)
