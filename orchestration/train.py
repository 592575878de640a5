"""``python -m orchestration.train [experiment=NAME] [key=value ...]``: train.

Under torchrun every rank runs this module; run alone it is a single-process job. Hydra composes
``conf/config.yaml`` with the chosen groups and overrides, the schema type-checks it, and
:func:`orchestration.loop.run.run` trains. ``--cfg job`` prints the resolved config without
training; ``--explain`` prints what Megatron-Core would receive on a GPU node
(``orchestration.explain``); ``-m`` sweeps.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from orchestration.cluster.parent_watch import die_with_launcher
from orchestration.cluster.signals import catch_early, ignore_while_exiting
from orchestration.cluster.streams import guard_standard_streams
from orchestration.common.quiet import install_warning_filters
from orchestration.config import register_configs, to_run_config
from orchestration.loop.run import default_callbacks, run

__all__ = ["default_callbacks", "main", "run"]
log = logging.getLogger("orchestration.train")
register_configs()


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(dcfg: DictConfig) -> float:
    install_warning_filters()  # before megatron-core is imported (its notices fire on import)
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
    catch_early()  # a stop signal during start-up is kept for the first step, not fatal
    guard_standard_streams()  # a reader of our output that goes away must not end a save
    if "--explain" in sys.argv[1:]:
        from orchestration.explain import main as explain_main

        raise SystemExit(explain_main([a for a in sys.argv[1:] if a != "--explain"]))
    die_with_launcher()  # before anything slow: an orphaned rank must not start training
    main()
    ignore_while_exiting()  # the run has ended: a late stop signal must not fail its exit
