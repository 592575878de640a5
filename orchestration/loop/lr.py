"""Learning rate and weight decay as pure functions of the (1-based) global step.

Megatron's ``OptimizerParamScheduler`` keeps its own step counter and one peak LR per param
group; curricula need a fresh warmup per stage, a ramp-off at a stage's end, or one schedule that
spans stages, and resuming needs nothing but the global step. So the LR is computed here and
written into Megatron's param groups by ``megatron_patches.optimizer.apply_lr``.
"""

from __future__ import annotations

import math

from orchestration.config import OptimConfig, RunConfig
from orchestration.loop.stages import Stage, stage_at, total_steps


def lr_at(optim: OptimConfig, n: int, total_steps: int) -> float:
    """LR of the ``n``-th step (1-based) of a schedule ``total_steps`` long.

    Step ``n`` uses the schedule's value after ``n`` updates, so the first step of a warmup
    already has a non-zero LR and warmup reaches the peak on step ``warmup_steps``.
    """
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


def lr_for_step(cfg: RunConfig, stages: list[Stage], step: int) -> float:
    """LR of global step ``step``: the stage's own schedule (fresh warmup per stage, as
    Crystal did) or one schedule over all stages (as Amber/K2 stage 1), then the stage's
    optional ramp-off, a linear fall to ``ramp_off_lr`` over its last ``ramp_off_steps``."""
    stage = stage_at(stages, step)
    if cfg.lr_schedule == "global":
        optim, lr = cfg.optim, lr_at(cfg.optim, step, total_steps(stages))
    else:
        optim, lr = stage.optim, lr_at(stage.optim, step - stage.steps_before, stage.steps)
    steps_left = stage.last_step - step  # after this one
    if stage.ramp_off_steps and steps_left < stage.ramp_off_steps:
        target = optim.min_lr if stage.ramp_off_lr is None else stage.ramp_off_lr
        lr = target + (lr - target) * steps_left / stage.ramp_off_steps
    return lr


def weight_decay_for_step(cfg: RunConfig, stages: list[Stage], step: int) -> float:
    optim = cfg.optim if cfg.lr_schedule == "global" else stage_at(stages, step).optim
    return optim.weight_decay
