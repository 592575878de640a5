"""Worker side of the tokenizer: parse a block of JSONL lines and encode it in one batch.

Everything per-document happens here, in the pool, so the parent only moves bytes: a block
comes in as raw bytes, and goes back as one flat token array plus per-sequence lengths and
per-document sequence counts, ready to append to the ``.bin``/``.idx`` in bulk. Bad lines are
counted by reason with their line numbers (the first few of each reason are kept verbatim).
"""

from __future__ import annotations

import json
import signal
from collections import Counter
from dataclasses import dataclass, field
from itertools import chain

import numpy as np

from data_prep import fim
from data_prep.jsonl_io import Block

MAX_EXAMPLES_PER_REASON = 20


@dataclass(frozen=True)
class EncodeOptions:
    model_path: str
    text_key: str = "text"
    dtype: str = "uint16"
    append_eos: bool = True
    punkt_params: object | None = None  # PunktParameters when splitting sentences
    fim_rate: float = 0.0
    fim_spm_rate: float = 0.5
    seed: int = 1234


@dataclass
class Skip:
    line: int
    reason: str
    detail: str


@dataclass
class ChunkResult:
    file_index: int
    first_line: int
    n_lines: int
    bytes_in: int
    tokens: np.ndarray
    seq_lengths: np.ndarray  # int32, one per sequence (sentence, or whole document)
    doc_seqs: np.ndarray  # int64, sequences per document
    skip_counts: Counter = field(default_factory=Counter)
    skips: list[Skip] = field(default_factory=list)  # first few per reason, in line order

    @property
    def n_docs(self) -> int:
        return len(self.doc_seqs)


class _Worker:
    """Per-process state: the sentencepiece model(s), the sentence splitter, FIM token ids."""

    def __init__(self, opts: EncodeOptions) -> None:
        import sentencepiece as spm

        self.opts = opts
        self.sp = spm.SentencePieceProcessor(model_file=opts.model_path)
        self.eos = [self.sp.eos_id()] if opts.append_eos else []
        self.splitter = None
        if opts.punkt_params is not None:
            from data_prep.sentences import make_splitter

            self.splitter = make_splitter(opts.punkt_params)
        self.fim_ids = None
        if opts.fim_rate > 0:
            self.fim_ids = fim.fim_tokens(self.sp, opts.model_path)
            self.sp_inner = fim.no_dummy_prefix_processor(opts.model_path)

    def encode(self, texts: list[str], inner: bool = False) -> list[list[int]]:
        sp = self.sp_inner if inner else self.sp
        return sp.encode(texts, num_threads=1) if texts else []


_WORKER: _Worker | None = None


def init_worker(opts: EncodeOptions, in_pool: bool = True) -> None:
    """Pool initializer: load the model once per process.

    Pool workers get default SIGTERM handling (``Pool.terminate`` must kill them whatever
    handler the parent installed) and ignore SIGINT (Ctrl-C is handled once, by the parent).
    """
    global _WORKER
    if in_pool:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    _WORKER = _Worker(opts)


def parse_lines(block: Block, text_key: str) -> tuple[list[tuple[int, str]], list[Skip]]:
    """(line, text) of every usable document, and a Skip for every unusable line."""
    docs: list[tuple[int, str]] = []
    skips: list[Skip] = []
    lines = block.data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()  # the block's trailing newline
    for i, raw in enumerate(lines):
        lineno = block.first_line + i
        if not raw.strip():
            skips.append(Skip(lineno, "blank_line", "line is empty; expected a JSON object"))
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            skips.append(
                Skip(
                    lineno,
                    "invalid_utf8",
                    f"byte 0x{raw[e.start]:02x} at offset {e.start} is not UTF-8",
                )
            )
            continue
        except ValueError as e:
            skips.append(Skip(lineno, "invalid_json", f"not valid JSON ({e})"))
            continue
        if not isinstance(obj, dict):
            skips.append(
                Skip(lineno, "not_an_object", f"expected a JSON object, got {type(obj).__name__}")
            )
            continue
        if text_key not in obj:
            keys = ", ".join(sorted(map(str, obj))[:8])
            skips.append(
                Skip(lineno, "missing_key", f"no key '{text_key}' (keys: {keys or 'none'})")
            )
            continue
        text = obj[text_key]
        if not isinstance(text, str):
            skips.append(
                Skip(
                    lineno,
                    "not_a_string",
                    f"'{text_key}' is {type(text).__name__}, expected a string",
                )
            )
        elif not text.strip():
            skips.append(Skip(lineno, "empty_document", f"'{text_key}' is empty or whitespace"))
        else:
            docs.append((lineno, text))
    return docs, skips


