"""Which files a shard of a tokenization job reads, and whether a finished output is up to date.

**Assignment.** ``--shard I/N`` (1-based, as SLURM's ``--array=1-N``) takes a *contiguous* run of
the job's sorted file list, cut so that every shard gets about ``1/N`` of the bytes: file ``i``
goes to the shard holding the midpoint of its byte range. It depends only on the file list and
the file sizes, so a rerun gives every task the same files without any coordination, and merging
shards 1..N in order gives the files in the same order as one process reading them all: the
merged ``.bin/.idx`` is byte-identical to a single-process run (FIM seeds use each file's
position in the whole job, ``file_offset``).

**Up to date.** A prefix is done when its summary names the same input files with the same
sizes and sha256 (or, with ``--resume-check size``, sizes and mtimes), the same tokenizer
(sha256) and output options, and the ``.bin``/``.idx`` on disk are the ones it describes
(``.bin`` size and ``.idx`` sha256). A kill between publishing the ``.bin/.idx`` and writing the
summary leaves an old summary whose ``.idx`` hash no longer matches: that prefix is redone.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

#: Summary options that change the output bytes: a summary must match them all to be reused.
OUTPUT_OPTIONS = ("text_key", "split_sentences", "fim_rate", "fim_spm_rate", "seed",
                  "eos_token", "file_offset")


@dataclass(frozen=True)
class Shard:
    index: int  # 1-based
    count: int

    @property
    def suffix(self) -> str:
        return f"-shard-{self.index:05d}-of-{self.count:05d}"


def parse_shard(text: str) -> Shard:
    """``"3/16"`` -> Shard(3, 16); ValueError naming what was expected otherwise."""
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected I/N, e.g. 3/16") from None
    if not 1 <= index <= count:
        raise ValueError(f"--shard {text!r}: I must be within 1..N (1-based, like --array=1-N)")
    return Shard(index, count)


def assign(sizes: list[int], count: int) -> list[int]:
    """The 1-based shard of each file: contiguous runs of about equal bytes."""
    total = sum(sizes)
    out, before = [], 0
    for size in sizes:
        mid = (before + size / 2) / total if total else 0.0
        out.append(min(int(mid * count), count - 1) + 1)
        before += size
    return out


def shard_files(files: list[Path], shard: Shard) -> tuple[list[Path], int]:
    """This shard's files and the position of its first file in the whole job."""
    owners = assign([f.stat().st_size for f in files], shard.count)
    mine = [i for i, s in enumerate(owners) if s == shard.index]
    if not mine:
        return [], sum(1 for s in owners if s < shard.index)
    return files[mine[0] : mine[-1] + 1], mine[0]


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _same_inputs(recorded: list[dict], files: list[Path], check: str) -> bool:
    if [r.get("path") for r in recorded] != [str(f) for f in files]:
        return False
    for r, f in zip(recorded, files, strict=True):
        st = f.stat()
        if r.get("bytes_on_disk") != st.st_size:
            return False
        if check == "size" and r.get("mtime_ns") != st.st_mtime_ns:
            return False
        if check == "sha256" and r.get("sha256") != file_sha256(f):
            return False
    return True


def stale_reason(
    prefix: str, files: list[Path], tokenizer_sha: str, options: dict, check: str = "sha256"
) -> str | None:
    """Why ``prefix`` must be (re)built, or None when its summary shows it is up to date."""
    path = Path(prefix + ".summary.json")
    try:
        s = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no summary"
    except (OSError, ValueError) as e:
        return f"unreadable summary ({e})"
    if s.get("tokenizer", {}).get("sha256") != tokenizer_sha:
        return "the tokenizer changed"
    if any(s.get("options", {}).get(k) != options.get(k) for k in OUTPUT_OPTIONS):
        return "the output options changed"
    for ext in (".bin", ".idx"):
        if not os.path.isfile(prefix + ext):
            return f"{prefix}{ext} is missing"
    if os.path.getsize(prefix + ".bin") != s.get("bytes_out") or (
        file_sha256(prefix + ".idx") != s.get("idx_sha256")
    ):
        return "the .bin/.idx on disk are not the ones the summary describes"
    if not _same_inputs(s.get("input_files", []), files, check):
        return "the input files changed"
    return None
