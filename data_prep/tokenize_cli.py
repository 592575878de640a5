"""Command line and library entry of the JSONL tokenizer (``data_prep/tokenize.py``).

Output naming follows Megatron-LM's ``preprocess_data.py`` so existing recipes keep working:
``--output-prefix P`` writes ``P_<text-key>_document.bin/.idx`` (``_sentence`` with
``--split-sentences``). With ``--prefix-per-source``, ``P`` is a directory and each input file
``F`` gets ``P/<name of F>_<text-key>_<level>``. A ``.summary.json`` lands next to each output.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from data_prep.input_files import expand_inputs
from data_prep.pipeline import BadInputError, EmptyOutputError, TokenizeOptions
from data_prep.shards import parse_shard
from data_prep.text_tokenizer import TokenizerError
from data_prep.tokenize_run import output_prefixes, punkt_for, run_tokenize  # noqa: F401
from data_prep.writer import OutputError

#: Exit codes: what went wrong, for a job script to act on (2 is argparse's own).
EXIT_BAD_ARGS = 2  # a bad option, a missing input, an unusable tokenizer file
EXIT_BAD_DATA = 3  # --strict hit an unusable line, or an output would be empty
EXIT_OUTPUT = 4  # the output cannot be written (permissions, not a directory, disk full)


def _report(s: dict) -> str:
    line = (
        f"{s['output_prefix']}.{{bin,idx}}: {s['documents']:,} documents, "
        f"{s['tokens']:,} tokens in {s['seconds']:.1f} s "
        f"({s['documents_per_s']:,.0f} docs/s, {s['tokens_per_s']:,.0f} tok/s)"
    )
    if s.get("reused"):
        return f"{s['output_prefix']}.{{bin,idx}}: up to date ({s['documents']:,} documents)"
    if s["skipped_total"]:
        reasons = ", ".join(f"{k}: {v}" for k, v in s["skipped"].items())
        line += f"\n  skipped {s['skipped_total']} line(s) ({reasons}); first ones:"
        for e in s["skipped_examples"][:10]:
            line += f"\n    {e['file']}:{e['line']}: {e['reason']}: {e['detail']}"
    if s["files_without_documents"]:
        n = len(s["files_without_documents"])
        line += f"\n  warning: {n} input file(s) gave no document, e.g. " + \
            s["files_without_documents"][0]
    if s["ignored_inputs"]:
        line += f"\n  ignored {len(s['ignored_inputs'])} file(s) below the input directories " \
            f"(listed in the summary), e.g. {s['ignored_inputs'][0]['path']}"
    return line


def _shard_arg(text: str):
    try:
        return parse_shard(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"--shard {text!r}: ")) from e


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="data_prep/tokenize.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "inputs", nargs="+",
        help="JSONL (.jsonl/.json/.ndjson, also .gz/.zst/.bz2/.xz), .parquet, .arrow, or dirs",
    )
    p.add_argument(
        "--tokenizer-model", required=True,
        help="sentencepiece .model, or a Hugging Face tokenizer.json",
    )
    p.add_argument("--eos-token", help="tokenizer.json: the end-of-document token")
    p.add_argument("--output-prefix", required=True)
    p.add_argument(
        "--prefix-per-source",
        action="store_true",
        help="one output per input file, under the --output-prefix directory",
    )
    p.add_argument(
        "--text-key", default="text",
        help="JSON key (or Parquet/Arrow column) holding the text: a string or list of sentences",
    )
    p.add_argument("--shard", type=_shard_arg, metavar="I/N",
                   help="tokenize only shard I of N (1-based) into <prefix>-shard-I-of-N")
    p.add_argument("--force", action="store_true", help="redo outputs that are up to date")
    p.add_argument(
        "--resume-check", choices=("sha256", "size"), default="sha256",
        help="an output is up to date if its inputs' sha256 (or size and mtime) match",
    )
    p.add_argument("--allow-empty", action="store_true",
                   help="accept an output with no document (an error by default)")
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
        eos_token=a.eos_token,
        allow_empty=a.allow_empty,
    )


def _exit_on_sigterm(signum, frame) -> None:
    sys.exit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # SIGTERM (scancel, the time limit) and SIGUSR1 (SLURM's warning before it) exit through
    # the normal clean-up, so temporary files go away.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    previous_usr1 = signal.signal(signal.SIGUSR1, _exit_on_sigterm)
    try:
        opts = _options(args, parser)
        summaries = run_tokenize(
            args.inputs, args.output_prefix, opts, args.prefix_per_source, args.shard,
            args.force, args.resume_check,
        )
    except BadInputError as e:
        return _fail(f"{e} (--strict)", EXIT_BAD_DATA)
    except EmptyOutputError as e:
        return _fail(str(e), EXIT_BAD_DATA)
    except OutputError as e:
        return _fail(str(e), EXIT_OUTPUT)
    except (TokenizerError, FileNotFoundError, ValueError) as e:
        return _fail(str(e), EXIT_BAD_ARGS)
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGUSR1, previous_usr1)
    for s in summaries:
        print(_report(s))
    return 0


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
