"""The sparsity / fidelity frontier: one DVC experiment per architecture and sparsity value, then one table.

`attnsae frontier queue` queues a DVC experiment for each point of params.yaml's ``frontier`` section
(``dvc exp run --queue`` up to the evaluate stages: no dashboards, report or publishing per point);
``dvc exp run --run-all`` runs them; `attnsae frontier collect` reads every ``frontier-*`` experiment's params
and metrics from ``dvc exp show --json`` into ``reports/frontier.csv`` (git-tracked, layout.py), which the
report draws: L0 against CE increase and against loss recovered, an architecture per colour, a chart per layer.

A point changes only the ``sae`` section and ``per_layer`` entries: the architecture, its settings (the
frontier entry's ``settings`` replace the section's), and its sparsity setting on every layer. Settings of
the previous architecture are removed, since config.py refuses them under another one.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import subprocess
from pathlib import Path
from typing import Any

from attnsae import config
from attnsae.errors import UserError
from attnsae.files import write_text_atomic

EXPERIMENT_PREFIX = "frontier-"
TARGETS = ("evaluate",)  # the stages each point runs (and what they depend on)
# Every setting that belongs to one architecture only (what a point removes before adding its own).
ARCHITECTURE_KEYS = sorted({key for settings in config.ARCHITECTURE_SETTINGS.values() for key in settings})
METRICS = ("l0", "ce_increase", "ce_increase_se", "loss_recovered", "loss_recovered_se", "dead_fraction")
HELDOUT_METRICS = ("l0", "ce_increase", "ce_increase_se", "loss_recovered", "loss_recovered_se")
COLUMNS = ("experiment", "architecture", "setting", "value", "layer", *METRICS,
           *(f"heldout_{m}" for m in HELDOUT_METRICS))


def experiment_name(architecture: str, value: int | float) -> str:
    return f"{EXPERIMENT_PREFIX}{architecture}-{value:g}"


def point_params(params: dict[str, Any], architecture: str, value: int | float, settings: dict[str, Any]) -> dict:
    """``params`` as the point trains it (a new dict), checked like any params file."""
    setting = config.SPARSITY_SETTINGS[architecture]
    out = copy.deepcopy(params)
    sae = {k: v for k, v in out["sae"].items() if k not in ARCHITECTURE_KEYS}
    out["sae"] = {**sae, **settings, "architecture": architecture, setting: value}
    out["per_layer"] = {layer: {k: v for k, v in (entry or {}).items() if k not in ARCHITECTURE_KEYS}
                        for layer, entry in (out.get("per_layer") or {}).items()}
    out.pop("frontier", None)  # not the point's business, and experiments need not carry it
    try:
        config.validate(out)
    except UserError as err:
        raise UserError(f"frontier.{architecture} point {value:g}: {err}") from None
    return out


def hydra_value(value: Any) -> str:
    """A value as DVC's ``-S`` (Hydra's override grammar) reads it back to the same YAML value."""
    return json.dumps(value) if isinstance(value, (str, list, dict)) else ("null" if value is None else repr(value))


def overrides(params: dict[str, Any], target: dict[str, Any]) -> list[str]:
    """``dvc exp run -S`` arguments that turn ``params`` into ``target``, for the sae and per_layer sections."""
    out = []
    for path, before, after in _sections(params, target):
        for key in sorted(set(before) - set(after)):
            out.append(f"~{path}.{key}")
        for key in sorted(after):
            if key not in before or before[key] != after[key]:
                out.append(f"++{path}.{key}={hydra_value(after[key])}")
    return out


def _sections(params: dict, target: dict):
    yield "sae", params["sae"], target["sae"]
    for layer, entry in target["per_layer"].items():
        yield f"per_layer.{layer}", (params.get("per_layer") or {}).get(layer) or {}, entry


def queue_commands(params: dict[str, Any]) -> list[list[str]]:
    """The `dvc exp run --queue` command of every point of the ``frontier`` section, each point checked first."""
    points = config.frontier_config(params).points()
    if not points:
        raise UserError(f"{config.PARAMS_FILE}: no frontier points to queue (add a 'frontier' section: "
                        "docs/sweeps-frontier.md, The frontier)")
    commands = []
    for architecture, value, settings in points:
        target = point_params(params, architecture, value, settings)
        sets = [arg for override in overrides(params, target) for arg in ("-S", override)]
        commands.append(["dvc", "exp", "run", "--queue", *TARGETS, "--name", experiment_name(architecture, value),
                         *sets])
    return commands


def queue(params: dict[str, Any]) -> list[str]:
    """Queue every point; returns the experiment names. Side effect: DVC's experiment queue."""
    names = []
    for command in queue_commands(params):
        _dvc(command)
        names.append(command[command.index("--name") + 1])
    return names


