"""The harvesting forward (issue 23, item 2): hook_z of the layers SAEs train on, from the model's own transformers
modules, without TransformerLens's hook points. The `activations` stage and `train --stream` read hook_z through it;
evaluate and the dashboards, which splice into the model, keep the bridge.

hook_z is the input of each block's attention out-projection (the heads' mixed values, concatenated: ``o_proj``,
GPT-NeoX's ``dense``, GPT-2's ``c_proj``), which one forward pre-hook per needed layer reads. The forward stops as soon
as the last needed layer's is read, so no later block and no unembedding run. Attention runs through PyTorch's
scaled-dot-product attention (fused kernels on GPUs), except where the model soft-caps its attention logits (Gemma 2),
which SDPA cannot: those run transformers' eager attention.

It gives what ``activations.capture_z`` gives through the bridge (tests/test_harvest.py: 1e-5 in fp32, every
family), including GPT-2's convention: the bridge processes GPT-2's weights as TransformerLens does, folding the value
bias (with ln_1's bias through W_V) into b_O, so its hook_z is the out-projection's input less b_V + ln_1.bias @ W_V.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from attnsae.data.models import autocast_dtype, damaged_model_as_user_error, no_progress_bars

ATTENTION_MODULES = ("self_attn", "attention", "attn")  # Llama-style and most others, GPT-NeoX, GPT-2
OUT_PROJECTIONS = ("o_proj", "dense", "c_proj", "out_proj")


class _LastLayerRead(Exception):
    """Raised by the last needed layer's pre-hook: nothing after it is needed."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's blocks in order: the module list under its base model as long as ``num_hidden_layers``."""
    n_layers = model.config.num_hidden_layers
    for module in model.base_model.children():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise ValueError(f"no list of {n_layers} blocks in a {model.config.model_type!r} model")


def out_projection(block: nn.Module) -> nn.Module:
    """The attention out-projection of ``block``: the module whose input is hook_z."""
    for attention_name in ATTENTION_MODULES:
        attention = getattr(block, attention_name, None)
        for name in OUT_PROJECTIONS:
            if attention is not None and isinstance(getattr(attention, name, None), nn.Module):
                return getattr(attention, name)
    raise ValueError(f"no attention out-projection ({', '.join(OUT_PROJECTIONS)}) in a {type(block).__name__}")


def folded_value_bias(model: nn.Module, layer: int) -> torch.Tensor | None:
    """GPT-2's b_V + ln_1.bias @ W_V [n_heads * d_head], which the bridge's hook_z leaves out; None elsewhere."""
    if model.config.model_type != "gpt2":
        return None
    block = decoder_layers(model)[layer]
    d_model = model.config.n_embd
    w_v = block.attn.c_attn.weight[:, 2 * d_model:]  # Conv1D: x @ weight, columns q | k | v, heads merged
    return (block.attn.c_attn.bias[2 * d_model:] + block.ln_1.bias @ w_v).detach()


def attention_implementation(config) -> str:
    """SDPA, or transformers' eager attention where the model soft-caps attention logits (SDPA has no soft-cap)."""
    return "eager" if getattr(config, "attn_logit_softcapping", None) else "sdpa"


def load_harvesting_model(model_dir: str | Path, device: torch.device) -> nn.Module:
    """The pinned model as plain transformers modules in fp32, eval mode, SDPA where the model allows it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    attention = attention_implementation(AutoConfig.from_pretrained(str(model_dir)))
    with damaged_model_as_user_error(model_dir), no_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation=attention)
    model.to(device).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


class HarvestingForward:
    """``forward(tokens)``: hook_z of ``layers`` as {layer: [batch * pos, n_heads * d_head]} in fp32, as
    ``activations.capture_z`` returns it, from one forward that stops after the last of them."""

    def __init__(self, model: nn.Module, layers: list[int], precision: str = "fp32"):
        self.model, self.layers = model, sorted(layers)
        device = next(model.parameters()).device
        self.amp = autocast_dtype(precision, device)
        blocks = decoder_layers(model)
        self.biases = {layer: folded_value_bias(model, layer) for layer in self.layers}
        self.projections = {layer: out_projection(blocks[layer]) for layer in self.layers}
        self.seen: dict[int, torch.Tensor] = {}

    def _reader(self, layer: int):
        last = layer == self.layers[-1]

        def read(module, args):
            self.seen[layer] = args[0]
            if last:
                raise _LastLayerRead

        return read

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor) -> dict[int, torch.Tensor]:
        handles = [projection.register_forward_pre_hook(self._reader(layer))
                   for layer, projection in self.projections.items()]
        self.seen = {}
        try:
            with torch.autocast(tokens.device.type, dtype=self.amp, enabled=self.amp is not None):
                self.model(input_ids=tokens, use_cache=False)
        except _LastLayerRead:
            pass
        finally:
            for handle in handles:
                handle.remove()
        found = {}
        for layer in self.layers:
            z = self.seen[layer].reshape(-1, self.seen[layer].shape[-1]).float()
            found[layer] = z if self.biases[layer] is None else z - self.biases[layer]
        return found
