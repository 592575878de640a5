"""A callback tests name as ``sample_probe:SampleProbe`` (tests/ is on sys.path in spawned
ranks): per step, the stage's batch position, its global batch and the samples this rank read."""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

from orchestration.callbacks.base import Callback


class SampleProbe(Callback):
    name = "sample_probe"

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def after_step(self, trainer, result) -> None:
        layout = trainer.layout
        self.rows.append({
            "step": result.step, "stage": result.stage.name, "batch": result.batch,
            "batch_size": layout.batch_size(result.batch),
            "microbatches": layout.microbatches_in(result.batch),
            "global": layout.global_indices(result.batch).tolist(),
            "rank": layout.sample_indices(result.batch).reshape(-1).tolist(),
        })

    def on_fit_end(self, trainer) -> None:
        path = Path(trainer.run_dir) / f"sample_probe.{dist.get_rank()}.{trainer.step}.json"
        path.write_text(json.dumps(self.rows))


def read_probe(run_dir: str, rank: int = 0) -> list[dict]:
    """Every job's rows of ``rank``, in step order (one file per job, named by its last step)."""
    files = sorted(Path(run_dir).glob(f"sample_probe.{rank}.*.json"),
                   key=lambda p: int(p.name.split(".")[2]))
    return [row for f in files for row in json.loads(f.read_text())]
