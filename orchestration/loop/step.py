"""The computation of one training step, for :class:`~orchestration.loop.trainer.Trainer`.

Megatron's schedule runs the forward/backward over this rank's micro-batches; then one
all-reduce of [LM loss sum, tokens, z-loss sum, stop vote], copied to the host without a sync of
its own (:class:`~orchestration.loop.host_copy.HostCopy`) and read inside
``guarded_step``'s veto, after the grad-norm sync Megatron's step makes anyway: a step has the
bare loop's one host sync. The veto is the ``pre_optim_step`` hooks, which may drop the update
or ask for a re-run (the schedule again on the same batch from the same RNG state).

Why a class of its own: it holds what lives only between a step's schedule and its update (the
reduced totals, this rank's stop vote), while the trainer holds what the run carries across
steps. It reads the trainer (config, stage, layout, control, callbacks), as the hooks do.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from megatron_patches.guarded_step import guarded_step
from megatron_patches.optimizer import apply_lr, zero_grads
from megatron_patches.parallel import (
    comm_device,
    restore_rng_state,
    rng_state,
    slice_for_context_parallel,
)
from megatron_patches.schedule import ForwardBackward
from orchestration.callbacks.base import Gradients
from orchestration.data.batches import BatchLayout, microbatches
from orchestration.loop.control import Decision, StepResult
from orchestration.loop.host_copy import HostCopy
from orchestration.loop.lr import lr_for_step, weight_decay_for_step

if TYPE_CHECKING:
    from orchestration.loop.trainer import Trainer

log = logging.getLogger("orchestration.loop.trainer")  # the loop's log lines keep their name
MAX_RERUNS = 8  # per step, whatever the callbacks ask (spike.rerun_attempts is 1 by default)


class StepRunner:
    """Runs the trainer's steps: the schedule, the one all-reduce, the veto and re-runs."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.forward_backward = ForwardBackward(trainer.session.model_chunks)
        self.stopped_by_vote = False  # the stop came from a rank's poll_stop (e.g. a signal)
        self._totals = HostCopy(4, torch.float64, comm_device())  # [loss, tokens, z, stop]
        self._vote: str | None = None
        self._read = True

    def train(self, step: int) -> StepResult:
        """Global step ``step``: LR, ``before_step``, the batch (unless skipped), the update."""
        t = self.trainer
        stage, t0 = t.stage, time.perf_counter()
        t.heartbeat.beat(step)
        lr = lr_for_step(t.cfg, t.stages, step)
        apply_lr(t.session.optimizer, lr, weight_decay_for_step(t.cfg, t.stages, step))
        maybe_stall(t.cfg.runtime.fault_drill, step,
                    stop_requested=lambda: t.callbacks.poll_stop(t) is not None)
        t.control.merge_all(t.callbacks.before_step(t, step))
        data_stage, batch = t.batch_for_step(step)
        if t.control.skip is not None:  # skipped without computing: replay, configured
            return StepResult(step, stage, batch, float("nan"), float("nan"), lr, False,
                              t.control.skip, False, time.perf_counter() - t0,
                              batch_stage=data_stage)
        outcome, attempt = self._update(step, t.train_data(data_stage), batch)
        loss, extra = self._step_loss(), self._step_extra()
        reason = t.control.skip or (None if outcome.updated else "non-finite gradients")
        if attempt:
            extra = {**extra, "reruns": attempt}
        return StepResult(step, stage, batch, loss, outcome.grad_norm, lr, outcome.updated,
                          reason, True, time.perf_counter() - t0, extra,
                          batch_stage=data_stage)

    def _update(self, step: int, dataset, batch: int):
        """The schedule and ``guarded_step``, again from the same RNG state while the
        ``pre_optim_step`` hooks ask for a re-run; (the step's outcome, re-runs made)."""
        control = self.trainer.control
        rng = rng_state()  # what a re-run restores; ~0.1 ms on CPU, no device sync
        attempt = 0
        self._forward_backward(dataset, batch)
        while True:
            # The loss is read inside the veto, after the grad-norm sync: no sync of its own.
            outcome = guarded_step(
                self.trainer.session.optimizer,
                lambda g, a=attempt: self._pre_optim(step, self._step_loss(), a, g))
            if control.rerun is None or control.skip is not None:
                return outcome, attempt
            if attempt == MAX_RERUNS:  # a callback that never stops asking: skip, loudly
                control.merge(Decision(skip=f"{MAX_RERUNS} re-runs did not settle step "
                                            f"{step}: {control.rerun}"))
                return outcome, attempt
            attempt += 1
            log.warning("step %d: re-running it (re-run %d) on the same batch: %s", step,
                        attempt, control.rerun)
            control.start_rerun()
            restore_rng_state(rng)
            self._forward_backward(dataset, batch)

    def _pre_optim(self, step: int, loss: float, attempt: int, grad_norm: float) -> bool:
        """``guarded_step``'s veto: the callbacks' ``pre_optim_step`` decisions (a skip, or a
        request to re-run the step, which ``_update`` acts on)."""
        t = self.trainer
        grads = Gradients(step, loss, grad_norm, t.session.optimizer, t.model_chunks, attempt)
        t.control.merge_all(t.callbacks.pre_optim_step(t, grads))
        return t.control.skip is not None or t.control.rerun is not None

    def _forward_backward(self, dataset, batch: int) -> None:
        """The schedule, then one all-reduce of [LM loss sum, tokens, z-loss sum, stop vote]
        whose result is copied to the host without a sync: it is read (``_step_loss``) after
        the grad-norm sync Megatron's step makes anyway, so a step has the bare loop's one host
        sync."""
        t = self.trainer
        zero_grads(t.model_chunks, t.session.optimizer)
        t.heartbeat.beat(t.step + 1, "schedule")
        total = self.loss_sum(batch, dataset, forward_only=False)
        # Any rank's stop vote (SIGUSR1/SIGTERM) rides on the loss all-reduce, so every rank
        # stops after the same step. new_full fills on the device (no host->device copy).
        self._vote = t.callbacks.poll_stop(t)
        t.heartbeat.beat(t.step + 1, "all-reduce")
        total = torch.cat([total, total.new_full((1,), 1.0 if self._vote else 0.0)])
        dist.all_reduce(total)
        self._totals.start(total)
        self._read = False

    def _step_loss(self) -> float:
        """The step's global mean LM loss; on first read also acts on the stop vote."""
        loss_sum, count, _, stop = self._totals.values()
        if not self._read:
            self._read = True
            control = self.trainer.control
            if stop and control.stop is None:
                control.merge(Decision(stop=self._vote or "stop requested on another rank"))
                self.stopped_by_vote = True
        return loss_sum / count if count else float("nan")

    def _step_extra(self) -> dict:
        """The step's mean z-loss when it is on (logged next to the LM loss)."""
        if not self.trainer.cfg.train.z_loss_coeff > 0:
            return {}
        _, count, z_sum, _ = self._totals.values()
        return {"z_loss": z_sum / count if count else float("nan")}

    def loss_sum(self, batch: int, dataset, forward_only: bool,
                 layout: BatchLayout | None = None) -> torch.Tensor:
        """Run the schedule on ``batch``; [LM loss sum, token count, z-loss sum] on the last
        pipeline stage (zeros elsewhere; the z-loss sum is 0 when it is off)."""
        layout = layout or self.trainer.layout
        losses = self.forward_backward(
            self._forward_step, microbatches(dataset, layout, batch),
            num_microbatches=layout.microbatches_in(batch),
            seq_length=self.trainer.stage.seq_length,
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
        control = self.trainer.control
        scale = control.loss_scale * control.fault_scale
        return output, functools.partial(masked_loss, batch["loss_mask"], scale,
                                         self.trainer.cfg.train.z_loss_coeff)


def masked_loss(loss_mask: torch.Tensor, multiplier: float, z_loss_coeff: float,
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


def maybe_stall(drill: str | None, step: int, stop_requested: Callable[[], bool]) -> None:
    """The ``stall:rank=R,step=S[,seconds=T][,until=signal]`` fault drill: rank R hangs before
    step S for T seconds, or, with ``until=signal``, until this rank is asked to stop (its
    ``poll_stop``: a signal), whichever comes first. The second holds a SLURM time-limit drill
    at step S until the warning, which slurmctld sends at its next periodic check (every
    30 s), not at a set time."""
    if not drill or not drill.startswith("stall:"):
        return
    fields = dict(kv.split("=") for kv in drill[len("stall:"):].split(","))
    if int(fields["rank"]) != dist.get_rank() or int(fields["step"]) != step:
        return
    log.warning("fault drill: rank %d stalls before step %d", dist.get_rank(), step)
    deadline = time.monotonic() + float(fields.get("seconds", 3600))
    while time.monotonic() < deadline:
        if fields.get("until") == "signal" and stop_requested():
            log.warning("fault drill: rank %d stops stalling on a stop signal", dist.get_rank())
            return
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
