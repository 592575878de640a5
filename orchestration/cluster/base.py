"""The interface a launcher implements, and the plain local machine as its simplest case.

What the training process needs from whatever started it:

- ``rank_env()``: RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* when the launcher starts one process per
  rank itself (srun tasks, submitit) rather than through torchrun, which sets them;
- ``job_info()``: the facts worth recording (job id, nodes, restart count) for the run record;
- ``preemption_signals()``: the signals that mean "checkpoint and stop";
- ``requeue(run_dir)``: put the job back in the queue after a clean stop (True if done).

:func:`detect_cluster` picks the first entry of :data:`CLUSTERS` whose ``detect()`` is true.
"""

from __future__ import annotations

import os
import signal
import socket
from typing import Any, Protocol


class Cluster(Protocol):
    name: str

    @staticmethod
    def detect() -> bool: ...

    def rank_env(self) -> dict[str, str]: ...

    def job_info(self) -> dict[str, Any]: ...

    def preemption_signals(self) -> tuple[signal.Signals, ...]: ...

    def requeue(self, run_dir: str | os.PathLike | None = None) -> bool: ...


class LocalCluster:
    """A machine with no scheduler: torchrun or a plain ``python`` process; nothing requeues."""

    name = "local"

    @staticmethod
    def detect() -> bool:
        return True

    def rank_env(self) -> dict[str, str]:
        return {}

    def job_info(self) -> dict[str, Any]:
        return {"cluster": self.name, "job_id": None, "restart_count": 0,
                "nodes": [socket.gethostname()]}

    def preemption_signals(self) -> tuple[signal.Signals, ...]:
        from orchestration.cluster.signals import DEFAULT_SIGNALS

        return DEFAULT_SIGNALS

    def requeue(self, run_dir=None) -> bool:
        return False


def _slurm():
    from orchestration.cluster.slurm import SlurmCluster

    return SlurmCluster


#: Checked in order; the local machine last, as the fallback.
CLUSTERS: list = [_slurm, lambda: LocalCluster]


def detect_cluster() -> Cluster:
    for entry in CLUSTERS:
        cls = entry()
        if cls.detect():
            return cls()
    return LocalCluster()
