"""The in-training lm-eval hook: rank 0 scores each due checkpoint in a child process and logs
the scores with the run's metrics; results land in the same per-checkpoint cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestration.config import ConfigError


def test_every_steps_must_hit_saved_checkpoints(tiny_cfg):
    from orchestration.callbacks.registry import CallbackContext, build_callbacks

    tiny_cfg.checkpoint.save_interval = 2
    for options, message in (({"tasks": ["tiny_mc"], "every_steps": 3}, "every_steps=3"),
                             ({"every_steps": 2}, "tasks"),
                             ({"tasks": ["tiny_mc"], "no_such_option": 1}, "no_such_option")):
        tiny_cfg.callbacks = {"lm_eval": options}
        context = CallbackContext(tiny_cfg, None, is_main=True, world_size=1, on_cpu=True)
        with pytest.raises(ConfigError, match=message):
            build_callbacks(context)
    tiny_cfg.callbacks = {"lm_eval": {"tasks": ["tiny_mc"], "every_steps": 4, "limit": 2}}
    built = build_callbacks(CallbackContext(tiny_cfg, None, True, 1, True))
    hook = next(c for c in built if c.name == "lm_eval")
    assert hook.options.device == "cpu" and hook.options.limit == 2
    off_main = build_callbacks(CallbackContext(tiny_cfg, None, False, 2, True))
    assert not any(c.name == "lm_eval" for c in off_main), "rank 0 only"


@pytest.mark.slow  # a training run plus two lm-eval child processes: ~45 s on 2 cores
def test_training_scores_checkpoints_and_logs_them(tiny_cfg):
    from dist import run_single

    tiny_cfg.train.max_steps = 4
    tiny_cfg.checkpoint.save_interval = 2
    tiny_cfg.callbacks = {"lm_eval": {"tasks": ["tiny_mc"], "every_steps": 2, "limit": 2}}
    run_single(tiny_cfg)
    run = Path(tiny_cfg.run_dir)
    for step in (2, 4):
        result = json.loads((run / "eval" / f"step_{step:08d}" / "results.json").read_text())
        assert result["checkpoint"]["step"] == step
        assert result["checkpoint"]["consumed_tokens"] == step * 8 * 64
        assert result["n-samples"]["tiny_mc"]["effective"] == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in records if "lm_eval/checkpoint_step" in r]
    assert sorted(r["lm_eval/checkpoint_step"] for r in scored) == [2, 4]
    assert all(0.0 <= r["lm_eval/tiny_mc/acc"] <= 1.0 for r in scored)
