"""W&B and TensorBoard get the ecosystem's metric names, no event fields, and lm-eval results.

Read back from the files the trackers wrote: TensorBoard's event files through its own
EventAccumulator, W&B's offline ``run-*.wandb`` through its record protobufs.
"""

from __future__ import annotations

import copy
import struct
from pathlib import Path

import pytest
from dist import run_single

LM_EVAL_RESULTS = {  # the shape lm-eval's simple_evaluate returns under "results"
    "tiny_mc": {"alias": "tiny_mc", "acc,none": 0.4, "acc_stderr,none": 0.16,
                "acc_norm,none": 0.3, "acc_norm_stderr,none": "N/A"},
    "gsm8k": {"exact_match,strict-match": 0.1, "exact_match_stderr,strict-match": 0.05},
}


def wandb_history(run_dir: Path) -> list[dict]:
    """Every ``history`` row of the W&B offline runs under ``run_dir/wandb``, in order.

    The ``.wandb`` file is a LevelDB-style log (W&B's datastore format): a 7-byte header
    (":W&B", magic, version), then 32 KiB blocks of records, each with a 7-byte header
    (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) holding a ``Record`` protobuf.
    """
    from wandb.proto import wandb_internal_pb2

    rows = []
    for path in sorted(run_dir.glob("**/wandb/offline-run-*/run-*.wandb")):
        data, pos, pending = path.read_bytes(), 7, b""
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            room = 32768 - pos % 32768
            if room < 7:
                pos += room
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind == 0 and length == 0:
                break
            pending = chunk if kind in (1, 2) else pending + chunk
            if kind in (1, 4):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                if record.WhichOneof("record_type") == "history":
                    rows.append({item.key or "/".join(item.nested_key): item.value_json
                                 for item in record.history.item})
    return rows


