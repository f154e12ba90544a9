"""The tokenize stage: packing rows with BOS, the document split, and no eval text in train rows."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from attnsae.config import TokenizeConfig, check_split_sources
from attnsae.data.models import END_OF_TEXT, byte_level_tokenizer
from attnsae.data.tokenization import (
    TokenRowStream,
    balanced_prefix,
    is_eval_document,
    load_rows,
    mixture_order,
    pack_rows,
    stream_source_tokens,
    tokenize_corpus,
)
from attnsae.errors import UserError
from attnsae.formats.tokens_meta import read_tokens_meta

BOS = 0
DOCS = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]  # stream: 1 2 3 0 4 5 0 6 7 8 9 (11 tokens, BOS between documents)


def test_pack_rows_exact_division():
    rows = pack_rows(DOCS, BOS, context_size=4)  # BOS + 3 stream tokens per row
    assert rows.dtype == np.int32
    assert rows.tolist() == [[0, 1, 2, 3], [0, 0, 4, 5], [0, 0, 6, 7]]  # tail [8, 9] dropped


def test_pack_rows_drops_ragged_tail():
    rows = pack_rows(DOCS, BOS, context_size=6)  # 5 stream tokens per row: 2 rows, tail [9] dropped
    assert rows.tolist() == [[0, 1, 2, 3, 0, 4], [0, 5, 0, 6, 7, 8]]
    rows = pack_rows(DOCS, BOS, context_size=8)  # 7 per row: 1 row, tail of 4 dropped
    assert rows.tolist() == [[0, 1, 2, 3, 0, 4, 5, 0]]


def test_pack_rows_every_row_starts_with_bos_and_keeps_stream_order():
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(1, 50, size=rng.integers(1, 30))) for _ in range(40)]
    bos = 99
    rows = pack_rows(docs, bos, context_size=16)
    assert rows.shape[1] == 16 and len(rows) > 0
    assert np.all(rows[:, 0] == bos)
    stream = [t for i, d in enumerate(docs) for t in ([bos] if i else []) + d]
    assert len(rows) == len(stream) // 15
    assert rows[:, 1:].reshape(-1).tolist() == stream[: len(rows) * 15]


def test_pack_rows_accepts_a_generator_and_handles_too_little_text():
    rows = pack_rows((d for d in DOCS), BOS, context_size=4)
    assert rows.shape == (3, 4)
    empty = pack_rows([[1, 2]], BOS, context_size=10)
    assert empty.shape == (0, 10) and empty.dtype == np.int32


def test_pack_rows_rejects_tiny_context():
    with pytest.raises(UserError, match="context_size"):
        pack_rows(DOCS, BOS, context_size=1)


def test_eval_split_is_a_seeded_hash_of_the_document():
    docs = [f"document number {i}" for i in range(2000)]
    a = [is_eval_document(d, 0.1, seed=49) for d in docs]
    assert a == [is_eval_document(d, 0.1, seed=49) for d in docs]
    assert a != [is_eval_document(d, 0.1, seed=50) for d in docs]
    assert 0.08 < np.mean(a) < 0.12
    # the decision is the document's own: order, neighbours and duplicates do not move it
    assert [is_eval_document(d, 0.1, 49) for d in reversed(docs)] == a[::-1]
    assert is_eval_document(docs[7], 0.1, 49) == is_eval_document(str(docs[7]), 0.1, 49)
    # a larger fraction only adds documents to the eval split
    wider = [is_eval_document(d, 0.3, 49) for d in docs]
    assert all(w for e, w in zip(a, wider) if e) and sum(wider) > sum(a)


# ---------------------------------------------------------------------------------------------------
# tokenize_corpus with the byte-level tokenizer

N_DOCS = 30
MARKER = re.compile(r"\[(\d{4})\]")


def marked_documents() -> list[str]:
    """Document i is its own marker '[000i]' repeated: any piece of it names where it came from."""
    return [f"[{i:04d}]" * 8 for i in range(N_DOCS)]


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


def markers_in(rows: np.ndarray, tokenizer) -> set[int]:
    found = set()
    for row in rows:
        found |= {int(m) for m in MARKER.findall(tokenizer.decode(row.tolist(), skip_special_tokens=True))}
    return found


def test_tokenize_corpus_writes_split_files(tmp_path, tokenizer):
    cfg = TokenizeConfig(context_size=32, eval_fraction=0.2, seed=7)
    bos = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    out = tmp_path / "tokens"
    meta = tokenize_corpus(cfg, marked_documents(), tokenizer, bos, out, corpus="synthetic (30 docs)")

    assert sorted(p.name for p in out.iterdir()) == ["eval.npy", "meta.json", "train.npy"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokens"]  # no temporary folder left
    assert read_tokens_meta(out) == meta == json.loads((out / "meta.json").read_text())
    train, evaluation = load_rows(out, "train"), load_rows(out, "eval")

    is_eval = np.array([is_eval_document(d, 0.2, 7) for d in marked_documents()])
    assert is_eval.any() and not is_eval.all()
    assert meta["documents"] == {"train": int((~is_eval).sum()), "eval": int(is_eval.sum())}
    assert meta["rows"] == {"train": len(train), "eval": len(evaluation)}
    assert meta["tokens"] == {"train": train.size, "eval": evaluation.size}
    assert meta["context_size"] == 32 and meta["bos_token_id"] == bos and meta["corpus"] == "synthetic (30 docs)"
    assert meta["streamed"] is False and meta["eval_fraction"] == 0.2 and meta["split_seed"] == 7
    # each document is 48 one-byte tokens plus its BOS; rows carry 31 stream tokens after the row BOS
    assert len(train) == (49 * meta["documents"]["train"]) // 31
    assert len(evaluation) == (49 * meta["documents"]["eval"]) // 31
    for rows in (train, evaluation):
        assert rows.shape[1] == 32
        assert np.all(rows[:, 0] == bos)

    # no evaluation text in training rows, and every document lands in its own split
    train_docs = {i for i in range(N_DOCS) if not is_eval[i]}
    eval_docs = {i for i in range(N_DOCS) if is_eval[i]}
    assert markers_in(train, tokenizer) == train_docs
    assert markers_in(evaluation, tokenizer) == eval_docs


def test_tokenize_corpus_is_deterministic_and_caps_rows(tmp_path, tokenizer):
    bos = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    cfg = TokenizeConfig(context_size=16, eval_fraction=0.3, seed=3, max_train_rows=10, max_eval_rows=4)
    tokenize_corpus(cfg, marked_documents(), tokenizer, bos, tmp_path / "a")
    tokenize_corpus(cfg, marked_documents(), tokenizer, bos, tmp_path / "b")
    for split, cap in (("train", 10), ("eval", 4)):
        a, b = load_rows(tmp_path / "a", split), load_rows(tmp_path / "b", split)
        assert a.shape == (cap, 16)
        assert np.array_equal(a, b)


@pytest.mark.parametrize("fraction", [0.0, 1.0, 2.0])
def test_tokenize_corpus_bad_eval_fraction(tmp_path, tokenizer, fraction):
    # params.yaml never gets here (config refuses these values); the stage function guards direct callers
    cfg = TokenizeConfig.model_construct(context_size=16, eval_fraction=fraction, max_train_rows=0, max_eval_rows=0,
                                         seed=49)
    with pytest.raises(UserError, match="eval_fraction"):
        tokenize_corpus(cfg, marked_documents(), tokenizer, 256, tmp_path / "tokens")
    assert not (tmp_path / "tokens").exists()


def test_tokenize_corpus_too_small_for_context(tmp_path, tokenizer):
    cfg = TokenizeConfig(context_size=128, eval_fraction=0.5, seed=0)
    with pytest.raises(UserError, match="split is empty"):
        tokenize_corpus(cfg, ["ab", "cd", "ef"], tokenizer, 256, tmp_path / "tokens")
    assert not (tmp_path / "tokens").exists()


def test_load_rows_errors(tmp_path):
    with pytest.raises(UserError, match="unknown split"):
        load_rows(tmp_path, "test")
    with pytest.raises(UserError, match="missing"):
        load_rows(tmp_path, "train")


# ---------------------------------------------------------------------------------------------------
# streamed corpora: rows packed on the fly, resumable


def streamed_rows(stream: TokenRowStream, batch: int) -> list[np.ndarray]:
    out = []
    while len(rows := stream.next_rows(batch)):
        out.append(rows)
    return out


def test_token_row_stream_packs_like_pack_rows(tokenizer):
    bos = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    docs = marked_documents() * 5  # more documents than one tokenizer chunk
    keep = lambda text: not text.startswith("[0003]")  # noqa: E731
    stream = TokenRowStream(lambda: iter(docs), keep, tokenizer, bos, context_size=16)
    expected = pack_rows((tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs if keep(d)), bos, 16)
    assert np.array_equal(np.concatenate(streamed_rows(stream, 7)), expected)
    assert stream.documents_read == len(docs) and stream.documents_kept == len(docs) - 5


def test_token_row_stream_resumes_from_its_state(tokenizer):
    bos = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    docs = marked_documents() * 5
    opened = []

    def open_documents():
        opened.append(1)
        return iter(docs)

    def keep(text):
        return True

    straight = streamed_rows(TokenRowStream(open_documents, keep, tokenizer, bos, 16), 5)
    first = TokenRowStream(open_documents, keep, tokenizer, bos, 16)
    head = [first.next_rows(5) for _ in range(9)]
    state = first.state_dict()
    second = TokenRowStream(open_documents, keep, tokenizer, bos, 16)
    second.load_state_dict(state)
    tail = streamed_rows(second, 5)
    assert len(opened) == 4  # the resumed stream re-opened the documents and skipped what was read
    assert np.array_equal(np.concatenate(head + tail), np.concatenate(straight))


def test_streamed_corpus_gets_eval_rows_only(tmp_path, tokenizer):
    bos = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    cfg = TokenizeConfig(context_size=16, eval_fraction=0.3, seed=3, max_eval_rows=4)
    meta = tokenize_corpus(cfg, marked_documents(), tokenizer, bos, tmp_path / "tokens", streamed=True)
    assert sorted(p.name for p in (tmp_path / "tokens").iterdir()) == ["eval.npy", "meta.json"]
    assert meta["streamed"] is True and meta["rows"] == {"eval": 4}
    stored = tokenize_corpus(cfg, marked_documents(), tokenizer, bos, tmp_path / "stored")
    assert np.array_equal(load_rows(tmp_path / "tokens", "eval"), load_rows(tmp_path / "stored", "eval"))
    with pytest.raises(UserError, match="the corpus is streamed, so train rows are made during training"):
        load_rows(tmp_path / "tokens", "train")
    assert stored["rows"]["train"] > 0


def test_streamed_corpus_needs_an_eval_row_limit(tmp_path, tokenizer):
    cfg = TokenizeConfig(context_size=16, eval_fraction=0.3, max_eval_rows=0)
    with pytest.raises(UserError, match="max_eval_rows must be > 0 for a streamed corpus"):
        tokenize_corpus(cfg, marked_documents(), tokenizer, 256, tmp_path / "tokens", streamed=True)
    assert not (tmp_path / "tokens").exists()


# ---------------------------------------------------------------------------------------------------
# Several sources: the weighted mixture and the held-out split


def test_mixture_order_keeps_each_source_at_its_weighted_share():
    order = mixture_order([[1] * 6, [1] * 2, [1] * 3], [1.0, 1.0, 2.0])
    assert order == [(0, 0), (1, 0), (2, 0), (2, 1), (0, 1), (1, 1), (2, 2), (0, 2), (0, 3), (0, 4), (0, 5)]
    assert balanced_prefix(order) == 6  # source 1 runs out with the 6th item
    # sizes count, not items: a source of long documents gives fewer of them
    assert mixture_order([[10, 10], [4, 4, 4, 4, 4]], [1.0, 1.0]) == [
        (0, 0), (1, 0), (1, 1), (1, 2), (0, 1), (1, 3), (1, 4)]
    assert balanced_prefix([(0, 0), (0, 1)]) == 2 and mixture_order([[], [1]], [1.0, 1.0]) == [(1, 0)]


def test_stream_source_tokens_counts_every_row_token_once():
    # stream: a a a | BOS b b | BOS a a a a ; rows of 1 BOS + 3 stream tokens
    counts = stream_source_tokens([0, 1, 0], [3, 2, 4], rows=3, context_size=4, n_sources=2)
    # rows: [BOS a a a] [BOS BOS b b] [BOS BOS a a]: row BOSes go with their first stream token
    assert counts.tolist() == [4 + 0 + 4, 4 + 0] and counts.sum() == 3 * 4


SOURCE_MARKERS = {"big": "<{:04d}>", "small": "({:04d})", "other": "{{{:04d}}}"}


def sourced_documents(sizes: dict[str, int]) -> list[tuple[str, str]]:
    """Per source, its documents: the source's marker with the document number, repeated."""
    return [(source, SOURCE_MARKERS[source].format(i) * 8) for source, n in sizes.items() for i in range(n)]


