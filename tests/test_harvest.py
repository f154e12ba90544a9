"""The harvesting forward (data/harvest.py) against the bridge's hook_z (activations.capture_z), for every model
family of test_model_families.py: 1e-5 in fp32 (both run the same weights; attention through SDPA against the
bridge's own path, GPT-2's value bias folded as TransformerLens folds it). It stops after the last needed layer:
no later block and no unembedding run."""

from __future__ import annotations

import pytest
import torch

from attnsae.data.activations import capture_z
from attnsae.data.harvest import HarvestingForward, decoder_layers, load_harvesting_model
from attnsae.data.models import load_bridge
from test_model_families import FAMILIES, LAYERS, VOCAB, random_family_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module", params=FAMILIES)
def family_folder(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("harvest") / request.param
    random_family_model(request.param, folder)
    return request.param, folder


@pytest.mark.parametrize("layers", [list(range(LAYERS)), [1]])
def test_harvested_hook_z_is_the_bridges(family_folder, layers):
    name, folder = family_folder
    tokens = torch.randint(0, VOCAB - 1, (2, 24), generator=torch.Generator().manual_seed(3))
    bridge, _ = load_bridge(folder, CPU)
    expected = capture_z(bridge, tokens, layers)
    got = HarvestingForward(load_harvesting_model(folder, CPU), layers)(tokens)
    assert sorted(got) == sorted(layers)
    for layer in layers:
        assert got[layer].dtype == torch.float32 and got[layer].shape == expected[layer].shape, (name, layer)
        torch.testing.assert_close(got[layer], expected[layer], atol=1e-5, rtol=0, msg=f"{name} layer {layer}")


def test_the_forward_stops_after_the_last_needed_layer(family_folder):
    name, folder = family_folder
    model = load_harvesting_model(folder, CPU)
    ran = []
    blocks = decoder_layers(model)
    for index, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda *_, index=index: ran.append(index))
    model.get_output_embeddings().register_forward_pre_hook(lambda *_: ran.append("unembedding"))
    harvest = HarvestingForward(model, [1, 0])
    harvest(torch.zeros(1, 8, dtype=torch.long))
    assert ran == [0, 1], name
    harvest(torch.zeros(1, 8, dtype=torch.long))  # its hooks are removed after each call: none pile up
    assert ran == [0, 1, 0, 1], name
    assert all(not projection._forward_pre_hooks for projection in harvest.projections.values())
