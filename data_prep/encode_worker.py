"""Worker side of the tokenizer: parse a block of JSONL lines and encode it in one batch.

Everything per-document happens here, in the pool, so the parent only moves bytes: a block
comes in as raw bytes, and goes back as one flat token array plus per-sequence lengths and
per-document sequence counts, ready to append to the ``.bin``/``.idx`` in bulk. Bad lines are
counted by reason with their line numbers (the first few of each reason are kept verbatim).

A document's text is a string, or, as Megatron-LM's ``preprocess_data.py`` accepts, a list of
pre-split sentences: each sentence is then its own sequence in the ``.idx`` (empty ones are
dropped) and EOS ends the last. List documents are never FIM'd.
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
    eos_token: str | None = None  # tokenizer.json only: the end-of-document token
    file_offset: int = 0  # position of this output's first file in the whole job (FIM seeds)


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
    """Per-process state: the tokenizer, the sentence splitter, FIM token ids."""

    def __init__(self, opts: EncodeOptions) -> None:
        from data_prep.text_tokenizer import load_text_tokenizer

        self.opts = opts
        self.tok = load_text_tokenizer(opts.model_path, opts.eos_token)
        self.eos = [self.tok.eos_id] if opts.append_eos else []
        self.splitter = None
        if opts.punkt_params is not None:
            from data_prep.sentences import make_splitter

            self.splitter = make_splitter(opts.punkt_params)
        self.fim_ids = self.tok.fim_tokens() if opts.fim_rate > 0 else None

    def encode(self, texts: list[str], inner: bool = False) -> list[list[int]]:
        return self.tok.encode_inner(texts) if inner else self.tok.encode(texts)


_WORKER: _Worker | None = None


def init_worker(opts: EncodeOptions, in_pool: bool = True) -> None:
    """Pool initializer: load the model once per process.

    Pool workers get default SIGTERM handling (``Pool.terminate`` must kill them whatever
    handler the parent installed) and ignore SIGINT and SIGUSR1 (Ctrl-C and SLURM's time-limit
warning are handled once, by the parent).
    """
    global _WORKER
    if in_pool:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # SLURM's warning: the parent acts on it
        signal.pthread_sigmask(
            signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1}
        )
    _WORKER = _Worker(opts)


def _check_text(lineno: int, text, key: str) -> Skip | None:
    """Why a document's text is unusable, or None: a non-blank string or list of strings."""
    if isinstance(text, list):
        if not all(isinstance(t, str) for t in text):
            bad = next(type(t).__name__ for t in text if not isinstance(t, str))
            return Skip(lineno, "not_a_string", f"'{key}' is a list holding a {bad}")
        if not any(t.strip() for t in text):
            return Skip(lineno, "empty_document", f"'{key}' is a list of no non-blank sentences")
        return None
    if not isinstance(text, str):
        what = "null" if text is None else type(text).__name__
        return Skip(lineno, "not_a_string", f"'{key}' is {what}, expected a string")
    if not text.strip():
        return Skip(lineno, "empty_document", f"'{key}' is empty or whitespace")
    return None


def _parse_json(lineno: int, raw: bytes, key: str):
    """(text, None) of one JSONL line, or (None, Skip) saying why it is unusable."""
    if not raw.strip():
        return None, Skip(lineno, "blank_line", "line is empty; expected a JSON object")
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        detail = f"byte 0x{raw[e.start]:02x} at offset {e.start} is not UTF-8"
        return None, Skip(lineno, "invalid_utf8", detail)
    except ValueError as e:
        return None, Skip(lineno, "invalid_json", f"not valid JSON ({e})")
    if not isinstance(obj, dict):
        detail = f"expected a JSON object, got {type(obj).__name__}"
        return None, Skip(lineno, "not_an_object", detail)
    if key not in obj:
        keys = ", ".join(sorted(map(str, obj))[:8])
        return None, Skip(lineno, "missing_key", f"no key '{key}' (keys: {keys or 'none'})")
    return obj[key], None


