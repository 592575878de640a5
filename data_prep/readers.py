"""One reader per input format: JSONL (any compression), Parquet and Arrow, all as ``Block``s.

FineWeb, RefinedWeb and most Hugging Face datasets ship as Parquet (or Arrow, which is what
``datasets`` caches). Their text column (``--text-key``) is read in record batches with
``pyarrow``; a block carries the column's values (``Block.texts``) instead of raw JSONL bytes,
and the worker validates them with the same rules and skip reasons as JSONL lines (a row
number stands in for the line number). A file without the column, or one pyarrow cannot read
(a truncated download), is reported as a ``ReadFailure`` like a broken compressed stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from data_prep.input_files import input_format
from data_prep.jsonl_io import Block, JsonlReader, ReadFailure

ROWS_PER_BATCH = 1024


def _file_sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class ColumnarReader:
    """Blocks of the ``text_key`` column of a Parquet or Arrow (IPC file or stream) file."""

    def __init__(self, path: Path, file_index: int, text_key: str, kind: str) -> None:
        self.path, self.file_index, self.text_key, self.kind = path, file_index, text_key, kind
        self.sha256: str | None = None
        self._rows_done = 0
        self._rows_total = 0

    @property
    def position(self) -> int:
        size = self.path.stat().st_size
        return size * self._rows_done // self._rows_total if self._rows_total else 0

    def _batches(self) -> Iterator:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.kind == "parquet":
            pf = pq.ParquetFile(self.path)
            self._check_column(pf.schema_arrow.names)
            self._rows_total = pf.metadata.num_rows
            yield from pf.iter_batches(batch_size=ROWS_PER_BATCH, columns=[self.text_key])
            return
        source = pa.memory_map(str(self.path))
        try:
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_stream(source)
            batches = iter(reader)
        self._check_column(reader.schema.names)
        yield from batches

    def _check_column(self, names: list[str]) -> None:
        if self.text_key not in names:
            shown = ", ".join(names[:8]) or "none"
            raise KeyError(f"no column '{self.text_key}' (columns: {shown}); pass --text-key")

    def blocks(self, block_bytes: int = 1 << 20) -> Iterator[Block | ReadFailure]:
        import pyarrow as pa

        texts: list = []
        size, first = 0, 1
        try:
            for batch in self._batches():
                values = batch.column(self.text_key).to_pylist()
                texts += values
                size += sum(len(v) for v in values if isinstance(v, str))
                self._rows_done += len(values)
                if size >= block_bytes:
                    yield Block(self.file_index, first, b"", texts, size)
                    first, texts, size = first + len(texts), [], 0
        except KeyError as e:
            yield ReadFailure(self.file_index, first, "missing_key", str(e.args[0]))
        except (pa.ArrowException, OSError) as e:
            if texts:
                yield Block(self.file_index, first, b"", texts, size)
            detail = f"{self.kind} file unreadable after row {first + len(texts) - 1} ({e})"
            yield ReadFailure(self.file_index, first + len(texts), "corrupt_input", detail)
        else:
            if texts:
                yield Block(self.file_index, first, b"", texts, size)
        self.sha256 = _file_sha256(self.path)


def open_reader(path: Path, file_index: int, text_key: str) -> JsonlReader | ColumnarReader:
    kind = input_format(path)
    if kind == "jsonl":
        return JsonlReader(path, file_index)
    return ColumnarReader(path, file_index, text_key, kind)


def iter_texts(path: Path, text_key: str, limit_bytes: int | None = None) -> Iterator[str]:
    """Valid, non-empty documents of one file, skipping bad lines silently (for sampling).

    A list-of-sentences document is joined with spaces."""
    import json

    total = 0
    for block in open_reader(path, 0, text_key).blocks():
        if isinstance(block, ReadFailure):
            return
        if block.texts is not None:
            values = block.texts
        else:
            values = []
            for raw in block.data.split(b"\n"):
                try:
                    values.append(json.loads(raw).get(text_key))
                except (ValueError, AttributeError):
                    continue
        for text in values:
            if isinstance(text, list) and all(isinstance(t, str) for t in text):
                text = " ".join(text)
            if isinstance(text, str) and text.strip():
                yield text
                total += len(text)
                if limit_bytes is not None and total >= limit_bytes:
                    return
