"""The `tokenize` stage: documents -> rows of ``context_size`` tokens, split into train, eval and held-out.

Reads ``data/corpus`` and ``models/base``; writes ``data/tokens`` (``tokenize_stage``), which activations,
streamed training, evaluate and report read back with ``load_rows`` and ``read_tokens_meta``. Every path: layout.py.

A document belongs to the evaluation split when a seeded hash of its text falls below
``eval_fraction`` (``is_eval_document``). The decision needs nothing but the document itself, so a
streamed corpus that is never held in full splits exactly like a materialized one, no evaluation
text ever reaches training, and duplicate documents always land in the same split. Every document of
a source named in ``heldout_sources`` goes to a third split, ``heldout``, instead: a kind of text that
neither training nor the in-distribution evaluation sees (a stored corpus only).

Within a split, documents are joined into one stream with the end-of-document token (GPT-2's
``<|endoftext|>``) between them, and each row is that BOS followed by the next ``context_size - 1``
tokens of the stream: position 0 of every row is BOS (docs/design.md 3). ``TokenRowStream`` does this
incrementally and can save and restore its position, which is what lets a streaming training run
resume. A streamed corpus keeps source order and leaves mixing to the SAE's buffer.

A stored corpus mixes its sources by ``source_weights`` (1 each unless set), so that no source dominates
however large it is (``mixture_order``): each next item comes from the source that is furthest behind its
share. The train split packs each source on its own, shuffles each source's rows (seeded) and interleaves
them row by row, so any leading slice of train.npy (the activation cache takes one) holds every source in
its share, until a source runs out (``balanced_train_rows`` in meta.json). The eval and held-out splits
interleave whole documents, weighted by their token counts, into one stream, so a leading slice of rows is
a mixture too while rows stay cut from one stream (the dashboards count documents along it); held-out
documents come in a seeded random order, so a row cap samples the whole source.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from attnsae.config import TokenizeConfig, check_split_sources
from attnsae.errors import UserError
from attnsae.files import atomic_dir, missing_file, write_npy
from attnsae.formats.tokens_meta import META_FILE, read_tokens_meta

SPLITS = ("train", "eval", "heldout")
TOKENIZE_CHUNK = 64  # documents per tokenizer call: fast tokenizers batch internally
# A document as (source, text); a bare text is a document of the corpus's one unnamed source.
Document = tuple[str, str] | str


def document_hash(text: str, seed: int) -> float:
    """A seeded hash of the document's text, mapped to [0, 1)."""
    digest = hashlib.blake2b(f"{seed}\0{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def is_eval_document(text: str, eval_fraction: float, seed: int) -> bool:
    """The evaluation split, decided by the document alone."""
    return document_hash(text, seed) < eval_fraction


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
            raise UserError(f"cannot resume: the corpus now has {skipped} documents, "
                            f"the checkpoint read {self.documents_read}")
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
    cfg: TokenizeConfig, documents: Sequence[Document] | Callable[[], Iterator[Document]], tokenizer, bos: int,
    out_dir: str | Path, corpus: str = "", streamed: bool = False,
) -> dict:
    """Write the splits' rows (eval.npy; train.npy unless the corpus is streamed; heldout.npy when
    ``heldout_sources`` names any) and meta.json; return the meta.

    ``documents`` is a list, or a function that starts them from the beginning (a streamed corpus need not
    fit in memory). A streamed corpus is read only until ``max_eval_rows`` evaluation rows exist; its train
    rows are made during training from the same split.
    """
    open_documents = documents if callable(documents) else (lambda: iter(documents))
    check_eval_fraction(cfg.eval_fraction)
    if streamed:
        def open_texts() -> Iterator[str]:
            return (text for _, text in map(sourced, open_documents()))

        rows, counts = _streamed_eval(cfg, open_texts, tokenizer, bos)
        mixture = {"source_weights": {}, "source_tokens": {}, "balanced_train_rows": None}  # no mixing: source order
    else:
        rows, counts, mixture = _stored_splits(cfg, map(sourced, open_documents()), tokenizer, bos)
    for split, split_rows in rows.items():
        if len(split_rows) == 0:
            raise UserError(f"tokenize: the {split} split is empty "
                            f"(corpus too small for context_size {cfg.context_size})")
    meta = {
        "corpus": corpus,
        "streamed": streamed,
        "context_size": cfg.context_size,
        "bos_token_id": bos,
        "eval_fraction": cfg.eval_fraction,
        "split_seed": cfg.seed,
        "heldout_sources": list(cfg.heldout_sources),
        "documents": counts,
        "rows": {s: int(len(r)) for s, r in rows.items()},
        "tokens": {s: int(r.size) for s, r in rows.items()},
        **mixture,
    }
    with atomic_dir(out_dir) as tmp:
        for split, split_rows in rows.items():
            write_npy(tmp / f"{split}.npy", split_rows)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def sourced(document: Document) -> tuple[str, str]:
    return ("", document) if isinstance(document, str) else document


