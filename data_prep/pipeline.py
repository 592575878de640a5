"""JSONL/Parquet/Arrow -> Megatron ``.bin/.idx``: the parent side of ``data_prep/tokenize.py``.

The parent streams line-aligned byte blocks to a pool of workers (which parse, validate and
encode), receives flat token arrays back *in input order*, and appends them to the output in
bulk. In-flight blocks are bounded, so memory stays flat on inputs of any size (unlike
``Pool.imap``, whose feeder thread would read the whole input ahead). The output is a pure
function of the inputs, tokenizer and options, so re-runs are byte-identical.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_prep.encode_worker import ChunkResult, EncodeOptions, Skip, encode_block, init_worker
from data_prep.jsonl_io import Block, ReadFailure
from data_prep.progress import Progress
from data_prep.readers import open_reader
from data_prep.shards import file_sha256  # noqa: F401 -- re-exported
from data_prep.writer import AtomicIndexedWriter, token_dtype


class EmptyOutputError(Exception):
    """An output would hold no document (every input empty or unusable)."""

MAX_EXAMPLES_PER_REASON = 100
TEST_DELAY_ENV = "DATA_PREP_TEST_CHUNK_DELAY"  # test hook: seconds to sleep after each chunk
_WORKER_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1}


class BadInputError(Exception):
    """``--strict``: the first unusable input line, as ``file:line: reason: detail``."""


@dataclass
class TokenizeOptions:
    tokenizer_model: str
    text_key: str = "text"
    workers: int = 2
    block_bytes: int = 1 << 20
    strict: bool = False
    progress: bool = True
    punkt_params: object | None = None
    fim_rate: float = 0.0
    fim_spm_rate: float = 0.5
    seed: int = 1234
    eos_token: str | None = None  # tokenizer.json only; default: the first known EOS token
    allow_empty: bool = False  # an output with no document is an error unless this is set
    file_offset: int = 0  # position of the first file in the whole (sharded) job: FIM seeds
    start_method: str | None = None  # multiprocessing start method; None: see start_method()


@dataclass
class RunStats:
    """What one output prefix received; becomes the summary JSON."""

    files: list[Path]
    documents: int = 0
    sequences: int = 0
    tokens: int = 0
    bytes_in: int = 0
    lines: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[dict] = field(default_factory=list)
    per_file: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.per_file = [
            {
                "path": str(f),
                "bytes_on_disk": f.stat().st_size,
                "mtime_ns": f.stat().st_mtime_ns,
                "sha256": None,
                "lines": 0,
                "documents": 0,
                "tokens": 0,
                "skipped": 0,
            }
            for f in self.files
        ]

    def add(self, r: ChunkResult) -> None:
        n_tok = int(len(r.tokens))
        self.documents += r.n_docs
        self.sequences += len(r.seq_lengths)
        self.tokens += n_tok
        self.bytes_in += r.bytes_in
        self.lines += r.n_lines
        f = self.per_file[r.file_index]
        f["documents"] += r.n_docs
        f["lines"] += r.n_lines
        f["tokens"] += n_tok
        f["skipped"] += sum(r.skip_counts.values())
        for s in r.skips:
            self.skip(r.file_index, s)
        self.skipped.update(r.skip_counts)

    def skip(self, file_index: int, s: Skip, count: bool = False) -> None:
        if count:
            self.skipped[s.reason] += 1
            self.per_file[file_index]["skipped"] += 1
        if sum(e["reason"] == s.reason for e in self.examples) < MAX_EXAMPLES_PER_REASON:
            self.examples.append(
                {
                    "file": str(self.files[file_index]),
                    "line": s.line,
                    "reason": s.reason,
                    "detail": s.detail,
                }
            )


def _blocks(
    stats: RunStats, opts: TokenizeOptions, progress: Progress
) -> Iterator[Block | ReadFailure]:
    for i, path in enumerate(stats.files):
        reader = open_reader(path, i, opts.text_key)
        done = progress.bytes_done
        for block in reader.blocks(opts.block_bytes):
            progress.set_bytes(done + reader.position)
            yield block
        stats.per_file[i]["sha256"] = reader.sha256
        progress.set_bytes(done + path.stat().st_size)


def ordered_map(pool, fn: Callable, items: Iterable, window: int) -> Iterator:
    """``pool.imap`` with at most ``window`` tasks in flight; ``ReadFailure``s pass through."""
    pending: deque = deque()
    for item in items:
        pending.append(item if isinstance(item, ReadFailure) else pool.apply_async(fn, (item,)))
        while len(pending) >= window or (pending and isinstance(pending[0], ReadFailure)):
            head = pending.popleft()
            yield head if isinstance(head, ReadFailure) else head.get()
    while pending:
        head = pending.popleft()
        yield head if isinstance(head, ReadFailure) else head.get()


class _InlinePool:
    """``--workers 0``: run the worker function in this process (debugging, tiny inputs)."""

    class _Done:
        def __init__(self, value) -> None:
            self.value = value

        def get(self):
            return self.value

    def apply_async(self, fn, args):
        return self._Done(fn(*args))


def _fail(stats: RunStats, file_index: int, s: Skip) -> BadInputError:
    return BadInputError(f"{stats.files[file_index]}:{s.line}: {s.reason}: {s.detail}")


def _consume(
    results: Iterator,
    writer: AtomicIndexedWriter,
    stats: RunStats,
    opts: TokenizeOptions,
    progress: Progress,
) -> None:
    delay = float(os.environ.get(TEST_DELAY_ENV, "0") or 0)
    for r in results:
        if isinstance(r, ReadFailure):
            s = Skip(r.line, r.reason, r.detail)
            if opts.strict:
                raise _fail(stats, r.file_index, s)
            stats.skip(r.file_index, s, count=True)
            continue
        if opts.strict and r.skips:
            raise _fail(stats, r.file_index, r.skips[0])
        writer.add_chunk(r.tokens, r.seq_lengths, r.doc_seqs)
        stats.add(r)
        progress.update(stats.documents, stats.tokens)
        if delay:
            time.sleep(delay)


def tokenize_files(files: list[Path], prefix: str, opts: TokenizeOptions, pool, dtype) -> RunStats:
    """Tokenize ``files`` (in order) into one ``prefix.bin/.idx``; return what was written."""
    stats = RunStats(files=files)
    total = sum(f.stat().st_size for f in files)
    with (
        Progress(total, prefix, enabled=opts.progress) as progress,
        AtomicIndexedWriter(prefix, np.dtype(dtype).type) as writer,
    ):
        results = ordered_map(
            pool,
            encode_block,
            _blocks(stats, opts, progress),
            window=2 * max(opts.workers, 1) + 2,
        )
        _consume(results, writer, stats, opts, progress)
        if stats.documents == 0 and files and not opts.allow_empty:
            raise EmptyOutputError(_empty_message(prefix, stats))
        writer.commit()
    return stats


def _empty_message(prefix: str, stats: RunStats) -> str:
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(stats.skipped.items())) or "no lines"
    return (
        f"{prefix}: no documents in {len(stats.files)} input file(s) ({stats.lines} lines; "
        f"skipped {reasons}; first file {stats.files[0]}); nothing written. "
        "Pass --allow-empty if an empty output is expected"
    )


def encode_options(opts: TokenizeOptions, vocab_size: int) -> EncodeOptions:
    return EncodeOptions(
        model_path=str(opts.tokenizer_model),
        eos_token=opts.eos_token,
        file_offset=opts.file_offset,
        text_key=opts.text_key,
        dtype=token_dtype(vocab_size).__name__,
        punkt_params=opts.punkt_params,
        fim_rate=opts.fim_rate,
        fim_spm_rate=opts.fim_spm_rate,
        seed=opts.seed,
    )


def start_method(requested: str | None = None) -> str:
    """``fork`` (cheap) from a single-threaded process; ``forkserver`` once threads exist.

    Forking a multi-threaded parent (e.g. a training job with gloo/torch threads) can copy a
    lock held by another thread into the child and deadlock it.
    """
    if requested:
        return requested
    if os.name != "posix":
        return "spawn"
    return "fork" if threading.active_count() == 1 else "forkserver"


def make_pool(enc: EncodeOptions, workers: int, method: str | None = None):
    """A worker pool with the tokenizer loaded in each process (or in-process for 0)."""
    if workers <= 0:
        init_worker(enc, in_pool=False)
        return _InlinePool()
    ctx = mp.get_context(start_method(method))
    # Workers start with SIGTERM/SIGINT blocked and unblock them once their handlers are set
    # (init_worker): a signal arriving while one is still starting up must neither run a
    # handler inherited from this process nor be lost.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _WORKER_SIGNALS)
    try:
        return ctx.Pool(workers, initializer=init_worker, initargs=(enc,))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def close_pool(pool, ok: bool) -> None:
    """Let workers finish (success), or stop them now (error, Ctrl-C, SIGTERM).

    ``terminate`` sends SIGTERM, which kills a worker at once: workers restore the default
    action before unblocking it (``make_pool``). SIGKILL is not used: a worker killed while it
    holds the result queue's lock would leave the pool unable to shut down.
    """
    if isinstance(pool, _InlinePool):
        return
    if ok:
        pool.close()
    else:
        pool.terminate()
    pool.join()
