"""Where activations come from: hook_z of the pinned model, heads concatenated.

The stage reads ``models/base`` and ``data/tokens`` and writes ``data/activations/L<n>``; train@L reads it
back with ``DiskActivations``. Every path: layout.py.

- ``capture_z``: one bridge forward pass, hook_z of every requested layer, reshaped [batch*pos, heads*d_head]: the
  definition of hook_z that evaluate splices into, and that the stages' harvesting forward (harvest.py) equals.
- The `activations` stage (``cache_activations``): a bounded disk cache, bf16 shards per layer.
- ``DiskActivations``: reads a layer's cache back as an endless stream of rows (epochs).
- ``ShuffledBuffer``: the recipe's mixing buffer over any row stream: fill, shuffle, serve half,
  refill that half, reshuffle.

Training only sees the ``RowSource`` interface, so a streaming source (the model run on the fly)
can stand where the disk cache stands.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, NonNegativeInt, PositiveInt
from tqdm import tqdm

from attnsae import layout
from attnsae.config import ActivationsConfig, ModelConfig
from attnsae.data.harvest import HarvestingForward, load_harvesting_model
from attnsae.data.models import hook_z_name, resolve_device
from attnsae.data.tokenization import load_rows
from attnsae.errors import UserError
from attnsae.files import atomic_dir, read_json_as, read_safetensors, write_safetensors
from attnsae.formats.model_info import read_model_info
from attnsae.formats.tokens_meta import read_tokens_meta

STORE_DTYPE = torch.bfloat16
META_FILE = "meta.json"


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def flatten_heads(z: torch.Tensor) -> torch.Tensor:
    """[batch, pos, heads, d_head] -> [batch*pos, heads*d_head] (heads concatenated, as the paper does)."""
    b, p, h, d = z.shape
    return z.reshape(b * p, h * d)


def unflatten_heads(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.reshape(like.shape)


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.inference_mode()
def capture_z(bridge, tokens: torch.Tensor, layers: list[int],
              amp: torch.dtype | None = None) -> dict[int, torch.Tensor]:
    """hook_z of ``layers`` from one forward pass that stops after the last of them."""
    names = {hook_z_name(layer): layer for layer in layers}
    device = tokens.device
    with autocast(device, amp):
        _, cache = bridge.run_with_cache(
            tokens, names_filter=lambda name: name in names, stop_at_layer=max(layers) + 1, return_type=None
        )
    return {layer: flatten_heads(cache[name].float()) for name, layer in names.items()}


def cache_activations(
    cfg: ActivationsConfig,
    model_cfg: ModelConfig,
    model_dir: str | Path,
    tokens_dir: str | Path,
    layers: list[int],
    out_dir: str | Path,
) -> dict:
    info = read_model_info(model_dir)
    for layer in layers:
        info.check_layer(layer)
    rows = load_rows(tokens_dir, "train", vocab_size=info.vocab_size)
    dataset = read_tokens_meta(tokens_dir)["corpus"]  # read before the slow part, so a bad file fails first
    device = resolve_device(model_cfg.device)
    harvest = HarvestingForward(load_harvesting_model(model_dir, device), layers, model_cfg.precision)
    context = rows.shape[1]
    n_rows = min(len(rows), max(1, cfg.tokens // context))
    if cfg.tokens > len(rows) * context:
        print(f"activations: token budget {cfg.tokens} exceeds the train split; caching all {len(rows) * context}")
    shard_rows = max(1, cfg.shard_tokens // context)
    pending: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    counts = {layer: 0 for layer in layers}
    shard_index = 0
    with atomic_dir(out_dir) as tmp:
        for layer in layers:
            layout.activations_dir(layer, tmp).mkdir()

        def flush() -> None:
            nonlocal shard_index
            for layer in layers:
                shard = torch.cat(pending[layer]).to(STORE_DTYPE).contiguous()
                write_safetensors(layout.activations_dir(layer, tmp) / shard_name(shard_index), {"z": shard})
                counts[layer] += len(shard)
                pending[layer].clear()
            shard_index += 1

        rows_in_shard = 0
        # The same batching as the streaming source, so both give the same activations.
        supply = ArrayRows(rows[:n_rows], cycle=False)
        for _ in tqdm(range(-(-n_rows // cfg.batch_rows)), desc="activations", unit="batch"):
            batch = rows_as_tensor(supply.next_rows(cfg.batch_rows), device)
            for layer, z in harvest(batch).items():
                pending[layer].append(z.cpu())
            rows_in_shard += len(batch)
            if rows_in_shard >= shard_rows:
                flush()
                rows_in_shard = 0
        if rows_in_shard:
            flush()
        for layer in layers:
            meta = {
                "layer": layer,
                "hook_name": hook_z_name(layer),
                "d_in": info.d_in,
                "rows": counts[layer],
                "tokens_rows": n_rows,
                "context_size": context,
                "dtype": "bfloat16",
                "model": info.name,
                "model_source": info.source,
                "dataset": dataset,
                "shards": shard_index,
            }
            (layout.activations_dir(layer, tmp) / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return {"layers": layers, "rows": n_rows, "tokens": n_rows * context, "d_in": info.d_in}


class RowSource(Protocol):
    """An endless supply of activation rows [n, d_in] for one layer."""

    d_in: int

    def take(self, n: int) -> torch.Tensor: ...


class ActivationsMeta(BaseModel):
    """meta.json of a layer's activation cache (keys as ``cache_activations`` writes them)."""

    model_config = ConfigDict(extra="allow", strict=True)

    layer: NonNegativeInt
    hook_name: str
    d_in: PositiveInt
    rows: PositiveInt
    context_size: PositiveInt
    model: str
    model_source: str
    dataset: str
    shards: PositiveInt | None = None  # caches written before the count was recorded: the files found


