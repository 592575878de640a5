"""Per-step metrics and run events into the metrics log (JSONL, W&B), with MFU.

MFU is logged in both attention conventions, labelled (``mfu_full_attn``: PaLM / Megatron-LM
before 2025; ``mfu_causal``: Megatron-LM's current formula; orchestration/metrics/flops.py),
for the stage's own sequence length and the vocabulary as padded for this run's TP.
"""

from __future__ import annotations

from pathlib import Path

from orchestration.callbacks.base import Callback
from orchestration.checkpoint.layout import step_of
from orchestration.config import ModelConfig
from orchestration.loop.stages import Stage, consumed_tokens
from orchestration.metrics.flops import (
    flops_per_token_by_convention,
    mfu_by_convention,
    peak_flops_for_device,
)
from orchestration.metrics.logger import MetricsLogger


class MetricsCallback(Callback):
    """Writes every step to the metrics log; prints every ``train.log_interval`` steps."""

    name = "metrics"
    order = 20

    def __init__(self, logger: MetricsLogger, model: ModelConfig, tensor_parallel: int,
                 peak_flops: float | None, num_gpus: int) -> None:
        self.logger = logger
        self.model = model
        self.tensor_parallel = tensor_parallel
        self.peak_flops = peak_flops
        self.num_gpus = num_gpus

    @classmethod
    def from_config(cls, context, **options) -> MetricsCallback:
        cfg = context.cfg
        peak = cfg.runtime.peak_flops_per_gpu or _detect_peak_flops(context.on_cpu)
        return cls(context.logger, cfg.model, cfg.parallel.tensor, peak, context.world_size,
                   **options)

    def flops_per_token(self, stage: Stage) -> dict[str, float]:
        """Both conventions at the stage's sequence length, vocabulary padded for this TP."""
        return flops_per_token_by_convention(self.model, stage.seq_length, self.tensor_parallel)

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
            "step_time_s": result.step_time_s, "skipped": result.skip_reason,
            "global_batch_size": batch_size, **result.extra,
        }
        per_token = self.flops_per_token(result.stage)
        record |= {f"flops_per_token_{name}": v for name, v in per_token.items()}
        if self.peak_flops:
            record |= mfu_by_convention(tokens_per_s, per_token, self.num_gpus, self.peak_flops)
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
