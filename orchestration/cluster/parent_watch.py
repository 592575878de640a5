"""A rank dies with the launcher that started it.

torchrun starts each worker in a session of its own (``start_new_session=True`` in
``torch.distributed.elastic``), so ``kill -9`` of torchrun, or of its process group, leaves the
ranks training; a restarted job then shares the run dir with the orphans (two writers of
``metrics.jsonl`` and of the checkpoints). Under torchrun a rank therefore asks the kernel to
kill it when its parent dies (``PR_SET_PDEATHSIG``), and a watchdog thread covers what that
misses: a parent that died before the request, or a parent thread other than the one that
forked. SIGKILL rather than a graceful stop, because the other ranks are dying too, so the
stop checkpoint's collectives could not complete; checkpoints are atomic, so the newest
complete one is what the next job resumes from.

A process that a rank forks (Megatron's background checkpoint writer and its write workers)
asks for the same: a writer whose rank is gone can never publish its checkpoint, and without
it such a writer finishes its shards, or hangs, after the job is gone.

A plain ``python -m orchestration.train`` is left alone: ``nohup ... &`` from a shell that
then exits must keep training.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
POLL_SECONDS = 1.0


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def die_with_launcher(poll_seconds: float = POLL_SECONDS) -> bool:
    """Under torchrun, make this process die when its parent does; return whether armed."""
    if not launched_by_torchrun():
        return False
    parent = os.getppid()
    if not _kill_me_with_parent():
        log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d); relying on the watchdog",
                    ctypes.get_errno())
    if os.getppid() != parent or parent == 1:  # the launcher died before the request
        _die(parent)
    threading.Thread(target=_watch, args=(parent, poll_seconds), daemon=True,
                     name="parent-watch").start()
    os.register_at_fork(before=_note_forking_pid, after_in_child=_forked_child_dies_with_parent)
    return True


def _kill_me_with_parent() -> bool:
    """PR_SET_PDEATHSIG=SIGKILL for this process; False where it failed (or not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL,
                                                   0, 0, 0) == 0


_forking_pid = 0


def _note_forking_pid() -> None:
    global _forking_pid
    _forking_pid = os.getpid()


def _forked_child_dies_with_parent() -> None:
    """In a child forked from a rank (or from such a child): die with the process that forked
    it. The kernel clears PR_SET_PDEATHSIG on fork, so each child asks again."""
    _kill_me_with_parent()
    if os.getppid() != _forking_pid:  # the parent died before the request took effect
        os._exit(1)


def _watch(parent: int, poll_seconds: float) -> None:
    while os.getppid() == parent:
        time.sleep(poll_seconds)
    _die(parent)


def _die(parent: int) -> None:
    print(f"rank {os.environ.get('RANK', '?')} (pid {os.getpid()}): its launcher (pid "
          f"{parent}) is gone; exiting so that no orphan rank keeps training",
          file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
