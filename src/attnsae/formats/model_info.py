"""What stages know about a model without loading it (or torch): ``models/base/attnsae_model.json``, the pinned
model's shape, vocabulary, document separator, positions and file hashes, written by the model stage; and
``ModelShape``, a model's size read from its config.json.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, NonNegativeInt, PositiveInt

from attnsae.errors import UserError
from attnsae.files import read_json_as

META_FILE = "attnsae_model.json"


class ModelInfo(BaseModel):
    """What later stages need to know about the pinned model, read from ``attnsae_model.json``."""

    model_config = ConfigDict(frozen=True, strict=True)

    source: str
    name: str
    n_layers: PositiveInt
    n_heads: PositiveInt
    d_head: PositiveInt
    vocab_size: PositiveInt
    # The token that starts every row and separates documents: the model's own end-of-text token where it has one
    # (GPT-2, Pythia, SmolLM2, Qwen2, OLMo 2 were trained with it between documents), else its BOS (Llama, Gemma,
    # Mistral start every document with it). data/models.py: document_separator.
    bos_token_id: NonNegativeInt
    sha256: dict[str, str]
    n_positions: PositiveInt | None = None  # the longest context the model takes (None: written before it was recorded)

    @property
    def d_in(self) -> int:
        return self.n_heads * self.d_head

    def check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise UserError(f"layer {layer} is outside the model {self.name} (allowed: 0 to {self.n_layers - 1})")

    def check_context_size(self, context_size: int) -> None:
        if self.n_positions is not None and context_size > self.n_positions:
            raise UserError(f"params.yaml: bad value for 'tokenize.context_size': {self.name} takes at most "
                            f"{self.n_positions} positions (allowed: 2 to {self.n_positions}, got {context_size})")


def read_model_info(model_dir: str | Path) -> ModelInfo:
    return read_json_as(Path(model_dir) / META_FILE, ModelInfo, written_by="model")


@dataclass(frozen=True)
class ModelShape:
    """A model's size and attention layout, read from its config.json without its weights (data/model_sources.py):
    for `attnsae plan`, the params check and the random builds."""

    architecture: str  # the transformers class, config.json's "architectures": LlamaForCausalLM
    n_params: int  # every parameter once (tied embeddings count once)
    n_layers: int
    n_heads: int  # query heads: hook_z has one slot per query head
    n_kv_heads: int  # key/value heads (fewer with grouped-query attention)
    d_head: int  # not always d_model / n_heads (Gemma 2: 8 heads x 256 on a 2304-wide residual stream)
    d_model: int
    n_positions: int
    vocab_size: int

    @property
    def d_in(self) -> int:
        """hook_z's width with the heads concatenated."""
        return self.n_heads * self.d_head
