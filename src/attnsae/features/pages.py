"""The static HTML page of one layer's feature dashboards, rendered from its features.json document
(``render_layer_page``; the format: formats/features.py and docs/features-json.md; the stage: dashboards.py).

Everything is rendered here, in Python: the page fetches nothing (not even features.json), loads nothing
from the network and works from ``file://``. Its only script is inline and drives the rating mode: answers
per card kept in the browser's localStorage under the layer and the content hash (a rebuilt page starts
empty), a blind option that hides every tag, and an export to the labels file that ``attnsae labels import``
reads (labels.py). Charts are inline SVG; every token string is HTML-escaped and its whitespace shown.

The script and the style are package data, ``assets/page.js`` and ``assets/page.css``, inlined as they are
except for the style's ``${...}`` placeholders, filled from the constants below that the renderer also uses.
"""

from __future__ import annotations

import html
import string
from functools import cache
from importlib import resources
from itertools import zip_longest

from attnsae.features import labels

SOURCES_SHOWN = 24  # DFA source tokens shown per row; earlier ones behind a per-row toggle
# Colours as "r,g,b": activations, positive and negative DFA. A token's colour intensity is one of
# INTENSITY_STEPS + 1 classes (a0..a10, p0..p10, n0..n10), not an inline style: a page holds ~10^5 tokens,
# and the exact value is in each token's title.
INTENSITY_STEPS = 10
ACTIVATION_RGB = "245,124,0"
POSITIVE_RGB = "37,99,235"
NEGATIVE_RGB = "220,38,38"
SUMMARY_OPEN_MAX = 2048  # the all-features table starts folded above this many features (layout time)
VISIBLE = {"\n": "↵", "\t": "→"}


def esc(value: object) -> str:
    """Escaped for element text and double-quoted attributes (every attribute here is double-quoted; ' stays
    as is, shorter in the ~10^5 token titles)."""
    return html.escape(str(value), quote=False).replace('"', "&quot;")


def num(value: float) -> str:
    return f"{value:.3g}"


def percent(fraction: float) -> str:
    return f"{fraction * 100:.3g}%"


def token_text(token: str) -> str:
    """A token as escaped, visible text: newline as ↵, tab as →, other control characters as Python escapes,
    the empty string as ∅ (spaces stay: the page sets white-space: pre-wrap)."""
    visible = "".join(VISIBLE.get(c) or (repr(c)[1:-1] if c.isascii() and not c.isprintable() else c) for c in token)
    return esc(visible or "∅")


def intensity(value: float, scale: float) -> int:
    """The colour step of a value: |value| / scale in [0, 1], rounded to 1 / INTENSITY_STEPS."""
    return round(min(abs(value) / scale, 1.0) * INTENSITY_STEPS) if scale > 0 else 0


def intensity_classes() -> str:
    """CSS for the classes ``intensity`` picks: a<step> (activation), p<step> and n<step> (DFA sign)."""
    return "\n".join(
        f".{prefix}{step} {{ background: rgba({rgb}, {step / INTENSITY_STEPS:g}); }}"
        for prefix, rgb in (("a", ACTIVATION_RGB), ("p", POSITIVE_RGB), ("n", NEGATIVE_RGB))
        for step in range(INTENSITY_STEPS + 1)
    )


# ---------------------------------------------------------------------------------------------------
# Charts: inline SVG


