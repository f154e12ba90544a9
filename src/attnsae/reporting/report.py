"""The `report` stage: the per-layer table as Markdown and a self-contained HTML page.

Reads ``reports/metrics``, ``reports/metrics_heldout``, ``reports/density``, ``reports/dashboards``, ``labels``,
``models/base``, ``data/tokens`` and ``models/sae``; writes ``reports/report.md``, ``reports/index.html`` and
``reports/layers.csv`` (``build_report``). Every path: layout.py.

The table's "% alive interpretable" comes from people only: the ratings in ``labels/L<n>.csv`` (made in a layer
page's rating mode, added with `attnsae labels import`) of the features that have a card because they are among
the first ``dashboards.first_n`` alive ones. Family tags are counted in a table of their own and never fill it.

Everything comes from files the earlier stages wrote (metrics JSON, density CSV, model, token and SAE
metadata); nothing is recomputed here. Our numbers stand next to a reference chosen by
``report.compare`` (src/attnsae/evaluation/comparison.py) with the differences, each with its bootstrap standard
error ("0.731 ± 0.012") where its file has one, and the SAEs' numbers on the held-out source stand next to the
in-distribution ones. The HTML page carries its plots as inline PNGs and has no scripts and no external URLs, so it
opens anywhere, offline.

Both files say the same things, so the report is described once, as a list of sections (title, intro, notes, a
table, a figure, links: ``report_sections``), and two renderers write it out: ``render_markdown`` (text only; it
points to the page for the plots) and ``render_html``.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from attnsae import layout
from attnsae.evaluation.comparison import Reference, difference, resolve_reference
from attnsae.features.labels import Agreement, agreement, interpretable, read_labels
from attnsae.files import write_texts_atomic
from attnsae.formats.features import read_features, tag_counts
from attnsae.formats.metrics import format_value, numeric_metrics, read_density, read_heldout_metrics, read_metrics
from attnsae.formats.model_info import read_model_info
from attnsae.formats.sae_cfg import attnsae_metadata, read_sae_cfg
from attnsae.formats.tokens_meta import read_tokens_meta
from attnsae.reporting.frontier import frontier_figure, frontier_markdown, read_frontier
from attnsae.reporting.repository import git_state, project_root


def _points(d: float) -> str:
    return f"{d * 100:+.1f} pp"  # a difference of two percentages, in percentage points


# key, title, format of a value, format of a difference: the metrics set side by side.
COMPARED_COLUMNS: list[tuple[str, str, str, Callable[[float], str]]] = [
    ("l0", "L0", "{:.1f}", "{:+.1f}".format),
    ("loss_recovered", "loss recovered", "{:.3f}", "{:+.3f}".format),
    ("dead_fraction", "dead", "{:.1%}", _points),
    ("explained_variance", "explained var.", "{:.3f}", "{:+.3f}".format),
]
# Ours only: no reference publishes these.
OTHER_COLUMNS = [
    ("layer", "layer", "{}"),
    ("ce_clean", "CE clean (nats)", "{:.4f}"),
    ("ce_increase", "CE increase (nats)", "{:.4f}"),
    ("ce_increase_zero", "CE increase, zeroed (nats)", "{:.4f}"),
    ("kl_score", "KL score", "{:.3f}"),
    ("mse", "MSE", "{:.4g}"),
    ("dense_fraction", "dense (>10%)", "{:.1%}"),
]


# key, title, format: the metrics shown for the held-out source, each in-distribution and held-out.
HELDOUT_COLUMNS = [
    ("l0", "L0", "{:.1f}"),
    ("ce_increase", "CE increase (nats)", "{:.4f}"),
    ("loss_recovered", "loss recovered", "{:.3f}"),
]


@dataclass
class LayerResult:
    metrics: dict
    density: list[tuple[float, int]]
    dashboard: LayerDashboard | None = None
    heldout: dict | None = None  # the metrics on the held-out source, when one was held out


@dataclass
class LayerDashboard:
    """What the report takes from a layer's dashboards and its people's ratings."""

    page: Path  # the layer page, relative to the report's folder
    rated_features: int  # the first_n alive features, which the ratings are counted over
    tag_counts: dict[str, int]
    untagged: int
    yes: int
    rated: int
    best: dict[str, tuple[int, float] | None]  # per tag: its best feature and that feature's score (carded)
    sample_features: int = 0  # the random sample of alive features (dashboards.random_n)
    sample_yes: int = 0
    sample_rated: int = 0
    agreement: Agreement | None = None  # the raters' on the first_n features
    sample_agreement: Agreement | None = None

    def interpretable_cell(self) -> str:
        return share_cell(self.yes, self.rated)

    def sample_cell(self) -> str:
        return share_cell(self.sample_yes, self.sample_rated) if self.sample_features else "no sample"


def share_cell(yes: int, rated: int) -> str:
    return f"{yes / rated:.0%} ({yes}/{rated} rated)" if rated else "not rated"


@dataclass(frozen=True)
class Column:
    group: str  # the metric ("L0"); empty for the layer column
    sub: str  # "ours", the reference's label, "Δ"; empty when there is no reference
    cell: Callable[[LayerResult], str]

    @property
    def title(self) -> str:
        return " ".join(part for part in (self.group, self.sub) if part)


def read_dashboard(layer: int, sae: str | None, dashboards_root: Path, labels_root: Path,
                   out_dir: Path) -> LayerDashboard | None:
    """The layer's tag counts and ratings (of the SAE folder ``sae``, the one its metrics measure), or None when it has
    no dashboards."""
    path = layout.features_file(layer, dashboards_root)
    if not path.is_file():
        return None
    doc = read_features(path, layer, sae)
    first_alive = doc["rating_sets"]["first_n"]["features"]
    sample = doc["rating_sets"]["random"]["features"]
    ratings, page_hash = read_labels(layer, labels_root) or [], doc["content_hash"]
    yes, rated = interpretable(ratings, first_alive, page_hash)
    sample_yes, sample_rated = interpretable(ratings, sample, page_hash)
    counts, untagged = tag_counts(doc)
    best = {tag: None if family["best"] is None else (family["best"], doc["summary"]["scores"][tag][family["best"]])
            for tag, family in doc["families"].items()}
    page = layout.dashboard_page(layer, dashboards_root)
    return LayerDashboard(page=Path(_relative_link(page, out_dir)), rated_features=len(first_alive),
                          tag_counts=counts, untagged=untagged, yes=yes, rated=rated, best=best,
                          sample_features=len(sample), sample_yes=sample_yes, sample_rated=sample_rated,
                          agreement=agreement(ratings, first_alive, page_hash),
                          sample_agreement=agreement(ratings, sample, page_hash))


def _relative_link(target: Path, start: Path) -> str:
    return Path(os.path.relpath(target.resolve(), start.resolve())).as_posix()


def read_layer(metrics_dir: Path, density_dir: Path, layer: int, dashboards_root: Path, labels_root: Path,
               out_dir: Path, heldout_dir: Path) -> LayerResult:
    density_path = layout.density_file(layer, density_dir)
    density = read_density(density_path) if density_path.exists() else []
    heldout_path = layout.heldout_metrics_file(layer, heldout_dir)
    heldout = read_heldout_metrics(heldout_path, layer) if heldout_path.exists() else None  # older runs have none
    metrics = read_metrics(layout.metrics_file(layer, metrics_dir), layer)
    sae = metrics.get("sae")  # files written before evaluate recorded it name none
    return LayerResult(metrics, density, read_dashboard(layer, sae, dashboards_root, labels_root, out_dir), heldout)


def fmt(value, pattern: str | Callable[[float], str]) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return pattern(value) if callable(pattern) else pattern.format(value)


def metric_cell(metrics: dict | None, key: str, pattern: str) -> str:
    """A metric with its standard error when the file has one: '0.731 ± 0.012'."""
    metrics = metrics or {}
    return format_value(metrics.get(key), metrics.get(f"{key}_se"), pattern)


# ---------------------------------------------------------------------------------------------------
# The tables, as plain cells: Markdown and HTML render the same columns.


def comparison_columns(reference: Reference | None) -> list[Column]:
    """layer, d_sae, then per compared metric: ours, the reference's value, and ours minus it."""

    def ours(key, pattern):
        return lambda r: metric_cell(r.metrics, key, pattern)

    def theirs(key, pattern):
        return lambda r: metric_cell(reference.layers.get(r.metrics["layer"]), key, pattern)

    def delta(key, pattern):
        return lambda r: fmt(difference(r.metrics.get(key), reference.get(r.metrics["layer"], key)), pattern)

    def rated(r: LayerResult) -> str:
        return r.dashboard.interpretable_cell() if r.dashboard else "not rated"

    columns = [Column("layer", "", ours("layer", "{}"))]
    if reference is None:
        columns.append(Column("d_sae", "", ours("d_sae", "{}")))
        columns += [Column(title, "", ours(key, p)) for key, title, p, _ in COMPARED_COLUMNS]
        return columns + [Column(INTERPRETABLE, "", rated)]
    columns += [Column("d_sae", "ours", ours("d_sae", "{}")), Column("d_sae", reference.label, theirs("d_sae", "{}"))]
    for key, title, pattern, diff_pattern in COMPARED_COLUMNS:
        columns += [
            Column(title, "ours", ours(key, pattern)),
            Column(title, reference.label, theirs(key, pattern)),
            Column(title, "Δ", delta(key, diff_pattern)),
        ]
    # No Δ: other people rated other features on another interface.
    return columns + [Column(INTERPRETABLE, "ours", rated),
                      Column(INTERPRETABLE, reference.label, theirs("alive_interpretable", "{:.0%}"))]


