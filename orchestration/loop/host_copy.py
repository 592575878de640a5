"""Read a step's small device results on the host without a host-device sync of their own.

Why: the step needs the reduced [loss sum, tokens, stop vote] on the host (the skip decision,
the stop vote, the metrics), and ``.tolist()`` on the device tensor blocks the host until the
GPU has caught up: a second sync per step next to Megatron's own grad-norm ``.item()``, which
the bare Megatron loop has alone (docs/benchmarks.md, step overhead). Here the values are
copied into pinned host memory with ``non_blocking=True``, queued on the current stream, and
read after the grad-norm ``.item()`` has synchronised that stream, so the copy is already done:
the driver makes the bare loop's one sync per step. A CUDA event guards the read in case no
sync happened in between (then it waits, correctly, as ``.tolist()`` would have).
"""

from __future__ import annotations

import torch


class HostCopy:
    """A reusable host buffer for one small tensor of ``size`` elements."""

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device) -> None:
        pinned = device.type == "cuda"
        self._host = torch.empty(size, dtype=dtype, pin_memory=pinned)
        self._view = self._host.numpy()  # shares the buffer; reading it is plain host memory
        self._done: torch.cuda.Event | None = None

    def start(self, tensor: torch.Tensor) -> None:
        """Queue the copy of ``tensor`` (no host wait on a GPU; a plain copy on CPU)."""
        self._host.copy_(tensor, non_blocking=tensor.is_cuda)
        self._done = None
        if tensor.is_cuda:
            self._done = torch.cuda.Event()
            self._done.record()

    def values(self) -> list[float]:
        """The copied values, waiting for the copy only if no sync has completed it yet."""
        if self._done is not None and not self._done.query():
            self._done.synchronize()
        return self._view.tolist()
