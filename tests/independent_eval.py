"""A second, independent implementation of loss recovered and L0 (docs/design.md 4), for tests.

It uses only ``transformers`` and torch: no TransformerLens and none of attnsae's evaluation or
activation helpers. hook_z (per-head z, heads concatenated) is the input of the attention output
projection, so a forward pre-hook on that module sees it as [batch, pos, n_heads * d_head] and can
replace it:

- Llama-family models (SmolLM2, Qwen2, Gemma 2, Mistral, OLMo 2): ``model.layers[L].self_attn.o_proj``;
- GPT-NeoX (Pythia): ``gpt_neox.layers[L].attention.dense``;
- GPT-2: ``transformer.h[L].attn.c_proj`` (a Conv1D).

GPT-2 convention. The main path runs GPT-2 through TransformerBridge's compatibility mode, which
folds LayerNorm into the next weights and then the value bias into b_O. Attention rows sum to 1, so
that fold shifts z by a constant per head:

    hook_z = z_raw - b_V_eff,    b_V_eff = b_V + ln_1.bias @ W_V

(ln_1.weight only rescales W_V's rows, so it does not enter the bias). Here that is applied
explicitly on the raw HF weights: the SAE reads ``z_raw - b_V_eff`` and its reconstruction is put
back as ``x_hat + b_V_eff``; zero-ablating hook_z puts ``b_V_eff`` in place of z_raw. Llama has no
value bias, so there hook_z is z_raw.

Metrics, as docs/design.md 4 and the main path define them:
- each CE is the mean next-token cross-entropy over every prediction of every row (position p
  predicts token p+1; the last position predicts nothing), pooled over all rows;
- loss recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean), a ratio of those means;
- L0 = mean over every token position (BOS included) of the number of features > 0.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def load_hf_model(model_dir: str | Path):
    """The saved ``models/base`` folder as a plain transformers model, fp32, eval mode, on CPU."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return model.eval()


# The attention out-projection's name in each family: GPT-2's Conv1D, GPT-NeoX's dense, the rest's o_proj.
OUT_PROJECTIONS = ("attn.c_proj", "attention.dense", "self_attn.o_proj", "attn.out_proj")


def output_projection(model, layer: int) -> torch.nn.Module:
    """The module whose input is hook_z of ``layer``: the out-projection of the block numbered ``layer``."""
    for name, module in model.named_modules():
        if name.endswith(OUT_PROJECTIONS) and str(layer) in name.split("."):
            return module
    raise ValueError(f"no attention out-projection ({', '.join(OUT_PROJECTIONS)}) for layer {layer} in a "
                     f"{model.config.model_type!r} model")


def folded_value_bias(model, layer: int) -> torch.Tensor | None:
    """GPT-2's b_V_eff = b_V + ln_1.bias @ W_V, flat [n_heads * d_head]; None for models without one."""
    if model.config.model_type != "gpt2":
        return None
    block = model.transformer.h[layer]
    d_model = model.config.n_embd
    # Conv1D computes x @ weight + bias with weight [d_model, 3 * d_model], columns ordered q | k | v;
    # the v columns are already in the merged-heads order that c_proj receives.
    w_v = block.attn.c_attn.weight[:, 2 * d_model :]
    b_v = block.attn.c_attn.bias[2 * d_model :]
    return (b_v + block.ln_1.bias @ w_v).detach()


