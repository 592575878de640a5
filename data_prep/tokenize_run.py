"""The library side of ``data_prep/tokenize.py``: plan the outputs, skip those already done,
tokenize the rest, and write a summary next to each output.

The summary of an output is written after its ``.bin/.idx`` and replaces the old one only when
complete (temporary name, then rename), so a killed job keeps every finished output with its
summary: a rerun skips those (:func:`data_prep.shards.stale_reason`) and redoes the rest.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from data_prep.input_files import InputScan, scan_inputs, source_name
from data_prep.pipeline import (
    TokenizeOptions,
    close_pool,
    encode_options,
    make_pool,
    tokenize_files,
)
from data_prep.readers import iter_texts
from data_prep.shards import Shard, file_sha256, shard_files, stale_reason
from data_prep.text_tokenizer import load_text_tokenizer
from data_prep.writer import check_writable, megatron_indexed_dataset
from orchestration.common.files import write_json_atomic

log = logging.getLogger(__name__)
PUNKT_TRAIN_FILES = 16


def output_prefixes(
    files: list[Path], output_prefix: str, text_key: str, level: str, per_source: bool
) -> list[tuple[str, list[Path]]]:
    """(Megatron prefix, its input files) for every output to write."""
    if not per_source:
        return [(f"{output_prefix}_{text_key}_{level}", files)]
    seen: dict[str, Path] = {}
    for f in files:
        name = source_name(f)
        if name in seen:
            raise ValueError(f"--prefix-per-source: {seen[name]} and {f} both map to '{name}'")
        seen[name] = f
    return [(str(Path(output_prefix) / f"{n}_{text_key}_{level}"), [f]) for n, f in seen.items()]


def punkt_for(files: list[Path], text_key: str, params_path: str | None, train_mb: float):
    """Punkt parameters from a local file, or trained on the first MB of the inputs."""
    from data_prep.sentences import load_punkt, train_punkt

    if params_path:
        return load_punkt(params_path)
    step = max(len(files) / PUNKT_TRAIN_FILES, 1.0)  # at most 16 files, spread over the inputs
    picked = list(
        dict.fromkeys(files[int(i * step)] for i in range(min(len(files), PUNKT_TRAIN_FILES)))
    )
    budget = int(train_mb * 1e6 / max(len(picked), 1))
    return train_punkt(t for f in picked for t in iter_texts(f, text_key, budget))


def output_options(opts: TokenizeOptions) -> dict:
    return {
        "text_key": opts.text_key,
        "split_sentences": opts.punkt_params is not None,
        "fim_rate": opts.fim_rate,
        "fim_spm_rate": opts.fim_spm_rate,
        "seed": opts.seed,
        "eos_token": opts.eos_token,
        "file_offset": opts.file_offset,
        "workers": opts.workers,
        "strict": opts.strict,
        "allow_empty": opts.allow_empty,
    }


def _summary(prefix: str, stats, opts: TokenizeOptions, seconds: float, info: dict) -> dict:
    return {
        "output_prefix": prefix,
        **info["facts"],
        "documents": stats.documents,
        "sequences": stats.sequences,
        "tokens": stats.tokens,
        "lines": stats.lines,
        "bytes_in": stats.bytes_in,
        "bytes_out": os.path.getsize(prefix + ".bin"),
        "idx_sha256": file_sha256(prefix + ".idx"),
        "skipped": dict(sorted(stats.skipped.items())),
        "skipped_total": sum(stats.skipped.values()),
        "skipped_examples": sorted(stats.examples, key=lambda e: (e["file"], e["line"])),
        "seconds": round(seconds, 3),
        "documents_per_s": round(stats.documents / max(seconds, 1e-9), 1),
        "tokens_per_s": round(stats.tokens / max(seconds, 1e-9), 1),
        "input_files": stats.per_file,
        "files_without_documents": [f["path"] for f in stats.per_file if not f["documents"]],
        "ignored_inputs": info["ignored"],
        "tokenizer": info["tokenizer"],
        "options": output_options(opts),
    }


def _plan(
    scan: InputScan, output_prefix: str, opts: TokenizeOptions, per_source: bool,
    shard: Shard | None,
) -> tuple[list[tuple[str, list[Path]]], dict]:
    level = "sentence" if opts.punkt_params is not None else "document"
    files, facts = scan.files, {"level": level}
    if shard is not None:
        if per_source:
            raise ValueError("--shard and --prefix-per-source cannot be combined")
        files, opts.file_offset = shard_files(scan.files, shard)
        facts["shard"] = {"index": shard.index, "count": shard.count,
                          "first_file": opts.file_offset, "files": len(files),
                          "job_files": len(scan.files)}
        base = f"{output_prefix}_{opts.text_key}_{level}"
        return [(base + shard.suffix, files)], facts
    return output_prefixes(files, output_prefix, opts.text_key, level, per_source), facts


def run_tokenize(
    inputs: list[str | Path],
    output_prefix: str,
    opts: TokenizeOptions,
    prefix_per_source: bool = False,
    shard: Shard | None = None,
    force: bool = False,
    resume_check: str = "sha256",
) -> list[dict]:
    """Tokenize ``inputs`` (files or directories); return one summary per output prefix.

    Outputs whose summary shows them up to date are not redone (unless ``force``); their
    summary is returned with ``"reused": True``."""
    scan = scan_inputs(inputs)
    tok = load_text_tokenizer(opts.tokenizer_model, opts.eos_token)
    plan, facts = _plan(scan, output_prefix, opts, prefix_per_source, shard)
    enc = encode_options(opts, tok.vocab_size)
    facts["dtype"] = enc.dtype
    tok_sha = file_sha256(opts.tokenizer_model)
    info = {"facts": facts, "ignored": scan.ignored, "tokenizer": {
        "path": str(opts.tokenizer_model), "kind": tok.kind, "sha256": tok_sha,
        "vocab_size": tok.vocab_size, "eos_id": tok.eos_id}}
    todo, summaries = [], []
    for prefix, group in plan:
        check_writable(prefix)
        why = "--force" if force else stale_reason(
            prefix, group, tok_sha, output_options(opts), resume_check)
        if why is None:
            summaries.append(_reused(prefix))
        else:
            log.info("%s: tokenizing (%s)", prefix, why)
            todo.append((prefix, group))
    if todo:
        summaries += _tokenize_all(todo, opts, enc, info)
    return sorted(summaries, key=lambda s: [p for p, _ in plan].index(s["output_prefix"]))


def _reused(prefix: str) -> dict:
    import json

    s = json.loads(Path(prefix + ".summary.json").read_text(encoding="utf-8"))
    return {**s, "reused": True}


def _tokenize_all(todo: list, opts: TokenizeOptions, enc, info: dict) -> list[dict]:
    megatron_indexed_dataset()  # import (several seconds) before the clock and the pool start
    pool = make_pool(enc, opts.workers, opts.start_method)
    out, ok = [], False
    try:
        for prefix, group in todo:
            t0 = time.perf_counter()
            stats = tokenize_files(group, prefix, opts, pool, enc.dtype)
            summary = _summary(prefix, stats, opts, time.perf_counter() - t0, info)
            write_json_atomic(prefix + ".summary.json", summary, indent=1, sort_keys=False)
            out.append(summary)
        ok = True
    finally:
        close_pool(pool, ok)
    return out
