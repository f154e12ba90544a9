"""The stream pipeline's train stage over two processes (torch.distributed's elastic launcher, what torchrun runs),
on a CPU. Layers across ranks: each layer bit-identical to one process training them all; a rank killed mid-run
ends the job in one line naming it, and the same command resumes every rank to the same weights. Data parallel
(gloo): one layer over two processes matches one process with the same batch within float tolerance."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from attnsae.config import CorpusConfig, TokenizeConfig
from attnsae.data.corpus import build_corpus, open_documents
from attnsae.data.models import load_tokenizer
from attnsae.data.tokenization import tokenize_corpus
from attnsae.errors import UserError
from attnsae.formats.model_info import read_model_info
from attnsae.launcher import Worker, how_it_ended, layers_of_rank, share_of
from attnsae.sae.autoencoder import load_sae
from helpers import TINY_PROFILE

pytestmark = pytest.mark.integration

LAYERS = [1, 2]
STEPS = 150  # past a resample (step 50) and several checkpoints (every 20)
SAE = {"d_sae": 128, "batch_size": 256, "train_tokens": 256 * STEPS, "buffer_rows": 1024, "warmup_steps": 5,
       "resample_every": 50, "dead_window": 10, "max_resamples": 1, "resample_inputs": 512, "log_every": 10}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model, a streamed synthetic corpus (its manifest) and its eval tokens, side by side."""
    root = tmp_path_factory.mktemp("distributed")
    shutil.copytree(tiny_model_dir(seed=0), root / "model")
    info = read_model_info(root / "model")
    build_corpus(CorpusConfig(sources=["synthetic"], synthetic_documents=3000, seed=3), root / "corpus", stream=True)
    tokenize_corpus(TokenizeConfig(context_size=32, eval_fraction=0.1, max_eval_rows=4),
                    open_documents(root / "corpus"), load_tokenizer(root / "model"), info.bos_token_id,
                    root / "tokens", streamed=True)
    return root


def workspace(inputs: Path, folder: Path, nproc: int, layers: list[int] = LAYERS, **sae) -> Path:
    params = yaml.safe_load(TINY_PROFILE.read_text())
    params["sae"].update(SAE, device="cpu", **sae)
    params["layers"] = layers
    params["activations"]["source"] = "stream"
    params["model"]["device"] = "cpu"
    params["distributed"] = {"nproc_per_node": nproc}
    folder.mkdir()
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return folder


def train_command(inputs: Path) -> list[str]:
    return [sys.executable, "-m", "attnsae", "train", "--stream", "--all-layers", "--no-mlflow", "--checkpoint-every",
            "20", "--model", str(inputs / "model"), "--corpus", str(inputs / "corpus"),
            "--tokens", str(inputs / "tokens")]


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def weights(folder: Path, layers: list[int] = LAYERS) -> dict[int, dict[str, torch.Tensor]]:
    return {n: load_sae(folder / "models" / "sae" / f"L{n}")[0].state_dict() for n in layers}


def assert_same(a: dict, b: dict) -> None:
    for n in LAYERS:
        for name, tensor in a[n].items():
            assert torch.equal(tensor, b[n][name]), (n, name)


