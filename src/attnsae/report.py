"""The `report` stage: the per-layer table as Markdown and a self-contained HTML page.

Everything comes from files the earlier stages wrote (metrics JSON, density CSV, model and token
metadata); nothing is recomputed here.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path

from attnsae.errors import UserError
from attnsae.files import write_text_atomic
from attnsae.models import read_model_info
from attnsae.tokenization import read_tokens_meta
from attnsae.tracking import git_state, project_root

COLUMNS = [
    ("layer", "layer", "{}"),
    ("d_sae", "d_sae", "{}"),
    ("l0", "L0", "{:.1f}"),
    ("loss_recovered", "loss recovered", "{:.3f}"),
    ("ce_increase", "CE increase (nats)", "{:.4f}"),
    ("ce_increase_zero", "CE increase, zeroed (nats)", "{:.4f}"),
    ("dead_fraction", "dead", "{:.1%}"),
    ("explained_variance", "explained var.", "{:.3f}"),
    ("kl_score", "KL score", "{:.3f}"),
    ("dense_fraction", "dense (>10%)", "{:.1%}"),
]


@dataclass
class LayerResult:
    metrics: dict
    density: list[tuple[float, int]]


def read_layer(metrics_dir: Path, density_dir: Path, layer: int) -> LayerResult:
    path = metrics_dir / f"L{layer}.json"
    if not path.is_file():
        raise UserError(f"{path}: missing; run `attnsae evaluate --layer {layer}` first")
    metrics = json.loads(path.read_text())
    density: list[tuple[float, int]] = []
    dpath = density_dir / f"L{layer}.csv"
    if dpath.is_file():
        with open(dpath) as f:
            density = [(float(r["log10_density"]), int(r["features"])) for r in csv.DictReader(f)]
    return LayerResult(metrics, density)


def fmt(value, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def markdown_table(results: list[LayerResult]) -> str:
    head = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    rows = ["| " + " | ".join(fmt(r.metrics.get(k), p) for k, _, p in COLUMNS) + " |" for r in results]
    return "\n".join([head, rule, *rows])


def provenance(model_dir: Path, tokens_dir: Path, results: list[LayerResult]) -> dict:
    info = read_model_info(model_dir)
    tokens = read_tokens_meta(tokens_dir)
    git = git_state(project_root())
    return {
        "model": info.name,
        "data": tokens.get("corpus") or "unknown",
        "train_tokens_available": tokens["tokens"].get("train", "streamed from the pinned sources"),
        "eval_tokens": results[0].metrics.get("eval_tokens") if results else 0,
        "context_size": tokens["context_size"],
        "git_commit": git["commit"] + (" (dirty)" if git["dirty"] == "true" else ""),
    }


def _figure_png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def plots(results: list[LayerResult]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for r in results:
        m = r.metrics
        if m.get("loss_recovered") is not None:
            ax.scatter(m["l0"], m["loss_recovered"], color="tab:blue")
            ax.annotate(f"L{m['layer']}", (m["l0"], m["loss_recovered"]), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("L0 (features active per token)")
    ax.set_ylabel("loss recovered")
    ax.set_title("L0 against loss recovered")
    ax.grid(alpha=0.3)
    out["frontier"] = _figure_png(fig)
    plt.close(fig)

    n = len(results)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 2.6), squeeze=False)
    for ax, r in zip(axes[0], results):
        if r.density:
            centers, counts = zip(*r.density)
            ax.bar(centers, counts, width=(centers[1] - centers[0]) if len(centers) > 1 else 0.2, color="tab:green")
        ax.set_title(f"L{r.metrics['layer']} (dead {r.metrics['dead_fraction']:.0%})")
        ax.set_xlabel("log10 feature density")
    axes[0][0].set_ylabel("features")
    fig.tight_layout()
    out["density"] = _figure_png(fig)
    plt.close(fig)
    return out


def html_page(results: list[LayerResult], prov: dict, images: dict[str, str]) -> str:
    esc = html.escape
    header = "".join(f"<th>{esc(title)}</th>" for _, title, _ in COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{esc(fmt(r.metrics.get(k), p))}</td>" for k, _, p in COLUMNS) + "</tr>" for r in results
    )
    facts = "".join(f"<tr><th>{esc(k.replace('_', ' '))}</th><td>{esc(str(v))}</td></tr>" for k, v in prov.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>attnsae report: {esc(prov['model'])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 1rem 0; }}
th, td {{ border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: right; }}
th {{ background: #f3f3f3; }}
table.facts th, table.facts td {{ text-align: left; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>Attention-output SAEs: {esc(prov['model'])}</h1>
<table class="facts">{facts}</table>
<h2>Per layer</h2>
<p>Metrics on the held-out split. Loss recovered = (CE zeroed - CE with SAE) / (CE zeroed - CE clean), with
hook_z set to zero for "zeroed". Dead = features that never fire on the {prov['eval_tokens']:,} evaluation tokens.</p>
<table id="layers"><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>
<h2>L0 against loss recovered</h2>
<img alt="L0 against loss recovered" src="data:image/png;base64,{images['frontier']}">
<h2>Feature density</h2>
<img alt="feature density histograms" src="data:image/png;base64,{images['density']}">
</body></html>
"""


def build_report(
    layers: list[int],
    metrics_dir: str | Path,
    density_dir: str | Path,
    model_dir: str | Path,
    tokens_dir: str | Path,
    out_dir: str | Path,
) -> str:
    results = [read_layer(Path(metrics_dir), Path(density_dir), layer) for layer in layers]
    prov = provenance(Path(model_dir), Path(tokens_dir), results)
    table = markdown_table(results)
    facts = "\n".join(f"- {k.replace('_', ' ')}: {v}" for k, v in prov.items())
    markdown = f"# attnsae report: {prov['model']}\n\n{facts}\n\n{table}\n"
    write_text_atomic(Path(out_dir) / "report.md", markdown)
    write_text_atomic(Path(out_dir) / "index.html", html_page(results, prov, plots(results)))
    return markdown
