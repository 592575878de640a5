"""Skip batches whose loss spikes, log every skip, replay skip lists, escalate to rollback.

Hooked into the loop at four named points: ``before_step`` (skip without computing: configured
``spike.skip_steps``, a replayed ``train.skip_batches_file``, a rolled-back window),
``pre_optim_step`` (the spike rule sees the globally reduced loss and grad norm; a skip drops
the update while the LR and data position move on), ``after_step`` (log, escalate) and
``on_rollback`` (what to do with the rolled-back window).

With ``spike.rerun`` a step the rule flags is computed again before anything is decided, as
Megatron-LM's re-run state machine does (``megatron/core/rerun_state_machine.py``, with
``fatal=False``): the loop re-runs the schedule on the same batch from the same RNG state
(``Decision(rerun=...)``) and this callback compares the two results (loss within
``spike.rerun_tolerance``, grad norm within ``spike.rerun_grad_tolerance``, relative, as
Megatron's ``_compare_floats``). The same result is a real spike of the data: it is skipped
(and counts towards escalation) like any other. A different one means the first computation was
a transient fault (a flipped bit, a bad kernel launch): it is logged (a ``transient_fault``
event in the metrics log; no skip, nothing to replay) and the re-run's result is used, judged
by the rule in its turn. Megatron continues with the re-run's gradients without judging them;
here a re-run that is flagged again is re-run again, up to ``spike.rerun_attempts`` re-runs,
and skipped if no two consecutive results agree.

Every skip is a line in ``<run_dir>/skipped_batches.jsonl``: step, stage, the batch's dataset
sample indices and their (source, sample) pairs, loss, grad norm, threshold and reason. That
file is a replay list: a rerun given it skips the same batches and so reproduces the run.
Escalation (``spike.escalate_after`` skips within ``spike.escalate_within`` steps) stops the run,
or rolls back to the newest checkpoint before the trouble and either skips the window of batches
after it (as PaLM did) or defers that window: to the end of its stage
(``spike.defer_to=stage_end``) or, as K2 did by hand, to the end of training (``training_end``:
the stage's later batches move up and the window is read by the last steps of the run).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from orchestration.callbacks.base import Callback
from orchestration.callbacks.spike_rules import SpikeDetector, parse_step_ranges, results_agree
from orchestration.common.files import write_jsonl_atomic
from orchestration.config import RunConfig
from orchestration.data.batches import source_of_samples
from orchestration.loop.control import Decision, RollbackRequest
from orchestration.loop.stages import Stage, stage_at, total_steps
from orchestration.metrics.logger import MetricsLogger

log = logging.getLogger(__name__)
#: loss (and gradient) multipliers of the drills; nan/spike hit a step's first computation only
_INJECTIONS = {"nan": float("nan"), "spike": 1000.0, "bad_batch": 1000.0}
_TRANSIENT = ("nan", "spike")
_NOT_COMPUTED = ("configured spike.skip_steps", "replayed skip list", "rolled-back window")
MAX_ROLLBACKS_FROM_ONE_STEP = 3  # then the run stops (failed) instead of rolling back again
RUN_SCOPE = -1  # the ``deferred`` key (and skip-log ``stage_index``) of windows deferred to the end


class SkipBatchesCallback(Callback):
    name = "skipping"
    order = 10

    def __init__(self, cfg: RunConfig, logger: MetricsLogger, is_main: bool) -> None:
        self.cfg = cfg.spike
        self.logger = logger
        self.is_main = is_main
        self.path = Path(cfg.run_dir) / "skipped_batches.jsonl"
        self.detector = SpikeDetector(cfg.spike)
        self.configured = parse_step_ranges(cfg.spike.skip_steps)
        self.replayed, replay_defers = _read_replay(cfg.train.skip_batches_file)
        self.rollback_windows: set[int] = set()
        self.deferred: dict[int, list[list[int]]] = replay_defers
        self.pending: dict[str, Any] = {}
        self.injected: set[int] = set()
        self.escalation: tuple[int, str] | None = None  # (step, message) of a rollback asked for
        self.rollbacks_from: dict[int, int] = {}  # first bad step -> rollbacks (this process)
        self.attempts: list[tuple[float, float]] = []  # (loss, grad norm) of this step's runs
        self.transient_faults: list[int] = []  # steps whose first result did not reproduce

    @classmethod
    def from_config(cls, context, **options) -> SkipBatchesCallback:
        return cls(context.cfg, context.logger, context.is_main, **options)

    # ------------------------------------------------------------------ hook points
    def before_step(self, trainer, step: int) -> Decision | None:
        # A drill's fault is transient, like a hardware glitch: a step re-run after a rollback
        # is not injected again.
        fault = self.cfg.inject.get(str(step), "") if step not in self.injected else ""
        if fault:
            self.injected.add(step)
        scale = _INJECTIONS.get(fault)
        for reason, steps in zip(_NOT_COMPUTED, (self.configured, self.replayed,
                                                 self.rollback_windows), strict=True):
            if step in steps:
                self._log_skip(trainer, step, *trainer.batch_for_step(step), reason,
                               computed=False)
                return Decision(skip=reason)
        if scale is None:
            return None
        return Decision(fault_scale=scale) if fault in _TRANSIENT else Decision(loss_scale=scale)

    def pre_optim_step(self, trainer, grads) -> Decision | None:
        if not self.cfg.enabled:
            return None
        verdict = self.detector.check(grads.loss, grads.grad_norm)
        self.pending = {"threshold": verdict.threshold}
        if grads.attempt == 0:
            self.attempts = []
        if self.cfg.rerun:
            decision = self._judge_rerun(trainer, grads, verdict)
            if decision is not None:
                return decision
        if verdict.spike:
            self.detector.record(grads.loss, grads.grad_norm, accepted=False)
            return Decision(skip=verdict.reason)
        self.detector.accept(grads.loss, grads.grad_norm)
        return None

    def _judge_rerun(self, trainer, grads, verdict) -> Decision | None:
        """With ``spike.rerun``: ask for a re-run of a flagged step, or tell a real spike (the
        re-run reproduces it: skip) from a transient fault (it does not: log, and judge the
        re-run's result). None: decide on ``verdict`` as without re-runs."""
        current = (grads.loss, grads.grad_norm)
        if grads.attempt > 0:
            previous = self.attempts[-1]
            if self._agree(previous, current):
                self.attempts = []
                if verdict.spike:
                    self.detector.record(*current, accepted=False)
                    return Decision(skip=f"{verdict.reason} (reproduced by a re-run)")
                return None
            self._log_transient(trainer, grads.step, grads.attempt, previous, current)
        if not verdict.spike:
            return None
        if grads.attempt >= self.cfg.rerun_attempts:
            self.detector.record(*current, accepted=False)
            return Decision(skip=f"{verdict.reason}; {grads.attempt + 1} computations of the "
                                 "step gave different results")
        self.attempts.append(current)
        return Decision(rerun=verdict.reason)

    def _agree(self, first: tuple[float, float], second: tuple[float, float]) -> bool:
        return (results_agree(first[0], second[0], self.cfg.rerun_tolerance)
                and results_agree(first[1], second[1], self.cfg.rerun_grad_tolerance))

    def _log_transient(self, trainer, step: int, attempt: int, first: tuple[float, float],
                       second: tuple[float, float]) -> None:
        self.transient_faults.append(step)
        log.warning("step %d: a re-run gave loss %.6g / grad norm %.6g instead of %.6g / %.6g: "
                    "a transient fault; using the re-run's result", step, second[0], second[1],
                    first[0], first[1])
        self.logger.event("transient_fault", step=step, rerun=attempt, loss=first[0],
                          grad_norm=first[1], rerun_loss=second[0], rerun_grad_norm=second[1])

    def after_step(self, trainer, result) -> Decision | None:
        if result.skip_reason is None or not result.computed:
            return None
        self._log_skip(trainer, result.step, result.data_stage, result.batch, result.skip_reason,
                       computed=True, loss=result.loss, grad_norm=result.grad_norm)
        if self.detector.record_skip(result.step):
            return self._escalate(result.step)
        return None

    def remap_position(self, trainer, position: int) -> int:
        """Windows deferred to the end of training: the run's batch positions, reordered."""
        spans = self.deferred.get(RUN_SCOPE, [])
        if spans and any(key != RUN_SCOPE for key in self.deferred):
            raise ValueError("the deferrals mix spike.defer_to=stage_end and training_end (a "
                             "skip log replayed under the other setting?); use one of them")
        return defer(spans, total_steps(trainer.stages), position) if spans else position

    def remap_batch(self, trainer, stage: Stage, batch: int) -> int:
        """Windows deferred to the end of their stage: the stage's batch positions, reordered."""
        return defer(self.deferred.get(stage.index, []), stage.steps, batch)

    def on_rollback(self, trainer, from_step: int, to_step: int) -> None:
        if self.escalation is None:
            return
        step, message = self.escalation
        self.escalation = None
        action = self.cfg.on_escalation
        stage = stage_at(trainer.stages, to_step + 1)
        to_end = action == "rollback_defer" and self.cfg.defer_to == "training_end"
        last = step if to_end else min(step, stage.last_step)
        window = list(range(to_step + 1, last + 1))
        self._rewrite(lambda e: e["step"] <= to_step, {"rolled_back": True})
        if action == "rollback_skip":
            self.rollback_windows.update(window)
        elif to_end:  # in the run's positions (step - 1), which may span a stage boundary
            span = [window[0] - 1, window[-1]]
            self.deferred.setdefault(RUN_SCOPE, []).append(span)
            self._append({"kind": "defer", "stage_index": RUN_SCOPE, "stage": "training",
                          "batches": span, "step": step})
        else:
            span = [stage.batch_index(window[0]), stage.batch_index(window[-1]) + 1]
            self.deferred.setdefault(stage.index, []).append(span)
            self._append({"kind": "defer", "stage_index": stage.index, "stage": stage.name,
                          "batches": span, "step": step})
        self.logger.event("rollback", step=step, to_step=to_step, action=action,
                          window=[window[0], window[-1]], why=message)

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {"detector": self.detector.state_dict(),
                "transient_faults": list(self.transient_faults),
                "rollback_windows": sorted(self.rollback_windows),
                "deferred": {str(k): v for k, v in self.deferred.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.detector.load_state_dict(state.get("detector", {}))
        self.transient_faults = list(state.get("transient_faults", []))
        self.rollback_windows = set(state.get("rollback_windows", []))
        self.deferred = {int(k): v for k, v in state.get("deferred", {}).items()}

    def on_fit_start(self, trainer) -> None:
        """Drop log lines past the resumed step: those steps will run (and log) again."""
        if self.is_main and self.path.exists():
            self._rewrite(lambda e: e.get("rolled_back") or e["step"] <= trainer.step, None)

    # ------------------------------------------------------------------ internals
    def _log_skip(self, trainer, step: int, data_stage: Stage, batch: int, reason: str,
                  computed: bool, **values) -> None:
        """``batch`` of ``data_stage`` (the step's own stage unless deferred to the end)."""
        indices = trainer.layout.global_indices(batch)
        entry = {"kind": "skip", "step": step, "stage": trainer.stage.name, "reason": reason,
                 "computed": computed, "data_stage": data_stage.name, "batch": batch,
                 "sample_indices": [int(indices[0]), int(indices[-1]) + 1],
                 "sources": source_of_samples(trainer.train_data(data_stage), indices),
                 "threshold": self.pending.get("threshold"), **values}
        self._append(entry)
        self.logger.event("skip", step=step, reason=reason)

    def _escalate(self, step: int) -> Decision:
        action = self.cfg.on_escalation
        message = (f"{len(self.detector.recent_skips)} skipped batches within "
                   f"{self.cfg.escalate_within} steps (spike.on_escalation={action})")
        first_bad = min(self.detector.recent_skips, default=step)
        self.detector.recent_skips = []
        if action == "stop":
            return Decision(stop=f"loss spikes: {message}", failed=True)
        # Kept out of state_dict on purpose: a rollback restores the callback's state, and
        # trouble that returns after every rollback from the same step is not in the data (a
        # deferral would only move the next batches up, and roll back again, forever).
        self.rollbacks_from[first_bad] = self.rollbacks_from.get(first_bad, 0) + 1
        if self.rollbacks_from[first_bad] > MAX_ROLLBACKS_FROM_ONE_STEP:
            return Decision(stop=f"loss spikes from step {first_bad} came back after "
                                 f"{MAX_ROLLBACKS_FROM_ONE_STEP} rollbacks: {message}; not a "
                                 "data problem a skip or deferral fixes", failed=True)
        self.escalation = (step, message)
        return Decision(rollback=RollbackRequest(first_bad, f"loss spikes: {message}"))

    def _append(self, entry: dict) -> None:
        if self.is_main:
            with open(self.path, "a") as f:
                f.write(json.dumps(entry, default=float) + "\n")

    def _rewrite(self, keep_as_is, mark: dict | None) -> None:
        """Rewrite the log atomically: entries failing ``keep_as_is`` are marked or dropped."""
        if not self.is_main or not self.path.exists():
            return
        out = []
        for line in self.path.read_text().splitlines():
            entry = json.loads(line)
            if keep_as_is(entry):
                out.append(entry)
            elif mark is not None:
                out.append({**entry, **mark})
        write_jsonl_atomic(self.path, out)


def defer(spans: list[list[int]], steps: int, position: int) -> int:
    """``position`` (of ``steps``) after the deferrals ``spans``; the newest deferral goes last.

    Each deferral's span is in *positions* of the order the earlier deferrals had already made,
    so the position is mapped through the newest deferral first, then back through the older
    ones: the order before a deferral's start, which has trained, keeps its meaning.
    """
    for start, end in reversed(spans):
        width = end - start
        if position >= steps - width:
            position = start + position - (steps - width)
        elif position >= start:
            position += width
    return position


def read_skip_log(path: str | Path) -> tuple[dict[int, dict], dict[int, list[list[int]]]]:
    """The skips and deferrals of a skip log (``skipped_batches.jsonl``) that survived the
    rollbacks: {step: its entry} of the skipped steps, and {stage index (``RUN_SCOPE``: the
    run): the spans it deferred, oldest first}. The one reader of the format, for the replay
    and for ``orchestration.data_sequence``."""
    skips: dict[int, dict] = {}
    deferred: dict[int, list[list[int]]] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not a JSON skip-log line ({err})") from err
        if entry.get("rolled_back"):
            continue
        if entry.get("kind") == "defer":
            deferred.setdefault(int(entry["stage_index"]), []).append(entry["batches"])
        elif entry.get("kind", "skip") == "skip":
            skips[int(entry["step"])] = entry
    return skips, deferred


def _read_replay(path: str | None) -> tuple[set[int], dict[int, list[list[int]]]]:
    """Steps to skip and windows to defer, from a previous run's skipped_batches.jsonl."""
    if not path:
        return set(), {}
    skips, deferred = read_skip_log(path)
    return set(skips), deferred
