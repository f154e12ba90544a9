"""The layer page rendered from a small synthetic features.json: its HTML structure in Python, then the page
in headless Chromium from file:// (the Debian package, driven with playwright; no browser download): no
console messages, no requests, coloured tokens, a DFA row per example, and the rating mode's export
imported by ``labels.import_labels``.
"""

from __future__ import annotations

import csv
import datetime
import html.parser
import json
import math
import re
import shutil
from pathlib import Path

import pytest

from attnsae import layout
from attnsae.errors import UserError
from attnsae.features import labels, pages
from attnsae.features.pages import SOURCES_SHOWN, render_layer_page
from attnsae.formats.features import content_hash, families_of

LAYER = 3
D_SAE = 12
HEADS = 3
CONTEXT = 40
CARDED = [2, 7]
TAGS = ["induction", "previous_token", "local_context"]
SCRIPT_TOKEN = "<script>window.pwned = 1</script>"
WORDS = [" the", " cat", "\n", "  sat", SCRIPT_TOKEN, " on", "&amp;", "\t", "\r"]


def row_tokens(row: int) -> list[str]:
    return [WORDS[(row + i) % len(WORDS)] for i in range(CONTEXT)]


def example(row: int, position: int, activation: float) -> dict:
    start, end = max(0, position - 16), min(CONTEXT, position + 5)
    by_source = [round(math.sin(row + 3 * s), 6) for s in range(position + 1)]
    total = sum(by_source)
    return {
        "row": row, "position": position, "document": row // 2, "activation": activation, "start": start,
        "tokens": row_tokens(row)[start:end],
        "activations": [activation if p == position else round(activation * (p % 3) / 4, 6) for p in range(start, end)],
        "dfa": {"sources_start": 0, "by_source": by_source, "source_tokens": row_tokens(row)[: position + 1],
                "by_head": [total * 0.5, total * 0.3, total * 0.2], "total": total,
                "bias_remainder": -0.1, "pre_activation": total - 0.1},
    }


def card(feature: int) -> dict:
    top = 2.0 + feature / 10
    return {
        "feature": feature, "reason": "first_n" if feature == CARDED[0] else "random", "density": 0.01 * feature,
        "max_activation": top,
        "firing_tokens": 40 + feature, "tags": ["induction"] if feature == CARDED[0] else [],
        "top_examples": [example(feature, 30, top), example(feature + 1, 10, top * 0.9)],  # 31 sources: some folded
        "intervals": [
            {"low": 0.0, "high": top / 2, "firing_tokens": 30, "share": 0.75, "examples": [example(4, 8, top / 4)]},
            {"low": top / 2, "high": top, "firing_tokens": 10, "share": 0.25, "examples": [example(5, 12, top * 0.6)]},
        ],
        "histogram": {"bin_edges": [0.0, top / 4, top / 2, 3 * top / 4, top], "counts": [20, 10, 6, 4]},
        "logits": {"top": [{"token": " <b>bold</b>", "id": 7, "value": 0.5}, {"token": "\n", "id": 8, "value": 0.4}],
                   "bottom": [{"token": " no", "id": 9, "value": -0.3}]},
        "heads": {"decoder_share": [0.6, 0.3, 0.1], "dfa_share": [0.7, 0.5, -0.2]},
    }


def synthetic_doc() -> dict:
    """A features.json document (format 2) for a layer with 12 features, 3 heads and 2 cards."""
    doc = {
        "format": "attnsae-dashboards", "version": 2, "layer": LAYER, "hook_name": f"blocks.{LAYER}.attn.hook_z",
        "model": "tiny <test> model", "sae": f"models/sae/L{LAYER}", "d_sae": D_SAE, "n_heads": HEADS, "d_head": 4,
        "tokens": {"split": "eval", "rows": 6, "context_size": CONTEXT, "count": 240, "documents": 3},
        "alive": {"definition": "fired at least once on the first 240 evaluation tokens", "tokens": 240, "count": 10},
        "logit_definition": "decoder row through W_O, the final norm's weight and W_U",
        "dfa_definition": "attention-weighted value contributions to the encoder's dot product",
        "tag_definitions": {
            tag: {"formula": f"{tag} score", "threshold": 0.3, "source": "probe", "probe_prompts": 8, "probe": "probes"}
            for tag in TAGS
        },
        "tag_rule": "score >= threshold and percentile >= the null percentile",
        "null": {"directions": 16, "percentile": 99.0, "description": "random encoder directions of the same norm"},
        "summary": {
            "density": [0.01 * f for f in range(D_SAE)],
            "max_activation": [1.0 + f / 10 for f in range(D_SAE)],
            "alive": [f not in (0, 5) for f in range(D_SAE)],
            "tags": [["induction"] if f == CARDED[0] else [] for f in range(D_SAE)],
            "scores": {tag: [f / D_SAE for f in range(D_SAE)] for tag in TAGS},
            "percentiles": {tag: [100.0 * f / D_SAE for f in range(D_SAE)] for tag in TAGS},
        },
        "cards": [card(f) for f in CARDED],
    }
    doc["families"] = families_of(doc["summary"]["tags"], doc["summary"]["scores"])
    doc["rating_sets"] = {"first_n": {"rule": "the first alive", "features": CARDED[:1]},
                          "random": {"rule": "drawn at random", "features": CARDED[1:]}}
    return {**doc, "content_hash": content_hash(doc)}


