"""The step-indexed batch iterator.

Batches are addressed by *global sample index*: batch ``b`` of a stage reads samples
``[b * global_batch, (b + 1) * global_batch)`` of that stage's blended dataset, and
data-parallel rank ``r`` takes micro-batch slice ``k * mbs * dp + r * mbs``. The global batch is
therefore the same at every DP size, resuming needs nothing but the step number, and a skipped
batch is identified by its sample indices. With a batch-size ramp-up (``data/ramp.py``) batch
``b`` reads ``[ramp.first_sample(b), + ramp.size(b))`` with fewer micro-batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from orchestration.data.ramp import BatchRamp


@dataclass
class BatchLayout:
    micro_batch_size: int
    global_batch_size: int
    dp_size: int
    dp_rank: int
    ramp: BatchRamp | None = None  # training batches only; evaluation reads full batches

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per rank of a full-size batch."""
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def batch_size(self, batch: int) -> int:
        return self.ramp.size(batch) if self.ramp else self.global_batch_size

    def first_sample(self, batch: int) -> int:
        return self.ramp.first_sample(batch) if self.ramp else batch * self.global_batch_size

    def microbatches_in(self, batch: int) -> int:
        """Micro-batches per rank of ``batch`` (fewer during a ramp-up)."""
        return self.batch_size(batch) // (self.micro_batch_size * self.dp_size)

    def sample_indices(self, batch: int) -> np.ndarray:
        """This rank's sample indices for ``batch``, shaped [num_microbatches, micro_batch]."""
        mbs, dp = self.micro_batch_size, self.dp_size
        base = self.first_sample(batch)
        rows = base + np.arange(self.microbatches_in(batch))[:, None] * mbs * dp
        return rows + self.dp_rank * mbs + np.arange(mbs)[None, :]

    def global_indices(self, batch: int) -> np.ndarray:
        start = self.first_sample(batch)
        return np.arange(start, start + self.batch_size(batch))


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    keys = ("tokens", "labels", "loss_mask", "position_ids")
    return {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in keys}


def microbatches(dataset, layout: BatchLayout, batch: int) -> Iterator[dict[str, torch.Tensor]]:
    """The micro-batches this rank feeds to the schedule for ``batch`` (wrapping if needed)."""
    n = len(dataset)
    for row in layout.sample_indices(batch):
        yield collate([dataset[int(i) % n] for i in row])


def source_of_samples(dataset, indices: np.ndarray) -> list[tuple]:
    """(source, position in that source's stream) of a stage's sample indices, for the skip log
    (``orchestration/data/streams.py``); (dataset id, sample) for a plain Megatron blend."""
    if hasattr(dataset, "sources"):
        return [list(pair) for pair in dataset.sources(indices)]
    if hasattr(dataset, "dataset_index"):
        n = len(dataset)
        return [(int(dataset.dataset_index[i % n]), int(dataset.dataset_sample_index[i % n]))
                for i in indices]
    return [(0, int(i)) for i in indices]
