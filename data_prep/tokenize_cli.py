"""Command line and library entry of the JSONL tokenizer (``data_prep/tokenize.py``).

Output naming follows Megatron-LM's ``preprocess_data.py`` so existing recipes keep working:
``--output-prefix P`` writes ``P_<text-key>_document.bin/.idx`` (``_sentence`` with
``--split-sentences``). With ``--prefix-per-source``, ``P`` is a directory and each input file
``F`` gets ``P/<name of F>_<text-key>_<level>``. A ``.summary.json`` lands next to each output.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from data_prep.jsonl_io import expand_inputs, iter_texts, source_name
from data_prep.pipeline import (
    BadInputError,
    TokenizeOptions,
    close_pool,
    encode_options,
    file_sha256,
    make_pool,
    tokenize_files,
)
from data_prep.writer import megatron_indexed_dataset

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


def _summary(
    prefix: str,
    stats,
    opts: TokenizeOptions,
    seconds: float,
    tok_sha: str,
    vocab: int,
    dtype: str,
    level: str,
) -> dict:
    return {
        "output_prefix": prefix,
        "dtype": dtype,
        "level": level,
        "documents": stats.documents,
        "sequences": stats.sequences,
        "tokens": stats.tokens,
        "lines": stats.lines,
        "bytes_in": stats.bytes_in,
        "bytes_out": os.path.getsize(prefix + ".bin"),
        "skipped": dict(sorted(stats.skipped.items())),
        "skipped_total": sum(stats.skipped.values()),
        "skipped_examples": sorted(stats.examples, key=lambda e: (e["file"], e["line"])),
        "seconds": round(seconds, 3),
        "documents_per_s": round(stats.documents / max(seconds, 1e-9), 1),
        "tokens_per_s": round(stats.tokens / max(seconds, 1e-9), 1),
        "input_files": stats.per_file,
        "tokenizer": {"path": str(opts.tokenizer_model), "sha256": tok_sha, "vocab_size": vocab},
        "options": {
            "text_key": opts.text_key,
            "split_sentences": opts.punkt_params is not None,
            "fim_rate": opts.fim_rate,
            "fim_spm_rate": opts.fim_spm_rate,
            "seed": opts.seed,
            "workers": opts.workers,
            "strict": opts.strict,
        },
    }


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    Path(tmp).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def run_tokenize(
    inputs: list[str | Path],
    output_prefix: str,
    opts: TokenizeOptions,
    prefix_per_source: bool = False,
) -> list[dict]:
    """Tokenize ``inputs`` (files or directories); return one summary per output prefix."""
    import sentencepiece as spm

    files = expand_inputs(inputs)
    level = "sentence" if opts.punkt_params is not None else "document"
    plan = output_prefixes(files, output_prefix, opts.text_key, level, prefix_per_source)
    vocab = spm.SentencePieceProcessor(model_file=str(opts.tokenizer_model)).get_piece_size()
    enc = encode_options(opts, vocab)
    tok_sha = file_sha256(opts.tokenizer_model)
    megatron_indexed_dataset()  # import (several seconds) before the clock and the pool start
    summaries = []
    pool = make_pool(enc, opts.workers, opts.start_method)
    ok = False
    try:
        for prefix, group in plan:
            Path(prefix + ".summary.json").unlink(missing_ok=True)
            t0 = time.perf_counter()
            stats = tokenize_files(group, prefix, opts, pool, enc.dtype)
            summary = _summary(
                prefix, stats, opts, time.perf_counter() - t0, tok_sha, vocab, enc.dtype, level
            )
            _write_json(prefix + ".summary.json", summary)
            summaries.append(summary)
        ok = True
    finally:
        close_pool(pool, ok)
    return summaries


def _report(s: dict) -> str:
    line = (
        f"{s['output_prefix']}.{{bin,idx}}: {s['documents']:,} documents, "
        f"{s['tokens']:,} tokens in {s['seconds']:.1f} s "
        f"({s['documents_per_s']:,.0f} docs/s, {s['tokens_per_s']:,.0f} tok/s)"
    )
    if s["skipped_total"]:
        reasons = ", ".join(f"{k}: {v}" for k, v in s["skipped"].items())
        line += f"\n  skipped {s['skipped_total']} line(s) ({reasons}); first ones:"
        for e in s["skipped_examples"][:10]:
            line += f"\n    {e['file']}:{e['line']}: {e['reason']}: {e['detail']}"
    return line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="data_prep/tokenize.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", help="JSONL files (.jsonl, .jsonl.gz, .jsonl.zst) or dirs")
    p.add_argument("--tokenizer-model", required=True, help="sentencepiece .model file")
    p.add_argument("--output-prefix", required=True)
    p.add_argument(
        "--prefix-per-source",
        action="store_true",
        help="one output per input file, under the --output-prefix directory",
    )
    p.add_argument("--text-key", default="text", help="JSON key holding the document text")
    p.add_argument("--workers", type=int, default=2, help="tokenizer processes (0: in-process)")
    p.add_argument("--block-mb", type=float, default=1.0, help="input block size per task")
    p.add_argument(
        "--split-sentences",
        action="store_true",
        help="one sequence per sentence (NLTK Punkt), documents kept together",
    )
    p.add_argument("--punkt-params", help="local Punkt model (.json, .pickle, punkt_tab dir)")
    p.add_argument(
        "--punkt-train-mb",
        type=float,
        default=10.0,
        help="without --punkt-params: train Punkt on this many MB of the input",
    )
    p.add_argument("--punkt-save", help="write the Punkt parameters used to this JSON file")
    p.add_argument("--fim-rate", type=float, default=0.0, help="fraction of documents FIM'd")
    p.add_argument("--fim-spm-rate", type=float, default=0.5, help="of those, fraction in SPM")
    p.add_argument("--seed", type=int, default=1234, help="seed of the per-document FIM draws")
    p.add_argument("--strict", action="store_true", help="fail on the first unusable line")
    p.add_argument("--no-progress", action="store_true")
    return p


def _options(a: argparse.Namespace, parser: argparse.ArgumentParser) -> TokenizeOptions:
    if not 0 <= a.fim_rate <= 1 or not 0 <= a.fim_spm_rate <= 1:
        parser.error("--fim-rate and --fim-spm-rate must be within [0, 1]")
    if a.fim_rate > 0 and a.split_sentences:
        parser.error("--fim-rate and --split-sentences cannot be combined")
    if not Path(a.tokenizer_model).is_file():
        parser.error(f"--tokenizer-model: no such file: {a.tokenizer_model}")
    punkt = None
    if a.split_sentences:
        punkt = punkt_for(expand_inputs(a.inputs), a.text_key, a.punkt_params, a.punkt_train_mb)
        if a.punkt_save:
            from data_prep.sentences import save_punkt

            save_punkt(punkt, a.punkt_save)
    return TokenizeOptions(
        tokenizer_model=a.tokenizer_model,
        text_key=a.text_key,
        workers=a.workers,
        block_bytes=max(int(a.block_mb * (1 << 20)), 1),
        strict=a.strict,
        progress=not a.no_progress,
        punkt_params=punkt,
        fim_rate=a.fim_rate,
        fim_spm_rate=a.fim_spm_rate,
        seed=a.seed,
    )


def _exit_on_sigterm(signum, frame) -> None:
    sys.exit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so temporary files go away
    try:
        opts = _options(args, parser)
        summaries = run_tokenize(args.inputs, args.output_prefix, opts, args.prefix_per_source)
    except BadInputError as e:
        print(f"error: {e} (--strict)", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    for s in summaries:
        print(_report(s))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