def sources_in(rows: np.ndarray, tokenizer) -> list[set[str]]:
    """For each row, the sources whose markers it holds (a marker cut by the row's edge is not seen)."""
    patterns = {source: re.compile(re.escape(marker.format(0)).replace("0000", r"\d{4}"))
                for source, marker in SOURCE_MARKERS.items()}
    texts = [tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in rows]
    return [{source for source, pattern in patterns.items() if pattern.search(text)} for text in texts]


def test_stored_corpus_mixes_its_sources_and_holds_one_out(tmp_path, tokenizer):
    bos = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    cfg = TokenizeConfig(context_size=32, eval_fraction=0.2, seed=7, heldout_sources=["other"], max_heldout_rows=5)
    docs = sourced_documents({"big": 60, "other": 12, "small": 15})
    meta = tokenize_corpus(cfg, docs, tokenizer, bos, tmp_path / "tokens")
    train, evaluation, heldout = (load_rows(tmp_path / "tokens", split) for split in ("train", "eval", "heldout"))
    assert sorted(p.name for p in (tmp_path / "tokens").iterdir()) == ["eval.npy", "heldout.npy", "meta.json",
                                                                       "train.npy"]
    # the held-out source is in its own split only, and the others never reach it
    assert all(found == {"other"} for found in sources_in(heldout, tokenizer)) and len(heldout) == 5
    assert not any("other" in found for found in sources_in(np.concatenate([train, evaluation]), tokenizer))
    assert meta["documents"]["heldout"] == 12 and meta["heldout_sources"] == ["other"]
    # train rows come one source at a time, alternating while the smaller source lasts (equal weights)
    train_sources = [found.pop() for found in sources_in(train, tokenizer)]
    small_rows = train_sources.count("small")
    assert train_sources[: 2 * small_rows] == ["big", "small"] * small_rows
    assert set(train_sources[2 * small_rows:]) == {"big"} and meta["balanced_train_rows"] == 2 * small_rows
    assert meta["source_tokens"]["train"] == {"big": train_sources.count("big") * 32, "small": small_rows * 32}
    for split, rows in (("eval", evaluation), ("heldout", heldout)):
        assert sum(meta["source_tokens"][split].values()) == rows.size
    assert meta["source_weights"] == {"big": 1.0, "small": 1.0, "other": 1.0}
    # a weight shifts the train mixture; the same settings give the same rows
    heavy_cfg = cfg.model_copy(update={"source_weights": {"small": 2.0}})
    heavy = tokenize_corpus(heavy_cfg, docs, tokenizer, bos, tmp_path / "heavy")
    assert heavy["source_tokens"]["train"]["small"] == meta["source_tokens"]["train"]["small"]
    assert heavy["balanced_train_rows"] == small_rows + math.ceil(small_rows / 2)  # two small rows to a big one
    tokenize_corpus(cfg, docs, tokenizer, bos, tmp_path / "again")
    for split in ("train", "eval", "heldout"):
        assert np.array_equal(load_rows(tmp_path / "tokens", split), load_rows(tmp_path / "again", split))


