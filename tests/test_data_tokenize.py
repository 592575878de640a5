"""JSONL -> .bin/.idx (data_prep/tokenize.py): round trips, formats, sentences, FIM, the CLI."""

from __future__ import annotations

import gzip
import json
import signal
from pathlib import Path

import numpy as np
import pytest
import zstandard
from test_data_common import make_docs, read_dataset, run_script, sp_model, tiny_tokenizer
from test_data_common import write_jsonl as write

from data_prep import fim
from data_prep.pipeline import TokenizeOptions
from data_prep.sentences import load_punkt, make_splitter, save_punkt, train_punkt
from data_prep.tokenize_cli import main, run_tokenize
from data_prep.writer import megatron_indexed_dataset, token_dtype


def tokenize(inputs, prefix, **kw) -> list[dict]:
    kw.setdefault("workers", 2)
    kw.setdefault("progress", False)
    return run_tokenize(
        inputs, str(prefix), TokenizeOptions(tokenizer_model=tiny_tokenizer(), **kw)
    )


def files_of(prefix: str) -> tuple[bytes, bytes]:
    return Path(prefix + ".bin").read_bytes(), Path(prefix + ".idx").read_bytes()


def test_round_trip_matches_sentencepiece(tmp_path):
    docs = make_docs(300, seed=2)
    (summary,) = tokenize([write(tmp_path / "in.jsonl", docs)], tmp_path / "out", block_bytes=4096)
    prefix = summary["output_prefix"]
    assert prefix == str(tmp_path / "out_text_document")
    sp = sp_model()
    expected = [sp.encode(d) + [sp.eos_id()] for d in docs]
    ds = read_dataset(prefix)
    assert len(ds) == len(docs) and list(ds.document_indices) == list(range(len(docs) + 1))
    assert list(ds.sequence_lengths) == [len(e) for e in expected]
    assert all(list(ds[i]) == e for i, e in enumerate(expected))
    assert ds[0].dtype == np.uint16 and summary["dtype"] == "uint16"
    assert summary["documents"] == 300 and summary["tokens"] == sum(map(len, expected))
    assert summary["skipped_total"] == 0 and summary["bytes_out"] == 2 * summary["tokens"]
    on_disk = json.loads(Path(prefix + ".summary.json").read_text())
    assert on_disk["tokenizer"]["sha256"] == summary["tokenizer"]["sha256"]


def test_bulk_writer_matches_megatron_builder(tmp_path):
    docs = make_docs(50, seed=4)
    (summary,) = tokenize([write(tmp_path / "in.jsonl", docs)], tmp_path / "ours")
    sp = sp_model()
    builder = megatron_indexed_dataset().IndexedDatasetBuilder(
        str(tmp_path / "ref.bin"), dtype=np.uint16
    )
    for d in docs:
        ids = sp.encode(d) + [sp.eos_id()]
        builder.add_document(np.array(ids), [len(ids)])
    builder.finalize(str(tmp_path / "ref.idx"))
    assert files_of(summary["output_prefix"]) == files_of(str(tmp_path / "ref"))


def test_gzip_and_zstd_inputs_give_identical_output(tmp_path):
    plain = write(tmp_path / "a.jsonl", make_docs(120, seed=5))
    data = plain.read_bytes()
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(data))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    outs = [
        tokenize([tmp_path / n], tmp_path / n.split(".")[0], block_bytes=2048)[0]
        for n in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst")
    ]
    assert len({files_of(o["output_prefix"]) for o in outs}) == 1


