"""What the loop does with checkpoints: save, resume, roll back, and keep what cannot load.

The on-disk layout and the atomic writes are ``orchestration/checkpoint``'s; this module decides
what a :class:`~orchestration.loop.trainer.Trainer` puts into a checkpoint (the step, the data
history, the callbacks' state) and how it continues from one. Nothing that fails to load is
overwritten or pruned: it is moved aside under ``checkpoints/unloadable/``, and a run whose
every checkpoint fails to load refuses to start from scratch unless told to.

Why a class of its own: it holds the background saver and the step of the last save, which only
checkpointing needs; it sets the trainer's step, stage and data history only where a checkpoint
is loaded (resume, rollback), as the loop's own action.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch.distributed as dist

from megatron_patches.checkpointing import AsyncSaver
from megatron_patches.optimizer import params_gathered
from orchestration.checkpoint import store
from orchestration.checkpoint.layout import (
    checkpoint_dir,
    config_differences,
    read_metadata,
    shape_config,
)
from orchestration.config import to_dict
from orchestration.loop.control import Decision, RollbackRequest
from orchestration.loop.stages import consumed_samples, consumed_tokens, stage_at

if TYPE_CHECKING:
    from orchestration.loop.trainer import Trainer

log = logging.getLogger("orchestration.loop.trainer")  # the loop's log lines keep their name


class CheckpointActions:
    """The trainer's checkpoints: one background save at a time, published when complete."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.saver = AsyncSaver() if trainer.cfg.checkpoint.async_save else None
        self.last_saved: int | None = None  # the step of the newest save (scheduled or done)
        self.dir = checkpoint_dir(trainer.run_dir)

    def save(self) -> Path:
        """Save after ``trainer.step`` (in the background with ``checkpoint.async_save``)."""
        t = self.trainer
        self.finalize(blocking=True)  # one background save at a time
        state = {"step": t.step, "consumed_tokens": consumed_tokens(t.stages, t.step),
                 "consumed_samples": consumed_samples(t.stages, t.step),
                 "stage": t.stage.name if t.stage else None,
                 "data_history": t.data_history,
                 "callbacks": t.callbacks.state_dict()}
        t0 = time.perf_counter()
        with params_gathered(t.model_chunks):  # overlapped gathers complete: fresh weights
            path = store.save(self.dir, t.step, t.model_chunks, t.session.optimizer, state,
                              t.cfg.checkpoint.keep_last, self.saver,
                              shape_config(to_dict(t.cfg)), t.cfg.checkpoint.keep_every,
                              release=self._release_label())
        self.last_saved = t.step
        log.info("%s %s in %.2fs", "scheduled (writing in the background)"
                 if self.saver is not None else "saved", path, time.perf_counter() - t0)
        if self.saver is None:
            t.callbacks.on_checkpoint(t, path)
        return path

    def _release_label(self) -> str | None:
        """``end of stage NAME`` when this step ends a stage and ``checkpoint.save_stage_end``
        is on: that checkpoint is the stage's release, kept from pruning."""
        t = self.trainer
        if not t.cfg.checkpoint.save_stage_end or t.step == 0:
            return None
        stage = stage_at(t.stages, t.step)
        return f"end of stage {stage.name}" if t.step == stage.last_step else None

    def finalize(self, blocking: bool) -> None:
        """Publish background saves that every rank has finished (all, with ``blocking``)."""
        if self.saver is not None:
            for path in store.finalize(self.dir, self.saver, blocking):
                self.trainer.callbacks.on_checkpoint(self.trainer, path)

    def resume(self) -> None:
        """Continue from the run dir's newest complete checkpoint, else from checkpoint.load."""
        t, settings = self.trainer, self.trainer.cfg.checkpoint
        failures: list[tuple[Path, str]] = []
        loaded = store.load_latest(self.dir, self.load_full, failures)
        if loaded is None and failures and not settings.allow_fresh_start:
            listed = "\n  ".join(self._why_unloadable(path, reason) for path, reason in failures)
            raise store.UnloadableCheckpoints(
                f"{t.run_dir}: none of its {len(failures)} checkpoint(s) loads, so the run "
                f"would start again from step 0 and prune them:\n  {listed}\nFix or restore "
                "them, use a new run_dir, or set checkpoint.allow_fresh_start=true to train "
                "from scratch here (the unloadable checkpoints are then kept, never pruned).")
        if failures:  # newer ones than the checkpoint resumed from, or all (a fresh start)
            self._quarantine([path for path, _ in failures])
        if loaded is not None:
            path, state = loaded
            t.step = int(state["step"])
            t.data_history = list(state.get("data_history", []))
            t.callbacks.load_state_dict(state.get("callbacks", {}))
            log.info("resumed from %s at step %d", path, t.step)
        elif settings.load:
            path = Path(settings.load)
            store.load(path, t.model_chunks, t.session.optimizer, settings.load_optimizer,
                       settings.reset_optimizer_on_reshard)
            log.info("initialised from %s (optimizer: %s)", path, settings.load_optimizer)

    def _why_unloadable(self, path: Path, reason: str) -> str:
        """Incompatible with this config (naming the keys that differ), or else damaged."""
        differences = config_differences(path, shape_config(to_dict(self.trainer.cfg)))
        if differences:
            return f"{path}: incompatible with this config ({'; '.join(differences)})"
        return f"{path}: damaged ({reason})"

    def _quarantine(self, paths: list[Path]) -> None:
        """Move checkpoints that failed to load out of the pruning set, keeping them: a re-save
        of the same step would otherwise overwrite one, and pruning delete it."""
        if self.trainer.is_main:
            stamp = time.strftime("%Y%m%dT%H%M%S")
            for path in paths:
                target = path.parent / "unloadable" / f"{path.name}-{stamp}"
                target.parent.mkdir(parents=True, exist_ok=True)
                path.rename(target)
                log.warning("kept the unloadable %s as %s (never pruned)", path, target)
        dist.barrier()

    def rollback(self, request: RollbackRequest) -> None:
        """Reload the newest checkpoint before ``request.first_bad_step`` (weights, optimizer,
        the callbacks' state, the data history) and continue from its step; with none, stop
        the run as failed, saving first."""
        t = self.trainer
        self.finalize(blocking=True)  # a background save may be the target
        target = store.checkpoint_before(self.dir, request.first_bad_step)
        if target is None:
            t.control.merge(Decision(stop=f"{request.reason}; no checkpoint to roll back to",
                                     failed=True))
            t.save_checkpoint()
            return
        from_step = t.step
        state = self.load_full(target)
        # The callbacks' own state goes back too: a spike detector must not keep the losses of
        # the steps being undone in its history.
        t.callbacks.load_state_dict(state.get("callbacks", {}))
        t.data_history = list(state.get("data_history", t.data_history))
        t.step = int(read_metadata(target)["step"])
        t.stage = None  # rebuild the stage's data view on the next step
        log.warning("rolled back from step %d to %s: %s", from_step, target, request.reason)
        t.callbacks.on_rollback(t, from_step, t.step)

    def load_full(self, path: Path) -> dict:
        """Weights and optimizer state from ``path``; its trainer state (the step, ...)."""
        t = self.trainer
        return store.load(path, t.model_chunks, t.session.optimizer, with_optimizer=True,
                          reset_optimizer_on_reshard=t.cfg.checkpoint.reset_optimizer_on_reshard)
