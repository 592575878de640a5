"""Loss-spike detection: the rules, kept free of training state so they are easy to test.

Rules (``spike.rule``, with ``spike.threshold`` = k and ``spike.window``):

- ``zscore`` (default): one-sided, a value above mean + k*std (sample std) of the last
  ``window`` *accepted* values (k = 6, window = 128), once ``min_history`` accepted values are
  in. A skipped step never enters the history, so a burst cannot raise its own threshold, and a
  value far *below* the mean (a loss that drops suddenly) is never a spike. It is modelled on
  OLMo-core's rule but is not it: see ``olmo``.
- ``olmo``: OLMo-core's exact rule (``olmo_core.optim.SkipStepOptimizer.get_step_factor``,
  ``sigma_factor`` = k, ``rolling_interval_length`` = window): two-sided, |value - mean| / std
  > k, where mean and std (sample std) are over up to ``window`` previous values of *every*
  computed step, the skipped ones included; no test until the history holds
  max(20, window // 2) values counting the current one (63 earlier values for window 128).
  ``min_history`` does not apply, and a window below 19 would never test (config validation
  refuses it). As there, a constant history (std 0) makes every value a spike
  (0/0 is NaN, and NaN is not <= k). One departure: a non-finite value is a spike and never
  enters the history (in OLMo-core's list one NaN would make every z-score NaN, and so skip
  every step, until it leaves the window).
- ``ema_ratio`` (llm-foundry's loss-spike callback compares with 2x a running mean): above k
  times an exponential moving average of accepted values.
- ``max_ratio``: above k times the largest of the last ``window`` accepted values (k = 10).
  A rolling variant of Megatron's check; the exact one is ``megatron``.
- ``megatron``: Megatron-LM's ``RerunStateMachine.is_unexpectedly_large`` (``--check-for-
  spiky-loss``, threshold 10): |value| >= k times the largest |value| of the first
  ``megatron_samples`` (100) computed steps; those first steps are never spikes, and the
  maximum is never updated afterwards. Set ``spike.threshold=10`` for Megatron's factor.

Non-finite values are always spikes. The decision uses values already reduced across ranks,
so every rank agrees. ``spike.rerun`` (``callbacks/skipping.py``) re-runs a flagged step to tell
a transient fault from a real spike, as Megatron's re-run state machine does.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from orchestration.config import SpikeConfig

#: Rules whose history records every computed step, skipped or not (the others: accepted only).
RECORDS_SKIPPED = ("olmo", "megatron")


@dataclass
class Verdict:
    spike: bool
    reason: str | None
    threshold: float


class SeriesMonitor:
    """One monitored series (loss or grad norm) under one rule."""

    def __init__(self, name: str, cfg: SpikeConfig) -> None:
        self.name = name
        self.cfg = cfg
        self.history: deque[float] = deque(maxlen=cfg.window)
        self.ema: float | None = None
        self.first_max: float = 0.0  # megatron: max |value| of the first samples
        self.first_count: int = 0

    def olmo_warm(self) -> bool:
        """OLMo-core tests once its list (previous values + the current one) holds
        max(20, window // 2) values."""
        return len(self.history) + 1 >= max(20, self.cfg.window // 2)

    def threshold(self) -> float:
        """The value above which the current one is a spike (inf: none is yet). For ``olmo``
        the upper edge of the two-sided band (the lower one is mean - k*std)."""
        if self.cfg.rule == "megatron":
            if self.first_count < self.cfg.megatron_samples:
                return math.inf
            return self.cfg.threshold * self.first_max
        if self.cfg.rule == "olmo":
            if not self.olmo_warm() or len(self.history) < 2:
                return math.inf
            mean, std = _mean_std(list(self.history))
            return mean + self.cfg.threshold * std
        if len(self.history) < max(self.cfg.min_history, 2):
            return math.inf
        values = list(self.history)
        if self.cfg.rule == "zscore":
            mean, std = _mean_std(values)
            return mean + self.cfg.threshold * std
        if self.cfg.rule == "ema_ratio":
            return self.cfg.threshold * (self.ema if self.ema is not None else values[-1])
        return self.cfg.threshold * max(values)

    def check(self, value: float) -> Verdict:
        """Is ``value`` a spike? Pure: the history changes only in :meth:`record`."""
        limit = self.threshold()
        if not math.isfinite(value):
            return Verdict(True, f"{self.name} is {value}", limit)
        if self.cfg.rule == "olmo":
            return self._check_olmo(value, limit)
        if self.cfg.rule == "megatron":
            if abs(value) >= limit:
                return Verdict(True, f"{self.name} {value:.4g} >= megatron threshold {limit:.4g} "
                                     f"({self.cfg.threshold:g} x max of the first "
                                     f"{self.cfg.megatron_samples})", limit)
            return Verdict(False, None, limit)
        if value > limit:
            return Verdict(True, f"{self.name} {value:.4g} > {self.cfg.rule} threshold "
                                 f"{limit:.4g}", limit)
        return Verdict(False, None, limit)

    def _check_olmo(self, value: float, limit: float) -> Verdict:
        if math.isinf(limit):  # warming up
            return Verdict(False, None, limit)
        mean, std = _mean_std(list(self.history))
        deviation = abs(value - mean)
        z = deviation / std if std > 0 else (math.inf if deviation > 0 else math.nan)
        if z <= self.cfg.threshold:
            return Verdict(False, None, limit)
        return Verdict(True, f"{self.name} {value:.4g}: |z| = {z:.3g} > {self.cfg.threshold:g} "
                             f"(olmo, mean {mean:.4g}, std {std:.3g})", limit)

    def record(self, value: float, accepted: bool) -> None:
        """Enter a computed step's value: rules in :data:`RECORDS_SKIPPED` take every finite
        value, the others only accepted ones."""
        if not math.isfinite(value) or not (accepted or self.cfg.rule in RECORDS_SKIPPED):
            return
        self.history.append(value)
        decay = self.cfg.ema_decay
        self.ema = value if self.ema is None else decay * self.ema + (1 - decay) * value
        if self.first_count < self.cfg.megatron_samples:
            self.first_count += 1
            self.first_max = max(self.first_max, abs(value))

    def accept(self, value: float) -> None:
        self.record(value, accepted=True)

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "ema": self.ema, "first_max": self.first_max,
                "first_count": self.first_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = deque(state.get("history", []), maxlen=self.cfg.window)
        self.ema = state.get("ema")
        self.first_max = state.get("first_max", 0.0)
        self.first_count = state.get("first_count", 0)


class SpikeDetector:
    """Loss and (optionally) grad-norm monitors plus the escalation window."""

    def __init__(self, cfg: SpikeConfig) -> None:
        self.cfg = cfg
        self.loss = SeriesMonitor("loss", cfg)
        self.grad_norm = SeriesMonitor("grad_norm", cfg)
        self.recent_skips: list[int] = []

    def check(self, loss: float, grad_norm: float) -> Verdict:
        verdict = self.loss.check(loss)
        if not verdict.spike and self.cfg.check_grad_norm:
            verdict = self.grad_norm.check(grad_norm)
        return verdict

    def accept(self, loss: float, grad_norm: float) -> None:
        self.record(loss, grad_norm, accepted=True)

    def record(self, loss: float, grad_norm: float, accepted: bool) -> None:
        """A computed step's values, accepted or skipped (see :meth:`SeriesMonitor.record`)."""
        self.loss.record(loss, accepted)
        self.grad_norm.record(grad_norm, accepted)

    def record_skip(self, step: int) -> bool:
        """Note a skip at ``step``; True when skips within the window call for escalation."""
        self.recent_skips = [s for s in self.recent_skips
                             if s > step - self.cfg.escalate_within] + [step]
        return (self.cfg.on_escalation != "none"
                and len(self.recent_skips) >= self.cfg.escalate_after)

    def state_dict(self) -> dict[str, Any]:
        return {"loss": self.loss.state_dict(), "grad_norm": self.grad_norm.state_dict(),
                "recent_skips": list(self.recent_skips)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss.load_state_dict(state.get("loss", {}))
        self.grad_norm.load_state_dict(state.get("grad_norm", {}))
        self.recent_skips = list(state.get("recent_skips", []))


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (Bessel's correction, as ``torch.std_mean``)."""
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def results_agree(first: float, second: float, tolerance: float) -> bool:
    """Megatron's ``_compare_floats``: equal (NaN equals NaN), or a relative difference
    |a - b| / |(a + b) / 2| within ``tolerance``; NaN or inf against a finite value never agrees."""
    if first == second or (math.isnan(first) and math.isnan(second)):
        return True
    if not (math.isfinite(first) and math.isfinite(second)) or first + second == 0:
        return False
    return abs((first - second) / (first + second) * 2) <= tolerance


def parse_step_ranges(specs: list[str]) -> set[int]:
    """``["120", "300-340"]`` -> {120, 300, ..., 340} (1-based, inclusive, like Megatron-LM)."""
    steps: set[int] = set()
    for spec in specs:
        text = str(spec).strip()
        try:
            lo, _, hi = text.partition("-")
            first, last = int(lo), int(hi or lo)
        except ValueError as err:
            raise ValueError(f"spike.skip_steps: {spec!r} is not 'N' or 'A-B'") from err
        if first < 1 or last < first:
            raise ValueError(f"spike.skip_steps: {spec!r} must be 1-based with A <= B")
        steps.update(range(first, last + 1))
    return steps
