"""Tokenization throughput: the real JSONL -> .bin/.idx pipeline vs. sentencepiece alone.

``python bench/tokenize_bench.py [--workers 2] [--reps 5] [--copies 2]``
``python bench/tokenize_bench.py --scale [--reps 3] [--copies 4] [--shards 2]``: throughput per
worker from 1 to the cores available with the scaling efficiency, the merge's throughput, and a
sharded run (+ merge) against a single-process run on the same files (``bench/tokenize_scale.py``).

Both sides encode the same documents with the same number of worker processes:

* pipeline: ``data_prep.tokenize_cli.run_tokenize`` on a JSONL file, writing ``.bin/.idx`` to a
  temporary directory (reading, JSON parsing, EOS, ordering, writing: everything but the
  one-time Megatron import, which is done before timing);
* baseline: a pool of the same size whose workers already hold the texts (inherited by fork) and
  only call ``sp.encode(batch)``: no I/O, no parsing, no transfer of texts.

Repetitions alternate (pipeline, baseline, pipeline, ...) so drift affects both; medians are
reported. Throughput is counted in content tokens (sentencepiece's, EOS excluded) for both.
The corpus is the embedded demo corpus (``data_prep.prepare_demo``), repeated ``--copies`` times.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.demo_corpus import SOURCES  # noqa: E402
from data_prep.pipeline import TokenizeOptions  # noqa: E402
from data_prep.prepare_demo import prepare_demo_data  # noqa: E402
from data_prep.tokenize_cli import run_tokenize  # noqa: E402
from data_prep.writer import megatron_indexed_dataset  # noqa: E402

_TEXTS: list[str] = []
_SP = None


def _init_baseline(model: str) -> None:
    global _SP
    import sentencepiece as spm

    _SP = spm.SentencePieceProcessor(model_file=model)


def _encode_range(bounds: tuple[int, int]) -> int:
    ids = _SP.encode(_TEXTS[bounds[0] : bounds[1]], num_threads=1)
    return sum(map(len, ids))


def _batches(texts: list[str], target_bytes: int = 1 << 20) -> list[tuple[int, int]]:
    out, start, size = [], 0, 0
    for i, t in enumerate(texts):
        size += len(t)
        if size >= target_bytes:
            out.append((start, i + 1))
            start, size = i + 1, 0
    if start < len(texts):
        out.append((start, len(texts)))
    return out


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the pool workers)."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _timed(fn) -> tuple[float, float, int]:
    t0, c0 = time.perf_counter(), _cpu_seconds()
    tokens = fn()
    return time.perf_counter() - t0, _cpu_seconds() - c0, tokens


def run_baseline(model: str, workers: int) -> tuple[float, float, int]:
    def encode_all() -> int:
        pool = mp.get_context("fork").Pool(workers, _init_baseline, (model,))
        tokens = sum(pool.imap(_encode_range, _batches(_TEXTS)))
        pool.close()
        pool.join()  # reaped, so the workers' CPU time is counted
        return tokens

    return _timed(encode_all)


def run_pipeline(model: str, jsonl: Path, workers: int, out_dir: Path) -> tuple[float, float, int]:
    opts = TokenizeOptions(tokenizer_model=model, workers=workers, progress=False)

    def tokenize_all() -> int:
        summary = run_tokenize([jsonl], str(out_dir / "bench"), opts)[0]
        return summary["tokens"] - summary["documents"]  # content tokens: EOS excluded

    return _timed(tokenize_all)


def build_input(data_dir: Path, copies: int, path: Path) -> list[str]:
    texts = []
    with open(path, "w", encoding="utf-8") as out:
        for _ in range(copies):
            for source in SOURCES:
                with open(data_dir / "corpus" / f"{source}.jsonl", encoding="utf-8") as f:
                    for line in f:
                        out.write(line)
                        texts.append(json.loads(line)["text"])
    return texts


def _versions() -> dict:
    from importlib.metadata import version

    pkgs = ("sentencepiece", "megatron-core", "numpy", "torch", "nltk", "tqdm")
    return {"python": platform.python_version(), **{p: version(p) for p in pkgs}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--copies", type=int, default=2, help="times the demo corpus is repeated")
    p.add_argument("--data", default=None, help="demo data dir (default: a temporary one)")
    p.add_argument("--scale", action="store_true", help="scaling, merge and sharded runs")
    p.add_argument("--shards", type=int, default=2, help="--scale: shards of the sharded run")
    a = p.parse_args(argv)
    if a.scale:
        return _main_scale(a)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(a.data or Path(tmp) / "demo")
        demo = prepare_demo_data(data_dir, workers=a.workers, quiet=True)
        model = str(demo.tokenizer_model)
        jsonl = Path(tmp) / "bench.jsonl"
        _TEXTS[:] = build_input(data_dir, a.copies, jsonl)
        megatron_indexed_dataset()
        pipe, base = [], []
        load = os.getloadavg()[0]
        for _ in range(a.reps):
            pipe.append(run_pipeline(model, jsonl, a.workers, Path(tmp)))
            base.append(run_baseline(model, a.workers))
            assert base[-1][2] == pipe[-1][2], (base[-1][2], pipe[-1][2])
        result = _result(a, pipe, base, jsonl.stat().st_size, load)
    print(json.dumps(result, indent=1))
    print(
        f"pipeline {result['pipeline_tok_s']:,} tok/s vs sentencepiece "
        f"{result['baseline_tok_s']:,} tok/s with {a.workers} workers: ratio "
        f"{result['ratio']:.3f} (paired {result['ratio_paired']:.3f}, CPU {result['ratio_cpu']:.3f})"
    )
    return 0


def _main_scale(a: argparse.Namespace) -> int:
    from bench.tokenize_scale import report, run_scale

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(a.data or Path(tmp) / "demo")
        demo = prepare_demo_data(data_dir, workers=a.workers, quiet=True)
        megatron_indexed_dataset()
        load = os.getloadavg()[0]
        r = run_scale(str(demo.tokenizer_model), data_dir, Path(tmp), a.copies, a.shards, a.reps)
    r |= {"date": date.today().isoformat(), "cpus": os.cpu_count(), "reps": a.reps,
          "load_avg_1min_at_start": round(load, 2), "versions": _versions(),
          "machine": platform.platform()}
    print(json.dumps(r, indent=1))
    print(report(r))
    return 0


def _result(a: argparse.Namespace, pipe: list, base: list, n_bytes: int, load: float) -> dict:
    """Medians, and three ratios (baseline / pipeline time; 1.0 = no overhead at all).

    ``ratio``: of the median wall times (the headline figure). ``ratio_paired``: median over
    repetitions of each adjacent (pipeline, baseline) pair, robust to load drifting during the
    run. ``ratio_cpu``: of median CPU seconds (all processes), which other users' load on a
    shared machine barely affects.
    """
    n_tokens = pipe[0][2]
    med = statistics.median
    tp, tb = med(p[0] for p in pipe), med(b[0] for b in base)
    return {
        "date": date.today().isoformat(),
        "cpus": os.cpu_count(),
        "workers": a.workers,
        "load_avg_1min_at_start": round(load, 2),
        "documents": len(_TEXTS),
        "bytes": n_bytes,
        "tokens": n_tokens,
        "reps": a.reps,
        "pipeline_s": [round(p[0], 3) for p in pipe],
        "baseline_s": [round(b[0], 3) for b in base],
        "pipeline_cpu_s": [round(p[1], 3) for p in pipe],
        "baseline_cpu_s": [round(b[1], 3) for b in base],
        "pipeline_tok_s": round(n_tokens / tp),
        "baseline_tok_s": round(n_tokens / tb),
        "ratio": round(tb / tp, 3),
        "ratio_paired": round(med(b[0] / p[0] for p, b in zip(pipe, base, strict=True)), 3),
        "ratio_cpu": round(med(b[1] for b in base) / med(p[1] for p in pipe), 3),
        "versions": _versions(),
        "machine": platform.platform(),
    }


if __name__ == "__main__":
    sys.exit(main())
