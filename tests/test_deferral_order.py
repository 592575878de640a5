"""Deferred windows compose: property tests of ``SkipBatchesCallback.remap_batch``.

A deferral is made at a rollback: the positions from the rolled-back step on are re-run, with
the window of batch positions ``[start, end)`` moved to the end of the stage. The invariants
(issue 12): the mapping is a permutation of the stage's batches; no position already trained
changes meaning; every batch is trained exactly once unless skipped; a replay (the state saved
in a checkpoint, or the skip log) gives the same sequence.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestration.callbacks.skipping import SkipBatchesCallback
from orchestration.config import RunConfig
from orchestration.config.schema import DataConfig, OptimConfig
from orchestration.loop.stages import Stage


def _stage(steps: int) -> Stage:
    return Stage(index=0, name="s", data=DataConfig(), optim=OptimConfig(), global_batch_size=8,
                 seq_length=64, steps=steps, steps_before=0)


def _callback(tmp_path) -> SkipBatchesCallback:
    cfg = RunConfig()
    cfg.run_dir = str(tmp_path)
    return SkipBatchesCallback(cfg, logger=None, is_main=False)


@st.composite
def runs(draw):
    """A stage length and deferrals at increasing trained-up-to positions."""
    steps = draw(st.integers(2, 40))
    deferrals, trained = [], 0
    for _ in range(draw(st.integers(0, 5))):
        if trained >= steps - 1:
            break
        start = draw(st.integers(trained, steps - 2))
        end = draw(st.integers(start + 1, steps))
        deferrals.append((start, end))
        trained = start  # the rollback re-runs from ``start``
    return steps, deferrals


def _order(callback, stage) -> list[int]:
    return [callback.remap_batch(None, stage, p) for p in range(stage.steps)]


@given(runs())
def test_deferrals_compose_into_a_permutation_that_keeps_trained_positions(tmp_path_factory,
                                                                          run):
    """Positions before a deferral's start have run (in the order of that moment) and are not
    re-run; since starts only grow, what the run reads in all is the final order, so "every
    batch trained exactly once" is the final order being a permutation."""
    steps, deferrals = run
    stage, callback = _stage(steps), _callback(tmp_path_factory.mktemp("d"))
    for start, end in deferrals:
        before = _order(callback, stage)
        callback.deferred.setdefault(0, []).append([start, end])
        after = _order(callback, stage)
        assert sorted(after) == list(range(steps)), "a permutation of the stage's batches"
        assert after[:start] == before[:start], "positions already trained keep their meaning"
        window = before[start:end]
        assert after[start:] == [b for b in before[start:] if b not in window] + window, \
            "the window, as it was about to be read, moves to the end"
    final = _order(callback, stage)
    replay = _callback(tmp_path_factory.mktemp("r"))
    replay.load_state_dict(callback.state_dict())
    assert _order(replay, stage) == final, "a resumed (or replayed) run reads the same order"


def test_two_deferrals_in_one_stage_from_the_issue(tmp_path):
    """Issue 12's case: 20 batches, deferrals [5, 8) then [10, 12)."""
    stage, callback = _stage(20), _callback(tmp_path)
    callback.deferred[0] = [[5, 8]]
    assert _order(callback, stage) == [0, 1, 2, 3, 4, *range(8, 20), 5, 6, 7]
    callback.deferred[0].append([10, 12])
    assert _order(callback, stage) == [0, 1, 2, 3, 4, 8, 9, 10, 11, 12,
                                       *range(15, 20), 5, 6, 7, 13, 14]


def _two_stages(steps: int) -> list[Stage]:
    first = steps // 2
    return [Stage(index=0, name="a", data=DataConfig(), optim=OptimConfig(), global_batch_size=8,
                  seq_length=64, steps=first, steps_before=0),
            Stage(index=1, name="b", data=DataConfig(), optim=OptimConfig(), global_batch_size=8,
                  seq_length=64, steps=steps - first, steps_before=first)]


