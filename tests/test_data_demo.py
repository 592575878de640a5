"""The embedded demo corpus and ``prepare_demo_data``: offline, cached, matching demo.yaml."""

from __future__ import annotations

import json
import operator
import re
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from test_data_common import REPO, read_dataset

from data_prep.demo_corpus import build_demo_corpus
from data_prep.demo_math import math_documents
from data_prep.prepare_demo import prepare_demo_data

# "a op b = c" steps that stand alone (not inside "(a + b)", not followed by "x d" or "/ d")
_BINARY_STEP = re.compile(r"(?<![\d/(] )(?<![\d/(])(\d+) ([x+-]) (\d+) = (\d+)(?![\d/]| [x+-/] )")
SCALE = 0.03  # a few percent of the real corpus: ~0.3 MB, builds in about a second


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("optdata")
    data = prepare_demo_data(root / "demo", vocab_size=512, workers=2, scale=SCALE, quiet=True)
    return root, data


def test_layout_matches_conf_data_demo_yaml(demo, monkeypatch):
    root, data = demo
    monkeypatch.setenv("OPT_DATA_DIR", str(root))
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf/data/demo.yaml"), resolve=True)
    assert Path(cfg["tokenizer_model"]) == data.tokenizer_model and data.tokenizer_model.is_file()
    assert {s["name"]: s["path"] for s in cfg["sources"]} == data.prefixes
    for source, prefix in data.prefixes.items():
        ds = read_dataset(prefix)
        assert len(ds) == data.summary["documents"][source] > 0
        assert int(ds.sequence_lengths.sum()) == data.summary["tokens"][source]
    assert "math" in data.summary["mix_table"]


def test_second_call_reuses_everything(demo):
    root, data = demo
    files = sorted(p for p in (root / "demo").rglob("*") if p.is_file() and p.suffix != ".lock")
    before = {p: p.stat().st_mtime_ns for p in files}
    again = prepare_demo_data(root / "demo", vocab_size=512, scale=SCALE, quiet=True)
    assert again.prefixes == data.prefixes and again.summary["tokens"] == data.summary["tokens"]
    assert {p: p.stat().st_mtime_ns for p in files} == before


def test_incomplete_step_is_redone(demo):
    root, data = demo
    summary = Path(data.prefixes["math"] + ".summary.json")
    summary.unlink()  # as if the run died between the .idx rename and the summary
    prepare_demo_data(root / "demo", vocab_size=512, scale=SCALE, quiet=True)
    assert json.loads(summary.read_text())["tokens"] == data.summary["tokens"]["math"]


def test_corpus_is_deterministic_and_offline(tmp_path, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("the demo corpus must not touch the network")

    monkeypatch.setattr(socket, "socket", no_network)
    a = build_demo_corpus(tmp_path / "a", scale=0.01)
    b = build_demo_corpus(tmp_path / "b", scale=0.01)
    assert a == b
    assert all(a["sources"][s]["documents"] > 0 for s in ("prose", "code", "math"))
    first = json.loads((tmp_path / "a" / "code.jsonl").open().readline())
    assert first["source"] == "code" and first["text"].startswith("# ")


def test_math_problems_have_correct_worked_answers():
    docs = list(math_documents(400, seed=3))
    assert sum(d.count("Problem ") for d in docs) == 400
    ops = {"x": operator.mul, "+": operator.add, "-": operator.sub}
    checked = 0
    for doc in docs:
        assert doc.count("Problem ") == doc.count("Solution. ")
        for a, op, b, c in _BINARY_STEP.findall(doc):
            assert ops[op](int(a), int(b)) == int(c), (a, op, b, c)
            checked += 1
    assert checked > 300


@pytest.mark.slow
def test_full_demo_prepares_well_under_a_minute(tmp_path):
    t0 = time.perf_counter()
    data = prepare_demo_data(tmp_path / "demo", quiet=True)
    assert time.perf_counter() - t0 < 60
    assert 1_000_000 < sum(data.summary["tokens"].values()) < 5_000_000
