"""Several SAEs from one model pass: the streaming source against the disk cache, bit for bit."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from attnsae import layout
from attnsae.cli import main
from attnsae.config import ActivationsConfig, CorpusConfig, ModelConfig, SAEConfig, TokenizeConfig
from attnsae.data.activations import ArrayRows, DiskActivations, ModelStream, cache_activations
from attnsae.data.corpus import build_corpus, open_documents, synthetic_documents
from attnsae.data.harvest import HarvestingForward, load_harvesting_model
from attnsae.data.models import load_tokenizer
from attnsae.data.tokenization import is_eval_document, load_rows, pack_rows, tokenize_corpus, train_row_stream
from attnsae.errors import UserError
from attnsae.formats.model_info import read_model_info
from attnsae.formats.tokens_meta import read_tokens_meta
from attnsae.sae.autoencoder import load_sae
from attnsae.sae.training import train_sae, train_saes

LAYERS = [1, 2]
BATCH_ROWS = 8
CACHE_TOKENS = 64 * 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("stream")
    shutil.copytree(tiny_model_dir(seed=0), root / "model")  # the stages' outputs side by side, as in a workspace
    info = read_model_info(root / "model")
    docs = list(synthetic_documents(60, 3))
    tokenize_corpus(TokenizeConfig(context_size=32, eval_fraction=0.1), docs, load_tokenizer(root / "model"),
                    info.bos_token_id, root / "tokens")
    cache_activations(ActivationsConfig(tokens=CACHE_TOKENS, batch_rows=BATCH_ROWS, shard_tokens=512),
                      ModelConfig(source="tiny-gpt2"), root / "model", root / "tokens", LAYERS, root / "acts")
    # A streamed corpus: only its manifest is stored; tokenize keeps the eval rows, training reads the rest.
    build_corpus(CorpusConfig(sources=["synthetic"], synthetic_documents=400, seed=3), root / "corpus", stream=True)
    tokenize_corpus(TokenizeConfig(context_size=32, eval_fraction=0.1, max_eval_rows=4),
                    open_documents(root / "corpus"), load_tokenizer(root / "model"), info.bos_token_id,
                    root / "stream-tokens", streamed=True)
    return root, info


def sae_cfg(l1: float) -> SAEConfig:
    return SAEConfig(d_sae=96, l1_coeff=l1, batch_size=256, train_tokens=256 * 40, warmup_steps=5,
                     resample_every=20, dead_window=10, max_resamples=1, resample_inputs=512, buffer_rows=1024,
                     log_every=5, device="cpu")


def test_one_pass_for_all_layers_equals_training_each_layer_from_the_cache(setup):
    root, info = setup
    cfgs = {1: sae_cfg(0.01), 2: sae_cfg(0.02)}
    alone = {n: train_sae(cfgs[n], DiskActivations(layout.activations_dir(n, root / "acts")), progress=False)
             for n in LAYERS}

    harvest = HarvestingForward(load_harvesting_model(root / "model", torch.device("cpu")), LAYERS)
    rows = load_rows(root / "tokens", "train")[: CACHE_TOKENS // 32]
    stream = ModelStream(harvest, ArrayRows(rows), BATCH_ROWS, info.d_in, torch.device("cpu"))
    together = train_saes(cfgs, {n: stream.view(n) for n in LAYERS}, progress=False)

    for n in LAYERS:
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            assert torch.equal(getattr(alone[n].sae, name), getattr(together[n].sae, name)), (n, name)
        assert alone[n].resampled == together[n].resampled
    # One forward served both layers: the stream made only as many rows as one layer used.
    assert stream.taken[1] == stream.taken[2] > 0
    assert stream.tokens == stream.taken[1] + stream.queued[1]
    assert any(n for _, n in together[1].resampled), "the comparison should cover a resample"


def test_layers_trained_together_must_share_the_schedule(setup):
    root, info = setup
    a, b = sae_cfg(0.01), sae_cfg(0.01).model_copy(update={"train_tokens": 256 * 50})
    sources = {n: DiskActivations(layout.activations_dir(n, root / "acts")) for n in LAYERS}
    with pytest.raises(UserError, match="layer 2 differs"):
        train_saes({1: a, 2: b}, sources, progress=False)


def test_stream_that_runs_out_says_so(setup):
    root, info = setup
    harvest = HarvestingForward(load_harvesting_model(root / "model", torch.device("cpu")), [1])
    rows = load_rows(root / "tokens", "train")[:4]
    stream = ModelStream(harvest, ArrayRows(rows, cycle=False), 4, info.d_in, torch.device("cpu"))
    stream.take(1, 4 * 32)
    with pytest.raises(UserError, match="token stream ran out"):
        stream.take(1, 1)


class Killed(Exception):
    pass


def streamed_sources(root, info, model):
    rows = train_row_stream(open_documents(root / "corpus"), read_tokens_meta(root / "stream-tokens"),
                            load_tokenizer(root / "model"))
    stream = ModelStream(HarvestingForward(model, LAYERS), rows, BATCH_ROWS, info.d_in, torch.device("cpu"))
    return stream, {n: stream.view(n) for n in LAYERS}


def test_streamed_run_killed_and_resumed_is_bit_identical(setup, tmp_path):
    root, info = setup
    model = load_harvesting_model(root / "model", torch.device("cpu"))
    cfgs = {1: sae_cfg(0.01), 2: sae_cfg(0.02)}
    stream, views = streamed_sources(root, info, model)
    straight = train_saes(cfgs, views, progress=False, shared=stream)
    assert stream.tokens > 0 and any(n for _, n in straight[1].resampled)

    def kill_at_27(step: int) -> None:  # after the resample at step 20, mid-way through a refill
        if step == 27:
            raise Killed

    ckpt = tmp_path / "train.pt"
    stream, views = streamed_sources(root, info, model)
    with pytest.raises(Killed):
        train_saes(cfgs, views, progress=False, shared=stream, checkpoint=ckpt, checkpoint_every=6, on_step=kill_at_27)
    saved = torch.load(ckpt, weights_only=True)
    assert saved["step"] == 24 and saved["shared"]["token_rows"]["documents_read"] > 0

    stream, views = streamed_sources(root, info, model)  # a new process: the documents are read from the start
    steps_run = []
    resumed = train_saes(cfgs, views, progress=False, shared=stream, checkpoint=ckpt, checkpoint_every=6,
                         on_step=steps_run.append)
    assert steps_run[0] == 24
    for n in LAYERS:
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            assert torch.equal(getattr(straight[n].sae, name), getattr(resumed[n].sae, name)), (n, name)
        assert straight[n].curves == resumed[n].curves and straight[n].resampled == resumed[n].resampled


def test_streamed_training_reads_exactly_the_train_documents(setup):
    root, info = setup
    tokenizer = load_tokenizer(root / "model")
    meta = read_tokens_meta(root / "stream-tokens")
    docs = list(synthetic_documents(400, 3))
    train_docs = [d for d in docs if not is_eval_document(d, meta["eval_fraction"], meta["split_seed"])]
    assert 0 < len(train_docs) < len(docs)
    expected = pack_rows((tokenizer(d, add_special_tokens=False)["input_ids"] for d in train_docs),
                         info.bos_token_id, meta["context_size"])
    rows = train_row_stream(open_documents(root / "corpus"), meta, tokenizer).all_rows()
    assert np.array_equal(rows, expected)


@pytest.fixture()
def in_tiny_workspace(tiny_params_file, monkeypatch):
    """The working folder is a fresh one holding the tiny profile as params.yaml."""
    monkeypatch.chdir(tiny_params_file.parent)
    return tiny_params_file.parent


def test_cli_trains_several_layers_from_one_pass(setup, in_tiny_workspace):
    root, _ = setup
    tmp_path = in_tiny_workspace
    args = ["train", "--layer", "1", "--layer", "L2", "--stream", "--no-mlflow", "--model", str(root / "model"),
            "--corpus", str(root / "corpus"), "--tokens", str(root / "stream-tokens")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "fed 2 SAEs" in result.output
    for n in LAYERS:
        sae, cfg = load_sae(tmp_path / "models" / "sae" / f"L{n}")
        assert cfg["hook_name"] == f"blocks.{n}.attn.hook_z" and sae.d_sae == 256


@pytest.mark.parametrize(
    "args, message",
    [
        (["--layer", "1", "--layer", "2"], "several --layer values share one model pass only with --stream"),
        (["--layer", "1", "--layer", "L1", "--stream"], "--layer lists a layer twice"),
        (["--layer", "1", "--layer", "2", "--stream", "--out", "x"], "--out and --curves name one layer's files"),
    ],
)
def test_cli_rejects_bad_layer_combinations(in_tiny_workspace, args, message):
    result = CliRunner().invoke(main, ["train", *args, "--no-mlflow"])
    assert result.exit_code != 0
    assert message in result.output and len(result.output.strip().splitlines()) == 1
