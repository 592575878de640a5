"""Learning-rate schedules: warmup, decay shapes and floors (steps are 1-based)."""

from __future__ import annotations

import pytest

from orchestration.config import OptimConfig
from orchestration.loop.lr import lr_at


def test_warmup_then_cosine_to_floor():
    o = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, decay_style="cosine")
    assert lr_at(o, 1, 100) == pytest.approx(1e-4)  # 1/10 of the peak on the first step
    assert lr_at(o, 10, 100) == pytest.approx(1e-3)
    assert lr_at(o, 55, 100) == pytest.approx(5.5e-4)  # halfway through the decay
    assert lr_at(o, 100, 100) == pytest.approx(1e-4)
    assert lr_at(o, 501, 100) == pytest.approx(1e-4)


def test_linear_and_constant():
    lin = OptimConfig(lr=2e-3, min_lr=0.0, warmup_steps=0, decay_style="linear")
    assert lr_at(lin, 50, 100) == pytest.approx(1e-3)
    const = OptimConfig(lr=2e-3, min_lr=0.0, warmup_steps=5, decay_style="constant")
    assert lr_at(const, 81, 100) == pytest.approx(2e-3)


def test_explicit_decay_steps_reach_floor_early():
    o = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=0, decay_steps=10, decay_style="linear")
    assert lr_at(o, 10, 100) == pytest.approx(0.1)
    assert lr_at(o, 51, 100) == pytest.approx(0.1)
