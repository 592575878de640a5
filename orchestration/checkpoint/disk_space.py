"""Full disks, said plainly.

A save that runs out of space fails deep inside ``torch.save`` or the checkpoint writer with
messages such as ``enforce fail at inline_container.cc:672 . unexpected pos 704 vs 598``, which
do not say "disk". Here a failed save is checked against the free space where it was being
written; when the disk is full, the partial ``*.tmp`` is removed and the error names the path,
the free space and the size the previous checkpoint took. Before each save a warning is logged
when the free space is below that size.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)
FULL_MESSAGES = ("no space left", "unexpected pos", "disk quota exceeded", "file too large")


class DiskFullError(OSError):
    """A checkpoint could not be written because its filesystem is full."""


def free_bytes(path: Path) -> int:
    path = Path(path)
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def directory_bytes(path: Path) -> int:
    """Bytes in the files under ``path`` (0 when it does not exist)."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(folder, name)).st_size
            except OSError:
                continue
    return total


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def warn_if_short(root: Path, expected: int) -> None:
    """Warn before a save whose expected size (the previous checkpoint's) exceeds free space."""
    free = free_bytes(root)
    if expected and free < expected:
        log.warning("only %s free on %s, and the previous checkpoint took %s: this save is "
                    "likely to fail for lack of space", mib(free), root, mib(expected))


def looks_full(err: BaseException, root: Path, expected: int) -> bool:
    """Whether ``err`` (or what caused it) is a full disk, or the disk is full now anyway."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(seen).lower() for text in FULL_MESSAGES):
            return True
        seen = seen.__cause__ or seen.__context__
    return free_bytes(root) < max(expected, 1 << 20)


def disk_full_error(final: Path, tmp: Path, expected: int) -> DiskFullError:
    """Remove the partial ``tmp`` and describe the full disk (call on the failing rank)."""
    shutil.rmtree(tmp, ignore_errors=True)
    free = free_bytes(final.parent)
    size = f"; the previous checkpoint took {mib(expected)}" if expected else ""
    return DiskFullError(
        errno.ENOSPC,
        f"checkpoint {final} was not saved: the disk is full ({mib(free)} free on "
        f"{final.parent}{size}). The partial {tmp.name} was removed and the previous "
        "checkpoints are intact: free space (or point run_dir elsewhere) and rerun; the job "
        "resumes from the newest complete checkpoint.")
