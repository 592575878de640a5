"""Downstream benchmarks during training: a small lm-eval task list on the just-saved
checkpoint, every ``every_steps`` steps, logged with the run's metrics.

Why the saved checkpoint in a child process, not the live model: the live model is split over
TP/PP ranks and wrapped for training, while lm-eval's ``hf`` model needs one whole model. The
child (``python -m orchestration.evaluate CKPT``, started by rank 0 only) exports the
checkpoint, which ``dist_checkpointing`` reshards from disk at any TP/PP, so the hook works
with every layout; training continues meanwhile (nothing waits on rank 0, no collective is
involved), a crash or an out-of-memory in lm-eval cannot take the run down, and the results
land in ``<run_dir>/eval/<step_dir>/results.json``, the same cache ``launch/eval.sbatch``
uses. The cost: the score arrives a little after the step, and the checkpoint must still be
there when the child reads it (it is loaded at once; keep ``checkpoint.keep_last`` >= 2).

Configure as ``callbacks: {lm_eval: {tasks: [tiny_mc], every_steps: 500, limit: 100}}``; the
other keys are ``EvalOptions``' (``device`` defaults to ``cpu`` here, so the child never
competes with training for GPU memory; set ``cuda`` on nodes with a spare GPU).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from orchestration.callbacks.base import Callback
from orchestration.checkpoint.layout import step_of
from orchestration.common.paths import REPO_DIR
from orchestration.config import ConfigError
from orchestration.evaluation import results as store
from orchestration.evaluation.options import EvalOptions, to_cli_args

log = logging.getLogger(__name__)
#: Rank variables of the training job: lm-eval's accelerate would join a process group.
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
            "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "ACCELERATE_USE_CPU")


class LmEvalCallback(Callback):
    name = "lm_eval"
    order = 15  # on_fit_end before the metrics callback closes the logger

    def __init__(self, logger, tasks: list[str], every_steps: int = 0, include: list[str] = (),
                 wait_at_end: bool = True, **options: Any) -> None:
        self.logger = logger  # orchestration.metrics.logger.MetricsLogger
        self.tasks = list(tasks)
        self.every_steps = every_steps
        self.include = [str(p) for p in include]
        self.wait_at_end = wait_at_end
        self.options = EvalOptions(**{"device": "cpu", **options})
        self.running: list[tuple[int, Path, subprocess.Popen]] = []

    @classmethod
    def from_config(cls, context, **options: Any) -> LmEvalCallback | None:
        if not options.get("tasks"):
            raise ConfigError("callbacks.lm_eval.tasks: give at least one lm-eval task")
        interval = context.cfg.checkpoint.save_interval
        every = options.get("every_steps", 0)
        if every and (interval <= 0 or every % interval):
            raise ConfigError(f"callbacks.lm_eval.every_steps={every} is not a multiple of "
                              f"checkpoint.save_interval={interval}: it scores saved checkpoints")
        return cls(context.logger, **options) if context.is_main else None

    def on_checkpoint(self, trainer, path: Path) -> None:
        step = step_of(Path(path))
        if step == 0 or (self.every_steps and step % self.every_steps):
            return
        log_file = store.results_dir(trainer.run_dir, Path(path).name) / "lm_eval.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "orchestration.evaluate", str(path),
               "--tasks", ",".join(self.tasks), *to_cli_args(self.options)]
        for directory in self.include:
            cmd += ["--include", directory]
        env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
        with open(log_file, "a") as out:
            proc = subprocess.Popen(cmd, cwd=REPO_DIR, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.running.append((step, log_file, proc))
        log.info("lm_eval: scoring %s on %s in pid %d (log %s)", path.name, self.tasks,
                 proc.pid, log_file)

    def after_step(self, trainer, result) -> None:
        self._collect(trainer, wait=False)

    def on_fit_end(self, trainer) -> None:
        if self.wait_at_end and trainer.control.stop is None:
            self._collect(trainer, wait=True)
            return
        for _, _, proc in self.running:  # preempted: the job must exit within its grace time
            proc.terminate()
        self._collect(trainer, wait=True)

    def _collect(self, trainer, wait: bool) -> None:
        """Log the scores of the children that have finished (all of them with ``wait``)."""
        still = []
        for step, log_file, proc in self.running:
            if wait:
                proc.wait()
            if proc.poll() is None:
                still.append((step, log_file, proc))
            elif proc.returncode != 0:
                log.warning("lm_eval of step %d failed (exit %d): see %s", step,
                            proc.returncode, log_file)
            else:
                self._log(trainer, step, log_file.parent / store.RESULTS_FILE)
        self.running = still

    def _log(self, trainer, step: int, path: Path) -> None:
        scores = store.metrics(store.read_results(path), self.tasks)
        record = {"step": trainer.step, "lm_eval/checkpoint_step": step}
        record.update({f"lm_eval/{name}": value for name, value in scores.items()})
        self.logger.log(record)
