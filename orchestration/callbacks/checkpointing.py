"""When to save: every ``checkpoint.save_interval`` steps, at the last step, and after
``train.exit_after_steps`` steps of this job (the loop also saves whenever it stops early)."""

from __future__ import annotations

from orchestration.callbacks.base import Callback
from orchestration.loop.control import Decision
from orchestration.loop.stages import total_steps


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
        if due or final or stop:
            return Decision(save=True, stop=stop)
        return None
