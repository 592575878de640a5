"""Megatron's optimizer for a run, the hooks its schedules call, and the per-step LR.

The LR schedule itself is a pure function of the step (``orchestration.loop.lr``); this module
only writes its value into Megatron's param groups, scaled by each group's ``lr_mult`` (muP's
width scaling lives there) and ``wd_mult`` (0 for norms and biases), the fields Megatron's own
``OptimizerParamScheduler`` uses.
"""

from __future__ import annotations

import contextlib

from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer.optimizer import ChainedOptimizer

from megatron_patches.configs import MegatronConfigs
from orchestration.config import RunConfig


def build_optimizer(cfg: RunConfig, mc: MegatronConfigs, model_chunks: list) -> ChainedOptimizer:
    """Megatron's (distributed) optimizer over ``model_chunks``, with muP's groups when on,
    connected to the schedule hooks of ``mc.transformer``."""
    optimizer = get_megatron_optimizer(mc.optimizer, model_chunks,
                                       config_overrides=param_group_overrides(cfg, mc))
    connect_schedule_hooks(mc, model_chunks, optimizer, cfg)
    return optimizer


def param_group_overrides(cfg: RunConfig, mc: MegatronConfigs) -> dict | None:
    """muP's per-group LR/eps overrides, or None for Megatron's standard groups (no weight
    decay on biases and norms)."""
    if not cfg.mup.enabled:
        return None
    from megatron_patches.mup import mup_param_group_overrides

    return mup_param_group_overrides(cfg, mc.optimizer)


def connect_schedule_hooks(mc: MegatronConfigs, model_chunks: list, optimizer,
                           cfg: RunConfig) -> None:
    """What Megatron's pipeline schedules call back into, as Megatron-LM's training.py sets it:
    the data-parallel gradient reduction (plus SP layer-norm and tied-embedding reductions) at
    the end of the step, loss scaling for fp16, no-sync while accumulating micro-batches and,
    with overlap, the bucket reductions (``align_grad_reduce``, Megatron-LM's default) and
    param all-gathers the schedule launches itself (``align_param_gather``). With several
    model chunks (interleaved pipeline) each hook is a list, one per chunk."""
    tc = mc.transformer
    tc.finalize_model_grads_func = finalize_model_grads
    tc.grad_scale_func = optimizer.scale_loss
    if mc.ddp.overlap_grad_reduce:
        tc.no_sync_func = _per_chunk([chunk.no_sync for chunk in model_chunks])
        tc.grad_sync_func = _per_chunk([chunk.start_grad_sync for chunk in model_chunks])
    if mc.ddp.overlap_param_gather and mc.ddp.align_param_gather:
        tc.param_sync_func = _per_chunk([chunk.start_param_sync for chunk in model_chunks])


def _per_chunk(hooks: list):
    """Megatron's schedules take one hook for a single chunk and a list for several."""
    return hooks[0] if len(hooks) == 1 else hooks


def apply_lr(optimizer, lr: float, weight_decay: float) -> None:
    """Write the step's LR and WD into every param group of a Megatron (chained) optimizer."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
        group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)


def zero_grads(model_chunks: list, optimizer) -> None:
    """Clear DDP's gradient buffers and the optimizer's main grads before a step."""
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()


@contextlib.contextmanager
def params_gathered(model_chunks: list):
    """Complete the distributed optimizer's overlapped param all-gather for the duration.

    With ``overlap_param_gather`` the updated shards are gathered lazily, in the next step's
    forward pre-hooks, so between steps a rank's full parameters are stale. Saving, evaluating
    or sampling must first gather them, as Megatron-LM does around ``save_checkpoint`` and
    ``evaluate`` (``disable_forward_pre_hook`` with a forced sync, then ``enable_``).
    """
    hooked = [c for c in model_chunks if getattr(c, "use_forward_hook", False)]
    for chunk in hooked:
        chunk.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for chunk in hooked:
            chunk.enable_forward_pre_hook()