def test_directory_to_one_prefix_and_prefix_per_source(tmp_path):
    docs_a, docs_b = make_docs(30, seed=6), make_docs(20, seed=7)
    write(tmp_path / "in" / "b.jsonl", docs_b)
    write(tmp_path / "in" / "a.jsonl", docs_a)
    (one,) = tokenize([tmp_path / "in"], tmp_path / "all")
    assert one["documents"] == 50 and [f["documents"] for f in one["input_files"]] == [30, 20]
    sp = sp_model()
    ds = read_dataset(one["output_prefix"])  # keep it alive: items are views of its mmap
    assert list(ds[30]) == sp.encode(docs_b[0]) + [sp.eos_id()]
    opts = TokenizeOptions(tokenizer_model=tiny_tokenizer(), workers=2, progress=False)
    per = run_tokenize([tmp_path / "in"], str(tmp_path / "per"), opts, prefix_per_source=True)
    assert [s["output_prefix"] for s in per] == [
        str(tmp_path / "per" / "a_text_document"),
        str(tmp_path / "per" / "b_text_document"),
    ]
    assert [s["documents"] for s in per] == [30, 20]


def test_split_sentences_one_sequence_per_sentence(tmp_path):
    docs = make_docs(80, seed=8)
    path = write(tmp_path / "in.jsonl", docs)
    params = train_punkt(docs)
    (summary,) = tokenize([path], tmp_path / "s", punkt_params=params)
    assert summary["output_prefix"].endswith("_text_sentence")
    splitter, sp = make_splitter(params), sp_model()
    ds = read_dataset(summary["output_prefix"])
    seq = 0
    for d_i, doc in enumerate(docs):
        sents = [sp.encode(s) for s in splitter.tokenize(doc) if s.strip()]
        sents[-1] = sents[-1] + [sp.eos_id()]
        assert ds.document_indices[d_i] == seq
        for s in sents:
            assert list(ds[seq]) == s
            seq += 1
    assert seq == len(ds) == summary["sequences"] and seq > len(docs)
    assert "Dr." not in [s[-3:] for s in splitter.tokenize("See Dr. Smith now. Then go.")]
    save_punkt(params, tmp_path / "punkt.json")
    (again,) = tokenize([path], tmp_path / "t", punkt_params=load_punkt(tmp_path / "punkt.json"))
    assert files_of(again["output_prefix"]) == files_of(summary["output_prefix"])


def test_fim_transform_round_trips_and_is_deterministic(tmp_path):
    docs = make_docs(200, seed=9)
    path = write(tmp_path / "code.jsonl", docs)
    (out,) = tokenize([path], tmp_path / "fim", fim_rate=1.0, fim_spm_rate=0.5, seed=3)
    sp, ids = sp_model(), fim.fim_tokens(sp_model())
    ds = read_dataset(out["output_prefix"])
    spm_count = 0
    for i, doc in enumerate(docs):
        toks = list(ds[i])
        assert toks[0] == ids.prefix and toks[-1] == sp.eos_id()
        body = toks[:-1]
        if body[1] == ids.suffix:  # SPM: <pre> <suf> suffix <mid> prefix middle
            spm_count += 1
            m = body.index(ids.middle)
            assert sp.decode(body[m + 1 :] + body[2:m]) == doc  # prefix+middle, then suffix
        else:  # PSM: <pre> prefix <suf> suffix <mid> middle
            s, m = body.index(ids.suffix), body.index(ids.middle)
            assert sp.decode(body[1:s] + body[m + 1 :] + body[s + 1 : m]) == doc
    assert 60 < spm_count < 140
    (again,) = tokenize(
        [path],
        tmp_path / "fim2",
        fim_rate=1.0,
        fim_spm_rate=0.5,
        seed=3,
        workers=0,
        block_bytes=1000,
    )
    assert files_of(again["output_prefix"]) == files_of(out["output_prefix"])
    (off,) = tokenize([path], tmp_path / "nofim", fim_rate=0.0)
    (plain,) = tokenize([path], tmp_path / "plain")
    assert files_of(off["output_prefix"]) == files_of(plain["output_prefix"])


def test_fim_rate_applies_to_that_fraction(tmp_path):
    docs = make_docs(400, seed=10)
    (out,) = tokenize([write(tmp_path / "c.jsonl", docs)], tmp_path / "f", fim_rate=0.5)
    ds = read_dataset(out["output_prefix"])
    n_fim = sum(ds[i][0] == fim.fim_tokens(sp_model()).prefix for i in range(len(docs)))
    assert 150 < n_fim < 250


