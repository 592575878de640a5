"""checkpoint.async_save: shards written in a background process, published when complete."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from dist import run_distributed, run_single


def _checkpoint_events(run_dir: str) -> list[int]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r.get("event") == "checkpoint"]


def _async(cfg, run_dir: Path):
    out = copy.deepcopy(cfg)
    out.run_dir, out.checkpoint.async_save = str(run_dir), True
    return out


@pytest.mark.slow  # ~50 s on 2 cores: run by CI after the default suite
def test_async_save_trains_and_resumes_like_sync(tiny_cfg, tmp_path):
    tiny_cfg.train.max_steps, tiny_cfg.checkpoint.save_interval = 8, 2
    tiny_cfg.checkpoint.keep_last = 2
    sync = copy.deepcopy(tiny_cfg)
    sync.run_dir = str(tmp_path / "sync")
    reference = run_single(sync)

    background = _async(tiny_cfg, tmp_path / "async")
    background.train.exit_after_steps = 5  # stops mid-run: its last save must be published
    first = run_single(background)
    ckpts = sorted(p.name for p in (tmp_path / "async" / "checkpoints").iterdir())
    assert ckpts == ["step_00000004", "step_00000005"], "published, pruned, no *.tmp left"
    info = json.loads((tmp_path / "async/checkpoints/step_00000005/checkpoint_info.json")
                      .read_text())
    assert info["step"] == 5 and info["has_optimizer"]

    background.train.exit_after_steps = None
    second = run_single(background)  # resumes from the background-written step 5
    assert first["losses"] + second["losses"] == reference["losses"]  # bit-identical on CPU
    assert sorted(p.name for p in (tmp_path / "async" / "checkpoints").iterdir()) == [
        "step_00000006", "step_00000008"]
    # Logged when published, with the checkpoint's own step (not the step training had reached).
    assert _checkpoint_events(background.run_dir) == [2, 4, 5, 6, 8]


@pytest.mark.distributed
@pytest.mark.parametrize("tensor", [1, pytest.param(2, marks=pytest.mark.slow)], ids=["dp2", "tp2"])
def test_async_save_on_two_ranks(tiny_cfg, tmp_path, tensor):
    """Two gloo ranks (DP=2 with the distributed optimizer, or TP=2): each rank's writer
    process finishes, then one rename publishes the checkpoint; losses equal a sync run's."""
    cfg = _async(tiny_cfg, tmp_path / "dp2")
    cfg.parallel.tensor = tensor
    cfg.train.max_steps, cfg.checkpoint.save_interval = 6, 2
    summaries = run_distributed(cfg, 2, all_ranks=True)
    assert summaries[0]["losses"] == summaries[1]["losses"]
    root = tmp_path / "dp2" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [
        "step_00000002", "step_00000004", "step_00000006"]
    assert sorted(p.name for p in (root / "step_00000006" / "rng").iterdir()) == [
        "rank_00000.pt", "rank_00001.pt"]
    sync = copy.deepcopy(cfg)
    sync.run_dir, sync.checkpoint.async_save = str(tmp_path / "sync"), False
    assert run_distributed(sync, 2)["losses"] == summaries[0]["losses"]
