"""What a hook_z feature reads and what it writes: the attribution maths behind every dashboard number.

For one layer, with A[b,h,d,s] the attention pattern (dest d, source s), v[b,s,h] the values (a model with
fewer key/value heads than query heads has its value heads repeated, as its attention does) and
x = concat_h z^h the SAE input, the model computes z[b,d,h] = sum_s A[b,h,d,s] v[b,s,h] exactly. So the
encoder's dot product splits over source positions and heads:

    pre_f[b,d]      = (x[b,d] - b_dec) . W_enc[:, f] + b_enc[f]
    DFA_f[b,d,s,h]  = A[b,h,d,s] * (v[b,s,h] . W_enc^h[:, f])         (direct feature attribution)
    sum_{s,h} DFA_f = x[b,d] . W_enc[:, f] = pre_f[b,d] - bias_f
    bias_f          = b_enc[f] - b_dec . W_enc[:, f]                  (what no source position explains)

W_enc^h is the d_head-sized slice of head h. On the write side, the feature's decoder row moves the residual
stream by sum_h W_dec[f, h] W_O^h (through the block's norm on the attention output where it has one); through
the final norm and the unembedding that is the feature's logit effect (``logit_effects``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnsae.sae.autoencoder import SAE


def hook_names(layer: int) -> dict[str, str]:
    """The three hooks a layer's attribution reads (TransformerLens names, aliases in TransformerBridge)."""
    return {
        "z": f"blocks.{layer}.attn.hook_z",
        "pattern": f"blocks.{layer}.attn.hook_pattern",
        "v": f"blocks.{layer}.attn.hook_v",
    }


@dataclass
class LayerTensors:
    """One batch of token rows at one layer: z [B,S,H,dh], pattern [B,H,dest,src], v [B,S,H,dh] (per query head)."""

    tokens: torch.Tensor
    z: torch.Tensor
    pattern: torch.Tensor
    v: torch.Tensor

    @property
    def x(self) -> torch.Tensor:
        """The SAE input, [B*S, H*dh] (heads concatenated)."""
        b, s, h, d = self.z.shape
        return self.z.reshape(b * s, h * d)


@torch.inference_mode()
def capture_layer(bridge, tokens: torch.Tensor, layer: int) -> LayerTensors:
    """hook_z, hook_pattern and hook_v of ``layer`` from one forward pass that stops after that layer."""
    names = hook_names(layer)
    wanted = set(names.values())
    _, cache = bridge.run_with_cache(tokens, names_filter=lambda name: name in wanted, stop_at_layer=layer + 1,
                                     return_type=None)
    z, pattern, v = (cache[names[key]].float() for key in ("z", "pattern", "v"))
    n_heads = z.shape[2]
    if v.shape[2] != n_heads:  # grouped-query attention: each value head serves n_heads / kv_heads query heads
        v = v.repeat_interleave(n_heads // v.shape[2], dim=2)
    return LayerTensors(tokens=tokens, z=z, pattern=pattern, v=v)


def encoder_by_head(sae: SAE, n_heads: int) -> torch.Tensor:
    """W_enc as [H, d_head, d_sae]: the rows of W_enc that read each head."""
    return sae.W_enc.detach().reshape(n_heads, sae.d_in // n_heads, sae.d_sae)


def bias_terms(sae: SAE) -> torch.Tensor:
    """bias_f = b_enc[f] - b_dec . W_enc[:, f], [d_sae]: the part of each pre-activation no source explains."""
    return (sae.b_enc - sae.b_dec @ sae.W_enc).detach()


def pre_activations(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    return ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).detach()


def dfa(t: LayerTensors, w_heads: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
        features: torch.Tensor) -> torch.Tensor:
    """DFA_f[b,d,s,h] for N (row, position, feature) triples of the batch: [N, S, H].

    Sources after d get zero (the pattern is causal). Memory: N x S x H x d_head for the gathered values.
    """
    values = t.v[rows]  # [N, S, H, dh]
    reads = torch.einsum("nshd,hdn->nsh", values, w_heads[:, :, features])  # v[b,s,h] . W_enc^h[:, f]
    attention = t.pattern[rows, :, positions, :].transpose(1, 2)  # [N, S(src), H]
    return attention * reads


def decoder_head_shares(sae: SAE, n_heads: int) -> torch.Tensor:
    """Weight-based head attribution, [d_sae, H]: ||W_dec[f, h]|| / sum_h' ||W_dec[f, h']||."""
    norms = sae.W_dec.detach().reshape(sae.d_sae, n_heads, -1).norm(dim=-1)
    return norms / norms.sum(-1, keepdim=True).clamp_min(1e-12)


def residual_directions(bridge, sae: SAE, layer: int, features: torch.Tensor) -> torch.Tensor:
    """sum_h W_dec[f, h] W_O^h: what a unit activation of each feature adds to the residual stream, [N, d_model];
    through the norm the block applies to the attention output before adding it (Gemma 2, OLMo 2: ``ln1_post``)."""
    w_o = bridge.blocks[layer].attn.W_O.detach().float()  # [H, dh, d_model]
    rows = sae.W_dec.detach()[features].reshape(len(features), w_o.shape[0], w_o.shape[1])
    directions = torch.einsum("nhd,hdm->nm", rows, w_o)
    post = getattr(bridge.blocks[layer], "ln1_post", None)
    return directions if post is None else through_norm(post._original_component, directions, centres=False)


def norm_gain(norm: torch.nn.Module, width: int) -> torch.Tensor:
    """The per-dimension gain an RMSNorm-type module applies, measured on the module itself: it maps a constant vector
    c * 1 to gain * c / sqrt(c^2 + eps), the gain to float precision for large c (Gemma's norms multiply by 1 + w,
    most others by w). Where that is the module's weight, the weight itself, to the last bit."""
    weight = getattr(norm, "weight", None)
    probe = torch.full((1, width), 1e3, dtype=weight.dtype if weight is not None else torch.float32,
                       device=weight.device if weight is not None else None)
    with torch.no_grad():
        gain = norm(probe)[0].float().detach()
    if weight is not None and torch.allclose(gain, weight.detach().float(), rtol=1e-5, atol=1e-7):
        return weight.detach().float()
    return gain


def through_norm(norm: torch.nn.Module, directions: torch.Tensor, centres: bool) -> torch.Tensor:
    """``directions`` through a norm as the model applies it, without its per-token scale (the same for every output
    dimension, so rankings are exact): LayerNorm centres, then multiplies by its weight; RMSNorm multiplies by its
    gain. A LayerNorm's bias moves every direction alike and is left out."""
    if centres:
        directions = directions - directions.mean(-1, keepdim=True)
        weight = getattr(norm, "weight", None)
        return directions if weight is None else directions * weight.detach().float()
    return directions * norm_gain(norm, directions.shape[-1])


def logit_effects(bridge, directions: torch.Tensor) -> torch.Tensor:
    """The direct effect of residual directions on the logits, [N, vocab], through the final norm as the model
    applies it (``through_norm``). When TransformerLens has folded the norm's weight into W_U (GPT-2 in
    compatibility mode) the norm has none. The effects are on the logits before any final soft-capping (Gemma 2's
    cap * tanh(logits / cap)): the cap acts on the sum of every direction's effect, so one direction alone has no
    capped effect, and capping, monotonic in each logit, leaves the ranking of tokens as it is."""
    centres = bridge.cfg.normalization_type in ("LN", "LNPre")
    return through_norm(bridge.ln_final._original_component, directions, centres) @ bridge.W_U.detach().float()
