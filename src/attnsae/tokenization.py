"""The `tokenize` stage: documents -> rows of ``context_size`` tokens, split into train and eval.

Documents are assigned to the evaluation split by a seeded draw *before* tokenizing, so no
evaluation text ever reaches training. Within a split, documents are joined into one stream with the
end-of-document token (GPT-2's ``<|endoftext|>``) between them, and each row is that BOS followed by
the next ``context_size - 1`` tokens of the stream: position 0 of every row is BOS (design.md 3).
Train rows are stored in a seeded random order so that a token budget samples the whole corpus.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np

from attnsae.config import TokenizeConfig
from attnsae.errors import UserError
from attnsae.files import atomic_dir

SPLITS = ("train", "eval")
META_FILE = "meta.json"


def pack_rows(documents: Iterable[list[int]], bos: int, context_size: int) -> np.ndarray:
    """doc0 [BOS] doc1 [BOS] ... cut into rows [BOS, next context_size-1 tokens]; the ragged tail is dropped."""
    if context_size < 2:
        raise UserError(f"tokenize.context_size must be at least 2, got {context_size}")
    stream: list[int] = []
    for i, doc in enumerate(documents):
        if i:
            stream.append(bos)
        stream.extend(doc)
    body = context_size - 1
    n_rows = len(stream) // body
    if n_rows == 0:
        return np.zeros((0, context_size), dtype=np.int32)
    chunks = np.asarray(stream[: n_rows * body], dtype=np.int32).reshape(n_rows, body)
    return np.concatenate([np.full((n_rows, 1), bos, dtype=np.int32), chunks], axis=1)


def split_documents(n_docs: int, eval_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask: True for documents held out for evaluation. At least one of each when n_docs >= 2."""
    if not 0.0 < eval_fraction < 1.0:
        raise UserError(f"tokenize.eval_fraction must be between 0 and 1 (exclusive), got {eval_fraction}")
    rng = np.random.default_rng(seed)
    is_eval = rng.random(n_docs) < eval_fraction
    if n_docs >= 2 and not is_eval.any():
        is_eval[rng.integers(n_docs)] = True
    if n_docs >= 2 and is_eval.all():
        is_eval[rng.integers(n_docs)] = False
    return is_eval


def tokenize_corpus(
    cfg: TokenizeConfig, documents: list[str], tokenizer, bos: int, out_dir: str | Path, corpus: str = ""
) -> dict:
    is_eval = split_documents(len(documents), cfg.eval_fraction, cfg.seed)
    encoded = tokenizer(documents, add_special_tokens=False)["input_ids"]
    rows = {
        "train": pack_rows((d for d, e in zip(encoded, is_eval) if not e), bos, cfg.context_size),
        "eval": pack_rows((d for d, e in zip(encoded, is_eval) if e), bos, cfg.context_size),
    }
    rows["train"] = rows["train"][np.random.default_rng(cfg.seed).permutation(len(rows["train"]))]
    limits = {"train": cfg.max_train_rows, "eval": cfg.max_eval_rows}
    for split in SPLITS:
        if limits[split]:
            rows[split] = rows[split][: limits[split]]
        if len(rows[split]) == 0:
            raise UserError(f"tokenize: the {split} split is empty (corpus too small for context_size {cfg.context_size})")
    meta = {
        "corpus": corpus,
        "context_size": cfg.context_size,
        "bos_token_id": bos,
        "documents": {"train": int((~is_eval).sum()), "eval": int(is_eval.sum())},
        "rows": {s: int(len(rows[s])) for s in SPLITS},
        "tokens": {s: int(rows[s].size) for s in SPLITS},
    }
    with atomic_dir(out_dir) as tmp:
        for split in SPLITS:
            np.save(tmp / f"{split}.npy", rows[split])
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def load_rows(tokens_dir: str | Path, split: str) -> np.ndarray:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} (allowed: {', '.join(SPLITS)})")
    path = Path(tokens_dir) / f"{split}.npy"
    if not path.is_file():
        raise UserError(f"{path}: missing; run `attnsae tokenize` first")
    return np.load(path)


def read_tokens_meta(tokens_dir: str | Path) -> dict:
    return json.loads((Path(tokens_dir) / META_FILE).read_text())
