"""Checkpoint writes that do not stall training, through Megatron-Core's own async machinery.

Used by ``orchestration.checkpoint.save`` when ``checkpoint.async_save`` is on; the checkpoint
layout and the publish step (marker, rename from ``*.tmp``, pruning) are the synchronous ones.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue


class AsyncSaver:
    """Checkpoint writes that do not stall training, through Megatron's own async machinery.

    ``dist_checkpointing.save(..., async_sharded_save=True)`` plans the save, stages the shards
    in host memory (a device-to-host copy on GPUs) and returns an ``AsyncRequest`` whose write
    runs in a forked process (``AsyncCallsQueue``), as Megatron-LM's ``--async-save`` does. The
    loop calls :meth:`finalize` after every step: while a save is pending, one small all-reduce
    asks whether every rank's writer is done; when so, Megatron's finalizers write the global
    metadata and ``checkpoint._publish`` renames ``step_N.tmp`` to ``step_N``. Until then the
    previous checkpoint stays the newest complete one, so a crash mid-write costs only the
    unfinished save. At most one save is in flight: the caller finalizes the last one before
    scheduling the next.
    """

    def __init__(self) -> None:
        self.queue = AsyncCallsQueue()
        self.strategy = get_default_save_sharded_strategy()  # torch_dist: reused plans
        self.in_flight: list[Path] = []

    def schedule(self, state: dict, tmp: Path, final: Path, publish: Callable[[], None]) -> None:
        if self.in_flight:
            raise RuntimeError(f"{self.in_flight[0]} is still being written: finalize it first")
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
        done = len(self.queue.maybe_finalize_async_calls(blocking=blocking))
        finished, self.in_flight = self.in_flight[:done], self.in_flight[done:]
        return finished
