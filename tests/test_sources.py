"""Where data and models enter: corpus sources, pinned hashes, the hub check, layer bounds."""

from __future__ import annotations

import json
import re

import pytest

from attnsae.config import ActivationsConfig, CorpusConfig, ModelConfig
from attnsae.data.corpus import (
    brown_detag,
    build_corpus,
    doc_comments,
    factbook_profile,
    open_documents,
    open_sourced_documents,
    read_documents,
    synthetic_documents,
)
from attnsae.data.models import prepare_model
from attnsae.errors import UserError
from attnsae.files import check_sha256, sha256_file


def test_check_sha256_names_both_hashes(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"hello")
    check_sha256(path, sha256_file(path))
    with pytest.raises(UserError, match=r"x\.bin: sha256 2cf24dba.* does not match the pinned 0000"):
        check_sha256(path, "0" * 64)


def test_unknown_corpus_source_lists_the_allowed_ones(tmp_path):
    with pytest.raises(UserError, match=r"unknown corpus source 'npm:nope' \(allowed: npm:sotu, npm:moby-dick"):
        build_corpus(CorpusConfig(sources=["npm:nope"]), tmp_path / "corpus")
    assert not (tmp_path / "corpus").exists()


def test_local_files_become_documents(tmp_path):
    (tmp_path / "a.txt").write_text("First document.\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "Second."}) + "\n\n" + json.dumps({"text": "Third."}) + "\n")
    manifest = build_corpus(CorpusConfig(sources=[f"file:{tmp_path}/*"]), tmp_path / "corpus")
    assert manifest["documents"] == 3
    assert list(read_documents(tmp_path / "corpus")) == ["First document.", "Second.", "Third."]


def test_bad_jsonl_line_is_named(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: expected a JSON object with a 'text' field"):
        build_corpus(CorpusConfig(sources=[f"file:{tmp_path / 'bad.jsonl'}"]), tmp_path / "corpus")


def test_failed_corpus_keeps_the_previous_one(tmp_path):
    out = tmp_path / "corpus"
    build_corpus(CorpusConfig(sources=["synthetic"], synthetic_documents=3), out)
    before = (out / "documents.jsonl").read_bytes()
    with pytest.raises(UserError):
        build_corpus(CorpusConfig(sources=["file:/nonexistent/*.txt"]), out)
    assert (out / "documents.jsonl").read_bytes() == before


def test_streamed_corpus_stores_only_its_manifest_and_reads_the_same_documents(tmp_path):
    cfg = CorpusConfig(sources=["synthetic"], synthetic_documents=5, max_documents=4)
    stored = build_corpus(cfg, tmp_path / "stored")
    streamed = build_corpus(cfg, tmp_path / "streamed", stream=True)
    assert [p.name for p in (tmp_path / "streamed").iterdir()] == ["manifest.json"]
    assert streamed["streamed"] is True and stored["streamed"] is False
    documents = list(open_documents(tmp_path / "streamed")())
    assert documents == list(read_documents(tmp_path / "stored")) == list(open_documents(tmp_path / "stored")())
    assert len(documents) == 4


def test_hf_source_streams_a_local_dataset_folder_through_datasets(tmp_path):
    data = tmp_path / "owt"
    data.mkdir()
    rows = [{"text": f"  web page {i}  "} for i in range(7)] + [{"text": "   "}]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = build_corpus(CorpusConfig(sources=[f"hf:{data}"]), tmp_path / "corpus", stream=True)
    assert manifest["config"]["sources"] == [f"hf:{data}"]  # a local folder has no revision to pin
    assert list(open_documents(tmp_path / "corpus")()) == [f"web page {i}" for i in range(7)]


def test_streamed_hub_source_without_the_hub_fails_in_one_line(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"^corpus source hf:Skylion007/openwebtext needs the Hugging Face hub \(or a "
                                        r"mirror: HF_ENDPOINT\), which cannot be used \(HF_HUB_OFFLINE is set\)$"):
        build_corpus(CorpusConfig(sources=["hf:Skylion007/openwebtext"]), tmp_path / "corpus", stream=True)
    assert not (tmp_path / "corpus").exists()


def test_brown_detag():
    tagged = "\n\n\tThe/at jury/nn said/vbd ``/`` no/at ''/'' ,/, (/( ok/jj )/) ./.\n\n\n\tNext/ap ./.\n"
    assert brown_detag(tagged) == 'The jury said " no ", (ok).\n\nNext.'


def test_factbook_profile():
    profile = {
        "Introduction": {"Background": {"text": "  An island nation.  "}},
        "Geography": {"Area": {"total": {"text": "10 sq km"}, "land": {"text": "9 sq km"}},
                      "Climate": {"text": "tropical"}, "Note": {"text": None}},
        "Flags": {"Empty": {"text": "  "}},
    }
    assert factbook_profile(profile) == ("Introduction\nBackground: An island nation.\n\n"
                                         "Geography\nArea, total: 10 sq km\nArea, land: 9 sq km\nClimate: tropical")


def test_doc_comments_keep_the_prose_of_typescript_doc_comments():
    source = (
        "/**\n * The `node:path` module.\n *\n * ```js\n * import path from 'node:path';\n * ```\n"
        " * @since v0.1.16\n */\ndeclare module 'path' {\n    // a line comment\n"
        "    /** Join all arguments. */\n    function join(...paths: string[]): string;\n    /** @deprecated */\n}\n"
    )
    assert doc_comments(source) == ("The `node:path` module.\n\n```js\nimport path from 'node:path';\n```\n\n"
                                    "Join all arguments.")


def test_documents_keep_their_source(tmp_path):
    (tmp_path / "a.txt").write_text("From a file.\n")
    cfg = CorpusConfig(sources=[f"file:{tmp_path / 'a.txt'}", "synthetic"], synthetic_documents=2)
    build_corpus(cfg, tmp_path / "corpus")
    sources = [source for source, _ in open_sourced_documents(tmp_path / "corpus")()]
    assert sources == [f"file:{tmp_path / 'a.txt'}", "synthetic", "synthetic"]
    (tmp_path / "corpus" / "documents.jsonl").write_text('{"text": "no source"}\n')
    with pytest.raises(UserError, match=r"documents.jsonl:1: expected a JSON object with the fields 'source' and "
                                        r"'text' holding strings"):
        list(open_sourced_documents(tmp_path / "corpus")())


def test_synthetic_text_is_deterministic():
    assert list(synthetic_documents(5, 1)) == list(synthetic_documents(5, 1))
    assert list(synthetic_documents(5, 1)) != list(synthetic_documents(5, 2))


@pytest.mark.parametrize("source", ["gpt2", "hf:EleutherAI/pythia-70m", "hf:google/gemma-2-2b"])
def test_hub_models_without_hub_fail_in_one_line_and_write_nothing(tmp_path, monkeypatch, source):
    """The profiles on hub models pass the params check offline (their config.json ships with attnsae); the model
    stage, the first that needs the hub, stops in one line."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=rf"^model source {re.escape(source)} needs the Hugging Face hub \(or a mirror: "
                                        r"HF_ENDPOINT\), which cannot be used \(HF_HUB_OFFLINE is set\)$"):
        prepare_model(ModelConfig(source=source), tmp_path / "base")
    assert not (tmp_path / "base").exists()
    assert list(tmp_path.iterdir()) == []


def test_layer_outside_the_model_is_rejected(tmp_path, tiny_model_dir):
    from attnsae.config import TokenizeConfig
    from attnsae.data.activations import cache_activations
    from attnsae.data.models import load_tokenizer
    from attnsae.data.tokenization import tokenize_corpus
    from attnsae.formats.model_info import read_model_info

    model_dir = tiny_model_dir(seed=0)
    info = read_model_info(model_dir)
    docs = list(synthetic_documents(20, 0))
    tokenize_corpus(TokenizeConfig(context_size=32, eval_fraction=0.2), docs, load_tokenizer(model_dir),
                    info.bos_token_id, tmp_path / "tokens")
    with pytest.raises(UserError, match=r"layer 7 is outside the model .* \(allowed: 0 to 3\)"):
        cache_activations(ActivationsConfig(tokens=256), ModelConfig(source="tiny-gpt2"), model_dir,
                          tmp_path / "tokens", [1, 7], tmp_path / "acts")
    assert not (tmp_path / "acts").exists()


def test_context_longer_than_the_model_takes_is_one_line_before_anything_is_written(tmp_path, tiny_model_dir):
    from attnsae.config import TokenizeConfig
    from attnsae.data.tokenization import tokenize_stage

    build_corpus(CorpusConfig(sources=["synthetic"], synthetic_documents=5), tmp_path / "corpus")
    with pytest.raises(UserError) as err:
        tokenize_stage(TokenizeConfig(context_size=257), tmp_path / "corpus", tiny_model_dir(seed=0),
                       tmp_path / "tokens")
    assert str(err.value) == ("params.yaml: bad value for 'tokenize.context_size': tiny-gpt2 (random weights, seed 0) "
                              "takes at most 256 positions (allowed: 2 to 256, got 257)")
    assert not (tmp_path / "tokens").exists()


def test_atomic_outputs_get_the_usual_permissions(tmp_path):
    import os
    import stat

    from attnsae.files import atomic_dir, write_text_atomic

    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "report.md", "x")
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "a").write_text("y")
            os.close(os.open(tmp / "b", os.O_CREAT | os.O_WRONLY, 0o600))  # as safetensors writes its files
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "report.md").stat().st_mode) == 0o644  # mkstemp alone gives 0o600
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o755  # mkdtemp alone gives 0o700
    assert stat.S_IMODE((tmp_path / "folder" / "b").stat().st_mode) == 0o644


def test_gpt2_random_has_gpt2_small_shape_and_runs_offline(tmp_path):
    import torch

    from attnsae.data.activations import capture_z
    from attnsae.data.models import load_bridge
    from attnsae.formats.model_info import read_model_info

    info = prepare_model(ModelConfig(source="gpt2-random", seed=0), tmp_path / "base")
    assert (info.n_layers, info.n_heads, info.d_head, info.d_in) == (12, 12, 64, 768)
    assert read_model_info(tmp_path / "base") == info
    bridge, _ = load_bridge(tmp_path / "base", torch.device("cpu"))
    tokens = torch.tensor([[info.bos_token_id, 72, 101, 108, 108, 111]])
    z = capture_z(bridge, tokens, [0, 11])
    assert z[11].shape == (6, 768) and z[0].abs().sum() > 0
