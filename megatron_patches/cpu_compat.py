"""Run Megatron-Core on a CPU-only machine (gloo backend), for tests and the built-in demo.

Why this module exists: Megatron-Core is written for CUDA and hard-codes it in places that have
no extension point. Measured on megatron-core 0.16.1 with torch 2.13.0 (CPU build):

- RoPE moves its frequencies with ``.to(torch.cuda.current_device())``; the default causal mask
  and the pipeline schedule allocate with ``device="cuda"`` / ``torch.cuda.current_device()``.
- p2p communication and checkpoint saving call ``torch.cuda.synchronize``; DDP (0.17+) calls
  ``torch.cuda.current_stream``.
- The RNG tracker and activation recompute save/restore the CUDA RNG state.
- The optimizer and grad clipping assert ``tensor.type() == 'torch.cuda.FloatTensor'``.

The fix is one ``TorchFunctionMode`` that rewrites CUDA device arguments to CPU and reports
``torch.cuda.*`` type strings, plus stubs for the few ``torch.cuda`` functions Megatron calls
directly and for its RNG-state helpers. :func:`enable` applies all of it, once, and only when
CUDA is absent (or when forced); on a GPU machine nothing here is touched. Each upstream
symbol we replace is listed in :data:`PATCHED_SYMBOLS`, and ``tests/test_cpu_compat.py``
fails when one of them moves.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

#: (module path, attribute) pairs that :func:`enable` replaces. Tested to exist upstream.
PATCHED_SYMBOLS: tuple[tuple[str, str], ...] = (
    ("torch.cuda", "current_device"),
    ("torch.cuda", "synchronize"),
    ("torch.cuda", "current_stream"),
    ("torch.cuda", "get_rng_state"),
    ("torch.cuda", "set_rng_state"),
    ("torch.cuda", "manual_seed"),
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state"),
    ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state"),
)

_CUDA_TYPE_PREFIX = "torch.cuda."
_mode: _CudaToCpuMode | None = None


def _is_cuda_device(device: Any) -> bool:
    """True for every way Megatron names a CUDA device: 'cuda', 'cuda:0', torch.device, int."""
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # An int is a CUDA ordinal (e.g. from torch.cuda.current_device()); bool is not a device.
    return isinstance(device, int) and not isinstance(device, bool)


def _cpu_if_cuda(value: Any) -> Any:
    return torch.device("cpu") if _is_cuda_device(value) else value


def _run_backward(tensors: Any, grad_tensors: Any = None, retain_graph: bool | None = None,
                  create_graph: bool = False, inputs: Any = None) -> None:
    """``torch.autograd.backward`` without its ``__torch_function__`` dispatch.

    The mode is popped while its own handler runs; calling ``torch.autograd.backward`` from the
    handler would dispatch straight back into it. Running the engine directly, with the mode
    pushed again, keeps the shim active for Megatron's custom autograd functions' backward.
    """
    tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
    grads = torch.autograd._tensor_or_tensors_to_tuple(grad_tensors, len(tensors))
    grads = torch.autograd._make_grads(tensors, grads, is_grads_batched=False)
    inputs = () if inputs is None else (
        (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs))
    retain = create_graph if retain_graph is None else retain_graph
    torch.autograd.graph._engine_run_backward(
        tensors, grads, retain, create_graph, inputs,
        allow_unreachable=True, accumulate_grad=True)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placement to CPU for every torch call made while it is active."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _cpu_if_cuda(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple(_cpu_if_cuda(a) if i > 0 and not isinstance(a, torch.dtype) else a
                         for i, a in enumerate(args))
        elif func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith(_CUDA_TYPE_PREFIX) else name.replace(
                "torch.", _CUDA_TYPE_PREFIX, 1)
        elif func in (torch.Tensor.backward, torch.autograd.backward):
            with self:
                return self._backward(func, args, kwargs)
        return func(*args, **kwargs)

    @staticmethod
    def _backward(func: Callable, args: tuple, kwargs: dict) -> None:
        if func is torch.Tensor.backward:
            tensor, *rest = args
            names = ("gradient", "retain_graph", "create_graph", "inputs")
            params = dict(zip(names, rest, strict=False)) | kwargs
            return _run_backward(tensor, params.get("gradient"), params.get("retain_graph"),
                                 params.get("create_graph", False), params.get("inputs"))
        return _run_backward(*args, **kwargs)


class _NullStream:
    """Stands in for ``torch.cuda.Stream``: every operation is already ordered on the CPU."""

    def wait_stream(self, _stream: Any) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def record_event(self, event: Any = None) -> Any:
        return event

    def wait_event(self, _event: Any) -> None:
        return None


def _install_cuda_stubs() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.synchronize = lambda device=None: None
    cuda.current_stream = lambda device=None: _NullStream()
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    cuda.manual_seed = lambda seed: torch.manual_seed(seed)


def _install_megatron_rng_stubs() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = (
        lambda device=-1, clone=False, graph_safe=False: torch.get_rng_state())
    mcore_random._set_cuda_rng_state = (
        lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state))


def cuda_available() -> bool:
    return torch.cuda.is_available()


def is_enabled() -> bool:
    return _mode is not None


def enable(force: bool = False) -> bool:
    """Activate the CPU layer for this process when CUDA is absent (or ``force``).

    Returns whether the layer is active. Idempotent: the mode is pushed once per process.
    """
    global _mode
    if _mode is not None:
        return True
    if cuda_available() and not force:
        return False
    _install_cuda_stubs()
    _install_megatron_rng_stubs()
    # Megatron's DDP reads .grad of parameter views; through the mode that read is reported.
    warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
    _mode = _CudaToCpuMode()
    _mode.__enter__()
    log.info("Megatron-Core CPU compatibility layer enabled (no CUDA)")
    return True
