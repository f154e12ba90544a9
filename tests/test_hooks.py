"""hook_z capture and splicing on a tiny random GPT-2, and the head flattening order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnsae.data.activations import capture_z, flatten_heads, unflatten_heads
from attnsae.data.models import hook_z_name, load_bridge


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    torch.manual_seed(0)
    bridge, info = load_bridge(tiny_model_dir(seed=1), torch.device("cpu"))
    rng = np.random.default_rng(1)
    tokens = torch.from_numpy(rng.integers(0, info.vocab_size - 1, size=(3, 12))).long()
    tokens[:, 0] = info.bos_token_id
    return bridge, info, tokens


def full_forward_z(bridge, tokens, layers):
    """hook_z of ``layers`` from one full forward pass (no early stop), unflattened."""
    seen = {}

    def grab(layer):
        def hook_fn(z, hook):
            seen[layer] = z.detach().clone()

        return hook_fn

    hooks = [(hook_z_name(layer), grab(layer)) for layer in layers]
    with torch.no_grad():
        logits = bridge.run_with_hooks(tokens, return_type="logits", fwd_hooks=hooks)
    assert logits.shape[:2] == tokens.shape
    assert sorted(seen) == sorted(layers)
    return seen


def test_capture_z_shapes_and_values_match_full_forward(tiny):
    bridge, info, tokens = tiny
    b, p = tokens.shape
    layers = [0, 2]
    got = capture_z(bridge, tokens, layers)
    assert sorted(got) == layers
    reference = full_forward_z(bridge, tokens, layers)
    for layer in layers:
        assert reference[layer].shape == (b, p, info.n_heads, info.d_head)
        assert got[layer].shape == (b * p, info.n_heads * info.d_head)
        assert got[layer].dtype == torch.float32
        torch.testing.assert_close(got[layer], reference[layer].reshape(b * p, -1), rtol=1e-5, atol=1e-6)
    # different layers really are different activations
    assert not torch.allclose(got[0], got[2])


def test_capture_z_last_layer_and_single_layer(tiny):
    bridge, info, tokens = tiny
    last = info.n_layers - 1
    got = capture_z(bridge, tokens, [last])
    reference = full_forward_z(bridge, tokens, [last])
    torch.testing.assert_close(got[last], flatten_heads(reference[last]), rtol=1e-5, atol=1e-6)
    # the same layer captured alone or together with a later one gives the same values
    alone = capture_z(bridge, tokens, [1])[1]
    together = capture_z(bridge, tokens, [1, last])[1]
    torch.testing.assert_close(alone, together, rtol=1e-6, atol=1e-7)


def test_zeroing_hook_z_changes_the_loss(tiny):
    bridge, _, tokens = tiny
    name = hook_z_name(1)
    with torch.no_grad():
        clean = bridge(tokens, return_type="loss").item()
        identity = bridge.run_with_hooks(tokens, return_type="loss", fwd_hooks=[(name, lambda z, hook: z)]).item()
        zeroed = bridge.run_with_hooks(
            tokens, return_type="loss", fwd_hooks=[(name, lambda z, hook: torch.zeros_like(z))]
        ).item()
    assert identity == pytest.approx(clean, abs=1e-6)
    assert abs(zeroed - clean) > 1e-5


def test_spliced_hook_z_reaches_the_output(tiny):
    bridge, _, tokens = tiny
    name = hook_z_name(2)
    with torch.no_grad():
        clean = bridge.run_with_hooks(tokens, return_type="logits", fwd_hooks=[])
        doubled = bridge.run_with_hooks(tokens, return_type="logits", fwd_hooks=[(name, lambda z, hook: 2 * z)])
        # flatten -> unflatten is the identity, so a spliced round trip leaves logits unchanged
        round_trip = bridge.run_with_hooks(
            tokens, return_type="logits", fwd_hooks=[(name, lambda z, hook: unflatten_heads(flatten_heads(z), z))]
        )
    assert not torch.allclose(clean, doubled, atol=1e-5)
    assert torch.equal(clean, round_trip)


def test_flatten_unflatten_round_trip_and_head_order():
    b, p, h, d = 2, 3, 4, 5
    z = torch.arange(b * p * h * d, dtype=torch.float32).view(b, p, h, d)
    x = flatten_heads(z)
    assert x.shape == (b * p, h * d)
    for bi in range(b):
        for pi in range(p):
            row = bi * p + pi  # batch-major, then position
            for head in range(h):
                assert torch.equal(x[row, head * d : (head + 1) * d], z[bi, pi, head])
    assert torch.equal(unflatten_heads(x, z), z)
    assert torch.equal(unflatten_heads(x.clone() * 3, z), z * 3)


def test_flatten_heads_rejects_wrong_rank():
    with pytest.raises(ValueError):
        flatten_heads(torch.zeros(2, 3, 4))