def shown_examples(doc: dict) -> int:
    return sum(len(c["top_examples"]) + sum(len(i["examples"]) for i in c["intervals"]) for c in doc["cards"])


class Dom(html.parser.HTMLParser):
    """Elements with their classes, the text inside each .tok span, and the number of <script> elements."""

    VOID = {"input", "meta", "link", "br", "img", "hr"}

    def __init__(self):
        super().__init__()
        self.stack: list[set[str]] = []
        self.elements: list[tuple[str, dict]] = []
        self.token_texts: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.elements.append((tag, attrs))
        classes = set((attrs.get("class") or "").split())
        if "tok" in classes:
            self.token_texts.append("")
        if tag not in self.VOID:
            self.stack.append(classes)

    def handle_startendtag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        self.stack.pop()

    def handle_data(self, data):
        if self.stack and "tok" in self.stack[-1]:
            self.token_texts[-1] += data

    def with_class(self, name: str, tag: str | None = None) -> list[dict]:
        return [a for t, a in self.elements if name in (a.get("class") or "").split() and tag in (None, t)]


@pytest.fixture(scope="module")
def doc() -> dict:
    return synthetic_doc()


@pytest.fixture(scope="module")
def dom(doc) -> Dom:
    parsed = Dom()
    parsed.feed(render_layer_page(doc))
    parsed.close()
    assert parsed.stack == []  # every element closed: the markup is balanced
    return parsed


def test_one_card_per_card_and_one_dfa_row_per_shown_example(doc, dom):
    assert [a["id"] for a in dom.with_class("card", "section")] == [f"f{f}" for f in CARDED]
    assert len(dom.with_class("dfa-row")) == shown_examples(doc) == 8
    assert len(dom.with_class("example")) == shown_examples(doc)
    # the example's own token is outlined, once per example; DFA sources beyond the last 24 start folded
    assert len(dom.with_class("hit", "span")) == 2 * shown_examples(doc)
    folded = sum(max(0, e["position"] + 1 - SOURCES_SHOWN) for c in doc["cards"] for e in c["top_examples"])
    assert len(dom.with_class("e")) == folded > 0


def test_tokens_are_escaped_shown_and_inert(doc, dom):
    page = render_layer_page(doc)
    assert SCRIPT_TOKEN not in page and "<b>bold</b>" not in page
    assert sum(tag == "script" for tag, _ in dom.elements) == 1  # the page's own rating script, nothing else
    assert SCRIPT_TOKEN in dom.token_texts  # shown as text
    assert "↵" in dom.token_texts and "→" in dom.token_texts and "\\r" in dom.token_texts and "  sat" in dom.token_texts
    assert not any(c in text for c in "\n\t\r" for text in dom.token_texts)
    assert all(re.fullmatch(r"tok a\d+( hit)?", a["class"]) and a["title"] for a in dom.with_class("tok"))


def test_summary_has_a_row_per_feature_linking_the_cards(doc, dom):
    links = [a["href"] for t, a in dom.elements if t == "a" and a.get("href", "").startswith("#f")]
    assert sorted(set(links)) == sorted(f"#f{f}" for f in CARDED)
    assert len([a for a in dom.with_class("tags", "td")]) == D_SAE  # tag cells blind mode hides
    assert len(dom.with_class("tags", "div")) == len(CARDED)


def test_families_section_names_each_family_best_first_and_hides_in_blind_mode(doc):
    page = render_layer_page(doc)
    section = re.search(r'<section id="families" class="tags">(.*?)</section>', page, flags=re.DOTALL).group(1)
    rows = re.findall(r"<tr><th>([a-z_]+)</th>(.*?)</tr>", section.split("<tbody>")[1])
    assert [tag for tag, _ in rows] == list(doc["families"])
    for tag, cells in rows:
        if tag == "induction":  # carried by the first carded feature alone: it is the best, linked to its card
            assert f'<td>1</td><td><a href="#f{CARDED[0]}">{CARDED[0]} (' in cells
        else:
            assert "no feature above its threshold and its null on this layer" in cells