def bars_svg(values: list[float], titles: list[str] | None = None, labels_below: list[str] | None = None,
             width: int = 240, height: int = 60, title: str = "") -> str:
    """Vertical bars around a zero line (positive blue up, negative red down), with a tooltip per bar
    (``titles``) or one for the whole chart (``title``: the small charts of DFA rows, kept short)."""
    label_space = 11 if labels_below else 0
    plot = height - label_space - 2
    top, bottom = max([0.0, *values]), min([0.0, *values])
    span = (top - bottom) or 1.0
    zero = 1 + plot * top / span
    step = width / max(len(values), 1)
    parts = [f"<title>{esc(title)}</title>"] if title else []
    parts.append(f'<line x1="0" x2="{width}" y1="{zero:.1f}" y2="{zero:.1f}" class="axis"/>')
    for i, value in enumerate(values):
        size = plot * abs(value) / span
        rect = (f'<rect x="{(i + 0.1) * step:.1f}" y="{zero - size if value >= 0 else zero:.1f}" '
                f'width="{0.8 * step:.1f}" height="{size:.1f}" class="{"p" if value >= 0 else "n"}"')
        parts.append(f"{rect}><title>{esc(titles[i])}</title></rect>" if titles else f"{rect}/>")
    for i, label in enumerate(labels_below or []):
        parts.append(f'<text x="{(i + 0.5) * step:.1f}" y="{height - 1}">{esc(label)}</text>')
    return f'<svg class="bars" width="{width}" height="{height}" viewBox="0 0 {width} {height}">{"".join(parts)}</svg>'


def head_bars(values: list[float], what: str) -> str:
    """A card's per-head chart: a labelled bar and a tooltip per head."""
    titles = [f"{what}, head {h}: {num(v)}" for h, v in enumerate(values)]
    return bars_svg(values, titles, [f"h{h}" for h in range(len(values))])


def histogram_block(histogram: dict) -> str:
    edges, counts = histogram["bin_edges"], histogram["counts"]
    titles = [f"{num(lo)} to {num(hi)}: {count:,}" for lo, hi, count in zip(edges, edges[1:], counts)]
    caption = (f"{num(edges[0])} … {num(edges[-1])}, {len(counts)} bins, tallest {max(counts, default=0):,}"
               if edges else "")
    return (f'<div class="panel"><h4>Activation histogram</h4>{bars_svg([float(c) for c in counts], titles)}'
            f'<p class="muted">{esc(caption)}</p></div>')


# ---------------------------------------------------------------------------------------------------
# Tokens and examples


def activation_span(token: str, activation: float, max_activation: float, own: bool) -> str:
    title = esc(f"{token!r}: {activation:.4g}")
    return (f'<span class="tok a{intensity(activation, max_activation)}{" hit" if own else ""}" title="{title}">'
            f"{token_text(token)}</span>")


def source_span(token: str, value: float, scale: float, position: int, own: bool, early: bool) -> str:
    """A DFA source token, kept short (a page holds ~10^5): class p<step> or n<step>, "e" while folded away."""
    classes = (("p" if value >= 0 else "n") + str(intensity(value, scale)) + (" hit" if own else "")
               + (" e" if early else ""))
    return f'<span class="{classes}" title="{position}: {value:.4g}">{token_text(token)}</span>'


def dfa_row(example: dict) -> str:
    """DFA at the example's own token by source position (the last SOURCES_SHOWN shown, the rest behind a
    toggle), by head, and how the total plus the bias remainder make the pre-activation."""
    dfa = example["dfa"]
    values, tokens = dfa["by_source"], dfa["source_tokens"]
    scale = max((abs(v) for v in values), default=0.0)
    hidden = max(0, len(values) - SOURCES_SHOWN)
    spans = "".join(
        source_span(token, value, scale, dfa["sources_start"] + i, i == len(values) - 1, i < hidden)
        for i, (token, value) in enumerate(zip(tokens, values))
    )
    toggle = f'<label class="more"><input type="checkbox" class="all">{hidden} earlier</label>' if hidden else ""
    sums = (f'total {num(dfa["total"])} + bias remainder {num(dfa["bias_remainder"])} '
            f'= pre-activation {num(dfa["pre_activation"])}')
    by_head = dfa["by_head"]
    heads = bars_svg(by_head, width=10 * len(by_head), height=22,
                     title="DFA by head: " + ", ".join(f"h{h} {num(v)}" for h, v in enumerate(by_head)))
    return (f'<div class="dfa-row"><span class="label">DFA by source</span><div class="dfa-body">'
            f'<div class="srcs">{toggle}{spans}</div><div class="sums">{heads}<span>by head; {esc(sums)}</span></div>'
            f'</div></div>')


