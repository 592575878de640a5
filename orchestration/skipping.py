"""Skip batches whose loss spikes, log every skip, replay skip lists, escalate to rollback.

Hooked into the loop at three named points: ``before_step`` (skip without computing: configured
``spike.skip_steps``, a replayed ``train.skip_batches_file``, a rolled-back window),
``veto_update`` (the spike rule sees the globally reduced loss and grad norm; a veto drops the
update while the LR and data position move on) and ``after_step`` (log, escalate).

Every skip is a line in ``<run_dir>/skipped_batches.jsonl``: step (1-based), stage, the batch's
dataset sample indices and their (source, sample) pairs, loss, grad norm, threshold and reason.
That file is a replay list: a rerun given it skips the same batches and so reproduces the run.
Escalation (``spike.escalate_after`` skips within ``spike.escalate_within`` steps) stops the run,
or rolls back to the newest checkpoint before the trouble and either skips the window of batches
after it (as PaLM did) or defers that window to the end of the stage (as K2 did by hand).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from orchestration import checkpoint as ckpt
from orchestration.callbacks import Callback
from orchestration.config import RunConfig
from orchestration.data import source_of_samples
from orchestration.metrics import MetricsLogger
from orchestration.spikes import SpikeDetector, parse_step_ranges
from orchestration.stages import stage_at

log = logging.getLogger(__name__)
_INJECTIONS = {"nan": float("nan"), "spike": 1000.0}  # loss (and gradient) multipliers


class SkipBatchesCallback(Callback):
    name = "skipping"

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

    # ------------------------------------------------------------------ hook points
    def before_step(self, trainer) -> str | None:
        step = trainer.step + 1
        # A drill's fault is transient, like a hardware glitch: a step re-run after a rollback
        # is not injected again.
        fault = self.cfg.inject.get(str(step), "") if step not in self.injected else ""
        trainer.loss_multiplier = _INJECTIONS.get(fault, 1.0)
        if fault:
            self.injected.add(step)
        for reason, steps in (("configured spike.skip_steps", self.configured),
                              ("replayed skip list", self.replayed),
                              ("rolled-back window", self.rollback_windows)):
            if step in steps:
                self._log_skip(trainer, step, reason, computed=False)
                return reason
        return None

    def veto_update(self, trainer, loss: float, grad_norm: float) -> str | None:
        if not self.cfg.enabled:
            return None
        verdict = self.detector.check(loss, grad_norm)
        self.pending = {"threshold": verdict.threshold}
        if verdict.spike:
            return verdict.reason
        self.detector.accept(loss, grad_norm)
        return None

    def after_step(self, trainer, result) -> None:
        if result.skip_reason is None or not self._computed(result):
            return
        step = result.step + 1
        self._log_skip(trainer, step, result.skip_reason, computed=True, loss=result.loss,
                       grad_norm=result.grad_norm)
        if self.detector.record_skip(step):
            self._escalate(trainer, step)

    def remap_batch(self, trainer, batch: int) -> int:
        """Deferred windows move to the end of their stage, in the order they were deferred."""
        for start, end in self.deferred.get(trainer.stage.index, []):
            width, steps = end - start, trainer.stage.steps
            if batch >= steps - width:
                batch = start + batch - (steps - width)
            elif batch >= start:
                batch += width
        return batch

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {"detector": self.detector.state_dict(),
                "rollback_windows": sorted(self.rollback_windows),
                "deferred": {str(k): v for k, v in self.deferred.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.detector.load_state_dict(state.get("detector", {}))
        self.rollback_windows = set(state.get("rollback_windows", []))
        self.deferred = {int(k): v for k, v in state.get("deferred", {}).items()}

    def on_fit_start(self, trainer) -> None:
        """Drop log lines past the resumed step: those steps will run (and log) again."""
        if self.is_main and self.path.exists():
            self._rewrite(lambda e: e.get("rolled_back") or e["step"] <= trainer.step, None)

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _computed(result) -> bool:
        return result.skip_reason not in ("configured spike.skip_steps", "replayed skip list",
                                          "rolled-back window")

    def _log_skip(self, trainer, step: int, reason: str, computed: bool, **values) -> None:
        batch = trainer.data_step(step - 1)
        indices = trainer.layout.global_indices(batch)
        entry = {"kind": "skip", "step": step, "stage": trainer.stage.name, "reason": reason,
                 "computed": computed, "sample_indices": [int(indices[0]), int(indices[-1]) + 1],
                 "sources": source_of_samples(trainer.data.train, indices),
                 "threshold": self.pending.get("threshold"), **values}
        self._append(entry)
        self.logger.event("skip", step=step, reason=reason)

    def _escalate(self, trainer, step: int) -> None:
        action = self.cfg.on_escalation
        message = (f"{len(self.detector.recent_skips)} skipped batches within "
                   f"{self.cfg.escalate_within} steps (spike.on_escalation={action})")
        first_bad = min(self.detector.recent_skips, default=step)
        self.detector.recent_skips = []
        trainer.finalize_checkpoints(blocking=True)  # a background save may be the target
        target = _checkpoint_before(trainer, first_bad)
        if action == "stop" or target is None:
            trainer.stop_requested = f"loss spikes: {message}" + (
                "" if action == "stop" else "; no checkpoint to roll back to")
            trainer.failed = True
            return
        resumed_at = int(ckpt.read_metadata(target)["step"])
        trainer.reload(target)
        stage = stage_at(trainer.stages, resumed_at)
        window = list(range(resumed_at + 1, min(step, stage.end_step) + 1))
        self._rewrite(lambda e: e["step"] <= resumed_at, {"rolled_back": True})
        if action == "rollback_skip":
            self.rollback_windows.update(window)
        else:
            span = [window[0] - 1 - stage.start_step, window[-1] - stage.start_step]
            self.deferred.setdefault(stage.index, []).append(span)
            self._append({"kind": "defer", "stage_index": stage.index, "stage": stage.name,
                          "batches": span, "step": step})
        self.logger.event("rollback", step=step, to_step=resumed_at, action=action,
                          window=[window[0], window[-1]], why=message)

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
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(e, default=float) + "\n" for e in out))
        os.replace(tmp, self.path)


def _checkpoint_before(trainer, first_bad_step: int) -> Path | None:
    """Newest complete checkpoint taken before ``first_bad_step`` ran."""
    candidates = [p for p in ckpt.complete_checkpoints(ckpt.checkpoint_dir(trainer.run_dir))
                  if int(ckpt.read_metadata(p)["step"]) < first_bad_step]
    return candidates[-1] if candidates else None


def _read_replay(path: str | None) -> tuple[set[int], dict[int, list[list[int]]]]:
    """Steps to skip and windows to defer, from a previous run's skipped_batches.jsonl."""
    if not path:
        return set(), {}
    steps: set[int] = set()
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
            steps.add(int(entry["step"]))
    return steps, deferred
