"""What the report's per-layer table is compared against.

Either the published GPT-2 Small table (design.md 2) or the metrics folder of an earlier run or of
an imported SAE (``L<n>.json`` files in the format the `evaluate@L` stage writes). The published
numbers only mean something next to GPT-2 Small at the same site, so that comparison is refused
for any other model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from attnsae.errors import UserError
from attnsae.files import read_json_object

# The metrics shown side by side (keys of the metrics JSON).
COMPARED = ("l0", "loss_recovered", "dead_fraction", "explained_variance")
KEYWORDS = ("auto", "published", "none")
ALLOWED = "auto, published, none, or a folder of L<n>.json metrics files"

PUBLISHED_SOURCE = (
    "Kissane, Krzyzanowski, Conmy, Nanda, 'Attention SAEs Scale to GPT-2 Small' (Feb 2024); "
    "weights: ckkissane/attn-saes-gpt2-small-all-layers"
)
# The original evaluated 5 batches of 512 x 128 tokens (design.md 4); dead fractions depend on it.
PUBLISHED_EVAL_TOKENS = 5 * 512 * 128
PUBLISHED_SHAPE = {"n_layers": 12, "d_in": 768}

# design.md 2, one row per layer: d_sae, L1 coefficient, L0, loss recovered, dead features,
# % alive interpretable (a person's judgement; kept for completeness, never compared).
# Explained variance was not published.
_PUBLISHED_ROWS = (
    (0, 24576, 1.8, 3, 0.99, 0.13, 0.97),
    (1, 24576, 0.8, 20, 0.78, 0.49, 0.87),
    (2, 24576, 1.0, 16, 0.90, 0.20, 0.95),
    (3, 24576, 0.9, 15, 0.84, 0.08, 0.75),
    (4, 24576, 1.1, 15, 0.88, 0.05, 1.00),
    (5, 49152, 1.0, 20, 0.85, 0.40, 0.82),
    (6, 24576, 1.1, 19, 0.82, 0.28, 0.75),
    (7, 49152, 1.1, 19, 0.83, 0.58, 0.70),
    (8, 24576, 1.3, 20, 0.76, 0.37, 0.64),
    (9, 24576, 1.2, 21, 0.83, 0.48, 0.85),
    (10, 24576, 1.3, 16, 0.85, 0.41, 0.81),
    (11, 24576, 3.0, 8, 0.89, 0.84, 0.66),
)

PUBLISHED_GPT2_SMALL: dict[int, dict] = {
    layer: {
        "layer": layer,
        "d_sae": d_sae,
        "l1_coeff": l1,
        "l0": float(l0),
        "loss_recovered": recovered,
        "dead_fraction": dead,
        "explained_variance": None,
        "alive_interpretable": interpretable,
        "eval_tokens": PUBLISHED_EVAL_TOKENS,
    }
    for layer, d_sae, l1, l0, recovered, dead, interpretable in _PUBLISHED_ROWS
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
    return source == "gpt2" and n_layers == PUBLISHED_SHAPE["n_layers"] and d_in == PUBLISHED_SHAPE["d_in"]


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


def read_metrics_file(path: Path) -> dict:
    return read_json_object(path, "of metrics")


def folder_reference(folder: str | Path, layers: list[int], our_model: str) -> Reference:
    """An earlier run's or an imported SAE's metrics folder, read for the layers we report."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"report.compare: {str(folder)!r} is not a folder (allowed: {ALLOWED})")
    found = {layer: read_metrics_file(folder / f"L{layer}.json") for layer in layers if (folder / f"L{layer}.json").is_file()}
    if not found:
        wanted = ", ".join(f"L{layer}.json" for layer in layers)
        raise UserError(f"report.compare: {folder} holds none of {wanted} (allowed: {ALLOWED})")
    notes = []
    missing = [f"L{layer}" for layer in layers if layer not in found]
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
            return published_reference(model_source, model_name, n_layers, d_in), "Compared with the published table (report.compare: auto, the model is GPT-2 Small)."
        return None, (
            f"No comparison: the published table is for GPT-2 Small and this run's model is {model_name} "
            "(report.compare: auto); name an earlier run's metrics folder in report.compare to compare with it."
        )
    if compare == "published":
        return published_reference(model_source, model_name, n_layers, d_in), "Compared with the published table (report.compare: published)."
    return folder_reference(compare, layers, model_name), f"Compared with the metrics in {compare} (report.compare)."
