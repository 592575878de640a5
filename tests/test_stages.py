"""Multi-stage curricula: exact transitions, LR on either side, resume mid-stage, mix shares."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from dist import run_single

from orchestration.config import DataConfig, OptimConfig, SourceConfig, StageConfig
from orchestration.loop.lr import lr_for_step
from orchestration.loop.stages import consumed_tokens, plan_stages, stage_at


def _two_stage(cfg, per_stage: bool = True):
    cfg = copy.deepcopy(cfg)
    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
    beta_only = DataConfig(name="beta_only", tokenizer_model=cfg.data.tokenizer_model,
                           sources=[s for s in cfg.data.sources if s.name == "beta"])
    cfg.stages = [
        StageConfig(name="one", train_tokens=5 * tokens_per_step,
                    optim=OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=2)),
        StageConfig(name="two", data=beta_only, train_tokens=4 * tokens_per_step,
                    optim=OptimConfig(lr=5e-4, min_lr=5e-5, warmup_steps=2,
                                      decay_style="linear")),
    ]
    cfg.lr_schedule = "per_stage" if per_stage else "global"
    return cfg


def test_plan_and_lr_on_either_side_of_the_boundary(tiny_cfg):
    cfg = _two_stage(tiny_cfg)
    stages = plan_stages(cfg)
    assert [(s.first_step, s.last_step) for s in stages] == [(1, 5), (6, 9)]
    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
    assert consumed_tokens(stages, 5) == stages[0].tokens == 5 * tokens_per_step
    assert stage_at(stages, 5).name == "one" and stage_at(stages, 6).name == "two"
    assert lr_for_step(cfg, stages, 5) == pytest.approx(1e-4)  # stage one decayed to its floor
    assert lr_for_step(cfg, stages, 6) == pytest.approx(2.5e-4)  # fresh warmup: 1/2 of 5e-4


def test_global_schedule_with_ramp_off(tiny_cfg):
    cfg = _two_stage(tiny_cfg, per_stage=False)
    cfg.optim = OptimConfig(lr=1e-3, min_lr=0.0, warmup_steps=0, decay_style="linear")
    cfg.stages[0].ramp_off_steps, cfg.stages[0].ramp_off_lr = 2, 1e-5
    stages = plan_stages(cfg)
    assert lr_for_step(cfg, stages, 3) == pytest.approx(1e-3 * (1 - 3 / 9))  # plain schedule
    assert lr_for_step(cfg, stages, 5) == pytest.approx(1e-5)  # ramped off at the stage end
    assert lr_for_step(cfg, stages, 6) == pytest.approx(1e-3 * (1 - 6 / 9))  # schedule resumes


def test_stage_mix_by_name_and_token_budget_rounding(tiny_cfg):
    cfg = copy.deepcopy(tiny_cfg)
    cfg.stages = [StageConfig(name="demo", mix="demo", train_tokens=1000)]
    (stage,) = plan_stages(cfg)
    assert stage.data.name == "demo" and stage.steps == 2  # ceil(1000 / 512)
    with pytest.raises(ValueError, match="no .*nope.yaml"):
        cfg.stages = [StageConfig(name="x", mix="nope", max_steps=1)]
        plan_stages(cfg)


@pytest.mark.slow  # ~50 s on 2 cores: run by CI after the default suite
def test_two_stage_run_transitions_and_resumes_mid_stage(tiny_cfg, tmp_path):
    full = _two_stage(tiny_cfg)
    full.run_dir = str(tmp_path / "full")
    reference = run_single(full)
    records = [json.loads(x) for x in (Path(full.run_dir) / "metrics.jsonl").read_text().splitlines()]
    starts = [r for r in records if r.get("event") == "stage_start"]
    tokens_per_step = full.train.global_batch_size * full.model.seq_length
    assert [(r["stage"], r["step"], r["consumed_tokens"]) for r in starts] == [
        ("one", 1, 0), ("two", 6, 5 * tokens_per_step)]
    steps = {r["step"]: r for r in records if "loss" in r}
    assert steps[5]["stage"] == "one" and steps[6]["stage"] == "two"
    assert steps[6]["lr"] == pytest.approx(2.5e-4)

    parts = _two_stage(tiny_cfg)
    parts.run_dir = str(tmp_path / "parts")
    parts.train.exit_after_steps = 7  # stops inside stage two
    first = run_single(parts)
    parts.train.exit_after_steps = None
    second = run_single(parts)
    assert first["final_step"] == 7
    assert first["losses"] + second["losses"] == reference["losses"]


def test_samples_per_source_follow_the_mix_weights(tiny_cfg, tmp_path, megatron_env):
    from orchestration.data.datasets import build_datasets
    from orchestration.data.tokenizer import TokenizerInfo

    data = copy.deepcopy(tiny_cfg.data)
    data.sources = [SourceConfig(name=s.name, path=s.path, multiplier=m)
                    for s, m in zip(tiny_cfg.data.sources, (3.0, 1.0), strict=True)]
    tokenizer = TokenizerInfo.from_sentencepiece(data.tokenizer_model)
    datasets = build_datasets(data, tokenizer, 64, seed=1, train_samples=2000, valid_samples=8,
                              cache_dir=tmp_path / "cache")
    read = [source for source, _ in datasets.train.sources(range(len(datasets.train)))]
    counts = np.array([read.count(s.name) for s in data.sources])
    from data_prep.mix import compute_mix

    shares = compute_mix([{"name": s.name, "path": s.path, "multiplier": s.multiplier}
                          for s in data.sources])
    expected = np.array([s.share for s in shares]) * counts.sum()
    sigma = np.sqrt(expected * (1 - expected / counts.sum()))
    assert np.all(np.abs(counts - expected) <= 3 * sigma + 1)
