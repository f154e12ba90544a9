"""The family probes with tokenizers other than GPT-2's byte-level BPE (issue 22, item 3).

Two SentencePiece-style tokenizers, trained here with the `tokenizers` library on the probes' own words: Llama's
convention (a Metaspace pre-tokenizer that marks spaces with "▁" and adds one before the first word, BOS "<s>",
no <|endoftext|>) and Gemma's (spaces replaced by "▁" with no prefix added, BOS "<bos>"). Each probe prompt, built
piece by piece, must be exactly what the tokenizer makes of the prompt's text, so a name or a number in a probe is the
token the model sees in running text; and the document separator is the tokenizer's BOS.
"""

from __future__ import annotations

import itertools

import pytest

from attnsae.data.models import byte_level_tokenizer, document_separator
from attnsae.features.families import IOI_NAMES, IOI_TEMPLATES, ORDINAL_FORMS, ORDINAL_SEQUENCES, build_probes


def training_text() -> list[str]:
    """Sentences with every probe word, often enough that each becomes a token of its own."""
    lines = []
    for template, (a, b) in itertools.product(IOI_TEMPLATES, zip(IOI_NAMES, IOI_NAMES[1:] + IOI_NAMES[:1])):
        lines.append(template.format(A=" " + a, B=" " + b, S=" " + a))
    for items, (item_format, separator) in itertools.product(ORDINAL_SEQUENCES.values(), ORDINAL_FORMS):
        lines.append(separator.join(item_format.format(item) for item in items))
    return lines * 4


def sentencepiece_style(convention: str):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bos = {"llama": "<s>", "gemma": "<bos>"}[convention]
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    if convention == "llama":
        core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    else:
        core.normalizer = normalizers.Replace(" ", "▁")
        core.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
        core.decoder = decoders.Replace("▁", " ")
    trainer = trainers.BpeTrainer(vocab_size=3000, special_tokens=["<unk>", bos, "</s>"], show_progress=False)
    core.train_from_iterator(training_text(), trainer)
    core.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                        special_tokens=[(bos, core.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("convention", ["llama", "gemma"])
def test_probes_are_the_tokenizers_own_encoding_of_their_text(convention):
    tokenizer = sentencepiece_style(convention)
    separator = document_separator(tokenizer, convention)
    assert separator == tokenizer.bos_token_id  # no <|endoftext|>: documents start with BOS, as these models' do
    probes = {probe.tag: probe for probe in build_probes(tokenizer, separator, 10, seed=0)}
    assert all(probe.prompts > 0 for probe in probes.values()), {t: p.prompts for t, p in probes.items()}
    for tag in ("name_mover", "successor"):
        for row in probes[tag].rows:
            text = tokenizer.decode(row[1:])
            assert row == tokenizer(text)["input_ids"], (tag, text)  # the BOS the tokenizer adds, then the text
    for row, end, io in probes["name_mover"].targets:
        name = tokenizer.decode([probes["name_mover"].rows[row][io]]).strip()
        assert name in IOI_NAMES and end == len(probes["name_mover"].rows[row]) - 1


def test_byte_level_tokenizer_separates_documents_with_end_of_text():
    tokenizer = byte_level_tokenizer()
    assert document_separator(tokenizer, "byte-level") == tokenizer.convert_tokens_to_ids("<|endoftext|>")


def test_smollm2_probes_are_its_own_encodings_and_keep_the_natural_forms(smollm2_model_dir):
    """SmolLM2's byte-level BPE writes "Monday, Tuesday" as Monday , ĠTuesday: the unspaced word forms, built piece
    by piece as Monday , Ġ Tuesday, are dropped; the spaced ones and the digits (which it splits from spaces) stay."""
    from attnsae.data.models import load_tokenizer
    from attnsae.features.families import ordinal_runs

    tokenizer = load_tokenizer(smollm2_model_dir)
    separator = document_separator(tokenizer, "smollm2")
    probes = {probe.tag: probe for probe in build_probes(tokenizer, separator, 16, seed=0)}
    for tag in ("name_mover", "successor"):
        assert probes[tag].prompts > 0
        for row in probes[tag].rows:
            assert row[1:] == tokenizer.encode(tokenizer.decode(row[1:]), add_special_tokens=False), tag
    runs = [tokenizer.convert_ids_to_tokens(items[:2]) for items, _ in ordinal_runs(tokenizer)]
    assert ["ĠMonday", "ĠTuesday"] in runs and ["Monday", "Tuesday"] not in runs and ["0", "1"] in runs
