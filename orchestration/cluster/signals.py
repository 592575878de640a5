"""Stop signals as a flag the training loop polls between steps.

A signal to any process of a job must end with every rank checkpointing the same step: the
handler only records the signal, the loop votes on it in the step's all-reduce
(``orchestration/loop/trainer.py``), and every rank saves and exits. The signals, and who
sends them:

- SIGUSR1: our sbatch scripts' ``--signal`` (the time-limit warning), ``launch/local.sh``;
- SIGUSR2: submitit's preemption signal (the Hydra submitit launcher);
- SIGTERM: ``scancel``, preemption with GraceTime, torchrun passing on its own SIGTERM;
- SIGINT (Ctrl-C) and SIGHUP (the terminal closed), which torchrun passes on too. A *second*
  SIGINT aborts at once (KeyboardInterrupt), as a user pressing Ctrl-C twice expects.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from types import FrameType
from typing import Any

#: The preemption signals a cluster sends (``Cluster.preemption_signals``).
DEFAULT_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
#: Ctrl-C and a closed terminal: "checkpoint and stop" too (torchrun passes both on).
INTERACTIVE_SIGNALS = (signal.SIGINT, signal.SIGHUP)
#: Every signal that means "checkpoint and stop" to a training rank.
STOP_SIGNALS = (*DEFAULT_SIGNALS, *INTERACTIVE_SIGNALS)

_early: PreemptionSignal | None = None


class PreemptionSignal:
    """Turns stop signals into a flag the training loop polls between steps.

    The handler does nothing but record the signal: raising from a signal handler in the
    middle of a collective or a checkpoint write would leave ranks out of step and the
    checkpoint torn. Installing needs the main thread (a CPython rule). Use as a context
    manager, or call :meth:`uninstall` to restore the previous handlers. A signal caught by
    :func:`catch_early` before this was installed is taken over.
    """

    def __init__(self, signals: tuple[int, ...] = DEFAULT_SIGNALS, install: bool = True):
        self.signals = tuple(signals)
        self.signal_name: str | None = None
        self.received_at: float | None = None
        self.interrupts = 0
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
        early = _early
        if early is not None and early is not self and early.requested:
            if self.signal_name is None:
                self.signal_name, self.received_at = early.signal_name, early.received_at
                self.interrupts = early.interrupts
            early.clear()  # taken over: a later job of the same process must not see it

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def clear(self) -> None:
        self.signal_name = self.received_at = None
        self.interrupts = 0

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                raise KeyboardInterrupt("a second SIGINT: aborting without a checkpoint")
        if self.signal_name is None:  # keep the first: it says why the job is stopping
            self.signal_name = signal.Signals(signum).name
            self.received_at = time.time()
            _say(f"rank {os.environ.get('RANK', 0)} (pid {os.getpid()}): "
                 f"{self.signal_name}: finishing the step, then every rank saves a checkpoint "
                 "and stops" + (" (Ctrl-C again aborts)" if signum == signal.SIGINT else ""))

    def __enter__(self) -> PreemptionSignal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()


def catch_early(signals: tuple[int, ...] = STOP_SIGNALS) -> PreemptionSignal:
    """Record stop signals from the start of the process, before the loop exists.

    Without it a SIGTERM (or a USR1 that torchrun passes on) during the imports, the dataset
    build or the resume kills the rank with nothing saved and its peers hang; with it the
    signal is kept and the first step ends with the stop checkpoint.
    """
    global _early
    if _early is None:
        _early = PreemptionSignal(signals)
    return _early


def ignore_while_exiting(signals: tuple[int, ...] = (*DEFAULT_SIGNALS, signal.SIGHUP)) -> None:
    """Ignore stop signals once the run has ended (all steps done, or the stop checkpoint saved).

    A stop signal then has nothing left to stop, yet it still arrives: ``scancel`` and a
    requeue send SIGTERM, which ``launch/node.sh`` passes on as SIGUSR1, seconds after the stop
    checkpoint. CPython resets every handler it installed to SIG_DFL while it finalizes (it
    leaves SIG_IGN), so such a signal during the exit (W&B's flush, process groups torn down)
    killed the rank: exit -10, torchrun reporting a failure after a clean stop. SIGINT keeps
    its default: Ctrl-C still ends an exit that hangs.
    """
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)


def _say(text: str) -> None:
    """One line on stderr from a signal handler: no logging locks, and never fatal."""
    with contextlib.suppress(OSError):
        os.write(2, (text + "\n").encode())


def unhandled_by(pid: int, signals: tuple[int, ...]) -> list[str]:
    """The ``signals`` that process ``pid`` neither catches nor ignores (so one of them ends
    it): read from ``/proc/PID/status``; empty where that cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as file:
            status = file.read()
    except OSError:
        return []
    masks = {}
    for name in ("SigCgt", "SigIgn"):
        found = re.search(rf"^{name}:\s*([0-9a-fA-F]+)", status, re.MULTILINE)
        if not found:
            return []
        masks[name] = int(found.group(1), 16)
    handled = masks["SigCgt"] | masks["SigIgn"]
    return [signal.Signals(s).name for s in signals if not handled & (1 << (int(s) - 1))]