def tag_columns(results: list[LayerResult]) -> list[Column]:
    """layer, then the number of features with each family tag, then those with none."""
    tags = next((list(r.dashboard.tag_counts) for r in results if r.dashboard), [])

    def count(tag):
        return lambda r: fmt(r.dashboard.tag_counts.get(tag) if r.dashboard else None, "{:,}")

    return [Column("layer", "", lambda r: str(r.metrics["layer"])), *(Column(t, "", count(t)) for t in tags),
            Column("untagged", "", lambda r: fmt(r.dashboard.untagged if r.dashboard else None, "{:,}"))]


def rating_columns() -> list[Column]:
    """layer, then per rating set (the first alive features, the random sample) yes / rated and the raters' kappa."""
    def of(cell: Callable[[LayerDashboard], str]) -> Callable[[LayerResult], str]:
        return lambda r: cell(r.dashboard) if r.dashboard else "–"

    return [Column("layer", "", lambda r: str(r.metrics["layer"])),
            Column("first alive", "", of(lambda d: f"{d.interpretable_cell()} of {d.rated_features}")),
            Column("agreement, first alive", "", of(lambda d: d.agreement.cell())),
            Column("random sample", "", of(lambda d: f"{d.sample_cell()} of {d.sample_features}")),
            Column("agreement, random sample", "", of(lambda d: d.sample_agreement.cell()))]


