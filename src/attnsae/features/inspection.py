"""`attnsae inspect`: an SAE on text of your own.

The pipeline measures its SAEs on its own evaluation and held-out tokens; people take SAEs to other text. For each
token of a text this reads, at the SAE's layer: the features that fire (the SAE's own activation: ReLU, TopK or
JumpReLU), for each the head and the earlier token that drove it most (DFA, features/attribution.py), how much of
hook_z the SAE misses there, and what splicing the SAE into the model costs the prediction of the next token. Over
the whole text: the evaluate stage's metrics, defined and computed as it computes them (evaluation/evaluate.py:
every position counts for L0 and the reconstruction, CE is over next-token predictions), with bootstrap standard
errors over rows when the text fills more than one.

The text becomes rows as the tokenize stage makes them (the document separator, then up to context_size - 1
tokens), except that the last, shorter row is kept: nothing given is dropped.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from attnsae.config import EvaluateConfig
from attnsae.data.activations import flatten_heads, unflatten_heads
from attnsae.data.models import hook_z_name
from attnsae.errors import UserError
from attnsae.evaluation.evaluate import (
    block_inputs,
    bootstrap_se,
    explained_variance_from_sums,
    kl_div,
    log_probs,
    logits_from_block,
    summed_metrics,
    token_ce,
)
from attnsae.features import attribution
from attnsae.formats.metrics import SE_METRICS
from attnsae.sae.autoencoder import SAE

DFA_CHUNK = 256  # (position, feature) pairs attributed at once: DFA gathers [pairs, positions, heads, d_head] values


def text_rows(token_ids: list[int], separator: int, context_size: int) -> list[np.ndarray]:
    """The rows a text's tokens make: each the document separator and then up to ``context_size - 1`` tokens."""
    if context_size < 2:
        raise UserError(f"context size {context_size} leaves no room for a token after the separator (allowed: >= 2)")
    if not token_ids:
        raise UserError("the text has no tokens (it is empty)")
    body = context_size - 1
    return [np.asarray([separator, *token_ids[i : i + body]], dtype=np.int64) for i in range(0, len(token_ids), body)]


@dataclass
class FeatureHit:
    """A feature firing at a token, and where its input came from: the head and the source position (in the same
    row) with the largest direct feature attribution, and those attributions."""

    feature: int
    activation: float
    head: int
    head_dfa: float
    source: int
    source_dfa: float


@dataclass
class TokenReading:
    """One position of a row. ``ce_*_next``: the next token's cross-entropy with the SAE spliced in and with hook_z
    zeroed, minus the clean one (None at a row's last position, which predicts nothing here)."""

    position: int
    token_id: int
    text: str
    relative_error: float | None  # ||x - x_hat||^2 / ||x||^2 (None where x is 0)
    ce_increase_next: float | None
    ce_increase_zero_next: float | None
    features: list[FeatureHit]


@dataclass
class TextFeature:
    """A feature over the whole text: its largest activation and where, and on how many tokens it fired."""

    feature: int
    max_activation: float
    row: int
    position: int
    fired_tokens: int


@dataclass
class Inspection:
    layer: int
    context_size: int
    metrics: dict[str, float | None]
    rows: list[list[TokenReading]] = field(default_factory=list)
    top_features: list[TextFeature] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class RowMeasurement:
    """What one row gives: its readings, the sums the text's metrics are made of, and per feature [d_sae] its
    largest activation in the row, where, and on how many tokens it fired (a long text keeps no [tokens, d_sae])."""

    readings: list[TokenReading]
    sums: dict[str, float]
    x_sum: torch.Tensor
    x_sq_sum: torch.Tensor
    peak: torch.Tensor
    peak_position: torch.Tensor
    fired: torch.Tensor


