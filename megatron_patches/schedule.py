"""The step itself: Megatron's pipeline schedule over one global batch's micro-batches."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func


class ForwardBackward:
    """``get_forward_backward_func()`` (no pipelining, 1F1B or interleaved, as the parallel
    layout asks) bound to the model chunks; returns the loss-function reports of this rank.

    The interleaved schedule reads micro-batches from one iterator per model chunk, each in
    micro-batch order (Megatron-LM builds one data iterator per chunk); here they are copies
    of the one stream (``itertools.tee``), so every sample is read and collated once."""

    def __init__(self, model_chunks: list) -> None:
        self.model_chunks = model_chunks
        self._schedule = get_forward_backward_func()

    def __call__(self, forward_step: Callable, batches: Iterator[dict[str, torch.Tensor]],
                 num_microbatches: int, seq_length: int, micro_batch_size: int,
                 forward_only: bool) -> list[dict]:
        data: Iterator | list[Iterator] = batches
        if len(self.model_chunks) > 1:
            data = list(itertools.tee(batches, len(self.model_chunks)))
        return self._schedule(
            forward_step_func=forward_step, data_iterator=data, model=self.model_chunks,
            num_microbatches=num_microbatches, seq_length=seq_length,
            micro_batch_size=micro_batch_size, forward_only=forward_only)
