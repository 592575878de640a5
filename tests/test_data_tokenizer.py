"""Tokenizer training (data_prep/train_tokenizer.py) and the fertility report."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from test_data_common import make_docs, run_script, sp_model, tiny_tokenizer, write_jsonl

from data_prep.fertility import fertility_report, format_report
from data_prep.fertility import main as fertility_main
from data_prep.train_tokenizer import (
    check_vocab_size,
    sample_documents,
    train_tokenizer,
    training_lines,
)


def test_vocab_size_must_be_a_multiple_of_64(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_docs(20))
    with pytest.raises(ValueError, match=r"1000 is not a multiple of 64.*960 or 1024"):
        train_tokenizer([corpus], tmp_path / "t", 1000)
    check_vocab_size(32000)
    assert not (tmp_path / "t.model").exists()


def test_metadata_records_ids_and_sample_hash():
    model = tiny_tokenizer()
    meta = json.loads(Path(model).with_suffix(".meta.json").read_text())
    assert meta["vocab_size"] == 512
    assert (meta["unk_id"], meta["bos_id"], meta["eos_id"], meta["pad_id"]) == (0, 1, 2, 3)
    assert meta["fim_tokens"] == {
        "<fim_prefix>": 4,
        "<fim_middle>": 5,
        "<fim_suffix>": 6,
        "<fim_pad>": 7,
    }
    assert meta["special_tokens"]["</s>"] == 2
    corpus = Path(model).parent / "train.jsonl"
    lines = training_lines(sample_documents([corpus], "text", 100_000, 7))
    expected = hashlib.sha256(b"".join(x.encode() + b"\n" for x in lines)).hexdigest()
    assert meta["sample_sha256"] == expected
    assert meta["options"]["split_digits"] and meta["options"]["byte_fallback"]


def test_digits_are_single_tokens():
    sp = sp_model()
    ids = sp.encode("In 2024 we sold 1234567 units for $89.50.")
    pieces = [sp.id_to_piece(i).replace("\u2581", "") for i in ids if not sp.is_byte(i)]
    digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
    assert "".join(digit_pieces) == "2024" + "1234567" + "8950"
    assert all(len(p) == 1 for p in digit_pieces), pieces


@pytest.mark.parametrize("text", ["日本語のテキスト", "emoji 🦀🎉 mix", "Ωμέγα ∑ ∫ √2", "\x00bin"])
def test_unknown_characters_round_trip_through_byte_fallback(text):
    sp = sp_model()
    ids = sp.encode(text)
    assert sp.unk_id() not in ids
    assert any(sp.is_byte(i) for i in ids)
    assert sp.decode(ids) == text


def test_whitespace_and_code_round_trip():
    sp = sp_model()
    code = "def f(x):\n\tif x:\n        return  x  # two  spaces\n"
    assert sp.decode(sp.encode(code)) == code


def test_control_tokens_are_not_produced_from_text():
    sp = sp_model()
    assert 4 not in sp.encode("<fim_prefix> literal text </s>")
    assert sp.eos_id() not in sp.encode("</s>")


def test_training_is_deterministic(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_docs(200, seed=3))
    a = train_tokenizer([corpus], tmp_path / "a", 384, workers=2, seed=5, sample_docs=150)
    b = train_tokenizer([corpus], tmp_path / "b", 384, workers=2, seed=5, sample_docs=150)
    assert a.sample_sha256 == b.sample_sha256 and a.sample_documents == 150
    sa, sb = sp_model(str(tmp_path / "a.model")), sp_model(str(tmp_path / "b.model"))
    vocab = [(sa.id_to_piece(i), sa.get_score(i)) for i in range(sa.get_piece_size())]
    assert vocab == [(sb.id_to_piece(i), sb.get_score(i)) for i in range(sb.get_piece_size())]


def test_sample_is_split_evenly_between_sources(tmp_path):
    big = write_jsonl(tmp_path / "big.jsonl", [f"big {i}" for i in range(1000)])
    small = write_jsonl(tmp_path / "small.jsonl", [f"small {i}" for i in range(30)])
    docs = sample_documents([big, small], "text", 60, seed=0)
    assert sum(d.startswith("big") for d in docs) == 30
    assert sum(d.startswith("small") for d in docs) == 30


def test_script_runs_from_repo_root(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_docs(100))
    r = run_script(
        "data_prep/train_tokenizer.py",
        "--input",
        str(corpus),
        "--model-prefix",
        str(tmp_path / "t"),
        "--vocab-size",
        "320",
        "--workers",
        "1",
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "t.model").is_file() and (tmp_path / "t.meta.json").is_file()
    bad = run_script(
        "data_prep/train_tokenizer.py",
        "--input",
        str(corpus),
        "--model-prefix",
        str(tmp_path / "u"),
        "--vocab-size",
        "500",
    )
    assert bad.returncode == 2 and "multiple of 64" in bad.stderr


def test_fertility_report(tmp_path, capsys):
    sp = sp_model()
    prose = write_jsonl(tmp_path / "prose.jsonl", make_docs(40, seed=9))
    nums = write_jsonl(tmp_path / "nums.jsonl", ["1234 5678 9012"] * 10)
    reports = fertility_report(tiny_tokenizer(), {"prose": prose, "nums": nums})
    by = {r.source: r for r in reports}
    n_tokens = sum(len(sp.encode(d)) for d in make_docs(40, seed=9))
    assert by["prose"].tokens == n_tokens and by["prose"].documents == 40
    assert by["nums"].words == 30 and by["nums"].tokens >= 120  # every digit is a token
    assert by["nums"].fertility == pytest.approx(by["nums"].tokens / 30)
    assert "fertility" in format_report(reports)
    out = tmp_path / "report.json"
    assert fertility_main(["--tokenizer", tiny_tokenizer(), f"p={prose}", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data[0]["source"] == "p" and data[0]["bytes_per_token"] > 1
    assert "bytes/tok" in capsys.readouterr().out