def test_heldout_rows_sample_the_whole_source_in_a_seeded_order(tmp_path, tokenizer):
    bos = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    docs = sourced_documents({"big": 10, "other": 40})
    cfg = TokenizeConfig(context_size=32, eval_fraction=0.2, seed=7, heldout_sources=["other"], max_heldout_rows=6)
    tokenize_corpus(cfg, docs, tokenizer, bos, tmp_path / "tokens")
    text = tokenizer.decode(load_rows(tmp_path / "tokens", "heldout").ravel().tolist(), skip_special_tokens=True)
    numbers = {int(m) for m in re.findall(r"\{(\d{4})\}", text)}
    assert len(numbers) >= 3 and max(numbers) > 10  # documents from all over the source, not its first ones
    # seeded: the same seed draws the same rows in the same order, another seed other rows or another order
    tokenize_corpus(cfg, docs, tokenizer, bos, tmp_path / "same")
    assert np.array_equal(load_rows(tmp_path / "same", "heldout"), load_rows(tmp_path / "tokens", "heldout"))
    tokenize_corpus(cfg.model_copy(update={"seed": 8}), docs, tokenizer, bos, tmp_path / "other")
    assert not np.array_equal(load_rows(tmp_path / "other", "heldout"), load_rows(tmp_path / "tokens", "heldout"))


