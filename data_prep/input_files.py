"""Which files a tokenization reads, and which it saw and left out (so no shard goes missing).

A directory is searched recursively. A file is an input when its name, compared without case,
ends in a JSONL suffix (``.jsonl``, ``.json``, ``.ndjson``) optionally followed by a compression
suffix (``.gz``, ``.zst``, ``.zstd``, ``.bz2``, ``.xz``), or in a columnar suffix (``.parquet``,
``.arrow``). Every other file below a directory is *ignored*, and listed as such in the summary
with the reason: a ``.JSONL`` or ``.bz2`` shard that used to be dropped without a word is now
either read or named. Files given explicitly are always read (their format is sniffed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSION_SUFFIXES = (".gz", ".zst", ".zstd", ".bz2", ".xz")
COLUMNAR_SUFFIXES = (".parquet", ".arrow")
INPUT_SUFFIXES = (
    *JSONL_SUFFIXES,
    *(j + c for j in JSONL_SUFFIXES for c in COMPRESSION_SUFFIXES),
    *COLUMNAR_SUFFIXES,
)
_PARQUET_MAGIC = b"PAR1"
_ARROW_FILE_MAGIC = b"ARROW1"
_ARROW_STREAM_MAGIC = b"\xff\xff\xff\xff"


@dataclass
class InputScan:
    """The files to read, in order, and those seen under a directory but not read."""

    files: list[Path] = field(default_factory=list)
    ignored: list[dict] = field(default_factory=list)  # {"path", "reason"}


def is_input_name(name: str) -> bool:
    return name.lower().endswith(INPUT_SUFFIXES)


def _ignore_reason(f: Path) -> str:
    name = f.name.lower()
    if name.endswith(COMPRESSION_SUFFIXES):
        return "compressed, but not JSONL by its name (expected .jsonl/.json/.ndjson before it)"
    if name.startswith(".") or ".tmp-" in name:
        return "hidden or temporary file"
    return f"not an input suffix ({', '.join(INPUT_SUFFIXES[:3])}, their compressed forms, " \
        ".parquet, .arrow)"


def scan_inputs(paths: list[str | Path]) -> InputScan:
    """Files as given, plus every input file below each directory (sorted by path)."""
    scan = InputScan()
    for p in map(Path, paths):
        if p.is_dir():
            below = sorted(f for f in p.rglob("*") if f.is_file())
            found = [f for f in below if is_input_name(f.name) and not f.name.startswith(".")]
            scan.ignored += [
                {"path": str(f), "reason": _ignore_reason(f)} for f in below if f not in found
            ]
            if not found:
                raise FileNotFoundError(
                    f"{p}: directory has no input files ({len(below)} other files; inputs end "
                    f"in {', '.join(INPUT_SUFFIXES[:3])}, optionally .gz/.zst/.bz2/.xz, or "
                    ".parquet/.arrow)"
                )
            scan.files.extend(found)
        elif p.is_file():
            scan.files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such input file or directory")
    return scan


def expand_inputs(paths: list[str | Path]) -> list[Path]:
    """The files :func:`scan_inputs` would read."""
    return scan_inputs(paths).files


def input_format(path: Path) -> str:
    """``parquet``, ``arrow`` or ``jsonl`` (compression is sniffed later, by the reader)."""
    with open(path, "rb") as f:
        head = f.read(8)
    name = path.name.lower()
    if head.startswith(_PARQUET_MAGIC) or name.endswith(".parquet"):
        return "parquet"
    if head.startswith((_ARROW_FILE_MAGIC, _ARROW_STREAM_MAGIC)) or name.endswith(".arrow"):
        return "arrow"
    return "jsonl"


def source_name(path: Path) -> str:
    """``wiki/part-0001.jsonl.zst`` -> ``part-0001``: the file name without input suffixes."""
    name = path.name
    for suffix in sorted(INPUT_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem
