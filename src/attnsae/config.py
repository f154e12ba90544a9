"""Typed configuration for every stage, read from params.yaml.

Each stage reads only the sections that its dvc.yaml entry declares under ``params:``; the loaders
below take exactly those sections, so nothing reads params.yaml behind DVC's back. Every value has
its allowed range declared next to its field; an unknown key, a wrong type or a value out of range is
rejected with one line naming the key path and what is allowed.
"""

from __future__ import annotations

import re
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from attnsae.errors import UserError

PARAMS_FILE = "params.yaml"
PROFILES_DIR = "profiles"
PIPELINES_DIR = "pipelines"

# model.source: a named model (data/models.py builds each), a hub repository or a transformers folder on disk.
NAMED_MODEL_SOURCES = ("smollm2-135m", "gpt2", "tiny-gpt2", "gpt2-random")
HUB_MODEL_SOURCE = re.compile(r"hf:(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?")
LOCAL_MODEL_SOURCE = "local:"
MODEL_SOURCES_ALLOWED = f"{', '.join(NAMED_MODEL_SOURCES)}, hf:OWNER/NAME[@REVISION] or local:PATH"
Device = Literal["auto", "cpu", "cuda"]
# "auto": bf16 autocast on CUDA, fp32 on CPU (CPUs without AMX/AVX512-BF16 run bf16 ~100x slower).
Precision = Literal["auto", "fp32", "bf16"]


# numpy's generators take seeds in [0, 2**32 - 1]; torch's take more, so numpy's range is the one allowed.
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]


# Upper bounds far above any published run (the paper: d_sae 24,576, 2e9 tokens per SAE; the largest published
# dictionaries have ~2**25 features), so they stop typos and runaway values (a stray exponent) in one line, not a real
# run. Each stage's memory and disk against the machine are judged apart (preflight.py).
MAX_COUNT = 10**9  # documents, rows, steps
MAX_TOKENS = 10**13  # tokens of a run
MAX_WIDTH = 2**25  # features of one SAE
MAX_BATCH_ROWS = 2**16  # rows of one model batch
MAX_SHOWN = 1000  # examples, bins, tokens shown on one card


class Section(BaseModel):
    # allow_inf_nan=False: every float of every section is finite (a NaN l1_coeff trains NaN weights silently).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class RuleBroken(ValueError):
    """A rule between fields of one section is broken; names the field to change, for a one-line message."""

    def __init__(self, key: str, value: Any, requirement: str):
        super().__init__(f"must be {requirement}")
        self.key, self.value = key, value


class ModelConfig(Section):
    source: str = "smollm2-135m"
    seed: Seed = 0  # only for tiny-gpt2's random weights
    device: Device = "auto"
    precision: Precision = "auto"

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        local = value.startswith(LOCAL_MODEL_SOURCE) and value[len(LOCAL_MODEL_SOURCE):].strip()
        if value not in NAMED_MODEL_SOURCES and not HUB_MODEL_SOURCE.fullmatch(value) and not local:
            raise ValueError(f"must be one of {MODEL_SOURCES_ALLOWED}")
        return value


class CorpusConfig(Section):
    # Each entry: "npm:sotu", "npm:moby-dick", "npm:spam-ham", "npm:brown", "npm:factbook", "npm:node-docs"
    # (corpus.py says what each is), "file:PATH" (.txt or .jsonl with a "text" field; a folder or glob),
    # "hf:OWNER/NAME[@REVISION]" (streamed), "synthetic".
    sources: list[str] = Field(min_length=1)
    max_documents: int = Field(0, ge=0, le=MAX_COUNT)  # 0: all
    synthetic_documents: int = Field(200, ge=0, le=10**7)  # how many "synthetic" generates
    seed: Seed = 49  # of the "synthetic" generator

    @model_validator(mode="after")
    def _synthetic_has_documents(self) -> CorpusConfig:
        if "synthetic" in self.sources and self.synthetic_documents == 0:
            raise RuleBroken("synthetic_documents", 0, ">= 1 when sources lists synthetic")
        return self


class TokenizeConfig(Section):
    # a row predicts at least one next token; at most the model's positions
    context_size: int = Field(128, ge=2, le=2**20)
    eval_fraction: float = Field(0.05, gt=0, lt=1)  # of documents, chosen by a seeded hash so training never sees them
    max_train_rows: int = Field(0, ge=0, le=MAX_COUNT)  # 0: all
    max_eval_rows: int = Field(0, ge=0, le=MAX_COUNT)  # 0: all (a streamed corpus needs a number: tokenization.py)
    # Corpus sources whose every document goes to the held-out split, which neither training nor the
    # in-distribution evaluation sees (a stored corpus only; evaluate measures the SAEs on it apart).
    heldout_sources: list[str] = Field(default_factory=list)
    max_heldout_rows: int = Field(0, ge=0, le=MAX_COUNT)  # 0: all
    # Each source's share of every split's tokens, relative to the others' (a source left out weighs 1):
    # the splits of a stored corpus interleave their sources by these weights (tokenization.py).
    source_weights: dict[str, float] = Field(default_factory=dict)
    seed: Seed = 49

    @field_validator("heldout_sources")
    @classmethod
    def _distinct_sources(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value) or not all(source.strip() for source in value):
            raise ValueError("must be distinct corpus sources, like npm:brown")
        return value

    @field_validator("source_weights", mode="before")
    @classmethod
    def _positive_weights(cls, value: Any) -> Any:
        def positive(weight: Any) -> bool:
            return isinstance(weight, (int, float)) and not isinstance(weight, bool) and 0 < weight < float("inf")

        if not isinstance(value, dict) or not all(isinstance(k, str) and positive(w) for k, w in value.items()):
            raise ValueError("must be a mapping of corpus source to a finite number > 0, like {npm:sotu: 1.0}")
        return value


class ActivationsConfig(Section):
    # disk: the `activations` stage caches hook_z and each layer trains from it (pipelines/cache.yaml);
    # stream: one `train` stage runs the model on the fly for all layers at once (pipelines/stream.yaml).
    source: Literal["disk", "stream"] = "disk"
    tokens: int = Field(ge=1, le=MAX_TOKENS)  # token budget of the cache, per layer
    batch_rows: int = Field(16, ge=1, le=MAX_BATCH_ROWS)
    shard_tokens: int = Field(65536, ge=1, le=2**31)


# The fields that ``per_layer`` may override: SAEConfig and LayerOverride share these ranges.
DSae = Annotated[int, Field(ge=1, le=MAX_WIDTH)]
L1Coeff = Annotated[float, Field(ge=0, le=1000)]  # the paper's are 1 to 3.2 (inputs scaled to unit mean squared norm)
DeadCutoff = Annotated[float, Field(ge=0, le=1)]  # a firing frequency
K = Annotated[int, Field(ge=1, le=2**16)]  # active features per token; at most d_sae
L0Coeff = Annotated[float, Field(ge=0, le=1000)]

Architecture = Literal["standard", "topk", "batchtopk", "jumprelu"]
# Each architecture's own settings and their reference values (docs/architectures.md gives the sources). None
# means required. A setting of another architecture is refused, so a params file says what it trains.
SPARSITY_SETTINGS = {"standard": "l1_coeff", "topk": "k", "batchtopk": "k", "jumprelu": "l0_coeff"}
ARCHITECTURE_SETTINGS: dict[str, dict[str, Any]] = {
    "standard": {"l1_coeff": None},
    "topk": {"k": None, "auxk_alpha": 1 / 32, "aux_k": 0, "auxk_dead_tokens": 10_000_000},
    "batchtopk": {"k": None, "auxk_alpha": 1 / 32, "aux_k": 0, "auxk_dead_tokens": 10_000_000,
                  "threshold_ema_rate": 0.01},
    "jumprelu": {"l0_coeff": None, "jumprelu_bandwidth": 0.001, "jumprelu_init_threshold": 0.001,
                 "sparsity_warmup_steps": 0},
}


class SAEConfig(Section):
    """The training recipe of docs/design.md 3 (architecture standard) or one of its successors (objectives.py);
    per-layer values override these in ``per_layer``."""

    architecture: Architecture = "standard"
    d_sae: DSae
    l1_coeff: L1Coeff | None = None  # standard: the L1 penalty
    # topk, batchtopk: features kept per token (batchtopk: on average over the batch), the weight of the
    # dead-feature auxiliary loss, how many dead features it uses (0: d_in // 2), and how many tokens without
    # firing make a feature dead
    k: K | None = None
    auxk_alpha: Annotated[float, Field(ge=0, le=1000)] | None = None
    aux_k: Annotated[int, Field(ge=0, le=MAX_WIDTH)] | None = None  # at most d_sae
    auxk_dead_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS)] | None = None
    threshold_ema_rate: Annotated[float, Field(gt=0, le=1)] | None = None  # batchtopk: of its inference threshold
    # jumprelu: the L0 penalty, the straight-through rectangle's width, the thresholds' start, and the steps over
    # which l0_coeff rises linearly from 0 (in units of inputs scaled to unit mean squared norm)
    l0_coeff: L0Coeff | None = None
    jumprelu_bandwidth: Annotated[float, Field(gt=0, le=1000)] | None = None
    jumprelu_init_threshold: Annotated[float, Field(ge=0, le=1000)] | None = None
    sparsity_warmup_steps: Annotated[int, Field(ge=0, le=MAX_COUNT)] | None = None
    dead_cutoff: DeadCutoff = 1e-6
    lr: float = Field(1.2e-3, gt=0, le=1)  # Adam moves each weight by about lr per step: above 1 it only diverges
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    batch_size: int = Field(4096, ge=1, le=2**20)
    train_tokens: int = Field(ge=1, le=MAX_TOKENS)
    warmup_steps: int = Field(1000, ge=0, le=MAX_COUNT)
    resample_every: int = Field(25000, ge=1, le=MAX_COUNT)
    max_resamples: int = Field(4, ge=0, le=10**4)
    dead_window: int = Field(12500, ge=1, le=MAX_COUNT)
    resample_inputs: int = Field(409600, ge=1, le=2**26)
    buffer_rows: int = Field(1572864, ge=1, le=2**31)
    log_every: int = Field(10, ge=1, le=MAX_COUNT)
    seed: Seed = 49
    device: Device = "auto"
    # Deterministic GPU kernels (torch.use_deterministic_algorithms): slower, repeatable on the same GPU.
    # CPU training is deterministic either way.
    deterministic: bool = False
    # The SAE step's numerics (docs/gpu.md: precision): fp32, the paper's; tf32, fp32 with TF32 matmuls on CUDA (the
    # same as fp32 on a CPU); bf16, the forward (and so the backward) autocast to bf16, with fp32 weights, Adam
    # state and loss sums.
    precision: Literal["fp32", "tf32", "bf16"] = "fp32"
    # torch.compile of the SAE's loss (forward; the backward follows): fuses its elementwise work on GPUs. Off by
    # default until measured to pay (bench/gpu.py).
    compile: bool = False
    # How the step computes the decoder and the gradients (sae/sparse.py, docs/gpu.md: kernel): dense, every
    # latent; sparse, only the latents the activation keeps; auto, the one measured faster for the device and
    # architecture (objectives.FASTER_KERNEL). The same SAE to float rounding either way.
    kernel: Literal["auto", "dense", "sparse"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _architecture_settings(cls, data: Any) -> Any:
        """Fill in the architecture's reference values; refuse another architecture's settings."""
        if not isinstance(data, dict) or data.get("architecture", "standard") not in ARCHITECTURE_SETTINGS:
            return data  # the field's own validation names the bad value
        architecture = data.get("architecture", "standard")
        own = ARCHITECTURE_SETTINGS[architecture]
        for key in sorted({k for settings in ARCHITECTURE_SETTINGS.values() for k in settings} - set(own)):
            if data.get(key) is not None:
                users = ", ".join(a for a, settings in ARCHITECTURE_SETTINGS.items() if key in settings)
                raise RuleBroken(key, data[key], f"left out: it applies to architecture {users}, "
                                                 f"and this is {architecture}")
        filled = {**data}
        for key, default in own.items():
            if filled.get(key) is None:
                if default is None:
                    raise RuleBroken(key, None, f"set for architecture {architecture}")
                filled[key] = default
        return filled

    @model_validator(mode="after")
    def _consistent(self) -> SAEConfig:
        if self.dead_window > self.resample_every:
            raise RuleBroken("dead_window", self.dead_window, f"<= resample_every ({self.resample_every})")
        if self.train_tokens < self.batch_size:  # fewer tokens than one batch: zero training steps
            raise RuleBroken("train_tokens", self.train_tokens, f">= batch_size ({self.batch_size})")
        if self.buffer_rows < 2 * self.batch_size:  # ShuffledBuffer serves batches from half the buffer
            raise RuleBroken("buffer_rows", self.buffer_rows, f">= 2 x batch_size ({2 * self.batch_size})")
        for key in ("k", "aux_k"):  # a row cannot keep more features than the SAE has
            if (value := getattr(self, key)) is not None and value > self.d_sae:
                raise RuleBroken(key, value, f"<= d_sae ({self.d_sae})")
        return self

    @property
    def steps(self) -> int:
        return self.train_tokens // self.batch_size

    def sparsity(self) -> str:
        """The setting that sets the sparsity, as 'name value' (what a frontier sweeps)."""
        name = SPARSITY_SETTINGS[self.architecture]
        return f"{name} {getattr(self, name):g}"

    def recipe(self) -> dict[str, Any]:
        """The settings this SAE trains with, leaving out other architectures' (all None)."""
        return self.model_dump(exclude_none=True)


class LayerOverride(Section):
    d_sae: DSae | None = None
    l1_coeff: L1Coeff | None = None
    k: K | None = None
    l0_coeff: L0Coeff | None = None
    dead_cutoff: DeadCutoff | None = None


class EvaluateConfig(Section):
    batch_rows: int = Field(8, ge=1, le=MAX_BATCH_ROWS)
    max_rows: int = Field(0, ge=0, le=MAX_COUNT)  # 0: the whole evaluation split
    dense_threshold: float = Field(0.1, gt=0, le=1)  # a firing frequency
    density_bins: int = Field(40, ge=1, le=10**4)
    # Standard errors: resamples of the evaluation rows (with replacement), and their generator's seed.
    bootstrap_resamples: int = Field(1000, ge=2, le=10**6)
    bootstrap_seed: Seed = 0
    device: Device = "auto"


# A share of activation mass or of firing, or a difference of two (families.py gives each tag's formula).
TagThreshold = Annotated[float, Field(ge=-1, le=1)]


class TagThresholds(Section):
    """The score a feature needs for each family tag (and it must also beat ``null_percentile`` of the null)."""

    induction: TagThreshold = 0.5
    previous_token: TagThreshold = 0.6
    duplicate_token: TagThreshold = 0.2
    successor: TagThreshold = 0.3
    name_mover: TagThreshold = 0.3
    local_context: TagThreshold = 0.3
    high_level_context: TagThreshold = 0.3
    current_token: TagThreshold = 0.5
    bos_sink: TagThreshold = 0.5


class DashboardsConfig(Section):
    """The `dashboards@L` stage: which tokens it reads, which features get cards, what each card holds."""

    # evaluation rows read (0: all); must cover evaluate.max_rows (the alive set)
    max_rows: int = Field(0, ge=0, le=MAX_COUNT)
    batch_rows: int = Field(8, ge=1, le=MAX_BATCH_ROWS)
    first_n: int = Field(30, ge=0, le=10**4)  # cards for the first N alive features, as the post rated
    features: list[int] = Field(default_factory=list, max_length=10**4)  # and cards for these feature ids (< d_sae)
    # and cards for this many alive features drawn at random (seed): a rating sample that does not depend on index order
    random_n: int = Field(0, ge=0, le=10**4)
    top_k: int = Field(20, ge=1, le=MAX_SHOWN)  # top activating examples per card
    intervals: int = Field(10, ge=1, le=MAX_SHOWN)  # equal-width activation bins between 0 and the max
    interval_examples: int = Field(5, ge=0, le=MAX_SHOWN)  # random examples per bin
    histogram_bins: int = Field(40, ge=1, le=MAX_SHOWN)
    # top and bottom tokens of the logit effect; at most the vocabulary
    logit_tokens: int = Field(20, ge=1, le=MAX_SHOWN)
    probe_prompts: int = Field(32, ge=1, le=10**4)  # per probe family
    null_directions: int = Field(256, ge=1, le=2**16)  # random encoder directions behind each tag's null baseline
    null_percentile: float = Field(99.0, ge=0, le=100)
    seed: Seed = 0  # probes, null directions, interval samples
    tags: TagThresholds = Field(default_factory=TagThresholds)
    device: Device = "auto"

    @field_validator("features")
    @classmethod
    def _feature_ids(cls, value: list[int]) -> list[int]:
        if any(f < 0 for f in value) or len(set(value)) != len(value):
            raise ValueError("must be distinct feature ids >= 0")
        return value


class DistributedConfig(Section):
    """The stream pipeline's train stage over several processes (launcher.py): with ``nproc_per_node`` > 1 it
    starts that many workers on this machine, each training its share of the layers (one per GPU)."""

    nproc_per_node: int = Field(1, ge=1, le=1024)


class FrontierPoints(Section):
    """One architecture's points on the frontier: its sparsity setting (``SPARSITY_SETTINGS``) takes each of
    ``values`` on every layer, with ``settings`` replacing the sae section's (lr, betas, ...)."""

    values: list[int | float] = Field(min_length=1)
    settings: dict[str, Any] = Field(default_factory=dict)


class FrontierConfig(Section):
    """`attnsae frontier queue`: one DVC experiment per architecture and value (frontier.py). No stage reads it."""

    standard: FrontierPoints | None = None
    topk: FrontierPoints | None = None
    batchtopk: FrontierPoints | None = None
    jumprelu: FrontierPoints | None = None

    def points(self) -> list[tuple[str, int | float, dict[str, Any]]]:
        """(architecture, value, settings) of every point, in the order they are queued."""
        return [(name, value, entry.settings) for name in ARCHITECTURE_SETTINGS
                if (entry := getattr(self, name)) is not None for value in entry.values]


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


# Each bound's symbol and the attribute holding its value.
_BOUNDS = {annotated_types.Ge: (">=", "ge"), annotated_types.Gt: (">", "gt"), annotated_types.Le: ("<=", "le"),
           annotated_types.Lt: ("<", "lt")}
_KINDS = {int: "an integer", float: "a finite number", bool: "true or false", str: "text",
          list[str]: "a list of strings", list[int]: "a list of integers"}


def _field_info(cls: type[Section], name: str) -> FieldInfo:
    """A field's type and constraints; for an optional field (LayerOverride's), those of its non-None type."""
    info = cls.model_fields[name]
    if get_origin(info.annotation) in (Union, types.UnionType):
        (inner,) = [arg for arg in get_args(info.annotation) if arg is not type(None)]
        return FieldInfo.from_annotation(inner)
    return info


def allowed_values(info: FieldInfo) -> str:
    """What a field accepts, in words: 'an integer >= 1', 'a finite number >= 0 and < 1', 'one of cpu, cuda'."""
    if get_origin(info.annotation) is Literal:
        return "one of " + ", ".join(get_args(info.annotation))
    if _is_section(info.annotation):
        return f"a mapping of {', '.join(info.annotation.model_fields)}"
    limits = []
    for constraint in info.metadata:
        if type(constraint) in _BOUNDS:
            symbol, attribute = _BOUNDS[type(constraint)]
            limits.append(f"{symbol} {getattr(constraint, attribute)}")
        elif isinstance(constraint, annotated_types.MinLen):
            limits.append(f"with at least {constraint.min_length} entr{'y' if constraint.min_length == 1 else 'ies'}")
        elif isinstance(constraint, annotated_types.MaxLen):
            limits.append(f"with at most {constraint.max_length} entries")
    return " ".join([_KINDS[info.annotation], " and ".join(limits)]).strip()


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, Section)


