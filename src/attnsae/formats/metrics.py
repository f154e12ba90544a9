"""The evaluate stage's files: ``reports/metrics[_heldout]/L<n>.json`` and ``reports/density/L<n>.csv``.

Their names and types, a checked reader for each, the density CSV's text, and how a metric is printed. report,
publish, verify, comparison and tracking read these files through this module alone, so none of them depends
on the evaluation code (or on torch).
"""

from __future__ import annotations

import math
from pathlib import Path

from attnsae.errors import UserError
from attnsae.files import read_json_object, read_text_file

METRIC_NAMES = (
    "l0",
    "loss_recovered",
    "ce_clean",
    "ce_sae",
    "ce_zero",
    "ce_increase",
    "ce_increase_zero",
    "kl_sae",
    "kl_zero",
    "kl_score",
    "mse",
    "explained_variance",
    "dead_fraction",
    "dense_fraction",
)
# The metrics that are means (or ratios of means) over tokens of per-row sums: each gets a standard error,
# stored as "<name>_se".
SE_METRICS = ("l0", "loss_recovered", "ce_clean", "ce_sae", "ce_zero", "ce_increase", "ce_increase_zero", "kl_sae",
              "kl_zero", "kl_score")


_NUMBER = (int, float)
# Every key a reader of the metrics JSON may rely on, and its type; ratios are None when undefined.
METRICS_TYPES: dict[str, tuple[type, ...]] = {
    "layer": (int,),
    "hook_name": (str,),
    "model": (str,),
    "d_sae": (int,),
    "eval_rows": (int,),
    **{name: _NUMBER for name in METRIC_NAMES},
    **{name: (*_NUMBER, type(None)) for name in ("loss_recovered", "kl_score", "explained_variance")},
    "dead_fraction_tokens": (int,),
    "dense_threshold": _NUMBER,
    "eval_tokens": (int,),
}
# Standard errors: absent from files written before evaluate made them; None where the metric is.
SE_TYPES = {f"{name}_se": (*_NUMBER, type(None)) for name in SE_METRICS}


def check_metrics(metrics: dict, path: str | Path) -> dict:
    """The metrics JSON as evaluate writes it, or one line naming the file and the first bad key."""
    for key, types in METRICS_TYPES.items():
        if key not in metrics:
            raise UserError(f"{path}: metrics file lacks '{key}' (re-run `attnsae evaluate`)")
        _check_value(metrics, key, types, path)
    for key, types in SE_TYPES.items():
        if key in metrics:
            _check_value(metrics, key, types, path)
            if metrics[key] is not None and metrics[key] < 0:
                raise UserError(f"{path}: metrics key '{key}' is a standard error, so it must be >= 0, "
                                f"got {metrics[key]!r}")
    return metrics


def _check_value(metrics: dict, key: str, types: tuple[type, ...], path: str | Path) -> None:
    value = metrics[key]
    not_finite = isinstance(value, float) and not math.isfinite(value)
    if isinstance(value, bool) or not isinstance(value, types) or not_finite:
        allowed = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        raise UserError(f"{path}: metrics key '{key}' must be a finite {allowed}, got {value!r}")


def read_metrics(path: str | Path, layer: int | None = None) -> dict:
    """A metrics file, of layer ``layer`` when given (another layer's file copied here is intact too)."""
    return check_metrics(_of_layer(read_json_object(path, "of metrics"), layer, path), path)


def _of_layer(metrics: dict, layer: int | None, path: str | Path) -> dict:
    if layer is not None and metrics.get("layer") != layer:
        raise UserError(f"{path}: holds the metrics of layer {metrics.get('layer')!r}, not of layer {layer} (copied "
                        f"from another layer?); re-run `attnsae evaluate`")
    return metrics


def read_heldout_metrics(path: str | Path, layer: int | None = None) -> dict | None:
    """A held-out metrics file (of layer ``layer`` when given): its metrics (with 'sources', the held-out sources), or
    None when the tokens had no held-out split."""
    metrics = _of_layer(read_json_object(path, "of held-out metrics", written_by="evaluate"), layer, path)
    sources = metrics.get("sources")
    if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
        raise UserError(f"{path}: held-out metrics key 'sources' must be a list of corpus sources, got {sources!r}")
    return check_metrics(metrics, path) if sources else None


def numeric_metrics(metrics: dict) -> dict[str, float]:
    """The numeric entries of a metrics JSON but the layer: the same names for every layer and run."""
    return {
        k: float(v) for k, v in metrics.items()
        if k != "layer" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


DENSITY_HEADER = ("log10_density", "features")


def density_csv(hist: dict[str, list[float]]) -> str:
    """One row per histogram bin: its centre and the number of alive features in it."""
    edges = hist["bin_edges"]
    lines = [",".join(DENSITY_HEADER)]
    lines += [f"{(lo + hi) / 2:.3f},{count}" for lo, hi, count in zip(edges, edges[1:], hist["counts"])]
    return "\n".join(lines) + "\n"


def read_density(path: str | Path) -> list[tuple[float, int]]:
    """(bin centre, features) rows of a density CSV; a corrupt file is one line naming it."""
    lines = read_text_file(path, written_by="evaluate").splitlines()
    if not lines or tuple(lines[0].split(",")) != DENSITY_HEADER:
        raise UserError(f"{path}: not a density histogram (expected the header {','.join(DENSITY_HEADER)})")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        try:
            centre, count = line.split(",")
            rows.append((float(centre), int(count)))
        except ValueError:
            raise UserError(f"{path}: line {number} is not 'log10_density,features' numbers: {line[:60]!r}") from None
    return rows


def format_metrics(metrics: dict) -> list[str]:
    """One terminal line per metric, with its standard error where it has one; dead fraction always with its
    token count."""
    lines = []
    for key in METRIC_NAMES:
        text = format_value(metrics.get(key), metrics.get(f"{key}_se"), "{:.4f}")
        if key == "dead_fraction":
            text += f" (over {metrics['dead_fraction_tokens']:,} tokens)"
        lines.append(f"{key:>20}: {text}")
    return lines


def format_value(value, se, pattern: str) -> str:
    """'0.7312 ± 0.0120' (pattern applied to both), the value alone without a standard error, 'n/a' without a value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return pattern.format(value) + ("" if se is None else f" ± {pattern.format(se)}")
