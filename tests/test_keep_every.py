"""Release checkpoints: ``checkpoint.keep_every`` survives ``keep_last`` pruning."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir

from orchestration.checkpoint.layout import INFO_FILE, complete_checkpoints, prune, step_dir
from orchestration.common.paths import CONF_DIR
from orchestration.config import ConfigError, RunConfig, register_configs, to_run_config, validate


def _fake_checkpoints(root, steps):
    for step in steps:
        path = step_dir(root, step)
        path.mkdir(parents=True)
        (path / INFO_FILE).write_text(json.dumps({"step": step}))


def test_prune_keeps_the_newest_and_every_multiple(tmp_path):
    _fake_checkpoints(tmp_path, range(10, 130, 10))
    (tmp_path / "unloadable" / "step_00000005-x").mkdir(parents=True)
    prune(tmp_path, keep_last=2, keep_every=40)
    assert [int(p.name[5:]) for p in complete_checkpoints(tmp_path)] == [40, 80, 110, 120]
    assert (tmp_path / "unloadable" / "step_00000005-x").is_dir(), "unloadable ones untouched"
    prune(tmp_path, keep_last=1, keep_every=40)  # again, e.g. after a rollback re-saved 120
    assert [int(p.name[5:]) for p in complete_checkpoints(tmp_path)] == [40, 80, 120]


def test_keep_every_must_fall_on_saves():
    cfg = RunConfig()
    cfg.checkpoint.save_interval, cfg.checkpoint.keep_every = 100, 250
    with pytest.raises(ConfigError, match="checkpoint.keep_every=250 is not a multiple"):
        validate(cfg)
    cfg.checkpoint.save_interval = 0  # no periodic saves (a sweep, a smoke run): nothing to thin
    validate(cfg)


def test_k2_keeps_its_360_stage_one_release_checkpoints():
    """LLM360/K2's model card: 360 stage-1 checkpoints; stage 1 is 338,760 steps."""
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = to_run_config(compose("config", overrides=["experiment=k2", "run_dir=/tmp/unused"]))
    stage1_steps = cfg.stages[0].max_steps
    assert cfg.checkpoint.keep_every == cfg.checkpoint.save_interval
    assert stage1_steps // cfg.checkpoint.keep_every == 360
    assert stage1_steps % cfg.checkpoint.keep_every == 0


def test_prune_keeps_checkpoints_marked_release(tmp_path):
    _fake_checkpoints(tmp_path, range(10, 70, 10))
    info = step_dir(tmp_path, 30) / INFO_FILE
    info.write_text(json.dumps({"step": 30, "release": "end of stage one"}))
    prune(tmp_path, keep_last=1)
    assert [int(p.name[5:]) for p in complete_checkpoints(tmp_path)] == [30, 60]


def test_each_stage_ends_with_a_release_checkpoint_after_its_ramp_off(tiny_cfg, tmp_path):
    """Real run: stage one (5 steps, LR ramped off over its last 2) and stage two (3 steps),
    saving every 4 steps and keeping only the newest: the end of each stage survives, marked."""
    import copy

    from dist import run_single

    from orchestration.checkpoint.layout import read_metadata
    from orchestration.config import OptimConfig, StageConfig

    cfg = copy.deepcopy(tiny_cfg)
    cfg.run_dir = str(tmp_path / "run")
    cfg.lr_schedule, cfg.optim = "global", OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=1)
    cfg.stages = [StageConfig(name="one", max_steps=5, ramp_off_steps=2, ramp_off_lr=1e-5),
                  StageConfig(name="two", max_steps=3)]
    cfg.checkpoint.save_interval, cfg.checkpoint.keep_last = 4, 1
    assert cfg.checkpoint.save_stage_end  # on by default
    run_single(cfg)
    kept = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert [read_metadata(p)["step"] for p in kept] == [5, 8]
    assert [read_metadata(p).get("release") for p in kept] == ["end of stage one",
                                                               "end of stage two"]
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text()
               .splitlines()]
    lr_at_5 = next(m["lr"] for m in metrics if m.get("step") == 5 and "lr" in m)
    assert lr_at_5 == pytest.approx(1e-5)  # the checkpoint holds the ramped-off model
    saved = [m["step"] for m in metrics if m.get("event") == "checkpoint"]
    assert saved == [4, 5, 8]  # 4 was pruned


def test_stage_end_saves_can_be_turned_off():
    from types import SimpleNamespace

    from orchestration.callbacks.checkpointing import CheckpointCallback
    from orchestration.config import StageConfig
    from orchestration.loop.stages import plan_stages

    cfg = RunConfig()
    cfg.checkpoint.save_interval = 0
    cfg.stages = [StageConfig(name="one", max_steps=5), StageConfig(name="two", max_steps=3)]
    trainer = SimpleNamespace(cfg=cfg, stages=plan_stages(cfg))
    saves = lambda: [s for s in range(1, 9)  # noqa: E731
                     if CheckpointCallback().after_step(trainer, SimpleNamespace(step=s))]
    assert saves() == [5, 8]
    cfg.checkpoint.save_stage_end = False
    assert saves() == [8]