def _streamed_eval(cfg: TokenizeConfig, open_texts: Callable[[], Iterator[str]], tokenizer,
                   bos: int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The eval rows of a streamed corpus: its documents in source order, read until ``max_eval_rows`` rows."""
    for key in ("heldout_sources", "source_weights"):
        if getattr(cfg, key):
            raise UserError(f"params.yaml: bad value for 'tokenize.{key}': a streamed corpus is read in source "
                            f"order, so it neither holds sources out nor mixes them; leave it empty "
                            f"(got {getattr(cfg, key)!r})")
    if not cfg.max_eval_rows:
        raise UserError("tokenize.max_eval_rows must be > 0 for a streamed corpus (the eval split is read until it "
                        "has that many rows)")
    _, evaluation = split_streams(open_texts, cfg, tokenizer, bos)
    return {"eval": evaluation.next_rows(cfg.max_eval_rows)}, {"eval": evaluation.documents_kept}


def split_of(source: str, text_hash: float, cfg: TokenizeConfig) -> str:
    """train, eval or heldout: the source decides for a held-out source, the text's hash (``document_hash``) for
    every other, as ``is_eval_document`` does."""
    if source in cfg.heldout_sources:
        return "heldout"
    return "eval" if text_hash < cfg.eval_fraction else "train"


class SplitSources:
    """One split's documents of each source, tokenized, in the order the source gave them (names in order of
    first appearance). The train split packs its rows per source as the documents come."""

    def __init__(self, bos: int, context_size: int, pack: bool):
        self.bos, self.context_size, self.pack = bos, context_size, pack
        self.names: list[str] = []
        self.documents: list[list[np.ndarray]] = []  # per source (unless packed)
        self.hashes: list[list[float]] = []  # per source (unless packed): each document's ``document_hash``
        self.packers: list[RowPacker] = []
        self.rows: list[list[np.ndarray]] = []  # per source (when packed)
        self.count = 0

    def add(self, source: str, tokens: list[int], text_hash: float) -> None:
        if source not in self.names:
            self.names.append(source)
            for per_source in (self.documents, self.hashes, self.rows):
                per_source.append([])
            self.packers.append(RowPacker(self.bos, self.context_size))
        s = self.names.index(source)
        self.count += 1
        if self.pack:
            self.packers[s].add(tokens)
            self.rows[s].append(self.packers[s].pop_rows())
        else:
            self.documents[s].append(np.asarray(tokens, dtype=np.int32))
            self.hashes[s].append(text_hash)

    def weights(self, source_weights: dict[str, float]) -> list[float]:
        return [source_weights.get(name, 1.0) for name in self.names]


def _stored_splits(cfg: TokenizeConfig, documents: Iterable[tuple[str, str]], tokenizer,
                   bos: int) -> tuple[dict[str, np.ndarray], dict[str, int], dict]:
    """Every split of a stored corpus, each mixed from its sources: (rows, documents, what meta.json records
    about the mixture)."""
    splits = {"train": SplitSources(bos, cfg.context_size, pack=True),
              "eval": SplitSources(bos, cfg.context_size, pack=False),
              "heldout": SplitSources(bos, cfg.context_size, pack=False)}
    for source, text, tokens in _tokenized(documents, tokenizer):
        text_hash = document_hash(text, cfg.seed)
        splits[split_of(source, text_hash, cfg)].add(source, tokens, text_hash)
    train, balanced, train_tokens = _train_rows(splits["train"], cfg)
    rows = {"train": train}
    source_tokens = {"train": train_tokens}
    caps = {"eval": cfg.max_eval_rows, "heldout": cfg.max_heldout_rows}
    for split in ("eval", "heldout") if cfg.heldout_sources else ("eval",):
        rows[split], source_tokens[split] = _document_stream_rows(splits[split], cfg, caps[split],
                                                                  by_hash=split == "heldout")
    mixture = {"source_weights": {name: w for part in splits.values() for name, w in
                                  zip(part.names, part.weights(cfg.source_weights))},
               "source_tokens": source_tokens, "balanced_train_rows": balanced}
    return rows, {split: splits[split].count for split in rows}, mixture


def _tokenized(documents: Iterable[tuple[str, str]], tokenizer) -> Iterator[tuple[str, str, list[int]]]:
    """(source, text, tokens) of every document, tokenized ``TOKENIZE_CHUNK`` documents at a time."""
    documents = iter(documents)
    while chunk := list(itertools.islice(documents, TOKENIZE_CHUNK)):
        ids = tokenizer([text for _, text in chunk], add_special_tokens=False)["input_ids"]
        for (source, text), tokens in zip(chunk, ids):
            yield source, text, tokens


def _train_rows(split: SplitSources, cfg: TokenizeConfig) -> tuple[np.ndarray, int, dict[str, int]]:
    """The train rows: each source's rows in a seeded random order, interleaved by weight, capped at
    ``max_train_rows``; with the leading rows that hold every source in its share, and tokens per source."""
    rng = np.random.default_rng(cfg.seed)
    per_source = [np.concatenate(parts) for parts in split.rows]
    per_source = [rows[rng.permutation(len(rows))] for rows in per_source]
    order = mixture_order([[1] * len(rows) for rows in per_source], split.weights(cfg.source_weights))
    balanced = balanced_prefix(order)
    if cfg.max_train_rows:
        order = order[: cfg.max_train_rows]
    starts = np.cumsum([0] + [len(rows) for rows in per_source])
    stacked = np.concatenate(per_source) if per_source else np.zeros((0, cfg.context_size), np.int32)
    rows = stacked[np.array([starts[s] + i for s, i in order], dtype=np.int64)]
    counts = np.bincount([s for s, _ in order], minlength=len(split.names)) * cfg.context_size
    return rows, min(balanced, len(order)), dict(zip(split.names, counts.tolist()))


def _document_stream_rows(split: SplitSources, cfg: TokenizeConfig, max_rows: int,
                          by_hash: bool) -> tuple[np.ndarray, dict[str, int]]:
    """Rows cut from one stream of the split's documents, interleaved across sources by weight (each source's
    documents in corpus order, or ``by_hash`` in the order of their seeded hash), capped at ``max_rows``; with the
    tokens each source holds in those rows."""
    documents = [[docs[i] for i in np.argsort(hashes, kind="stable")] if by_hash else docs
                 for docs, hashes in zip(split.documents, split.hashes)]
    order = mixture_order([[len(doc) for doc in docs] for docs in documents], split.weights(cfg.source_weights))
    rows = pack_rows((documents[s][i] for s, i in order), split.bos, cfg.context_size)
    if max_rows:
        rows = rows[:max_rows]
    counts = stream_source_tokens([s for s, _ in order], [len(documents[s][i]) for s, i in order], len(rows),
                                  cfg.context_size, len(split.names))
    return rows, dict(zip(split.names, counts.tolist()))


def mixture_order(sizes: Sequence[Sequence[int]], weights: Sequence[float]) -> list[tuple[int, int]]:
    """Every (source, item) in mixture order: the next item always comes from the source whose size taken so far,
    divided by its weight, is smallest (ties: the earlier source). Each source's items keep their order; once a
    source runs out, the others share what remains."""
    heap = [(0.0, s) for s, items in enumerate(sizes) if len(items)]
    taken, used = [0] * len(sizes), [0] * len(sizes)
    order = []
    while heap:
        _, s = heapq.heappop(heap)
        order.append((s, taken[s]))
        used[s] += sizes[s][taken[s]]
        taken[s] += 1
        if taken[s] < len(sizes[s]):
            heapq.heappush(heap, (used[s] / weights[s], s))
    return order


def balanced_prefix(order: Sequence[tuple[int, int]]) -> int:
    """How many leading items of a mixture order come up to the last item of the first source to run out
    (all of them when the order holds one source)."""
    last = {s: position for position, (s, _) in enumerate(order)}
    return min(last.values()) + 1 if len(last) > 1 else len(order)


def stream_source_tokens(sources: Sequence[int], lengths: Sequence[int], rows: int, context_size: int,
                         n_sources: int) -> np.ndarray:
    """Tokens of each source in the first ``rows`` rows cut from doc0 [BOS] doc1 [BOS] ... (``sources`` and
    ``lengths``: per document, in stream order). A separator counts with the document after it, a row's BOS with
    the row's first stream token; so the counts add up to rows x context_size."""
    labels = np.repeat(np.asarray(sources, dtype=np.int64), [n + (i > 0) for i, n in enumerate(lengths)])
    body = labels[: rows * (context_size - 1)].reshape(rows, context_size - 1)
    return np.bincount(np.concatenate([body[:, :1], body], axis=1).ravel(), minlength=n_sources)


