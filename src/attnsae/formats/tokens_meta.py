"""``data/tokens/meta.json``: how the tokenize stage made the token rows (splits, sources, mixture), read without
the tokenizer or torch.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt

from attnsae.files import read_json_as

META_FILE = "meta.json"


class TokensMeta(BaseModel):
    """meta.json of the tokenize stage: how the rows were made (keys as ``tokenize_corpus`` writes them; the
    mixture's keys are absent for a streamed corpus and from files written before sources were mixed)."""

    model_config = ConfigDict(extra="allow", strict=True)

    corpus: str = ""
    streamed: bool = False
    context_size: int = Field(ge=2)
    bos_token_id: NonNegativeInt
    eval_fraction: float = Field(gt=0.0, lt=1.0)
    split_seed: int
    heldout_sources: list[str] = Field(default_factory=list)
    documents: dict[str, NonNegativeInt]
    rows: dict[str, NonNegativeInt]
    tokens: dict[str, NonNegativeInt]
    source_weights: dict[str, float] = Field(default_factory=dict)
    source_tokens: dict[str, dict[str, NonNegativeInt]] = Field(default_factory=dict)  # per split, per source
    balanced_train_rows: NonNegativeInt | None = None  # leading train rows that hold every source in its share


def read_tokens_meta(tokens_dir: str | Path) -> dict:
    """The checked meta.json, as the dict the tokenize stage wrote."""
    return read_json_as(Path(tokens_dir) / META_FILE, TokensMeta, written_by="tokenize").model_dump()