def example_block(example: dict, max_activation: float) -> str:
    own = example["position"] - example["start"]
    tokens = "".join(activation_span(token, act, max_activation, i == own)
                     for i, (token, act) in enumerate(zip(example["tokens"], example["activations"])))
    where = (f'{num(example["activation"])} · row {example["row"]} · pos {example["position"]} · '
             f'doc {example["document"]}')
    return (f'<div class="example"><div class="ex-line"><span class="where">{esc(where)}</span>'
            f'<span class="toks">{tokens}</span></div>{dfa_row(example)}</div>')


def interval_block(interval: dict, max_activation: float) -> str:
    title = (f'{num(interval["low"])} to {num(interval["high"])}: {interval["share"] * 100:.1f}% of firing tokens '
             f'({interval["firing_tokens"]:,})')
    examples = ("".join(example_block(e, max_activation) for e in interval["examples"])
                or '<p class="muted">no examples</p>')
    return f'<div class="interval"><h5>{esc(title)}</h5>{examples}</div>'


# ---------------------------------------------------------------------------------------------------
# A card


def tags_block(card: dict, summary: dict) -> str:
    """The card's tags as chips and every tag's score and null percentile (hidden in blind mode)."""
    feature = card["feature"]
    chips = ("".join(f'<span class="chip">{esc(tag)}</span>' for tag in card["tags"])
             or '<span class="muted">no tags</span>')
    scores = "".join(
        f'<tr class="{"tagged" if tag in card["tags"] else ""}"><td>{esc(tag)}</td><td>{num(values[feature])}</td>'
        f'<td>{num(summary["percentiles"][tag][feature])}</td></tr>'
        for tag, values in summary["scores"].items()
    )
    return (f'<div class="tags">{chips}<details><summary>tag scores</summary><table class="scores"><thead><tr>'
            f'<th>tag</th><th>score</th><th>null percentile</th></tr></thead><tbody>{scores}</tbody></table>'
            f'</details></div>')


def logits_block(logits: dict) -> str:
    def cells(entry: dict | None) -> str:
        if entry is None:
            return "<td></td><td></td>"
        return f'<td class="tokname">{token_text(entry["token"])}</td><td>{num(entry["value"])}</td>'

    rows = "".join(f"<tr>{cells(top)}{cells(bottom)}</tr>"
                   for top, bottom in zip_longest(logits["top"], logits["bottom"]))
    return (f'<div class="panel"><h4>Logit effects</h4><table class="logits"><thead><tr><th colspan="2">top</th>'
            f'<th colspan="2">bottom</th></tr></thead><tbody>{rows}</tbody></table></div>')


def heads_block(heads: dict) -> str:
    return (f'<div class="panel"><h4>Heads</h4><p class="muted">decoder-weight share</p>'
            f'{head_bars(heads["decoder_share"], "decoder share")}'
            f'<p class="muted">DFA share (top examples)</p>{head_bars(heads["dfa_share"], "DFA share")}</div>')


def rating_block(feature: int, families: list[str]) -> str:
    answers = "".join(f'<label><input type="radio" name="answer-{feature}" value="{a}"> {a}</label>'
                      for a in labels.ANSWERS)
    options = "".join(f'<option value="{esc(f)}">{esc(f or "family: none")}</option>' for f in families)
    return (f'<div class="rate">{answers}<select class="family" name="family-{feature}">{options}</select>'
            f'<input type="text" class="note" name="note-{feature}" placeholder="note (optional)"></div>')


def card_section(card: dict, summary: dict, families: list[str]) -> str:
    feature, max_activation = card["feature"], card["max_activation"]
    facts = (f'density {percent(card["density"])} · max activation {num(max_activation)} · '
             f'{card["firing_tokens"]:,} firing tokens · card: ')
    reason = card["reason"]  # "best <tag>" names a tag: hidden in blind mode with the others
    reason = f'<span class="tags">{esc(reason)}</span>' if reason.startswith("best ") else esc(reason)
    top = "".join(example_block(e, max_activation) for e in card["top_examples"])
    intervals = "".join(interval_block(i, max_activation) for i in card["intervals"])
    return (
        f'<section class="card" id="f{feature}" data-feature="{feature}"><h3>Feature {feature}</h3>'
        f'<p class="facts">{esc(facts)}{reason}</p>{tags_block(card, summary)}{rating_block(feature, families)}'
        f'<div class="columns"><div class="main"><h4>Top activations</h4>{top}'
        f'<h4>Activation intervals</h4>{intervals}</div>'
        f'<div class="side">{histogram_block(card["histogram"])}{logits_block(card["logits"])}'
        f'{heads_block(card["heads"])}</div></div></section>'
    )