def _dvc(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True)
    except FileNotFoundError:
        raise UserError("dvc is not installed here (make install puts it in .venv/bin)") from None
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise UserError(f"{' '.join(command[:5])} ... failed: {last[0]}")
    return done.stdout


# ---------------------------------------------------------------------------------------------------
# Collect: `dvc exp show --json` -> reports/frontier.csv


def experiments(show: list[dict]) -> dict[str, dict]:
    """name -> data (params, metrics) of every finished experiment in ``dvc exp show --json`` output. A running
    one is left out: its data is its temporary workspace's (``"rev": "workspace"``), whose metrics files hold the
    baseline's numbers until its own evaluate has run; a queued one has no metrics yet."""
    found = {}
    for entry in show:
        for exp in entry.get("experiments") or []:
            revision = (exp.get("revs") or [{}])[0]
            data = revision.get("data") or {}
            if exp.get("name") and data and data.get("rev") != "workspace":
                found[exp["name"]] = data
    return found


def _file_data(data: dict, kind: str, path: str) -> dict:
    return ((data.get(kind) or {}).get(path) or {}).get("data") or {}


def point_rows(name: str, data: dict) -> list[dict]:
    """One row per layer of an experiment: its architecture, sparsity setting and metrics."""
    params = _file_data(data, "params", config.PARAMS_FILE)
    sae = params.get("sae") or {}
    architecture = sae.get("architecture", "standard")
    setting = config.SPARSITY_SETTINGS.get(architecture, "")
    rows = []
    for layer in params.get("layers") or []:
        metrics = _file_data(data, "metrics", f"reports/metrics/L{layer}.json")
        if not metrics:
            continue  # a failed experiment leaves no metrics
        heldout = _file_data(data, "metrics", f"reports/metrics_heldout/L{layer}.json")
        entry = (params.get("per_layer") or {}).get(f"L{layer}") or {}
        rows.append({
            "experiment": name, "architecture": architecture, "setting": setting,
            "value": entry.get(setting, sae.get(setting)), "layer": layer,
            **{m: metrics.get(m) for m in METRICS},
            **{f"heldout_{m}": heldout.get(m) for m in HELDOUT_METRICS},
        })
    return rows


def frontier_rows(show: list[dict]) -> list[dict]:
    """Every frontier experiment's rows, by architecture, layer and value."""
    rows = [row for name, data in experiments(show).items() if name.startswith(EXPERIMENT_PREFIX)
            for row in point_rows(name, data)]
    order = list(config.ARCHITECTURE_SETTINGS)
    return sorted(rows, key=lambda r: (order.index(r["architecture"]), r["layer"], r["value"] or 0))


def frontier_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in COLUMNS})
    return buf.getvalue()


def unfinished(show: list[dict], rows: list[dict]) -> list[str]:
    """The frontier experiments `dvc exp show` lists without results among ``rows``: queued, running or failed."""
    names = {exp.get("name") or "" for entry in show for exp in entry.get("experiments") or []}
    finished = {row["experiment"] for row in rows}
    return sorted(n for n in names if n.startswith(EXPERIMENT_PREFIX) and n not in finished)


def collect(path) -> tuple[list[dict], list[str]]:
    """Write ``path`` from `dvc exp show --json`; returns the rows and the frontier experiments not finished."""
    show = json.loads(_dvc(["dvc", "exp", "show", "--json"]))
    rows = frontier_rows(show)
    if not rows:
        raise UserError("no finished frontier experiments in `dvc exp show` (queue them with `attnsae frontier "
                        "queue`, run them with `dvc exp run --run-all`)")
    write_text_atomic(path, frontier_csv(rows))
    return rows, unfinished(show, rows)


