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
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_patches.checkpointing import AsyncSaver
from megatron_patches.guarded_step import guarded_step
from megatron_patches.optimizer import apply_lr, params_gathered, zero_grads
from megatron_patches.parallel import (
    comm_device,
    data_parallel_rank,
    data_parallel_size,
    restore_rng_state,
    rng_state,
    slice_for_context_parallel,
)
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
from orchestration.common.files import write_json_atomic
from orchestration.config import RunConfig, to_dict
from orchestration.config.loading import to_data_config
from orchestration.data.batches import BatchLayout, microbatches
from orchestration.data.datasets import StageDatasets
from orchestration.loop.control import Control, Decision, RollbackRequest, StepResult
from orchestration.loop.host_copy import HostCopy
from orchestration.loop.lr import lr_for_step, weight_decay_for_step
from orchestration.loop.manual_gc import manual_gc
from orchestration.loop.session import TrainingSession
from orchestration.loop.stages import (
    Stage,
    consumed_samples,
    consumed_tokens,
    stage_at,
    total_steps,
)

log = logging.getLogger(__name__)
MAX_RERUNS = 8  # per step, whatever the callbacks ask (spike.rerun_attempts is 1 by default)


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
        # Which mix each stretch of each stage read: {"stage", "step", "data"}, one entry per
        # stage entered and one per mix change on resume (orchestration/data/streams.py).
        self.data_history: list[dict] = []
        self.last_loss = float("nan")
        self.last_val_loss = float("nan")
        self.forward_backward = ForwardBackward(session.model_chunks)
        self.saver = AsyncSaver() if cfg.checkpoint.async_save else None
        self._last_saved: int | None = None
        self.heartbeat = Heartbeat(self.run_dir, dist.get_rank())
        self._totals = HostCopy(4, torch.float64, comm_device())  # [loss, tokens, z, stop]
        self._vote: str | None = None
        self._read = True

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
            result = self._train_step(step)
        except Exception as err:
            raise _name_collective_failure(err, step, self.cfg, self.run_dir) from err
        self.step = step
        self.finalize_checkpoints(blocking=False)
        self._merge(self.callbacks.after_step(self, result))
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
                total += self._loss_sum(i, target, forward_only=True, layout=full)[:2]
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
                 "consumed_samples": consumed_samples(self.stages, self.step),
                 "stage": self.stage.name if self.stage else None,
                 "data_history": self.data_history,
                 "callbacks": self.callbacks.state_dict()}
        t0 = time.perf_counter()
        with params_gathered(self.model_chunks):  # overlapped gathers complete: fresh weights
            path = store.save(checkpoint_dir(self.run_dir), self.step, self.model_chunks,
                              self.session.optimizer, state, self.cfg.checkpoint.keep_last,
                              self.saver, shape_config(to_dict(self.cfg)),
                              self.cfg.checkpoint.keep_every, release=self._release_label())
        self._last_saved = self.step
        log.info("%s %s in %.2fs", "scheduled (writing in the background)"
                 if self.saver is not None else "saved", path, time.perf_counter() - t0)
        if self.saver is None:
            self.callbacks.on_checkpoint(self, path)
        return path

    def _release_label(self) -> str | None:
        """``end of stage NAME`` when this step ends a stage and ``checkpoint.save_stage_end``
        is on: that checkpoint is the stage's release, kept from pruning."""
        if not self.cfg.checkpoint.save_stage_end or self.step == 0:
            return None
        stage = stage_at(self.stages, self.step)
        return f"end of stage {stage.name}" if self.step == stage.last_step else None

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
            self.data_history = list(state.get("data_history", []))
            self.callbacks.load_state_dict(state.get("callbacks", {}))
            log.info("resumed from %s at step %d", path, self.step)
        elif self.cfg.checkpoint.load:
            path = Path(self.cfg.checkpoint.load)
            store.load(path, self.model_chunks, self.session.optimizer,
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
        self._note_data(stage, step)
        self.stage = stage
        self.data = self.session.datasets_for(stage, self.data_history)
        self.layout = BatchLayout(self.cfg.train.micro_batch_size, stage.global_batch_size,
                                  data_parallel_size(), data_parallel_rank(), stage.ramp)
        self.callbacks.on_stage_start(self, stage)

    # ----------------------------------------------------------------- internals
    def _note_data(self, stage: Stage, step: int) -> None:
        """Record the mix ``stage`` reads from ``step`` on: at the stage's first step, and again
        when a resumed (or rolled-back) run's config gives the stage another mix. The past keeps
        the mixes it was read with; each source continues after what they drew."""
        from orchestration.data.streams import data_fingerprint

        history = [e for e in self.data_history if e["step"] <= step]
        mine = [e for e in history if e["stage"] == stage.index]
        same = mine and data_fingerprint(to_data_config(mine[-1]["data"])) == \
            data_fingerprint(stage.data)
        if not same:
            if mine and mine[-1]["step"] == step:
                history.remove(mine.pop())
            history.append({"stage": stage.index, "step": step if mine else stage.first_step,
                            "data": to_dict(stage.data)})
            if mine:
                log.warning("stage '%s': the mix changes at step %d to '%s'; every source "
                            "continues after what the earlier mix read", stage.name, step,
                            stage.data.name)
        self.data_history = history
        if self.is_main:  # at stage entry only (and after a resume or rollback): rare, small
            write_json_atomic(self.run_dir / "data_history.json", history)

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
        self.data_history = list(state.get("data_history", self.data_history))
        self.step = int(read_metadata(target)["step"])
        self.stage = None  # rebuild the stage's data view on the next step
        log.warning("rolled back from step %d to %s: %s", from_step, target, request.reason)
        self.callbacks.on_rollback(self, from_step, self.step)

    def _load_full(self, path: Path) -> dict:
        return store.load(path, self.model_chunks, self.session.optimizer, with_optimizer=True,
                          reset_optimizer_on_reshard=self.cfg.checkpoint.reset_optimizer_on_reshard)

    def _train_step(self, step: int) -> StepResult:
        stage, t0 = self.stage, time.perf_counter()
        self.heartbeat.beat(step)
        lr = lr_for_step(self.cfg, self.stages, step)
        apply_lr(self.session.optimizer, lr, weight_decay_for_step(self.cfg, self.stages, step))
        _maybe_stall(self.cfg.runtime.fault_drill, step)
        self._merge(self.callbacks.before_step(self, step))
        data_stage, batch = self.batch_for_step(step)
        if self.control.skip is not None:  # skipped without computing: replay, configured
            return StepResult(step, stage, batch, float("nan"), float("nan"), lr, False,
                              self.control.skip, False, time.perf_counter() - t0,
                              batch_stage=data_stage)
        dataset = self.train_data(data_stage)
        rng = rng_state()  # what a re-run restores; ~0.1 ms on CPU, no device sync
        attempt = 0
        self._forward_backward(dataset, batch)
        while True:
            # The loss is read inside the veto, after the grad-norm sync: no sync of its own.
            outcome = guarded_step(
                self.session.optimizer,
                lambda g, a=attempt: self._pre_optim(step, self._step_loss(), a, g))
            if self.control.rerun is None or self.control.skip is not None:
                break
            if attempt == MAX_RERUNS:  # a callback that never stops asking: skip, loudly
                self.control.merge(Decision(skip=f"{MAX_RERUNS} re-runs did not settle step "
                                                 f"{step}: {self.control.rerun}"))
                break
            attempt += 1
            log.warning("step %d: re-running it (re-run %d) on the same batch: %s", step,
                        attempt, self.control.rerun)
            self.control.start_rerun()
            restore_rng_state(rng)
            self._forward_backward(dataset, batch)
        loss, extra = self._step_loss(), self._step_extra()
        reason = self.control.skip or (None if outcome.updated else "non-finite gradients")
        self.last_loss = loss
        if attempt:
            extra = {**extra, "reruns": attempt}
        return StepResult(step, stage, batch, loss, outcome.grad_norm, lr, outcome.updated,
                          reason, True, time.perf_counter() - t0, extra,
                          batch_stage=data_stage)

    def _pre_optim(self, step: int, loss: float, attempt: int, grad_norm: float) -> bool:
        """``guarded_step``'s veto: the callbacks' ``pre_optim_step`` decisions (a skip, or a
        request to re-run the step, which ``_train_step`` acts on)."""
        grads = Gradients(step, loss, grad_norm, self.session.optimizer, self.model_chunks,
                          attempt)
        self._merge(self.callbacks.pre_optim_step(self, grads))
        return self.control.skip is not None or self.control.rerun is not None

    def _forward_backward(self, dataset, batch: int) -> None:
        """The schedule, then one all-reduce of [LM loss sum, tokens, z-loss sum, stop vote]
        whose result is copied to the host without a sync: it is read (``_step_loss``) after
        the grad-norm sync Megatron's step makes anyway, so a step has the bare loop's one host
        sync."""
        zero_grads(self.model_chunks, self.session.optimizer)
        self.heartbeat.beat(self.step + 1, "schedule")
        total = self._loss_sum(batch, dataset, forward_only=False)
        # Any rank's stop vote (SIGUSR1/SIGTERM) rides on the loss all-reduce, so every rank
        # stops after the same step. new_full fills on the device (no host->device copy).
        self._vote = self.callbacks.poll_stop(self)
        self.heartbeat.beat(self.step + 1, "all-reduce")
        total = torch.cat([total, total.new_full((1,), 1.0 if self._vote else 0.0)])
        dist.all_reduce(total)
        self._totals.start(total)
        self._read = False

    def _step_loss(self) -> float:
        """The step's global mean LM loss; on first read also acts on the stop vote."""
        loss_sum, count, _, stop = self._totals.values()
        if not self._read:
            self._read = True
            if stop and self.control.stop is None:
                self.control.merge(Decision(stop=self._vote or "stop requested on another rank"))
                self.stopped_by_vote = True
        return loss_sum / count if count else float("nan")

    def _step_extra(self) -> dict:
        """The step's mean z-loss when it is on (logged next to the LM loss)."""
        if not self._z_loss:
            return {}
        _, count, z_sum, _ = self._totals.values()
        return {"z_loss": z_sum / count if count else float("nan")}

    @property
    def _z_loss(self) -> bool:
        return self.cfg.train.z_loss_coeff > 0

    def _loss_sum(self, batch: int, dataset, forward_only: bool,
                  layout: BatchLayout | None = None) -> torch.Tensor:
        """Run the schedule on ``batch``; [LM loss sum, token count, z-loss sum] on the last
        pipeline stage (zeros elsewhere; the z-loss sum is 0 when it is off)."""
        layout = layout or self.layout
        losses = self.forward_backward(
            self._forward_step, microbatches(dataset, layout, batch),
            num_microbatches=layout.microbatches_in(batch), seq_length=self.stage.seq_length,
            micro_batch_size=layout.micro_batch_size, forward_only=forward_only)
        total = torch.zeros(3, dtype=torch.float64, device=comm_device())
        for item in losses:
            report = item["lm loss"].to(total)
            total[:report.numel()] += report
        return total

    def _forward_step(self, data_iterator, model):
        batch = {k: v.to(comm_device(), non_blocking=True) for k, v in next(data_iterator).items()}
        batch = slice_for_context_parallel(batch)  # this rank's part of each sequence (CP > 1)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        scale = self.control.loss_scale * self.control.fault_scale
        return output, functools.partial(_masked_loss, batch["loss_mask"], scale,
                                         self.cfg.train.z_loss_coeff)


def _masked_loss(loss_mask: torch.Tensor, multiplier: float, z_loss_coeff: float,
                 per_token_loss: torch.Tensor):
    """Megatron's 3-tuple contract: (loss sum, token count, values to report).

    With the z-loss on, the model returns [2, b, s]: the LM loss and log(Z)^2 per token
    (``megatron_patches/z_loss.py``); the objective is their masked sum, LM + coeff x z, and the
    report carries both sums: [LM loss sum, tokens, z sum]."""
    mask = loss_mask.view(-1).float()
    z_sum = None
    if z_loss_coeff > 0:
        per_token_loss, z = per_token_loss[0], per_token_loss[1]
        z_sum = torch.sum(z.reshape(-1).float() * mask)
    lm_sum = torch.sum(per_token_loss.reshape(-1).float() * mask)
    if multiplier != 1.0:  # a drill's fault shows in the reported loss, as a real one would
        lm_sum = lm_sum * multiplier
    loss_sum = lm_sum if z_sum is None else lm_sum + z_loss_coeff * z_sum
    count = mask.sum().to(torch.int)
    report = [lm_sum.detach().clone(), mask.sum().detach()]
    if z_sum is not None:
        report.append(z_sum.detach())
    return loss_sum, count, {"lm loss": torch.stack(report)}


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
