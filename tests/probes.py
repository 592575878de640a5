"""Callbacks that tests name in ``cfg.callbacks`` as ``probes:Class`` (tests/ is on sys.path in
spawned ranks too): they record what the hooks saw into the run directory."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist

from orchestration.callbacks.base import Callback
from orchestration.loop.control import Decision


class GradientProbe(Callback):
    """At ``pre_optim_step``: the norm of the optimizer's gradients, reduced over all ranks, next
    to the grad norm Megatron computed; asks the loop to stop after ``stop_at``."""

    name = "gradient_probe"

    def __init__(self, stop_at: int | None = None) -> None:
        self.stop_at = stop_at
        self.rows: list[dict] = []

    def pre_optim_step(self, trainer, grads) -> None:
        local = sum(float(g.double().pow(2).sum()) for g in grads.main_grads())
        total = torch.tensor([local], dtype=torch.float64)
        dist.all_reduce(total)
        named = sum(1 for _ in grads.named_model_grads())
        self.rows.append({"step": grads.step, "reduced_norm": math.sqrt(float(total)),
                          "grad_norm": grads.grad_norm, "loss": grads.loss,
                          "named_grads": named})

    def after_step(self, trainer, result) -> Decision | None:
        if self.stop_at is not None and result.step == self.stop_at:
            return Decision(stop=f"probe stop at {result.step}")
        return None

    def on_fit_end(self, trainer) -> None:
        path = Path(trainer.run_dir) / f"gradient_probe.{dist.get_rank()}.json"
        path.write_text(json.dumps(self.rows))


class DataProbe(Callback):
    """After each step: the stage and batch it read and a hash of each sample's tokens, read
    from the trainer's own datasets; the last record of a step wins (a rolled-back step runs
    again). Rank 0 writes ``data_probe.json``."""

    name = "data_probe"

    def __init__(self) -> None:
        self.rows: dict[int, dict] = {}

    def after_step(self, trainer, result) -> None:
        data = trainer.train_data(result.data_stage)
        indices = trainer.layout.global_indices(result.batch)
        self.rows[result.step] = {
            "step": result.step, "data_stage": result.data_stage.name, "batch": result.batch,
            "skipped": result.skip_reason, "loss": result.loss,
            "tokens": [token_hash(data[int(i)]["tokens"]) for i in indices]}

    def on_fit_end(self, trainer) -> None:
        if dist.get_rank() == 0:
            path = Path(trainer.run_dir) / "data_probe.json"
            old = json.loads(path.read_text()) if path.exists() else {}
            old.update({str(k): v for k, v in self.rows.items()})
            path.write_text(json.dumps(old))


def token_hash(tokens) -> str:
    import hashlib

    return hashlib.sha1(torch.as_tensor(tokens).to(torch.int64).numpy().tobytes()).hexdigest()
class RerunProbe(Callback):
    """Asks for a re-run of step ``at`` every time it sees it, recording each computation's loss
    and grad norm (``rerun_probe.json``): the loop's re-run and its bound."""

    name = "rerun_probe"

    def __init__(self, at: int) -> None:
        self.at = at
        self.rows: list[dict] = []

    def pre_optim_step(self, trainer, grads) -> Decision | None:
        if grads.step != self.at:
            return None
        self.rows.append({"attempt": grads.attempt, "loss": grads.loss,
                          "grad_norm": grads.grad_norm})
        return Decision(rerun="probe")

    def after_step(self, trainer, result) -> None:
        if result.step == self.at:
            self.rows.append({"skip_reason": result.skip_reason, "extra": result.extra})

    def on_fit_end(self, trainer) -> None:
        if dist.get_rank() == 0:
            (Path(trainer.run_dir) / "rerun_probe.json").write_text(json.dumps(self.rows))
