"""The checkpoint-writer helper's own start-up (megatron_patches/writer_queue.py), stdlib only.

The helper is a ``spawn``ed Manager process that runs :func:`harden_server` first. Spawning
imports the initializer's module in the new interpreter; keeping it free of megatron keeps
Megatron's import-time notices (and its import time) out of that process.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

#: The signals that mean "checkpoint and stop" to a rank (orchestration.cluster.signals), plus
#: the ones torchrun forwards by default; none of them may end the writer's helper.
SHIELDED = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
                      signal.SIGUSR1, signal.SIGUSR2})
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def harden_server(parent: int) -> None:
    """In the Manager process: ignore the stop signals, die with the rank that started it."""
    for sig in SHIELDED:
        signal.signal(sig, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the rank died before the request took effect
        os._exit(0)
