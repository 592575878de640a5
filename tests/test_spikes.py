"""Loss-spike skipping: the rule, skipping without damage, replay, rollback, rank agreement."""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path

import pytest
from dist import run_distributed, run_single

from megatron_patches.checkpointing import load_common
from orchestration.callbacks.spike_rules import SeriesMonitor, parse_step_ranges
from orchestration.config import SpikeConfig


def test_zscore_rule_waits_for_history_then_flags_outliers():
    monitor = SeriesMonitor("loss", SpikeConfig(window=32, threshold=6.0, min_history=16))
    rng = random.Random(0)
    flagged = []
    for _i in range(200):
        value = 3.0 + rng.gauss(0, 0.05)
        verdict = monitor.check(value)
        flagged.append(verdict.spike)
        if not verdict.spike:
            monitor.accept(value)
    assert not any(flagged), "normal fluctuation is never a spike"
    assert monitor.check(4.0).spike and monitor.check(float("nan")).spike
    assert monitor.check(float("inf")).spike


def test_other_rules():
    ema = SeriesMonitor("loss", SpikeConfig(rule="ema_ratio", threshold=2.0, min_history=2))
    peak = SeriesMonitor("loss", SpikeConfig(rule="max_ratio", threshold=10.0, min_history=2))
    for value in (1.0, 1.0, 1.0):
        ema.accept(value)
        peak.accept(value)
    assert not ema.check(1.9).spike and ema.check(2.1).spike
    assert not peak.check(9.0).spike and peak.check(11.0).spike


def test_step_ranges():
    assert parse_step_ranges(["3", "7-9"]) == {3, 7, 8, 9}
    with pytest.raises(ValueError, match="'x-2'"):
        parse_step_ranges(["x-2"])


def _cfg(tiny_cfg, tmp_path, name: str, steps: int = 12):
    cfg = copy.deepcopy(tiny_cfg)
    cfg.run_dir = str(tmp_path / name)
    cfg.train.max_steps = steps
    cfg.spike.min_history = 10
    cfg.spike.window = 16
    return cfg


def _skip_log(cfg) -> list[dict]:
    path = Path(cfg.run_dir) / "skipped_batches.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_nan_batch_is_skipped_without_touching_weights(tiny_cfg, tmp_path):
    nan_run = _cfg(tiny_cfg, tmp_path, "nan")
    nan_run.spike.inject = {"6": "nan"}
    skipped = _cfg(tiny_cfg, tmp_path, "skip")
    skipped.spike.skip_steps = ["6"]
    a, b = run_single(nan_run), run_single(skipped)
    assert a["skipped"] == b["skipped"] == [6] and a["final_step"] == 12
    assert math.isnan(a["loss_by_step"][6])
    # No update from step 6 in either run: every other step's loss is identical.
    assert {k: v for k, v in a["loss_by_step"].items() if k != 6} == \
        {k: v for k, v in b["loss_by_step"].items() if k != 6}
    (entry,) = _skip_log(nan_run)
    assert entry["step"] == 6 and entry["computed"] and "loss is nan" in entry["reason"]
    assert entry["sample_indices"] == [40, 48] and len(entry["sources"]) == 8