def family_columns(results: list[LayerResult]) -> list[Column]:
    """layer, then per tag its best feature and score ("none" where no feature carries the tag)."""
    tags = next((list(r.dashboard.best) for r in results if r.dashboard), [])

    def best(tag):
        def cell(r: LayerResult) -> str:
            if not r.dashboard:
                return "–"
            found = r.dashboard.best.get(tag)
            return "none" if found is None else f"{found[0]} ({found[1]:.2f})"
        return cell

    return [Column("layer", "", lambda r: str(r.metrics["layer"])), *(Column(t, "", best(t)) for t in tags)]


def other_columns() -> list[Column]:
    return [Column(title, "", lambda r, k=key, p=pattern: metric_cell(r.metrics, k, p))
            for key, title, pattern in OTHER_COLUMNS]


def heldout_columns() -> list[Column]:
    """layer, then per metric its in-distribution and held-out values, and the held-out L0 over the in-distribution."""

    def l0_ratio(r: LayerResult) -> str:
        ours, heldout = r.metrics.get("l0"), (r.heldout or {}).get("l0")
        return fmt(heldout / ours if ours and heldout is not None else None, "{:.2f}x")

    columns = [Column("layer", "", lambda r: str(r.metrics["layer"]))]
    for key, title, pattern in HELDOUT_COLUMNS:
        columns += [Column(title, "in-dist", lambda r, k=key, p=pattern: metric_cell(r.metrics, k, p)),
                    Column(title, "held-out", lambda r, k=key, p=pattern: metric_cell(r.heldout, k, p))]
    return columns + [Column("L0 held-out / in-dist", "", l0_ratio)]