# ---------------------------------------------------------------------------------------------------
# The page's header and the all-features table


def facts_table(doc: dict) -> str:
    tokens, alive = doc["tokens"], doc["alive"]
    facts = {
        "layer": f'{doc["layer"]} ({doc["hook_name"]})',
        "model": doc["model"],
        "SAE": f'{doc["sae"]}: {doc["d_sae"]:,} features, {doc["n_heads"]} heads x {doc["d_head"]}',
        "tokens": (f'{tokens["count"]:,} ({tokens["rows"]:,} rows of {tokens["context_size"]} from the '
                   f'{tokens["split"]} split, {tokens["documents"]:,} documents)'),
        "alive": f'{alive["count"]:,} of {doc["d_sae"]:,}: {alive["definition"]} ({alive["tokens"]:,} tokens)',
        "content hash": doc["content_hash"],
        "logit effect": doc["logit_definition"],
        "DFA": doc["dfa_definition"],
        "null baseline": f'{doc["null"]["description"]} ({doc["null"]["directions"]} directions, '
                         f'percentile {num(doc["null"]["percentile"])})',
    }
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in facts.items())
    return f'<table class="facts">{rows}</table>'


def tag_definitions_table(doc: dict) -> str:
    tagged = {tag: 0 for tag in doc["tag_definitions"]}
    for tags in doc["summary"]["tags"]:
        for tag in tags:
            tagged[tag] = tagged.get(tag, 0) + 1
    rows = "".join(
        f'<tr><th>{esc(tag)}</th><td class="text">{esc(d["formula"])}</td><td>{num(d["threshold"])}</td>'
        f'<td>{esc(d["source"])}</td><td>{d["probe_prompts"]}</td><td class="text">{esc(d["probe"])}</td>'
        f'<td>{tagged[tag]:,}</td></tr>'
        for tag, d in doc["tag_definitions"].items()
    )
    return ('<table id="tag-definitions" class="definitions"><thead><tr><th>tag</th><th>score</th><th>threshold</th>'
            '<th>source</th><th>probe prompts</th><th>probe</th><th>features tagged</th></tr></thead>'
            f"<tbody>{rows}</tbody></table>")


FAMILY_SHOWN = 20  # features listed per family, best first; the rest are counted


def families_section(doc: dict, carded: set[int]) -> str:
    """Per tag: how many features carry it, the best one (its card linked), the next ones by score; or that none
    scored above the tag's threshold and its null on this layer. Hidden in blind mode (it names tags)."""
    scores = doc["summary"]["scores"]
    rows = []
    for tag, family in doc["families"].items():
        ranked = family["ranked"]
        if not ranked:
            rows.append(f'<tr><th>{esc(tag)}</th><td>0</td><td colspan="2" class="muted">no feature above its '
                        f'threshold and its null on this layer</td></tr>')
            continue

        def name(f: int, tag: str = tag) -> str:
            label = f"{f} ({num(scores[tag][f])})"
            return f'<a href="#f{f}">{label}</a>' if f in carded else label

        more = f" and {len(ranked) - FAMILY_SHOWN:,} more" if len(ranked) > FAMILY_SHOWN else ""
        rows.append(f'<tr><th>{esc(tag)}</th><td>{len(ranked):,}</td><td>{name(family["best"])}</td>'
                    f'<td class="text">{" · ".join(name(f) for f in ranked[1:FAMILY_SHOWN])}{more}</td></tr>')
    return ('<section id="families" class="tags"><h2>Families</h2><p class="muted">Each family\'s features by score '
            '(in parentheses), best first; the best one always has a card.</p><table class="definitions"><thead><tr>'
            '<th>tag</th><th>features</th><th>best</th><th>next by score</th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></section>')


