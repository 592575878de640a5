"""Streaming JSONL input: plain, gzip, zstd, bzip2 and xz files, read as line-aligned blocks.

The tokenizer's parent process does nothing but this, so it must stay cheap: blocks are large
(about 1 MiB), split on the last newline so every worker gets whole lines, and carry the number
of their first line so workers can report bad input as ``file:line``. Parsing happens in the
workers. Compression is detected from the magic bytes, not the suffix, and a truncated
compressed stream is reported (with the line where it broke, and how much was lost) instead of
silently ending early. A UTF-8 byte-order mark at the start of a file is dropped, not taken for
part of line 1. The raw bytes are hashed as they are read (the summary's per-file sha256,
which a rerun compares to decide a shard is done), so inputs are read once.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_BZ2_MAGIC = b"BZh"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_BOM = b"\xef\xbb\xbf"
_READ_BYTES = 1 << 17


@dataclass
class Block:
    """Whole lines of one input file; ``first_line`` is 1-based."""

    file_index: int
    first_line: int
    data: bytes
    texts: list | None = None  # columnar input: the text column's values, one per row
    text_bytes: int = 0  # columnar input: characters of text in ``texts``

    @property
    def bytes_in(self) -> int:
        return len(self.data) if self.texts is None else self.text_bytes

    @property
    def n_lines(self) -> int:
        if self.texts is not None:
            return len(self.texts)
        return self.data.count(b"\n") + (0 if self.data.endswith(b"\n") or not self.data else 1)


@dataclass
class ReadFailure:
    """The input ended abnormally (truncated or corrupt compressed stream) at ``line``."""

    file_index: int
    line: int
    reason: str
    detail: str


class CorruptInput(Exception):
    """A compressed stream that broke off (``truncated_input``) or is damaged."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class _HashingFile:
    """A raw file whose bytes are hashed as the decompressor reads them."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.mode = "rb"

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha256.update(data)
        return data

    def tell(self) -> int:
        return self.raw.tell()

    def finish(self) -> str:
        """Hash the rest (a decompressor may stop before the end) and return the digest."""
        while self.read(1 << 20):
            pass
        return self.sha256.hexdigest()


def _gzip_chunks(raw: _HashingFile) -> Iterator[bytes]:
    stream = gzip.GzipFile(fileobj=raw, mode="rb")
    decoded = 0
    try:
        while chunk := stream.read1(_READ_BYTES):
            decoded += len(chunk)
            yield chunk
    except EOFError as e:
        raise CorruptInput(
            "truncated_input",
            f"gzip stream ended early ({e}) at compressed byte {raw.tell():,} after "
            f"{decoded:,} bytes of text; the rest of the file is lost",
        ) from e
    except (gzip.BadGzipFile, zlib.error) as e:
        raise CorruptInput("corrupt_input", f"gzip data is corrupt ({e})") from e


def _zstd_frame_size(header: bytes) -> int | None:
    import zstandard

    try:
        size = zstandard.get_frame_parameters(header).content_size
    except zstandard.ZstdError:
        return None
    return None if size in (0, zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR) else size


def _zstd_lost(start: int, end: int, header: bytes, decoded: int) -> str:
    """What a frame cut off at ``end`` lost: zstd emits a frame's text only as it completes."""
    declared = _zstd_frame_size(header)
    where = f"the frame at compressed bytes {start:,}-{end:,} of the file"
    if declared is None:
        return f"{where} decoded {decoded:,} bytes; the rest of it (size not recorded) is lost"
    return (
        f"{where} declared {declared:,} bytes of text and decoded {decoded:,}: "
        f"{declared - decoded:,} bytes of text lost"
    )


def _zstd_chunks(raw: _HashingFile) -> Iterator[bytes]:
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    frame = None  # the frame being decoded; None between frames
    start = fed = decoded = 0
    header = b""
    try:
        while data := raw.read(_READ_BYTES):
            fed += len(data)
            while data:
                if frame is None:
                    frame, header, decoded = dctx.decompressobj(), data[:18], 0
                    start = fed - len(data)
                if out := frame.decompress(data):
                    decoded += len(out)
                    yield out
                data, frame = (frame.unused_data, None) if frame.eof else (b"", frame)
    except zstandard.ZstdError as e:
        raise CorruptInput("corrupt_input", f"zstd data is corrupt ({e})") from e
    if frame is not None:
        raise CorruptInput(
            "truncated_input",
            "zstd stream ended in the middle of a frame; " + _zstd_lost(start, fed, header, decoded),
        )