def _format_error(cls: type[Section], where: str, err: ValidationError, owners: dict[str, str]) -> str:
    first = err.errors()[0]
    loc, value = first["loc"], first.get("input")
    raised = first.get("ctx", {}).get("error")  # what a validator of ours raised, if one did
    if isinstance(raised, RuleBroken):
        loc, value = (raised.key,), raised.value
    if loc and str(loc[0]) in owners:
        where = owners[str(loc[0])]
    key = ".".join(str(p) for p in (where, *loc) if p != "")
    if first["type"] == "extra_forbidden":
        return f"{PARAMS_FILE}: unknown key '{key}'"
    if first["type"] == "missing":
        return f"{PARAMS_FILE}: missing key '{key}'"
    while len(loc) > 1 and loc[0] in cls.model_fields and _is_section(cls.model_fields[str(loc[0])].annotation):
        cls = cls.model_fields[str(loc[0])].annotation  # a nested section: the field is the inner one's
        loc = loc[1:]
    if raised is not None:
        requirement = str(raised)
    elif loc and loc[0] in cls.model_fields:
        requirement = f"must be {allowed_values(_field_info(cls, str(loc[0])))}"
    else:
        requirement = first["msg"]
    return f"{PARAMS_FILE}: bad value for '{key}': {requirement} (got {value!r})"