def summary_table(doc: dict, carded: set[int]) -> str:
    """One small row per feature; a feature with a card links to it."""
    summary = doc["summary"]
    rows = []
    for feature, (density, max_activation, alive, tags) in enumerate(
        zip(summary["density"], summary["max_activation"], summary["alive"], summary["tags"])
    ):
        name = f'<a href="#f{feature}">{feature}</a>' if feature in carded else str(feature)
        rows.append(f'<tr><td>{name}</td><td>{"✓" if alive else ""}</td><td>{percent(density)}</td>'
                    f'<td>{num(max_activation)}</td><td class="tags">{esc(" ".join(tags))}</td></tr>')
    table = ('<table id="summary"><thead><tr><th>feature</th><th>alive</th><th>density</th><th>max activation</th>'
             f'<th class="tags">tags</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')
    opened = " open" if len(rows) <= SUMMARY_OPEN_MAX else ""
    return (f"<details{opened}><summary>all {len(rows):,} features: density, max activation, tags</summary>"
            f"{table}</details>")


RATING_BAR = """<div id="rating-bar">
<label><input type="checkbox" id="rate-mode"> rate features</label>
<span id="rating-controls">
<label>rater <input type="text" id="rater" placeholder="your name"></label>
<label><input type="checkbox" id="blind"> blind (hide tags)</label>
<span id="rated-count"></span>
<button type="button" id="export">export {file_name}</button>
<span id="status"></span>
</span></div>"""

ASSETS = resources.files("attnsae.features") / "assets"


@cache
def asset(name: str) -> str:
    """An asset file's text, read once. A missing one (attnsae installed without its package data) fails here
    rather than giving a page without its style or its rating script."""
    try:
        return (ASSETS / name).read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"the dashboard page's {name} is missing from {ASSETS}: attnsae was installed without its package "
            "data (pyproject.toml, [tool.setuptools.package-data]); reinstall it") from err


@cache
def style() -> str:
    """page.css with the values that the renderer also uses filled in: the intensity classes and chart colours."""
    return string.Template(asset("page.css")).substitute(
        intensity_classes=intensity_classes(), positive_rgb=POSITIVE_RGB, negative_rgb=NEGATIVE_RGB)


def render_layer_page(doc: dict) -> str:
    """The complete HTML page of a layer's dashboards, from its features.json document."""
    layer = doc["layer"]
    cards = doc["cards"]
    carded = {card["feature"] for card in cards}
    families = ["", *doc["tag_definitions"], labels.OTHER_FAMILY]
    card_links = " · ".join(f'<a href="#f{c["feature"]}">{c["feature"]}</a>' for c in cards) or "none"
    sections = "".join(card_section(card, doc["summary"], families) for card in cards)
    title = f"attnsae dashboards: L{layer}, {doc['model']}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<link rel="icon" href="data:,">
<style>
{style()}</style></head>
<body data-layer="{layer}" data-content-hash="{esc(doc['content_hash'])}" \
data-labels-format="{labels.FORMAT}" data-labels-version="{labels.VERSION}">
{RATING_BAR.format(file_name=f"labels-L{layer}.json")}
<h1>Feature dashboards: layer {layer}</h1>
{facts_table(doc)}
<h2>Family tags</h2>
<p class="muted">{esc(doc["tag_rule"])} Tags never fill the "% alive interpretable" column, which only people's
ratings do. Blind mode hides them while rating.</p>
{tag_definitions_table(doc)}
{families_section(doc, carded)}
<h2>Features</h2>
<p>Cards ({len(cards)}): {card_links}</p>
{summary_table(doc, carded)}
<h2>Cards</h2>
<p class="muted">Token colour: activation / the feature's max activation (the example's own token outlined).
DFA rows: each source position's direct feature attribution at that token, blue positive, red negative,
relative to the row's largest |value|; bars per head.</p>
{sections}
<script>
{asset("page.js")}</script>
</body></html>
"""