# ---------------------------------------------------------------------------------------------------
# Provenance: what produced these numbers.


def trained_tokens(sae_root: Path | None, layer: int) -> int | None:
    """Tokens the layer's SAE was trained on, from its cfg.json (None without an SAE folder, or for an imported one)."""
    folder = layout.sae_dir(layer, sae_root) if sae_root else None
    if folder is None or not folder.is_dir():
        return None
    tokens = attnsae_metadata(read_sae_cfg(folder)).get("trained_tokens")
    return tokens if isinstance(tokens, int) else None


def per_layer_count(counts: dict[int, int | None]) -> str:
    """'65,536 per layer' when every layer agrees, else 'L3: 1,024; L10: 2,048'."""
    values = set(counts.values())
    if len(values) == 1:
        (only,) = values
        return "n/a" if only is None else f"{only:,} per layer"
    return "; ".join(f"{layout.layer_name(layer)}: {fmt(v, '{:,}')}" for layer, v in counts.items())


def provenance(
    model_dir: Path,
    tokens_dir: Path,
    results: list[LayerResult],
    sae_dir: Path | None = None,
    reference: Reference | None = None,
) -> dict:
    info = read_model_info(model_dir)
    tokens = read_tokens_meta(tokens_dir)
    git = git_state(project_root())
    layers = [r.metrics["layer"] for r in results]
    facts = {
        "model": info.name,
        "model source": info.source,
        "data": tokens.get("corpus") or "unknown",
        "context size": tokens["context_size"],
        "tokenized train split": (f"{tokens['tokens']['train']:,} tokens" if "train" in tokens["tokens"]
                                  else "streamed from the pinned sources during training"),
    }
    if len(tokens["source_tokens"].get("train", {})) > 1:
        facts["train mixture"] = mixture(tokens["source_tokens"]["train"], tokens["balanced_train_rows"])
    facts |= {
        "SAE training tokens": per_layer_count({n: trained_tokens(sae_dir, n) for n in layers}),
        "evaluation tokens": per_layer_count({r.metrics["layer"]: r.metrics.get("eval_tokens") for r in results}),
    }
    if tokens["heldout_sources"]:
        facts["held-out source"] = ", ".join(tokens["heldout_sources"]) + " (no SAE trained on it)"
        facts["held-out evaluation tokens"] = per_layer_count(
            {r.metrics["layer"]: (r.heldout or {}).get("eval_tokens") for r in results})
    return facts | {
        "compared with": reference.source if reference else "nothing",
        "git commit": git["commit"] + (" (dirty)" if git["dirty"] == "true" else ""),
    }


def mixture(source_tokens: dict[str, int], balanced_rows: int | None) -> str:
    """Each source's share of the train split's tokens, and how many leading rows hold every source in its weighted
    share: 'npm:sotu 25%, ... of all its rows; its first 11,167 rows hold each source in its weighted share'."""
    total = sum(source_tokens.values()) or 1
    shares = ", ".join(f"{source} {n / total:.0%}" for source, n in source_tokens.items()) + " of all its rows"
    if balanced_rows is None:
        return shares
    return f"{shares}; its first {balanced_rows:,} rows hold each source in its weighted share"