@pytest.fixture(scope="module")
def single(inputs, tmp_path_factory) -> Path:
    folder = workspace(inputs, tmp_path_factory.mktemp("single") / "w", nproc=1)
    result = subprocess.run(train_command(inputs), cwd=folder, env=environment(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fed 2 SAEs" in result.stdout
    return folder


def test_two_ranks_train_one_layer_each_bit_identical_to_one_process(inputs, single, tmp_path):
    """... and log to one MLflow store: one parent run, a child per layer from the rank that trains it."""
    from attnsae.reporting import tracking

    folder = workspace(inputs, tmp_path / "w", nproc=2)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.open_store(store)  # `attnsae mlflow-init`: the store's tables exist before two writers start
    command = [part for part in train_command(inputs) if part != "--no-mlflow"]
    result = subprocess.run(command, cwd=folder, env={**environment(), "MLFLOW_TRACKING_URI": store},
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("fed 1 SAEs") == 2  # each rank its own forward, for its own layer
    assert_same(weights(single), weights(folder))
    for n in LAYERS:
        assert (folder / "reports" / "curves" / f"L{n}.csv").read_text() == \
               (single / "reports" / "curves" / f"L{n}.csv").read_text()
    assert not list((folder / "checkpoints").glob("*.pt"))  # each rank drops its checkpoint when done

    client, experiment_id = tracking.open_store(store)
    runs = client.search_runs([experiment_id])
    parents = [r for r in runs if r.data.tags[tracking.LAYER_TAG] == "none"]
    children = {r.data.tags[tracking.LAYER_TAG]: r for r in runs if r.data.tags[tracking.LAYER_TAG] != "none"}
    assert len(parents) == 1 and sorted(children) == ["1", "2"]
    for child in children.values():
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert child.info.status == "FINISHED"


def test_torchrun_as_the_readme_runs_it_on_several_machines(inputs, single, tmp_path):
    """`torchrun ... -m attnsae train --stream --all-layers` (here one machine of two processes): each worker sees
    that torchrun started it and trains its rank's layer; params.yaml's nproc_per_node (1 here) is not used."""
    folder = workspace(inputs, tmp_path / "w", nproc=1)
    torchrun = Path(sys.executable).parent / "torchrun"
    command = [str(torchrun), "--nnodes", "1", "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint",
               "localhost:0", "--rdzv-id", "attnsae-test", "-m", *train_command(inputs)[2:]]
    result = subprocess.run(command, cwd=folder, env=environment(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("fed 1 SAEs") == 2
    assert_same(weights(single), weights(folder))


def rank_process(launcher: psutil.Process, rank: int) -> psutil.Process | None:
    for child in launcher.children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "attnsae" in " ".join(child.cmdline()):
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def test_a_killed_rank_ends_the_job_in_one_line_and_the_rerun_resumes_bit_identically(inputs, single, tmp_path):
    folder = workspace(inputs, tmp_path / "w", nproc=2)
    launcher = subprocess.Popen(train_command(inputs), cwd=folder, env=environment(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    checkpoint = folder / "checkpoints" / "train-L2.pt"  # rank 1's (layer 2)
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    victim = rank_process(psutil.Process(launcher.pid), 1)
    assert victim is not None, "rank 1 not found"
    victim.send_signal(signal.SIGSTOP)  # frozen between two steps, past its first checkpoint
    victim.send_signal(signal.SIGKILL)
    _, stderr = launcher.communicate(timeout=300)
    assert launcher.returncode != 0
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("Error: train: rank 1 of 2 (layer 2) was killed by SIGKILL; the other ranks were stopped")
    assert not (folder / "models" / "sae" / "L2").exists()
    rerun = subprocess.run(train_command(inputs), cwd=folder, env=environment(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from checkpoints/train-L2.pt" in rerun.stdout
    assert_same(weights(single), weights(folder))


def test_two_ranks_share_one_layers_batches_as_one_process_within_float_tolerance(inputs, tmp_path):
    """Data parallel: two processes for one layer, each with half of every batch of 256; the gradients averaged.
    No resampling here: its draws weigh inputs by their error, and float noise could move one draw."""
    runs = {}
    for nproc in (1, 2):
        folder = workspace(inputs, tmp_path / f"n{nproc}", nproc=nproc, layers=[2], max_resamples=0)
        result = subprocess.run(train_command(inputs), cwd=folder, env=environment(), capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[nproc] = folder
    one, two = weights(runs[1], [2])[2], weights(runs[2], [2])[2]
    for name, tensor in one.items():
        torch.testing.assert_close(two[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    assert not (runs[2] / "checkpoints" / "train-L2.pt").exists()
    curves = [(runs[n] / "reports" / "curves" / "L2.csv").read_text().splitlines() for n in (1, 2)]
    assert len(curves[0]) == len(curves[1]) and curves[0][0] == curves[1][0]


def test_layers_are_dealt_to_ranks_in_turn():
    assert layers_of_rank([0, 1, 2, 3, 4], 0, 2) == [0, 2, 4] and layers_of_rank([0, 1, 2, 3, 4], 1, 2) == [1, 3]
    assert [layers_of_rank([1, 2], rank, 4) for rank in range(4)] == [[1], [2], [1], [2]]  # data parallel
    with pytest.raises(UserError, match="3 processes for 2 layers: with more processes than layers, use a multiple"):
        share_of([1, 2], Worker(rank=0, world_size=3, local_rank=0))


def test_how_a_worker_ended_is_said_in_words():
    assert how_it_ended(-9) == "was killed by SIGKILL"
    assert how_it_ended(1) == "exited with status 1 (its error is above)"
