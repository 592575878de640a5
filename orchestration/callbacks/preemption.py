"""SIGUSR1/SIGTERM (SLURM's time-limit warning, preemption): finish the step, checkpoint, stop,
then ask the cluster to requeue the job."""

from __future__ import annotations

import logging

from orchestration.callbacks.base import Callback
from orchestration.cluster.signals import PreemptionSignal

log = logging.getLogger(__name__)


class PreemptionCallback(Callback):
    """Installs the cluster's preemption signal handlers and votes to stop once one arrives;
    the loop reduces the vote in the step's all-reduce, so every rank stops after the same step
    and the loop checkpoints it. Rank 0 then requeues the job."""

    name = "preemption"
    order = 90

    def __init__(self) -> None:
        self.signal: PreemptionSignal | None = None

    def on_fit_start(self, trainer) -> None:
        self.signal = PreemptionSignal(trainer.session.dist.cluster.preemption_signals())

    def poll_stop(self, trainer) -> str | None:
        if self.signal is not None and self.signal.signal_name:
            return f"signal {self.signal.signal_name}"
        return None

    def on_fit_end(self, trainer) -> None:
        if self.signal is not None:
            self.signal.uninstall()
        if trainer.stopped_by_vote and trainer.is_main:
            requeued = trainer.session.dist.cluster.requeue(trainer.run_dir)
            if trainer.session.dist.cluster.name != "local":
                log.info("stopped on %s at step %d; requeue %s", trainer.control.stop,
                         trainer.step, "requested" if requeued else "not possible (see warning)")
