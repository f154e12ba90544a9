"""What a ``model.source`` names, and what attnsae knows about its model from config.json alone (no weights).

A source is one of:

- a named model, built by data/models.py: ``smollm2-135m`` (the offline default), ``gpt2`` (GPT-2 Small from the hub
  at a pinned commit: ``hf:openai-community/gpt2@607a30d7...``), ``tiny-gpt2`` and ``gpt2-random`` (random weights);
- ``hf:OWNER/NAME[@REVISION]``: a transformers repository on the Hugging Face hub (or a mirror: ``HF_ENDPOINT``);
  the model stage pins the commit the revision names (default ``main``) and every file's sha256;
- ``local:PATH``: a transformers folder on disk (config.json, tokenizer files, safetensors weights), copied into the
  model stage's output and hashed.

Supported: decoder-only causal language models with per-head attention on every layer that TransformerLens's
bridge supports (``check_supported`` says in one line why anything else is refused).

`attnsae plan` and the params check read config.json to price a run and check layers, context and vocabulary before
anything is downloaded: from the folder, from the code (the random GPT-2s), from the hub (one small file, kept in
the hub's cache), or, where the hub cannot be used, from ``known_configs/``: the config of each model a profile names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnsae import config as params_config
from attnsae.data import hub
from attnsae.errors import UserError, innermost_cause
from attnsae.formats.model_info import ModelShape

KNOWN_CONFIGS = Path(__file__).parent / "known_configs"
CONFIG_FILE = "config.json"

GPT2_REPO = "openai-community/gpt2"
GPT2_REVISION = "607a30d783dfa663caf39e06633721c8d4cfcd7e"

# The random GPT-2s (data/models.py builds them with the byte-level tokenizer, whose <|endoftext|> is id 256).
BYTE_LEVEL_EOT = 256
RANDOM_GPT2 = {
    "tiny-gpt2": dict(vocab_size=257, n_layer=4, n_embd=64, n_head=4, n_positions=256),
    "gpt2-random": dict(vocab_size=50257, n_layer=12, n_embd=768, n_head=12, n_positions=1024),  # GPT-2 Small's shape
}

# Causal LMs the bridge loads but that have no attention output on every layer to take hook_z from.
NO_ATTENTION_ON_EVERY_LAYER = {
    **dict.fromkeys(("mamba", "mamba2", "falcon_mamba"), "a state-space model (no attention heads)"),
    **dict.fromkeys(("rwkv", "xlstm"), "a recurrent model (no attention heads)"),
    **dict.fromkeys(("jamba", "bamba", "zamba", "zamba2", "falcon_h1", "nemotron_h", "granitemoehybrid", "lfm2",
                     "lfm2_moe", "qwen3_next", "olmo_hybrid"),
                    "a hybrid of attention and state-space or recurrent layers (hook_z exists on some layers only)"),
}


@dataclass(frozen=True)
class HubSource:
    repo: str
    revision: str  # a branch, tag or commit; the model stage pins the commit it names

    def __str__(self) -> str:
        return f"hf:{self.repo}@{self.revision}"


@dataclass(frozen=True)
class LocalSource:
    path: Path

    def __str__(self) -> str:
        return f"local:{self.path}"


def parse_source(source: str) -> str | HubSource | LocalSource:
    """A named source as its name; ``hf:`` and ``local:`` sources as what they point at (config.py checked the
    syntax; ``gpt2`` is the hub's GPT-2 at a pinned commit)."""
    if source == "gpt2":
        return HubSource(GPT2_REPO, GPT2_REVISION)
    if source in params_config.NAMED_MODEL_SOURCES:
        return source
    match = params_config.HUB_MODEL_SOURCE.fullmatch(source)
    if match:
        return HubSource(match["repo"], match["revision"] or "main")
    if source.startswith(params_config.LOCAL_MODEL_SOURCE):
        return LocalSource(Path(source[len(params_config.LOCAL_MODEL_SOURCE):]))
    raise UserError(f"model.source: {source!r} is not a model source (allowed: {params_config.MODEL_SOURCES_ALLOWED})")


# ---------------------------------------------------------------------------------------------------
# config.json, without weights


def random_gpt2_config(name: str):
    from transformers import GPT2Config

    return GPT2Config(**RANDOM_GPT2[name], bos_token_id=BYTE_LEVEL_EOT, eos_token_id=BYTE_LEVEL_EOT)


def config_from_dict(values: Any, where: str):
    """A transformers config from config.json's contents; one line naming ``where`` for anything transformers does
    not know (attnsae never runs a repository's own code)."""
    from transformers import CONFIG_MAPPING

    if not isinstance(values, dict) or not isinstance(values.get("model_type"), str):
        raise UserError(f"{where}: not a transformers config.json (no \"model_type\")")
    model_type = values["model_type"]
    if model_type not in CONFIG_MAPPING:
        raise UserError(f"{where}: model_type {model_type!r} is not one transformers knows (attnsae does not run "
                        "a repository's own code: trust_remote_code models are not supported)")
    try:
        return CONFIG_MAPPING[model_type].from_dict(values)
    except (TypeError, ValueError) as err:
        raise UserError(f"{where}: transformers cannot read it ({str(err).splitlines()[0][:200]})") from None


def read_config_file(path: Path):
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: missing; a transformers model folder has a config.json") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not readable as JSON ({err})") from None
    return config_from_dict(values, str(path))


