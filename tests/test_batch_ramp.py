"""Batch-size ramp-up: Megatron's ``rampup_batch_size`` semantics, stages, exact resume."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from dist import run_single
from sample_probe import read_probe

from orchestration.config import ConfigError, OptimConfig, StageConfig, validate
from orchestration.data.ramp import BatchRamp
from orchestration.loop.lr import lr_for_step
from orchestration.loop.stages import consumed_samples, plan_stages

RAMPS = [  # (start, increment, ramp samples, global batch, micro batch x DP)
    (2, 2, 12, 8, 2),
    (32, 32, 1000, 256, 32),
    (16, 16, 1000, 64, 16),  # 333.33... samples per increment: Megatron's float arithmetic
    (3, 3, 10, 9, 1),
    (1024, 512, 3_000_000, 4096, 64),
]


@pytest.mark.parametrize("start, increment, samples, gbs, unit", RAMPS)
def test_sizes_match_megatrons_microbatch_calculator(start, increment, samples, gbs, unit):
    """Megatron-Core decides each iteration's global batch from the samples consumed before it
    (``update_num_microbatches(consumed_train_samples)``); the stage's batch positions here must
    get the same sizes and start where Megatron's consumed count stands."""
    from megatron.core.num_microbatches_calculator import (
        RampupBatchsizeNumMicroBatchesCalculator,
    )

    calc = RampupBatchsizeNumMicroBatchesCalculator(
        gbs, unit, 1, False, 1, start, increment, samples)  # rank 1: no logging
    ramp, consumed = BatchRamp(start, increment, samples, gbs), 0
    for batch in range(ramp.ramp_batches + 5):
        calc.update(consumed, consistency_check=True)
        assert ramp.first_sample(batch) == consumed, batch
        assert ramp.size(batch) == calc.get_current_global_batch_size(), batch
        assert ramp.size(batch) // unit == calc.get()  # micro-batches at DP 1
        consumed += ramp.size(batch)


def test_a_token_budget_counts_the_smaller_batches(tiny_cfg):
    cfg = copy.deepcopy(tiny_cfg)
    seq = cfg.model.seq_length
    cfg.stages = [StageConfig(name="one", train_tokens=60 * seq, rampup_batch_size=[2, 2, 12]),
                  StageConfig(name="two", train_tokens=20 * seq)]
    one, two = plan_stages(cfg)
    # sizes 2, 2, 4, 6, 8, 8, 8, 8, ...: 60 samples need 10 batches (62 samples), not 8.
    assert [one.batch_size(b) for b in range(one.steps)] == [2, 2, 4, 6, 8, 8, 8, 8, 8, 8]
    assert (one.steps, one.samples, one.tokens) == (10, 62, 62 * seq)
    assert (two.steps, two.samples, two.first_step) == (3, 24, 11)  # no ramp of its own
    assert consumed_samples([one, two], 10) == 62 and consumed_samples([one, two], 12) == 78
    assert two.ramp is None  # train.rampup_batch_size is the first stage's only


def test_train_rampup_is_the_first_stages_unless_it_has_its_own(tiny_cfg):
    cfg = copy.deepcopy(tiny_cfg)
    cfg.train.rampup_batch_size = [4, 4, 16]
    (main,) = plan_stages(cfg)  # a run without stages
    assert [main.batch_size(b) for b in range(6)] == [4, 4, 4, 4, 8, 8]  # gbs 8
    cfg.stages = [StageConfig(name="one", max_steps=4, rampup_batch_size=[]),
                  StageConfig(name="two", max_steps=4, rampup_batch_size=[2, 2, 4])]
    one, two = plan_stages(cfg)
    assert one.ramp is None and [two.batch_size(b) for b in range(4)] == [2, 4, 8, 8]


def test_bad_ramps_fail_validation_naming_the_key():
    from orchestration.config import RunConfig

    cfg = RunConfig()
    cfg.train.micro_batch_size, cfg.train.global_batch_size = 2, 16
    for ramp, message in (([3, 2, 10], r"train.rampup_batch_size\[0\] \(start\)=3 is not "
                                       "divisible by train.micro_batch_size=2"),
                          ([4, 8, 10], "minus start 4 is not a multiple of the increment 8"),
                          ([16, 2, 10], "start 16 must be below the global batch size 16"),
                          ([4, 4, 0], "must all be > 0"),
                          ([4, 4], r"expected \[start, increment, ramp_samples\]")):
        cfg.train.rampup_batch_size = ramp
        with pytest.raises(ConfigError, match=message):
            validate(cfg, world_size=1)
    cfg.train.rampup_batch_size = []
    cfg.stages = [StageConfig(name="s", max_steps=3, global_batch_size=8,
                              rampup_batch_size=[2, 4, 10])]
    with pytest.raises(ConfigError, match=r"stages\[0\].rampup_batch_size=\[2, 4, 10\]: "
                                          "global batch size 8 minus start 2"):
        validate(cfg, world_size=1)


