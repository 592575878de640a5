"""When to save: every ``checkpoint.save_interval`` steps, at the last step, at the last step of
each stage (``checkpoint.save_stage_end``: the stage's release checkpoint, after its ramp-off;
the trainer marks it ``release``), and after ``train.exit_after_steps`` steps of this job (the
loop also saves whenever it stops early)."""

from __future__ import annotations

from orchestration.callbacks.base import Callback
from orchestration.loop.control import Decision
from orchestration.loop.stages import stage_at, total_steps


class CheckpointCallback(Callback):
    name = "checkpoint"
    order = 80

    def __init__(self) -> None:
        self.steps_this_job = 0

    def after_step(self, trainer, result) -> Decision | None:
        self.steps_this_job += 1
        cfg = trainer.cfg
        limit = cfg.train.exit_after_steps
        stop = (f"train.exit_after_steps={limit}"
                if limit is not None and self.steps_this_job >= limit else None)
        interval = cfg.checkpoint.save_interval
        due = interval > 0 and result.step % interval == 0
        final = result.step == total_steps(trainer.stages)
        stage_end = (cfg.checkpoint.save_stage_end
                     and result.step == stage_at(trainer.stages, result.step).last_step)
        if due or final or stage_end or stop:
            return Decision(save=True, stop=stop)
        return None
