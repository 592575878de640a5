"""Resolve a run's curriculum into concrete stages: data, batch size, steps, LR schedule.

A run without ``stages`` is one stage built from the top-level ``data``, ``optim`` and
``train`` keys. Stage boundaries are global step numbers, so the stage a step belongs to, the
step within its stage and the consumed tokens are all derived from the global step alone; a
checkpoint needs only the step to resume mid-stage at the right sample and learning rate.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestration.config import DataConfig, OptimConfig, RunConfig


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
    seq = cfg.model.seq_length
    if not cfg.stages:
        return [Stage(0, "main", cfg.data, cfg.optim, cfg.train.global_batch_size, seq,
                      cfg.train.max_steps, 0)]
    stages, start = [], 0
    for i, sc in enumerate(cfg.stages):
        gbs = sc.global_batch_size or cfg.train.global_batch_size
        if sc.train_tokens is not None:
            steps = -(-sc.train_tokens // (gbs * seq))  # ceil: never train short of the budget
        elif sc.max_steps is not None:
            steps = sc.max_steps
        else:
            raise ValueError(f"stages[{i}] ({sc.name}): set train_tokens or max_steps")
        stages.append(Stage(i, sc.name, sc.data or cfg.data, sc.optim or cfg.optim, gbs, seq,
                            steps, start))
        start += steps
    return stages


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
