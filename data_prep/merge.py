"""``python -m data_prep.merge``: join the shards of a tokenization job into one prefix.

    python -m data_prep.merge --output-prefix /data/k2/web_text_document \\
        /data/k2/web_text_document-shard-*-of-00016

Each shard is appended in shard order with Megatron's ``IndexedDatasetBuilder.add_index`` (the
same operation as Megatron-LM's ``tools/merge_datasets.py``; ``data_prep.writer`` does it with
whole arrays), under a temporary name renamed into place when complete, as the tokenizer writes.
Because shards are contiguous runs of the sorted file list, the result is byte-identical to one
process tokenizing every file.

Nothing is merged unless every shard is there and finished: shards named ``-shard-I-of-N``
must cover 1..N, each needs its ``.summary.json`` (written last by the tokenizer) matching its
``.idx``, and all must share the tokenizer and output options and cover the job's files
without gap. The merged summary sums the shards' counts and lists every input file and every
ignored one. A merge whose summary already matches its shards is not redone.
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

from data_prep.shards import OUTPUT_OPTIONS, file_sha256
from data_prep.writer import AtomicIndexedWriter, OutputError, check_writable

_SHARD = re.compile(r"-shard-(\d+)-of-(\d+)$")
EXIT_BAD_ARGS, EXIT_BAD_DATA, EXIT_OUTPUT = 2, 3, 4  # as data_prep/tokenize.py


class MergeError(ValueError):
    """The shards cannot be merged (missing, unfinished, or from different jobs)."""


def expand_prefixes(patterns: list[str]) -> list[str]:
    """Prefixes as given, or globbed (``*`` over ``.idx`` files), sorted by shard number."""
    out: list[str] = []
    for pattern in patterns:
        p = pattern.removesuffix(".idx").removesuffix(".bin")
        if glob.has_magic(p):
            found = sorted(f[: -len(".idx")] for f in glob.glob(p + ".idx"))
            if not found:
                raise MergeError(f"{pattern}: matches no .idx file")
            out += found
        else:
            out.append(p)
    return sorted(dict.fromkeys(out), key=lambda p: (_shard_of(p) or (0, 0))[0])


def _shard_of(prefix: str) -> tuple[int, int] | None:
    m = _SHARD.search(prefix)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _load_summary(prefix: str) -> dict:
    for ext in (".bin", ".idx"):
        if not Path(prefix + ext).is_file():
            raise MergeError(f"{prefix}{ext}: missing")
    path = Path(prefix + ".summary.json")
    if not path.is_file():
        raise MergeError(f"{path}: missing: the shard is not finished (its task died?)")
    s = json.loads(path.read_text(encoding="utf-8"))
    if s.get("idx_sha256") != file_sha256(prefix + ".idx"):
        raise MergeError(f"{prefix}.idx does not match its summary: the shard is being rewritten")
    return s


def check_shards(prefixes: list[str]) -> list[dict]:
    """The shards' summaries, after checking they are complete and of one job."""
    if not prefixes:
        raise MergeError("no shard to merge")
    numbered = [_shard_of(p) for p in prefixes]
    if all(numbered):
        counts = {n for _, n in numbered}
        if len(counts) > 1:
            raise MergeError(f"shards of different jobs (-of-{sorted(counts)})")
        missing = sorted(set(range(1, counts.pop() + 1)) - {i for i, _ in numbered})
        if missing:
            raise MergeError(f"shard(s) {missing} of -of-{numbered[0][1]:05d} not found")
    summaries = [_load_summary(p) for p in prefixes]
    first = summaries[0]
    for p, s in zip(prefixes, summaries, strict=True):
        if s["tokenizer"]["sha256"] != first["tokenizer"]["sha256"] or s["dtype"] != first["dtype"]:
            raise MergeError(f"{p}: another tokenizer than {prefixes[0]}")
        opts = [k for k in OUTPUT_OPTIONS if k != "file_offset"]
        if any(s["options"].get(k) != first["options"].get(k) for k in opts):
            raise MergeError(f"{p}: other output options than {prefixes[0]}")
    _check_coverage(prefixes, summaries)
    return summaries


