"""Checkpoint averaging: the uniform or EMA-weighted mean, as a loadable checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_export import export_cfg, save_random_checkpoint


@pytest.fixture
def two_checkpoints(megatron_env, corpus, tmp_path):
    """A run dir with random-weight checkpoints at steps 2 and 4; their weights."""
    cfg = export_cfg(corpus, tmp_path / "run")
    weights = []
    for step, seed in ((2, 0), (4, 1)):
        _, model = save_random_checkpoint(cfg, step=step, seed=seed)
        weights.append(
            {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        )
    return cfg, weights


def load_weights(path: Path, cfg) -> dict[str, torch.Tensor]:
    from orchestration.checkpoint import store
    from orchestration.hf.offline import build_cpu_model

    model = build_cpu_model(cfg, 1)
    store.load(path, model, None, with_optimizer=False)
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def test_uniform_average_is_elementwise_mean(two_checkpoints, tmp_path):
    from orchestration.average import main

    cfg, (a, b) = two_checkpoints
    out = tmp_path / "avg"
    main([cfg.run_dir, "--last", "2", "--out", str(out)])
    got = load_weights(out, cfg)
    assert got.keys() == a.keys()
    for name in a:
        torch.testing.assert_close(got[name], (a[name] + b[name]) / 2, atol=1e-6, rtol=0)
    info = json.loads((out / "checkpoint_info.json").read_text())
    assert info["has_optimizer"] is False and info["step"] == 4
    assert info["layout"] == {"tp": 1, "pp": 1, "dp": 1, "world": 1}
    assert [(x["step"], x["weight"]) for x in info["averaged_from"]] == [(2, 0.5), (4, 0.5)]
    assert (out / "run_config.yaml").is_file() and not out.with_name("avg.tmp").exists()


def test_ema_weights_favour_the_newest(two_checkpoints, tmp_path):
    from orchestration.average import average_weights, main

    assert average_weights(3, 0.5) == pytest.approx([1 / 7, 2 / 7, 4 / 7])
    cfg, (a, b) = two_checkpoints
    out = tmp_path / "ema"
    main([cfg.run_dir, "--steps", "4,2", "--ema", "0.5", "--out", str(out)])
    got = load_weights(out, cfg)
    name = "decoder.layers.0.mlp.linear_fc1.weight"
    torch.testing.assert_close(got[name], a[name] / 3 + b[name] * 2 / 3, atol=1e-6, rtol=0)


def test_selection_errors(two_checkpoints):
    from orchestration.average import select_checkpoints

    run_dir = Path(two_checkpoints[0].run_dir)
    assert [p.name for p in select_checkpoints(run_dir, last=1)] == ["step_00000004"]
    with pytest.raises(ValueError, match="2 complete checkpoints"):
        select_checkpoints(run_dir, last=3)
    with pytest.raises(FileNotFoundError, match=r"steps \[3\]"):
        select_checkpoints(run_dir, steps=[2, 3])


def test_training_starts_from_averaged_checkpoint(two_checkpoints, tmp_path):
    """The driver loads the average with checkpoint.load=, load_optimizer=false (TP=1)."""
    import copy
    import math

    from dist import run_single

    from orchestration.average import main

    cfg, _ = two_checkpoints
    out = tmp_path / "avg"
    main([cfg.run_dir, "--last", "2", "--out", str(out)])
    run = copy.deepcopy(cfg)
    run.run_dir = str(tmp_path / "from_avg")
    run.checkpoint.load, run.checkpoint.load_optimizer = str(out), False
    run.train.eval_only, run.train.eval_iters = True, 1
    summary = run_single(run)
    assert math.isfinite(summary["val_loss"])  # the averaged weights loaded and evaluated