# ---------------------------------------------------------------------------------------------------
# Plots, as matplotlib figures; the sections carry them as base64 PNGs.


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    """The figure as a base64 PNG; closed, since a report draws each figure once."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def layer_points(results: list[LayerResult], reference: Reference | None) -> tuple[list, list, list]:
    """(layer, L0, loss recovered) for ours, the reference and ours on the held-out source, where both numbers exist."""
    ours = [(r.metrics["layer"], r.metrics.get("l0"), r.metrics.get("loss_recovered")) for r in results]
    theirs = [(n, reference.get(n, "l0"), reference.get(n, "loss_recovered")) for n, _, _ in ours] if reference else []
    heldout = [(r.metrics["layer"], r.heldout.get("l0"), r.heldout.get("loss_recovered")) for r in results if r.heldout]

    def keep(points: list) -> list:
        return [p for p in points if p[1] is not None and p[2] is not None]

    return keep(ours), keep(theirs), keep(heldout)


def l0_loss_figure(results: list[LayerResult], reference: Reference | None):
    """Each layer's L0 against its loss recovered: ours, the reference's, and ours on the held-out source."""
    ours, theirs, heldout = layer_points(results, reference)
    fig, ax = _pyplot().subplots(figsize=(6, 4.2))
    by_layer = {n: (x, y) for n, x, y in theirs}
    for n, x, y in ours:  # a faint line joins each layer's two points
        if n in by_layer:
            ax.plot([x, by_layer[n][0]], [y, by_layer[n][1]], color="0.8", linewidth=1, zorder=1)
    series = ((ours, "ours", "tab:blue", "o"), (theirs, reference.label if reference else "", "tab:orange", "s"),
              (heldout, "ours, held-out source", "tab:purple", "^"))
    for points, label, colour, marker in series:
        if points:
            ax.scatter([p[1] for p in points], [p[2] for p in points], color=colour, marker=marker, label=label,
                       zorder=2)
            for n, x, y in points:
                ax.annotate(layout.layer_name(n), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8,
                            color=colour)
    ax.set_xlabel("L0 (features active per token)")
    ax.set_ylabel("loss recovered")
    ax.set_title("L0 against loss recovered")
    ax.grid(alpha=0.3)
    if theirs or heldout:
        ax.legend()
    return fig


def density_figure(results: list[LayerResult]):
    """A feature density histogram per layer."""
    # At most four histograms a row, so a 12-layer report stays readable.
    cols = min(4, len(results))
    rows = math.ceil(len(results) / cols)
    fig, axes = _pyplot().subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat[len(results):]:
        ax.set_visible(False)
    for ax, r in zip(axes.flat, results):
        if r.density:
            centers, counts = zip(*r.density)
            ax.bar(centers, counts, width=(centers[1] - centers[0]) if len(centers) > 1 else 0.2, color="tab:green")
        ax.set_title(f"{layout.layer_name(r.metrics['layer'])} (dead {fmt(r.metrics.get('dead_fraction'), '{:.0%}')})")
        ax.set_xlabel("log10 feature density")
    for row in axes:
        row[0].set_ylabel("features")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------
# The report, described once: a list of sections, which the Markdown and the HTML renderer below both walk.


@dataclass(frozen=True)
class Table:
    id: str  # the HTML table's id (tests and the browser check find table#layers by it)
    columns: list[Column]
    rows: list[LayerResult]


@dataclass(frozen=True)
class Figure:
    alt: str
    png: str  # base64


@dataclass(frozen=True)
class Link:
    text: str
    href: str
    detail: str  # after the link, on the page only: "30 cards to rate"


@dataclass(frozen=True)
class Links:
    title: str  # the page's heading over the list
    label: str  # the Markdown's lead-in: "Dashboards: [L3](...), [L10](...)"
    id: str
    items: list[Link]


@dataclass(frozen=True)
class Section:
    title: str
    intro: str = ""
    notes: tuple[str, ...] = ()  # call-outs: what the numbers are compared with, and that comparison's caveats
    # A str: a Markdown table another module renders (the frontier's); the page shows the section's figure instead.
    table: Table | str | None = None
    figure: Figure | None = None
    links: Links | None = None
    # The page's line breaks, kept as they were when each section was hand-written HTML (index.html is a
    # recorded output, so a moved line break would change it): the whole section on one line, or a line per block.
    one_line: bool = False


INTERPRETABLE = "% alive interpretable"
DEFINITIONS = (
    "Metrics on the evaluation split (documents of the training sources that training never saw). Loss recovered = "
    "(CE zeroed - CE with SAE) / (CE zeroed - CE clean), with hook_z set to zero for \"zeroed\". Dead = features "
    "that never fire on the evaluation tokens (count in the list above). % alive interpretable = ratings of yes / "
    "ratings made, by people, of the first 30 alive features on each layer's dashboard page (labels/L<n>.csv); "
    "\"not rated\" until someone rates them. \"± x\": the bootstrap standard error over evaluation rows (rows of "
    "one document are not independent, so it is a lower bound)."
)
HELDOUT_NOTE = (
    "The same SAEs on the held-out source: every document of a corpus source that neither training nor the "
    "evaluation split holds (tokenize.heldout_sources). Dead features are measured on the evaluation split only."
)
TAGS_NOTE = (
    "Features per family tag, measured by probes and corpus statistics against a null baseline of random "
    "directions (docs/features-json.md: family tags). A feature may have several tags or none. "
    "Tags are evidence for raters; they never count as a rating."
)
RATINGS_NOTE = (
    "People's ratings (docs/features-json.md: rating) of two sets of alive features per layer: the first ones by id, "
    "as the post rated (the per-layer table's column), and a random sample (dashboards.random_n, seeded), whose "
    "share does not depend on how the features are numbered. yes / rated; unsure counts as rated. Agreement: "
    "Cohen's kappa over the answers (yes / no / unsure) of two raters on the features both rated, the mean over pairs "
    "with more raters."
)
FAMILIES_NOTE = (
    "Each family's best feature on each layer, with its score: the feature with that tag that scores highest. Each "
    "has a card on its layer's page (section Families: every feature of the family by score), so a reader sees what "
    "an induction, previous-token or context feature of this SAE looks like. \"none\": no feature scored above the "
    "tag's threshold and its null on that layer."
)
DELTA = "Δ = ours minus the reference (dead: in percentage points)."
FRONTIER_NOTE = ("Every architecture at several sparsities, each a DVC experiment (`attnsae frontier queue`, "
                 "`dvc exp run --run-all`, `attnsae frontier collect`): L0, CE increase and loss recovered with "
                 "their bootstrap standard errors, dead fraction, and the held-out source's numbers.")
NO_FRONTIER = "No frontier yet: reports/frontier.csv has no points (docs/sweeps-frontier.md: The frontier)."


def definitions(reference: Reference | None) -> str:
    return f"{DEFINITIONS} {DELTA}" if reference else DEFINITIONS


def report_sections(results: list[LayerResult], reference: Reference | None, compare_note: str,
                    frontier_rows: list[dict]) -> list[Section | None]:
    """The report top to bottom; None where an optional section has nothing to show."""
    return [
        Section("Per layer", definitions(reference), (compare_note, *(reference.notes if reference else ())),
                Table("layers", comparison_columns(reference), results)),
        heldout_section(results),
        Section("Other metrics", table=Table("more", other_columns(), results)),
        ratings_section(results),
        tags_section(results),
        families_section(results),
        Section("L0 against loss recovered",
                figure=Figure("L0 against loss recovered", _png(l0_loss_figure(results, reference)))),
        Section("Feature density", figure=Figure("feature density histograms", _png(density_figure(results)))),
        frontier_section(frontier_rows),
    ]


def heldout_section(results: list[LayerResult]) -> Section | None:
    if not any(r.heldout for r in results):
        return None  # no held-out source, or metrics from before there was one
    return Section("Held-out source", HELDOUT_NOTE, table=Table("heldout", heldout_columns(), results), one_line=True)


def tags_section(results: list[LayerResult]) -> Section | None:
    with_pages = [r for r in results if r.dashboard]
    if not with_pages:
        return None
    pages = [Link(layout.layer_name(r.metrics["layer"]), r.dashboard.page.as_posix(),
                  f"{r.dashboard.rated_features} cards to rate") for r in with_pages]
    return Section("Family tags", TAGS_NOTE, table=Table("tags", tag_columns(results), results),
                   links=Links("Feature dashboards", "Dashboards", "dashboards", pages), one_line=True)


def ratings_section(results: list[LayerResult]) -> Section | None:
    if not any(r.dashboard for r in results):
        return None
    return Section("Ratings", RATINGS_NOTE, table=Table("ratings", rating_columns(), results), one_line=True)


def families_section(results: list[LayerResult]) -> Section | None:
    if not any(r.dashboard for r in results):
        return None
    return Section("Families", FAMILIES_NOTE, table=Table("families", family_columns(results), results),
                   one_line=True)


def frontier_section(rows: list[dict]) -> Section:
    if not rows:
        return Section("Frontier", NO_FRONTIER, one_line=True)
    figure = Figure("frontier: L0 against CE increase and loss recovered per layer", _png(frontier_figure(rows)))
    return Section("Frontier", FRONTIER_NOTE, table=frontier_markdown(rows), figure=figure, one_line=True)


# ---------------------------------------------------------------------------------------------------
# The two renderers. Each owns only its document's frame (head, style, last line) and its syntax.


MARKDOWN_END = (
    "Plots (L0 against loss recovered, feature density histograms) and links to the dashboards: index.html.\n"
)


def render_markdown(facts: dict, sections: list[Section | None]) -> str:
    head = f"# attnsae report: {facts['model']}\n\n" + "\n".join(f"- {k}: {v}" for k, v in facts.items()) + "\n\n"
    return head + "".join(markdown_section(s) for s in sections if s) + MARKDOWN_END


def markdown_section(section: Section) -> str:
    blocks = [section.intro] if section.intro else []
    if section.notes:
        blocks.append("\n".join(f"> {n}" for n in section.notes))
    if isinstance(section.table, Table):
        blocks.append(markdown_table(section.table))
    elif section.table:
        blocks.append(section.table)
    if section.links:
        blocks.append(f"{section.links.label}: "
                      + ", ".join(f"[{link.text}]({link.href})" for link in section.links.items))
    if not blocks:  # a figure only: Markdown stays text, and its last line points to index.html for the plots
        return ""
    return "".join(f"{block}\n\n" for block in (f"## {section.title}", *blocks))


def markdown_table(table: Table) -> str:
    head = "| " + " | ".join(c.title for c in table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    rows = ["| " + " | ".join(c.cell(r) for c in table.columns) + " |" for r in table.rows]
    return "\n".join([head, rule, *rows])


PAGE_STYLE = """\
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1rem 0; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: right; }
td { white-space: nowrap; }
table#layers { font-size: 0.9rem; }
th { background: #f3f3f3; text-align: center; }
table.facts th, table.facts td { text-align: left; white-space: normal; }
p.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.4rem 0.8rem; }
img { max-width: 100%; }
"""


def render_html(facts: dict, sections: list[Section | None]) -> str:
    """A self-contained page: no scripts, no external URLs, every plot inline."""
    esc = html.escape
    facts_rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in facts.items())
    body = "\n".join(html_section(s) if s else "" for s in sections)  # an absent section keeps its (empty) line
    return ('<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<title>attnsae report: {esc(facts["model"])}'
            f"</title>\n<style>\n{PAGE_STYLE}</style></head><body>\n"
            f"<h1>Attention-output SAEs: {esc(facts['model'])}</h1>\n"
            f'<table class="facts">{facts_rows}</table>\n{body}\n</body></html>\n')


def html_section(section: Section) -> str:
    esc = html.escape
    blocks = []
    if section.links:  # the page lists the dashboards first, under a heading of their own: there people rate
        items = "".join(f'<li><a href="{esc(link.href)}">{esc(link.text)}</a>: {esc(link.detail)}</li>'
                        for link in section.links.items)
        blocks.append(f'<h2>{esc(section.links.title)}</h2><ul id="{section.links.id}">{items}</ul>')
    blocks.append(f"<h2>{esc(section.title)}</h2>")
    if section.intro:
        blocks.append(f"<p>{esc(section.intro)}</p>")
    if section.notes:
        blocks.append("".join(f'<p class="note">{esc(n)}</p>' for n in section.notes))
    if section.figure:  # in place of the table: the frontier's chart shows at a glance what its Markdown table lists
        blocks.append(f'<img alt="{esc(section.figure.alt)}" src="data:image/png;base64,{section.figure.png}">')
    elif section.table:
        blocks.append(html_table(section.table))
    return ("" if section.one_line else "\n").join(blocks)


def html_table(table: Table) -> str:
    esc = html.escape
    columns = table.columns
    if any(c.sub for c in columns):
        # Two header rows: the metric spanning its ours / reference / Δ cells, then those labels.
        groups: list[list] = []
        for c in columns:
            if groups and groups[-1][0] == c.group and c.sub:
                groups[-1][1] += 1
            else:
                groups.append([c.group, 1, bool(c.sub)])
        top = "".join(
            f'<th colspan="{n}">{esc(g)}</th>' if has_sub else f'<th rowspan="2">{esc(g)}</th>'
            for g, n, has_sub in groups
        )
        second = "".join(f"<th>{esc(c.sub)}</th>" for c in columns if c.sub)
        head = f"<tr>{top}</tr><tr>{second}</tr>"
    else:
        head = "<tr>" + "".join(f"<th>{esc(c.title)}</th>" for c in columns) + "</tr>"
    body = "".join("<tr>" + "".join(f"<td>{esc(c.cell(r))}</td>" for c in columns) + "</tr>" for r in table.rows)
    return f'<table id="{table.id}"><thead>{head}</thead><tbody>{body}</tbody></table>'


def layer_table_csv(per_layer: list[dict]) -> str:
    """One row per layer (layer, l0, loss_recovered, ...): the report's table as data for `dvc plots` and MLflow."""
    columns = ["layer"]
    for metrics in per_layer:
        columns += [k for k in numeric_metrics(metrics) if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for metrics in per_layer:
        writer.writerow({"layer": metrics["layer"], **numeric_metrics(metrics)})
    return buf.getvalue()


@dataclass
class Report:
    """What the report stage wrote, and the per-layer metrics it read, those on the held-out source as
    ``heldout/<name>`` (MLflow logs them, not a second read)."""

    markdown: str
    per_layer: list[dict]
    files: list[Path]


def build_report(
    layers: list[int],
    out_dir: str | Path = layout.REPORT_DIR,
    compare: str = "auto",
    metrics_dir: str | Path = layout.METRICS_DIR,
    heldout_dir: str | Path = layout.HELDOUT_METRICS_DIR,
    density_dir: str | Path = layout.DENSITY_DIR,
    model_dir: str | Path = layout.MODEL_DIR,
    tokens_dir: str | Path = layout.TOKENS_DIR,
    sae_root: str | Path | None = layout.SAE_ROOT,
    dashboards_root: str | Path = layout.DASHBOARDS_DIR,
    labels_root: str | Path = layout.LABELS_DIR,
    frontier_file: str | Path = layout.FRONTIER_FILE,
) -> Report:
    """The stage: write report.md, index.html and layers.csv into ``out_dir`` from the earlier stages' files."""
    results = [read_layer(Path(metrics_dir), Path(density_dir), layer, Path(dashboards_root), Path(labels_root),
                          Path(out_dir), Path(heldout_dir)) for layer in layers]
    info = read_model_info(model_dir)
    reference, compare_note = resolve_reference(compare, layers, info.source, info.name, info.n_layers, info.d_in)
    facts = provenance(Path(model_dir), Path(tokens_dir), results, Path(sae_root) if sae_root else None, reference)
    sections = report_sections(results, reference, compare_note, read_frontier(frontier_file))
    markdown, page = render_markdown(facts, sections), render_html(facts, sections)
    per_layer = [r.metrics | {f"heldout/{k}": v for k, v in numeric_metrics(r.heldout or {}).items()} for r in results]
    out_dir = Path(out_dir)
    files = [out_dir / layout.REPORT_MD.name, out_dir / layout.REPORT_HTML.name, out_dir / layout.LAYERS_CSV.name]
    # one output: replaced together or not at all (a full disk on the page must not leave a new report.md beside it)
    write_texts_atomic(dict(zip(files, (markdown, page, layer_table_csv(per_layer)))))
    return Report(markdown, per_layer, files)