def read_frontier(path) -> list[dict]:
    """reports/frontier.csv as rows with numbers (None where a value is missing); [] when there is no file."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    if rows and set(COLUMNS) - set(rows[0]):
        raise UserError(f"{path}: not a frontier table (columns {', '.join(COLUMNS)})")
    return [{k: _number(v) if k not in ("experiment", "architecture", "setting") else v for k, v in row.items()}
            for row in rows]


def _number(text: str) -> float | None:
    if text == "":
        return None
    value = float(text)
    return value if math.isfinite(value) else None


# ---------------------------------------------------------------------------------------------------
# What the report shows: a chart per layer and the table


COLOURS = {"standard": "tab:blue", "topk": "tab:orange", "batchtopk": "tab:green", "jumprelu": "tab:red"}
MARKERS = {"standard": "o", "topk": "s", "batchtopk": "^", "jumprelu": "D"}


def frontier_figure(rows: list[dict]):
    """A row of two panels per layer: L0 against CE increase (+/- its standard error) and against loss
    recovered; an architecture per colour, its points joined in order of L0, dead fraction beside each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted({int(r["layer"]) for r in rows})
    fig, axes = plt.subplots(len(layers), 2, figsize=(10, 3.3 * len(layers)), squeeze=False)
    for (ce_ax, lr_ax), layer in zip(axes, layers):
        for architecture in config.ARCHITECTURE_SETTINGS:
            points = sorted((r for r in rows if int(r["layer"]) == layer and r["architecture"] == architecture
                             and r["l0"] is not None), key=lambda r: r["l0"])
            if not points:
                continue
            style = {"color": COLOURS[architecture], "marker": MARKERS[architecture], "label": architecture}
            l0 = [r["l0"] for r in points]
            ce_ax.errorbar(l0, [r["ce_increase"] for r in points], yerr=[r["ce_increase_se"] or 0 for r in points],
                           capsize=2, **style)
            lr_ax.plot(l0, [r["loss_recovered"] for r in points], **style)
            for ax, key in ((ce_ax, "ce_increase"), (lr_ax, "loss_recovered")):
                for r in points:
                    if r[key] is not None and r["dead_fraction"] is not None:
                        ax.annotate(f"{r['dead_fraction']:.0%}", (r["l0"], r[key]), textcoords="offset points",
                                    xytext=(4, 3), fontsize=7, color=COLOURS[architecture])
        ce_ax.set(title=f"L{layer}: CE increase (dead % beside each point)", xlabel="L0", ylabel="CE increase (nats)")
        lr_ax.set(title=f"L{layer}: loss recovered", xlabel="L0", ylabel="loss recovered")
        ce_ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _cell(value, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def _with_se(row: dict, key: str, pattern: str) -> str:
    se = row.get(f"{key}_se")
    return _cell(row.get(key), pattern) + ("" if se is None else f" ± {pattern.format(se)}")


def frontier_markdown(rows: list[dict]) -> str:
    """The frontier as a table: in-distribution and held-out source side by side."""
    lines = ["| layer | architecture | setting | L0 | CE increase | loss recovered | dead | held-out L0 | "
             "held-out CE increase | held-out loss recovered |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["layer"], list(COLOURS).index(r["architecture"]), r["value"] or 0)):
        heldout = {key.removeprefix("heldout_"): value for key, value in r.items() if key.startswith("heldout_")}
        cells = [
            str(int(r["layer"])), r["architecture"], f"{r['setting']} {_cell(r['value'], '{:g}')}",
            _cell(r["l0"], "{:.1f}"), _with_se(r, "ce_increase", "{:.4f}"), _with_se(r, "loss_recovered", "{:.3f}"),
            _cell(r["dead_fraction"], "{:.1%}"), _cell(heldout["l0"], "{:.1f}"),
            _with_se(heldout, "ce_increase", "{:.4f}"), _with_se(heldout, "loss_recovered", "{:.3f}"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
