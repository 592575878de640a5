"""Issue 12's "done means", end to end on ``experiment=tiny_k2`` (reduced to 24 + 12 steps).

Two loss-spike bursts, each escalating to a rollback that defers its window (K2's way, to the
end of training, and to the end of the stage), and the run still trains every batch of each
stage exactly once or logs it as skipped; ``orchestration.data_sequence`` shows this and agrees
with what the run read (tests/probes.py: DataProbe); a replay from the skip log gives the same
per-step losses.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from dist import run_single
from probes import token_hash

REPO = Path(__file__).resolve().parents[1]
STEPS = (24, 12)


def _tiny_k2(run_dir: Path, data_dir: Path, defer_to: str):
    from hydra import compose, initialize_config_dir

    from orchestration.config import register_configs, to_run_config

    os.environ["OPT_DATA_DIR"] = str(data_dir)
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = to_run_config(compose(config_name="config", overrides=[
            "experiment=tiny_k2", f"run_dir={run_dir}"]))
    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
    for stage, steps in zip(cfg.stages, STEPS, strict=True):
        stage.train_tokens = steps * tokens_per_step
    cfg.stages[0].ramp_off_steps = 4
    cfg.optim.warmup_steps = 4
    cfg.train.eval_interval, cfg.train.sample_interval = 0, 0
    cfg.checkpoint.save_interval = 4
    cfg.logging.wandb_mode, cfg.runtime.device = "disabled", "cpu"
    # The loss only: early in training the grad norm grows, and 4-6 steps of history would
    # flag that growth (a rollback_defer then defers the next batches, forever).
    cfg.spike.min_history, cfg.spike.window, cfg.spike.check_grad_norm = 6, 16, False
    cfg.spike.escalate_after, cfg.spike.escalate_within = 2, 10
    cfg.spike.on_escalation, cfg.spike.defer_to = "rollback_defer", defer_to
    # Burst 1 in stage 1 (steps 10-11): back to step 8, window steps 9-11; burst 2 in stage 2
    # (steps 30-31): back to step 28, window steps 29-31.
    cfg.spike.inject = {"10": "spike", "11": "spike", "30": "spike", "31": "spike"}
    cfg.callbacks = {"probes:DataProbe": {}}
    return cfg


def _export(run_dir: Path) -> list[dict]:
    from orchestration.data_sequence import main

    out = run_dir / "sequence.jsonl"
    assert main([str(run_dir), "--format", "jsonl", "--output", str(out)]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.mark.slow  # two ~36-step runs of the tiny model on the demo corpus
@pytest.mark.parametrize("defer_to", ["training_end", "stage_end"])
def test_two_bursts_rollback_defer_train_every_batch_once(tmp_path, tmp_path_factory, defer_to):
    data_dir = tmp_path_factory.getbasetemp() / "demo_data"  # built once, by the first run
    cfg = _tiny_k2(tmp_path / "run", data_dir, defer_to)
    out = run_single(cfg)
    assert out["final_step"] == sum(STEPS) and not out["failed"]
    log = [json.loads(x) for x in (tmp_path / "run" / "skipped_batches.jsonl").read_text()
           .splitlines()]
    defers = [e for e in log if e["kind"] == "defer"]
    assert len(defers) == 2, "each burst escalated to one rollback"
    assert all(e.get("rolled_back") for e in log if e["kind"] == "skip"), \
        "the spiked steps were undone; their batches are deferred, not skipped"

    records = _export(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, sum(STEPS) + 1))
    for stage, steps in zip(("stage1", "stage2"), STEPS, strict=True):
        trained = sorted(r["batch"] for r in records if r["data_stage"] == stage
                         and not r["skipped"])
        skipped = [r["batch"] for r in records if r["data_stage"] == stage and r["skipped"]]
        assert sorted(trained + skipped) == list(range(steps)), \
            f"{stage}: every batch trained exactly once or logged as skipped"
    deferred = [r["step"] for r in records if r["deferred"]]
    if defer_to == "training_end":
        assert deferred == [31, 32, 33, 34, 35, 36], "both windows at the end of training"
        assert [r["data_stage"] for r in records[-6:]] == ["stage1"] * 3 + ["stage2"] * 3
        assert [r["batch"] for r in records[-6:-3]] == [8, 9, 10]
    else:
        assert deferred == [22, 23, 24, 34, 35, 36], "each window at the end of its stage"

    probe = json.loads((tmp_path / "run" / "data_probe.json").read_text())
    streams = _streams(tmp_path / "run")
    for r in records:
        seen = probe[str(r["step"])]
        assert (r["data_stage"], r["batch"]) == (seen["data_stage"], seen["batch"])
        assert [token_hash(streams[s][p]["tokens"]) for s, p in r["samples"]] == seen["tokens"]

    replay = _tiny_k2(tmp_path / "replay", data_dir, defer_to)
    replay.spike.inject = {}
    replay.train.skip_batches_file = str(tmp_path / "run" / "skipped_batches.jsonl")
    again = run_single(replay)
    assert again["skipped"] == [] and again["loss_by_step"] == out["loss_by_step"], \
        "a replay from the skip log gives identical per-step losses"


def _streams(run_dir: Path) -> dict:
    from orchestration.data.sequence import RunLog, SequenceReader
    from orchestration.data_sequence import run_config

    reader = SequenceReader(run_config(run_dir), RunLog.read(run_dir))
    streams = {}
    for stage in reader.stages:
        for part in reader.train(stage).parts:
            streams.update({n: s.stream for n, s in zip(part.names, part.slices, strict=True)})
    return streams
