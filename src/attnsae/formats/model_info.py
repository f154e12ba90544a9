"""What stages know about a model without loading it (or torch): the shape of each model source, and
``models/base/attnsae_model.json``, the pinned model's shape, vocabulary, BOS token, positions and file hashes,
written by the model stage.
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
    """A model's size, known without loading it (for `attnsae plan`, the published table, the random builds)."""

    n_params: int
    n_layers: int
    n_heads: int
    d_head: int
    n_positions: int
    vocab_size: int

    @property
    def d_in(self) -> int:
        """hook_z's width with the heads concatenated."""
        return self.n_heads * self.d_head


# Every model source's shape, in one place.
GPT2_SMALL = ModelShape(n_params=124_439_808, n_layers=12, n_heads=12, d_head=64, n_positions=1024, vocab_size=50257)
MODEL_SHAPES = {
    "gpt2": GPT2_SMALL,
    "gpt2-random": GPT2_SMALL,
    "smollm2-135m": ModelShape(n_params=134_515_008, n_layers=30, n_heads=9, d_head=64, n_positions=8192,
                               vocab_size=49152),
    # The byte-level tokenizer's 256 bytes + <|endoftext|>; about 0.2M parameters, negligible in a plan.
    "tiny-gpt2": ModelShape(n_params=0, n_layers=4, n_heads=4, d_head=16, n_positions=256, vocab_size=257),
}