def known_config_path(name: str) -> Path:
    """``known_configs/OWNER--NAME.json`` for a hub repository, ``known_configs/NAME.json`` for a named source."""
    return KNOWN_CONFIGS / f"{name.replace('/', '--')}.json"


def hub_config(source: HubSource):
    """config.json of a hub repository at its revision: from the hub (or its cache), else from ``known_configs/``."""
    endpoint = hub.check_endpoint(None)
    reason = hub.unreachable_reason(endpoint)
    if reason is None:
        folder = None
        try:
            from huggingface_hub import hf_hub_download

            folder = Path(hf_hub_download(source.repo, CONFIG_FILE, revision=source.revision, endpoint=endpoint))
        except Exception as err:  # not found, gated, network: each means config.json did not arrive
            reason = innermost_cause(err, limit=200)
        if folder is not None:
            return read_config_file(folder)
    known = known_config_path(source.repo)
    if known.is_file():
        return read_config_file(known)
    raise UserError(f"model.source {source}: cannot read its config.json ({reason}), which attnsae needs to check "
                    f"the params; use the hub, or a local:PATH folder")


def source_config(source: str):
    """The transformers config of ``source``'s model, read without its weights."""
    parsed = parse_source(source)
    if isinstance(parsed, HubSource):
        return hub_config(parsed)
    if isinstance(parsed, LocalSource):
        return read_config_file(parsed.path / CONFIG_FILE)
    if parsed in RANDOM_GPT2:
        return random_gpt2_config(parsed)
    return read_config_file(known_config_path(parsed))


# ---------------------------------------------------------------------------------------------------
# What the config says


def causal_lm_class(config) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, "")


def architecture(config) -> str:
    """The transformers class config.json names (its first ``architectures`` entry), else the causal-LM class."""
    declared = getattr(config, "architectures", None) or []
    return declared[0] if declared else causal_lm_class(config)


def check_supported(config, source: str) -> None:
    """A decoder-only causal LM with per-head attention on every layer that the bridge supports; else one line why."""
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    name, model_type = architecture(config), config.model_type
    refuse = f"model.source {source}: {name or model_type} is"
    if model_type in NO_ATTENTION_ON_EVERY_LAYER:
        raise UserError(f"{refuse} {NO_ATTENTION_ON_EVERY_LAYER[model_type]}; attnsae trains SAEs on the attention "
                        "output of every layer (hook_z)")
    if getattr(config, "is_encoder_decoder", False) or not causal_lm_class(config) or name != causal_lm_class(config):
        raise UserError(f"{refuse} not a decoder-only causal language model (an encoder, an encoder-decoder or a "
                        f"multimodal model); attnsae supports causal LMs such as LlamaForCausalLM")
    if name not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"{refuse} not supported by TransformerLens's TransformerBridge, which attnsae runs models "
                        "through")
    if not getattr(config, "num_attention_heads", None):
        raise UserError(f"{refuse} without attention heads (config.json has no num_attention_heads)")


def count_parameters(config) -> int:
    """Every parameter once, from the model built on the meta device: shapes only, no memory, no weights."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(param.numel() for param in model.parameters())


def shape_of(config) -> ModelShape:
    n_heads = config.num_attention_heads
    return ModelShape(
        architecture=architecture(config),
        n_params=count_parameters(config),
        n_layers=config.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        d_head=getattr(config, "head_dim", None) or config.hidden_size // n_heads,
        d_model=config.hidden_size,
        n_positions=config.max_position_embeddings,
        vocab_size=config.vocab_size,
    )


def source_shape(source: str) -> ModelShape:
    """The shape of ``source``'s model from its config.json, after checking attnsae supports it."""
    model_config = source_config(source)
    check_supported(model_config, source)
    return shape_of(model_config)
