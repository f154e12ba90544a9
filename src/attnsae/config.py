"""Typed configuration for every stage, read from params.yaml.

Each stage reads only the sections that its dvc.yaml entry declares under ``params:``; the loaders
below take exactly those sections, so nothing reads params.yaml behind DVC's back. Unknown or
mistyped keys are rejected with one line naming the key and what is allowed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from attnsae.errors import UserError

PARAMS_FILE = "params.yaml"
PROFILES_DIR = "profiles"
PIPELINES_DIR = "pipelines"

ModelSource = Literal["smollm2-135m", "gpt2", "tiny-gpt2", "gpt2-random"]
Device = Literal["auto", "cpu", "cuda"]
# "auto": bf16 autocast on CUDA, fp32 on CPU (CPUs without AMX/AVX512-BF16 run bf16 ~100x slower).
Precision = Literal["auto", "fp32", "bf16"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ModelConfig(Section):
    source: ModelSource = "smollm2-135m"
    seed: int = 0  # only for tiny-gpt2's random weights
    device: Device = "auto"
    precision: Precision = "auto"


class CorpusConfig(Section):
    # Each entry: "npm:sotu", "npm:moby-dick", "npm:brown", "file:PATH" (.txt or .jsonl with a "text"
    # field; a folder or glob), "hf:OWNER/NAME[@REVISION]" (streamed), "synthetic".
    sources: list[str]
    max_documents: int = 0  # 0: all
    synthetic_documents: int = 200


class TokenizeConfig(Section):
    context_size: int = 128
    eval_fraction: float = 0.05  # of documents, chosen by a seeded hash so training never sees them
    max_train_rows: int = 0  # 0: all
    max_eval_rows: int = 0
    seed: int = 49


class ActivationsConfig(Section):
    # disk: the `activations` stage caches hook_z and each layer trains from it (pipelines/cache.yaml);
    # stream: one `train` stage runs the model on the fly for all layers at once (pipelines/stream.yaml).
    source: Literal["disk", "stream"] = "disk"
    tokens: int  # token budget of the cache, per layer
    batch_rows: int = 16
    shard_tokens: int = 65536


class SAEConfig(Section):
    """The training recipe of design.md 3; per-layer values override these in ``per_layer``."""

    d_sae: int
    l1_coeff: float
    dead_cutoff: float = 1e-6
    lr: float = 1.2e-3
    beta1: float = 0.9
    beta2: float = 0.99
    batch_size: int = 4096
    train_tokens: int
    warmup_steps: int = 1000
    resample_every: int = 25000
    max_resamples: int = 4
    dead_window: int = 12500
    resample_inputs: int = 409600
    buffer_rows: int = 1572864
    log_every: int = 10
    seed: int = 49
    device: Device = "auto"
    # Deterministic GPU kernels (torch.use_deterministic_algorithms): slower, repeatable on the same GPU.
    # CPU training is deterministic either way.
    deterministic: bool = False

    @model_validator(mode="after")
    def _positive(self) -> "SAEConfig":
        for name in ("d_sae", "batch_size", "train_tokens", "buffer_rows", "resample_every", "dead_window"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.l1_coeff < 0:
            raise ValueError(f"l1_coeff must be >= 0, got {self.l1_coeff}")
        if self.dead_window > self.resample_every:
            raise ValueError(
                f"dead_window ({self.dead_window}) must be <= resample_every ({self.resample_every})"
            )
        return self

    @property
    def steps(self) -> int:
        return self.train_tokens // self.batch_size


class LayerOverride(Section):
    d_sae: int | None = None
    l1_coeff: float | None = None
    dead_cutoff: float | None = None


class EvaluateConfig(Section):
    batch_rows: int = 8
    max_rows: int = 0  # 0: the whole evaluation split
    dense_threshold: float = 0.1
    density_bins: int = 40
    device: Device = "auto"


class ReportConfig(Section):
    """What the report's per-layer table is compared against (src/attnsae/comparison.py).

    "auto": the published GPT-2 Small table when the model is GPT-2 Small, otherwise nothing;
    "published": that table (refused for any other model); "none"; or a folder of L<n>.json metrics
    files from an earlier run or an imported SAE.
    """

    compare: str = "auto"

    @field_validator("compare", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        # Whether a folder exists is checked when the report is built, not when params are read.
        if not isinstance(value, str) or not value.strip():
            raise ValueError("must be auto, published, none, or a folder of L<n>.json metrics files")
        return value


def _format_error(where: str, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in (where, *first["loc"]) if p != "")
    if first["type"] == "extra_forbidden":
        return f"{PARAMS_FILE}: unknown key '{loc}'"
    if first["type"] == "missing":
        return f"{PARAMS_FILE}: missing key '{loc}'"
    return f"{PARAMS_FILE}: bad value for '{loc}': {first['msg']} (got {first.get('input')!r})"


def parse_section(cls: type[Section], data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise UserError(f"{PARAMS_FILE}: '{where}' must be a mapping, got {type(data).__name__}")
    allowed = ", ".join(cls.model_fields)
    unknown = [k for k in data if k not in cls.model_fields]
    if unknown:
        raise UserError(f"{PARAMS_FILE}: unknown key '{where}.{unknown[0]}' (allowed: {allowed})")
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise UserError(_format_error(where, err)) from None


def read_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file (run `attnsae profile quickstart` to create it)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: must be a mapping of sections")
    known = {"profile", "model", "corpus", "tokenize", "activations", "layers", "sae", "per_layer", "evaluate", "report"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"{path}: unknown section '{unknown[0]}' (allowed: {', '.join(sorted(known))})")
    return data


def _section(params: dict[str, Any], name: str) -> Any:
    if name not in params:
        raise UserError(f"{PARAMS_FILE}: missing section '{name}'")
    return params[name]


def model_config(params: dict[str, Any]) -> ModelConfig:
    return parse_section(ModelConfig, _section(params, "model"), "model")


def corpus_config(params: dict[str, Any]) -> CorpusConfig:
    return parse_section(CorpusConfig, _section(params, "corpus"), "corpus")


def tokenize_config(params: dict[str, Any]) -> TokenizeConfig:
    return parse_section(TokenizeConfig, _section(params, "tokenize"), "tokenize")


def activations_config(params: dict[str, Any]) -> ActivationsConfig:
    return parse_section(ActivationsConfig, _section(params, "activations"), "activations")


def evaluate_config(params: dict[str, Any]) -> EvaluateConfig:
    return parse_section(EvaluateConfig, _section(params, "evaluate"), "evaluate")


def report_config(params: dict[str, Any]) -> ReportConfig:
    # Optional: params files written before the section existed keep working with the default.
    return parse_section(ReportConfig, params.get("report", {}), "report")


def layer_key(layer: int) -> str:
    return f"L{layer}"


def parse_layer(text: str | int) -> int:
    """Accept 3 or "3" or "L3"."""
    match = re.fullmatch(r"L?(\d+)", str(text).strip())
    if not match:
        raise UserError(f"bad layer {text!r}: expected a layer number like 3 or L3")
    return int(match.group(1))


def layers(params: dict[str, Any]) -> list[int]:
    value = _section(params, "layers")
    if not isinstance(value, list) or not value or not all(type(v) is int and v >= 0 for v in value):
        raise UserError(f"{PARAMS_FILE}: 'layers' must be a non-empty list of layer numbers, got {value!r}")
    if len(set(value)) != len(value):
        raise UserError(f"{PARAMS_FILE}: 'layers' lists a layer twice: {value!r}")
    overrides = params.get("per_layer") or {}
    missing = [layer_key(v) for v in value if layer_key(v) not in overrides]
    if missing:
        # dvc.yaml declares per_layer.L<n> for each train@L stage, so each must exist.
        raise UserError(f"{PARAMS_FILE}: 'per_layer' has no entry '{missing[0]}' for a layer listed in 'layers'")
    return value


def sae_config(params: dict[str, Any], layer: int) -> SAEConfig:
    """The shared ``sae`` section with ``per_layer.L<layer>`` applied on top."""
    base = _section(params, "sae")
    per_layer = params.get("per_layer") or {}
    key = layer_key(layer)
    if key not in per_layer:
        raise UserError(
            f"layer {layer} is not configured: {PARAMS_FILE} 'per_layer' has {', '.join(per_layer) or 'no entries'}"
        )
    override = parse_section(LayerOverride, per_layer[key] or {}, f"per_layer.{key}")
    if not isinstance(base, dict):
        raise UserError(f"{PARAMS_FILE}: 'sae' must be a mapping")
    merged = {**base, **{k: v for k, v in override.model_dump().items() if v is not None}}
    return parse_section(SAEConfig, merged, "sae")


def validate(params: dict[str, Any]) -> None:
    """Run every stage's loader, so a params file is known good before anything uses it."""
    for load in (model_config, corpus_config, tokenize_config, activations_config, evaluate_config, report_config):
        load(params)
    for layer in layers(params):
        sae_config(params, layer)


def list_profiles(root: Path) -> list[str]:
    return sorted(p.stem for p in (root / PROFILES_DIR).glob("*.yaml"))
