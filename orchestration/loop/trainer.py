"""The training loop: Megatron's schedule does the step; callbacks hook in at named points.

One step (``run_step``) is: ``before_step`` (a callback may skip the batch without computing
it) -> Megatron's schedule over this rank's micro-batches -> one all-reduce of [loss, tokens,
stop vote] -> ``guarded_step``, whose ``pre_optim_step`` hook sees the reduced gradients and
may drop the update or ask for a re-run of the step (the schedule again on the same batch
from the same RNG state, then ``pre_optim_step`` again) -> ``after_step`` -> the loop acts on
the step's merged :class:`~orchestration.loop.control.Control`: save, roll back or stop.
Everything a resumed run needs is a function of the global step plus what the callbacks store
in the checkpoint.
Steps are 1-based (``orchestration/loop/stages.py``): ``self.step`` is the last step done.

This module is the loop and the trainer's state; the step's computation (the schedule, the
all-reduce, the veto and re-runs, the loss function) is ``loop/step.py``, saving, resuming and
rolling back are ``loop/checkpoints.py``, and the record of mix changes is
``data/history.py``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_patches.optimizer import params_gathered
from megatron_patches.parallel import comm_device, data_parallel_rank, data_parallel_size
from orchestration.callbacks.base import Callback, CallbackList
from orchestration.cluster.heartbeat import Heartbeat, laggards
from orchestration.common.files import write_json_atomic
from orchestration.config import RunConfig
from orchestration.data.batches import BatchLayout
from orchestration.data.datasets import StageDatasets
from orchestration.data.history import note_mix
from orchestration.loop.checkpoints import CheckpointActions
from orchestration.loop.control import Control, StepResult
from orchestration.loop.manual_gc import manual_gc
from orchestration.loop.session import TrainingSession
from orchestration.loop.stages import Stage, stage_at, total_steps
from orchestration.loop.step import StepRunner

log = logging.getLogger(__name__)


class Trainer:
    """The loop over global steps: which stage and batch, run the step (``loop/step.py``),
    act on the callbacks' decisions (save, roll back, stop: ``loop/checkpoints.py``)."""

    def __init__(self, cfg: RunConfig, session: TrainingSession,
                 callbacks: list[Callback] | None = None) -> None:
        self.cfg = cfg
        self.session = session
        self.run_dir = Path(cfg.run_dir)
        self.stages = session.stages
        self.step = 0  # global steps done; the next step to run is self.step + 1
        self.callbacks = CallbackList(callbacks or [])
        self.control = Control()
        self.stage: Stage | None = None
        self.data: StageDatasets | None = None
        self.layout: BatchLayout | None = None
        # Which mix each stretch of each stage read: {"stage", "step", "data"}, one entry per
        # stage entered and one per mix change on resume (orchestration/data/history.py).
        self.data_history: list[dict] = []
        self.last_loss = float("nan")
        self.last_val_loss = float("nan")
        self.heartbeat = Heartbeat(self.run_dir, dist.get_rank())
        self.steps = StepRunner(self)
        self.checkpoints = CheckpointActions(self)

    @property
    def model_chunks(self) -> list:
        return self.session.model_chunks

    @property
    def is_main(self) -> bool:
        return self.session.dist.is_main

    @property
    def saver(self):
        """The background checkpoint writer (``checkpoint.async_save``), else None."""
        return self.checkpoints.saver

    @saver.setter
    def saver(self, saver) -> None:  # bench/checkpoint_stall.py swaps writers between blocks
        self.checkpoints.saver = saver

    @property
    def stopped_by_vote(self) -> bool:
        """The stop came from a rank's ``poll_stop`` (e.g. a signal)."""
        return self.steps.stopped_by_vote

    # ----------------------------------------------------------------- public API
    def fit(self) -> list[StepResult]:
        self.resume()
        if self.step == 0 and self.cfg.checkpoint.save_initial:
            self.enter_stage(1)
            self.save_checkpoint()
        self.callbacks.on_fit_start(self)
        if self.cfg.train.eval_only:
            self.enter_stage(self.step + 1)
            self.evaluate(self.cfg.train.eval_iters)
            self.finalize_checkpoints(blocking=True)  # a save_initial written in the background
            return []
        results = []
        end = total_steps(self.stages)
        with manual_gc(self.cfg.runtime.manual_gc_interval) as collect:
            while self.step < end and self.control.stop is None:
                results.append(self.run_step())
                collect(self.step)
        self.finalize_checkpoints(blocking=True)  # requeue/exit only with the last save complete
        self.callbacks.on_fit_end(self)
        return results

    def run_step(self) -> StepResult:
        """Run global step ``self.step + 1`` with all its hooks, then act on the decisions."""
        step = self.step + 1
        self.enter_stage(step)
        self.control.reset_step()
        try:
            result = self.steps.train(step)
        except Exception as err:
            raise _name_collective_failure(err, step, self.cfg, self.run_dir) from err
        if result.computed:
            self.last_loss = result.loss
        self.step = step
        self.finalize_checkpoints(blocking=False)
        self.control.merge_all(self.callbacks.after_step(self, result))
        self._act_on_control()
        return result

    def batch_for_step(self, step: int) -> tuple[Stage, int]:
        """The stage whose data global step ``step`` reads and the batch position in it: the
        step's own, unless a callback reorders the run (a window deferred to the end of
        training, read by a later stage's step) or the stage (deferred to its end)."""
        position = self.callbacks.remap_position(self, step - 1)
        stage = stage_at(self.stages, position + 1)
        return stage, self.callbacks.remap_batch(self, stage, stage.batch_index(position + 1))

    def train_data(self, stage: Stage):
        """The training samples of ``stage`` (the current one, or an earlier stage whose
        deferred batches a later step reads)."""
        if stage.index == self.stage.index:
            return self.data.train
        return self.session.datasets_for(stage, self.data_history).train

    def evaluate(self, iters: int, dataset=None) -> float:
        """Mean held-out loss over the first ``iters`` global batches of the valid split (or of
        ``dataset``, e.g. one source's held-out set, which does not set ``last_val_loss``)."""
        if self.data is None or self.data.valid is None or iters <= 0:
            return float("nan")
        target = self.data.valid if dataset is None else dataset
        for chunk in self.model_chunks:
            chunk.eval()
        total = torch.zeros(2, dtype=torch.float64, device=comm_device())
        full = dataclasses.replace(self.layout, ramp=None)  # full-size batches, ramp or not
        with torch.no_grad(), params_gathered(self.model_chunks):
            for i in range(iters):
                total += self.steps.loss_sum(i, target, forward_only=True, layout=full)[:2]
        for chunk in self.model_chunks:
            chunk.train()
        dist.all_reduce(total)
        loss = float(total[0] / total[1])
        if dataset is None:
            self.last_val_loss = loss
        return loss

    def save_checkpoint(self) -> Path:
        """Save after ``self.step`` (``loop/checkpoints.py``)."""
        return self.checkpoints.save()

    def finalize_checkpoints(self, blocking: bool) -> None:
        """Publish background saves that every rank has finished (all, with ``blocking``)."""
        self.checkpoints.finalize(blocking)

    def resume(self) -> None:
        """Continue from the run dir's newest complete checkpoint, else from checkpoint.load."""
        self.checkpoints.resume()

    def enter_stage(self, step: int) -> None:
        """Make the stage of ``step`` current: its data, batch layout and on_stage_start."""
        stage = stage_at(self.stages, step)
        if self.stage is not None and stage.index == self.stage.index:
            return
        self._note_data(stage, step)
        self.stage = stage
        self.data = self.session.datasets_for(stage, self.data_history)
        self.layout = BatchLayout(self.cfg.train.micro_batch_size, stage.global_batch_size,
                                  data_parallel_size(), data_parallel_rank(), stage.ramp)
        self.callbacks.on_stage_start(self, stage)

    # ----------------------------------------------------------------- internals
    def _note_data(self, stage: Stage, step: int) -> None:
        """Record the mix ``stage`` reads from ``step`` on (``data/history.py``), and write the
        history next to the checkpoints."""
        history, changed = note_mix(self.data_history, stage, step)
        if changed:
            log.warning("stage '%s': the mix changes at step %d to '%s'; every source "
                        "continues after what the earlier mix read", stage.name, step,
                        stage.data.name)
        self.data_history = history
        if self.is_main:  # at stage entry only (and after a resume or rollback): rare, small
            write_json_atomic(self.run_dir / "data_history.json", history)

    def _act_on_control(self) -> None:
        """After a step's ``after_step`` hooks: roll back, or save (on request or on a stop)."""
        if self.control.rollback is not None:
            self.checkpoints.rollback(self.control.rollback)
        elif (self.control.save or self.control.stop) and \
                self.checkpoints.last_saved != self.step:
            self.save_checkpoint()


class CollectiveTimeoutError(RuntimeError):
    """A collective did not complete within ``runtime.distributed_timeout_s``."""


def _name_collective_failure(err: Exception, step: int, cfg: RunConfig,
                            run_dir: Path) -> Exception:
    """Turn a backend timeout into a message naming this rank, the step, the ranks that did not
    arrive (from their heartbeats) and what the backend said."""
    text = str(err)
    if "timed out" not in text.lower() and "timeout" not in text.lower():
        return err
    detail = text.strip().splitlines()[0][:300] if text.strip() else type(err).__name__
    behind = laggards(run_dir, dist.get_world_size())
    culprits = ("; did not arrive: " + "; ".join(behind)) if behind else (
        "; every rank reached the same point, so the hang is inside it")
    return CollectiveTimeoutError(
        f"rank {dist.get_rank()} of {dist.get_world_size()}: a collective timed out during step "
        f"{step} (runtime.distributed_timeout_s={cfg.runtime.distributed_timeout_s}){culprits}. "
        f"Backend said: {detail}")