def test_the_lr_schedule_advances_by_samples_as_megatrons_does(tiny_cfg):
    """Megatron's scheduler counts samples (warmup and decay iterations x global batch, stepped
    by each iteration's batch); during a ramp the LR rises more slowly per step."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    cfg = copy.deepcopy(tiny_cfg)
    cfg.train.rampup_batch_size, cfg.train.max_steps = [2, 2, 12], 12
    cfg.optim = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=3, decay_style="cosine")
    stages = plan_stages(cfg)
    gbs, total = cfg.train.global_batch_size, stages[0].samples
    scheduler = OptimizerParamScheduler(
        SimpleNamespace(param_groups=[{}]), init_lr=0.0, max_lr=1e-3, min_lr=1e-4,
        lr_warmup_steps=3 * gbs, lr_decay_steps=total, lr_decay_style="cosine", start_wd=0.1,
        end_wd=0.1, wd_incr_steps=1, wd_incr_style="constant")
    for step in range(1, 13):
        scheduler.num_steps = consumed_samples(stages, step)
        assert lr_for_step(cfg, stages, step) == pytest.approx(scheduler.get_lr({}), rel=1e-12)
    assert lr_for_step(cfg, stages, 3) < 1e-3  # 3 steps of a ramp are fewer than 3 x gbs samples
    assert lr_for_step(cfg, stages, 12) == pytest.approx(1e-4)


def _ramped_two_stage(cfg, run_dir: Path):
    cfg = copy.deepcopy(cfg)
    cfg.run_dir = str(run_dir)
    cfg.stages = [StageConfig(name="one", max_steps=6, rampup_batch_size=[2, 2, 12]),
                  StageConfig(name="two", max_steps=3, rampup_batch_size=[4, 4, 4])]
    cfg.callbacks = {"sample_probe:SampleProbe": {}}
    return cfg


def test_training_reads_each_ramped_batch_once(tiny_cfg, tmp_path):
    """Real Megatron-Core steps with 1, 1, 2, 3, 4, 4 micro-batches, then a second stage that
    ramps from its own start: every sample of each stage read once, in order."""
    full = _ramped_two_stage(tiny_cfg, tmp_path / "full")
    run_single(full)
    rows = read_probe(full.run_dir)
    assert [r["batch_size"] for r in rows] == [2, 2, 4, 6, 8, 8, 4, 8, 8]
    assert [r["microbatches"] for r in rows] == [1, 1, 2, 3, 4, 4, 2, 4, 4]
    for stage, total in (("one", 30), ("two", 20)):  # each stage: samples 0.. in order, once
        read = [i for r in rows if r["stage"] == stage for i in r["global"]]
        assert read == list(range(total)), stage
    assert all(r["rank"] == r["global"] for r in rows)  # one rank reads the whole batch
    metrics = [json.loads(x) for x in (Path(full.run_dir) / "metrics.jsonl").read_text()
               .splitlines()]
    train = [m for m in metrics if "loss" in m]
    seq = full.model.seq_length
    assert [m["global_batch_size"] for m in train] == [r["batch_size"] for r in rows]
    assert [m["consumed_tokens"] // seq for m in train] == [2, 4, 8, 14, 22, 30, 34, 42, 50]


@pytest.mark.slow  # three short runs, ~60 s on 2 shared cores
def test_a_run_stopped_mid_ramp_resumes_exactly(tiny_cfg, tmp_path):
    """Stopped inside the first stage's ramp and resumed: the same samples per step and
    bit-identical losses (the ramp is a function of the step, nothing else is saved)."""
    full = _ramped_two_stage(tiny_cfg, tmp_path / "full")
    reference = run_single(full)
    parts = _ramped_two_stage(tiny_cfg, tmp_path / "parts")
    parts.train.exit_after_steps = 3  # stops inside stage one's ramp
    first = run_single(parts)
    parts.train.exit_after_steps = None
    second = run_single(parts)
    assert first["final_step"] == 3
    assert first["losses"] + second["losses"] == reference["losses"]
    assert read_probe(parts.run_dir) == read_probe(full.run_dir)


@pytest.mark.slow  # a 1-rank and a 2-rank run
@pytest.mark.distributed
def test_ramp_at_data_parallel_2_reads_the_same_samples_and_losses(tiny_cfg, tmp_path):
    """Each rank takes its micro-batch slices of every ramped batch (fewer micro-batches per
    rank while the batch is small): together the ranks read what one rank reads alone, and the
    losses match."""
    from dist import run_distributed

    one = copy.deepcopy(tiny_cfg)
    one.run_dir, one.train.max_steps = str(tmp_path / "dp1"), 5
    one.train.rampup_batch_size = [4, 4, 8]  # sizes 4, 4, 8, ...: multiples of mbs 2 x DP 2
    one.callbacks = {"sample_probe:SampleProbe": {}}
    two = copy.deepcopy(one)
    two.run_dir = str(tmp_path / "dp2")
    ref = run_single(one)
    out = run_distributed(two, 2)
    assert out["losses"] == pytest.approx(ref["losses"], abs=2e-4)
    alone = read_probe(one.run_dir)
    ranks = [read_probe(two.run_dir, rank) for rank in (0, 1)]
    assert [r["batch_size"] for r in alone] == [4, 4, 8, 8, 8]
    for step, row in enumerate(alone):
        assert sorted(ranks[0][step]["rank"] + ranks[1][step]["rank"]) == row["global"]
        assert ranks[0][step]["microbatches"] == row["microbatches"] // 2
