"""One SAE's batches split over processes: what the training maths needs to know of data parallelism.

The objectives and the training loop take a ``Shard`` and call its reductions; with ``WHOLE_BATCH`` (one process)
each is the identity. Starting and placing the processes is the launcher's business (launcher.py), so the
training code, and the stages that run it, do not depend on how workers start.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shard:
    """This process's part of every batch of one SAE trained data-parallel by ``count`` processes (``group``); the
    default, ``WHOLE_BATCH``, is one process with the whole batch, where every reduction is the identity."""

    index: int = 0
    count: int = 1
    group: object | None = None

    @property
    def owner(self) -> bool:
        """Whether this process writes the layer's files (SAE folder, curves, checkpoint, MLflow run)."""
        return self.index == 0

    def rows(self, batch: torch.Tensor) -> torch.Tensor:
        size = len(batch) // self.count
        return batch if self.count == 1 else batch[self.index * size : (self.index + 1) * size]

    def reduce(self, values: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """``values`` reduced (sum, max or min) over the shards, in place."""
        if self.count > 1:
            import torch.distributed as dist

            ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
            dist.all_reduce(values, op=ops[op], group=self.group)
        return values

    def average_gradients(self, parameters) -> None:
        """Each gradient becomes the mean over the shards (one all-reduce of all of them)."""
        if self.count == 1:
            return
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        grads = [p.grad for p in parameters if p.grad is not None]
        flat = self.reduce(_flatten_dense_tensors(grads)).div_(self.count)
        for grad, averaged in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(averaged)


WHOLE_BATCH = Shard()
