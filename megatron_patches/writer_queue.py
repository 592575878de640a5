"""Megatron's checkpoint-writer helper process: deaf to stop signals, dead with its rank.

Why this patch: every ``torch_dist`` save of Megatron-Core 0.16, sync or async, goes through
``FileSystemWriterAsync``, which collects the write results through a queue served by a
``multiprocessing`` Manager (``filesystem_async._get_write_results_queue``). That server is a
``spawn``ed child of the rank, created at the first save, and it lives in the rank's process
group. torchrun starts each worker as a process-group leader and stops it with
``os.killpg(worker, SIGTERM)`` (likewise ``kill -TERM -PGID``, or a terminal's SIGHUP): the rank
records the signal and writes its stop checkpoint, but the Manager takes SIGTERM's default
action and dies, so that very save fails in ``global_results_queue.put`` with
``BrokenPipeError``, leaving ``step_N.tmp`` behind and losing every step since the previous
checkpoint. And when a rank is SIGKILLed (its launcher died: ``orchestration.cluster
.parent_watch``) the Manager never exits: nothing in it watches its parent.

The fix: before Megatron creates that queue, create it from our own Manager whose server
process blocks the stop signals from birth (the blocked mask is inherited across fork and exec,
so there is no window while it imports) and ignores them once running, and which the kernel
kills when its rank dies (``PR_SET_PDEATHSIG``). The rank itself still receives every signal:
it only blocks them in its main thread for the moment the server is started, and a signal
arriving then is delivered to another thread or on unblocking, never lost. Applied in one
place, :func:`megatron_patches.checkpointing` calling :func:`shield` before each save; tests/
test_signals.py checks that the upstream symbols still exist.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
from multiprocessing import resource_tracker
from multiprocessing.managers import SyncManager

from megatron.core.dist_checkpointing.strategies import filesystem_async

# The server's side lives in a module without megatron: the spawned server process imports it
# to run its initializer, and importing megatron there would print Megatron's import-time
# notices in a process whose warning filters (orchestration.common.quiet) were never installed.
from megatron_patches.writer_server import SHIELDED, harden_server

#: What the module-level queue and its factory are called upstream (checked by a test).
UPSTREAM = (filesystem_async, "_results_queue", "_get_write_results_queue")

_manager: SyncManager | None = None


def shield() -> None:
    """Install the signal-proof results queue, once per process, before Megatron makes its own.

    Only from the main thread (signals are masked per thread); elsewhere Megatron's default
    stays, which is what it was before this patch.
    """
    global _manager
    if _manager is not None or filesystem_async._results_queue is not None:
        return
    if threading.current_thread() is not threading.main_thread():
        return
    manager = SyncManager(ctx=mp.get_context("spawn"))
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SHIELDED)
    try:
        # multiprocessing's resource tracker (another spawned helper in the rank's group)
        # ignores TERM/INT itself; started here it inherits USR1/USR2/HUP/QUIT blocked too.
        # It unblocks TERM/INT in this thread when it has started, hence the second mask.
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, SHIELDED)
        manager.start(initializer=harden_server, initargs=(os.getpid(),))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    _manager = manager
    filesystem_async._results_queue = manager.Queue()


def server_pid() -> int | None:
    """The pid of the Manager process serving the queue (None before the first save)."""
    return _manager._process.pid if _manager is not None else None
