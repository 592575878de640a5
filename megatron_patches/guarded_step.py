"""Megatron's optimizer step, split so a caller can veto the update after seeing the grad norm.

Why: ``ChainedOptimizer.step()`` computes the global gradient norm and applies the update in one
call, so a loss-spike or grad-norm rule cannot skip a batch between the two. This function runs
the same public pieces in the same order (``prepare_grads``, ``get_grad_norm``, clipping with
``clip_grad_by_total_norm_fp32``, ``step_with_ready_grads``) with a decision in between. Without
a veto it is numerically identical to ``optimizer.step()`` (``tests/test_guarded_step.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from megatron.core.optimizer import ChainedOptimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32


@dataclass
class StepOutcome:
    updated: bool
    grad_norm: float
    found_inf: bool


@torch.no_grad()
def guarded_step(optimizer: ChainedOptimizer,
                 veto: Callable[[float], bool] | None = None) -> StepOutcome:
    """Apply the update unless grads are non-finite or ``veto(grad_norm)`` returns True.

    ``grad_norm`` is reduced across the model- and data-parallel groups, so every rank sees
    the same value and takes the same decision.
    """
    found_inf = bool(optimizer.prepare_grads())
    grad_norm = float("nan") if found_inf else float(optimizer.get_grad_norm())
    vetoed = veto is not None and veto(grad_norm)  # asked even when non-finite: it logs why
    if vetoed or found_inf or not math.isfinite(grad_norm):
        return StepOutcome(updated=False, grad_norm=grad_norm, found_inf=found_inf)
    for sub in optimizer.chained_optimizers:
        if getattr(sub, "is_stub_optimizer", False) or not sub.get_parameters():
            continue
        if sub.config.clip_grad > 0.0:
            clip_grad_by_total_norm_fp32(
                sub.get_parameters(), max_norm=sub.config.clip_grad, total_norm=grad_norm,
                use_decoupled_grad=sub.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    updated = bool(optimizer.step_with_ready_grads())
    return StepOutcome(updated=updated, grad_norm=grad_norm, found_inf=False)
