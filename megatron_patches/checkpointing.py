"""``megatron.core.dist_checkpointing`` for this project: the sharded state, sync and async saves.

``orchestration.checkpoint`` owns the layout on disk (``step_*`` directories, the ``*.tmp``
rename, pruning, fallback); this module owns what goes into the shards and how they are written.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

from megatron_patches import writer_queue
from megatron_patches.model import unwrap
from megatron_patches.optimizer_state import ensure_adam_state, restore_adam_steps

#: Distributed-optimizer state that reshards across data parallelism on load.
OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def model_chunks(model) -> list:
    """A model, or a list of model chunks (interleaved pipeline), as a list."""
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _model_keys(count: int) -> list[str]:
    """Megatron-LM's names: ``model`` for one chunk, ``model0``, ``model1``... for several.
    Tensors are matched by their global sharded keys (layer numbers include the chunk's
    offset), so a checkpoint saved with interleaving loads without it, and the reverse."""
    return ["model"] if count == 1 else [f"model{i}" for i in range(count)]


def sharded_state(model, optimizer, trainer_state: dict, is_loading: bool,
                  with_optimizer: bool = True) -> dict[str, Any]:
    chunks = model_chunks(model)
    state: dict[str, Any] = {  # keys without DDP's "module." prefix
        key: unwrap(chunk).sharded_state_dict()
        for key, chunk in zip(_model_keys(len(chunks)), chunks, strict=True)}
    if with_optimizer and optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            dict(state), is_loading=is_loading, metadata=OPTIM_METADATA)
    state["trainer"] = trainer_state
    return state


def save_sharded(model, optimizer, trainer_state: dict, directory: Path,
                 with_optimizer: bool) -> None:
    """Write this rank's shards (and, on rank 0, the common state) into ``directory``."""
    state = sharded_state(model, optimizer, trainer_state, False, with_optimizer)
    writer_queue.shield()  # a stop signal to the rank's process group must not end the save
    dist_checkpointing.save(state, str(directory))


def load_sharded(model, optimizer, directory: Path, with_optimizer: bool) -> dict[str, Any]:
    """Load model (+ optimizer) in place from ``directory``; return the saved trainer state."""
    if with_optimizer and optimizer is not None:
        ensure_adam_state(optimizer)
    template = sharded_state(model, optimizer, {}, True, with_optimizer)
    template.pop("trainer")
    state = dist_checkpointing.load(template, str(directory))
    chunks = model_chunks(model)
    with torch.no_grad():  # fp32 main params are views of the (grad-requiring) weights
        for key, chunk in zip(_model_keys(len(chunks)), chunks, strict=True):
            unwrap(chunk).load_state_dict(state[key])
        if with_optimizer and optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
            restore_adam_steps(optimizer, state["optimizer"])
    return load_common(directory).get("trainer", {})


def load_common(directory: Path) -> dict[str, Any]:
    """The non-sharded part of a checkpoint (the trainer state), without loading any tensor."""
    return dist_checkpointing.load_common_state_dict(str(directory))


def is_dist_checkpoint(directory: Path) -> bool:
    return bool(dist_checkpointing.check_is_distributed_checkpoint(str(directory)))


def save_weights_only(model, trainer_state: dict, directory: Path) -> None:
    """A weights-only checkpoint (averaging, import): no optimizer state."""
    writer_queue.shield()
    dist_checkpointing.save(sharded_state(model, None, trainer_state, False, False),
                            str(directory))


class AsyncSaver:
    """Checkpoint writes that do not stall training, through Megatron's own async machinery.

    ``dist_checkpointing.save(..., async_sharded_save=True)`` plans the save, stages the shards
    in host memory (a device-to-host copy on GPUs) and returns an ``AsyncRequest`` whose write
    runs in a forked process (``AsyncCallsQueue``), as Megatron-LM's ``--async-save`` does. The
    loop calls :meth:`finalize` after every step: while a save is pending, one small all-reduce
    asks whether every rank's writer is done; when so, Megatron's finalizers write the global
    metadata and the caller's ``publish`` renames ``step_N.tmp`` to ``step_N``. Until then the
    previous checkpoint stays the newest complete one, so a crash mid-write costs only the
    unfinished save. At most one save is in flight: the caller finalizes the last one before
    scheduling the next.
    """

    def __init__(self) -> None:
        self.queue = AsyncCallsQueue()
        self.strategy = get_default_save_sharded_strategy()  # torch_dist: reused plans
        self.in_flight: list[Path] = []

    def schedule(self, model, optimizer, trainer_state: dict, tmp: Path, final: Path,
                 with_optimizer: bool, publish: Callable[[], None]) -> None:
        if self.in_flight:
            raise RuntimeError(f"{self.in_flight[0]} is still being written: finalize it first")
        state = sharded_state(model, optimizer, trainer_state, False, with_optimizer)
        writer_queue.shield()
        request = dist_checkpointing.save(state, str(tmp), sharded_strategy=self.strategy,
                                          async_sharded_save=True)
        request.add_finalize_fn(publish)
        self.queue.schedule_async_request(request)
        self.in_flight.append(final)

    def finalize(self, blocking: bool) -> list[Path]:
        """Publish the saves every rank has finished writing (all of them with ``blocking``);
        returns their paths. Must be called on all ranks; free when nothing is pending."""
        if not self.in_flight:
            return []
        try:
            done = len(self.queue.maybe_finalize_async_calls(blocking=blocking))
        except BaseException:  # e.g. CheckpointException: a rank's write failed (full disk)
            self.in_flight.pop(0)  # Megatron has dropped the request; it will never publish
            raise
        finished, self.in_flight = self.in_flight[:done], self.in_flight[done:]
        return finished