@contextmanager
def replacing_z(model, layer: int, replace: Callable[[torch.Tensor], torch.Tensor]):
    """Within the block, ``replace`` maps the raw z [batch, pos, n_heads * d_head] to what the projection gets."""

    def pre_hook(module, args):
        return (replace(args[0]),) + tuple(args[1:])

    handle = output_projection(model, layer).register_forward_pre_hook(pre_hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def independent_hook_z(model, layer: int, rows: np.ndarray) -> torch.Tensor:
    """hook_z of ``layer`` on ``rows`` as [n * ctx, n_heads * d_head], in the main path's convention."""
    bias = folded_value_bias(model, layer)
    seen: list[torch.Tensor] = []

    def record(z_raw: torch.Tensor) -> torch.Tensor:
        seen.append(z_raw.reshape(-1, z_raw.shape[-1]).clone())
        return z_raw

    with replacing_z(model, layer, record):
        model(torch.as_tensor(np.asarray(rows), dtype=torch.long))
    z = seen[0]
    return z if bias is None else z - bias


def read_sae_folder(folder: str | Path) -> tuple[dict[str, torch.Tensor], int | None]:
    """The weights of a saved SAE folder and its k (topk only), read with json and safetensors alone."""
    from safetensors.torch import load_file

    cfg = json.loads((Path(folder) / "cfg.json").read_text())
    weights = load_file(str(Path(folder) / "sae_weights.safetensors"))
    return weights, cfg["k"] if cfg["architecture"] == "topk" else None


def sae_features(weights: Mapping[str, torch.Tensor], x: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Written out from the SAE's weights: pre = (x - b_dec) @ W_enc + b_enc, then
    - standard: ReLU(pre);
    - topk (``k``): ReLU(pre) where pre ranks among the row's k largest, 0 elsewhere;
    - jumprelu (a ``threshold`` tensor): ReLU(pre) where pre > threshold, 0 elsewhere."""
    pre = (x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
    keep = torch.ones_like(pre, dtype=torch.bool)
    if k is not None:
        ranks = pre.argsort(dim=-1, descending=True).argsort(dim=-1)
        keep = ranks < k
    if "threshold" in weights:
        keep = pre > weights["threshold"]
    return torch.relu(pre) * keep


def sae_reconstruction(weights: Mapping[str, torch.Tensor], f: torch.Tensor) -> torch.Tensor:
    return f @ weights["W_dec"] + weights["b_dec"]


def summed_next_token_ce(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    """Sum of CE over every (position, next token) pair of the batch, in float64 for the running total."""
    vocab = logits.shape[-1]
    per_prediction = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), tokens[:, 1:].reshape(-1),
                                     reduction="none")
    return per_prediction.double().sum().item()


@torch.no_grad()
def independent_metrics(
    model,
    weights: Mapping[str, torch.Tensor],
    layer: int,
    rows: np.ndarray,
    batch_rows: int | None = None,
    fold_value_bias: bool = True,
    k: int | None = None,
) -> dict[str, float]:
    """Clean, SAE-spliced and zero-ablated CE, loss recovered and L0 of the SAE at hook_z of ``layer``.

    ``rows``: token ids [n, ctx], BOS at position 0 (the same rows the main path evaluates).
    ``fold_value_bias=False`` applies the SAE to raw z instead (wrong for GPT-2; tests use it to show
    that the comparison can tell the difference). ``k`` and a ``threshold`` weight: as ``sae_features``.
    """
    weights = {name: t.detach().float().cpu() for name, t in weights.items()}
    bias = folded_value_bias(model, layer) if fold_value_bias else None
    shift = torch.zeros(weights["b_dec"].shape) if bias is None else bias
    batch_rows = batch_rows or len(rows)

    ce_sum = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    predictions = 0
    active_features = 0
    positions = 0

    def splice_sae(z_raw: torch.Tensor) -> torch.Tensor:
        nonlocal active_features, positions
        hook_z = z_raw - shift  # the main path's hook_z (per-head bias folded away for GPT-2)
        f = sae_features(weights, hook_z.reshape(-1, hook_z.shape[-1]), k)
        active_features += (f > 0).sum().item()
        positions += f.shape[0]
        return sae_reconstruction(weights, f).reshape(hook_z.shape) + shift

    def zero_hook_z(z_raw: torch.Tensor) -> torch.Tensor:
        # hook_z = 0 means raw z = b_V_eff for GPT-2; 0 where there is no value bias
        return shift.expand_as(z_raw).clone()

    for start in range(0, len(rows), batch_rows):
        tokens = torch.as_tensor(np.asarray(rows[start : start + batch_rows]), dtype=torch.long)
        ce_sum["clean"] += summed_next_token_ce(model(tokens).logits, tokens)
        with replacing_z(model, layer, splice_sae):
            ce_sum["sae"] += summed_next_token_ce(model(tokens).logits, tokens)
        with replacing_z(model, layer, zero_hook_z):
            ce_sum["zero"] += summed_next_token_ce(model(tokens).logits, tokens)
        predictions += tokens.shape[0] * (tokens.shape[1] - 1)

    ce = {key: total / predictions for key, total in ce_sum.items()}
    gap = ce["zero"] - ce["clean"]
    return {
        "ce_clean": ce["clean"],
        "ce_sae": ce["sae"],
        "ce_zero": ce["zero"],
        "loss_recovered": (ce["zero"] - ce["sae"]) / gap if gap != 0 else float("nan"),
        "l0": active_features / positions,
        "positions": positions,
    }
