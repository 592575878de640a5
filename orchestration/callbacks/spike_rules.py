"""Loss-spike detection: the rule, kept free of training state so it is easy to test.

Rules from the field, all configurable (``spike.rule``, ``spike.threshold``, ``spike.window``):

- ``zscore`` (default, OLMo-core's): a value above mean + k*std of the last ``window`` accepted
  values (k = 6, window = 128).
- ``ema_ratio`` (llm-foundry's loss-spike callback compares with 2x a running mean): above k
  times an exponential moving average.
- ``max_ratio`` (Megatron-LM's check): above k times the largest recent value (k = 10).

Non-finite values are always spikes. Nothing is declared before ``min_history`` accepted values,
and only accepted (non-skipped) values enter the history, so a spike cannot inflate its own
threshold. The decision uses values already reduced across ranks, so every rank agrees.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from orchestration.config import SpikeConfig


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

    def threshold(self) -> float:
        if len(self.history) < max(self.cfg.min_history, 2):
            return math.inf
        values = list(self.history)
        if self.cfg.rule == "zscore":
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
            return mean + self.cfg.threshold * std
        if self.cfg.rule == "ema_ratio":
            return self.cfg.threshold * (self.ema if self.ema is not None else values[-1])
        return self.cfg.threshold * max(values)

    def check(self, value: float) -> Verdict:
        limit = self.threshold()
        if not math.isfinite(value):
            return Verdict(True, f"{self.name} is {value}", limit)
        if value > limit:
            return Verdict(True, f"{self.name} {value:.4g} > {self.cfg.rule} threshold "
                                 f"{limit:.4g}", limit)
        return Verdict(False, None, limit)

    def accept(self, value: float) -> None:
        self.history.append(value)
        decay = self.cfg.ema_decay
        self.ema = value if self.ema is None else decay * self.ema + (1 - decay) * value

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "ema": self.ema}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = deque(state.get("history", []), maxlen=self.cfg.window)
        self.ema = state.get("ema")


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
        self.loss.accept(loss)
        self.grad_norm.accept(grad_norm)

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