def _drop_unencodable(docs: list[tuple[int, str]], skips: list[Skip]) -> list[tuple[int, str]]:
    """Remove texts sentencepiece cannot take (lone surrogates from JSON ``\\ud800`` escapes)."""
    ok = []
    for lineno, text in docs:
        try:
            text.encode("utf-8")
            ok.append((lineno, text))
        except UnicodeEncodeError as e:
            skips.append(
                Skip(
                    lineno,
                    "invalid_unicode",
                    f"'{text[e.start]!a}' at character {e.start} is a lone surrogate",
                )
            )
    return ok


def _encode_documents(
    w: _Worker, docs: list[tuple[int, str]], file_index: int
) -> tuple[list[list[int]], list[int]]:
    """Token sequences (flattened over documents) and the number of sequences per document."""
    texts = [t for _, t in docs]
    if w.splitter is not None:
        sents = [[s for s in w.splitter.tokenize(t) if s.strip()] or [t] for t in texts]
        flat = w.encode(list(chain.from_iterable(sents)))
        seqs, counts, pos = [], [], 0
        for n in map(len, sents):
            doc = [ids for ids in flat[pos : pos + n] if ids] or [[]]
            seqs.extend(doc)
            counts.append(len(doc))
            pos += n
        return seqs, counts
    if w.fim_ids is None:
        return w.encode(texts), [1] * len(texts)
    return _encode_fim(w, docs, file_index), [1] * len(texts)


def _encode_fim(w: _Worker, docs: list[tuple[int, str]], file_index: int) -> list[list[int]]:
    o = w.opts
    plans = [
        fim.plan_fim(t, fim.document_rng(o.seed, file_index, line), o.fim_rate, o.fim_spm_rate)
        for line, t in docs
    ]
    plain = w.encode([t for (_, t), p in zip(docs, plans, strict=True) if p is None])
    heads = w.encode([p.prefix for p in plans if p is not None])
    inner = w.encode([s for p in plans if p is not None for s in (p.middle, p.suffix)], inner=True)
    out, k = [], 0
    plain_it = iter(plain)
    for p in plans:
        if p is None:
            out.append(next(plain_it))
        else:
            out.append(fim.assemble(w.fim_ids, heads[k], inner[2 * k], inner[2 * k + 1], p.spm))
            k += 1
    return out


def _empty(block: Block, n_lines: int, dtype: np.dtype) -> ChunkResult:
    return ChunkResult(
        block.file_index,
        block.first_line,
        n_lines,
        len(block.data),
        np.empty(0, dtype),
        np.empty(0, np.int32),
        np.empty(0, np.int64),
    )


def encode_block(block: Block) -> ChunkResult:
    """Parse, validate and tokenize one block (runs in a pool worker)."""
    w = _WORKER
    assert w is not None, "init_worker was not called in this process"
    dtype = np.dtype(w.opts.dtype)
    docs, skips = parse_lines(block, w.opts.text_key)
    result = _empty(block, block.n_lines, dtype)
    try:
        seqs, counts = _encode_documents(w, docs, block.file_index)
    except (TypeError, UnicodeEncodeError):  # rare: find the offending documents, retry
        docs = _drop_unencodable(docs, skips)
        seqs, counts = _encode_documents(w, docs, block.file_index)
    if docs:
        if w.eos:  # EOS closes each document's last sequence
            eos = w.eos[0]
            ends = range(len(seqs)) if len(seqs) == len(counts) else np.cumsum(counts) - 1
            for i in ends:
                seqs[i].append(eos)
        lengths = np.fromiter(map(len, seqs), np.int32, count=len(seqs))
        result.tokens = np.fromiter(chain.from_iterable(seqs), dtype, count=int(lengths.sum()))
        result.seq_lengths = lengths
        result.doc_seqs = np.asarray(counts, np.int64)
    skips.sort(key=lambda s: s.line)
    result.skip_counts = Counter(s.reason for s in skips)
    seen: Counter = Counter()
    for s in skips:
        seen[s.reason] += 1
        if seen[s.reason] <= MAX_EXAMPLES_PER_REASON:
            result.skips.append(s)
    return result