def parse_lines(block: Block, text_key: str) -> tuple[list[tuple[int, object]], list[Skip]]:
    """(line, text) of every usable document, and a Skip for every unusable line."""
    docs: list[tuple[int, object]] = []
    skips: list[Skip] = []
    if block.texts is not None:
        values = enumerate(block.texts, block.first_line)
    else:
        lines = block.data.split(b"\n")
        if lines and not lines[-1]:
            lines.pop()  # the block's trailing newline
        values = enumerate(lines, block.first_line)
    for lineno, value in values:
        if block.texts is None:
            value, skip = _parse_json(lineno, value, text_key)
            if skip is not None:
                skips.append(skip)
                continue
        skip = _check_text(lineno, value, text_key)
        if skip is None:
            docs.append((lineno, value))
        else:
            skips.append(skip)
    return docs, skips


def _drop_unencodable(docs: list[tuple[int, str]], skips: list[Skip]) -> list[tuple[int, str]]:
    """Remove texts sentencepiece cannot take (lone surrogates from JSON ``\\ud800`` escapes)."""
    ok = []
    for lineno, text in docs:
        try:
            for t in [text] if isinstance(text, str) else text:
                bad = t
                t.encode("utf-8")
            ok.append((lineno, text))
        except UnicodeEncodeError as e:
            skips.append(
                Skip(
                    lineno,
                    "invalid_unicode",
                    f"'{bad[e.start]!a}' at character {e.start} is a lone surrogate",
                )
            )
    return ok


def _encode_sentences(w: _Worker, sents: list[list[str]]) -> tuple[list[list[int]], list[int]]:
    """Each document's sentences as its sequences; empty ones dropped (at least one kept)."""
    flat = w.encode(list(chain.from_iterable(sents)))
    seqs, counts, pos = [], [], 0
    for n in map(len, sents):
        doc = [ids for ids in flat[pos : pos + n] if ids] or [[]]
        seqs.extend(doc)
        counts.append(len(doc))
        pos += n
    return seqs, counts


def _encode_documents(
    w: _Worker, docs: list[tuple[int, object]], file_index: int
) -> tuple[list[list[int]], list[int]]:
    """Token sequences (flattened over documents) and the number of sequences per document."""
    texts = [t for _, t in docs]
    listed = any(isinstance(t, list) for t in texts)
    if w.splitter is not None or (listed and w.fim_ids is None):
        split = w.splitter.tokenize if w.splitter is not None else (lambda t: [t])
        sents = [
            t if isinstance(t, list) else [s for s in split(t) if s.strip()] or [t] for t in texts
        ]
        return _encode_sentences(w, sents)
    if w.fim_ids is None:
        return w.encode(texts), [1] * len(texts)
    if not listed:
        return _encode_fim(w, docs, file_index), [1] * len(texts)
    return _encode_mixed_fim(w, docs, file_index)


def _encode_mixed_fim(w: _Worker, docs, file_index: int) -> tuple[list[list[int]], list[int]]:
    """FIM on the string documents, sentences for the list ones, back in input order."""
    strs = [d for d in docs if isinstance(d[1], str)]
    fimmed = iter(_encode_fim(w, strs, file_index))
    listed_seqs, listed_counts = _encode_sentences(w, [t for _, t in docs if isinstance(t, list)])
    seqs, counts, pos, k = [], [], 0, 0
    for _, t in docs:
        if isinstance(t, str):
            seqs.append(next(fimmed))
            counts.append(1)
        else:
            n = listed_counts[k]
            seqs.extend(listed_seqs[pos : pos + n])
            counts.append(n)
            pos, k = pos + n, k + 1
    return seqs, counts


def _encode_fim(w: _Worker, docs: list[tuple[int, str]], file_index: int) -> list[list[int]]:
    o = w.opts
    plans = [
        fim.plan_fim(
            t, fim.document_rng(o.seed, o.file_offset + file_index, line), o.fim_rate,
            o.fim_spm_rate
        )
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
        block.bytes_in,
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
