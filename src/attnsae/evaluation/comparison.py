"""What the report's per-layer table is compared against.

Either the published GPT-2 Small table (docs/design.md 2) or the metrics folder of an earlier run or of
an imported SAE (``L<n>.json`` files in the format the `evaluate` stage writes). The published
numbers only mean something next to GPT-2 Small at the same site, so that comparison is refused
for any other model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from attnsae import layout
from attnsae.errors import UserError
from attnsae.evaluation import paper, published_sets
from attnsae.formats.metrics import read_metrics

# The metrics shown side by side (keys of the metrics JSON).
COMPARED = ("l0", "loss_recovered", "dead_fraction", "explained_variance")
KEYWORDS = ("auto", "published", "none")
ALLOWED = "auto, published, none, or a folder of L<n>.json metrics files"

PUBLISHED_SOURCE = paper.SOURCE
PUBLISHED_EVAL_TOKENS = paper.EVAL_TOKENS

# The post's table as metrics rows. Explained variance was not published.
PUBLISHED_GPT2_SMALL: dict[int, dict] = {
    n: {
        "layer": n,
        "d_sae": row.d_sae,
        "l1_coeff": row.l1_coeff,
        "l0": float(row.l0),
        "loss_recovered": row.loss_recovered,
        "dead_fraction": row.dead_fraction,
        "explained_variance": None,
        "alive_interpretable": row.alive_interpretable,
        "eval_tokens": paper.EVAL_TOKENS,
    }
    for n, row in paper.LAYERS.items()
}


@dataclass(frozen=True)
class Reference:
    """Per-layer reference metrics; a layer the reference lacks is simply absent."""

    label: str  # short, for table headers and the plot legend
    source: str  # where the numbers come from, for the provenance list
    layers: dict[int, dict]
    notes: list[str] = field(default_factory=list)

    def get(self, layer: int, key: str):
        return self.layers.get(layer, {}).get(key)


def difference(ours, reference) -> float | None:
    """ours - reference, or None when either side has no number."""
    if ours is None or reference is None:
        return None
    return float(ours) - float(reference)


def is_gpt2_small(source: str, n_layers: int, d_in: int) -> bool:
    # tiny-gpt2 is GPT-2-shaped but random: only the real GPT-2 Small matches the published numbers.
    return published_sets.KISSANE.trained_on(source) and n_layers == paper.N_LAYERS and d_in == paper.D_IN


def published_reference(model_source: str, model_name: str, n_layers: int, d_in: int) -> Reference:
    if not is_gpt2_small(model_source, n_layers, d_in):
        raise UserError(
            f"report.compare: 'published' is the GPT-2 Small table, but this run's model is {model_name} "
            f"(source {model_source!r}); use 'none' or a folder of L<n>.json metrics (allowed: {ALLOWED})"
        )
    notes = [
        (
            "Published numbers as given in the post (rounded: L0 to integers, percentages to whole points); "
            f"the original measured them on {PUBLISHED_EVAL_TOKENS:,} tokens of OpenWebText. "
            "Explained variance was not published (n/a)."
        )
    ]
    return Reference("published", PUBLISHED_SOURCE, dict(PUBLISHED_GPT2_SMALL), notes)


def folder_reference(folder: str | Path, layers: list[int], our_model: str) -> Reference:
    """An earlier run's or an imported SAE's metrics folder, read for the layers we report."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"report.compare: {str(folder)!r} is not a folder (allowed: {ALLOWED})")
    paths = {layer: layout.metrics_file(layer, folder) for layer in layers}
    found = {layer: read_metrics(path, layer) for layer, path in paths.items() if path.is_file()}
    if not found:
        wanted = ", ".join(path.name for path in paths.values())
        raise UserError(f"report.compare: {folder} holds none of {wanted} (allowed: {ALLOWED})")
    notes = []
    missing = [layout.layer_name(layer) for layer in layers if layer not in found]
    if missing:
        notes.append(f"The reference has no metrics for {', '.join(missing)} (n/a).")
    models = sorted({str(m.get("model")) for m in found.values() if m.get("model")})
    if models and models != [our_model]:
        # Allowed (the user chose the folder), but loss recovered across models is not like for like.
        notes.append(f"The reference was measured on {', '.join(models)}; this run on {our_model}.")
    return Reference("reference", f"metrics folder {folder}", found, notes)


def resolve_reference(
    compare: str, layers: list[int], model_source: str, model_name: str, n_layers: int, d_in: int
) -> tuple[Reference | None, str]:
    """The reference chosen by ``report.compare``, and a sentence saying what was chosen and why."""
    if compare == "none":
        return None, "No comparison (report.compare: none)."
    if compare == "auto":
        if is_gpt2_small(model_source, n_layers, d_in):
            return (published_reference(model_source, model_name, n_layers, d_in),
                    "Compared with the published table (report.compare: auto, the model is GPT-2 Small).")
        return None, (
            f"No comparison: the published table is for GPT-2 Small and this run's model is {model_name} "
            "(report.compare: auto); name an earlier run's metrics folder in report.compare to compare with it."
        )
    if compare == "published":
        return (published_reference(model_source, model_name, n_layers, d_in),
                "Compared with the published table (report.compare: published).")
    return folder_reference(compare, layers, model_name), f"Compared with the metrics in {compare} (report.compare)."
