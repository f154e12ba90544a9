"""GPT-2 weight processing: hook_z is the value-bias-folded z the published attention SAEs expect.

On raw Hugging Face GPT-2 weights, head h's attention output before c_proj is

    z_raw[b, p, h] = sum_s A[b, h, p, s] * v[b, s, h],   v = LN_1(x) @ W_V + b_V

TransformerLens's default processing (``enable_compatibility_mode``) first folds LayerNorm into the
following weights, so the value bias becomes ``b_V_eff = b_V + ln_1.bias @ W_V`` (ln_1.weight only
scales W_V's rows), and then folds ``b_V_eff`` into ``b_O``. Each attention row sums to 1, so the
bias passes through the pattern unchanged and

    z_project = z_raw - b_V_eff[h]      (exactly, up to float error),

while the model's outputs (loss, log-probabilities) stay those of the raw model.

Everything here is computed independently of TransformerLens: z_raw from a forward pre-hook on
each block's ``attn.c_proj`` of a plain ``GPT2LMHeadModel``, b_V and W_V from its ``c_attn``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from attnsae.data.activations import capture_z
from attnsae.data.models import hook_z_name, load_bridge, load_tokenizer
from helpers import strong_layernorm

ATOL = 1e-5  # float32 error of the identities below is ~2e-7 on these models
LOSS_ATOL = 1e-4


# ---------------------------------------------------------------------------------------------------
# Independent references.


def _tokens(vocab_size: int, bos: int, shape=(3, 16), seed: int = 7) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size - 1, shape, generator=gen)
    tokens[:, 0] = bos
    return tokens


def _hf_raw_z(hf_model, tokens: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per-head z of the raw HF model: the merged-heads input of c_proj, as [batch, pos, heads, d_head]."""
    n_heads = hf_model.config.n_head
    seen: dict[int, torch.Tensor] = {}
    handles = []
    for layer, block in enumerate(hf_model.transformer.h):

        def grab(module, args, layer=layer):
            merged = args[0].detach().clone()
            seen[layer] = merged.reshape(*merged.shape[:2], n_heads, merged.shape[-1] // n_heads)

        handles.append(block.attn.c_proj.register_forward_pre_hook(grab))
    try:
        with torch.no_grad():
            hf_model(tokens)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _value_biases(hf_model, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(b_V, b_V_eff) of ``layer`` as [heads, d_head]; b_V_eff includes ln_1.bias pushed through W_V."""
    block = hf_model.transformer.h[layer]
    d_model, n_heads = hf_model.config.n_embd, hf_model.config.n_head
    # Conv1D: y = x @ weight + bias, weight [d_model, 3*d_model], columns ordered q | k | v.
    w_v = block.attn.c_attn.weight.detach()[:, 2 * d_model :]
    b_v = block.attn.c_attn.bias.detach()[2 * d_model :]
    b_v_eff = b_v + block.ln_1.bias.detach() @ w_v
    return b_v.reshape(n_heads, -1), b_v_eff.reshape(n_heads, -1)


pytestmark = pytest.mark.usefixtures("one_thread")


class Case:
    def __init__(self, folder: Path):
        from transformers import GPT2LMHeadModel

        self.folder = folder
        self.bridge, self.info = load_bridge(folder, torch.device("cpu"))
        self.hf = GPT2LMHeadModel.from_pretrained(folder).eval()
        self.tokens = _tokens(self.info.vocab_size, self.info.bos_token_id)
        self.layers = list(range(self.info.n_layers))
        self.z_raw = _hf_raw_z(self.hf, self.tokens)


@pytest.fixture(scope="module", params=["tiny-gpt2", "strong-layernorm"])
def case(request, tmp_path_factory, tiny_model_dir) -> Case:
    folder = tiny_model_dir(seed=5)
    if request.param == "strong-layernorm":
        folder = shutil.copytree(folder, tmp_path_factory.mktemp(request.param) / "model")
        strong_layernorm(folder)
    return Case(folder)


# ---------------------------------------------------------------------------------------------------
# 1. hook_z = raw z minus the (LayerNorm-folded) value bias, per head.


def test_project_z_is_raw_z_minus_folded_value_bias(case: Case):
    b, p = case.tokens.shape
    heads, d_head = case.info.n_heads, case.info.d_head
    project = capture_z(case.bridge, case.tokens, case.layers)
    for layer in case.layers:
        z_project = project[layer].reshape(b, p, heads, d_head)
        z_raw = case.z_raw[layer]
        b_v, b_v_eff = _value_biases(case.hf, layer)
        # The identity, per head (so the head order of hook_z must match HF's too).
        torch.testing.assert_close(z_project, z_raw - b_v_eff, rtol=0, atol=ATOL)
        # The fold really happened: the difference is the (non-zero) per-head bias at every position.
        difference = z_raw - z_project
        assert difference.abs().max() > 100 * ATOL, f"layer {layer}: hook_z equals raw z, value bias not folded"
        torch.testing.assert_close(difference, b_v_eff.expand_as(difference), rtol=0, atol=ATOL)
        # ... and it is b_V_eff, not b_V alone: LayerNorm's bias is folded into b_V before b_V goes to b_O.
        assert (b_v_eff - b_v).abs().max() > 100 * ATOL


def test_raw_bridge_does_not_fold_so_load_bridge_must(case: Case):
    """Negative control: TransformerBridge without compatibility mode gives HF's raw z."""
    from transformer_lens.model_bridge import TransformerBridge

    raw = TransformerBridge.boot_transformers(
        str(case.folder), device="cpu", dtype=torch.float32, tokenizer=load_tokenizer(case.folder)
    ).eval()
    z = capture_z(raw, case.tokens, case.layers)
    for layer in case.layers:
        torch.testing.assert_close(z[layer].reshape(case.z_raw[layer].shape), case.z_raw[layer], rtol=0, atol=ATOL)
    # so the project's z differs from it by the folded bias (checked exactly in the test above)
    project = capture_z(case.bridge, case.tokens, case.layers)
    assert not torch.allclose(project[0], z[0], atol=100 * ATOL)


# ---------------------------------------------------------------------------------------------------
# 2. The processing leaves the model's function unchanged.


def test_bridge_loss_equals_transformers_loss(case: Case):
    with torch.no_grad():
        bridge_loss = case.bridge(case.tokens, return_type="loss").item()
        hf_loss = case.hf(case.tokens, labels=case.tokens).loss.item()
    assert bridge_loss == pytest.approx(hf_loss, abs=LOSS_ATOL)


def test_bridge_log_probs_equal_transformers_log_probs(case: Case):
    """Stronger than the mean loss: every next-token distribution is unchanged.

    Logits themselves may differ by a per-position constant (the unembedding is centred), so compare
    log-softmax.
    """
    with torch.no_grad():
        bridge_logits = case.bridge(case.tokens, return_type="logits")
        hf_logits = case.hf(case.tokens).logits
    assert bridge_logits.shape == hf_logits.shape
    torch.testing.assert_close(bridge_logits.log_softmax(-1), hf_logits.log_softmax(-1), rtol=0, atol=LOSS_ATOL)


# ---------------------------------------------------------------------------------------------------
# 3. The hook name and its shape.


def test_hook_z_name_and_shape(case: Case):
    b, p = case.tokens.shape
    names = [hook_z_name(layer) for layer in case.layers]
    assert names == [f"blocks.{layer}.attn.hook_z" for layer in case.layers]
    assert set(names) <= set(case.bridge.hook_dict)
    with torch.no_grad():
        _, cache = case.bridge.run_with_cache(case.tokens, names_filter=lambda name: name in names, return_type=None)
    # (the cache may also hold TransformerLens's alias of each hook, blocks.L.attn.o.hook_in)
    assert all(name in cache for name in names)
    project = capture_z(case.bridge, case.tokens, case.layers)
    for layer, name in zip(case.layers, names):
        assert tuple(cache[name].shape) == (b, p, case.info.n_heads, case.info.d_head)
        assert tuple(project[layer].shape) == (b * p, case.info.n_heads * case.info.d_head)
        torch.testing.assert_close(project[layer], cache[name].reshape(b * p, -1), rtol=0, atol=1e-6)