def parse_section(cls: type[Section], data: Any, where: str, owners: dict[str, str] | None = None) -> Any:
    """``data`` parsed into ``cls``, or one line naming the key path (``where``, or the one ``owners`` gives a field
    that another section set) and what is allowed."""
    if not isinstance(data, dict):
        raise UserError(f"{PARAMS_FILE}: '{where}' must be a mapping, got {type(data).__name__}")
    allowed = ", ".join(cls.model_fields)
    unknown = [k for k in data if k not in cls.model_fields]
    if unknown:
        raise UserError(f"{PARAMS_FILE}: unknown key '{where}.{unknown[0]}' (allowed: {allowed})")
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise UserError(_format_error(cls, where, err, owners or {})) from None


def read_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file (run `attnsae profile quickstart` to create it)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise UserError(
            f"{path}: not a text file (byte {err.start} is not UTF-8); params files are UTF-8 YAML"
        ) from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: must be a mapping of sections")
    _check_section_names(data, str(path))
    return data


def _check_section_names(params: dict[str, Any], source: str) -> None:
    unknown = [name for name in params if name not in SECTIONS]
    if unknown:
        raise UserError(f"{source}: unknown section '{unknown[0]}' (allowed: {', '.join(sorted(SECTIONS))})")


def _check_profile_label(params: dict[str, Any]) -> None:
    # Optional: names the MLflow runs ("custom" when absent).
    label = params.get("profile", "custom")
    if not isinstance(label, str) or not label.strip():
        raise UserError(f"{PARAMS_FILE}: bad value for 'profile': must be a non-empty name (got {label!r})")


