"""The named points where recipes hook into the loop, and the list that dispatches them.

A callback overrides only what it needs. ``before_step`` and ``veto_update`` return a reason
string to skip (the first callback to answer wins); ``state_dict``/``load_state_dict`` put a
callback's state into the checkpoint under its ``name``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestration.stages import Stage
    from orchestration.trainer import StepResult, Trainer


class Callback:
    name = "callback"

    def on_fit_start(self, trainer: Trainer) -> None: ...

    def on_stage_start(self, trainer: Trainer, stage: Stage) -> None: ...

    def before_step(self, trainer: Trainer) -> str | None:
        """Return a reason to skip the coming batch without computing it."""
        return None

    def veto_update(self, trainer: Trainer, loss: float, grad_norm: float) -> str | None:
        """Return a reason to drop this batch's update (the LR and data position still move)."""
        return None

    def remap_batch(self, trainer: Trainer, batch: int) -> int:
        """Map the stage-local batch number to the one to read (identity unless reordering)."""
        return batch

    def after_step(self, trainer: Trainer, result: StepResult) -> None: ...

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None: ...

    def on_fit_end(self, trainer: Trainer) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CallbackList:
    def __init__(self, callbacks: list[Callback]) -> None:
        self.callbacks = list(callbacks)

    def on_fit_start(self, trainer: Trainer) -> None:
        for cb in self.callbacks:
            cb.on_fit_start(trainer)

    def on_stage_start(self, trainer: Trainer, stage: Stage) -> None:
        for cb in self.callbacks:
            cb.on_stage_start(trainer, stage)

    def before_step(self, trainer: Trainer) -> str | None:
        return next((r for cb in self.callbacks if (r := cb.before_step(trainer))), None)

    def veto_update(self, trainer: Trainer, loss: float, grad_norm: float) -> str | None:
        return next((r for cb in self.callbacks
                     if (r := cb.veto_update(trainer, loss, grad_norm))), None)

    def remap_batch(self, trainer: Trainer, batch: int) -> int:
        for cb in self.callbacks:
            batch = cb.remap_batch(trainer, batch)
        return batch

    def after_step(self, trainer: Trainer, result: StepResult) -> None:
        for cb in self.callbacks:
            cb.after_step(trainer, result)

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
        for cb in self.callbacks:
            cb.on_checkpoint(trainer, path)

    def on_fit_end(self, trainer: Trainer) -> None:
        for cb in self.callbacks:
            cb.on_fit_end(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {cb.name: cb.state_dict() for cb in self.callbacks if cb.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for cb in self.callbacks:
            if cb.name in state:
                cb.load_state_dict(state[cb.name])