def test_rating_controls_per_card_and_nothing_external(doc, dom):
    for feature in CARDED:
        answers = [a["value"] for t, a in dom.elements if t == "input" and a.get("name") == f"answer-{feature}"]
        assert answers == list(labels.ANSWERS)
    options = [a["value"] for t, a in dom.elements if t == "option"]
    assert options == (["", *TAGS, "other"]) * len(CARDED)
    references = [a.get("src") or a.get("href") for t, a in dom.elements if "src" in a or "href" in a]
    assert all(ref.startswith("#") or ref == "data:," for ref in references), references


def test_page_inlines_the_shipped_script_and_style_verbatim(doc):
    """The assets are package data: a wheel built without them fails here rather than shipping bare pages."""
    page = render_layer_page(doc)
    script = (pages.ASSETS / "page.js").read_text(encoding="utf-8")
    assert f"<script>\n{script}</script>" in page
    style = (pages.ASSETS / "page.css").read_text(encoding="utf-8")
    pieces = re.split(r"\$\{\w+\}", style)  # the file's text between the placeholders the renderer fills
    assert len(pieces) > 1 and re.search("<style>\n" + "[^<]+".join(map(re.escape, pieces)) + "</style>", page)


@pytest.mark.parametrize("missing", ["page.css", "page.js"])
def test_a_missing_asset_fails_loudly(doc, monkeypatch, tmp_path, missing):
    for name in {"page.css", "page.js"} - {missing}:
        (tmp_path / name).write_text((pages.ASSETS / name).read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.setattr(pages, "ASSETS", tmp_path)
    pages.asset.cache_clear()
    pages.style.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match=f"{missing} is missing .*package data"):
            render_layer_page(doc)
    finally:  # the next render reads the real assets again
        pages.asset.cache_clear()
        pages.style.cache_clear()


# ---------------------------------------------------------------------------------------------------
# In the browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"]


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (`make browser` installs the Debian package)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the test extras)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture()
def site(tmp_path, doc) -> tuple[Path, Path]:
    """(dashboards root, labels root) with the layer's features.json and page written where the stage writes them."""
    root = tmp_path / "dashboards"
    layout.features_file(LAYER, root).parent.mkdir(parents=True)
    layout.features_file(LAYER, root).write_text(json.dumps(doc))
    layout.dashboard_page(LAYER, root).write_text(render_layer_page(doc), encoding="utf-8")
    return root, tmp_path / "labels"


def open_page(browser, url: str):
    """A fresh context and page on ``url``; returns (page, console messages and page errors, requested URLs)."""
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    messages, requests = [], []
    page.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda err: messages.append(f"uncaught: {err}"))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(url)
    return page, messages, requests


@pytest.mark.integration
def test_page_in_chromium_loads_clean_with_coloured_tokens_and_dfa_rows(browser, site, doc):
    root, _ = site
    url = layout.dashboard_page(LAYER, root).resolve().as_uri()
    page, messages, requests = open_page(browser, url)
    assert messages == []
    assert requests == [url]  # the page alone: no fetch, no CDN, no favicon
    assert page.evaluate("window.pwned") is None
    colours = page.eval_on_selector_all(
        "section.card span.tok", "spans => spans.map(s => getComputedStyle(s).backgroundColor)")
    assert len(colours) == sum(len(e["tokens"]) for c in doc["cards"] for e in c["top_examples"]) + sum(
        len(e["tokens"]) for c in doc["cards"] for i in c["intervals"] for e in i["examples"])
    assert sum(c.startswith("rgba(245, 124, 0") or c == "rgb(245, 124, 0)" for c in colours) >= len(colours) // 2
    assert page.locator(".dfa-row").count() == shown_examples(doc)
    row = page.locator("#f2 .dfa-row").first
    assert row.locator(".srcs > .e").first.is_hidden()
    row.locator("input.all").check()
    assert row.locator(".srcs > .e").first.is_visible()
    dfa_colours = set(page.eval_on_selector_all(
        "#f2 .srcs > span",
        "spans => spans.map(s => getComputedStyle(s).backgroundColor.split(',').slice(0, 3).join())"))
    assert {"rgba(37, 99, 235", "rgba(220, 38, 38"} <= dfa_colours  # positive blue and negative red sources
    page.context.close()


def rate(page, feature: int, answer: str, family: str = "", note: str = "") -> None:
    card = page.locator(f"#f{feature}")
    card.locator(f"input[value={answer}]").check()
    if family:
        card.locator("select.family").select_option(family)
    if note:
        card.locator("input.note").fill(note)


def tags_display(page) -> set[str]:
    return set(page.eval_on_selector_all(".tags", "els => els.map(e => getComputedStyle(e).display)"))


