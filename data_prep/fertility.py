"""Tokenizer report: fertility and compression per source.

``python data_prep/fertility.py --tokenizer tok.model web.jsonl code.jsonl.zst name=math.jsonl
[--max-docs N] [--json report.json]``

* fertility = sentencepiece tokens per whitespace-separated word (lower is better; English
  prose is typically 1.2-1.5 with a 32k vocabulary, code and math run higher),
* bytes per token = UTF-8 bytes / tokens (the compression the model sees per position),
* byte-fallback share = tokens that are raw ``<0x..>`` bytes of characters the vocabulary lacks
  (tab, newline and carriage return are left out: LLaMA-style vocabularies always encode
  them as bytes, so they would swamp the signal).

A source is one JSONL file (plain, .gz or .zst), named by ``name=path`` or after the file.
"""

import argparse
import sys
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path

from data_prep.input_files import source_name
from data_prep.readers import iter_texts
from orchestration.common.files import write_json_atomic


@dataclass
class SourceReport:
    source: str
    path: str
    documents: int
    words: int
    tokens: int
    bytes: int
    byte_fallback_tokens: int

    @property
    def fertility(self) -> float:
        return self.tokens / self.words if self.words else 0.0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else 0.0

    @property
    def byte_fallback_share(self) -> float:
        return self.byte_fallback_tokens / self.tokens if self.tokens else 0.0

    def as_dict(self) -> dict:
        return {
            **asdict(self),
            "fertility": round(self.fertility, 4),
            "bytes_per_token": round(self.bytes_per_token, 4),
            "byte_fallback_share": round(self.byte_fallback_share, 6),
        }


def measure(
    sp, name: str, path: Path, text_key: str = "text", max_docs: int | None = None, batch: int = 256
) -> SourceReport:
    """Encode up to ``max_docs`` documents of one source and count words, tokens and bytes."""
    layout = {"<0x09>", "<0x0A>", "<0x0D>"}
    byte_ids = {
        i for i in range(sp.get_piece_size()) if sp.is_byte(i) and sp.id_to_piece(i) not in layout
    }
    report = SourceReport(name, str(path), 0, 0, 0, 0, 0)
    texts = iter_texts(path, text_key)
    if max_docs is not None:
        texts = islice(texts, max_docs)
    while chunk := list(islice(texts, batch)):
        for text, ids in zip(chunk, sp.encode(chunk, num_threads=1), strict=True):
            report.documents += 1
            report.words += len(text.split())
            report.bytes += len(text.encode("utf-8"))
            report.tokens += len(ids)
            report.byte_fallback_tokens += sum(i in byte_ids for i in ids)
    return report


def fertility_report(
    tokenizer_model: str,
    sources: dict[str, Path],
    text_key: str = "text",
    max_docs: int | None = None,
) -> list[SourceReport]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    return [measure(sp, name, path, text_key, max_docs) for name, path in sources.items()]


def format_report(reports: list[SourceReport]) -> str:
    width = max([len(r.source) for r in reports] + [6])
    head = (
        f"{'source':<{width}}  {'docs':>8}  {'words':>11}  {'tokens':>11}  "
        f"{'fertility':>9}  {'bytes/tok':>9}  {'byte-fb':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in reports:
        lines.append(
            f"{r.source:<{width}}  {r.documents:>8,}  {r.words:>11,}  {r.tokens:>11,}  "
            f"{r.fertility:>9.3f}  {r.bytes_per_token:>9.3f}  "
            f"{100 * r.byte_fallback_share:>6.2f}%"
        )
    return "\n".join(lines)


def parse_sources(specs: list[str]) -> dict[str, Path]:
    sources: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        p = Path(path if sep else spec)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such file")
        sources[name if sep else source_name(p)] = p
    return sources


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="data_prep/fertility.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("sources", nargs="+", help="JSONL file or name=file, one per source")
    ap.add_argument("--tokenizer", required=True, help="sentencepiece .model")
    ap.add_argument("--text-key", default="text")
    ap.add_argument("--max-docs", type=int, help="documents per source (default: all)")
    ap.add_argument("--json", help="also write the report to this JSON file")
    a = ap.parse_args(argv)
    try:
        reports = fertility_report(a.tokenizer, parse_sources(a.sources), a.text_key, a.max_docs)
    except (FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(reports))
    if a.json:
        write_json_atomic(a.json, [r.as_dict() for r in reports], indent=1, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