def _eval_rows(run_dir: Path, expected: int, timeout_s: float = 60.0) -> list[dict]:
    """The lm-eval rows of the W&B offline files. W&B's service process writes them, and in
    one CI run the last run's row was not in its file yet when read right after
    ``run.finish()`` returned (3 reruns passed): wait for ``expected`` rows up to
    ``timeout_s``."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        rows = [r for r in wandb_history(run_dir) if "eval/tiny_mc/acc" in r]
        if len(rows) >= expected or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def test_tracker_names_and_events():
    from orchestration.metrics.trackers import eval_metrics, tracker_metrics

    record = {"step": 7, "stage": "main", "loss": 2.5, "grad_norm": 0.5, "lr": 1e-3,
              "tokens_per_s": 900.0, "consumed_tokens": 4096, "step_time_s": 0.2,
              "flops_per_token": 1e6, "skipped": None, "mfu": 0.4}
    assert tracker_metrics(record) == {
        "train/loss": 2.5, "train/grad_norm": 0.5, "train/lr": 1e-3,
        "throughput/tokens_per_s": 900.0, "train/consumed_tokens": 4096.0,
        "throughput/step_time_s": 0.2, "train/skipped": 0.0, "throughput/mfu": 0.4}
    assert tracker_metrics({"step": 9, "val_loss": 2.0, "val_ppl": 7.4, "val_loss/code": 1.5,
                            "custom/thing": 3}) == {
        "val/loss": 2.0, "val/ppl": 7.4, "val/loss/code": 1.5, "custom/thing": 3.0}
    assert tracker_metrics({"event": "stage_start", "step": 1, "index": 0, "tokens": 5}) == {}
    assert eval_metrics(LM_EVAL_RESULTS) == {
        "eval/tiny_mc/acc": 0.4, "eval/tiny_mc/acc_stderr": 0.16, "eval/tiny_mc/acc_norm": 0.3,
        "eval/gsm8k/exact_match/strict-match": 0.1,
        "eval/gsm8k/exact_match_stderr/strict-match": 0.05}


@pytest.fixture(scope="module")
def logged_run(corpus, tmp_path_factory):
    """A real two-stage tiny run with held-out loss per source, a spike drill, W&B offline
    and TensorBoard on."""
    from conftest import make_tiny_cfg

    from orchestration.config import StageConfig

    cfg = make_tiny_cfg(corpus, tmp_path_factory.mktemp("logged") / "run")
    cfg = copy.deepcopy(cfg)
    cfg.stages = [StageConfig(name="one", max_steps=4), StageConfig(name="two", max_steps=2)]
    cfg.train.eval_interval = 3
    cfg.logging.wandb_mode = "offline"
    cfg.logging.tensorboard = True
    cfg.spike.inject = {"5": "spike"}
    cfg.spike.min_history = 2
    run_single(cfg)
    return Path(cfg.run_dir)


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_gets_ecosystem_names_and_no_event_fields(logged_run):
    import json

    scalars = _scalars(logged_run / "tensorboard")
    records = [json.loads(x) for x in (logged_run / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in records if "loss" in r}
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 7))
    assert scalars["train/loss"][0][1] == pytest.approx(train[1]["loss"])
    assert scalars["train/lr"][-1][1] == pytest.approx(train[6]["lr"])
    for tag in ("train/grad_norm", "throughput/tokens_per_s", "train/consumed_tokens"):
        assert len(scalars[tag]) == 6, tag
    assert dict(scalars["train/skipped"])[5] == 1.0  # the spike drill's step
    sources = {k.split("/", 1)[1] for r in records for k in r if k.startswith("val_loss/")}
    assert sources and {f"val/loss/{s}" for s in sources} <= set(scalars)
    assert [s for s, _ in scalars["val/loss"]] == [3, 6]
    assert not set(scalars) & {"index", "tokens", "steps", "step", "flops_per_token",
                               "loss", "lr", "consumed_tokens"}
    assert all("/" in tag for tag in scalars)


def test_wandb_gets_ecosystem_names_and_no_event_fields(logged_run):
    rows = wandb_history(logged_run)
    keys = {k for row in rows for k in row}
    assert {"train/loss", "train/lr", "train/grad_norm", "throughput/tokens_per_s",
            "val/loss"} <= keys
    assert not keys & {"index", "tokens", "steps", "loss", "lr", "flops_per_token"}
    steps = [int(row["_step"]) for row in rows if "train/loss" in row]
    assert steps == list(range(1, 7))


def test_evaluation_results_reach_both_trackers(logged_run):
    from orchestration.metrics.trackers import publish_eval_results

    assert publish_eval_results(logged_run, 6, LM_EVAL_RESULTS) == ["tensorboard", "wandb"]
    assert publish_eval_results(logged_run, 3, LM_EVAL_RESULTS) == ["tensorboard", "wandb"]
    scalars = _scalars(logged_run / "tensorboard" / "eval")
    assert scalars["eval/tiny_mc/acc"] == [(3, pytest.approx(0.4)), (6, pytest.approx(0.4))]
    assert "eval/tiny_mc/acc_norm_stderr" not in scalars  # 'N/A'
    # The training run's own scalars are untouched by the evaluation's writer.
    assert len(_scalars(logged_run / "tensorboard")["train/loss"]) == 6
    assert len(list(logged_run.glob("eval/wandb/step_*/wandb/offline-run-*"))) == 2
    rows = _eval_rows(logged_run, expected=2)
    assert sorted(float(r["eval/step"]) for r in rows) == [3.0, 6.0]
    assert {float(r["eval/gsm8k/exact_match/strict-match"]) for r in rows} == {0.1}


def test_in_training_eval_records_use_the_checkpoint_step(tmp_path):
    """The in-training lm-eval hook's record (scores of checkpoint 10 arriving at step 12)."""
    import json

    from orchestration.config import LoggingConfig
    from orchestration.metrics.logger import MetricsLogger
    from orchestration.metrics.trackers import tracker_metrics

    record = {"step": 12, "lm_eval/checkpoint_step": 10, "time": 1.7e9,
              "lm_eval/tiny_mc/acc": 0.4, "lm_eval/tiny_mc/acc_norm": 0.3}
    assert tracker_metrics(record) == {"eval/step": 10.0, "eval/tiny_mc/acc": 0.4,
                                       "eval/tiny_mc/acc_norm": 0.3}
    cfg = LoggingConfig(wandb_mode="disabled", tensorboard=True)
    logger = MetricsLogger(tmp_path, cfg, "x", {}, enabled=True)
    logger.log({"step": 12, "loss": 3.0})
    logger.log(record)
    logger.event("stage_start", step=13, index=1, tokens=10)
    logger.close()
    scalars = _scalars(tmp_path / "tensorboard")
    assert scalars["eval/tiny_mc/acc"] == [(10, pytest.approx(0.4))]
    assert set(scalars) == {"train/loss", "eval/tiny_mc/acc", "eval/tiny_mc/acc_norm"}
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[1] == record  # the JSONL keeps the record as logged