@pytest.mark.integration
def test_rating_mode_exports_a_file_that_imports_and_a_tampered_copy_fails(browser, site, doc, tmp_path):
    root, labels_root = site
    page, messages, _ = open_page(browser, layout.dashboard_page(LAYER, root).resolve().as_uri())
    assert page.locator("section.card .rate").first.is_hidden()
    page.locator("#rate-mode").check()
    rate(page, 2, "yes", family="induction", note="A B ... A, <second> A")
    rate(page, 7, "unsure")
    page.locator("#export").click()  # no file without a rater's name
    assert page.locator("#status").inner_text() == "enter your name as rater first"
    page.locator("#rater").fill("ada")
    assert page.locator("#rated-count").inner_text() == "2 of 2 cards rated"
    assert "none" not in tags_display(page)
    page.locator("#blind").check()
    assert tags_display(page) == {"none"}  # card chips and the summary's tag column

    page.reload()  # answers, rater and modes come back from localStorage
    assert page.locator("#f2 input[value=yes]").is_checked() and page.locator("#f7 input[value=unsure]").is_checked()
    assert page.locator("#f2 select.family").input_value() == "induction"
    assert page.locator("#rater").input_value() == "ada" and tags_display(page) == {"none"}

    with page.expect_download() as download:
        page.locator("#export").click()
    assert download.value.suggested_filename == f"labels-L{LAYER}.json"
    exported = tmp_path / download.value.suggested_filename
    download.value.save_as(exported)
    assert messages == []

    rebuilt = tmp_path / "rebuilt.html"  # another content hash: another page, its answers start empty
    rebuilt.write_text(render_layer_page({**doc, "content_hash": "sha256:" + "1" * 64}), encoding="utf-8")
    page.goto(rebuilt.as_uri())
    assert page.locator("#rated-count").inner_text() == "0 of 2 cards rated"
    page.context.close()

    csv_path, count = labels.import_labels(exported, root, labels_root)
    assert (csv_path, count) == (layout.labels_file(LAYER, labels_root), 2)
    rows = list(csv.DictReader(csv_path.read_text().splitlines()))
    assert [(r["feature"], r["answer"], r["family"], r["note"], r["rater"]) for r in rows] == [
        ("2", "yes", "induction", "A B ... A, <second> A", "ada"), ("7", "unsure", "", "", "ada")]
    assert {r["content_hash"] for r in rows} == {doc["content_hash"]}
    dates = {datetime.date.fromisoformat(r["date"]) for r in rows}
    assert all(abs((d - datetime.date.today()).days) <= 1 for d in dates)  # the browser's local date

    before = csv_path.read_bytes()
    good = json.loads(exported.read_text())
    for name, change, fragment in [
        ("hash", {"content_hash": "sha256:" + "0" * 64}, "content_hash"),
        ("feature", {"ratings": [*good["ratings"], {**good["ratings"][0], "feature": 5}]}, "feature 5"),
    ]:
        tampered = tmp_path / f"tampered-{name}.json"
        tampered.write_text(json.dumps({**good, **change}))
        with pytest.raises(UserError) as err:
            labels.import_labels(tampered, root, labels_root)
        assert len(str(err.value).splitlines()) == 1 and str(tampered) in str(err.value) and fragment in str(err.value)
        assert csv_path.read_bytes() == before


@pytest.mark.integration
def test_two_raters_in_chromium_give_the_random_samples_share_and_their_agreement(browser, site, doc, tmp_path):
    """Two raters rate both cards (the first alive feature and the random sample's) in the page, export, import; the
    report reads the random sample's share and the raters' kappa from labels/L<n>.csv."""
    from attnsae.reporting.report import read_dashboard

    root, labels_root = site
    answers = {"ada": {CARDED[0]: "yes", CARDED[1]: "yes"}, "bo": {CARDED[0]: "yes", CARDED[1]: "no"}}
    for rater, given in answers.items():
        page, messages, _ = open_page(browser, layout.dashboard_page(LAYER, root).resolve().as_uri())
        page.locator("#rate-mode").check()
        page.locator("#rater").fill(rater)
        for feature, answer in given.items():
            rate(page, feature, answer)
        with page.expect_download() as download:
            page.locator("#export").click()
        exported = tmp_path / f"{rater}.json"
        download.value.save_as(exported)
        assert messages == []
        page.context.close()
        labels.import_labels(exported, root, labels_root)
    seen = read_dashboard(LAYER, None, root, labels_root, tmp_path)
    assert (seen.yes, seen.rated, seen.sample_yes, seen.sample_rated) == (2, 2, 1, 2)
    assert seen.sample_cell() == "50% (1/2 rated)"
    # one shared answer each: both "yes" on the first (chance agreement 1: kappa undefined), yes / no on the sample
    assert seen.agreement.cell() == "undefined (2 raters, 1 shared answer)"
    assert seen.sample_agreement.cell() == "κ 0.00 (2 raters, 1 shared answer)"
