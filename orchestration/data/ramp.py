"""Batch-size ramp-up: the global batch of each of a stage's batches, and where it starts.

Megatron-LM's ``--rampup-batch-size START INCREMENT SAMPLES`` grows the global batch from
START by INCREMENT every ``SAMPLES / ((GLOBAL - START) / INCREMENT)`` consumed samples, until
more than SAMPLES samples are consumed; from then on it is the stage's global batch. The size a
batch gets is decided by the samples consumed *before* it, exactly as Megatron-Core's
``RampupBatchsizeNumMicroBatchesCalculator.update`` decides it (same float arithmetic, same
``>``), and ``tests/test_batch_ramp.py`` checks the two agree step for step.

Here a ramp belongs to a stage and counts the samples consumed in that stage (the first stage's
ramp is Megatron's, which counts from the start of training). Batch ``b`` of a stage reads
samples ``[first_sample(b), first_sample(b) + size(b))``: a function of the batch position
alone, so resuming needs nothing but the step, and a reordered batch (a deferred window) keeps
its own samples and size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class BatchRamp:
    start: int
    increment: int
    ramp_samples: int
    global_batch_size: int  # the stage's batch once the ramp is over
    _sizes: np.ndarray = field(init=False, repr=False, compare=False)
    _offsets: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        problem = ramp_problem([self.start, self.increment, self.ramp_samples],
                               self.global_batch_size)
        if problem:
            raise ValueError(f"rampup_batch_size={[self.start, self.increment, self.ramp_samples]}"
                             f": {problem}")
        per_increment = self.ramp_samples / ((self.global_batch_size - self.start)
                                             // self.increment)
        sizes, consumed = [], 0
        while consumed <= self.ramp_samples:  # Megatron: full size once consumed > ramp
            size = self.start + int(consumed / per_increment) * self.increment
            sizes.append(size)
            consumed += size
        offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        object.__setattr__(self, "_sizes", np.asarray(sizes, dtype=np.int64))
        object.__setattr__(self, "_offsets", offsets)

    @property
    def ramp_batches(self) -> int:
        """How many batches the ramp sizes (the last of them may already be full size)."""
        return len(self._sizes)

    def size(self, batch: int) -> int:
        """Global batch size of the stage's 0-based batch ``batch``."""
        if batch < len(self._sizes):
            return int(self._sizes[batch])
        return self.global_batch_size

    def first_sample(self, batch: int) -> int:
        """Samples of the stage consumed before batch ``batch``."""
        if batch <= len(self._sizes):
            return int(self._offsets[batch])
        return int(self._offsets[-1]) + (batch - len(self._sizes)) * self.global_batch_size

    def batches_for(self, samples: int) -> int:
        """Fewest batches that consume at least ``samples`` samples."""
        ramped = int(self._offsets[-1])
        if samples <= ramped:
            return int(np.searchsorted(self._offsets, samples, side="left"))
        return len(self._sizes) + -(-(samples - ramped) // self.global_batch_size)


def ramp_problem(ramp: list[int], global_batch_size: int) -> str | None:
    """Why ``[start, increment, samples]`` can't ramp to ``global_batch_size`` (None if it can):
    Megatron's asserts, as one message."""
    if len(ramp) != 3:
        return "expected [start, increment, ramp_samples]"
    start, increment, samples = ramp
    if start <= 0 or increment <= 0 or samples <= 0:
        return "start, increment and ramp_samples must all be > 0"
    if start >= global_batch_size:
        return f"start {start} must be below the global batch size {global_batch_size}"
    if (global_batch_size - start) % increment:
        return (f"global batch size {global_batch_size} minus start {start} is not a multiple "
                f"of the increment {increment}")
    return None
