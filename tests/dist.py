"""Run ``orchestration.train.run`` in N spawned gloo processes and collect rank 0's summary."""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
from pathlib import Path

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    from orchestration.train import run

    summary = run(cfg)
    Path(f"{out}.{rank}").write_bytes(pickle.dumps(summary))


def run_distributed(cfg, world_size: int, all_ranks: bool = False):
    """Train ``cfg`` on ``world_size`` CPU processes; rank 0's summary (losses are global),
    or every rank's summaries with ``all_ranks``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "summary.pkl")
        for attempt in range(3):
            try:
                mp.start_processes(_worker, args=(world_size, _free_port(), cfg, out),
                                   nprocs=world_size, join=True, start_method="spawn")
                break
            except mp.ProcessRaisedException as err:
                # The free port was taken by another process between our probe and rank 0's
                # listen (tests running side by side): nothing started, try another port.
                if "EADDRINUSE" not in str(err) or attempt == 2:
                    raise
        summaries = [pickle.loads(Path(f"{out}.{r}").read_bytes()) for r in range(world_size)]
    return summaries if all_ranks else summaries[0]


def run_single(cfg) -> dict:
    """One process, in a spawned child so process-group state never leaks between tests."""
    return run_distributed(cfg, 1)
