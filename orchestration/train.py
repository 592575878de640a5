"""Entry point: ``python -m orchestration.train [experiment=NAME] [key=value ...]``.

Under torchrun every rank runs this module; run alone it is a single-process job. Hydra composes
``conf/config.yaml`` with the chosen groups and overrides, the schema type-checks it, and
:func:`run` trains. ``--cfg job`` prints the resolved config without training; ``-m`` sweeps.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from orchestration.config import RunConfig, register_configs, to_dict, to_run_config, validate

log = logging.getLogger("orchestration.train")
register_configs()


def run(cfg: RunConfig) -> dict:
    """Train ``cfg`` to completion (or until asked to stop); return a summary."""
    validate(cfg)  # model/parallel rules: fail before any process group exists
    from orchestration.distributed import shutdown
    from orchestration.setup import build_training
    from orchestration.trainer import Trainer

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    objects = build_training(cfg)
    if objects.dist.is_main:
        from orchestration.stages import format_plan

        log.info("training plan:\n%s", format_plan(objects.stages))
    try:
        trainer = Trainer(cfg, objects, default_callbacks(cfg, objects))
        results = trainer.fit()
        summary = {"run_dir": str(run_dir), "final_step": trainer.step,
                   "final_loss": trainer.last_loss, "val_loss": trainer.last_val_loss,
                   "stopped": trainer.stop_requested, "failed": trainer.failed,
                   "skipped": [r.step + 1 for r in results if r.skip_reason],
                   "loss_by_step": {r.step + 1: r.loss for r in results},
                   "losses": [r.loss for r in results]}
        if objects.dist.is_main:
            log.info("done: step %d, last loss %.4f; metrics %s; checkpoints %s", trainer.step,
                     trainer.last_loss, run_dir / "metrics.jsonl", run_dir / "checkpoints")
        return summary
    finally:
        shutdown()


def default_callbacks(cfg: RunConfig, objects) -> list:
    from orchestration.flops import flops_per_token
    from orchestration.metrics import MetricsLogger
    from orchestration.recipes import recipe_callbacks
    from orchestration.standard_callbacks import (
        CheckpointCallback,
        EvalCallback,
        MetricsCallback,
        PreemptionCallback,
    )

    is_main = objects.dist.is_main
    if is_main:
        _write_run_record(cfg, objects)
    logger = MetricsLogger(Path(cfg.run_dir), cfg.logging, cfg.name, to_dict(cfg), is_main)
    peak = cfg.runtime.peak_flops_per_gpu or _detect_peak_flops(objects.dist.on_cpu)
    return [
        *recipe_callbacks(cfg, logger, is_main),
        MetricsCallback(logger, flops_per_token(cfg.model, cfg.model.seq_length), peak,
                        objects.dist.world_size),
        EvalCallback(logger),
        *_sample_gallery(cfg),
        CheckpointCallback(),
        PreemptionCallback(),
    ]


def _sample_gallery(cfg: RunConfig) -> list:
    if not (cfg.train.sample_interval and cfg.train.sample_prompts):
        return []
    from orchestration.generation import SampleGalleryCallback

    return [SampleGalleryCallback(list(cfg.train.sample_prompts), cfg.train.sample_interval,
                                  cfg.train.sample_tokens)]


def _detect_peak_flops(on_cpu: bool) -> float | None:
    if on_cpu:
        return None
    import torch

    from orchestration.flops import peak_flops_for_device

    return peak_flops_for_device(torch.cuda.get_device_name())


def _write_run_record(cfg: RunConfig, objects) -> None:
    try:
        from orchestration.run_record import write_run_record
    except ImportError:
        return
    prefixes = sorted({s.path for st in objects.stages for s in st.data.sources})
    write_run_record(Path(cfg.run_dir), to_dict(cfg), prefixes)


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(dcfg: DictConfig) -> float:
    _configure_logging()
    cfg = to_run_config(dcfg)
    summary = run(cfg)
    if summary["failed"]:
        log.error("run stopped: %s (state saved in %s)", summary["stopped"], cfg.run_dir)
        raise SystemExit(1)
    return float(summary["final_loss"])  # Hydra sweepers (e.g. Optuna) read the return value


def _configure_logging() -> None:
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stdout,
        format=f"%(asctime)s [r{rank}] %(name)s: %(message)s", datefmt="%H:%M:%S", force=True)
    # Megatron logs every bucket's parameter list at INFO; keep its warnings only.
    logging.getLogger("megatron").setLevel(logging.WARNING)


if __name__ == "__main__":
    main()
