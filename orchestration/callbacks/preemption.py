"""SIGUSR1/SIGTERM (SLURM's time-limit warning, preemption), Ctrl-C: finish the step,
checkpoint, stop, then ask the cluster to requeue the job."""

from __future__ import annotations

import logging
import os

from orchestration.callbacks.base import Callback
from orchestration.cluster.parent_watch import launched_by_torchrun
from orchestration.cluster.signals import INTERACTIVE_SIGNALS, PreemptionSignal, unhandled_by

log = logging.getLogger(__name__)
#: What torchrun must handle (``--signals-to-handle``) to pass a USR1/USR2 sent to it on.
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2"


class PreemptionCallback(Callback):
    """Installs the stop-signal handlers and votes to stop once one arrives; the loop reduces
    the vote in the step's all-reduce, so every rank stops after the same step and the loop
    checkpoints it. Rank 0 then requeues the job."""

    name = "preemption"
    order = 90

    def __init__(self) -> None:
        self.signal: PreemptionSignal | None = None

    def on_fit_start(self, trainer) -> None:
        signals = trainer.session.dist.cluster.preemption_signals()
        self.signal = PreemptionSignal(tuple(dict.fromkeys((*signals, *INTERACTIVE_SIGNALS))))
        if launched_by_torchrun() and os.environ.get("LOCAL_RANK") == "0":
            _warn_if_torchrun_drops(signals)

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


def _warn_if_torchrun_drops(signals: tuple) -> None:
    """torchrun catches TERM/INT/HUP/QUIT by default and passes them on to the ranks; a USR1 or
    USR2 sent to it, without ``--signals-to-handle``, kills it and so the job, unsaved."""
    fatal = unhandled_by(os.getppid(), signals)
    if fatal:
        log.warning("torchrun (pid %d) neither handles nor ignores %s: one sent to it ends the "
                    "job without a checkpoint. Start it with --signals-to-handle=%s (launch/"
                    "local.sh and launch/node.sh do), or signal the ranks.", os.getppid(),
                    ", ".join(fatal), TORCHRUN_SIGNALS)