def _required_section(params: dict[str, Any], name: str) -> Any:
    if name not in params:
        raise UserError(f"{PARAMS_FILE}: missing section '{name}'")
    return params[name]


def layer_key(layer: int) -> str:
    return f"L{layer}"


def parse_layer(text: str | int) -> int:
    """Accept 3 or "3" or "L3"."""
    match = re.fullmatch(r"L?(\d+)", str(text).strip())
    if not match:
        raise UserError(f"bad layer {text!r}: expected a layer number like 3 or L3")
    return int(match.group(1))


def layers(params: dict[str, Any]) -> list[int]:
    value = _required_section(params, "layers")
    if not isinstance(value, list) or not value or not all(type(v) is int and v >= 0 for v in value):
        raise UserError(f"{PARAMS_FILE}: 'layers' must be a non-empty list of layer numbers, got {value!r}")
    if len(set(value)) != len(value):
        raise UserError(f"{PARAMS_FILE}: 'layers' lists a layer twice: {value!r}")
    overrides = _per_layer(params)
    missing = [layer_key(v) for v in value if layer_key(v) not in overrides]
    if missing:
        # dvc.yaml declares per_layer.L<n> for each train@L stage, so each must exist.
        raise UserError(f"{PARAMS_FILE}: 'per_layer' has no entry '{missing[0]}' for a layer listed in 'layers'")
    return value