@pytest.mark.slow  # ~50 s on 2 cores: run by CI after the default suite
def test_spike_skipped_clean_run_has_no_false_positives_and_replay_matches(tiny_cfg, tmp_path):
    clean = _cfg(tiny_cfg, tmp_path, "clean", steps=24)
    assert run_single(clean)["skipped"] == []
    spiky = _cfg(tiny_cfg, tmp_path, "spiky", steps=24)
    spiky.spike.inject = {"15": "spike"}
    spiked = run_single(spiky)
    assert spiked["skipped"] == [15]
    replay = _cfg(tiny_cfg, tmp_path, "replay", steps=24)
    replay.train.skip_batches_file = str(Path(spiky.run_dir) / "skipped_batches.jsonl")
    replayed = run_single(replay)
    assert replayed["skipped"] == [15]
    assert {k: v for k, v in replayed["loss_by_step"].items() if k != 15} == \
        {k: v for k, v in spiked["loss_by_step"].items() if k != 15}


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_rollback_restores_weights_and_skips_the_window(tiny_cfg, tmp_path, async_save):
    """With the async writer the step-4 save may still be in flight when step 7 escalates:
    the rollback waits for it to be published, then restores it."""
    roll = _cfg(tiny_cfg, tmp_path, "roll")
    roll.checkpoint.save_interval, roll.checkpoint.async_save = 4, async_save
    roll.spike.inject = {"7": "nan"}
    roll.spike.escalate_after, roll.spike.on_escalation = 1, "rollback_skip"
    rolled = run_single(roll)
    reference = _cfg(tiny_cfg, tmp_path, "ref")
    reference.spike.skip_steps = ["5-7"]  # the window after checkpoint 4, up to the bad step
    ref = run_single(reference)
    assert rolled["final_step"] == 12 and ref["skipped"] == [5, 6, 7]
    for step in range(8, 13):
        assert rolled["loss_by_step"][step] == ref["loss_by_step"][step]
    log = _skip_log(roll)
    assert [e["step"] for e in log if e.get("rolled_back")] == [7]
    assert [e["step"] for e in log if e["reason"] == "rolled-back window"] == [5, 6, 7]
    # The detector's history came back with the weights: steps 1-4 and 8-12, not 5 and 6.
    common = load_common(Path(roll.run_dir) / "checkpoints" / "step_00000012")
    history = common["trainer"]["callbacks"]["skipping"]["detector"]["loss"]["history"]
    assert history == [rolled["loss_by_step"][s] for s in (1, 2, 3, 4, 8, 9, 10, 11, 12)]


def test_persistent_nan_stops_the_run_with_saved_state(tiny_cfg, tmp_path):
    stop = _cfg(tiny_cfg, tmp_path, "stop")
    stop.spike.inject = {str(s): "nan" for s in range(3, 13)}
    stop.spike.escalate_after = 3
    out = run_single(stop)
    assert out["failed"] and "loss spikes" in out["stopped"] and out["final_step"] == 5
    assert (Path(stop.run_dir) / "checkpoints" / "step_00000005").is_dir()


@pytest.mark.distributed
def test_decision_identical_on_all_data_parallel_ranks(tiny_cfg, tmp_path):
    cfg = _cfg(tiny_cfg, tmp_path, "dp")
    cfg.spike.inject = {"11": "spike"}
    summaries = run_distributed(cfg, 2, all_ranks=True)
    assert summaries[0]["skipped"] == summaries[1]["skipped"] == [11]
    assert summaries[0]["loss_by_step"] == summaries[1]["loss_by_step"]


def test_rollback_defer_moves_the_window_to_the_end_of_the_stage(tiny_cfg, tmp_path):
    roll = _cfg(tiny_cfg, tmp_path, "defer")
    roll.checkpoint.save_interval = 4
    roll.spike.inject = {"7": "nan"}
    roll.spike.escalate_after, roll.spike.on_escalation = 1, "rollback_defer"
    rolled = run_single(roll)
    assert rolled["final_step"] == 12 and not rolled["failed"]
    log = _skip_log(roll)
    (defer,) = [e for e in log if e["kind"] == "defer"]
    assert defer["batches"] == [4, 7]  # the batches of steps 5-7, now read at steps 10-12
    # The deferred batches are read last: step 10's batch is the original step 5's.
    replay = _cfg(tiny_cfg, tmp_path, "defer-replay")
    replay.train.skip_batches_file = str(Path(roll.run_dir) / "skipped_batches.jsonl")
    replayed = run_single(replay)
    assert replayed["loss_by_step"] == {k: v for k, v in rolled["loss_by_step"].items()}


