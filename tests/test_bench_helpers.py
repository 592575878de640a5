"""Correctness of the benchmark helpers (bench/): statistics, alternation, sync counting, the
MFU arithmetic, fake K2 indices and the raw-read baseline. No speed is asserted anywhere."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.common import (
    SyncCounter,
    alternation_order,
    bootstrap_ci,
    compose_config,
    linear_fit,
    paired_ratios,
    run_alternating,
    summarize,
    timed,
    timed_wall_cpu,
)
from bench.mfu import H100_SXM_PEAK, config_overrides, mfu_or_none, parse_args, tokens_per_s
from orchestration.config import ModelConfig
from orchestration.metrics.flops import flops_per_token


def test_summarize_median_and_quartiles():
    s = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.median, s.q1, s.q3, s.n) == (3.0, 2.0, 4.0, 5)
    assert summarize([7.0]) == summarize([7.0]).__class__(7.0, 7.0, 7.0, 1)
    with pytest.raises(ValueError):
        summarize([])


def test_alternation_is_abba():
    assert alternation_order(["a", "b"], 3) == ["a", "b", "b", "a", "a", "b"]
    assert alternation_order(["x", "y", "z"], 2) == ["x", "y", "z", "z", "y", "x"]
    with pytest.raises(ValueError):
        alternation_order(["a"], 0)


def test_run_alternating_passes_each_block_its_repetition():
    calls = []

    def block(name):
        def run(rep):
            calls.append((name, rep))
            return float(rep)

        return run

    out = run_alternating({"a": block("a"), "b": block("b")}, 3)
    assert calls == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2)]
    assert out == {"a": [0.0, 1.0, 2.0], "b": [0.0, 1.0, 2.0]}


def test_paired_ratios_and_linear_fit():
    assert paired_ratios([2.0, 3.0], [1.0, 2.0]) == [2.0, 1.5]
    with pytest.raises(ValueError):
        paired_ratios([1.0], [1.0, 2.0])
    a, b = linear_fit([0.1, 0.2, 0.4], [1.5, 2.0, 3.0])  # y = 1 + 5x exactly
    assert (a, b) == (pytest.approx(1.0), pytest.approx(5.0))
    with pytest.raises(ValueError):
        linear_fit([1.0, 1.0], [2.0, 3.0])


def test_bootstrap_interval_brackets_the_median_and_is_reproducible():
    values = [1.0, 1.1, 0.9, 1.05, 0.95, 1.2, 0.8, 1.0, 1.02, 0.98]
    lo, hi = bootstrap_ci(values)
    assert lo <= summarize(values).median <= hi
    assert min(values) <= lo and hi <= max(values)
    assert bootstrap_ci(values) == (lo, hi)  # seeded
    assert bootstrap_ci([3.0] * 5) == (3.0, 3.0)


def test_timed_syncs_before_starting_and_before_stopping_the_clock():
    order = []
    elapsed = timed(lambda: order.append("fn"), sync=lambda: order.append("sync"))
    assert order == ["sync", "fn", "sync"] and elapsed >= 0.0
    wall, cpu = timed_wall_cpu(lambda: sum(range(1000)))
    assert wall >= 0.0 and cpu >= 0.0


def _get_value(t: torch.Tensor) -> float:  # named like torch.optim's host-side step read
    return t.item()


def test_sync_counter_counts_reads_and_blocking_copies_by_site():
    t = torch.ones(3)
    with SyncCounter() as counter:
        t.sum().item()
        t.tolist()
        float(t.sum())
        torch.tensor([1.0], device="cpu")  # a blocking host->device copy on a GPU
        torch.tensor([1.0])  # no device given: stays on the host, not counted
        _get_value(t.sum())  # a CPU-fallback site: reported, not a device sync
        (t * 2).sum()  # no sync
    kinds = sorted(key.split(" @ ")[0] for key in counter.counts)
    assert kinds == ["__float__", "host->device copy", "item", "item", "tolist"]
    assert counter.device_syncs == 4
    assert all("test_bench_helpers.py" in key for key in counter.counts)


def test_mfu_arithmetic_against_a_hand_count():
    # tiny: 4 layers, hidden 128, 4 heads of 32, 2 KV groups, SwiGLU ffn 352, vocab 4096.
    # per layer: QKV 128*(128+2*64) + out 128*128 + fc1 128*704 + fc2 352*128 = 184,320
    # N = 4 * 184,320 + output 4096*128 = 1,261,568; flops/token = 6N + 12*4*128*128.
    tiny = ModelConfig()
    per_token = 6 * 1_261_568 + 12 * 4 * 128 * 128
    assert flops_per_token(tiny, 128) == per_token
    rate = tokens_per_s(global_batch=16, seq=128, step_s=0.5)
    assert rate == 4096.0
    assert mfu_or_none(rate, per_token, H100_SXM_PEAK) == pytest.approx(4096.0 * per_token / 989e12)
    assert mfu_or_none(rate, per_token, None) is None


def test_mfu_sweep_config_composes():
    a = parse_args(["--model", "tiny", "--device", "cpu"])
    assert (a.seq_length, a.global_batch_size, a.micro_batch_sizes) == (128, 16, [4, 8])
    cfg = compose_config(config_overrides(a, 4, "selective", 6, "/tmp/x"))
    assert cfg.parallel.recompute == "selective" and cfg.model.num_layers == 6
    assert cfg.model.hidden_size == 3072 and cfg.train.micro_batch_size == 4
    assert cfg.train.eval_interval > cfg.train.max_steps  # no evaluation inside timed steps
    gpu = parse_args(["--device", "cuda"])
    assert (gpu.seq_length, gpu.precision, gpu.model) == (4096, "bf16", "llama_1b")


def test_fake_k2_index_round_trips(tmp_path: Path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from bench.dataloader_bench import fake_document_sizes, write_fake_source

    sizes = fake_document_sizes(1_000_003, 700, np.random.default_rng(0))
    assert sizes.sum() == 1_000_003 and sizes.min() >= 1 and len(sizes) == 1429
    prefix = str(tmp_path / "src")
    write_fake_source(prefix, sizes)
    ds = IndexedDataset(prefix)
    assert np.array_equal(ds.sequence_lengths, sizes)
    assert np.array_equal(ds.index.sequence_pointers[:3], [0, 2 * sizes[0], 2 * sizes[:2].sum()])
    assert os.path.getsize(prefix + ".bin") == 2 * 1_000_003
    assert os.stat(prefix + ".bin").st_blocks * 512 < 1 << 20  # sparse: nothing written


def test_raw_baseline_reads_the_same_tokens_as_gpt_dataset(corpus, megatron_env, tmp_path):
    from bench.dataloader_bench import read_raw, sample_spans
    from orchestration.config import DataConfig, SourceConfig
    from orchestration.data.datasets import build_datasets
    from orchestration.data.tokenizer import TokenizerInfo

    data = DataConfig(
        tokenizer_model=corpus["tokenizer"],
        split="100,0,0",
        sources=[SourceConfig(name=k, path=v) for k, v in corpus["sources"].items()],
    )
    tokenizer = TokenizerInfo.from_sentencepiece(corpus["tokenizer"])
    ds = build_datasets(
        data, tokenizer, 64, seed=1, train_samples=32, valid_samples=0, cache_dir=tmp_path
    ).train
    for i in (0, 5, 31):
        source, spans = sample_spans(ds, i)
        text = np.concatenate([source.get(d, offset=o, length=n) for d, o, n in spans])
        assert np.array_equal(text[:-1], ds[i]["tokens"].numpy())
        assert np.array_equal(text[1:], ds[i]["labels"].numpy())
    read_raw([[sample_spans(ds, 0), sample_spans(ds, 1)]])  # stacks a batch without error


def test_tokenize_scale_times_every_repetition(corpus, tmp_path: Path):
    """Each repetition must tokenize: an up-to-date output was reused in ~0.02 s, and the median
    of such reuses once reported 342M tok/s for one worker. The bench refuses a reused output."""
    import json

    from corpus import sentences

    from bench.tokenize_scale import scaling

    data = tmp_path / "in"
    data.mkdir()
    lines = [json.dumps({"text": t}) for t in sentences(400, seed=3)]
    (data / "a.jsonl").write_text("\n".join(lines) + "\n")
    result = scaling(corpus["tokenizer"], data, tmp_path / "out", reps=2)
    assert result["tokens"] > 0
    assert all(len(row["seconds"]) == 2 for row in result["rows"])