def _per_layer(params: dict[str, Any]) -> dict[str, Any]:
    value = params.get("per_layer") or {}
    if not isinstance(value, dict):
        raise UserError(f"{PARAMS_FILE}: 'per_layer' must be a mapping of L<n> entries, got {type(value).__name__}")
    return value


def _entry_layer(key: Any) -> int:
    """The layer of a ``per_layer`` entry, whose name must be exactly what layer_key writes."""
    match = re.fullmatch(r"L(0|[1-9]\d*)", str(key))
    if not match:
        raise UserError(f"{PARAMS_FILE}: unknown key 'per_layer.{key}' (entries are named L<n>, like L3)")
    return int(match.group(1))


def sae_config(params: dict[str, Any], layer: int) -> SAEConfig:
    """The shared ``sae`` section with ``per_layer.L<layer>`` applied on top."""
    # The shared section must be valid by itself, even where every layer overrides a bad value.
    base = section(params, "sae")
    per_layer = _per_layer(params)
    key = layer_key(layer)
    if key not in per_layer:
        raise UserError(
            f"layer {layer} is not configured: {PARAMS_FILE} 'per_layer' has {', '.join(per_layer) or 'no entries'}"
        )
    override = parse_section(LayerOverride, per_layer[key] or {}, f"per_layer.{key}").model_dump(exclude_none=True)
    # a rule broken by an overridden value (k > this layer's d_sae) names the per_layer entry that set it
    return parse_section(SAEConfig, {**base.model_dump(), **override}, "sae",
                         {name: f"per_layer.{key}" for name in override})


def _check_layer_entries(params: dict[str, Any]) -> None:
    """Every ``per_layer`` entry merged onto ``sae``, listed layer or not."""
    for key in _per_layer(params):
        sae_config(params, _entry_layer(key))


@dataclass(frozen=True)
class SectionSpec:
    """What one top-level section of params.yaml holds, and how it is read."""

    schema: type[Section] | None = None  # what `section` parses it into
    # When the schema's defaults stand in for the section: never (then it is missing), when it is absent, or when it is
    # absent or empty (null, {}).
    defaults_when: Literal["never", "absent", "absent or empty"] = "never"
    check: Callable[[dict[str, Any]], object] | None = None  # how validate checks it, where `section` cannot read it


# Every top-level section, in the order validate checks them: the first bad value it reports is the first in this order.
SECTIONS: dict[str, SectionSpec] = {
    "profile": SectionSpec(check=_check_profile_label),
    "model": SectionSpec(ModelConfig),
    "corpus": SectionSpec(CorpusConfig),
    "tokenize": SectionSpec(TokenizeConfig),
    "activations": SectionSpec(ActivationsConfig),
    "evaluate": SectionSpec(EvaluateConfig),
    # Added after params files were written, which keep working with the defaults.
    "dashboards": SectionSpec(DashboardsConfig, defaults_when="absent"),
    "report": SectionSpec(ReportConfig, defaults_when="absent"),
    "frontier": SectionSpec(FrontierConfig, defaults_when="absent or empty"),  # none: no frontier to queue
    "distributed": SectionSpec(DistributedConfig, defaults_when="absent or empty"),  # none: training is one process
    "layers": SectionSpec(check=layers),
    # Checks each entry's name, then sae, then the entry merged onto sae; listed before sae to keep that order.
    "per_layer": SectionSpec(check=_check_layer_entries),
    "sae": SectionSpec(SAEConfig),
}


