"""``python -m orchestration.data_sequence``: what each step trained on, from the config and
the logs alone, against what a real run read (tests/probes.py: DataProbe)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from dist import run_single
from probes import token_hash

from orchestration.config import StageConfig


def _two_stage_run(tiny_cfg, run_dir: Path):
    """tiny_k2 in miniature: 12 + 8 steps, stage 2 re-weights the same sources; a NaN at step
    7 escalates to a rollback to step 4 that defers batches 4-6 to the end of stage 1, and
    step 15 is a configured skip."""
    cfg = copy.deepcopy(tiny_cfg)
    cfg.run_dir = str(run_dir)
    one, two = copy.deepcopy(cfg.data), copy.deepcopy(cfg.data)
    two.sources[0].multiplier = 0.25
    cfg.stages = [StageConfig(name="one", data=one, max_steps=12),
                  StageConfig(name="two", data=two, max_steps=8)]
    cfg.checkpoint.save_interval = 4
    cfg.spike.min_history, cfg.spike.window = 10, 16
    cfg.spike.inject = {"7": "nan"}
    cfg.spike.skip_steps = ["15"]
    cfg.spike.escalate_after, cfg.spike.on_escalation = 1, "rollback_defer"
    cfg.callbacks = {"probes:DataProbe": {}}
    return cfg


def _export(run_dir: Path, *args: str) -> list[dict]:
    from orchestration.data_sequence import main

    out = run_dir / "sequence.jsonl"
    assert main([str(run_dir), "--format", "jsonl", "--output", str(out), *args]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def _tokens_of(run_dir: Path, records: list[dict]) -> dict[int, list[str]]:
    """Each step's sample tokens, read from the (source, position) pairs the export gives."""
    from orchestration.data.sequence import RunLog, SequenceReader
    from orchestration.data_sequence import run_config

    cfg = run_config(run_dir)
    reader = SequenceReader(cfg, RunLog.read(run_dir))
    streams = {}
    for stage in reader.stages:
        for part in reader.train(stage).parts:
            streams.update({name: s.stream for name, s in zip(part.names, part.slices,
                                                              strict=True)})
    return {r["step"]: [token_hash(streams[s][p]["tokens"]) for s, p in r["samples"]]
            for r in records}


def test_export_matches_what_training_read(tiny_cfg, tmp_path, megatron_env):
    cfg = _two_stage_run(tiny_cfg, tmp_path / "run")
    summary = run_single(cfg)
    assert summary["final_step"] == 20 and not summary["failed"]
    probe = {int(k): v for k, v in json.loads((tmp_path / "run" / "data_probe.json")
                                              .read_text()).items()}
    records = _export(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, 21))
    tokens = _tokens_of(tmp_path / "run", records)
    for r in records:
        seen = probe[r["step"]]
        assert (r["data_stage"], r["batch"]) == (seen["data_stage"], seen["batch"]), r["step"]
        assert tokens[r["step"]] == seen["tokens"], f"step {r['step']}: other samples"
        assert bool(r["skipped"]) == bool(seen["skipped"]), r["step"]
    # Stage one: batches 4-6 (steps 5-7, rolled back) are read last, at steps 10-12.
    assert [r["batch"] for r in records[:12]] == [0, 1, 2, 3, 7, 8, 9, 10, 11, 4, 5, 6]
    assert [r["step"] for r in records if r["deferred"]] == [10, 11, 12]
    assert [r["step"] for r in records if r["skipped"]] == [15]
    for stage, steps in (("one", 12), ("two", 8)):
        read = sorted(r["batch"] for r in records if r["data_stage"] == stage)
        assert read == list(range(steps)), f"{stage}: every batch exactly once"
    text = _export_text(tmp_path / "run", "--steps", "10-12")
    assert len(text) == 3 and "DEFERRED" in text[0] and "one[4]" in text[0]


def _export_text(run_dir: Path, *args: str) -> list[str]:
    from orchestration.data_sequence import main

    out = run_dir / "sequence.txt"
    assert main([str(run_dir), "--output", str(out), *args]) == 0
    return out.read_text().splitlines()


@pytest.mark.slow  # two training jobs; tests/test_data_continuation.py covers it without training
def test_a_new_mix_on_resume_continues_every_source(tiny_cfg, tmp_path):
    """Job 1 trains steps 1-6 with one mix; job 2 resumes with alpha weighted 3x. The history
    records both; no sample of any source is read twice and the export matches the reads."""
    cfg = copy.deepcopy(tiny_cfg)
    cfg.run_dir = str(tmp_path / "run")
    cfg.train.max_steps, cfg.train.exit_after_steps = 12, 6
    cfg.callbacks = {"probes:DataProbe": {}}
    assert run_single(cfg)["final_step"] == 6
    cfg.train.exit_after_steps = None
    cfg.data.sources[0].multiplier = 3.0
    assert run_single(cfg)["final_step"] == 12
    history = json.loads((tmp_path / "run" / "data_history.json").read_text())
    assert [(e["step"], e["data"]["sources"][0]["multiplier"]) for e in history] == \
        [(1, 1.0), (7, 3.0)]
    records = _export(tmp_path / "run")
    pairs = [tuple(p) for r in records for p in r["samples"]]
    assert len(set(pairs)) == len(pairs) == 12 * cfg.train.global_batch_size
    for source in ("alpha", "beta"):
        seen = sorted(p for s, p in pairs if s == source)
        assert seen == list(range(len(seen))), f"{source} continues where job 1 stopped"
    late = [s for r in records[6:] for s, _ in r["samples"]]
    assert late.count("alpha") > late.count("beta"), "the new mix is read from step 7 on"
    probe = json.loads((tmp_path / "run" / "data_probe.json").read_text())
    tokens = _tokens_of(tmp_path / "run", records)
    assert all(tokens[r["step"]] == probe[str(r["step"])]["tokens"] for r in records)
