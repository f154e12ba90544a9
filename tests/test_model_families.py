"""hook_z and evaluate's CE, for model families beyond GPT-2 and SmolLM2 (issue 22, item 4).

Tiny random-weight models built from transformers configs of seven families: GPT-2, GPT-NeoX (Pythia), Llama
(grouped-query attention), Qwen2 (qkv bias), Gemma 2 (d_head != d_model / n_heads, sliding window, soft-capping,
pre- and post-norms), Mistral (sliding window) and OLMo 2 (norms on q and k). ``data.activations.capture_z`` through
``data.models.load_bridge`` must equal the input of the model's own attention out-projection (``c_proj``, ``dense``,
``o_proj``), read by a pre-hook on plain transformers: the independent reference, 1e-5 in fp32. And evaluate's
clean, SAE-spliced and zero-ablated CE and L0 equal tests/independent_eval.py's (1e-4), each family made by the model
stage from a ``local:`` folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from attnsae.config import EvaluateConfig, ModelConfig
from attnsae.data.activations import capture_z
from attnsae.data.models import byte_level_tokenizer, load_bridge, prepare_model
from attnsae.evaluation.evaluate import evaluate_sae
from independent_eval import (
    folded_value_bias,
    independent_hook_z,
    independent_metrics,
    load_hf_model,
    output_projection,
)
from test_independent_eval import KINK_MARGIN, TOL, keep_pre_activations_off_zero, soft_threshold_sae

VOCAB, LAYERS, HEADS, KV_HEADS, D_MODEL = 257, 3, 4, 2, 32
SMALL = dict(vocab_size=VOCAB, num_hidden_layers=LAYERS, hidden_size=D_MODEL, num_attention_heads=HEADS,
             intermediate_size=64, max_position_embeddings=64)


def families() -> dict[str, tuple[object, type]]:
    """name -> (config, model class); independent_eval.output_projection finds each one's out-projection."""
    import transformers as t

    return {
        "gpt2": (t.GPT2Config(vocab_size=VOCAB, n_layer=LAYERS, n_embd=D_MODEL, n_head=HEADS, n_positions=64),
                 t.GPT2LMHeadModel),
        "gpt_neox": (t.GPTNeoXConfig(**SMALL), t.GPTNeoXForCausalLM),
        "llama": (t.LlamaConfig(**SMALL, num_key_value_heads=KV_HEADS), t.LlamaForCausalLM),
        "qwen2": (t.Qwen2Config(**SMALL, num_key_value_heads=KV_HEADS), t.Qwen2ForCausalLM),
        "gemma2": (t.Gemma2Config(**SMALL, num_key_value_heads=KV_HEADS, head_dim=16, sliding_window=8,
                                  final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
                   t.Gemma2ForCausalLM),
        "mistral": (t.MistralConfig(**SMALL, num_key_value_heads=KV_HEADS, sliding_window=8), t.MistralForCausalLM),
        "olmo2": (t.Olmo2Config(**SMALL, num_key_value_heads=KV_HEADS), t.Olmo2ForCausalLM),
    }


FAMILIES = sorted(families())


def random_family_model(name: str, folder: Path, seed: int = 0):
    """The family's tiny model with random weights (biases and norm gains too), saved with the byte-level tokenizer
    in a folder next to ``folder``, which the model stage then makes from it as a ``local:`` source."""
    model = random_family_weights(name, seed)
    save_as_local_source(model, folder)
    return model


def random_family_weights(name: str, seed: int = 0):
    config, model_class = families()[name]
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith(".bias"):
                param.normal_(0.0, 0.02)  # zero biases would hide a bias dropped on the way
            elif ("norm" in param_name or ".ln_" in param_name) and param_name.endswith("weight"):
                param.add_(torch.randn_like(param) * 0.2)  # and gains of 1 (Gemma's: 0, as 1 + w) a gain dropped
    return model


def save_model_folder(model, folder: Path) -> None:
    """A transformers model folder, as a user's ``local:`` source is: weights, config, the byte-level tokenizer."""
    model.save_pretrained(folder, safe_serialization=True)
    byte_level_tokenizer().save_pretrained(folder)


def save_as_local_source(model, folder: Path) -> None:
    raw = folder.with_name(folder.name + "-raw")
    save_model_folder(model, raw)
    prepare_model(ModelConfig(source=f"local:{raw}"), folder)


def out_projection_inputs(model, tokens: torch.Tensor) -> dict[int, torch.Tensor]:
    """The input of each layer's attention out-projection, [batch*pos, heads*d_head], by forward pre-hooks."""
    found: dict[int, torch.Tensor] = {}
    hooks = [output_projection(model, layer).register_forward_pre_hook(
        lambda _, args, layer=layer: found.__setitem__(layer, args[0].detach().reshape(-1, args[0].shape[-1])))
        for layer in range(LAYERS)]
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for hook in hooks:
            hook.remove()
    return found


@pytest.mark.parametrize("name", FAMILIES)
def test_hook_z_is_the_out_projections_input(tmp_path, name):
    model = random_family_model(name, tmp_path / name)
    tokens = torch.randint(0, VOCAB - 1, (2, 24), generator=torch.Generator().manual_seed(1))
    expected = out_projection_inputs(model, tokens)
    bridge, info = load_bridge(tmp_path / name, torch.device("cpu"))
    got = capture_z(bridge, tokens, list(range(LAYERS)))
    for layer in range(LAYERS):
        if (bias := folded_value_bias(model, layer)) is not None:  # GPT-2: the paper's hook_z, value bias folded away
            expected[layer] = expected[layer] - bias
        assert got[layer].shape == (2 * 24, info.n_heads * info.d_head) == expected[layer].shape, (name, layer)
        torch.testing.assert_close(got[layer], expected[layer], atol=1e-5, rtol=0, msg=f"{name} layer {layer}")


@pytest.mark.parametrize("name", FAMILIES)
def test_evaluate_agrees_with_the_independent_evaluator(tmp_path, name):
    folder = tmp_path / name
    model = random_family_model(name, folder)
    with torch.no_grad():  # sharper weights make one layer's hook_z matter to the CE (norms and biases kept)
        for param_name, param in model.named_parameters():
            if param_name.endswith("weight") and "norm" not in param_name and ".ln" not in param_name:
                param.mul_(6.0)
    save_as_local_source(model, folder)
    bridge, info = load_bridge(folder, torch.device("cpu"))
    reference = load_hf_model(folder)
    rows = np.random.default_rng(0).integers(0, VOCAB - 1, size=(4, 16)).astype(np.int32)
    rows[:, 0] = info.bos_token_id
    sae = soft_threshold_sae(info.d_in, threshold=0.3, seed=0)
    keep_pre_activations_off_zero(sae, independent_hook_z(reference, 1, rows), KINK_MARGIN)
    main, _ = evaluate_sae(bridge, sae, 1, rows, EvaluateConfig(batch_rows=2, device="cpu"), torch.device("cpu"))
    independent = independent_metrics(reference, sae.state_dict(), 1, rows)
    for key in ("ce_clean", "ce_sae", "ce_zero", "l0"):
        assert abs(main[key] - independent[key]) <= TOL, (key, main[key], independent[key])
    # the layer matters: agreement means something
    assert abs(independent["ce_zero"] - independent["ce_clean"]) > 10 * TOL
    assert 0 < main["l0"] < info.d_in
