"""Learning rate and weight decay as pure functions of the (1-based) global step.

Megatron's ``OptimizerParamScheduler`` keeps its own step counter and one peak LR per param
group; curricula need a fresh warmup per stage, a ramp-off at a stage's end, or one schedule that
spans stages, and resuming needs nothing but the global step. So the LR is computed here and
written into Megatron's param groups by ``megatron_patches.optimizer.apply_lr``.

The shapes are Megatron-Core's (``OptimizerParamScheduler.get_lr``), and ``decay_steps`` is the
length of the decay whatever the stage's length: Crystal's phase 1 decayed linearly over 294,337
steps but stopped after 79,721 (tests/test_recipes.py checks that against its params.yaml).
One convention differs from Megatron's and Cerebras's, which train update ``n`` with the
schedule's value after ``n - 1`` updates: here step ``n`` uses the value after ``n`` updates,
so the first warmup step is not wasted at LR 0 (a shift of one step; see ``lr_at``).
"""

from __future__ import annotations

import math

from orchestration.config import OptimConfig, RunConfig
from orchestration.loop.stages import Stage, schedule_progress, stage_at

#: Megatron-Core's WSD anneal shapes: the LR coefficient at fraction ``r`` of the anneal.
WSD_SHAPES = {
    "linear": lambda r: 1.0 - r,
    "cosine": lambda r: 0.5 * (math.cos(math.pi * r) + 1.0),
    "exponential": lambda r: 2.0 * 0.5 ** r - 1.0,
    "minus_sqrt": lambda r: 1.0 - math.sqrt(r),
}


def lr_at(optim: OptimConfig, n: float, total_steps: float) -> float:
    """LR of the ``n``-th step (1-based) of a schedule ``total_steps`` long.

    Step ``n`` uses the schedule's value after ``n`` updates, so the first step of a warmup
    already has a non-zero LR and warmup reaches the peak on step ``warmup_steps``. ``n`` may be
    fractional: with a batch-size ramp the schedule advances by samples (``Stage.progress``).
    The decay runs over ``decay_steps`` after the warmup (default: to ``total_steps``) and
    holds ``min_lr`` after it.
    """
    warmup = optim.warmup_steps
    if warmup > 0 and n <= warmup:
        return optim.init_lr + (optim.lr - optim.init_lr) * n / warmup
    if optim.decay_style == "constant":
        return optim.lr
    decay_end = optim.decay_steps + warmup if optim.decay_steps else total_steps
    if n >= decay_end:
        return optim.min_lr
    window = max(decay_end - warmup, 1)
    ratio = (n - warmup) / window
    if optim.decay_style == "linear":
        coeff = 1.0 - ratio
    elif optim.decay_style == "cosine":
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
    else:  # wsd: stable, then an anneal over the last wsd_decay_fraction of the decay window
        anneal = optim.wsd_decay_fraction * window
        into = (n - warmup) - (window - anneal)
        coeff = 1.0 if into <= 0 else WSD_SHAPES[optim.wsd_decay_style](into / anneal)
    return optim.min_lr + coeff * (optim.lr - optim.min_lr)


def lr_for_step(cfg: RunConfig, stages: list[Stage], step: int) -> float:
    """LR of global step ``step``: the stage's own schedule (fresh warmup per stage, as
    Crystal did) or one schedule over all stages (as Amber/K2 stage 1), then the stage's
    optional ramp-off, a linear fall to ``ramp_off_lr`` over its last ``ramp_off_steps``."""
    stage = stage_at(stages, step)
    if cfg.lr_schedule == "global":
        optim = cfg.optim
        lr = lr_at(optim, schedule_progress(stages, step),
                   schedule_progress(stages, stages[-1].last_step))
    else:
        optim = stage.optim
        lr = lr_at(optim, stage.progress(step - stage.steps_before), stage.progress(stage.steps))
    steps_left = stage.last_step - step  # after this one
    if stage.ramp_off_steps and steps_left < stage.ramp_off_steps:
        target = optim.min_lr if stage.ramp_off_lr is None else stage.ramp_off_lr
        lr = target + (lr - target) * steps_left / stage.ramp_off_steps
    return lr


def weight_decay_for_step(cfg: RunConfig, stages: list[Stage], step: int) -> float:
    optim = cfg.optim if cfg.lr_schedule == "global" else stage_at(stages, step).optim
    return optim.weight_decay