def _check_coverage(prefixes: list[str], summaries: list[dict]) -> None:
    """Sharded jobs: the shards' files follow each other and add up to the job's files."""
    shards = [s.get("shard") for s in summaries]
    if not all(shards):
        return
    at = 0
    for p, sh in zip(prefixes, shards, strict=True):
        if sh["files"] and sh["first_file"] != at:
            raise MergeError(f"{p}: starts at file {sh['first_file']}, expected {at}")
        at += sh["files"]
    if at != shards[0]["job_files"]:
        raise MergeError(f"the shards hold {at} of the job's {shards[0]['job_files']} files")


def merged_summary(output: str, prefixes: list[str], summaries: list[dict], sec: float) -> dict:
    total = lambda key: sum(s[key] for s in summaries)  # noqa: E731
    skipped: dict[str, int] = {}
    for s in summaries:
        for k, v in s["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
    ignored = {i["path"]: i for s in summaries for i in s.get("ignored_inputs", [])}
    bytes_out = Path(output + ".bin").stat().st_size
    return {
        "output_prefix": output,
        "level": summaries[0]["level"],
        "dtype": summaries[0]["dtype"],
        **{k: total(k) for k in ("documents", "sequences", "tokens", "lines", "bytes_in")},
        "bytes_out": bytes_out,
        "idx_sha256": file_sha256(output + ".idx"),
        "skipped": dict(sorted(skipped.items())),
        "skipped_total": sum(skipped.values()),
        "skipped_examples": [e for s in summaries for e in s["skipped_examples"]],
        "merge_seconds": round(sec, 3),
        "merge_bytes_per_s": round(bytes_out / max(sec, 1e-9)),
        "input_files": [f for s in summaries for f in s["input_files"]],
        "files_without_documents": [f for s in summaries for f in s["files_without_documents"]],
        "ignored_inputs": list(ignored.values()),
        "shards": [{"prefix": p, "idx_sha256": s["idx_sha256"], "documents": s["documents"],
                    "tokens": s["tokens"]} for p, s in zip(prefixes, summaries, strict=True)],
        "tokenizer": summaries[0]["tokenizer"],
        "options": {**summaries[0]["options"], "file_offset": 0},
    }


def _up_to_date(output: str, summaries: list[dict]) -> bool:
    try:
        old = json.loads(Path(output + ".summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    same = [sh["idx_sha256"] for sh in old.get("shards", [])] == [s["idx_sha256"] for s in summaries]
    return same and Path(output + ".idx").is_file() and (
        file_sha256(output + ".idx") == old.get("idx_sha256"))


def merge(prefixes: list[str], output: str, allow_empty: bool = False, force: bool = False) -> dict:
    """Merge ``prefixes`` (in order) into ``output``; return the merged summary."""
    from orchestration.common.files import write_json_atomic

    summaries = check_shards(prefixes)
    if not force and _up_to_date(output, summaries):
        return {**json.loads(Path(output + ".summary.json").read_text()), "reused": True}
    if sum(s["documents"] for s in summaries) == 0 and not allow_empty:
        raise MergeError(f"{output}: the shards hold no document; pass --allow-empty if expected")
    check_writable(output)
    t0 = time.perf_counter()
    with AtomicIndexedWriter(output, np.dtype(summaries[0]["dtype"]).type) as writer:
        for p in prefixes:
            writer.add_index(p)
        writer.commit()
    summary = merged_summary(output, prefixes, summaries, time.perf_counter() - t0)
    write_json_atomic(output + ".summary.json", summary, indent=1, sort_keys=False)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.merge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", nargs="+", help="shard prefixes or globs (in shard order)")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--allow-empty", action="store_true", help="accept a merge with no document")
    p.add_argument("--force", action="store_true", help="merge even if the output is up to date")
    a = p.parse_args(argv)
    try:
        prefixes = expand_prefixes(a.shards)
        s = merge(prefixes, a.output_prefix, a.allow_empty, a.force)
    except OutputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_OUTPUT
    except MergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_DATA
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_ARGS
    state = "up to date" if s.get("reused") else f"merged {len(prefixes)} shard(s)"
    print(f"{a.output_prefix}.{{bin,idx}}: {state}: {s['documents']:,} documents, "
          f"{s['tokens']:,} tokens, {len(s['input_files'])} input files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