def section(params: dict[str, Any], name: str) -> Any:
    """Section ``name`` of ``params``, parsed into its schema."""
    spec = SECTIONS[name]
    if spec.defaults_when == "absent or empty":
        data = params.get(name) or {}
    elif spec.defaults_when == "absent":
        data = params.get(name, {})
    else:
        data = _required_section(params, name)
    return parse_section(spec.schema, data, name)


def model_config(params: dict[str, Any]) -> ModelConfig:
    return section(params, "model")


def corpus_config(params: dict[str, Any]) -> CorpusConfig:
    return section(params, "corpus")


def tokenize_config(params: dict[str, Any]) -> TokenizeConfig:
    return section(params, "tokenize")


def activations_config(params: dict[str, Any]) -> ActivationsConfig:
    return section(params, "activations")


def evaluate_config(params: dict[str, Any]) -> EvaluateConfig:
    return section(params, "evaluate")


def dashboards_config(params: dict[str, Any]) -> DashboardsConfig:
    return section(params, "dashboards")


def frontier_config(params: dict[str, Any]) -> FrontierConfig:
    return section(params, "frontier")


def distributed_config(params: dict[str, Any]) -> DistributedConfig:
    return section(params, "distributed")


def report_config(params: dict[str, Any]) -> ReportConfig:
    return section(params, "report")


def validate(params: dict[str, Any]) -> None:
    """Check every section, in the order of SECTIONS, then the rules between sections, so a params file is known good
    before anything uses it."""
    _check_section_names(params, PARAMS_FILE)
    for name, spec in SECTIONS.items():
        if spec.check:
            spec.check(params)
        else:
            section(params, name)
    check_dashboards_rows(params)
    check_dashboards_features(params)
    check_split_sources(tokenize_config(params), corpus_config(params).sources)


def check_dashboards_rows(params: dict[str, Any]) -> None:
    """The dashboards read the rows evaluate reads (and maybe more): those rows decide which features are alive."""
    rows, alive_rows = dashboards_config(params).max_rows, evaluate_config(params).max_rows
    if rows and (alive_rows == 0 or rows < alive_rows):
        needed = f">= evaluate.max_rows ({alive_rows})" if alive_rows else "0 (all), as evaluate.max_rows is 0 (all)"
        raise UserError(f"{PARAMS_FILE}: bad value for 'dashboards.max_rows': must be 0 (all) or {needed}, so the "
                        f"dashboards see the rows that decide which features are alive (got {rows})")


def check_dashboards_features(params: dict[str, Any]) -> None:
    """Every listed card's feature exists in every layer's SAE (the dashboards stage reads the list for each layer)."""
    listed = dashboards_config(params).features
    if not listed:
        return
    widths = {layer: sae_config(params, layer).d_sae for layer in layers(params)}
    layer, narrowest = min(widths.items(), key=lambda item: item[1])
    if (largest := max(listed)) >= narrowest:
        raise UserError(f"{PARAMS_FILE}: bad value for 'dashboards.features': feature {largest} "
                        f"is not in layer {layer}'s SAE (allowed: feature ids 0 to {narrowest - 1}, its d_sae - 1)")


def check_split_sources(cfg: TokenizeConfig, sources: list[str]) -> None:
    """The sources that ``tokenize.heldout_sources`` and ``tokenize.source_weights`` name are corpus sources, and one
    is left to train on (checked on params.yaml, and by tokenize again on the corpus it reads)."""
    allowed = ", ".join(sources)
    for key, named in (("heldout_sources", cfg.heldout_sources), ("source_weights", list(cfg.source_weights))):
        for source in named:
            if source not in sources:
                raise UserError(f"{PARAMS_FILE}: bad value for 'tokenize.{key}': {source!r} is not a source of the "
                                f"corpus (allowed: {allowed})")
    if set(sources) <= set(cfg.heldout_sources):
        raise UserError(f"{PARAMS_FILE}: bad value for 'tokenize.heldout_sources': must leave at least one corpus "
                        f"source to train on (got {cfg.heldout_sources!r})")


def list_profiles(root: Path) -> list[str]:
    return sorted(p.stem for p in (root / PROFILES_DIR).glob("*.yaml"))
