"""The named points where recipes hook into the loop, and the list that dispatches them.

One step of the loop, with its hooks (``orchestration/loop/trainer.py``)::

    on_stage_start          the step begins a new stage (data for it is ready)
    remap_position          which of the run's batches this step reads (deferred to the end)
    remap_batch             which of the stage's batches this step reads (reordering)
    before_step      -> Decision: skip without computing, scale the loss
      forward/backward (Megatron's schedule), then one all-reduce of [loss, count, stop]
    poll_stop        -> reason: this rank asks every rank to stop (reduced in that all-reduce)
    pre_optim_step   -> Decision: sees the reduced gradients, loss and grad norm; may skip,
                        or ask for a re-run of the step (forward/backward again, same batch
                        and RNG state; then pre_optim_step sees the re-run)
      optimizer update (unless skipped)
    after_step       -> Decision: save, stop, roll back
    on_checkpoint / on_rollback      what the loop did about it
    on_fit_start / on_fit_end

Hooks read the trainer (config, stages, the current stage, data and batch layout, the step)
and may call its services (``evaluate``); they never set its attributes: what they want done
comes back as a :class:`~orchestration.loop.control.Decision`. ``state_dict`` and
``load_state_dict`` put a callback's state into the checkpoint under its ``name``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestration.loop.control import Decision, StepResult

if TYPE_CHECKING:
    import torch

    from orchestration.callbacks.registry import CallbackContext
    from orchestration.loop.stages import Stage
    from orchestration.loop.trainer import Trainer


@dataclass
class Gradients:
    """What ``pre_optim_step`` sees: the step's gradients after the data-parallel reduction
    and Megatron's fp16/bf16 unscaling, before clipping and the update.

    ``grad_norm`` is the global norm (over every model- and data-parallel rank; NaN when the
    gradients are not finite), the same value clipping uses. ``attempt`` is 0 for the step's
    first computation and counts the re-runs a ``Decision(rerun=...)`` asked for.
    """

    step: int
    loss: float
    grad_norm: float
    optimizer: Any
    model_chunks: list
    attempt: int = 0

    def main_grads(self) -> Iterator[torch.Tensor]:
        """The fp32 gradients the optimizer steps with, fully reduced. With the distributed
        optimizer (the default) each data-parallel rank holds its shard of every parameter and
        the squared norms of all ranks' shards sum to ``grad_norm ** 2``; without it every rank
        holds the whole gradient."""
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    yield param.grad

    def named_model_grads(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, ``main_grad``) of each model parameter of this rank. Fully reduced without
        the distributed optimizer; with it only this rank's shard of each bucket is."""
        for chunk in self.model_chunks:
            for name, param in chunk.named_parameters():
                grad = getattr(param, "main_grad", None)
                if grad is not None:
                    yield name, grad


class Callback:
    name = "callback"
    order = 50  # dispatch order: lower first (skipping 10 ... checkpoint 80, preemption 90)

    @classmethod
    def from_config(cls, context: CallbackContext, **options: Any) -> Callback | None:
        """Build from the run's context and the ``callbacks.<name>`` options (registry.py)."""
        return cls(**options)

    def on_fit_start(self, trainer: Trainer) -> None: ...

    def on_stage_start(self, trainer: Trainer, stage: Stage) -> None: ...

    def remap_position(self, trainer: Trainer, position: int) -> int:
        """Map the run's 0-based batch position (``step - 1``) to the one to read; the stage
        holding the result supplies the data (identity unless reordering across stages)."""
        return position

    def remap_batch(self, trainer: Trainer, stage: Stage, batch: int) -> int:
        """Map the stage's batch position to the one to read (identity unless reordering)."""
        return batch

    def before_step(self, trainer: Trainer, step: int) -> Decision | None:
        return None

    def poll_stop(self, trainer: Trainer) -> str | None:
        """A reason when this rank wants the run to stop after this step (e.g. a signal)."""
        return None

    def pre_optim_step(self, trainer: Trainer, grads: Gradients) -> Decision | None:
        return None

    def after_step(self, trainer: Trainer, result: StepResult) -> Decision | None:
        return None

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None: ...

    def on_rollback(self, trainer: Trainer, from_step: int, to_step: int) -> None: ...

    def on_fit_end(self, trainer: Trainer) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CallbackList:
    """Dispatches each hook to every callback in ``order``; decisions come back as a list."""

    def __init__(self, callbacks: list[Callback]) -> None:
        self.callbacks = sorted(callbacks, key=lambda cb: cb.order)  # stable: ties keep order
        names = [cb.name for cb in self.callbacks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"two callbacks share the name(s) {duplicates}: state_dict keys clash")

    def __iter__(self) -> Iterator[Callback]:
        return iter(self.callbacks)

    def on_fit_start(self, trainer: Trainer) -> None:
        for cb in self.callbacks:
            cb.on_fit_start(trainer)

    def on_stage_start(self, trainer: Trainer, stage: Stage) -> None:
        for cb in self.callbacks:
            cb.on_stage_start(trainer, stage)

    def remap_position(self, trainer: Trainer, position: int) -> int:
        for cb in self.callbacks:
            position = cb.remap_position(trainer, position)
        return position

    def remap_batch(self, trainer: Trainer, stage: Stage, batch: int) -> int:
        for cb in self.callbacks:
            batch = cb.remap_batch(trainer, stage, batch)
        return batch

    def before_step(self, trainer: Trainer, step: int) -> list[Decision | None]:
        return [cb.before_step(trainer, step) for cb in self.callbacks]

    def poll_stop(self, trainer: Trainer) -> str | None:
        reasons = [cb.poll_stop(trainer) for cb in self.callbacks]
        return next((r for r in reasons if r), None)

    def pre_optim_step(self, trainer: Trainer, grads: Gradients) -> list[Decision | None]:
        return [cb.pre_optim_step(trainer, grads) for cb in self.callbacks]

    def after_step(self, trainer: Trainer, result: StepResult) -> list[Decision | None]:
        return [cb.after_step(trainer, result) for cb in self.callbacks]

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
        for cb in self.callbacks:
            cb.on_checkpoint(trainer, path)

    def on_rollback(self, trainer: Trainer, from_step: int, to_step: int) -> None:
        for cb in self.callbacks:
            cb.on_rollback(trainer, from_step, to_step)

    def on_fit_end(self, trainer: Trainer) -> None:
        for cb in self.callbacks:
            cb.on_fit_end(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {cb.name: state for cb in self.callbacks if (state := cb.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for cb in self.callbacks:
            if cb.name in state:
                cb.load_state_dict(state[cb.name])
