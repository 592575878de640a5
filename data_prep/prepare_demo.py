"""Prepare the embedded demo data: corpus -> tokenizer -> ``.bin/.idx`` per source -> mix table.

``python -m data_prep.prepare_demo --out data/demo`` (or ``prepare_demo_data(Path("data/demo"))``)
produces the layout ``conf/data/demo.yaml`` expects::

    <out>/tokenizer.model, tokenizer.meta.json
    <out>/{prose,code,math}_text_document.{bin,idx,summary.json}
    <out>/corpus/{prose,code,math}.jsonl, manifest.json

Each step is skipped when its outputs exist and are complete (manifest written last; summary
written after the ``.bin/.idx`` rename; recorded tokenizer hash matches), so calling it again is
cheap; ``force=True`` rebuilds everything. A file lock serializes concurrent callers.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.demo_corpus import SOURCES, build_demo_corpus
from orchestration.common.files import write_json_atomic

MULTIPLIERS = {"prose": 1.0, "code": 1.0, "math": 2.0}  # as in conf/data/demo.yaml


@dataclass
class DemoData:
    tokenizer_model: Path
    prefixes: dict[str, str]  # source -> Megatron prefix
    summary: dict = field(default_factory=dict)
    out_dir: Path | None = None


@contextmanager
def _locked(out_dir: Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".prepare.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _corpus(corpus_dir: Path, scale: float, force: bool) -> dict:
    manifest = _load_json(corpus_dir / "manifest.json")
    complete = (
        manifest is not None
        and manifest.get("scale") == scale
        and all(
            (corpus_dir / f"{s}.jsonl").is_file()
            and (corpus_dir / f"{s}.jsonl").stat().st_size == manifest["sources"][s]["bytes"]
            for s in SOURCES
        )
    )
    if force or not complete:
        manifest = build_demo_corpus(corpus_dir, scale=scale)
    return manifest


def _tokenizer(
    out_dir: Path, corpus_dir: Path, vocab_size: int, workers: int, corpus_id: str, force: bool
) -> dict:
    from data_prep.train_tokenizer import train_tokenizer

    meta = _load_json(out_dir / "tokenizer.meta.json")
    if (
        force
        or meta is None
        or meta.get("vocab_size") != vocab_size
        or meta.get("corpus") != corpus_id
        or not (out_dir / "tokenizer.model").is_file()
    ):
        (out_dir / "tokenizer.meta.json").unlink(missing_ok=True)
        inputs = [corpus_dir / f"{s}.jsonl" for s in SOURCES]
        meta_obj = train_tokenizer(
            inputs, out_dir / "tokenizer", vocab_size, workers=workers, fim=True, seed=0
        )
        meta = {**meta_obj.__dict__, "corpus": corpus_id}
        write_json_atomic(out_dir / "tokenizer.meta.json", meta, indent=1, sort_keys=False)
    return meta


def _tokenize(out_dir: Path, corpus_dir: Path, workers: int, force: bool) -> dict[str, dict]:
    from data_prep.pipeline import TokenizeOptions, file_sha256
    from data_prep.tokenize_cli import run_tokenize

    model = out_dir / "tokenizer.model"
    sha = file_sha256(model)
    summaries = {}
    for source in SOURCES:
        prefix = out_dir / source
        summary = _load_json(Path(f"{prefix}_text_document.summary.json"))
        fresh = (
            summary is not None
            and summary["tokenizer"]["sha256"] == sha
            and Path(f"{prefix}_text_document.bin").is_file()
            and Path(f"{prefix}_text_document.idx").is_file()
        )
        if force or not fresh:
            opts = TokenizeOptions(tokenizer_model=str(model), workers=workers, progress=False)
            summary = run_tokenize([corpus_dir / f"{source}.jsonl"], str(prefix), opts)[0]
        summaries[source] = summary
    return summaries


def prepare_demo_data(
    out_dir: Path,
    vocab_size: int = 4096,
    workers: int = 2,
    force: bool = False,
    scale: float = 1.0,
    quiet: bool = False,
) -> DemoData:
    """Build (or reuse) the demo corpus, tokenizer and indexed datasets under ``out_dir``.

    ``scale`` multiplies the corpus size (1.0: about 2.3M tokens; tests use ~0.03).
    """
    from data_prep.mix import compute_mix, format_table

    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    with _locked(out_dir):
        corpus_dir = out_dir / "corpus"
        manifest = _corpus(corpus_dir, scale, force)
        corpus_id = "+".join(manifest["sources"][s]["sha256"][:16] for s in SOURCES)
        meta = _tokenizer(out_dir, corpus_dir, vocab_size, workers, corpus_id, force)
        summaries = _tokenize(out_dir, corpus_dir, workers, force)
    prefixes = {s: str(out_dir / f"{s}_text_document") for s in SOURCES}
    shares = compute_mix(
        [{"name": s, "path": p, "multiplier": MULTIPLIERS[s]} for s, p in prefixes.items()]
    )
    table = format_table(shares)
    if not quiet:
        print(f"demo data in {out_dir} ({time.perf_counter() - t0:.1f} s)\n{table}")
    summary = {
        "tokens": {s: summaries[s]["tokens"] for s in SOURCES},
        "documents": {s: summaries[s]["documents"] for s in SOURCES},
        "vocab_size": meta["vocab_size"],
        "corpus": manifest,
        "mix_table": table,
    }
    return DemoData(out_dir / "tokenizer.model", prefixes, summary, out_dir)


def prepare_mix(data) -> DemoData:
    """A data mix's ``prepare`` hook (``conf/data/demo.yaml``): build the demo data in the
    directory that holds the mix's tokenizer, when it is missing."""
    return prepare_demo_data(Path(data.tokenizer_model).parent)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.prepare_demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="data/demo", help="output directory")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--force", action="store_true", help="rebuild every step")
    a = p.parse_args(argv)
    prepare_demo_data(Path(a.out), a.vocab_size, a.workers, a.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
