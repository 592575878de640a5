"""Held-out loss and perplexity, overall and per source, at an interval and at the end."""

from __future__ import annotations

import math

from orchestration.callbacks.base import Callback
from orchestration.loop.stages import total_steps
from orchestration.metrics.logger import MetricsLogger


class EvalCallback(Callback):
    """Every ``train.eval_interval`` steps and at the last step: the mean held-out loss over the
    first ``train.eval_iters`` batches of the valid split, and of each source's held-out set."""

    name = "eval"
    order = 30

    def __init__(self, logger: MetricsLogger) -> None:
        self.logger = logger

    @classmethod
    def from_config(cls, context, **options) -> EvalCallback:
        return cls(context.logger, **options)

    def after_step(self, trainer, result) -> None:
        interval = trainer.cfg.train.eval_interval
        done = result.step
        if interval > 0 and (done % interval == 0 or done == total_steps(trainer.stages)):
            iters = trainer.cfg.train.eval_iters
            val_loss = trainer.evaluate(iters)
            record = {"step": done, "stage": result.stage.name, "val_loss": val_loss,
                      "val_ppl": perplexity(val_loss)}
            for name, dataset in trainer.data.valid_per_source.items():
                record[f"val_loss/{name}"] = trainer.evaluate(iters, dataset)
            self.logger.log(record)


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")
