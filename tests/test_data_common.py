"""Shared helpers of the data_prep tests (imported by the other tests/test_data_*.py files).

A tiny tokenizer (vocab 512, FIM tokens) is trained once per test process on a small synthetic
corpus with prose, numbers, code and abbreviations, which is enough to exercise every path.
"""

from __future__ import annotations

import atexit
import json
import random
import shutil
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_NAMES = ["Dr. Smith", "Mrs. Jones", "the engineer", "a student", "Prof. Lee", "the team"]
_VERBS = ["measured", "wrote", "reviewed", "computed", "tested", "shipped"]
_THINGS = ["the parser", "a new model", "the results", "approx. 40 samples", "the report"]
_PLACES = ["the lab", "Berlin", "the office", "a small town", "the field", "St. Louis"]
_CODE = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * 2)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "if value is None:\n    raise ValueError('missing value')\n",
]


def make_docs(n: int, seed: int = 0) -> list[str]:
    """Documents of a few sentences each, with numbers, abbreviations and some code."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sents = [
            f"{rng.choice(_NAMES).capitalize()} {rng.choice(_VERBS)} {rng.choice(_THINGS)} "
            f"on day {rng.randint(1, 365)} of {rng.randint(1990, 2030)} in "
            f"{rng.choice(_PLACES)}."
            for _ in range(rng.randint(1, 5))
        ]
        if rng.random() < 0.3:
            sents.append("\n" + rng.choice(_CODE))
        docs.append(" ".join(sents))
    return docs


def write_jsonl(path: Path, docs: list[str], key: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({key: d, "meta": {"n": len(d)}}) + "\n")
    return path


@cache
def _workdir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="test_data_"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d


@cache
def tiny_tokenizer() -> str:
    """Path of a 512-piece BPE model with FIM tokens, trained once per process."""
    from data_prep.train_tokenizer import train_tokenizer

    root = _workdir() / "tok"
    corpus = write_jsonl(
        root / "train.jsonl",
        make_docs(600, seed=1)
        + ["Unicode: café, naïve, Straße, 東京, Москва, 🎉 and tabs\tand spaces   here."],
    )
    train_tokenizer([corpus], root / "tiny", 512, fim=True, workers=1, seed=7)
    return str(root / "tiny.model")


def sp_model(path: str | None = None):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=path or tiny_tokenizer())


def read_dataset(prefix: str):
    from data_prep.writer import megatron_indexed_dataset

    return megatron_indexed_dataset().IndexedDataset(prefix)


def run_script(*args: str, env: dict | None = None, timeout: float = 120):
    """Run ``python <args>`` from the repository root, as a person would."""
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, env=env, timeout=timeout
    )


def test_helpers_make_distinct_documents():
    docs = make_docs(50)
    assert len(set(docs)) > 40 and any("def " in d for d in docs)