def _run_order(callback, trainer) -> list[tuple[int, int]]:
    """(stage, batch) that each step of the run reads, as Trainer.batch_for_step maps it."""
    out = []
    for position in range(sum(s.steps for s in trainer.stages)):
        moved = callback.remap_position(trainer, position)
        stage = next(s for s in trainer.stages if s.contains(moved + 1))
        out.append((stage.index, callback.remap_batch(trainer, stage, stage.batch_index(moved + 1))))
    return out


@given(runs())
def test_deferrals_to_the_end_of_training_keep_the_invariants(tmp_path_factory, run):
    """spike.defer_to=training_end (K2): windows in the run's positions, possibly spanning the
    stage boundary, move after the last stage; each batch of each stage is read exactly once."""
    from types import SimpleNamespace

    from orchestration.callbacks.skipping import RUN_SCOPE

    steps, deferrals = run
    trainer = SimpleNamespace(stages=_two_stages(steps))
    callback = _callback(tmp_path_factory.mktemp("t"))
    everything = sorted((s.index, b) for s in trainer.stages for b in range(s.steps))
    for start, end in deferrals:
        before = _run_order(callback, trainer)
        callback.deferred.setdefault(RUN_SCOPE, []).append([start, end])
        after = _run_order(callback, trainer)
        assert sorted(after) == everything, "every batch of every stage exactly once"
        assert after[:start] == before[:start], "positions already trained keep their meaning"
        window = before[start:end]
        assert after[start:] == [b for b in before[start:] if b not in window] + window
    replay = _callback(tmp_path_factory.mktemp("r"))
    replay.load_state_dict(callback.state_dict())
    assert _run_order(replay, trainer) == _run_order(callback, trainer)


def test_a_window_deferred_to_the_end_of_training_is_read_by_the_last_stage(tmp_path):
    from types import SimpleNamespace

    from orchestration.callbacks.skipping import RUN_SCOPE

    trainer = SimpleNamespace(stages=_two_stages(20))  # stages of 10 and 10 steps
    callback = _callback(tmp_path)
    callback.deferred[RUN_SCOPE] = [[5, 8]]
    order = _run_order(callback, trainer)
    assert order[:5] == [(0, b) for b in range(5)]
    assert order[5:10] == [(0, b) for b in range(8, 10)] + [(1, 0), (1, 1), (1, 2)]
    assert order[-3:] == [(0, 5), (0, 6), (0, 7)]
    callback.deferred[0] = [[1, 2]]
    with pytest.raises(ValueError, match="mix spike.defer_to=stage_end and training_end"):
        _run_order(callback, trainer)


def test_training_end_needs_one_batch_shape_across_stages():
    from orchestration.config import ConfigError, StageConfig, validate

    cfg = RunConfig()
    cfg.stages = [StageConfig(name="a", max_steps=4), StageConfig(name="b", max_steps=4,
                                                                   global_batch_size=32)]
    validate(cfg)  # stage_end: any shapes
    cfg.spike.defer_to = "training_end"
    with pytest.raises(ConfigError, match="spike.defer_to=training_end .* same "
                                          "global_batch_size and seq_length"):
        validate(cfg)
    cfg.spike.defer_to = "end"
    with pytest.raises(ConfigError, match="spike.defer_to='end' is not one of"):
        validate(cfg)


def test_trouble_that_survives_rollbacks_stops_the_run(tiny_cfg, tmp_path):
    """Every step from 3 on is flagged (a negative z threshold): deferring would move the next
    batches up and roll back again forever; after 3 rollbacks from step 3 the run stops."""
    import copy

    from dist import run_single

    cfg = copy.deepcopy(tiny_cfg)
    cfg.run_dir = str(tmp_path / "run")
    cfg.train.max_steps, cfg.checkpoint.save_interval = 8, 2
    cfg.spike.min_history, cfg.spike.threshold, cfg.spike.check_grad_norm = 2, -10.0, False
    cfg.spike.escalate_after, cfg.spike.on_escalation = 2, "rollback_defer"
    out = run_single(cfg)
    assert out["failed"] and "came back after 3 rollbacks" in out["stopped"]
    assert out["final_step"] == 4
