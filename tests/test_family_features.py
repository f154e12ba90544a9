"""The dashboards' maths and the SAE folder on every model family (issue 22, items 3 and 4).

The seven tiny random families of test_model_families.py, each made by the model stage from a ``local:`` folder:

- DFA: the direct feature attribution by source position and head plus the bias remainder equals the SAE's
  pre-activation (1e-4), with grouped value heads where the model has them;
- logit effects: ``attribution.logit_effects`` of a feature's decoder direction equals a slow reference built from
  the plain transformers model's own modules: the out-projection, the norm it applies to the attention output
  (Gemma 2, OLMo 2), the final norm and the unembedding (lm_head), with each norm's per-token scale undone;
- the SAE folder: the shapes, hook name and layout SAELens reads.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from attnsae.data.models import hook_z_name, load_bridge
from attnsae.features import attribution
from attnsae.formats.sae_cfg import sae_cfg
from attnsae.sae.autoencoder import SAE, save_sae
from independent_eval import output_projection
from test_independent_eval import soft_threshold_sae
from test_model_families import FAMILIES, LAYERS, VOCAB, random_family_model

LAYER = 1
TOL = 1e-4
# The families whose blocks normalise the attention output before adding it to the residual stream, and the name of
# that norm in transformers (Llama's post_attention_layernorm is the MLP's input norm: not one of these).
ATTENTION_OUTPUT_NORMS = {"gemma2": "post_attention_layernorm", "olmo2": "post_attention_layernorm"}


@pytest.fixture(scope="module")
def family(tmp_path_factory, request):
    folder = tmp_path_factory.mktemp("family") / request.param
    model = random_family_model(request.param, folder)
    bridge, info = load_bridge(folder, torch.device("cpu"))
    return request.param, model, bridge, info


def random_sae(d_in: int, seed: int = 0) -> SAE:
    sae = soft_threshold_sae(d_in, threshold=0.05, seed=seed)
    with torch.no_grad():
        sae.b_enc.add_(torch.randn(sae.d_sae, generator=torch.Generator().manual_seed(seed)) * 0.1)
    return sae


@pytest.mark.parametrize("family", FAMILIES, indirect=True)
def test_dfa_by_source_and_head_plus_the_bias_remainder_is_the_pre_activation(family):
    name, _, bridge, info = family
    tokens = torch.randint(0, VOCAB - 1, (2, 12), generator=torch.Generator().manual_seed(3))
    tokens[:, 0] = info.bos_token_id
    t = attribution.capture_layer(bridge, tokens, LAYER)
    assert t.v.shape == t.z.shape  # value heads repeated per query head where the model groups them
    sae = random_sae(info.d_in)
    pre = attribution.pre_activations(sae, t.x).view(2, 12, -1)
    rows, positions = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 5, 7, 11])
    features = torch.tensor([3, 17, 40, info.d_in])
    contributions = attribution.dfa(t, attribution.encoder_by_head(sae, info.n_heads), rows, positions, features)
    explained = contributions.sum((1, 2)) + attribution.bias_terms(sae)[features]
    torch.testing.assert_close(explained, pre[rows, positions, features], atol=TOL, rtol=0, msg=name)
    assert contributions.abs().sum() > 100 * TOL  # the sources carry the pre-activation, not the bias alone


def undo_norm_scale(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What ``norm`` does to ``x`` but its per-token scale: RMSNorm's 1/rms, LayerNorm's 1/std and its bias."""
    eps = next(getattr(norm, a) for a in ("variance_epsilon", "eps", "epsilon") if hasattr(norm, a))
    if isinstance(norm, torch.nn.LayerNorm):
        return (norm(x) - norm.bias) * torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
    return norm(x) * torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def reference_logit_effects(name: str, model, sae: SAE, features: torch.Tensor) -> torch.Tensor:
    """A feature's decoder row through the plain model's modules, one direction at a time."""
    projection = output_projection(model, LAYER)
    blocks = model.transformer.h if name == "gpt2" else model.gpt_neox.layers if name == "gpt_neox" \
        else model.model.layers
    final = model.transformer.ln_f if name == "gpt2" else model.gpt_neox.final_layer_norm if name == "gpt_neox" \
        else model.model.norm
    effects = []
    with torch.no_grad():
        for f in features.tolist():
            row = sae.W_dec[f][None]
            written = row @ projection.weight if name == "gpt2" else row @ projection.weight.T  # Conv1D: [in, out]
            if name in ATTENTION_OUTPUT_NORMS:
                written = undo_norm_scale(getattr(blocks[LAYER], ATTENTION_OUTPUT_NORMS[name]), written)
            effects.append(model.lm_head(undo_norm_scale(final, written))[0])
    return torch.stack(effects)


@pytest.mark.parametrize("family", FAMILIES, indirect=True)
def test_logit_effects_equal_a_slow_reference_through_the_models_own_head(family):
    name, model, bridge, info = family
    sae = random_sae(info.d_in, seed=1)
    features = torch.tensor([0, 9, 33])
    ours = attribution.logit_effects(bridge, attribution.residual_directions(bridge, sae, LAYER, features))
    reference = reference_logit_effects(name, model, sae, features)
    if name == "gpt2":  # compatibility mode centres the unembedding: only differences between tokens are kept
        ours, reference = ours - ours.mean(-1, keepdim=True), reference - reference.mean(-1, keepdim=True)
    scale = reference.abs().max()
    assert scale > 1e-3
    torch.testing.assert_close(ours / scale, reference / scale, atol=TOL, rtol=0, msg=name)


@pytest.mark.parametrize("family", FAMILIES, indirect=True)
def test_the_sae_folder_is_what_saelens_reads(family, tmp_path):
    name, _, _, info = family
    sae = random_sae(info.d_in)
    cfg = sae_cfg(d_in=info.d_in, d_sae=sae.d_sae, hook_name=hook_z_name(LAYER), layer=LAYER, model_name=info.source,
                  context_size=16, dataset="synthetic")
    save_sae(sae, tmp_path / "sae", cfg, torch.zeros(sae.d_sae))
    written = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    weights = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    assert (written["d_in"], written["hook_name"], written["reshape_activations"]) == (
        info.n_heads * info.d_head, f"blocks.{LAYER}.attn.hook_z", "hook_z")
    assert {k: tuple(v.shape) for k, v in weights.items()} == {
        "W_enc": (info.d_in, sae.d_sae), "W_dec": (sae.d_sae, info.d_in), "b_enc": (sae.d_sae,), "b_dec": (info.d_in,)}
    assert info.n_layers == LAYERS and np.isfinite(weights["W_enc"].numpy()).all()
