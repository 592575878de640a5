"""orchestration.prebuild: the data cache a training job would build, made ahead in one process."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _cache_files(run_dir: str) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (Path(run_dir) / "data_cache").iterdir()}


def test_prebuild_writes_the_cache_training_reads(tiny_cfg, megatron_env):
    from orchestration.data.datasets import stage_datasets
    from orchestration.loop.stages import plan_stages
    from orchestration.prebuild import prebuild

    built = prebuild(tiny_cfg)
    stage = plan_stages(tiny_cfg)[0]
    assert built["main"]["train_samples"] >= stage.steps * stage.global_batch_size
    assert built["main"]["per_source_held_out"] == sorted(s.name for s in tiny_cfg.data.sources)
    before = _cache_files(tiny_cfg.run_dir)
    # Only the blend's sources get a train index (one epoch each here): per-source held-out sets
    # keep just the validation range of the split, so nothing is built for a train split nobody
    # reads.
    train_indices = [n for n in before if n.endswith("GPTDataset-train-document_index.npy")]
    assert len(train_indices) == len(tiny_cfg.data.sources)

    again = stage_datasets(tiny_cfg, stage)  # what the training job does at step 0
    assert _cache_files(tiny_cfg.run_dir) == before, "the training job found every index cached"
    fresh = prebuild(tiny_cfg)["main"]
    assert {k: fresh[k] for k in ("train_samples", "valid_samples")} == {
        k: built["main"][k] for k in ("train_samples", "valid_samples")}
    assert np.array_equal(again.train[0]["tokens"], stage_datasets(tiny_cfg, stage).train[0]["tokens"])


def test_per_source_held_out_sets_hold_out_the_blends_documents(tiny_cfg, megatron_env):
    """Each source's held-out set reads only documents of that source's validation range, the
    range the training blend never reads."""
    from orchestration.data.datasets import stage_datasets
    from orchestration.loop.stages import plan_stages

    datasets = stage_datasets(tiny_cfg, plan_stages(tiny_cfg)[0])
    train_docs_of = {s.key.prefix: set(s.epoch(0).indices.tolist())
                     for s in datasets.train.streams}
    valid_parts = {d.dataset_path: d for d in datasets.valid.datasets}
    for source in tiny_cfg.data.sources:
        held_out = datasets.valid_per_source[source.name]
        train_docs = train_docs_of[source.path]
        held_docs = set(held_out.indices.tolist())
        assert held_docs and not held_docs & train_docs
        assert held_docs == set(valid_parts[source.path].indices.tolist())
        assert set(held_out.document_index.tolist()) <= held_docs
        assert held_out.dataset_path == source.path