def read_shards(folder: Path, meta: ActivationsMeta) -> torch.Tensor:
    """Every shard's rows in order; a missing, corrupt or misshapen shard is one line naming it."""
    n_shards = meta.shards or len(list(folder.glob("shard_*.safetensors")))
    parts = []
    for index in range(n_shards):
        path = folder / shard_name(index)
        if not path.is_file():
            raise UserError(f"{path}: missing shard ({n_shards} expected); run `attnsae activations` again")
        z = read_safetensors(path).get("z")
        if z is None or z.ndim != 2 or z.shape[1] != meta.d_in or not z.is_floating_point():
            got = "no tensor 'z'" if z is None else f"'z' {z.dtype} of shape {tuple(z.shape)}"
            raise UserError(f"{path}: expected a float tensor 'z' of shape [rows, {meta.d_in}], got {got}")
        parts.append(z)
    rows = torch.cat(parts) if parts else torch.zeros(0, meta.d_in, dtype=STORE_DTYPE)
    if len(rows) != meta.rows:
        raise UserError(f"{folder}: {len(rows)} rows in {n_shards} shards, {META_FILE} says {meta.rows}")
    return rows


class DiskActivations:
    """A layer's cached activations, served in stored order and cycled (each cycle is one epoch)."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        meta = read_json_as(folder / META_FILE, ActivationsMeta, written_by="activations")
        self.rows = read_shards(folder, meta)
        self.meta = meta.model_dump()
        self.d_in = meta.d_in
        self.position = 0
        self.epochs = 0

    def __len__(self) -> int:
        return len(self.rows)

    def state_dict(self) -> dict:
        return {"position": self.position, "epochs": self.epochs}

    def load_state_dict(self, state: dict) -> None:
        self.position, self.epochs = int(state["position"]), int(state["epochs"])

    def take(self, n: int) -> torch.Tensor:
        parts, need = [], n
        while need:
            chunk = self.rows[self.position : self.position + need]
            parts.append(chunk)
            need -= len(chunk)
            self.position += len(chunk)
            if self.position == len(self.rows):
                self.position = 0
                self.epochs += 1
        return torch.cat(parts)


class TokenRowSupply(Protocol):
    """Token rows for the model: ``next_rows`` gives up to n rows, fewer only at the end."""

    def next_rows(self, n: int) -> np.ndarray: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class ArrayRows:
    """Token rows held in memory, served in stored order; with ``cycle`` they repeat (epochs)."""

    def __init__(self, rows: np.ndarray, cycle: bool = True):
        self.rows, self.cycle, self.position = rows, cycle, 0

    def next_rows(self, n: int) -> np.ndarray:
        if self.cycle and self.position >= len(self.rows):
            self.position = 0
        out = self.rows[self.position : self.position + n]
        self.position += len(out)
        return out

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


class ModelStream:
    """Activations made on the fly: one model forward per batch of token rows (``harvest``, for its layers) feeds every
    layer.

    ``view(layer)`` is that layer's ``RowSource``. Rows produced for other layers wait in their
    queues until those layers ask; layers that draw the same amounts in turn (as SAEs trained in
    lockstep do) keep the queues short. Rows are rounded to bf16 like the disk cache, so both sources
    give the same numbers. ``state_dict`` holds the token position and the queued rows: a training
    checkpoint restores the stream exactly where it was.
    """

    def __init__(self, harvest: HarvestingForward, token_rows: TokenRowSupply, batch_rows: int, d_in: int,
                 device: torch.device):
        self.harvest, self.token_rows, self.batch_rows, self.layers = harvest, token_rows, batch_rows, harvest.layers
        self.d_in, self.device = d_in, device
        self.queues: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.layers}
        self.queued: dict[int, int] = {layer: 0 for layer in self.layers}
        self.taken: dict[int, int] = {layer: 0 for layer in self.layers}
        self.forward_passes = 0
        self.tokens = 0

    def _forward(self) -> None:
        rows = self.token_rows.next_rows(self.batch_rows)
        if len(rows) == 0:
            raise UserError(
                f"the token stream ran out after {self.tokens:,} tokens, before training finished; "
                "lower sae.train_tokens or add corpus sources"
            )
        tokens = rows_as_tensor(rows, self.device)
        for layer, z in self.harvest(tokens).items():
            self.queues[layer].append(z.to(STORE_DTYPE))  # stays on the device, where the SAE's buffer is
            self.queued[layer] += len(z)
        self.forward_passes += 1
        self.tokens += tokens.numel()

    def take(self, layer: int, n: int) -> torch.Tensor:
        while self.queued[layer] < n:
            self._forward()
        rows = torch.cat(self.queues[layer])
        self.queues[layer] = [rows[n:]] if len(rows) > n else []
        self.queued[layer] -= n
        self.taken[layer] += n
        return rows[:n]

    def view(self, layer: int) -> LayerView:
        return LayerView(self, layer)

    def state_dict(self) -> dict:
        return {
            "token_rows": self.token_rows.state_dict(),
            "queues": {str(layer): torch.cat(q).cpu() if q else torch.zeros(0, self.d_in, dtype=STORE_DTYPE)
                       for layer, q in self.queues.items()},
            "taken": {str(layer): n for layer, n in self.taken.items()},
            "forward_passes": self.forward_passes,
            "tokens": self.tokens,
        }

    def load_state_dict(self, state: dict) -> None:
        self.token_rows.load_state_dict(state["token_rows"])
        for layer in self.layers:
            queue = state["queues"][str(layer)].to(self.device)
            self.queues[layer] = [queue] if len(queue) else []
            self.queued[layer] = len(queue)
            self.taken[layer] = int(state["taken"][str(layer)])
        self.forward_passes, self.tokens = int(state["forward_passes"]), int(state["tokens"])


class LayerView:
    """One layer's ``RowSource`` over a shared ``ModelStream``."""

    def __init__(self, stream: ModelStream, layer: int):
        self.stream, self.layer, self.d_in = stream, layer, stream.d_in

    def take(self, n: int) -> torch.Tensor:
        return self.stream.take(self.layer, n)


