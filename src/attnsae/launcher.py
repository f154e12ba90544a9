"""The stream pipeline's train stage spread over processes and machines, as torchrun runs them.

Layers across ranks (W <= layers): rank r of a job of W processes trains ``layers[r::W]`` of the selected layers,
each rank from its own model forward over the same pinned token stream. Nothing passes between the ranks: a
layer's SAE depends only on its settings and the stream, so each layer comes out as a single process trains it (on
a CPU bit for bit, tests/test_distributed.py), and the rank that owns a layer writes its SAE folder, curves,
checkpoint and MLflow run.

Data parallel (W > layers, a multiple of them): each layer gets W / layers ranks (``Shard``). Every rank of a layer
fills the same buffer from the same stream (the model forward is repeated, not split), takes its own equal slice
of each batch (``sae.sharding``; the recipe's batch stays the effective batch), and the gradients are averaged over
the slices before the decoder projection and Adam, so all ranks keep the same weights; firing counts, AuxK's dead
features and BatchTopK's threshold are reduced over the slices. What changes numerically: float summation order (the
gradient is a mean of slice means); AuxK divides by each slice's residual variance rather than the batch's;
BatchTopK keeps the top k x slice rows of each slice rather than of the whole batch; the logged curves are means of
the slices' values. The rank with slice 0 writes the layer's files.

One machine: ``distributed.nproc_per_node`` > 1 makes `attnsae train --stream` start the workers itself
(``launch_workers``: torch.distributed's elastic launcher, the one torchrun runs). Several machines: torchrun on
each one (docs/gpu.md: "Several GPUs and machines"), which sets the environment that ``this_worker`` reads.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import uuid
from dataclasses import dataclass

import torch

from attnsae.errors import UserError
from attnsae.sae.sharding import WHOLE_BATCH, Shard


@dataclass(frozen=True)
class Worker:
    """This process's place in a torchrun job."""

    rank: int
    world_size: int
    local_rank: int


def this_worker() -> Worker | None:
    """From the environment torchrun (or ``launch_workers``) gives each worker; None outside a job."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return Worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))


def starts_workers(stream: bool, nproc: int) -> bool:
    """Whether this `train` should start ``nproc`` workers itself: streaming, several asked for, and not already a
    worker of a job."""
    return stream and nproc > 1 and this_worker() is None


def this_process_share(layers: list[int], stream: bool) -> tuple[list[int], Shard]:
    """The layers this process trains and its part of their batches: all of them, whole, outside a torchrun job;
    inside one, its rank's share (on its own GPU)."""
    worker = this_worker()
    if worker is None:
        return layers, WHOLE_BATCH
    if not stream:
        raise UserError("torchrun spreads only `attnsae train --stream` over processes (the stream pipeline)")
    bind_device(worker)
    return share_of(layers, worker)


def share_of(layers: list[int], worker: Worker) -> tuple[list[int], Shard]:
    """The layers this worker trains and its part of their batches: whole layers while there are at least as many
    layers as processes, otherwise one layer's slice of each batch (starting torch.distributed: NCCL on GPUs,
    gloo on CPUs)."""
    if worker.world_size <= len(layers):
        return layers_of_rank(layers, worker.rank, worker.world_size), WHOLE_BATCH
    if worker.world_size % len(layers):
        raise UserError(f"{worker.world_size} processes for {len(layers)} layers: with more processes than layers, "
                        f"use a multiple of {len(layers)} (each layer gets the same number of processes)")
    import torch.distributed as dist

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    per_layer = worker.world_size // len(layers)
    groups = [dist.new_group([n + len(layers) * j for j in range(per_layer)]) for n in range(len(layers))]
    mine = layers_of_rank(layers, worker.rank, worker.world_size)  # rank r: layer r mod len(layers)
    return mine, Shard(worker.rank // len(layers), per_layer, groups[worker.rank % len(layers)])


def layers_of_rank(layers: list[int], rank: int, world_size: int) -> list[int]:
    """The layers rank ``rank`` trains when each trains whole layers: every ``world_size``-th, from its own."""
    return layers[rank::world_size] if world_size <= len(layers) else [layers[rank % len(layers)]]


def bind_device(worker: Worker) -> None:
    """One GPU per process on its machine: 'cuda' then means this worker's GPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(worker.local_rank % torch.cuda.device_count())


def launch_workers(nproc: int, argv: list[str], layers: list[int]) -> None:
    """Run `python -m attnsae ARGV` in ``nproc`` workers on this machine and wait for all of them. A worker that
    fails stops the others (they get SIGTERM: each saves a checkpoint at the end of its step) and ends this with
    one line naming its rank and layers."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"attnsae-{uuid.uuid4().hex[:12]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the line below says it once
    try:
        elastic_launch(config, sys.executable)("-m", "attnsae", *argv)
    except ChildFailedError as err:
        # a rank stopped mid-update leaves its progress bar's line unended on the shared stderr: the error starts anew
        sys.stderr.write("\n")
        rank, failure = err.get_first_failure()
        owned = ", ".join(str(n) for n in layers_of_rank(layers, rank, nproc))
        raise UserError(f"train: rank {rank} of {nproc} (layer {owned}) {how_it_ended(failure.exitcode)}; the other "
                        f"ranks were stopped. Run the same command (or `dvc repro`) to resume every rank from its "
                        f"last checkpoint") from None


def how_it_ended(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with status {exitcode} (its error is above)"
