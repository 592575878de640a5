"""Preemption signals as a flag the training loop polls between steps."""

from __future__ import annotations

import signal
import time
from types import FrameType
from typing import Any

#: USR1: our sbatch scripts' --signal. USR2: submitit's default preemption signal (the Hydra
#: submitit launcher). TERM: preemption with GraceTime, scancel, or the final kill warning.
DEFAULT_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


class PreemptionSignal:
    """Turns preemption signals into a flag the training loop polls between steps.

    The handler does nothing but record the signal: raising from a signal handler in the
    middle of a NCCL collective or a checkpoint write would leave ranks out of step and the
    checkpoint torn. Installing needs the main thread (a CPython rule). Use as a context
    manager, or call :meth:`uninstall` to restore the previous handlers.
    """

    def __init__(self, signals: tuple[int, ...] = DEFAULT_SIGNALS, install: bool = True):
        self.signals = tuple(signals)
        self.signal_name: str | None = None
        self.received_at: float | None = None
        self._previous: dict[int, Any] = {}
        if install:
            self.install()

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def install(self) -> None:
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def clear(self) -> None:
        self.signal_name = self.received_at = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is None:  # keep the first: it says why the job is stopping
            self.signal_name = signal.Signals(signum).name
            self.received_at = time.time()

    def __enter__(self) -> PreemptionSignal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()
