"""Atomic writes: a reader sees the old file or the complete new one, never a partial one.

Every output of the project is written under a temporary name in the target's directory and
renamed into place (``os.replace`` is atomic within a filesystem), so a kill, a full disk or a
crash leaves the previous version intact. The temporary name carries the pid, so two writers
never share one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (parents created); return ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, obj: Any, indent: int | None = 2,
                      sort_keys: bool = True) -> Path:
    """``obj`` as JSON (non-JSON values via ``str``), written atomically."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=str) + "\n"
    return write_text_atomic(path, text)


def write_jsonl_atomic(path: str | Path, rows: list[dict]) -> Path:
    """One JSON object per line, written atomically (rewrites of append-only logs)."""
    return write_text_atomic(path, "".join(json.dumps(r, default=float) + "\n" for r in rows))


@contextmanager
def replacing_dir(tmp: Path, out: Path) -> Iterator[Path]:
    """Fill the folder ``tmp`` (created by the caller, next to ``out``) inside the block; when
    the block completes, ``tmp`` replaces ``out`` (an earlier ``out`` is removed first). On any
    error, ``tmp`` is removed and ``out`` is left as it was: a reader never sees half a folder.
    """
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
