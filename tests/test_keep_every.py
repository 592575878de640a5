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


def test_k2_keeps_its_360_stage_one_release_checkpoints():
    """LLM360/K2's model card: 360 stage-1 checkpoints; stage 1 is 338,760 steps."""
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = to_run_config(compose("config", overrides=["experiment=k2", "run_dir=/tmp/unused"]))
    stage1_steps = cfg.stages[0].max_steps
    assert cfg.checkpoint.keep_every == cfg.checkpoint.save_interval
    assert stage1_steps // cfg.checkpoint.keep_every == 360
    assert stage1_steps % cfg.checkpoint.keep_every == 0
