"""Train a LLaMA-style sentencepiece BPE tokenizer on a sample of JSONL documents.

``python data_prep/train_tokenizer.py --input prose.jsonl --input code/ --model-prefix tok
--vocab-size 32000 [--fim-tokens]`` writes ``tok.model`` and ``tok.meta.json``.

Choices, and why:

* BPE with ``byte_fallback``: any character outside the vocabulary becomes its UTF-8 bytes
  instead of ``<unk>``, so nothing is lost (rare CJK, emoji, binary junk), as in LLaMA.
* ``split_digits``: numbers are tokenized digit by digit, which helps arithmetic.
* identity normalization and no whitespace collapsing: code indentation survives, and
  ``decode(encode(x)) == x``.
* unk/bos/eos/pad = 0/1/2/3; FIM tokens (``--fim-tokens``) and ``--control-symbol``s are control
  symbols: they are never produced from text (a file containing ``<fim_prefix>`` cannot inject
  one), only inserted by id.
* the vocabulary must be a multiple of 64 so the embedding shards evenly and uses tensor cores.
* the sample is drawn per input (each file or directory is one source with an equal share of
  ``--sample-docs``) by seeded reservoir sampling, so small sources are not drowned by large ones
  and the same inputs and seed give the same sample (its sha256 is in the metadata).
"""

import argparse
import hashlib
import random
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data_prep.fim import FIM_PIECES
from data_prep.input_files import expand_inputs
from data_prep.readers import iter_texts
from orchestration.common.files import write_json_atomic

MAX_LINE_CHARS = 4096  # longer lines are cut: sentencepiece skips sentences over its byte limit


@dataclass
class TokenizerMeta:
    """What training produced; written as ``<prefix>.meta.json`` next to the model."""

    model: str
    vocab_size: int
    unk_id: int
    bos_id: int
    eos_id: int
    pad_id: int
    special_tokens: dict[str, int]
    fim_tokens: dict[str, int] | None
    sample_sha256: str
    sample_documents: int
    sample_lines: int
    inputs: list[str]
    options: dict = field(default_factory=dict)


def check_vocab_size(vocab_size: int) -> None:
    if vocab_size <= 0 or vocab_size % 64:
        lo, hi = max(vocab_size // 64 * 64, 64), (vocab_size // 64 + 1) * 64
        raise ValueError(
            f"vocab size {vocab_size} is not a multiple of 64 (the embedding "
            f"is sharded and padded in multiples of 64); use {lo} or {hi}"
        )


def reservoir(items: Iterator[str], k: int, rng: random.Random) -> list[str]:
    """A uniform sample of ``k`` items from a stream of unknown length (Algorithm R)."""
    out: list[str] = []
    for i, item in enumerate(items):
        if i < k:
            out.append(item)
        elif (j := rng.randrange(i + 1)) < k:
            out[j] = item
    return out


def sample_documents(
    inputs: list[str | Path], text_key: str, sample_docs: int, seed: int
) -> list[str]:
    """Documents from each input (a file or directory = one source), equal share each."""
    per_source = max(sample_docs // max(len(inputs), 1), 1)
    docs: list[str] = []
    for i, source in enumerate(inputs):
        texts = (t for f in expand_inputs([source]) for t in iter_texts(f, text_key))
        docs.extend(reservoir(texts, per_source, random.Random(seed * 1000 + i)))
    return docs


def training_lines(docs: list[str]) -> list[str]:
    """Non-empty lines of the documents (indentation kept), cut to ``MAX_LINE_CHARS``."""
    lines = []
    for doc in docs:
        for line in doc.split("\n"):
            line = line.rstrip()
            for i in range(0, len(line), MAX_LINE_CHARS):
                lines.append(line[i : i + MAX_LINE_CHARS])
    return lines


def train_tokenizer(
    inputs: list[str | Path],
    model_prefix: str | Path,
    vocab_size: int,
    text_key: str = "text",
    sample_docs: int = 100_000,
    seed: int = 1234,
    workers: int = 2,
    fim: bool = False,
    control_symbols: tuple[str, ...] = (),
    character_coverage: float = 0.9995,
    input_sentence_size: int = 10_000_000,
    verbose: bool = False,
) -> TokenizerMeta:
    """Sample documents, train the BPE model, and write ``.model`` + ``.meta.json``."""
    import sentencepiece as spm

    check_vocab_size(vocab_size)
    docs = sample_documents(inputs, text_key, sample_docs, seed)
    lines = training_lines(docs)
    if not lines:
        raise ValueError(f"no usable documents with key '{text_key}' in {inputs}")
    sha = hashlib.sha256()
    for line in lines:
        sha.update(line.encode("utf-8") + b"\n")
    controls = [*(FIM_PIECES if fim else ()), *control_symbols]
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)
    options = dict(
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=character_coverage,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=True,
        max_sentence_length=4 * MAX_LINE_CHARS,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        control_symbols=controls,
        num_threads=max(workers, 1),
        minloglevel=0 if verbose else 2,
    )
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_prefix=str(prefix), **options
        )
    except RuntimeError as e:
        raise ValueError(
            f"sentencepiece training failed for vocab size {vocab_size} on "
            f"{len(lines)} lines ({e}); use a smaller vocabulary or more data"
        ) from e
    meta = _metadata(prefix, sha.hexdigest(), len(docs), len(lines), inputs, controls, options)
    write_json_atomic(f"{prefix}.meta.json", asdict(meta), indent=1, sort_keys=False)
    return meta