def tokenize_stage(cfg: TokenizeConfig, corpus_dir: str | Path, model_dir: str | Path, out_dir: str | Path) -> dict:
    """The `tokenize` stage: the corpus's documents through the pinned model's tokenizer into ``out_dir``."""
    from attnsae.data.corpus import describe_corpus, load_manifest, open_sourced_documents
    from attnsae.data.models import load_tokenizer
    from attnsae.formats.model_info import read_model_info

    info = read_model_info(model_dir)
    info.check_context_size(cfg.context_size)
    manifest = load_manifest(corpus_dir)
    if not manifest.streamed:
        check_split_sources(cfg, list(manifest.sources))
    return tokenize_corpus(cfg, open_sourced_documents(corpus_dir), load_tokenizer(model_dir), info.bos_token_id,
                           out_dir, describe_corpus(corpus_dir), streamed=manifest.streamed)


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
            raise UserError(f"{tokens_dir}: the corpus is streamed, so train rows are made during training "
                            "(use --stream)")
        if split == "heldout" and not read_tokens_meta(tokens_dir)["heldout_sources"]:
            raise UserError(f"{tokens_dir}: no held-out split (tokenize.heldout_sources was empty)")
        raise missing_file(path, written_by="tokenize")
    try:
        rows = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError):  # truncated, garbled, or an object array (never loaded: pickle)
        raise UserError(f"{path}: not a readable .npy array (truncated or garbled); "
                        "run `attnsae tokenize` again") from None
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


