"""Per-rank heartbeats, so that a collective timeout names the rank that did not arrive.

When one rank stalls (SIGSTOP, a hung kernel, a dead NFS mount), the healthy ranks time out in
a collective and the backend says only that *they* waited. Each rank therefore records the
step and point it reaches (the step's start, Megatron's schedule, the step's loss all-reduce)
in ``<run_dir>/heartbeats/rank_NNNNN.json``: three small atomic writes per step. On a timeout, the
ranks behind the furthest one are named, with where they were last seen.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path


def heartbeat_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "heartbeats"


class Heartbeat:
    def __init__(self, run_dir: Path, rank: int) -> None:
        self.path = heartbeat_dir(run_dir) / f"rank_{rank:05d}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_suffix(".tmp")
        self.rank = rank
        self.host = socket.gethostname()

    def beat(self, step: int, point: str = "start") -> None:
        # Renamed into place but not fsynced: a heartbeat is worth microseconds, not a disk
        # flush, and a lost one only makes a report less precise; so a failed write (a full
        # disk, filled by a background checkpoint write that will report it) is skipped.
        try:
            self.tmp.write_text(json.dumps({"rank": self.rank, "step": step, "point": point,
                                            "pid": os.getpid(), "host": self.host,
                                            "time": time.time()}))
            os.replace(self.tmp, self.path)
        except OSError:
            pass


POINTS = ("start", "schedule", "all-reduce")  # in the order a step reaches them


def laggards(run_dir: Path, world_size: int) -> list[str]:
    """``rank R (host H, pid P): last seen at step S's <point>, T s ago`` for each rank behind
    the furthest rank (one with no heartbeat at all is named as never having started)."""
    beats: dict[int, dict | None] = {}
    for rank in range(world_size):
        try:
            beats[rank] = json.loads((heartbeat_dir(run_dir) / f"rank_{rank:05d}.json")
                                     .read_text())
        except (OSError, ValueError):
            beats[rank] = None
    progress = {rank: (int(b["step"]), POINTS.index(b.get("point", "start"))) if b else (-1, 0)
                for rank, b in beats.items()}
    furthest, now = max(progress.values()), time.time()
    behind = []
    for rank, beat in beats.items():
        if progress[rank] == furthest:
            continue
        behind.append(f"rank {rank}: no heartbeat" if beat is None else
                      f"rank {rank} (host {beat['host']}, pid {beat['pid']}): last seen at step "
                      f"{beat['step']}'s {beat.get('point', 'start')}, "
                      f"{now - beat['time']:.0f} s ago")
    return behind
