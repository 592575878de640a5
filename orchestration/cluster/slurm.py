"""SLURM as a :class:`~orchestration.cluster.base.Cluster`: job facts, rank env, self-requeue.

How preemption works end to end (see docs/slurm.md): the sbatch scripts ask SLURM for
``--signal=USR1@120``, i.e. SIGUSR1 to every process of the job steps 120 s before the time
limit (``torchrun`` itself ignores it, see launch/node.sh). Each rank's
:class:`~orchestration.cluster.signals.PreemptionSignal` only sets a flag; the loop reduces the
flag across ranks, finishes the current step, saves a checkpoint and then rank 0 calls
:meth:`SlurmCluster.requeue`. The requeued job starts from scratch with the same job id and run
dir, and the trainer resumes from the newest complete checkpoint. Nothing here makes collective
calls: the loop owns those.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

from orchestration.cluster.nodelist import expand_nodelist
from orchestration.cluster.signals import DEFAULT_SIGNALS

log = logging.getLogger(__name__)

# Written into the run dir when scontrol is unreachable (e.g. inside a pyxis container);
# launch/common.sh requeues the job from the batch shell, on the host, after srun returns.
REQUEUE_REQUEST_FILE = "requeue.request"


def in_slurm() -> bool:
    """True inside a SLURM allocation (batch script, srun step or submitit task)."""
    return "SLURM_JOB_ID" in os.environ


def _int_env(name: str, default: int | None = None) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.strip().lstrip("-").isdigit() else default


def slurm_info() -> dict[str, Any]:
    """The job facts worth logging and recording; empty values when not under SLURM.

    ``restart_count`` is SLURM_RESTART_COUNT: how many times this job was requeued (0 on the
    first start), so logs and W&B can tell a fresh start from a resume.
    """
    env = os.environ
    node_list = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", ""))
    return {
        "job_id": env.get("SLURM_JOB_ID"),
        "array_job_id": env.get("SLURM_ARRAY_JOB_ID"),
        "array_task_id": _int_env("SLURM_ARRAY_TASK_ID"),
        "job_name": env.get("SLURM_JOB_NAME"),
        "partition": env.get("SLURM_JOB_PARTITION"),
        "node_list": node_list,
        "nodes": expand_nodelist(node_list) if node_list else [],
        "num_nodes": _int_env("SLURM_JOB_NUM_NODES", _int_env("SLURM_NNODES")),
        "node_id": _int_env("SLURM_NODEID"),
        "restart_count": _int_env("SLURM_RESTART_COUNT", 0),
        "submit_dir": env.get("SLURM_SUBMIT_DIR"),
    }


def master_port(job_id: int | str | None) -> int:
    """Rendezvous port derived from the job id (same rule as launch/common.sh).

    10000-29999 stays below Linux's ephemeral range (32768+), and two jobs sharing a node
    get different ports unless their ids differ by a multiple of 20000.
    """
    return 10000 + int(job_id or 0) % 20000


def torch_distributed_env() -> dict[str, str]:
    """RANK/WORLD_SIZE/MASTER_* from SLURM_* for one-task-per-GPU launches (submitit, srun).

    torchrun sets these itself; this is for the Hydra submitit launcher, whose tasks are the
    ranks. Returns {} when RANK is already set or when not inside a SLURM step.
    """
    env = os.environ
    if "RANK" in env or "SLURM_PROCID" not in env:
        return {}
    nodes = expand_nodelist(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")) or "")
    return {
        "RANK": env["SLURM_PROCID"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "WORLD_SIZE": env.get("SLURM_NTASKS", "1"),
        "LOCAL_WORLD_SIZE": env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0],
        "MASTER_ADDR": env.get("MASTER_ADDR", nodes[0] if nodes else "127.0.0.1"),
        "MASTER_PORT": env.get("MASTER_PORT", str(master_port(env.get("SLURM_JOB_ID")))),
    }


def requeue_job(job_id: str | None = None, run_dir: str | Path | None = None) -> bool:
    """Ask SLURM to requeue this job (``scontrol requeue <id>``); True when it accepted.

    Call it on one rank, after the checkpoint is complete on every rank: SLURM then stops
    the job's processes and puts the job back in the queue with the same id. Returns False,
    with a warning, outside SLURM, without ``scontrol`` (e.g. in a container) or when it
    fails (e.g. the job was submitted with --no-requeue). In those cases, if ``run_dir`` is
    given, a ``requeue.request`` file is left there for the batch script to act on.
    """
    job_id = job_id or os.environ.get("SLURM_JOB_ID")
    if not job_id:
        log.warning("requeue_job: not running under SLURM (no SLURM_JOB_ID)")
        return False
    ok = _scontrol_requeue(job_id)
    if not ok and run_dir is not None:
        path = Path(run_dir) / REQUEUE_REQUEST_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{job_id}\n")
        log.warning("requeue_job: left %s for the batch script to requeue job %s", path, job_id)
    return ok


def _scontrol_requeue(job_id: str) -> bool:
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        log.warning("requeue_job: scontrol not found on PATH; job %s not requeued", job_id)
        return False
    try:
        proc = subprocess.run(
            [scontrol, "requeue", job_id], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("requeue_job: scontrol requeue %s failed: %s", job_id, exc)
        return False
    if proc.returncode != 0:
        log.warning(
            "requeue_job: scontrol requeue %s exited %d: %s",
            job_id,
            proc.returncode,
            (proc.stderr or proc.stdout).strip(),
        )
        return False
    log.info("requeue_job: job %s requeued", job_id)
    return True


class SlurmCluster:
    """Inside a SLURM allocation (batch script, srun step or submitit task)."""

    name = "slurm"

    @staticmethod
    def detect() -> bool:
        return in_slurm()

    def rank_env(self) -> dict[str, str]:
        return torch_distributed_env()

    def job_info(self) -> dict[str, Any]:
        return {"cluster": self.name, **slurm_info()}

    def preemption_signals(self) -> tuple[signal.Signals, ...]:
        return DEFAULT_SIGNALS

    def requeue(self, run_dir: str | os.PathLike | None = None) -> bool:
        return requeue_job(run_dir=run_dir)