def _metadata(
    prefix: Path, sha: str, n_docs: int, n_lines: int, inputs, controls: list[str], options: dict
) -> TokenizerMeta:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=f"{prefix}.model")
    special = {sp.id_to_piece(i): i for i in (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id())}
    special.update({c: sp.piece_to_id(c) for c in controls})
    fim_ids = {p: special[p] for p in FIM_PIECES if p in special}
    return TokenizerMeta(
        model=f"{prefix}.model",
        vocab_size=sp.get_piece_size(),
        unk_id=sp.unk_id(),
        bos_id=sp.bos_id(),
        eos_id=sp.eos_id(),
        pad_id=sp.pad_id(),
        special_tokens=special,
        fim_tokens=fim_ids or None,
        sample_sha256=sha,
        sample_documents=n_docs,
        sample_lines=n_lines,
        inputs=[str(i) for i in inputs],
        options={k: v for k, v in options.items() if k not in ("minloglevel", "num_threads")},
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="data_prep/train_tokenizer.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--input",
        action="append",
        required=True,
        help="JSONL file or directory; repeat for several sources",
    )
    p.add_argument("--model-prefix", required=True, help="writes PREFIX.model, PREFIX.meta.json")
    p.add_argument("--vocab-size", type=int, default=32000, help="a multiple of 64")
    p.add_argument("--text-key", default="text")
    p.add_argument("--sample-docs", type=int, default=100_000, help="documents, all sources")
    p.add_argument(
        "--input-sentence-size",
        type=int,
        default=10_000_000,
        help="lines sentencepiece keeps (random subset when there are more)",
    )
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--workers", type=int, default=2, help="sentencepiece training threads")
    p.add_argument("--fim-tokens", action="store_true", help="add " + " ".join(FIM_PIECES))
    p.add_argument("--control-symbol", action="append", default=[], help="extra control token")
    p.add_argument("--verbose", action="store_true", help="show sentencepiece's log")
    a = p.parse_args(argv)
    try:
        meta = train_tokenizer(
            a.input,
            a.model_prefix,
            a.vocab_size,
            a.text_key,
            a.sample_docs,
            a.seed,
            a.workers,
            a.fim_tokens,
            tuple(a.control_symbol),
            a.character_coverage,
            a.input_sentence_size,
            a.verbose,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {meta.model} ({meta.vocab_size} pieces; sample {meta.sample_documents} docs, "
        f"{meta.sample_lines} lines, sha256 {meta.sample_sha256[:12]}); "
        f"special tokens {meta.special_tokens}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
