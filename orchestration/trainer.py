"""The training loop: Megatron's schedule does the step; the rest hooks in at named points.

One step is: ``before_step`` (a callback may skip the batch without computing it) ->
``get_forward_backward_func()`` over this rank's micro-batches -> one all-reduce of the loss ->
``guarded_step`` (callbacks may veto the update after seeing loss and grad norm) -> ``after_step``
(logging, evaluation, checkpoint timing, stage changes). Everything a resumed run needs is a
function of the global step plus what the callbacks store in the checkpoint.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_patches.guarded_step import guarded_step
from orchestration import checkpoint as ckpt
from orchestration.async_checkpoint import AsyncSaver
from orchestration.callbacks import Callback, CallbackList
from orchestration.config import RunConfig
from orchestration.data import BatchLayout, StageDatasets, microbatches
from orchestration.distributed import comm_device
from orchestration.schedule import apply_lr
from orchestration.setup import TrainingObjects
from orchestration.stages import (
    Stage,
    consumed_tokens,
    lr_for_step,
    stage_at,
    total_steps,
    weight_decay_for_step,
)

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    step: int  # global 0-based index of the step just run
    stage: Stage
    loss: float
    grad_norm: float
    lr: float
    updated: bool
    skip_reason: str | None
    step_time_s: float


class Trainer:
    def __init__(self, cfg: RunConfig, objects: TrainingObjects,
                 callbacks: list[Callback] | None = None) -> None:
        self.cfg = cfg
        self.o = objects
        self.run_dir = Path(cfg.run_dir)
        self.stages = objects.stages
        self.step = 0  # the next global step to run
        self.callbacks = CallbackList(callbacks or [])
        self.stage: Stage | None = None
        self.data: StageDatasets | None = None
        self.layout: BatchLayout | None = None
        self.last_loss = float("nan")
        self.last_val_loss = float("nan")
        self.stop_requested: str | None = None
        self.stop_signal = None  # set by PreemptionCallback: has .signal_name when signalled
        self.failed = False  # stopped by a policy (e.g. persistent loss spikes), not finished
        self.loss_multiplier = 1.0  # fault-injection drills (spike.inject) scale the loss
        self._forward_backward = get_forward_backward_func()
        self.saver = AsyncSaver() if cfg.checkpoint.async_save else None

    # ----------------------------------------------------------------- public API
    def fit(self) -> list[StepResult]:
        self.resume()
        if self.step == 0 and self.cfg.checkpoint.save_initial:
            self._ensure_stage()
            self.save_checkpoint()
        self.callbacks.on_fit_start(self)
        if self.cfg.train.eval_only:
            self._ensure_stage()
            self.last_val_loss = self.evaluate(self.cfg.train.eval_iters)
            self.finalize_checkpoints(blocking=True)  # a save_initial written in the background
            return []
        results = []
        end = total_steps(self.stages)
        while self.step < end and self.stop_requested is None:
            self._ensure_stage()
            try:
                result = self.train_step()
            except Exception as err:
                raise _name_collective_failure(err, self.step + 1, self.cfg) from err
            results.append(result)
            self.step += 1
            self.finalize_checkpoints(blocking=False)
            self.callbacks.after_step(self, result)
        self.finalize_checkpoints(blocking=True)  # requeue/exit only with the last save complete
        self.callbacks.on_fit_end(self)
        return results

    def train_step(self) -> StepResult:
        stage, t0 = self.stage, time.perf_counter()
        lr = lr_for_step(self.cfg, self.stages, self.step)
        apply_lr(self.o.optimizer, lr, weight_decay_for_step(self.cfg, self.stages, self.step))
        _maybe_stall(self.cfg.runtime.fault_drill, self.step + 1)
        reason = self.callbacks.before_step(self)
        if reason is not None:  # skipped without computing: replay or configured ranges
            return StepResult(self.step, stage, float("nan"), float("nan"), lr, False, reason,
                              time.perf_counter() - t0)
        loss = self._forward_backward_loss(self.data_step(), forward_only=False)
        vetoes: list[str] = []
        outcome = guarded_step(self.o.optimizer, lambda g: self._veto(loss, g, vetoes))
        if not outcome.updated and not vetoes:
            vetoes.append("non-finite gradients")
        self.last_loss = loss
        return StepResult(self.step, stage, loss, outcome.grad_norm, lr, outcome.updated,
                          vetoes[0] if vetoes else None, time.perf_counter() - t0)

    def data_step(self, step: int | None = None) -> int:
        """Which of the stage's batches global step ``step`` (default: the next) reads: the step
        within the stage, unless a callback reorders the stage (a deferred window)."""
        step = self.step if step is None else step
        return self.callbacks.remap_batch(self, step - self.stage.start_step)

    def evaluate(self, iters: int, dataset=None) -> float:
        """Mean held-out loss over the first ``iters`` global batches of the valid split (or of
        ``dataset``, e.g. one source's held-out set)."""
        if self.data is None or self.data.valid is None or iters <= 0:
            return float("nan")
        dataset = self.data.valid if dataset is None else dataset
        for chunk in self.o.model_chunks:
            chunk.eval()
        total = torch.zeros(2, dtype=torch.float64, device=comm_device())
        with torch.no_grad():
            for i in range(iters):
                total += self._loss_sum(i, dataset, forward_only=True)
        for chunk in self.o.model_chunks:
            chunk.train()
        dist.all_reduce(total)
        return float(total[0] / total[1])

    def save_checkpoint(self) -> Path:
        self.finalize_checkpoints(blocking=True)  # one background save at a time
        state = {"step": self.step, "consumed_tokens": consumed_tokens(self.stages, self.step),
                 "stage": self.stage.name if self.stage else None,
                 "callbacks": self.callbacks.state_dict()}
        path = ckpt.save(ckpt.checkpoint_dir(self.run_dir), self.step, self.o.model,
                         self.o.optimizer, state, self.cfg.checkpoint.keep_last, self.saver)
        if self.saver is None:
            self.callbacks.on_checkpoint(self, path)
        return path

    def finalize_checkpoints(self, blocking: bool) -> None:
        """Publish background saves that every rank has finished (all, with ``blocking``)."""
        if self.saver is not None:
            for path in self.saver.finalize(blocking):
                self.callbacks.on_checkpoint(self, path)

    def resume(self) -> None:
        """Continue from the run dir's newest complete checkpoint, else from checkpoint.load."""
        loaded = ckpt.load_latest(ckpt.checkpoint_dir(self.run_dir), self._load_full)
        if loaded is not None:
            path, state = loaded
            self.step = int(state["step"])
            self.callbacks.load_state_dict(state.get("callbacks", {}))
            log.info("resumed from %s at step %d", path, self.step)
        elif self.cfg.checkpoint.load:
            path = Path(self.cfg.checkpoint.load)
            ckpt.load(path, self.o.model, self.o.optimizer, self.cfg.checkpoint.load_optimizer,
                      self.cfg.checkpoint.reset_optimizer_on_reshard)
            log.info("initialised from %s (optimizer: %s)", path,
                     self.cfg.checkpoint.load_optimizer)

    def reload(self, path: Path) -> None:
        """Restore weights, optimizer and step from ``path`` (used by rollback)."""
        state = self._load_full(path)
        self.step = int(state["step"])
        self.stage = None  # rebuild the stage's data view on the next step

    # ----------------------------------------------------------------- internals
    def _load_full(self, path: Path) -> dict:
        return ckpt.load(path, self.o.model, self.o.optimizer, with_optimizer=True,
                         reset_optimizer_on_reshard=self.cfg.checkpoint.reset_optimizer_on_reshard)

    def _ensure_stage(self) -> None:
        stage = stage_at(self.stages, self.step)
        if self.stage is not None and stage.index == self.stage.index:
            return
        self.stage = stage
        self.data = self.o.datasets_for(stage)
        self.layout = BatchLayout(self.cfg.train.micro_batch_size, stage.global_batch_size,
                                  parallel_state.get_data_parallel_world_size(),
                                  parallel_state.get_data_parallel_rank())
        self.callbacks.on_stage_start(self, stage)

    def _veto(self, loss: float, grad_norm: float, reasons: list[str]) -> bool:
        reason = self.callbacks.veto_update(self, loss, grad_norm)
        if reason is not None:
            reasons.append(reason)
        return reason is not None

    def _forward_backward_loss(self, step_in_stage: int, forward_only: bool) -> float:
        for chunk in self.o.model_chunks:
            chunk.zero_grad_buffer()
        self.o.optimizer.zero_grad()
        total = self._loss_sum(step_in_stage, self.data.train, forward_only)
        # The one collective (and host sync) per step: the global loss for the skip decision,
        # plus any rank's stop signal (SIGUSR1/SIGTERM), so that every rank stops together.
        signal_name = self.stop_signal.signal_name if self.stop_signal else None
        # new_full fills on the device; torch.tensor(..., device=) would be a blocking
        # host->device copy, a second stream sync per step (docs/benchmarks.md, step overhead).
        total = torch.cat([total, total.new_full((1,), 1.0 if signal_name else 0.0)])
        dist.all_reduce(total)
        loss_sum, count, stop = total.tolist()
        if stop and self.stop_requested is None:
            self.stop_requested = f"signal {signal_name or 'on another rank'}"
        return loss_sum / count if count else float("nan")

    def _loss_sum(self, index: int, dataset, forward_only: bool) -> torch.Tensor:
        """Run the schedule on batch ``index``; [loss sum, token count] on the last stage."""
        losses = self._forward_backward(
            forward_step_func=self._forward_step,
            data_iterator=microbatches(dataset, self.layout, index),
            model=self.o.model_chunks, num_microbatches=self.layout.num_microbatches,
            seq_length=self.stage.seq_length, micro_batch_size=self.layout.micro_batch_size,
            forward_only=forward_only)
        total = torch.zeros(2, dtype=torch.float64, device=comm_device())
        for item in losses:
            total += item["lm loss"].to(total)
        return total

    def _forward_step(self, data_iterator, model):
        batch = {k: v.to(comm_device(), non_blocking=True) for k, v in next(data_iterator).items()}
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, functools.partial(_masked_loss, batch["loss_mask"], self.loss_multiplier)


def _masked_loss(loss_mask: torch.Tensor, multiplier: float, per_token_loss: torch.Tensor):
    """Megatron's 3-tuple contract: (loss sum, token count, values to report)."""
    mask = loss_mask.view(-1).float()
    loss_sum = torch.sum(per_token_loss.view(-1).float() * mask)
    if multiplier != 1.0:
        loss_sum = loss_sum * multiplier
    count = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach().clone(), mask.sum().detach()])
    return loss_sum, count, {"lm loss": report}


class CollectiveTimeoutError(RuntimeError):
    """A collective did not complete within ``runtime.distributed_timeout_s``."""


def _name_collective_failure(err: Exception, step: int, cfg: RunConfig) -> Exception:
    """Turn a backend timeout into a message naming this rank, the step and the operation."""
    text = str(err)
    if "timed out" not in text.lower() and "timeout" not in text.lower():
        return err
    detail = text.strip().splitlines()[0][:300] if text.strip() else type(err).__name__
    return CollectiveTimeoutError(
        f"rank {dist.get_rank()} of {dist.get_world_size()}: a collective timed out during step "
        f"{step} (runtime.distributed_timeout_s={cfg.runtime.distributed_timeout_s}); another "
        f"rank is stalled or dead. Backend said: {detail}")


def _maybe_stall(drill: str | None, step: int) -> None:
    if not drill or not drill.startswith("stall:"):
        return
    fields = dict(kv.split("=") for kv in drill[len("stall:"):].split(","))
    if int(fields["rank"]) == dist.get_rank() and int(fields["step"]) == step:
        log.warning("fault drill: rank %d stalls before step %d", dist.get_rank(), step)
        time.sleep(float(fields.get("seconds", 3600)))
