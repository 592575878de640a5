"""The callbacks every run has: metrics, evaluation, checkpoint timing, stage-change events."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from orchestration.callbacks import Callback
from orchestration.checkpoint import step_of
from orchestration.metrics import MetricsLogger
from orchestration.stages import Stage, consumed_tokens, total_steps

log = logging.getLogger(__name__)


class MetricsCallback(Callback):
    """Writes every step to the JSONL/W&B log; prints every ``train.log_interval`` steps."""

    name = "metrics"

    def __init__(self, logger: MetricsLogger, flops_per_token: float,
                 peak_flops: float | None, num_gpus: int) -> None:
        self.logger = logger
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.num_gpus = num_gpus

    def on_stage_start(self, trainer, stage: Stage) -> None:
        self.logger.event("stage_start", step=trainer.step, stage=stage.name,
                          index=stage.index, tokens=stage.tokens, steps=stage.steps,
                          consumed_tokens=consumed_tokens(trainer.stages, trainer.step))

    def after_step(self, trainer, result) -> None:
        tokens = result.stage.tokens_per_step
        tokens_per_s = tokens / result.step_time_s if result.step_time_s > 0 else float("nan")
        record = {
            "step": result.step + 1, "stage": result.stage.name, "loss": result.loss,
            "grad_norm": result.grad_norm, "lr": result.lr, "tokens_per_s": tokens_per_s,
            "consumed_tokens": consumed_tokens(trainer.stages, result.step + 1),
            "step_time_s": result.step_time_s, "flops_per_token": self.flops_per_token,
            "skipped": result.skip_reason,
        }
        if self.peak_flops:
            record["mfu"] = tokens_per_s * self.flops_per_token / (self.peak_flops * self.num_gpus)
        interval = trainer.cfg.train.log_interval
        echo = (result.step + 1) % interval == 0 or result.step == 0 or result.skip_reason
        self.logger.log(record, echo=bool(echo))

    def on_checkpoint(self, trainer, path: Path) -> None:
        self.logger.event("checkpoint", step=step_of(path), path=str(path))

    def on_fit_end(self, trainer) -> None:
        self.logger.close()


class EvalCallback(Callback):
    """Held-out loss and perplexity every ``train.eval_interval`` steps and at the end."""

    name = "eval"

    def __init__(self, logger: MetricsLogger) -> None:
        self.logger = logger

    def after_step(self, trainer, result) -> None:
        interval = trainer.cfg.train.eval_interval
        done = result.step + 1
        if interval > 0 and (done % interval == 0 or done == total_steps(trainer.stages)):
            iters = trainer.cfg.train.eval_iters
            val_loss = trainer.evaluate(iters)
            trainer.last_val_loss = val_loss
            record = {"step": done, "stage": result.stage.name, "val_loss": val_loss,
                      "val_ppl": _perplexity(val_loss)}
            for name, dataset in trainer.data.valid_per_source.items():
                record[f"val_loss/{name}"] = trainer.evaluate(iters, dataset)
            self.logger.log(record)


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


class CheckpointCallback(Callback):
    """Saves every ``checkpoint.save_interval`` steps, at the end, and when asked to stop."""

    name = "checkpoint"

    def __init__(self) -> None:
        self.steps_this_job = 0
        self.last_saved: int | None = None

    def after_step(self, trainer, result) -> None:
        self.steps_this_job += 1
        cfg = trainer.cfg
        done = result.step + 1
        limit = cfg.train.exit_after_steps
        if limit is not None and self.steps_this_job >= limit:
            trainer.stop_requested = f"train.exit_after_steps={limit}"
        interval = cfg.checkpoint.save_interval
        due = interval > 0 and done % interval == 0
        if due or done == total_steps(trainer.stages) or trainer.stop_requested:
            self._save(trainer)

    def _save(self, trainer) -> None:
        if self.last_saved == trainer.step:
            return
        t0 = time.perf_counter()
        path = trainer.save_checkpoint()
        self.last_saved = trainer.step
        log.info("%s %s in %.2fs", "scheduled (writing in the background)"
                 if trainer.saver is not None else "saved", path, time.perf_counter() - t0)


class PreemptionCallback(Callback):
    """SIGUSR1/SIGTERM (SLURM's time-limit warning, preemption): finish the step, checkpoint
    (CheckpointCallback sees ``stop_requested``), then requeue the job under SLURM."""

    name = "preemption"

    def on_fit_start(self, trainer) -> None:
        from orchestration.slurm import PreemptionSignal

        trainer.stop_signal = PreemptionSignal()

    def on_fit_end(self, trainer) -> None:
        from orchestration.slurm import in_slurm, requeue_job

        if trainer.stop_signal is not None:
            trainer.stop_signal.uninstall()
        stopped = trainer.stop_requested or ""
        if stopped.startswith("signal") and trainer.o.dist.is_main and in_slurm():
            requeued = requeue_job(run_dir=trainer.run_dir)
            log.info("stopped on %s at step %d; requeue %s", stopped, trainer.step,
                     "requested" if requeued else "not possible (see warning)")