class ShuffledBuffer:
    """The recipe's mixing buffer: serve shuffled batches from half the buffer, then refill that half.

    Rows stay in the source's dtype (bf16) in the buffer and become fp32 on the way out.
    """

    def __init__(self, source: RowSource, capacity: int, batch_size: int, generator: torch.Generator,
                 device: torch.device):
        if capacity // 2 < batch_size:
            raise UserError(f"sae.buffer_rows ({capacity}) must be at least twice sae.batch_size ({batch_size})")
        self.source, self.batch_size, self.generator, self.device = source, batch_size, generator, device
        self.half = capacity // 2
        self.buffer = to_device(source.take(2 * self.half), device)
        self.cursor: int | None = None  # next row to serve in the shuffled first half; None: not shuffled yet

    def next_batch(self) -> torch.Tensor:
        if self.cursor is None or self.cursor + self.batch_size > self.half:
            if self.cursor is not None:  # the served half is used up: refill it, then reshuffle everything
                self.buffer[: self.half] = to_device(self.source.take(self.half), self.device)
            perm = to_device(torch.randperm(len(self.buffer), generator=self.generator), self.device)
            self.buffer = self.buffer[perm]
            self.cursor = 0
        batch = self.buffer[self.cursor : self.cursor + self.batch_size].float()
        self.cursor += self.batch_size
        return batch

    def state_dict(self) -> dict:
        return {"buffer": self.buffer.cpu(), "cursor": -1 if self.cursor is None else self.cursor,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.buffer = state["buffer"].to(self.device)
        self.cursor = None if state["cursor"] < 0 else int(state["cursor"])
        self.generator.set_state(state["generator"])

    def sample(self, n: int) -> torch.Tensor:
        """``n`` fresh rows for resampling, drawn through the buffer like training batches."""
        parts, have = [], 0
        while have < n:
            batch = self.next_batch()
            parts.append(batch)
            have += len(batch)
        return torch.cat(parts)[:n]


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor goes to a GPU through pinned memory without the host waiting for the copy: a copy from
    pageable memory would wait for every kernel queued before it, and the GPU would idle while the host queues
    the next ones."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def rows_as_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return to_device(torch.from_numpy(array).long(), device)
