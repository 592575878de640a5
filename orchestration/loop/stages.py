"""A run's curriculum as concrete stages, and the project's one step convention.

**Steps are 1-based, everywhere.** Global step 1 trains the first batch; ``N`` steps done means
steps ``1..N`` ran; ``checkpoints/step_N`` holds the model after step N (``step_0``: the initial
weights); metrics, skip logs, ``spike.skip_steps``, ``spike.inject`` and fault drills name
steps the same way. Data positions are not steps: batch ``b`` of a stage (0-based, like
Megatron's sample indices) is the stage's ``b``-th global batch, ``samples [b*gbs, (b+1)*gbs)``
(with a batch-size ramp, ``[first_sample(b), first_sample(b) + batch_size(b))``).
:meth:`Stage.batch_index` is the one place where the two meet.

A run without ``stages`` is one stage built from the top-level ``data``, ``optim`` and
``train`` keys. Stage boundaries are global step numbers, so the stage a step belongs to, its
batch within the stage and the consumed tokens all derive from the global step alone: a
checkpoint needs only the step to resume mid-stage at the right sample and learning rate.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestration.config import DataConfig, OptimConfig, RunConfig, load_data_mix
from orchestration.data.ramp import BatchRamp


@dataclass
class Stage:
    index: int
    name: str
    data: DataConfig
    optim: OptimConfig
    global_batch_size: int
    seq_length: int
    steps: int
    steps_before: int  # global steps of the stages before this one
    ramp_off_steps: int = 0
    ramp_off_lr: float | None = None
    ramp: BatchRamp | None = None  # batch-size ramp-up over the stage's first samples

    @property
    def first_step(self) -> int:
        return self.steps_before + 1

    @property
    def last_step(self) -> int:
        return self.steps_before + self.steps

    def batch_index(self, step: int) -> int:
        """The stage's 0-based batch position that global step ``step`` trains (unreordered)."""
        return step - self.first_step

    def step_of_batch(self, batch: int) -> int:
        """The global step that trains batch position ``batch`` (unreordered)."""
        return self.first_step + batch

    def contains(self, step: int) -> bool:
        return self.first_step <= step <= self.last_step

    def batch_size(self, batch: int) -> int:
        """Global batch size of batch position ``batch`` (smaller during a ramp-up)."""
        return self.ramp.size(batch) if self.ramp else self.global_batch_size

    def first_sample(self, batch: int) -> int:
        """The stage's samples before batch position ``batch``."""
        return self.ramp.first_sample(batch) if self.ramp else batch * self.global_batch_size

    @property
    def tokens_per_step(self) -> int:
        """Tokens of a full-size step (after any ramp-up)."""
        return self.global_batch_size * self.seq_length

    @property
    def samples(self) -> int:
        return self.first_sample(self.steps)

    @property
    def tokens(self) -> int:
        return self.samples * self.seq_length

    def progress(self, steps_done: int) -> float:
        """How far ``steps_done`` of this stage's steps take its LR schedule, in full-size
        steps: samples consumed / global batch. Equal to ``steps_done`` without a ramp; with one
        the schedule advances by samples, as Megatron's does (its scheduler steps by the
        samples of each iteration)."""
        if self.ramp is None:
            return float(steps_done)
        return self.first_sample(steps_done) / self.global_batch_size


def plan_stages(cfg: RunConfig) -> list[Stage]:
    """The run's stages with their global step ranges. A token budget becomes the fewest steps
    that reach it (with a batch-size ramp, counting its smaller batches)."""
    if not cfg.stages:
        gbs = cfg.train.global_batch_size
        return [Stage(0, "main", cfg.data, cfg.optim, gbs, cfg.model.seq_length,
                      cfg.train.max_steps, 0, ramp=_ramp(cfg.train.rampup_batch_size, gbs))]
    stages, before = [], 0
    for i, sc in enumerate(cfg.stages):
        gbs = sc.global_batch_size or cfg.train.global_batch_size
        seq = sc.seq_length or cfg.model.seq_length
        # The run's train.rampup_batch_size (Megatron's flag) ramps the first stage.
        ramp_spec = sc.rampup_batch_size if sc.rampup_batch_size is not None else (
            cfg.train.rampup_batch_size if i == 0 else [])
        try:
            ramp = _ramp(ramp_spec, gbs)
        except ValueError as err:
            raise ValueError(f"stages[{i}] ({sc.name}): {err}") from None
        if sc.train_tokens is not None:  # ceil: never train short of the budget
            samples = -(-sc.train_tokens // seq)
            steps = ramp.batches_for(samples) if ramp else -(-samples // gbs)
        elif sc.max_steps is not None:
            steps = sc.max_steps
        else:
            raise ValueError(f"stages[{i}] ({sc.name}): set train_tokens or max_steps")
        data = load_data_mix(sc.mix) if sc.mix else (sc.data or cfg.data)
        stages.append(Stage(i, sc.name, data, sc.optim or cfg.optim, gbs, seq,
                            steps, before, sc.ramp_off_steps, sc.ramp_off_lr, ramp))
        before += steps
    return stages


def _ramp(spec: list[int] | None, global_batch_size: int) -> BatchRamp | None:
    if not spec:
        return None
    if len(spec) != 3:
        raise ValueError(f"rampup_batch_size={list(spec)}: expected [start, increment, "
                         "ramp_samples]")
    return BatchRamp(*spec, global_batch_size)


def stage_at(stages: list[Stage], step: int) -> Stage:
    """The stage that global step ``step`` belongs to (the last one past the end)."""
    for stage in stages:
        if step <= stage.last_step:
            return stage
    return stages[-1]


def consumed_samples(stages: list[Stage], steps_done: int) -> int:
    """Samples trained on once steps ``1..steps_done`` have run."""
    return sum(s.first_sample(min(max(steps_done - s.steps_before, 0), s.steps)) for s in stages)


def consumed_tokens(stages: list[Stage], steps_done: int) -> int:
    """Tokens trained on once steps ``1..steps_done`` have run."""
    return sum(s.first_sample(min(max(steps_done - s.steps_before, 0), s.steps)) * s.seq_length
               for s in stages)


def schedule_progress(stages: list[Stage], steps_done: int) -> float:
    """Full-size steps of the whole run done after ``steps_done`` steps (``lr_schedule:
    global``): ``steps_done`` itself unless a stage ramps its batch size."""
    return sum(s.progress(min(max(steps_done - s.steps_before, 0), s.steps)) for s in stages)


def total_steps(stages: list[Stage]) -> int:
    return stages[-1].last_step


def describe_stages(stages: list[Stage]) -> str:
    """Per stage: tokens, steps, and per source its share, samples and epochs seen."""
    from data_prep.mix import compute_mix

    lines = []
    for st in stages:
        ramp = (f", ramping up from {st.ramp.start} over {st.ramp.ramp_batches} steps"
                if st.ramp else "")
        lines.append(f"stage {st.index} '{st.name}': steps {st.first_step}-{st.last_step} "
                     f"({st.steps} steps x {st.global_batch_size} seqs{ramp} x {st.seq_length} "
                     f"tokens = {st.tokens:,} tokens), data mix '{st.data.name}'")
        for share in compute_mix(st.data.sources, st.tokens):
            samples = round(share.share * st.samples)
            epochs = share.share * st.tokens / share.tokens if share.tokens else float("nan")
            lines.append(f"    {share.name:<24} share {share.share:7.2%}  samples {samples:>12,}"
                         f"  epochs {epochs:6.2f}")
    return "\n".join(lines)
