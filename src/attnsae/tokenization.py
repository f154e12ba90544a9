"""The `tokenize` stage: documents -> rows of ``context_size`` tokens, split into train and eval.

Reads ``data/corpus`` and ``models/base``; writes ``data/tokens`` (``tokenize_stage``), which activations,
streamed training, evaluate and report read back with ``load_rows`` and ``read_tokens_meta``. Every path: layout.py.

A document belongs to the evaluation split when a seeded hash of its text falls below
``eval_fraction`` (``is_eval_document``). The decision needs nothing but the document itself, so a
streamed corpus that is never held in full splits exactly like a materialized one, no evaluation
text ever reaches training, and duplicate documents always land in the same split.

Within a split, documents are joined into one stream with the end-of-document token (GPT-2's
``<|endoftext|>``) between them, and each row is that BOS followed by the next ``context_size - 1``
tokens of the stream: position 0 of every row is BOS (design.md 3). ``TokenRowStream`` does this
incrementally and can save and restore its position, which is what lets a streaming training run
resume. A materialized corpus stores its train rows in a seeded random order so that a token budget
samples the whole corpus; a streamed corpus keeps source order and leaves mixing to the SAE's buffer.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt

from attnsae.config import TokenizeConfig
from attnsae.errors import UserError
from attnsae.files import atomic_dir, missing_file, read_json_as, write_npy

SPLITS = ("train", "eval")
META_FILE = "meta.json"
TOKENIZE_CHUNK = 64  # documents per tokenizer call: fast tokenizers batch internally


def is_eval_document(text: str, eval_fraction: float, seed: int) -> bool:
    """The held-out split, decided by the document alone: a seeded hash mapped to [0, 1)."""
    digest = hashlib.blake2b(f"{seed}\0{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < eval_fraction


def check_eval_fraction(eval_fraction: float) -> None:
    if not 0.0 < eval_fraction < 1.0:
        raise UserError(f"tokenize.eval_fraction must be between 0 and 1 (exclusive), got {eval_fraction}")


class RowPacker:
    """doc0 [BOS] doc1 [BOS] ... cut into rows [BOS, next context_size-1 tokens], fed a document at a time."""

    def __init__(self, bos: int, context_size: int):
        if context_size < 2:
            raise UserError(f"tokenize.context_size must be at least 2, got {context_size}")
        self.bos, self.context_size = bos, context_size
        self.pending: list[int] = []  # stream tokens not yet in a row
        self.documents = 0

    def add(self, tokens: list[int]) -> None:
        if self.documents:
            self.pending.append(self.bos)
        self.pending.extend(tokens)
        self.documents += 1

    def pop_rows(self) -> np.ndarray:
        """Every complete row so far; the ragged tail stays pending."""
        body = self.context_size - 1
        n_rows = len(self.pending) // body
        chunks = np.asarray(self.pending[: n_rows * body], dtype=np.int32).reshape(n_rows, body)
        del self.pending[: n_rows * body]
        return np.concatenate([np.full((n_rows, 1), self.bos, dtype=np.int32), chunks], axis=1)

    def state_dict(self) -> dict:
        return {"pending": torch.tensor(self.pending, dtype=torch.int64), "documents": self.documents}

    def load_state_dict(self, state: dict) -> None:
        self.pending, self.documents = state["pending"].tolist(), int(state["documents"])


def pack_rows(documents: Iterable[list[int]], bos: int, context_size: int) -> np.ndarray:
    """All rows of already tokenized documents; the ragged tail is dropped."""
    packer = RowPacker(bos, context_size)
    for doc in documents:
        packer.add(doc)
    return packer.pop_rows()


class TokenRowStream:
    """Token rows packed on the fly from the documents that ``keep`` selects (one split).

    ``open_documents`` starts the document sequence from the beginning; restoring a saved state
    reopens it and skips the documents already read (sources are read again, not re-tokenized).
    """

    def __init__(self, open_documents: Callable[[], Iterator[str]], keep: Callable[[str], bool], tokenizer,
                 bos: int, context_size: int):
        self.open_documents, self.keep, self.tokenizer = open_documents, keep, tokenizer
        self.packer = RowPacker(bos, context_size)
        self.context_size = context_size
        self.documents = open_documents()
        self.documents_read = 0
        self.ready = np.zeros((0, context_size), dtype=np.int32)  # packed rows not yet handed out
        self.exhausted = False

    def _read_chunk(self) -> None:
        chunk = list(itertools.islice(self.documents, TOKENIZE_CHUNK))
        self.documents_read += len(chunk)
        if not chunk:
            self.exhausted = True
            return
        kept = [text for text in chunk if self.keep(text)]
        if kept:
            for tokens in self.tokenizer(kept, add_special_tokens=False)["input_ids"]:
                self.packer.add(tokens)
            self.ready = np.concatenate([self.ready, self.packer.pop_rows()])

    def next_rows(self, n: int) -> np.ndarray:
        """Up to ``n`` rows; fewer only when the documents have run out."""
        while len(self.ready) < n and not self.exhausted:
            self._read_chunk()
        rows, self.ready = self.ready[:n], self.ready[n:]
        return rows

    def all_rows(self) -> np.ndarray:
        while not self.exhausted:
            self._read_chunk()
        rows, self.ready = self.ready, self.ready[:0]
        return rows

    @property
    def documents_kept(self) -> int:
        return self.packer.documents

    def state_dict(self) -> dict:
        # tensors, not numpy arrays: checkpoints load with torch.load(weights_only=True)
        return {"documents_read": self.documents_read, "packer": self.packer.state_dict(),
                "ready": torch.from_numpy(self.ready.copy()), "exhausted": self.exhausted}

    def load_state_dict(self, state: dict) -> None:
        self.documents = self.open_documents()
        self.documents_read = int(state["documents_read"])
        skipped = sum(1 for _ in itertools.islice(self.documents, self.documents_read))
        if skipped != self.documents_read:
            raise UserError(f"cannot resume: the corpus now has {skipped} documents, the checkpoint read {self.documents_read}")
        self.packer.load_state_dict(state["packer"])
        self.ready = state["ready"].numpy().astype(np.int32).reshape(-1, self.context_size)
        self.exhausted = bool(state["exhausted"])


def split_streams(open_documents: Callable[[], Iterator[str]], cfg: TokenizeConfig, tokenizer, bos: int):
    """(train, eval) row streams over the same documents, split by ``is_eval_document``."""
    check_eval_fraction(cfg.eval_fraction)

    def is_eval(text: str) -> bool:
        return is_eval_document(text, cfg.eval_fraction, cfg.seed)

    def is_train(text: str) -> bool:
        return not is_eval(text)

    return (TokenRowStream(open_documents, is_train, tokenizer, bos, cfg.context_size),
            TokenRowStream(open_documents, is_eval, tokenizer, bos, cfg.context_size))


def tokenize_corpus(
    cfg: TokenizeConfig, documents: Sequence[str] | Callable[[], Iterator[str]], tokenizer, bos: int,
    out_dir: str | Path, corpus: str = "", streamed: bool = False,
) -> dict:
    """Write eval.npy (and, unless the corpus is streamed, train.npy) and meta.json.

    ``documents`` is a list, or a function that starts them from the beginning (a corpus read twice,
    once per split, need not fit in memory). A streamed corpus is read only until ``max_eval_rows``
    evaluation rows exist; its train rows are made during training from the same split.
    """
    open_documents = documents if callable(documents) else (lambda: iter(documents))
    train, evaluation = split_streams(open_documents, cfg, tokenizer, bos)
    if streamed and not cfg.max_eval_rows:
        raise UserError("tokenize.max_eval_rows must be > 0 for a streamed corpus (the eval split is read until it has that many rows)")
    rows = {"eval": evaluation.next_rows(cfg.max_eval_rows) if cfg.max_eval_rows else evaluation.all_rows()}
    documents = {"eval": evaluation.documents_kept}
    if not streamed:
        rows["train"] = train.all_rows()
        rows["train"] = rows["train"][np.random.default_rng(cfg.seed).permutation(len(rows["train"]))]
        if cfg.max_train_rows:
            rows["train"] = rows["train"][: cfg.max_train_rows]
        documents["train"] = train.documents_kept
    for split, split_rows in rows.items():
        if len(split_rows) == 0:
            raise UserError(f"tokenize: the {split} split is empty (corpus too small for context_size {cfg.context_size})")
    meta = {
        "corpus": corpus,
        "streamed": streamed,
        "context_size": cfg.context_size,
        "bos_token_id": bos,
        "eval_fraction": cfg.eval_fraction,
        "split_seed": cfg.seed,
        "documents": documents,
        "rows": {s: int(len(r)) for s, r in rows.items()},
        "tokens": {s: int(r.size) for s, r in rows.items()},
    }
    with atomic_dir(out_dir) as tmp:
        for split, split_rows in rows.items():
            write_npy(tmp / f"{split}.npy", split_rows)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def tokenize_stage(cfg: TokenizeConfig, corpus_dir: str | Path, model_dir: str | Path, out_dir: str | Path) -> dict:
    """The `tokenize` stage: the corpus's documents through the pinned model's tokenizer into ``out_dir``."""
    from attnsae.corpus import describe_corpus, load_manifest, open_documents
    from attnsae.models import load_tokenizer, read_model_info

    info = read_model_info(model_dir)
    info.check_context_size(cfg.context_size)
    streamed = load_manifest(corpus_dir).streamed
    return tokenize_corpus(cfg, open_documents(corpus_dir), load_tokenizer(model_dir), info.bos_token_id, out_dir,
                           describe_corpus(corpus_dir), streamed=streamed)


def train_row_stream(open_documents: Callable[[], Iterator[str]], tokens_meta: dict, tokenizer) -> TokenRowStream:
    """The train split of a streamed corpus, split exactly as the tokenize stage split it."""
    def is_train(text: str) -> bool:
        return not is_eval_document(text, tokens_meta["eval_fraction"], tokens_meta["split_seed"])

    return TokenRowStream(open_documents, is_train, tokenizer, tokens_meta["bos_token_id"], tokens_meta["context_size"])


def load_rows(tokens_dir: str | Path, split: str, vocab_size: int | None = None) -> np.ndarray:
    """A split's token rows [rows, context_size], checked; with ``vocab_size`` (the model's), every id is < it.

    Stages that feed the rows to the model pass ``vocab_size``: an id the model lacks would crash deep
    inside its embedding lookup instead of naming the file.
    """
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} (allowed: {', '.join(SPLITS)})")
    path = Path(tokens_dir) / f"{split}.npy"
    if not path.is_file():
        if split == "train" and read_tokens_meta(tokens_dir).get("streamed"):
            raise UserError(f"{tokens_dir}: the corpus is streamed, so train rows are made during training (use --stream)")
        raise missing_file(path, written_by="tokenize")
    try:
        rows = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError):  # truncated, garbled, or an object array (never loaded: pickle)
        raise UserError(f"{path}: not a readable .npy array (truncated or garbled); run `attnsae tokenize` again") from None
    check_rows(rows, path, vocab_size)
    return rows


def check_rows(rows: np.ndarray, path: Path, vocab_size: int | None = None) -> None:
    """Token rows as the tokenize stage writes them: integer ids, 2-D, at least one row, ids in [0, vocab_size)."""
    if not isinstance(rows, np.ndarray):  # np.load opens a zip archive (.npz) as a dict-like
        raise UserError(f"{path}: expected one .npy array of token ids, got an archive")
    if not np.issubdtype(rows.dtype, np.integer):
        raise UserError(f"{path}: token ids must be integers, got dtype {rows.dtype}")
    if rows.ndim != 2 or rows.shape[1] < 2:
        raise UserError(f"{path}: expected token rows of shape [rows, context_size >= 2], got shape {rows.shape}")
    if len(rows) == 0:
        raise UserError(f"{path}: no token rows; run `attnsae tokenize` on a larger corpus")
    if vocab_size is not None:
        low, high = int(rows.min()), int(rows.max())
        if low < 0 or high >= vocab_size:
            raise UserError(f"{path}: token id {low if low < 0 else high} is outside the model's vocabulary "
                            f"(allowed: 0 to {vocab_size - 1}); tokenize again with this model")


class TokensMeta(BaseModel):
    """meta.json of the tokenize stage: how the rows were made (keys as ``tokenize_corpus`` writes them)."""

    model_config = ConfigDict(extra="allow", strict=True)

    corpus: str = ""
    streamed: bool = False
    context_size: int = Field(ge=2)
    bos_token_id: NonNegativeInt
    eval_fraction: float = Field(gt=0.0, lt=1.0)
    split_seed: int
    documents: dict[str, NonNegativeInt]
    rows: dict[str, NonNegativeInt]
    tokens: dict[str, NonNegativeInt]


def read_tokens_meta(tokens_dir: str | Path) -> dict:
    """The checked meta.json, as the dict the tokenize stage wrote."""
    return read_json_as(Path(tokens_dir) / META_FILE, TokensMeta, written_by="tokenize").model_dump()
