"""Callbacks for the training recipes a config turns on (loss-spike skipping, replay, ...)."""

from __future__ import annotations

from orchestration.callbacks import Callback
from orchestration.config import RunConfig
from orchestration.metrics import MetricsLogger


def recipe_callbacks(cfg: RunConfig, logger: MetricsLogger, is_main: bool) -> list[Callback]:
    from orchestration.skipping import SkipBatchesCallback

    return [SkipBatchesCallback(cfg, logger, is_main)]
