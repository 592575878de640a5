"""What callbacks tell the loop, and what the loop tells callbacks.

Callbacks never set attributes on the trainer. A hook that wants something done returns a
:class:`Decision`; :class:`Control` merges the decisions of one step (the first reason wins) and
the loop acts on it at fixed points: skip the batch or the update, save a checkpoint, roll back,
stop. What a step did comes back to the callbacks as a :class:`StepResult`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestration.loop.stages import Stage


@dataclass(frozen=True)
class RollbackRequest:
    """Restore the newest checkpoint taken before ``first_bad_step`` and continue from it."""

    first_bad_step: int
    reason: str


@dataclass(frozen=True)
class Decision:
    """One callback's answer at one hook; every field is optional.

    - ``skip``: ``before_step``: skip the batch without computing it; ``pre_optim_step``: drop
      the update (the LR and the data position still move on).
    - ``loss_scale``: ``before_step``: multiply this step's loss in every computation of it,
      re-runs included (a drill of a bad batch).
    - ``fault_scale``: ``before_step``: multiply the loss of the step's first computation only
      (a drill of a transient fault, e.g. a flipped bit: a re-run does not see it).
    - ``rerun``: ``pre_optim_step``: drop this computation's gradients and compute the step
      again on the same batch from the same RNG state; ``pre_optim_step`` then sees the re-run
      (``Gradients.attempt`` counts them). Ignored when the step is skipped anyway.
    - ``save``: save a checkpoint after this step.
    - ``stop``: stop after this step (a checkpoint is saved first); ``failed`` marks the stop as
      a failure, which the command reports with a non-zero exit.
    - ``rollback``: reload an earlier checkpoint (``after_step`` only).
    """

    skip: str | None = None
    loss_scale: float | None = None
    save: bool = False
    stop: str | None = None
    failed: bool = False
    rollback: RollbackRequest | None = None
    fault_scale: float | None = None
    rerun: str | None = None


@dataclass
class Control:
    """The merged decisions of the current step (reset by the loop before each step)."""

    skip: str | None = None
    loss_scale: float = 1.0
    save: bool = False
    stop: str | None = None
    failed: bool = False
    rollback: RollbackRequest | None = None
    fault_scale: float = 1.0
    rerun: str | None = None

    def merge(self, decision: Decision | None) -> None:
        if decision is None:
            return
        self.skip = self.skip or decision.skip
        if decision.loss_scale is not None:
            self.loss_scale *= decision.loss_scale
        if decision.fault_scale is not None:
            self.fault_scale *= decision.fault_scale
        self.rerun = self.rerun or decision.rerun
        self.save = self.save or decision.save
        if decision.stop and self.stop is None:
            self.stop, self.failed = decision.stop, decision.failed
        self.rollback = self.rollback or decision.rollback

    def merge_all(self, decisions: list[Decision | None]) -> None:
        """Merge one hook's answers from every callback, in the callbacks' order."""
        for decision in decisions:
            self.merge(decision)

    def reset_step(self) -> None:
        """Forget the per-step decisions; a stop request stays until the loop acts on it."""
        self.skip, self.loss_scale, self.save, self.rollback = None, 1.0, False, None
        self.fault_scale, self.rerun = 1.0, None

    def start_rerun(self) -> None:
        """Before a re-run: its request is being served, and a transient fault is not repeated."""
        self.rerun, self.fault_scale = None, 1.0


@dataclass
class StepResult:
    """What global step ``step`` (1-based) did."""

    step: int
    stage: Stage
    batch: int  # the batch position it read (after any reordering) in ``batch_stage``
    loss: float
    grad_norm: float
    lr: float
    updated: bool
    skip_reason: str | None
    computed: bool  # False when skipped before the forward pass
    step_time_s: float
    extra: dict = field(default_factory=dict)
    batch_stage: Stage | None = None  # whose batch it read: ``stage`` unless deferred to the end

    @property
    def data_stage(self) -> Stage:
        return self.batch_stage or self.stage
