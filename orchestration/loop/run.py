"""One training run from a typed config: build, train, summarise, shut down."""

from __future__ import annotations

import logging
from pathlib import Path

from orchestration.config import RunConfig, to_dict, validate

log = logging.getLogger("orchestration.train")


def run(cfg: RunConfig) -> dict:
    """Train ``cfg`` to completion (or until asked to stop); return a summary."""
    validate(cfg)  # model/parallel rules: fail before any process group exists
    from megatron_patches.parallel import shutdown
    from orchestration.loop.run_lock import lock_run_dir
    from orchestration.loop.session import build_session
    from orchestration.loop.stages import describe_stages
    from orchestration.loop.trainer import Trainer

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    session = build_session(cfg)
    lock = None
    try:
        lock = lock_run_dir(run_dir, session.dist.cluster.job_info().get("job_id"),
                            session.dist.is_main)
        if session.dist.is_main:
            log.info("training plan:\n%s", describe_stages(session.stages))
        trainer = Trainer(cfg, session, default_callbacks(cfg, session))
        results = trainer.fit()
        summary = {"run_dir": str(run_dir), "final_step": trainer.step,
                   "final_loss": trainer.last_loss, "val_loss": trainer.last_val_loss,
                   "stopped": trainer.control.stop, "failed": trainer.control.failed,
                   "skipped": [r.step for r in results if r.skip_reason],
                   "loss_by_step": {r.step: r.loss for r in results},
                   "losses": [r.loss for r in results]}
        if session.dist.is_main:
            log.info("done: step %d, last loss %.4f; metrics %s; checkpoints %s", trainer.step,
                     trainer.last_loss, run_dir / "metrics.jsonl", run_dir / "checkpoints")
        return summary
    finally:
        if lock is not None:
            lock.release()
        shutdown()


def default_callbacks(cfg: RunConfig, session) -> list:
    """The run's callbacks from ``cfg.callbacks`` and the defaults (callbacks/registry.py);
    on the main rank, this job start's run record first."""
    from orchestration.callbacks.registry import CallbackContext, build_callbacks
    from orchestration.metrics.logger import MetricsLogger

    is_main = session.dist.is_main
    if is_main:
        from orchestration.metrics.run_record import write_run_record

        prefixes = sorted({s.path for st in session.stages for s in st.data.sources})
        try:
            write_run_record(Path(cfg.run_dir), to_dict(cfg), prefixes)
        except OSError as err:  # e.g. a full disk: the record must not stop a resume
            log.warning("could not write the run record under %s/record (%s); training "
                        "continues without this job start's record", cfg.run_dir, err)
    logger = MetricsLogger(Path(cfg.run_dir), cfg.logging, cfg.name, to_dict(cfg), is_main)
    context = CallbackContext(cfg, logger, is_main, session.dist.world_size, session.dist.on_cpu)
    return build_callbacks(context)
