"""One job per run directory: an exclusive lock held by rank 0 for the life of the job.

Two jobs in one run dir interleave their metrics and overwrite each other's checkpoints. The
lock is ``flock`` on ``<run_dir>/.lock``, which the kernel (or the Lustre/NFS lock manager)
releases when the holding process dies, so a crashed or killed job never blocks the next one;
the file records the holder (host, pid, job id, start time) for the error message. A requeued
SLURM job keeps its job id: when the holder recorded is this very job, its previous instance is
gone (a node that died without the lock server noticing), and the lock is taken over; so is a
lock whose recorded holder is a dead process on this host (a forked writer outlived it).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_patches.parallel import comm_device


class RunDirLocked(RuntimeError):
    """Another live job holds the run directory."""


class RunLock:
    def __init__(self, run_dir: Path, job_id: str | None) -> None:
        self.path = Path(run_dir) / ".lock"
        self.job_id = job_id
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder()
                os.close(fd)
                if self._stale(holder):
                    self.path.unlink(missing_ok=True)  # its holder is gone: take over
                    continue
                raise RunDirLocked(self._message(holder)) from None
            self._fd = fd
            self._record()
            return
        raise RunDirLocked(f"{self.path}: could not take over the lock of job {self.job_id}")

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def _record(self) -> None:
        info = {"host": socket.gethostname(), "pid": os.getpid(), "job_id": self.job_id,
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(self._fd)

    def _stale(self, holder: dict) -> bool:
        """The holder is this very (requeued) job, or a dead process on this host whose lock
        lives on in a forked child (an orphaned background checkpoint writer)."""
        if self.job_id and str(holder.get("job_id")) == str(self.job_id):
            return True
        if holder.get("host") == socket.gethostname() and holder.get("pid"):
            try:
                os.kill(int(holder["pid"]), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, ValueError):
                return False
        return False

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _message(self, holder: dict) -> str:
        who = (f"host {holder.get('host', '?')} pid {holder.get('pid', '?')}"
               + (f" (SLURM job {holder['job_id']})" if holder.get("job_id") else "")
               + (f" since {holder['since']}" if holder.get("since") else ""))
        return (f"run_dir {self.path.parent} is in use by {who}: two jobs in one run dir "
                "corrupt each other's checkpoints and logs. Wait for it, stop it, or choose "
                "another run_dir.")


def lock_run_dir(run_dir: Path, job_id: str | None, is_main: bool) -> RunLock | None:
    """Rank 0 takes the lock; every rank learns whether it did and fails together if not."""
    lock, error = None, None
    if is_main:
        try:
            lock = RunLock(run_dir, job_id)
            lock.acquire()
        except RunDirLocked as err:
            lock, error = None, err
    if dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([0 if (is_main and error) else 1], dtype=torch.int32,
                            device=comm_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if not flag.item() and error is None:
            raise RunDirLocked(f"run_dir {run_dir} is in use by another job (see rank 0)")
    if error is not None:
        raise error
    return lock