# ---------------------------------------------------------------- OLMo-core's and Megatron's rules
def _olmo_reference(values: list[float], window: int, sigma: float) -> list[bool]:
    """OLMo-core's ``SkipStepOptimizer.get_step_factor`` restated with torch, for the loss
    alone: every value is appended (skipped or not) to a list capped at window + 1; no test
    before the list holds max(20, window // 2); the z-score of the newest value against
    ``torch.std_mean`` of the others; skip unless |z| <= sigma. True = skip."""
    import torch

    losses, skips = [], []
    for value in values:
        losses.append(torch.tensor(value, dtype=torch.float64))
        while len(losses) > window + 1:
            losses.pop(0)
        if len(losses) < max(20, window // 2):
            skips.append(False)
            continue
        std, mean = torch.std_mean(torch.stack(losses[:-1]))
        z = (losses[-1] - mean).abs().div(std)
        skips.append(not bool(z <= sigma))
    return skips


def _monitor_decisions(values: list[float], cfg: SpikeConfig) -> list[bool]:
    monitor, skips = SeriesMonitor("loss", cfg), []
    for value in values:
        spike = monitor.check(value).spike
        monitor.record(value, accepted=not spike)
        skips.append(spike)
    return skips


def test_olmo_rule_matches_olmo_core_step_factor():
    """Seeded series with spikes up and down, bursts and level shifts: the same skips, step by
    step, as OLMo-core's algorithm (window 32 here: the warm-up is max(20, 16) = 20 values)."""
    rng = random.Random(7)
    cfg = SpikeConfig(rule="olmo", window=32, threshold=6.0)
    for trial in range(20):
        values, level = [], 3.0
        for i in range(150):
            level -= 0.002
            value = level + rng.gauss(0, 0.02)
            if rng.random() < 0.05:
                value += rng.choice([-1, 1]) * rng.uniform(0.05, 2.0)
            if trial % 4 == 0 and 60 <= i < 66:
                value += 1.5  # a burst: each value enters the history and widens the band
            values.append(value)
        assert _monitor_decisions(values, cfg) == _olmo_reference(values, 32, 6.0), trial


def test_olmo_rule_is_two_sided_and_counts_skipped_steps():
    rng = random.Random(0)
    base = [3.0 + rng.gauss(0, 0.01) for _ in range(100)]
    olmo = SpikeConfig(rule="olmo", window=128, threshold=6.0)
    zscore = SpikeConfig(rule="zscore", window=128, threshold=6.0, min_history=64)
    drop = [*base, 2.0]  # a sudden drop
    assert _monitor_decisions(drop, olmo)[-1] and not _monitor_decisions(drop, zscore)[-1]
    # Warm-up: OLMo-core tests once its list holds 64 values, the current one included.
    early = [*base[:62], 100.0]  # the 63rd value: not tested
    assert not any(_monitor_decisions(early, olmo))
    on_time = [*base[:63], 100.0]  # the 64th: tested against the 63 before it
    assert _monitor_decisions(on_time, olmo)[-1]
    # Skipped steps enter OLMo's history (and so widen its band); not the zscore rule's.
    monitor = SeriesMonitor("loss", olmo)
    for value in base:
        monitor.record(value, accepted=True)
    assert monitor.check(5.0).spike
    monitor.record(5.0, accepted=False)
    assert list(monitor.history)[-1] == 5.0 and len(monitor.history) == 101
    accepted_only = SeriesMonitor("loss", zscore)
    accepted_only.record(5.0, accepted=False)
    assert list(accepted_only.history) == []


def test_megatron_rule_is_ten_times_the_max_of_the_first_samples():
    monitor = SeriesMonitor("loss", SpikeConfig(rule="megatron", threshold=10.0,
                                                megatron_samples=5))
    for value in (8.0, 100.0, 7.0, 6.0, 5.0):  # the first samples are never spikes
        assert not monitor.check(value).spike
        monitor.record(value, accepted=True)
    assert not monitor.check(999.0).spike and monitor.check(1000.0).spike  # >= 10 x 100
    monitor.record(50.0, accepted=True)  # the max is never updated after the first samples
    assert monitor.first_max == 100.0 and monitor.check(1000.0).spike


def _events(cfg, kind: str) -> list[dict]:
    path = Path(cfg.run_dir) / "metrics.jsonl"
    return [e for e in map(json.loads, path.read_text().splitlines()) if e.get("event") == kind]


def _dropout(tiny_cfg):
    """Dropout on: a re-run only reproduces a computation if it draws the same numbers."""
    cfg = copy.deepcopy(tiny_cfg)
    cfg.model.hidden_dropout = cfg.model.attention_dropout = 0.1
    return cfg


def test_rerun_after_a_transient_fault_uses_the_rerun(tiny_cfg, tmp_path):
    """spike.rerun (Megatron-LM's re-run): step 11 computed x1000 once (a transient fault, as a
    flipped bit) is flagged and re-run on the same batch from the same RNG state; the re-run
    disagrees, so it was a fault: logged, not skipped, and the re-run's gradients are used. The
    run is then the clean run, step for step (dropout on)."""
    tiny_cfg = _dropout(tiny_cfg)
    clean = run_single(_cfg(tiny_cfg, tmp_path, "clean"))
    transient = _cfg(tiny_cfg, tmp_path, "transient")
    transient.spike.rerun, transient.spike.inject = True, {"11": "spike"}
    fault = run_single(transient)
    assert fault["skipped"] == [] and fault["loss_by_step"] == clean["loss_by_step"]
    (event,) = _events(transient, "transient_fault")
    assert event["step"] == 11 and event["loss"] == pytest.approx(1000 * event["rerun_loss"])
    assert event["rerun_loss"] == clean["loss_by_step"][11]
    assert _skip_log(transient) == []


@pytest.mark.slow  # ~60 s on 2 cores
def test_rerun_of_a_real_spike_reproduces_it_and_skips(tiny_cfg, tmp_path):
    """The same x1000 on every computation of step 11 (a bad batch) reproduces in the re-run:
    a real spike, skipped and logged as such. The re-run leaves no trace: the run equals one
    that skips step 11 after computing it once (dropout on)."""
    tiny_cfg = _dropout(tiny_cfg)
    bad = _cfg(tiny_cfg, tmp_path, "bad")
    bad.spike.rerun, bad.spike.inject = True, {"11": "bad_batch"}
    spiked = run_single(bad)
    assert spiked["skipped"] == [11] and _events(bad, "transient_fault") == []
    (entry,) = _skip_log(bad)
    assert entry["step"] == 11 and "reproduced by a re-run" in entry["reason"]
    once = _cfg(tiny_cfg, tmp_path, "once")
    once.spike.inject = {"11": "bad_batch"}
    reference = run_single(once)
    assert reference["skipped"] == [11] and spiked["loss_by_step"] == reference["loss_by_step"]


def test_olmo_rule_in_training_keeps_skipped_steps_in_its_history(tiny_cfg, tmp_path):
    """A real run under rule=olmo (window 20: tested from the 20th value): the spike at step
    22 is skipped and its loss is in the detector's history in the final checkpoint."""
    cfg = _cfg(tiny_cfg, tmp_path, "olmo", steps=24)
    cfg.spike.rule, cfg.spike.window, cfg.spike.inject = "olmo", 20, {"22": "spike"}
    out = run_single(cfg)
    assert out["skipped"] == [22]
    common = load_common(Path(cfg.run_dir) / "checkpoints" / "step_00000024")
    history = common["trainer"]["callbacks"]["skipping"]["detector"]["loss"]["history"]
    assert history == [out["loss_by_step"][s] for s in range(5, 25)]  # the last 20, 22 included
    assert out["loss_by_step"][22] > 100


@pytest.mark.parametrize("spike, message", [
    ({"rule": "olmo", "window": 16}, "spike.window=16 with spike.rule=olmo"),
    ({"rule": "olmo_core"}, "spike.rule='olmo_core' is not one of"),
    ({"rerun_attempts": 0}, "spike.rerun_attempts=0 must be at least 1"),
    ({"rerun_tolerance": -1.0}, "spike.rerun_tolerance=-1.0 must be >= 0"),
    ({"inject": {"5": "flip"}}, "each value must be 'nan', 'spike' or 'bad_batch'"),
])
def test_spike_settings_are_validated(spike, message):
    from orchestration.config import ConfigError, RunConfig, validate

    cfg = RunConfig()
    for key, value in spike.items():
        setattr(cfg.spike, key, value)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)
    validate(RunConfig())  # the defaults pass
