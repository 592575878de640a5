"""The training loop: Megatron's schedule does the step; callbacks hook in at named points.

One step (``run_step``) is: ``before_step`` (a callback may skip the batch without computing
it) -> Megatron's schedule over this rank's micro-batches -> one all-reduce of [loss, tokens,
stop vote] -> ``guarded_step``, whose ``pre_optim_step`` hook sees the reduced gradients and
may drop the update -> ``after_step`` -> the loop acts on the step's merged
:class:`~orchestration.loop.control.Control`: save, roll back or stop. Everything a resumed run
needs is a function of the global step plus what the callbacks store in the checkpoint.
Steps are 1-based (``orchestration/loop/stages.py``): ``self.step`` is the last step done.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_patches.checkpointing import AsyncSaver
from megatron_patches.guarded_step import guarded_step
from megatron_patches.optimizer import apply_lr, zero_grads
from megatron_patches.parallel import comm_device, data_parallel_rank, data_parallel_size
from megatron_patches.schedule import ForwardBackward
from orchestration.callbacks.base import Callback, CallbackList, Gradients
from orchestration.checkpoint import store
from orchestration.checkpoint.layout import (
    checkpoint_dir,
    config_differences,
    read_metadata,
    shape_config,
)
from orchestration.cluster.heartbeat import Heartbeat, laggards
from orchestration.config import RunConfig, to_dict
from orchestration.data.batches import BatchLayout, microbatches
from orchestration.data.datasets import StageDatasets
from orchestration.loop.control import Control, Decision, RollbackRequest, StepResult
from orchestration.loop.lr import lr_for_step, weight_decay_for_step
from orchestration.loop.session import TrainingSession
from orchestration.loop.stages import Stage, consumed_tokens, stage_at, total_steps

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: RunConfig, session: TrainingSession,
                 callbacks: list[Callback] | None = None) -> None:
        self.cfg = cfg
        self.session = session
        self.run_dir = Path(cfg.run_dir)
        self.stages = session.stages
        self.step = 0  # global steps done; the next step to run is self.step + 1
        self.callbacks = CallbackList(callbacks or [])
        self.control = Control()
        self.stopped_by_vote = False  # the stop came from a rank's poll_stop (e.g. a signal)
        self.stage: Stage | None = None
        self.data: StageDatasets | None = None
        self.layout: BatchLayout | None = None
        self.last_loss = float("nan")
        self.last_val_loss = float("nan")
        self.forward_backward = ForwardBackward(session.model_chunks)
        self.saver = AsyncSaver() if cfg.checkpoint.async_save else None
        self._last_saved: int | None = None
        self.heartbeat = Heartbeat(self.run_dir, dist.get_rank())

    @property
    def model_chunks(self) -> list:
        return self.session.model_chunks

    @property
    def is_main(self) -> bool:
        return self.session.dist.is_main

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
        while self.step < end and self.control.stop is None:
            results.append(self.run_step())
        self.finalize_checkpoints(blocking=True)  # requeue/exit only with the last save complete
        self.callbacks.on_fit_end(self)
        return results

    def run_step(self) -> StepResult:
        """Run global step ``self.step + 1`` with all its hooks, then act on the decisions."""
        step = self.step + 1
        self.enter_stage(step)
        self.control.reset_step()
        try:
            result = self._train_step(step)
        except Exception as err:
            raise _name_collective_failure(err, step, self.cfg, self.run_dir) from err
        self.step = step
        self.finalize_checkpoints(blocking=False)
        self._merge(self.callbacks.after_step(self, result))
        self._act_on_control()
        return result

    def batch_for_step(self, step: int) -> int:
        """The stage's batch position global step ``step`` reads: its own position, unless a
        callback reorders the stage (a deferred window). ``step`` is in the current stage."""
        return self.callbacks.remap_batch(self, self.stage, self.stage.batch_index(step))

    def evaluate(self, iters: int, dataset=None) -> float:
        """Mean held-out loss over the first ``iters`` global batches of the valid split (or of
        ``dataset``, e.g. one source's held-out set, which does not set ``last_val_loss``)."""
        if self.data is None or self.data.valid is None or iters <= 0:
            return float("nan")
        target = self.data.valid if dataset is None else dataset
        for chunk in self.model_chunks:
            chunk.eval()
        total = torch.zeros(2, dtype=torch.float64, device=comm_device())
        with torch.no_grad():
            for i in range(iters):
                total += self._loss_sum(i, target, forward_only=True)
        for chunk in self.model_chunks:
            chunk.train()
        dist.all_reduce(total)
        loss = float(total[0] / total[1])
        if dataset is None:
            self.last_val_loss = loss
        return loss

    def save_checkpoint(self) -> Path:
        self.finalize_checkpoints(blocking=True)  # one background save at a time
        state = {"step": self.step, "consumed_tokens": consumed_tokens(self.stages, self.step),
                 "stage": self.stage.name if self.stage else None,
                 "callbacks": self.callbacks.state_dict()}
        t0 = time.perf_counter()
        path = store.save(checkpoint_dir(self.run_dir), self.step, self.session.model,
                          self.session.optimizer, state, self.cfg.checkpoint.keep_last,
                          self.saver, shape_config(to_dict(self.cfg)),
                          self.cfg.checkpoint.keep_every)
        self._last_saved = self.step
        log.info("%s %s in %.2fs", "scheduled (writing in the background)"
                 if self.saver is not None else "saved", path, time.perf_counter() - t0)
        if self.saver is None:
            self.callbacks.on_checkpoint(self, path)
        return path

    def finalize_checkpoints(self, blocking: bool) -> None:
        """Publish background saves that every rank has finished (all, with ``blocking``)."""
        if self.saver is not None:
            for path in store.finalize(checkpoint_dir(self.run_dir), self.saver, blocking):
                self.callbacks.on_checkpoint(self, path)

    def resume(self) -> None:
        """Continue from the run dir's newest complete checkpoint, else from checkpoint.load."""
        failures: list[tuple[Path, str]] = []
        loaded = store.load_latest(checkpoint_dir(self.run_dir), self._load_full, failures)
        if loaded is None and failures and not self.cfg.checkpoint.allow_fresh_start:
            listed = "\n  ".join(self._why_unloadable(path, reason) for path, reason in failures)
            raise store.UnloadableCheckpoints(
                f"{self.run_dir}: none of its {len(failures)} checkpoint(s) loads, so the run "
                f"would start again from step 0 and prune them:\n  {listed}\nFix or restore "
                "them, use a new run_dir, or set checkpoint.allow_fresh_start=true to train "
                "from scratch here (the unloadable checkpoints are then kept, never pruned).")
        if failures:  # newer ones than the checkpoint resumed from, or all (a fresh start)
            self._quarantine([path for path, _ in failures])
        if loaded is not None:
            path, state = loaded
            self.step = int(state["step"])
            self.callbacks.load_state_dict(state.get("callbacks", {}))
            log.info("resumed from %s at step %d", path, self.step)
        elif self.cfg.checkpoint.load:
            path = Path(self.cfg.checkpoint.load)
            store.load(path, self.session.model, self.session.optimizer,
                       self.cfg.checkpoint.load_optimizer,
                       self.cfg.checkpoint.reset_optimizer_on_reshard)
            log.info("initialised from %s (optimizer: %s)", path,
                     self.cfg.checkpoint.load_optimizer)

    def _why_unloadable(self, path: Path, reason: str) -> str:
        """Incompatible with this config (naming the keys that differ), or else damaged."""
        differences = config_differences(path, shape_config(to_dict(self.cfg)))
        if differences:
            return f"{path}: incompatible with this config ({'; '.join(differences)})"
        return f"{path}: damaged ({reason})"

    def _quarantine(self, paths: list[Path]) -> None:
        """Move checkpoints that failed to load out of the pruning set, keeping them: a re-save
        of the same step would otherwise overwrite one, and pruning delete it."""
        if self.is_main:
            stamp = time.strftime("%Y%m%dT%H%M%S")
            for path in paths:
                target = path.parent / "unloadable" / f"{path.name}-{stamp}"
                target.parent.mkdir(parents=True, exist_ok=True)
                path.rename(target)
                log.warning("kept the unloadable %s as %s (never pruned)", path, target)
        dist.barrier()

    def enter_stage(self, step: int) -> None:
        """Make the stage of ``step`` current: its data, batch layout and on_stage_start."""
        stage = stage_at(self.stages, step)
        if self.stage is not None and stage.index == self.stage.index:
            return
        self.stage = stage
        self.data = self.session.datasets_for(stage)
        self.layout = BatchLayout(self.cfg.train.micro_batch_size, stage.global_batch_size,
                                  data_parallel_size(), data_parallel_rank())
        self.callbacks.on_stage_start(self, stage)

    # ----------------------------------------------------------------- internals
    def _merge(self, decisions: list[Decision | None]) -> None:
        for decision in decisions:
            self.control.merge(decision)

    def _act_on_control(self) -> None:
        """After a step's ``after_step`` hooks: roll back, or save (on request or on a stop)."""
        if self.control.rollback is not None:
            self._rollback(self.control.rollback)
        elif (self.control.save or self.control.stop) and self._last_saved != self.step:
            self.save_checkpoint()

    def _rollback(self, request: RollbackRequest) -> None:
        self.finalize_checkpoints(blocking=True)  # a background save may be the target
        target = store.checkpoint_before(checkpoint_dir(self.run_dir), request.first_bad_step)
        if target is None:
            self.control.merge(Decision(stop=f"{request.reason}; no checkpoint to roll back to",
                                        failed=True))
            self.save_checkpoint()
            return
        from_step = self.step
        state = self._load_full(target)
        # The callbacks' own state goes back too: a spike detector must not keep the losses of
        # the steps being undone in its history.
        self.callbacks.load_state_dict(state.get("callbacks", {}))
        self.step = int(read_metadata(target)["step"])
        self.stage = None  # rebuild the stage's data view on the next step
        log.warning("rolled back from step %d to %s: %s", from_step, target, request.reason)
        self.callbacks.on_rollback(self, from_step, self.step)

    def _load_full(self, path: Path) -> dict:
        return store.load(path, self.session.model, self.session.optimizer, with_optimizer=True,
                          reset_optimizer_on_reshard=self.cfg.checkpoint.reset_optimizer_on_reshard)

    def _train_step(self, step: int) -> StepResult:
        stage, t0 = self.stage, time.perf_counter()
        self.heartbeat.beat(step)
        lr = lr_for_step(self.cfg, self.stages, step)
        apply_lr(self.session.optimizer, lr, weight_decay_for_step(self.cfg, self.stages, step))
        _maybe_stall(self.cfg.runtime.fault_drill, step)
        self._merge(self.callbacks.before_step(self, step))
        batch = self.batch_for_step(step)
        if self.control.skip is not None:  # skipped without computing: replay, configured
            return StepResult(step, stage, batch, float("nan"), float("nan"), lr, False,
                              self.control.skip, False, time.perf_counter() - t0)
        loss = self._forward_backward_loss(batch)
        outcome = guarded_step(self.session.optimizer, lambda g: self._pre_optim(step, loss, g))
        reason = self.control.skip or (None if outcome.updated else "non-finite gradients")
        self.last_loss = loss
        return StepResult(step, stage, batch, loss, outcome.grad_norm, lr, outcome.updated,
                          reason, True, time.perf_counter() - t0)

    def _pre_optim(self, step: int, loss: float, grad_norm: float) -> bool:
        """``guarded_step``'s veto: the callbacks' ``pre_optim_step`` decisions."""
        grads = Gradients(step, loss, grad_norm, self.session.optimizer, self.model_chunks)
        self._merge(self.callbacks.pre_optim_step(self, grads))
        return self.control.skip is not None

    def _forward_backward_loss(self, batch: int) -> float:
        zero_grads(self.model_chunks, self.session.optimizer)
        self.heartbeat.beat(self.step + 1, "schedule")
        total = self._loss_sum(batch, self.data.train, forward_only=False)
        # The one collective (and host sync) per step: the global loss for the skip decision,
        # plus any rank's stop vote (SIGUSR1/SIGTERM), so that every rank stops together.
        vote = self.callbacks.poll_stop(self)
        self.heartbeat.beat(self.step + 1, "all-reduce")
        # new_full fills on the device; torch.tensor(..., device=) would be a blocking
        # host->device copy, a second stream sync per step (docs/benchmarks.md, step overhead).
        total = torch.cat([total, total.new_full((1,), 1.0 if vote else 0.0)])
        dist.all_reduce(total)
        loss_sum, count, stop = total.tolist()
        if stop and self.control.stop is None:
            self.control.merge(Decision(stop=vote or "stop requested on another rank"))
            self.stopped_by_vote = True
        return loss_sum / count if count else float("nan")

    def _loss_sum(self, batch: int, dataset, forward_only: bool) -> torch.Tensor:
        """Run the schedule on ``batch``; [loss sum, token count] on the last pipeline stage."""
        losses = self.forward_backward(
            self._forward_step, microbatches(dataset, self.layout, batch),
            num_microbatches=self.layout.num_microbatches, seq_length=self.stage.seq_length,
            micro_batch_size=self.layout.micro_batch_size, forward_only=forward_only)
        total = torch.zeros(2, dtype=torch.float64, device=comm_device())
        for item in losses:
            total += item["lm loss"].to(total)
        return total

    def _forward_step(self, data_iterator, model):
        batch = {k: v.to(comm_device(), non_blocking=True) for k, v in next(data_iterator).items()}
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, functools.partial(_masked_loss, batch["loss_mask"], self.control.loss_scale)


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


def _maybe_stall(drill: str | None, step: int) -> None:
    if not drill or not drill.startswith("stall:"):
        return
    fields = dict(kv.split("=") for kv in drill[len("stall:"):].split(","))
    if int(fields["rank"]) == dist.get_rank() and int(fields["step"]) == step:
        log.warning("fault drill: rank %d stalls before step %d", dist.get_rank(), step)
        time.sleep(float(fields.get("seconds", 3600)))
