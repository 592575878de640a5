"""Streaming JSONL input: plain, gzip and zstd files, read as line-aligned byte blocks.

The tokenizer's parent process does nothing but this, so it must stay cheap: blocks are large
(about 1 MiB), split on the last newline so every worker gets whole lines, and carry the number
of their first line so workers can report bad input as ``file:line``. Parsing happens in the
workers. Compression is detected from the magic bytes, not the suffix, and a truncated
compressed stream is reported (with the line where it broke) instead of silently ending early.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

INPUT_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_READ_BYTES = 1 << 17


@dataclass
class Block:
    """Whole lines of one input file; ``first_line`` is 1-based."""

    file_index: int
    first_line: int
    data: bytes

    @property
    def n_lines(self) -> int:
        return self.data.count(b"\n") + (0 if self.data.endswith(b"\n") or not self.data else 1)


@dataclass
class ReadFailure:
    """The input ended abnormally (truncated or corrupt compressed stream) at ``line``."""

    file_index: int
    line: int
    reason: str
    detail: str


class CorruptInput(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def expand_inputs(paths: list[str | Path]) -> list[Path]:
    """Files as given plus, for directories, every JSONL file below them (sorted)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*") if f.is_file() and f.name.endswith(INPUT_SUFFIXES)
            )
            if not found:
                raise FileNotFoundError(f"{p}: directory has no {'/'.join(INPUT_SUFFIXES)} files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such input file or directory")
    return files


def source_name(path: Path) -> str:
    """``wiki/part-0001.jsonl.zst`` -> ``part-0001``: the file name without JSONL suffixes."""
    name = path.name
    for suffix in sorted(INPUT_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _gzip_chunks(raw: BinaryIO) -> Iterator[bytes]:
    stream = gzip.GzipFile(fileobj=raw, mode="rb")
    try:
        while chunk := stream.read1(_READ_BYTES):
            yield chunk
    except EOFError as e:
        raise CorruptInput("truncated_input", f"gzip stream ended early ({e})") from e
    except (gzip.BadGzipFile, zlib.error) as e:
        raise CorruptInput("corrupt_input", f"gzip data is corrupt ({e})") from e


def _zstd_chunks(raw: BinaryIO) -> Iterator[bytes]:
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    frame = None  # the frame being decoded; None between frames
    try:
        while data := raw.read(_READ_BYTES):
            while data:
                frame = frame or dctx.decompressobj()
                if out := frame.decompress(data):
                    yield out
                data, frame = (frame.unused_data, None) if frame.eof else (b"", frame)
    except zstandard.ZstdError as e:
        raise CorruptInput("corrupt_input", f"zstd data is corrupt ({e})") from e
    if frame is not None:
        raise CorruptInput("truncated_input", "zstd stream ended in the middle of a frame")


def _plain_chunks(raw: BinaryIO) -> Iterator[bytes]:
    while chunk := raw.read(_READ_BYTES):
        yield chunk


class JsonlReader:
    """Line-aligned blocks of one (possibly compressed) JSONL file.

    ``position`` is the offset in the file on disk (compressed bytes), for progress bars.
    """

    def __init__(self, path: Path, file_index: int = 0) -> None:
        self.path = path
        self.file_index = file_index
        self._raw: BinaryIO | None = None

    @property
    def position(self) -> int:
        return self._raw.tell() if self._raw is not None and not self._raw.closed else 0

    def _chunks(self, raw: BinaryIO) -> Iterator[bytes]:
        magic = raw.read(4)
        raw.seek(0)
        if magic.startswith(_GZIP_MAGIC):
            return _gzip_chunks(raw)
        if magic == _ZSTD_MAGIC:
            return _zstd_chunks(raw)
        return _plain_chunks(raw)

    def blocks(self, block_bytes: int = 1 << 20) -> Iterator[Block | ReadFailure]:
        """Yield blocks of whole lines; a ``ReadFailure`` last if the stream broke off."""
        line = 1
        pending = bytearray()
        with open(self.path, "rb") as raw:
            self._raw = raw
            try:
                for chunk in self._chunks(raw):
                    pending += chunk
                    if len(pending) >= block_bytes and (cut := pending.rfind(b"\n") + 1):
                        block = Block(self.file_index, line, bytes(pending[:cut]))
                        del pending[:cut]
                        line += block.n_lines
                        yield block
            except CorruptInput as e:
                cut = pending.rfind(b"\n") + 1
                if cut:
                    yield Block(self.file_index, line, bytes(pending[:cut]))
                    line += pending[:cut].count(b"\n")
                lost = len(pending) - cut
                yield ReadFailure(
                    self.file_index,
                    line,
                    e.reason,
                    f"{e.detail}; {lost} bytes of a partial line dropped",
                )
                return
            if pending:
                yield Block(self.file_index, line, bytes(pending))


def iter_texts(path: Path, text_key: str, limit_bytes: int | None = None) -> Iterator[str]:
    """Valid, non-empty documents of one file, skipping bad lines silently (for sampling)."""
    import json

    total = 0
    for block in JsonlReader(path).blocks():
        if isinstance(block, ReadFailure):
            return
        for raw in block.data.split(b"\n"):
            try:
                text = json.loads(raw).get(text_key)
            except (ValueError, AttributeError):
                continue
            if isinstance(text, str) and text.strip():
                yield text
                total += len(text)
                if limit_bytes is not None and total >= limit_bytes:
                    return
