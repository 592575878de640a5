"""Per-step metrics and run events into the metrics log (JSONL, W&B), with MFU."""

from __future__ import annotations

from pathlib import Path

from orchestration.callbacks.base import Callback
from orchestration.checkpoint.layout import step_of
from orchestration.loop.stages import Stage, consumed_tokens
from orchestration.metrics.flops import flops_per_token, mfu, peak_flops_for_device
from orchestration.metrics.logger import MetricsLogger


class MetricsCallback(Callback):
    """Writes every step to the metrics log; prints every ``train.log_interval`` steps."""

    name = "metrics"
    order = 20

    def __init__(self, logger: MetricsLogger, flops_per_token: float,
                 peak_flops: float | None, num_gpus: int) -> None:
        self.logger = logger
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.num_gpus = num_gpus

    @classmethod
    def from_config(cls, context, **options) -> MetricsCallback:
        cfg = context.cfg
        peak = cfg.runtime.peak_flops_per_gpu or _detect_peak_flops(context.on_cpu)
        return cls(context.logger, flops_per_token(cfg.model, cfg.model.seq_length), peak,
                   context.world_size, **options)

    def on_stage_start(self, trainer, stage: Stage) -> None:
        self.logger.event("stage_start", step=trainer.step + 1, stage=stage.name,
                          index=stage.index, tokens=stage.tokens, steps=stage.steps,
                          consumed_tokens=consumed_tokens(trainer.stages, trainer.step))

    def after_step(self, trainer, result) -> None:
        batch_size = result.stage.batch_size(result.batch)  # smaller during a ramp-up
        tokens = batch_size * result.stage.seq_length
        tokens_per_s = tokens / result.step_time_s if result.step_time_s > 0 else float("nan")
        record = {
            "step": result.step, "stage": result.stage.name, "loss": result.loss,
            "grad_norm": result.grad_norm, "lr": result.lr, "tokens_per_s": tokens_per_s,
            "consumed_tokens": consumed_tokens(trainer.stages, result.step),
            "step_time_s": result.step_time_s, "flops_per_token": self.flops_per_token,
            "skipped": result.skip_reason, "global_batch_size": batch_size,
            **result.extra,
        }
        if self.peak_flops:
            record["mfu"] = mfu(tokens_per_s, self.flops_per_token, self.num_gpus,
                                self.peak_flops)
        interval = trainer.cfg.train.log_interval
        echo = result.step % interval == 0 or result.step == 1 or result.skip_reason
        self.logger.log(record, echo=bool(echo))

    def on_checkpoint(self, trainer, path: Path) -> None:
        self.logger.event("checkpoint", step=step_of(path), path=str(path))

    def on_fit_end(self, trainer) -> None:
        self.logger.close()


def _detect_peak_flops(on_cpu: bool) -> float | None:
    if on_cpu:
        return None
    import torch

    return peak_flops_for_device(torch.cuda.get_device_name())