def test_spawned_workers_give_the_same_output(tmp_path):
    path = write(tmp_path / "in.jsonl", make_docs(60, seed=13))
    (a,) = tokenize([path], tmp_path / "fork", start_method="fork")
    (b,) = tokenize([path], tmp_path / "fs", start_method="forkserver", fim_rate=0.0)
    assert files_of(a["output_prefix"]) == files_of(b["output_prefix"])


def test_reruns_are_byte_identical(tmp_path):
    path = write(tmp_path / "in.jsonl", make_docs(250, seed=11))
    (a,) = tokenize([path], tmp_path / "a", block_bytes=3000)
    (b,) = tokenize([path], tmp_path / "b", block_bytes=50_000, workers=1)
    (c,) = tokenize([path], tmp_path / "a", block_bytes=3000)  # over the existing output
    assert files_of(a["output_prefix"]) == files_of(b["output_prefix"])
    assert files_of(c["output_prefix"]) == files_of(b["output_prefix"])


def test_token_dtype_is_the_smallest_that_fits():
    assert token_dtype(512) is np.uint16 and token_dtype(65536) is np.uint16
    assert token_dtype(65537) is np.int32 and token_dtype(128_256) is np.int32


def test_fim_needs_fim_tokens(tmp_path):
    path = write(tmp_path / "c.jsonl", make_docs(5))
    model = Path(tiny_tokenizer()).parent / "train.jsonl"
    from data_prep.train_tokenizer import train_tokenizer

    train_tokenizer([model], tmp_path / "nofim", 384, workers=1)
    opts = TokenizeOptions(
        tokenizer_model=str(tmp_path / "nofim.model"), fim_rate=0.5, workers=0, progress=False
    )
    with pytest.raises(ValueError, match="no <fim_prefix> token"):
        run_tokenize([path], str(tmp_path / "o"), opts)


def test_cli_main_in_process(tmp_path, capsys):
    path = write(tmp_path / "in.jsonl", make_docs(40))
    handler = signal.getsignal(signal.SIGTERM)
    rc = main(
        [
            str(path),
            "--tokenizer-model",
            tiny_tokenizer(),
            "--output-prefix",
            str(tmp_path / "cli"),
            "--no-progress",
            "--workers",
            "1",
        ]
    )
    assert rc == 0 and "40 documents" in capsys.readouterr().out
    rc = main(
        [
            str(path),
            "--tokenizer-model",
            tiny_tokenizer(),
            "--output-prefix",
            str(tmp_path / "sent"),
            "--no-progress",
            "--split-sentences",
            "--punkt-save",
            str(tmp_path / "punkt.json"),
        ]
    )
    assert rc == 0 and Path(str(tmp_path / "sent") + "_text_sentence.idx").is_file()
    assert "abbrev_types" in json.loads((tmp_path / "punkt.json").read_text())
    assert signal.getsignal(signal.SIGTERM) is handler  # main() puts the handler back
    with pytest.raises(SystemExit) as exc:
        main(
            [
                str(path),
                "--tokenizer-model",
                tiny_tokenizer(),
                "--output-prefix",
                str(tmp_path / "x"),
                "--fim-rate",
                "0.5",
                "--split-sentences",
            ]
        )
    assert exc.value.code == 2 and "cannot be combined" in capsys.readouterr().err


def test_script_help_and_real_run_from_repo_root(tmp_path):
    r = run_script("data_prep/tokenize.py", "--help")
    assert r.returncode == 0 and "--output-prefix" in r.stdout and "Traceback" not in r.stderr
    path = write(tmp_path / "in.jsonl", make_docs(60, seed=12))
    r = run_script(
        "data_prep/tokenize.py",
        str(path),
        "--tokenizer-model",
        tiny_tokenizer(),
        "--output-prefix",
        str(tmp_path / "script"),
        "--workers",
        "2",
    )
    assert r.returncode == 0, r.stderr
    assert "60 documents" in r.stdout
    assert len(read_dataset(str(tmp_path / "script_text_document"))) == 60