def spliced_log_probs(bridge, sae: SAE, layer: int, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Log-probabilities of the clean model, with hook_z replaced by the SAE's reconstruction and with it zeroed,
    run on from the layer's block as the evaluate stage runs them."""
    entries = block_inputs(bridge, tokens, [layer])

    def with_hook(replace) -> torch.Tensor:
        with bridge.hooks(fwd_hooks=[(hook_z_name(layer), lambda z, hook: replace(z))]):
            return log_probs(logits_from_block(bridge, layer, entries))

    return {
        "clean": log_probs(logits_from_block(bridge, layer, entries)),
        "sae": with_hook(lambda z: unflatten_heads(sae.reconstruct(flatten_heads(z.float())), z).to(z.dtype)),
        "zero": with_hook(torch.zeros_like),
    }


def strongest_sources(t: attribution.LayerTensors, sae: SAE, positions: torch.Tensor,
                      features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(head, head DFA, source, source DFA) of each (position, feature) pair of the row in ``t``: the head whose
    attribution summed over sources is largest, and the source position whose attribution summed over heads is."""
    w_heads = attribution.encoder_by_head(sae, t.z.shape[2])
    parts = []
    for start in range(0, len(positions), DFA_CHUNK):
        chunk = slice(start, start + DFA_CHUNK)
        rows = torch.zeros_like(positions[chunk])
        contributions = attribution.dfa(t, w_heads, rows, positions[chunk], features[chunk])  # [N, S, H]
        later = torch.arange(contributions.shape[1], device=positions.device) > positions[chunk, None]
        by_head = contributions.sum(1).max(-1)
        by_source = contributions.sum(2).masked_fill(later, -torch.inf).max(-1)  # a later token is no source
        parts.append((by_head.indices, by_head.values, by_source.indices, by_source.values))
    return tuple(torch.cat(p) for p in zip(*parts))  # type: ignore[return-value]


def token_hits(activations: torch.Tensor, t: attribution.LayerTensors, sae: SAE, top: int) -> list[list[FeatureHit]]:
    """Per position: its ``top`` largest firing features, largest first, each with its strongest head and source."""
    values, features = activations.topk(min(top, activations.shape[-1]), dim=-1)
    positions, slots = torch.nonzero(values > 0, as_tuple=True)
    hits: list[list[FeatureHit]] = [[] for _ in range(activations.shape[0])]
    if len(positions) == 0:
        return hits
    chosen = features[positions, slots]
    head, head_dfa, source, source_dfa = strongest_sources(t, sae, positions, chosen)
    for n, p in enumerate(positions.tolist()):
        hits[p].append(FeatureHit(int(chosen[n]), float(values[p, slots[n]]), int(head[n]), float(head_dfa[n]),
                                  int(source[n]), float(source_dfa[n])))
    return hits


def next_token_increase(other: torch.Tensor, clean: torch.Tensor) -> list[float | None]:
    """Per position, the next token's CE increase (a row's last position predicts nothing: None)."""
    return [*(other - clean).tolist(), None]


@torch.inference_mode()
def measure_row(bridge, sae: SAE, layer: int, row: np.ndarray, token_text, top: int) -> RowMeasurement:
    """One row (a batch of one: a text's last row is shorter than the others)."""
    tokens = torch.from_numpy(row).long()[None].to(sae.W_enc.device)
    t = attribution.capture_layer(bridge, tokens, layer)
    x = t.x
    activations = sae.encode(x)
    x_hat = sae.decode(activations)
    squared_error = (x_hat - x).pow(2).sum(-1)
    x_norm = x.pow(2).sum(-1)
    lp = spliced_log_probs(bridge, sae, layer, tokens)
    ce = {key: token_ce(value, tokens)[0] for key, value in lp.items()}
    clean_probs = lp["clean"].exp()
    kl = {key: kl_div(lp["clean"], lp[key], clean_probs)[0] for key in ("sae", "zero")}
    hits = token_hits(activations, t, sae, top)
    increase, increase_zero = next_token_increase(ce["sae"], ce["clean"]), next_token_increase(ce["zero"], ce["clean"])
    readings = [
        TokenReading(p, token_id, token_text(token_id),
                     float(squared_error[p] / x_norm[p]) if x_norm[p] > 0 else None,
                     increase[p], increase_zero[p], hits[p])
        for p, token_id in enumerate(row.tolist())
    ]
    sums = {
        **{f"ce_{key}": float(value.double().sum()) for key, value in ce.items()},
        **{f"kl_{key}": float(value.double().sum()) for key, value in kl.items()},
        "l0": float((activations > 0).sum()),
        "predictions": float(len(row) - 1),
        "tokens": float(len(row)),
        "squared_error": float(squared_error.double().sum()),
    }
    x64 = x.double().cpu()
    peak = activations.max(0)
    return RowMeasurement(readings, sums, x64.sum(0), x64.pow(2).sum(0), peak.values.cpu(), peak.indices.cpu(),
                          (activations > 0).sum(0).cpu())


def text_metrics(measured: list[RowMeasurement]) -> dict[str, float | None]:
    """The evaluate stage's metrics over every row of the text (summed_metrics' definitions), and explained variance;
    with two rows or more, each with its bootstrap standard error over rows, as evaluate resamples (its default
    resample count and seed)."""
    row_sums = {key: np.array([m.sums[key] for m in measured]) for key in measured[0].sums}
    with np.errstate(divide="ignore", invalid="ignore"):
        point = summed_metrics({key: values.sum() for key, values in row_sums.items()})
    metrics: dict[str, float | None] = {name: float(v) if np.isfinite(v) else None for name, v in point.items()}
    if len(measured) > 1:
        defaults = EvaluateConfig()
        se = bootstrap_se(row_sums, defaults.bootstrap_resamples, defaults.bootstrap_seed)
        metrics.update({f"{name}_se": None if metrics[name] is None else se[name] for name in SE_METRICS})
    n = int(row_sums["tokens"].sum())
    squared_error = float(row_sums["squared_error"].sum())
    metrics["explained_variance"] = explained_variance_from_sums(
        squared_error, sum(m.x_sum for m in measured), sum(m.x_sq_sum for m in measured), n)
    metrics["mse"] = squared_error / n
    metrics["tokens"] = n
    return metrics


def most_active(measured: list[RowMeasurement], n: int) -> list[TextFeature]:
    """The ``n`` features with the largest activation anywhere in the text (ties: lower feature first)."""
    peak, row = torch.stack([m.peak for m in measured]).max(0)  # over rows, [d_sae]
    fired = sum(m.fired for m in measured)
    order = sorted(torch.nonzero(peak > 0).flatten().tolist(), key=lambda f: (-float(peak[f]), f))[:n]
    return [TextFeature(f, float(peak[f]), int(row[f]), int(measured[int(row[f])].peak_position[f]), int(fired[f]))
            for f in order]


def inspect_rows(bridge, sae: SAE, layer: int, rows: list[np.ndarray], token_text, top: int,
                 context_size: int, top_features: int = 10) -> Inspection:
    """Every reading of ``rows`` (each a separator and its tokens) at ``layer``; ``token_text`` gives a token's text."""
    sae = sae.eval()
    measured = [measure_row(bridge, sae, layer, row, token_text, top) for row in rows]
    return Inspection(layer, context_size, text_metrics(measured), [m.readings for m in measured],
                      most_active(measured, top_features))


def context_size_for(requested: int | None, sae_context: int | None, n_positions: int | None, model: str) -> int:
    """The row length: as asked, else the SAE's training context (its cfg.json), else the model's longest; never
    more than the model takes."""
    if requested is not None:
        if n_positions is not None and requested > n_positions:
            raise UserError(f"--context-size {requested}: {model} takes at most {n_positions} positions "
                            f"(allowed: 2 to {n_positions})")
        return requested
    known = [size for size in (sae_context, n_positions) if size is not None]
    if not known:
        raise UserError(f"{model}: neither the SAE's cfg.json nor the model says how long a row may be; "
                        "give --context-size")
    return min(known)


@dataclass
class FeatureNotes:
    """What a layer's dashboards (its features.json) say of each feature: its tags and density, and whether the
    layer page has its card."""

    tags: list[list[str]]
    density: list[float]
    carded: set[int]
    page: str

    @classmethod
    def of(cls, doc: dict, path: str | Path, d_sae: int) -> FeatureNotes:
        """The notes of features.json ``doc`` (read from ``path``) for an SAE of ``d_sae`` features."""
        if doc["d_sae"] != d_sae:
            raise UserError(f"{path}: holds the dashboards of an SAE of {doc['d_sae']:,} features, not of this one's "
                            f"{d_sae:,}; re-run `attnsae dashboards` or give --features")
        return cls(doc["summary"]["tags"], doc["summary"]["density"], {c["feature"] for c in doc["cards"]},
                   str(Path(path).parent / "index.html"))

    def tag_text(self, feature: int) -> str:
        return f" [{', '.join(self.tags[feature])}]" if self.tags[feature] else ""

    def about(self, feature: int) -> str:
        card = f"; card {self.page}#f{feature}" if feature in self.carded else ""
        return f"{self.tag_text(feature)} density {self.density[feature]:.3%}{card}"


def token_label(text: str, width: int = 16) -> str:
    """A token's text as a quoted, escaped string (spaces and newlines visible), cut to ``width`` characters."""
    label = json.dumps(text, ensure_ascii=False)
    return label if len(label) <= width else label[: width - 2] + "…\""


def plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def summary_line(metrics: dict[str, float | None], rows: int) -> str:
    def num(key: str, pattern: str) -> str:
        value, se = metrics[key], metrics.get(f"{key}_se")
        if value is None:
            return "n/a"
        return format(value, pattern) + ("" if se is None else f" ± {se:{pattern.lstrip('+')}}")

    errors = "one row: no standard errors" if rows == 1 else f"± bootstrap standard errors over the {rows} rows"
    return (f"this text: L0 {num('l0', '.1f')}, explained variance {num('explained_variance', '.3f')}, CE "
            f"{num('ce_clean', '.3f')} nats clean, {num('ce_increase', '+.4f')} with the SAE spliced in, "
            f"{num('ce_increase_zero', '+.4f')} with hook_z zeroed, loss recovered {num('loss_recovered', '.3f')} "
            f"({errors})")


def hit_text(hit: FeatureHit, row: list[TokenReading], notes: FeatureNotes | None) -> str:
    tags = notes.tag_text(hit.feature) if notes is not None else ""
    return f"{hit.feature} {hit.activation:.2f}{tags} H{hit.head}<-{hit.source}:{token_label(row[hit.source].text)}"


def report_lines(inspection: Inspection, about: dict, notes: FeatureNotes | None, per_token: bool) -> list[str]:
    """What `attnsae inspect` prints: what ran, the text's metrics, its most active features, and per token (unless
    ``per_token`` is false) the reconstruction's relative error, the next token's CE increase and the top features."""
    kind = f"{about['kind']} k {about['k']}" if about["k"] is not None else about["kind"]
    n_tokens = inspection.metrics["tokens"]
    lines = [
        f"L{inspection.layer} of {about['model']}, SAE {about['sae']} ({kind}, {about['d_sae']:,} features): "
        f"{n_tokens:,} tokens in {plural(len(inspection.rows), 'row')} of up to {inspection.context_size}, each "
        "starting with the document separator",
        summary_line(inspection.metrics, len(inspection.rows)),
        "most active features: largest activation, at (row, position) token",
    ]
    for f in inspection.top_features:
        token = inspection.rows[f.row][f.position].text
        extra = notes.about(f.feature) if notes is not None else ""
        lines.append(f"  {f.feature:>6} {f.max_activation:8.3f} at ({f.row}, {f.position}) {token_label(token)}, "
                     f"fired on {plural(f.fired_tokens, 'token')}{extra}")
    if not per_token:
        return lines
    lines.append("per token: relative error of the reconstruction, the next token's CE increase with the SAE, and the "
                 "top features: feature activation [tags] head<-source position:token (largest DFA)")
    for r, row in enumerate(inspection.rows):
        if len(inspection.rows) > 1:
            lines.append(f"row {r}")
        for reading in row:
            error = "     n/a" if reading.relative_error is None else f"{reading.relative_error:8.3f}"
            increase = "        " if reading.ce_increase_next is None else f"{reading.ce_increase_next:+8.4f}"
            hits = " · ".join(hit_text(h, row, notes) for h in reading.features)
            lines.append(f"  {reading.position:>4} {token_label(reading.text):<16} {error} {increase}  {hits}")
    return lines


def inspect_text(model_dir: str | Path, sae_dir: str | Path, layer: int | None, text: str, top: int,
                 context_size: int | None, device: torch.device, top_features: int = 10) -> tuple[Inspection, dict]:
    """Load the pinned model and the SAE folder, and inspect ``text``. Returns the inspection and what it ran on
    (model name, SAE folder, its kind, k and width)."""
    from attnsae.data.models import load_bridge, load_tokenizer
    from attnsae.evaluation.evaluate import load_sae_for_model
    from attnsae.features.dashboards import _token_decoder  # a token's text, each decoded once
    from attnsae.formats.sae_cfg import cfg_value, read_sae_cfg

    sae, layer, info = load_sae_for_model(sae_dir, model_dir, layer)
    size = context_size_for(context_size, cfg_value(read_sae_cfg(sae_dir), "context_size"), info.n_positions,
                            info.name)
    tokenizer = load_tokenizer(model_dir)
    rows = text_rows(tokenizer(text, add_special_tokens=False)["input_ids"], info.bos_token_id, size)
    bridge, _ = load_bridge(model_dir, device)
    inspection = inspect_rows(bridge, sae.to(device), layer, rows, _token_decoder(tokenizer), top, size,
                              top_features)
    about = {"model": info.name, "sae": str(sae_dir), "kind": sae.kind, "k": sae.k, "d_sae": sae.d_sae}
    return inspection, about
