"""Tokenization at scale: worker scaling, merge throughput, sharded vs single-process runs.

``python bench/tokenize_bench.py --scale [--reps 3] [--copies 4] [--shards 2]`` (this module is
its ``--scale`` mode). On the embedded demo corpus, written as one JSONL file per source and copy:

* **scaling**: ``run_tokenize`` on all files with 1..``cpu_count`` workers; tokens/s per worker
  and the scaling efficiency ``rate(w) / (w * rate(1))``;
* **merge**: ``data_prep.merge`` of the shards below (output bytes/s, ``.bin`` + ``.idx``);
* **sharded end to end**: ``--shards K`` tasks ``data_prep/tokenize.py --shard i/K`` run at the
  same time as separate processes (``cores/K`` workers each, as K nodes would, each paying its
  interpreter start and Megatron import), then the merge, against one process with ``cores``
  workers on the same files. The merged output is checked byte-identical to the single run.

Repetitions alternate between variants (drift hits all alike); medians are reported.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from data_prep.demo_corpus import SOURCES
from data_prep.merge import expand_prefixes, merge
from data_prep.pipeline import TokenizeOptions
from data_prep.tokenize_run import run_tokenize

REPO = Path(__file__).resolve().parents[1]


def write_files(data_dir: Path, copies: int, out: Path) -> list[Path]:
    """One JSONL file per (copy, source): sharding assigns whole files."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for c in range(copies):
        for source in SOURCES:
            f = out / f"{c:02d}-{source}.jsonl"
            f.write_bytes((data_dir / "corpus" / f"{source}.jsonl").read_bytes())
            files.append(f)
    return files


def _tokenize(model: str, inputs: Path, out: Path, workers: int) -> tuple[float, dict]:
    opts = TokenizeOptions(tokenizer_model=model, workers=workers, progress=False)
    t0 = time.perf_counter()
    # force: every repetition tokenizes; an up-to-date output would otherwise be skipped.
    (s,) = run_tokenize([inputs], str(out), opts, force=True)
    if s.get("reused"):
        raise RuntimeError(f"{out}: the output was reused, so this repetition timed nothing")
    return time.perf_counter() - t0, s


def scaling(model: str, inputs: Path, tmp: Path, reps: int) -> dict:
    cores = os.cpu_count() or 1
    times: dict[int, list[float]] = {w: [] for w in range(1, cores + 1)}
    tokens = 0
    for _ in range(reps):
        for w in times:
            sec, s = _tokenize(model, inputs, tmp / f"scale{w}", w)
            times[w].append(sec)
            tokens = s["tokens"]
    rate1 = tokens / statistics.median(times[1])
    rows = []
    for w, ts in times.items():
        rate = tokens / statistics.median(ts)
        rows.append({"workers": w, "seconds": [round(t, 3) for t in ts],
                     "tok_s": round(rate), "tok_s_per_worker": round(rate / w),
                     "efficiency": round(rate / (w * rate1), 3)})
    return {"tokens": tokens, "rows": rows}


def _cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "data_prep/tokenize.py", *args, "--no-progress",
                             "--force"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _wait(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        _, err = p.communicate()
        assert p.returncode == 0, err[-2000:]


def sharded_vs_single(model: str, inputs: Path, tmp: Path, shards: int, reps: int) -> dict:
    cores = os.cpu_count() or 1
    per_task = max(cores // shards, 1)
    single_s, shard_s, merge_s, merge_bytes = [], [], [], 0
    for _ in range(reps):
        t0 = time.perf_counter()
        _wait([_cli(str(inputs), "--tokenizer-model", model, "--output-prefix",
                    str(tmp / "single"), "--workers", str(cores))])
        single_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        _wait([_cli(str(inputs), "--tokenizer-model", model, "--output-prefix",
                    str(tmp / "sh"), "--workers", str(per_task), "--shard", f"{i}/{shards}")
               for i in range(1, shards + 1)])
        shard_s.append(time.perf_counter() - t0)
        prefixes = expand_prefixes([str(tmp / "sh_text_document-shard-*")])
        s = merge(prefixes, str(tmp / "merged"), force=True)
        merge_s.append(s["merge_seconds"])
        merge_bytes = s["bytes_out"] + Path(str(tmp / "merged") + ".idx").stat().st_size
    same = all(Path(str(tmp / "merged") + ext).read_bytes()
               == Path(str(tmp / "single_text_document") + ext).read_bytes()
               for ext in (".bin", ".idx"))
    med = statistics.median
    return {
        "shards": shards, "workers_per_shard": per_task, "single_workers": cores,
        "single_s": [round(t, 3) for t in single_s], "sharded_s": [round(t, 3) for t in shard_s],
        "merge_s": [round(t, 4) for t in merge_s], "merge_bytes": merge_bytes,
        "merge_bytes_per_s": round(merge_bytes / med(merge_s)),
        "sharded_plus_merge_over_single": round((med(shard_s) + med(merge_s)) / med(single_s), 3),
        "merged_identical_to_single": same,
    }


def run_scale(model: str, data_dir: Path, tmp: Path, copies: int, shards: int, reps: int) -> dict:
    inputs = tmp / "files"
    files = write_files(data_dir, copies, inputs)
    size = sum(f.stat().st_size for f in files)
    return {"files": len(files), "bytes": size, "scaling": scaling(model, inputs, tmp, reps),
            "sharded": sharded_vs_single(model, inputs, tmp, shards, reps)}


def report(r: dict) -> str:
    lines = [f"{r['files']} files, {r['bytes']:,} bytes, {r['scaling']['tokens']:,} tokens"]
    for row in r["scaling"]["rows"]:
        lines.append(f"  {row['workers']} worker(s): {row['tok_s']:,} tok/s "
                     f"({row['tok_s_per_worker']:,}/worker, efficiency {row['efficiency']:.2f})")
    s = r["sharded"]
    lines.append(f"  merge: {s['merge_bytes_per_s'] / 1e6:,.0f} MB/s ({s['merge_bytes']:,} bytes)")
    lines.append(f"  {s['shards']} shards x {s['workers_per_shard']} workers + merge: "
                 f"{s['sharded_plus_merge_over_single']:.2f}x the single run's wall time "
                 f"(identical output: {s['merged_identical_to_single']})")
    return "\n".join(lines)
