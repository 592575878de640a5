"""Garbage collection at fixed steps on every rank (Megatron-LM's ``--manual-gc``)."""

from __future__ import annotations

import contextlib
import gc


@contextlib.contextmanager
def manual_gc(interval: int):
    """Python's cyclic garbage collector off, and ``collect(step)`` collecting every
    ``interval`` steps on every rank at the same step (Megatron-LM's ``--manual-gc``): an
    automatic collection stalls one rank at a random step and every collective waits for it.
    ``interval`` 0 leaves the automatic collector alone. The collector is restored after."""
    if interval <= 0:
        yield lambda step: None
        return
    was_enabled = gc.isenabled()
    gc.disable()
    gc.collect()

    def collect(step: int) -> None:
        if step % interval == 0:
            gc.collect()

    try:
        yield collect
    finally:
        if was_enabled:
            gc.enable()
