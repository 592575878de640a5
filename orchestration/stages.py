"""Resolve a run's curriculum into concrete stages: data, batch size, steps, LR schedule.

A run without ``stages`` is one stage built from the top-level ``data``, ``optim`` and
``train`` keys. Stage boundaries are global step numbers, so the stage a step belongs to, the
step within its stage and the consumed tokens are all derived from the global step alone; a
checkpoint needs only the step to resume mid-stage at the right sample and learning rate.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestration.config import DataConfig, OptimConfig, RunConfig, load_data_mix
from orchestration.schedule import lr_at


@dataclass
class Stage:
    index: int
    name: str
    data: DataConfig
    optim: OptimConfig
    global_batch_size: int
    seq_length: int
    steps: int
    start_step: int
    ramp_off_steps: int = 0
    ramp_off_lr: float | None = None

    @property
    def end_step(self) -> int:
        return self.start_step + self.steps

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_length

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step


def plan_stages(cfg: RunConfig) -> list[Stage]:
    if not cfg.stages:
        return [Stage(0, "main", cfg.data, cfg.optim, cfg.train.global_batch_size,
                      cfg.model.seq_length, cfg.train.max_steps, 0)]
    stages, start = [], 0
    for i, sc in enumerate(cfg.stages):
        gbs = sc.global_batch_size or cfg.train.global_batch_size
        seq = sc.seq_length or cfg.model.seq_length
        if sc.train_tokens is not None:
            steps = -(-sc.train_tokens // (gbs * seq))  # ceil: never train short of the budget
        elif sc.max_steps is not None:
            steps = sc.max_steps
        else:
            raise ValueError(f"stages[{i}] ({sc.name}): set train_tokens or max_steps")
        data = load_data_mix(sc.mix) if sc.mix else (sc.data or cfg.data)
        stages.append(Stage(i, sc.name, data, sc.optim or cfg.optim, gbs, seq,
                            steps, start, sc.ramp_off_steps, sc.ramp_off_lr))
        start += steps
    return stages


def lr_for_step(cfg: RunConfig, stages: list[Stage], step: int) -> float:
    """LR of global step ``step``: the stage's own schedule (fresh warmup per stage, as
    Crystal did) or one schedule over all stages (as Amber/K2 stage 1), then the stage's
    optional ramp-off, a linear fall to ``ramp_off_lr`` over its last ``ramp_off_steps``."""
    stage = stage_at(stages, step)
    if cfg.lr_schedule == "global":
        optim, lr = cfg.optim, lr_at(cfg.optim, step, total_steps(stages))
    else:
        optim, lr = stage.optim, lr_at(stage.optim, step - stage.start_step, stage.steps)
    steps_left = stage.end_step - 1 - step
    if stage.ramp_off_steps and steps_left < stage.ramp_off_steps:
        target = optim.min_lr if stage.ramp_off_lr is None else stage.ramp_off_lr
        lr = target + (lr - target) * steps_left / stage.ramp_off_steps
    return lr


def weight_decay_for_step(cfg: RunConfig, stages: list[Stage], step: int) -> float:
    optim = cfg.optim if cfg.lr_schedule == "global" else stage_at(stages, step).optim
    return optim.weight_decay


def format_plan(stages: list[Stage]) -> str:
    """Per stage: tokens, steps, and per source its share, samples and epochs seen."""
    from data_prep.mix import compute_mix

    lines = []
    for st in stages:
        lines.append(f"stage {st.index} '{st.name}': steps {st.start_step}-{st.end_step - 1} "
                     f"({st.steps} steps x {st.global_batch_size} seqs x {st.seq_length} tokens "
                     f"= {st.tokens:,} tokens), data mix '{st.data.name}'")
        sources = [{"name": s.name, "path": s.path, "multiplier": s.multiplier,
                    "tokens": s.tokens} for s in st.data.sources]
        for share in compute_mix(sources, st.tokens):
            samples = round(share.share * st.steps * st.global_batch_size)
            epochs = share.share * st.tokens / share.tokens if share.tokens else float("nan")
            lines.append(f"    {share.name:<24} share {share.share:7.2%}  samples {samples:>12,}"
                         f"  epochs {epochs:6.2f}")
    return "\n".join(lines)


def stage_at(stages: list[Stage], step: int) -> Stage:
    """The stage that global step ``step`` (0-based, the next step to run) belongs to."""
    for stage in stages:
        if step < stage.end_step:
            return stage
    return stages[-1]


def consumed_tokens(stages: list[Stage], step: int) -> int:
    return sum(min(max(step - s.start_step, 0), s.steps) * s.tokens_per_step for s in stages)


def total_steps(stages: list[Stage]) -> int:
    return stages[-1].end_step
