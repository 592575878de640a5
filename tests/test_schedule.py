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


def test_wsd_default_is_the_old_linear_anneal_over_the_last_20_percent():
    o = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=0, decay_style="wsd")
    assert lr_at(o, 80, 100) == pytest.approx(1.0)  # stable until 80% of the decay window
    assert lr_at(o, 90, 100) == pytest.approx(0.5)
    assert lr_at(o, 100, 100) == pytest.approx(0.0)


@pytest.mark.parametrize("shape", ["linear", "cosine", "exponential", "minus_sqrt"])
@pytest.mark.parametrize("fraction", [0.1, 0.4, 1.0])  # whole steps of 190
def test_wsd_fraction_and_shape_match_megatrons_scheduler(shape, fraction):
    """Megatron-Core's WSD: stable at the peak, then ``lr_wsd_decay_style`` over the last
    ``wsd_decay_steps`` of the decay; here the anneal is a fraction of the decay window."""
    from types import SimpleNamespace

    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    warmup, decay = 10, 190  # the decay window runs from step 10 to step 200
    o = OptimConfig(lr=2e-3, min_lr=1e-4, warmup_steps=warmup, decay_steps=decay,
                    decay_style="wsd", wsd_decay_fraction=fraction, wsd_decay_style=shape)
    megatron = OptimizerParamScheduler(
        SimpleNamespace(param_groups=[{}]), init_lr=0.0, max_lr=2e-3, min_lr=1e-4,
        lr_warmup_steps=warmup, lr_decay_steps=warmup + decay, lr_decay_style="WSD",
        wsd_decay_steps=round(fraction * decay), lr_wsd_decay_style=shape, start_wd=0.1,
        end_wd=0.1, wd_incr_steps=1, wd_incr_style="constant")
    for n in range(1, 260):
        megatron.num_steps = n
        assert lr_at(o, n, 1000) == pytest.approx(megatron.get_lr({}), rel=1e-9, abs=1e-15), n


def test_decay_steps_are_independent_of_the_stage_length():
    """A decay longer than the stage stops part-way down (Crystal's phase 1)."""
    o = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=10, decay_steps=100, decay_style="linear")
    assert lr_at(o, 35, 35) == pytest.approx(0.75)  # 25 of 100 decay steps done: not min_lr
    assert lr_at(o, 110, 35) == pytest.approx(0.0)


def test_bad_schedules_fail_validation_naming_the_key():
    from orchestration.config import ConfigError, RunConfig, StageConfig, validate

    cfg = RunConfig()
    cfg.stages = [StageConfig(name="a", max_steps=5, optim=OptimConfig(
        decay_style="wsd", wsd_decay_fraction=1.5, wsd_decay_style="sqrt", decay_steps=0))]
    cfg.optim.decay_style = "step"
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    for expected in ("optim.decay_style='step' is not one of",
                     "stages[0].optim.wsd_decay_fraction=1.5 must be in (0, 1]",
                     "stages[0].optim.wsd_decay_style='sqrt' is not one of",
                     "stages[0].optim.decay_steps=0 must be positive"):
        assert expected in str(err.value)
