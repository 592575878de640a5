"""Crash-safe writing of a Megatron ``.bin``/``.idx`` pair.

Output goes to ``<prefix>.tmp-<pid>.bin/.idx`` and is renamed into place only when complete:
first any old ``<prefix>.idx`` is removed, then ``.bin`` is renamed, and ``.idx`` last. Megatron
needs both files, so at every instant an interrupted run leaves either the previous complete
pair, or a ``.bin`` without an ``.idx`` -- never a valid-looking pair of mismatched files.
Temporary files of a failed run are removed on error, and those left by a killed process are
removed by the next run for the same prefix.

``BulkIndexedDatasetBuilder`` is Megatron's ``IndexedDatasetBuilder`` with compact index storage
(``array`` instead of lists of Python ints: 4-8 bytes per sequence, not ~36) and a vectorized
sequence-pointer computation, so index size and finalize time stay reasonable at billions of
documents; it writes the same bytes as the stock builder. Its ``add_index`` (used by ``data_prep.merge``)
is Megatron's ``IndexedDatasetBuilder.add_index`` (as in Megatron-LM's
``tools/merge_datasets.py``) done with whole arrays; tests check both give the same bytes.
"""

from __future__ import annotations

import logging
import os
import shutil
from array import array
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class OutputError(Exception):
    """The output cannot be written (a directory that is a file, no permission, disk full)."""


def output_error(prefix: str, e: OSError) -> OutputError:
    where = e.filename or str(Path(prefix).parent)
    return OutputError(f"cannot write output {prefix}.{{bin,idx}}: {where}: {e.strerror or e}")


def check_writable(prefix: str) -> None:
    """Fail now, not after hours of tokenizing, if ``prefix``'s directory cannot be written."""
    parent = Path(prefix).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".{Path(prefix).name}.probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise output_error(prefix, e) from e


def megatron_indexed_dataset():
    """Megatron's indexed-dataset module, imported on first use (it takes seconds)."""
    from megatron_patches.datasets import indexed_dataset_module

    return indexed_dataset_module()


def token_dtype(vocab_size: int) -> type[np.unsignedinteger] | type[np.signedinteger]:
    """The smallest dtype Megatron reads that holds every token id: uint16 up to 65536 ids."""
    return np.uint16 if vocab_size <= 65536 else np.int32


def _builder_classes():
    idx = megatron_indexed_dataset()

    class _FastIndexWriter(idx._IndexWriter):
        def _sequence_pointers(self, sequence_lengths):
            lengths = np.asarray(sequence_lengths, dtype=np.int64)
            pointers = np.zeros(len(lengths), dtype=np.int64)
            np.cumsum(lengths[:-1] * idx.DType.size(self.dtype), out=pointers[1:])
            return pointers

    class BulkIndexedDatasetBuilder(idx.IndexedDatasetBuilder):
        def __init__(self, bin_path: str, dtype=np.int32) -> None:
            super().__init__(bin_path, dtype=dtype)
            self.sequence_lengths = array("i")
            self.document_indices = array("q", [0])

        def add_documents(
            self, tokens: np.ndarray, seq_lengths: np.ndarray, doc_seqs: np.ndarray
        ) -> None:
            """Append many documents at once (``add_document`` for a whole chunk)."""
            self.data_file.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
            base = len(self.sequence_lengths)
            self.sequence_lengths.frombytes(np.asarray(seq_lengths, "<i4").tobytes())
            ends = base + np.cumsum(doc_seqs, dtype=np.int64)
            self.document_indices.frombytes(ends.astype("<i8").tobytes())

        def add_index(self, path_prefix: str) -> None:
            """Megatron's ``add_index`` (append a whole dataset: its index entries shifted by
            the sequences already here, then its ``.bin`` bytes), vectorized and compact."""
            index = idx._IndexReader(path_prefix + ".idx", multimodal=False)
            if index.dtype != self.dtype:
                raise ValueError(
                    f"{path_prefix}.idx holds {np.dtype(index.dtype).name} tokens, the merged "
                    f"output {np.dtype(self.dtype).name}: shards of different tokenizers?"
                )
            offset = len(self.sequence_lengths)
            self.sequence_lengths.frombytes(np.asarray(index.sequence_lengths, "<i4").tobytes())
            docs = np.asarray(index.document_indices[1:], dtype=np.int64) + offset
            self.document_indices.frombytes(docs.astype("<i8").tobytes())
            del index
            with open(path_prefix + ".bin", "rb") as f:
                shutil.copyfileobj(f, self.data_file, 16 << 20)

        def finalize(self, idx_path: str) -> None:
            self.data_file.close()
            with _FastIndexWriter(idx_path, self.dtype) as writer:
                writer.write(self.sequence_lengths, None, self.document_indices)

    return BulkIndexedDatasetBuilder


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_tmp(prefix: str) -> list[Path]:
    """Delete ``<prefix>.tmp-<pid>.*`` files whose process is gone (killed earlier runs)."""
    p = Path(prefix)
    removed = []
    for f in p.parent.glob(f"{p.name}.tmp-*"):
        pid = f.name[len(p.name) + len(".tmp-") :].split(".")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            f.unlink(missing_ok=True)
            removed.append(f)
    if removed:
        log.warning("removed %d stale temporary file(s) of %s", len(removed), prefix)
    return removed


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicIndexedWriter:
    """Build ``<prefix>.bin/.idx`` under temporary names; ``commit`` publishes them."""

    def __init__(self, prefix: str, dtype) -> None:
        self.prefix = prefix
        self.tmp = f"{prefix}.tmp-{os.getpid()}"
        self.committed = False
        builder = _builder_classes()
        try:
            Path(prefix).parent.mkdir(parents=True, exist_ok=True)
            remove_stale_tmp(prefix)
            self.builder = builder(self.tmp + ".bin", dtype=dtype)
        except OSError as e:
            raise output_error(prefix, e) from e

    @property
    def tmp_paths(self) -> tuple[str, str]:
        return self.tmp + ".bin", self.tmp + ".idx"

    def add_chunk(self, tokens: np.ndarray, seq_lengths: np.ndarray, doc_seqs: np.ndarray) -> None:
        try:
            self.builder.add_documents(tokens, seq_lengths, doc_seqs)
        except OSError as e:
            raise output_error(self.prefix, e) from e

    def add_index(self, prefix: str) -> None:
        """Append a whole ``.bin/.idx`` (``data_prep.merge``)."""
        try:
            self.builder.add_index(prefix)
        except OSError as e:
            raise output_error(self.prefix, e) from e

    def commit(self) -> None:
        try:
            self._commit()
        except OSError as e:
            raise output_error(self.prefix, e) from e

    def _commit(self) -> None:
        tmp_bin, tmp_idx = self.tmp_paths
        self.builder.finalize(tmp_idx)
        _fsync(tmp_bin)
        _fsync(tmp_idx)
        Path(self.prefix + ".idx").unlink(missing_ok=True)  # never pair an old .idx with new .bin
        os.replace(tmp_bin, self.prefix + ".bin")
        os.replace(tmp_idx, self.prefix + ".idx")
        _fsync(str(Path(self.prefix).parent))
        self.committed = True

    def abort(self) -> None:
        if not hasattr(self, "builder"):
            return
        if not self.builder.data_file.closed:
            self.builder.data_file.close()
        for f in self.tmp_paths:
            Path(f).unlink(missing_ok=True)

    def __enter__(self) -> AtomicIndexedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            self.abort()
