"""`model.source`: hf:OWNER/NAME[@REVISION] through a loopback hub, local:PATH, what config.json alone tells (the
shape `attnsae plan` and the params check use), and the one-line refusals (issue 22, items 1 and 2)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from attnsae.config import ModelConfig
from attnsae.data import model_sources
from attnsae.data.model_sources import known_config_path, source_shape
from attnsae.data.models import byte_level_tokenizer, document_separator, load_bridge, prepare_model
from attnsae.errors import UserError
from attnsae.files import sha256_file
from attnsae.formats.model_info import read_model_info
from loopback_hub import COMMIT, serve


def tiny_llama_folder(folder: Path, seed: int = 0) -> Path:
    """A tiny Llama (grouped-query attention) with random weights and the byte-level tokenizer, as a hub repository
    or a folder on disk holds it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=257, num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    byte_level_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def online(monkeypatch):
    """The tests run with HF_HUB_OFFLINE=1; a loopback hub needs it off, and HF_ENDPOINT pointed at it."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def use(url: str) -> None:
        monkeypatch.setenv("HF_ENDPOINT", url)
    return use


# ---------------------------------------------------------------------------------------------------
# config.json alone: shapes, and the params check's bounds


@pytest.mark.parametrize("source, n_params, layers, heads, kv_heads, d_head", [
    ("gpt2", 124_439_808, 12, 12, 12, 64),  # GPT-2 Small's published count (tied embeddings once)
    ("smollm2-135m", 134_515_008, 30, 9, 3, 64),
    ("hf:EleutherAI/pythia-70m", 70_426_624, 6, 8, 8, 64),  # the Pythia paper's total for 70M
    ("hf:google/gemma-2-2b", 2_614_341_888, 26, 8, 4, 256),  # d_head 256, not 2304 / 8
])
def test_shapes_come_from_config_json_without_weights(source, n_params, layers, heads, kv_heads, d_head):
    shape = source_shape(source)  # offline here: the known configs stand in for the hub
    assert (shape.n_params, shape.n_layers, shape.n_heads, shape.n_kv_heads, shape.d_head) == (
        n_params, layers, heads, kv_heads, d_head)


def test_random_gpt2s_have_the_shape_their_builder_makes(tmp_path):
    info = prepare_model(ModelConfig(source="tiny-gpt2"), tmp_path / "base")
    shape = source_shape("tiny-gpt2")
    assert (info.n_layers, info.n_heads, info.d_head, info.vocab_size, info.n_positions) == (
        shape.n_layers, shape.n_heads, shape.d_head, shape.vocab_size, shape.n_positions)
    assert info.bos_token_id == model_sources.BYTE_LEVEL_EOT


def test_smollm2_known_config_is_the_one_the_model_stage_writes(smollm2_model_dir):
    written = json.loads((Path(smollm2_model_dir) / "config.json").read_text())
    known = json.loads(known_config_path("smollm2-135m").read_text())
    assert {key: written[key] for key in known} == known


def test_hub_model_without_a_known_config_needs_the_hub_in_one_line():
    with pytest.raises(UserError, match=r"^model.source hf:someone/their-model@main: cannot read its config.json "
                                        r"\(HF_HUB_OFFLINE is set\)"):
        source_shape("hf:someone/their-model")


# ---------------------------------------------------------------------------------------------------
# What is refused, in one line, before any weights


def write_config(folder: Path, config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config.to_json_file(folder / "config.json")
    return folder


@pytest.mark.parametrize("make, fragment", [
    (lambda t: t.MambaConfig(), "MambaForCausalLM is a state-space model (no attention heads)"),
    (lambda t: t.JambaConfig(), "hybrid of attention and state-space"),
    (lambda t: t.BertConfig(architectures=["BertForMaskedLM"]), "BertForMaskedLM is not a decoder-only causal"),
    (lambda t: t.T5Config(architectures=["T5ForConditionalGeneration"]), "is not a decoder-only causal"),
])
def test_models_without_per_head_attention_are_refused_at_the_model_stage(tmp_path, make, fragment):
    import transformers

    folder = write_config(tmp_path / "model", make(transformers))
    with pytest.raises(UserError, match=re.escape(fragment)):
        source_shape(f"local:{folder}")
    (folder / "model.safetensors").write_bytes(b"")
    byte_level_tokenizer().save_pretrained(folder)
    with pytest.raises(UserError, match=re.escape(fragment)) as err:
        prepare_model(ModelConfig(source=f"local:{folder}"), tmp_path / "base")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "base").exists()


def test_unknown_model_type_is_one_line(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "my-own-arch", "auto_map": {}}))
    with pytest.raises(UserError, match="model_type 'my-own-arch' is not one transformers knows"):
        source_shape(f"local:{folder}")


def test_missing_local_folder_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"is not a folder \(allowed: a transformers model folder\)"):
        prepare_model(ModelConfig(source=f"local:{tmp_path / 'nowhere'}"), tmp_path / "base")


def test_pickled_weights_are_never_read(tmp_path):
    folder = tiny_llama_folder(tmp_path / "model")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"no .safetensors weights \(it has pytorch_model.bin: pickled weights"):
        prepare_model(ModelConfig(source=f"local:{folder}"), tmp_path / "base")


# ---------------------------------------------------------------------------------------------------
# local:PATH and hf:OWNER/NAME through the loopback hub


def test_local_folder_is_copied_and_every_file_hashed(tmp_path):
    folder = tiny_llama_folder(tmp_path / "model")
    (folder / "notes.txt").write_text("not a model file")
    info = prepare_model(ModelConfig(source=f"local:{folder}"), tmp_path / "base")
    kept = sorted(p.name for p in (tmp_path / "base").iterdir())
    assert "notes.txt" not in kept and "model.safetensors" in kept
    assert info.sha256 == {name: sha256_file(folder / name) for name in kept if name != "attnsae_model.json"}
    assert (info.n_layers, info.n_heads, info.d_head) == (2, 4, 8)


def test_hub_source_pins_the_commit_and_every_files_hash(tmp_path, online):
    repo = tiny_llama_folder(tmp_path / "repo")
    with serve(repo) as url:
        online(url)
        info = prepare_model(ModelConfig(source="hf:tiny/llama"), tmp_path / "base")
    base = tmp_path / "base"
    assert info.sha256["revision"] == COMMIT and info.name == f"tiny/llama@{COMMIT[:12]}"
    files = sorted(p.name for p in base.iterdir())
    assert ".cache" not in files  # huggingface_hub's download bookkeeping stays out of the output
    assert {name: sha256_file(base / name) for name in files if name != "attnsae_model.json"} == {
        name: value for name, value in info.sha256.items() if name != "revision"}
    bridge, read = load_bridge(base, torch.device("cpu"))
    assert read == info and bridge.cfg.n_layers == 2


def test_hub_file_that_differs_from_its_listing_is_one_line_and_writes_nothing(tmp_path, online):
    repo = tiny_llama_folder(tmp_path / "repo")
    with serve(repo, lies={"model.safetensors": "0" * 64}) as url:
        online(url)
        with pytest.raises(UserError, match=r"model.safetensors has sha256 [0-9a-f]{64}, the hub lists 0{64}$"):
            prepare_model(ModelConfig(source="hf:tiny/llama"), tmp_path / "base")
    assert not (tmp_path / "base").exists()


def test_unsupported_hub_model_stops_before_its_weights(tmp_path, online):
    import transformers

    repo = write_config(tmp_path / "repo", transformers.MambaConfig())
    (repo / "model.safetensors").write_bytes(b"weights that must not be fetched")
    asked: list[str] = []
    with serve(repo, asked=asked) as url:
        online(url)
        with pytest.raises(UserError, match="state-space model"):
            prepare_model(ModelConfig(source="hf:state/space"), tmp_path / "base")
    assert any(path.endswith("/config.json") for path in asked)
    assert not any(path.endswith("model.safetensors") for path in asked)


def test_hub_shape_is_read_from_the_hub_before_any_weights(tmp_path, online):
    repo = tiny_llama_folder(tmp_path / "repo")
    (repo / "model.safetensors").unlink()  # the shape needs config.json alone
    with serve(repo) as url:
        online(url)
        shape = source_shape("hf:tiny/llama@main")
    assert (shape.architecture, shape.n_layers, shape.n_kv_heads) == ("LlamaForCausalLM", 2, 2)


# ---------------------------------------------------------------------------------------------------
# What separates documents


def test_document_separator_per_tokenizer():
    from transformers import PreTrainedTokenizerFast

    byte_level = byte_level_tokenizer()
    assert document_separator(byte_level, "tiny") == 256  # <|endoftext|>, as GPT-2, Pythia, Qwen2 and SmolLM2 use
    bos_only = PreTrainedTokenizerFast(tokenizer_object=byte_level.backend_tokenizer, bos_token="a", eos_token="b")
    assert document_separator(_without_end_of_text(bos_only), "llama-like") == bos_only.convert_tokens_to_ids("a")
    eos_only = PreTrainedTokenizerFast(tokenizer_object=byte_level.backend_tokenizer, eos_token="b")  # no BOS at all
    assert document_separator(_without_end_of_text(eos_only), "no-bos") == eos_only.convert_tokens_to_ids("b")
    with pytest.raises(UserError, match=re.escape("no <|endoftext|>, BOS or EOS token")):
        document_separator(_without_end_of_text(PreTrainedTokenizerFast(
            tokenizer_object=byte_level.backend_tokenizer)), "bare")


def _without_end_of_text(tokenizer):
    """The tokenizer as a model without <|endoftext|> sees it (Llama, Gemma, Mistral)."""
    vocab = {token: i for token, i in tokenizer.get_vocab().items() if token != "<|endoftext|>"}
    tokenizer.get_vocab = lambda: vocab
    return tokenizer


def test_read_model_info_round_trips(tmp_path):
    folder = tiny_llama_folder(tmp_path / "model")
    info = prepare_model(ModelConfig(source=f"local:{folder}"), tmp_path / "base")
    assert read_model_info(tmp_path / "base") == info
