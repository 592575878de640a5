"""End-to-end training behaviour on CPU: learning, exact resume, and what a run leaves behind."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
from dist import run_single


def _repeated_batch_corpus(root, seq_length: int, vocab: int) -> str:
    """Every document is the same seq_length tokens, so every training sample is identical."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    tokens = np.random.default_rng(0).integers(4, vocab, size=seq_length).astype(np.uint16)
    prefix = str(root / "repeat_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(64):
        builder.add_document(tokens, [seq_length])
    builder.finalize(prefix + ".idx")
    return prefix


def test_overfits_one_repeated_batch(tiny_cfg, tmp_path):
    from orchestration.config import SourceConfig

    cfg = copy.deepcopy(tiny_cfg)
    cfg.data.sources = [SourceConfig(name="repeat", path=_repeated_batch_corpus(
        tmp_path, cfg.model.seq_length, cfg.model.vocab_size))]
    cfg.train.max_steps = 60
    cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps = 1e-2, 1e-3, 5
    losses = run_single(cfg)["losses"]
    assert losses[0] > 5.0  # ~ln(256) at init
    assert losses[-1] < 0.05


def test_resume_reproduces_uninterrupted_run(tiny_cfg, tmp_path):
    """Train 2N steps vs N, stop, resume, N more: identical per-step losses."""
    full = copy.deepcopy(tiny_cfg)
    full.run_dir = str(tmp_path / "full")
    reference = run_single(full)["losses"]

    parts = copy.deepcopy(tiny_cfg)
    parts.run_dir = str(tmp_path / "parts")
    parts.train.exit_after_steps = tiny_cfg.train.max_steps // 2
    first = run_single(parts)
    assert first["final_step"] == 3 and "exit_after_steps" in first["stopped"]
    parts.train.exit_after_steps = None
    second = run_single(parts)
    assert first["losses"] + second["losses"] == reference  # bit-identical on CPU fp32


def test_run_directory_contents(tiny_cfg):
    cfg = copy.deepcopy(tiny_cfg)
    cfg.train.max_steps, cfg.checkpoint.save_interval, cfg.checkpoint.keep_last = 8, 2, 2
    cfg.train.eval_interval, cfg.logging.wandb_mode = 4, "offline"
    run_single(cfg)
    from pathlib import Path

    run_dir = Path(cfg.run_dir)
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["step_00000006", "step_00000008"]  # pruned to keep_last, no *.tmp left
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    for key in ("grad_norm", "lr", "tokens_per_s", "consumed_tokens", "step_time_s",
                "flops_per_token_full_attn", "flops_per_token_causal"):
        assert all(math.isfinite(r[key]) for r in steps), key
    assert steps[-1]["consumed_tokens"] == 8 * cfg.train.global_batch_size * cfg.model.seq_length
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert evals[-1]["val_ppl"] == pytest.approx(math.exp(evals[-1]["val_loss"]))
    assert list((run_dir / "wandb").glob("offline-run-*")), "W&B offline run written"
