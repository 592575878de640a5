"""Learning-rate schedules as pure functions of the step, applied to Megatron's param groups.

Megatron's ``OptimizerParamScheduler`` keeps its own step counter and one peak LR per param
group; curricula need a fresh warmup per stage, a ramp-off at a stage's end, or one schedule that
spans stages, and resuming needs nothing but the global step. So the LR is computed here and
written into each group scaled by the group's ``lr_mult`` (muP's width scaling lives there) and
the weight decay by ``wd_mult`` (0 for norms and biases), the same fields Megatron's scheduler uses.
"""

from __future__ import annotations

import math

from orchestration.config import OptimConfig


def lr_at(optim: OptimConfig, step: int, total_steps: int) -> float:
    """LR for 0-based ``step`` of a schedule ``total_steps`` long.

    Step ``s`` uses the schedule's value after ``s + 1`` updates, so the first step of a warmup
    already has a non-zero LR and warmup reaches the peak on step ``warmup_steps - 1``.
    """
    n = step + 1
    warmup = optim.warmup_steps
    if warmup > 0 and n <= warmup:
        return optim.init_lr + (optim.lr - optim.init_lr) * n / warmup
    if optim.decay_style == "constant":
        return optim.lr
    decay_end = optim.decay_steps + warmup if optim.decay_steps else total_steps
    if n >= decay_end:
        return optim.min_lr
    ratio = (n - warmup) / max(decay_end - warmup, 1)
    if optim.decay_style == "linear":
        coeff = 1.0 - ratio
    elif optim.decay_style == "cosine":
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
    else:  # wsd: stable, then a linear anneal over the last 20% of the decay window
        coeff = min(1.0, (1.0 - ratio) / 0.2)
    return optim.min_lr + coeff * (optim.lr - optim.min_lr)


def apply_lr(optimizer, lr: float, weight_decay: float) -> None:
    """Write the step's LR and WD into every param group of a Megatron (chained) optimizer."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
        group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)
