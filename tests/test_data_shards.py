"""Sharded tokenization: stable assignment, merge byte-identical to one process, resume."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_data_common import REPO, make_docs, read_dataset, tiny_tokenizer, write_jsonl

from data_prep.merge import MergeError, merge
from data_prep.merge import main as merge_main
from data_prep.pipeline import TokenizeOptions
from data_prep.shards import Shard, assign, parse_shard, shard_files
from data_prep.tokenize_run import run_tokenize


def opts(**kw) -> TokenizeOptions:
    return TokenizeOptions(tokenizer_model=tiny_tokenizer(), workers=kw.pop("workers", 1),
                           progress=False, block_bytes=kw.pop("block_bytes", 4096), **kw)


def corpus(root: Path, n_files: int = 5) -> Path:
    for i in range(n_files):
        write_jsonl(root / "in" / f"part-{i:03d}.jsonl", make_docs(40 + 13 * i, seed=10 + i))
    return root / "in"


def files_of(prefix: str) -> tuple[bytes, bytes]:
    return Path(prefix + ".bin").read_bytes(), Path(prefix + ".idx").read_bytes()


def test_assignment_is_contiguous_balanced_and_stable():
    sizes = [100, 100, 100, 100, 400, 100, 100]
    owners = assign(sizes, 3)
    assert owners == sorted(owners) and set(owners) == {1, 2, 3}
    assert owners == assign(list(sizes), 3)  # a rerun: the same files for every task
    per_shard = [sum(s for s, o in zip(sizes, owners, strict=True) if o == k) for k in (1, 2, 3)]
    assert max(per_shard) <= 500
    assert assign([10], 4) == [3]  # fewer files than shards: some shards are empty
    assert parse_shard("2/8") == Shard(2, 8)
    for bad in ("0/8", "9/8", "x", "1-8"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)


def test_two_shards_merged_are_byte_identical_to_one_process(tmp_path):
    inputs = corpus(tmp_path)
    o = {"fim_rate": 0.5, "fim_spm_rate": 0.5, "seed": 3}  # FIM seeds use job-wide file indices
    (single,) = run_tokenize([inputs], str(tmp_path / "one" / "web"), opts(**o))
    shards = [run_tokenize([inputs], str(tmp_path / "sh" / "web"), opts(**o),
                           shard=Shard(i, 2))[0] for i in (1, 2)]
    assert all(s["documents"] for s in shards)
    assert [f["path"] for s in shards for f in s["input_files"]] == [
        f["path"] for f in single["input_files"]]
    out = str(tmp_path / "merged" / "web_text_document")
    merged = merge([s["output_prefix"] for s in shards], out)
    assert files_of(out) == files_of(single["output_prefix"])
    assert merged["documents"] == single["documents"] and merged["tokens"] == single["tokens"]
    assert len(merged["input_files"]) == 5 and merged["merge_bytes_per_s"] > 0
    on_disk = json.loads(Path(out + ".summary.json").read_text())
    assert on_disk["shards"][1]["prefix"] == shards[1]["output_prefix"]
    assert merge([s["output_prefix"] for s in shards], out).get("reused")  # up to date


def test_merge_matches_megatrons_own_add_index(tmp_path):
    from data_prep.writer import megatron_indexed_dataset

    inputs = corpus(tmp_path, 3)
    prefixes = [run_tokenize([inputs], str(tmp_path / "sh" / "x"), opts(),
                             shard=Shard(i, 3))[0]["output_prefix"] for i in (1, 2, 3)]
    idx = megatron_indexed_dataset()
    stock = str(tmp_path / "stock")
    builder = idx.IndexedDatasetBuilder(stock + ".bin", dtype=np.uint16)
    for p in prefixes:
        builder.add_index(p)
    builder.finalize(stock + ".idx")
    ours = str(tmp_path / "ours")
    merge(prefixes, ours)
    assert files_of(ours) == files_of(stock)
    assert len(read_dataset(ours)) == sum(len(read_dataset(p)) for p in prefixes)


def test_merge_refuses_missing_or_unfinished_shards(tmp_path, capsys):
    inputs = corpus(tmp_path, 3)
    base = str(tmp_path / "sh" / "x")
    done = [run_tokenize([inputs], base, opts(), shard=Shard(i, 3))[0]["output_prefix"]
            for i in (1, 2, 3)]
    with pytest.raises(MergeError, match=r"shard\(s\) \[2\]"):
        merge([done[0], done[2]], str(tmp_path / "m"))
    os.unlink(done[1] + ".summary.json")
    with pytest.raises(MergeError, match="not finished"):
        merge(done, str(tmp_path / "m"))
    rc = merge_main(["--output-prefix", str(tmp_path / "m"), base + "_text_document-shard-*"])
    assert rc == 3 and "not finished" in capsys.readouterr().err
    assert not list(tmp_path.glob("m.*"))


def test_rerun_skips_finished_shards_and_redoes_changed_ones(tmp_path):
    inputs = corpus(tmp_path, 4)
    base = str(tmp_path / "sh" / "x")
    first = [run_tokenize([inputs], base, opts(), shard=Shard(i, 2))[0] for i in (1, 2)]
    again = [run_tokenize([inputs], base, opts(), shard=Shard(i, 2))[0] for i in (1, 2)]
    assert all(s.get("reused") for s in again)
    files, _ = shard_files(sorted(inputs.iterdir()), Shard(2, 2))
    with open(files[-1], "a") as f:  # same size would not do: append a document
        f.write(json.dumps({"text": "One more document."}) + "\n")
    redo = [run_tokenize([inputs], base, opts(), shard=Shard(i, 2))[0] for i in (1, 2)]
    assert redo[0].get("reused") and not redo[1].get("reused")
    assert redo[1]["documents"] == first[1]["documents"] + 1


def test_killed_between_outputs_keeps_old_summary_and_redoes_only_stale(tmp_path):
    """A per-source job: the old summary survives until the new one is complete, and a
    summary that no longer matches its .idx (kill after publish) makes that prefix redone."""
    inputs = corpus(tmp_path, 3)
    out = tmp_path / "per"
    first = run_tokenize([inputs], str(out), opts(), prefix_per_source=True)
    victim = first[1]["output_prefix"]
    Path(victim + ".idx").write_bytes(Path(first[0]["output_prefix"] + ".idx").read_bytes())
    again = run_tokenize([inputs], str(out), opts(), prefix_per_source=True)
    assert [bool(s.get("reused")) for s in again] == [True, False, True]
    assert files_of(victim) != files_of(first[0]["output_prefix"])
    assert json.loads(Path(victim + ".summary.json").read_text())["idx_sha256"] == \
        again[1]["idx_sha256"]


def _sbatch(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "launch/tokenize.sbatch", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # four interpreters importing megatron-core: ~40 s on 2 cores
def test_sbatch_array_tasks_then_merge_equal_a_single_run(tmp_path):
    """The array job's commands, run task by task as SLURM would (SLURM_ARRAY_TASK_ID set)."""
    import sys

    inputs = corpus(tmp_path, 4)
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO),
           "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "2"}
    out = str(tmp_path / "k2" / "web")
    tok = ["--", "--tokenizer-model", tiny_tokenizer(), "--workers", "1"]
    for task in ("1", "2"):
        r = _sbatch("tokenize", out, str(inputs), *tok, env={**env, "SLURM_ARRAY_TASK_ID": task})
        assert r.returncode == 0, r.stderr
    rerun = _sbatch("tokenize", out, str(inputs), *tok, env={**env, "SLURM_ARRAY_TASK_ID": "2"})
    assert rerun.returncode == 0 and "up to date" in rerun.stdout
    merged = _sbatch("merge", out, env=env)
    assert merged.returncode == 0, merged.stderr
    (single,) = run_tokenize([inputs], str(tmp_path / "single"), opts())
    assert files_of(out + "_text_document") == files_of(single["output_prefix"])
    summary = json.loads(Path(out + "_text_document.summary.json").read_text())
    assert len(summary["input_files"]) == 4 and summary["documents"] == single["documents"]