def _stream_chunks(raw: _HashingFile, make, kind: str, errors: tuple) -> Iterator[bytes]:
    """bzip2 / xz, including files of several concatenated streams (pbzip2, pixz)."""
    dec, decoded = make(), 0
    try:
        while data := raw.read(_READ_BYTES):
            while data:
                if dec.eof:
                    dec = make()
                out = dec.decompress(data)
                data = dec.unused_data if dec.eof else b""
                if out:
                    decoded += len(out)
                    yield out
    except errors as e:
        raise CorruptInput("corrupt_input", f"{kind} data is corrupt ({e})") from e
    if not dec.eof:
        raise CorruptInput(
            "truncated_input",
            f"{kind} stream ended before its end marker at compressed byte {raw.tell():,} after "
            f"{decoded:,} bytes of text; the block being decoded is lost",
        )


def _plain_chunks(raw: _HashingFile) -> Iterator[bytes]:
    while chunk := raw.read(_READ_BYTES):
        yield chunk


def _chunks(raw: _HashingFile, magic: bytes) -> Iterator[bytes]:
    if magic.startswith(_GZIP_MAGIC):
        return _gzip_chunks(raw)
    if magic.startswith(_ZSTD_MAGIC):
        return _zstd_chunks(raw)
    if magic.startswith(_BZ2_MAGIC):
        return _stream_chunks(raw, bz2.BZ2Decompressor, "bzip2", (OSError, ValueError))
    if magic.startswith(_XZ_MAGIC):
        return _stream_chunks(raw, lzma.LZMADecompressor, "xz", (lzma.LZMAError,))
    return _plain_chunks(raw)


def _without_bom(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Drop a UTF-8 byte-order mark at the very start (Windows editors write one)."""
    head = b""
    for chunk in chunks:
        head += chunk
        if len(head) >= len(_BOM):
            break
    else:
        if head:
            yield head[len(_BOM) :] if head.startswith(_BOM) else head
        return
    yield head[len(_BOM) :] if head.startswith(_BOM) else head
    yield from chunks


class JsonlReader:
    """Line-aligned blocks of one (possibly compressed) JSONL file.

    ``position`` is the offset in the file on disk (compressed bytes), for progress bars;
    ``sha256`` is the digest of the file on disk once :meth:`blocks` is exhausted.
    """

    def __init__(self, path: Path, file_index: int = 0) -> None:
        self.path = path
        self.file_index = file_index
        self._raw: BinaryIO | None = None
        self.sha256: str | None = None

    @property
    def position(self) -> int:
        return self._raw.tell() if self._raw is not None and not self._raw.closed else 0

    def blocks(self, block_bytes: int = 1 << 20) -> Iterator[Block | ReadFailure]:
        """Yield blocks of whole lines; a ``ReadFailure`` last if the stream broke off."""
        line = 1
        pending = bytearray()
        with open(self.path, "rb") as raw:
            self._raw = raw
            magic = raw.read(6)
            raw.seek(0)
            hashed = _HashingFile(raw)
            try:
                for chunk in _without_bom(_chunks(hashed, magic)):
                    pending += chunk
                    if len(pending) >= block_bytes and (cut := pending.rfind(b"\n") + 1):
                        block = Block(self.file_index, line, bytes(pending[:cut]))
                        del pending[:cut]
                        line += block.n_lines
                        yield block
            except CorruptInput as e:
                yield from self._broken(e, pending, line)
                self.sha256 = hashed.finish()
                return
            if pending:
                yield Block(self.file_index, line, bytes(pending))
            self.sha256 = hashed.finish()

    def _broken(self, e: CorruptInput, pending: bytearray, line: int) -> Iterator:
        cut = pending.rfind(b"\n") + 1
        if cut:
            yield Block(self.file_index, line, bytes(pending[:cut]))
            line += pending[:cut].count(b"\n")
        lost = len(pending) - cut
        tail = f"; plus {lost:,} bytes of a partial line" if lost else ""
        yield ReadFailure(self.file_index, line, e.reason, f"{e.detail}{tail}")