def test_split_sources_must_be_the_corpus_and_leave_one_to_train_on():
    sources = ["npm:sotu", "npm:brown"]
    check_split_sources(TokenizeConfig(heldout_sources=["npm:brown"], source_weights={"npm:sotu": 2.0}), sources)
    with pytest.raises(UserError, match=r"^params.yaml: bad value for 'tokenize.heldout_sources': 'npm:moby-dick' is "
                                        r"not a source of the corpus \(allowed: npm:sotu, npm:brown\)$"):
        check_split_sources(TokenizeConfig(heldout_sources=["npm:moby-dick"]), sources)
    with pytest.raises(UserError, match=r"'tokenize.source_weights': 'npm:x' is not a source of the corpus"):
        check_split_sources(TokenizeConfig(source_weights={"npm:x": 1.0}), sources)
    with pytest.raises(UserError, match=r"'tokenize.heldout_sources': must leave at least one corpus source"):
        check_split_sources(TokenizeConfig(heldout_sources=sources), sources)


@pytest.mark.parametrize("setting", [{"heldout_sources": ["x"]}, {"source_weights": {"x": 2.0}}])
def test_streamed_corpus_neither_holds_out_nor_mixes(tmp_path, tokenizer, setting):
    cfg = TokenizeConfig(context_size=16, eval_fraction=0.3, max_eval_rows=4, **setting)
    with pytest.raises(UserError, match=f"'tokenize.{next(iter(setting))}': a streamed corpus is read in source order"):
        tokenize_corpus(cfg, marked_documents(), tokenizer, 256, tmp_path / "tokens", streamed=True)
    assert not (tmp_path / "tokens").exists()


def test_a_corpus_without_heldout_sources_has_no_heldout_split(tmp_path, tokenizer):
    tokenize_corpus(TokenizeConfig(context_size=16, eval_fraction=0.3), marked_documents(), tokenizer, 256, tmp_path)
    with pytest.raises(UserError, match=r"no held-out split \(tokenize.heldout_sources was empty\)"):
        load_rows(tmp_path, "heldout")
