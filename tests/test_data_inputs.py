"""No input vanishes: every file is read or listed, empty outputs fail, errors are one line."""

from __future__ import annotations

import bz2
import json
import lzma
from pathlib import Path

import numpy as np
import pytest
import zstandard
from test_data_common import make_docs, read_dataset, tiny_tokenizer, write_jsonl

from data_prep.pipeline import EmptyOutputError, TokenizeOptions
from data_prep.tokenize_cli import EXIT_BAD_ARGS, EXIT_BAD_DATA, EXIT_OUTPUT, main
from data_prep.tokenize_run import run_tokenize


def opts(**kw) -> TokenizeOptions:
    return TokenizeOptions(tokenizer_model=kw.pop("tokenizer_model", tiny_tokenizer()),
                           workers=kw.pop("workers", 1), progress=False, **kw)


def jsonl_bytes(docs: list[str], key: str = "text") -> bytes:
    return "".join(json.dumps({key: d}) + "\n" for d in docs).encode()


def cli(*args: str) -> int:
    return main([*args, "--tokenizer-model", tiny_tokenizer(), "--no-progress", "--workers", "1"])


def test_directory_scan_reads_every_format_and_lists_the_rest(tmp_path):
    docs = make_docs(30, seed=1)
    d = tmp_path / "in"
    write_jsonl(d / "a.JSONL", docs)
    (d / "b.jsonl.bz2").write_bytes(bz2.compress(jsonl_bytes(docs)))
    (d / "c.json.xz").write_bytes(lzma.compress(jsonl_bytes(docs)))
    (d / "sub").mkdir()
    (d / "sub" / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(docs)))
    (d / "README.md").write_text("not data")
    (d / "notes.txt.gz").write_bytes(b"")
    (s,) = run_tokenize([d], str(tmp_path / "out"), opts())
    names = [Path(f["path"]).name for f in s["input_files"]]
    assert names == ["a.JSONL", "b.jsonl.bz2", "c.json.xz", "d.jsonl.zst"]
    assert all(f["documents"] == 30 and f["lines"] == 30 and f["skipped"] == 0
               and f["tokens"] > 0 and len(f["sha256"]) == 64 for f in s["input_files"])
    assert len({f["tokens"] for f in s["input_files"]}) == 1  # same text, same tokens
    ignored = {Path(i["path"]).name: i["reason"] for i in s["ignored_inputs"]}
    assert set(ignored) == {"README.md", "notes.txt.gz"} and "compressed" in ignored["notes.txt.gz"]


@pytest.mark.parametrize("content", [b"", b"{bad\n[1]\n\n"], ids=["zero_bytes", "all_bad"])
def test_an_empty_output_is_an_error_unless_allowed(tmp_path, capsys, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(EmptyOutputError, match="no documents"):
        run_tokenize([path], str(tmp_path / "out"), opts())
    assert cli(str(path), "--output-prefix", str(tmp_path / "out")) == EXIT_BAD_DATA
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--allow-empty" in err and str(path) in err
    assert not list(tmp_path.glob("out*"))
    assert cli(str(path), "--output-prefix", str(tmp_path / "out"), "--allow-empty") == 0
    summary = json.loads((tmp_path / "out_text_document.summary.json").read_text())
    assert summary["documents"] == 0 and (tmp_path / "out_text_document.idx").is_file()


def test_an_empty_file_among_others_is_named(tmp_path):
    write_jsonl(tmp_path / "in" / "a.jsonl", make_docs(5))
    (tmp_path / "in" / "b.jsonl").write_bytes(b"")
    (s,) = run_tokenize([tmp_path / "in"], str(tmp_path / "out"), opts())
    assert s["files_without_documents"] == [str(tmp_path / "in" / "b.jsonl")]


def test_errors_are_one_line_with_distinct_exit_codes(tmp_path, capsys):
    data = write_jsonl(tmp_path / "a.jsonl", make_docs(5))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"this is not a model\n" * 10)
    assert main([str(data), "--tokenizer-model", str(junk), "--output-prefix",
                 str(tmp_path / "o")]) == EXIT_BAD_ARGS == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a sentencepiece model" in err and "ModelProto" not in err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli(str(data), "--output-prefix", str(blocker / "sub" / "o")) == EXIT_OUTPUT == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write output" in err and "Not a directory" in err
    assert cli(str(tmp_path / "missing.jsonl"), "--output-prefix", str(tmp_path / "o")) == 2
    assert "no such input" in capsys.readouterr().err


def test_truncated_zstd_says_how_much_was_lost(tmp_path):
    """Two frames of 1,000 documents; the second is cut. zstd emits a frame's text only as it
    completes, so all of it is lost, and the report says so (it used to say '0 bytes')."""
    docs = make_docs(2000, seed=5)
    second = jsonl_bytes(docs[1000:])
    frame2 = zstandard.ZstdCompressor().compress(second)
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(docs[:1000]))
                     + frame2[: len(frame2) // 2])
    (s,) = run_tokenize([path], str(tmp_path / "o"), opts())
    (e,) = s["skipped_examples"]
    assert s["documents"] == 1000 and e["reason"] == "truncated_input" and e["line"] == 1001
    assert f"declared {len(second):,} bytes of text and decoded 0" in e["detail"]
    assert f"{len(second):,} bytes of text lost" in e["detail"]


def test_truncated_bz2_is_reported(tmp_path):
    path = tmp_path / "cut.jsonl.bz2"
    packed = bz2.compress(jsonl_bytes(make_docs(500, seed=6)))
    path.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(EmptyOutputError):  # one bzip2 block: nothing decodable before the cut
        run_tokenize([path], str(tmp_path / "o"), opts())
    (s,) = run_tokenize([path], str(tmp_path / "o"), opts(allow_empty=True))
    assert s["skipped"] == {"truncated_input": 1}
    assert "bzip2 stream ended before its end marker" in s["skipped_examples"][0]["detail"]


def test_a_utf8_bom_on_line_one_is_accepted(tmp_path):
    docs = make_docs(3, seed=7)
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + jsonl_bytes(docs))
    (s,) = run_tokenize([path], str(tmp_path / "o"), opts())
    assert s["documents"] == 3 and s["skipped_total"] == 0


def _columnar(path: Path, docs: list, kind: str) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": list(range(len(docs))), "content": docs})
    if kind == "parquet":
        pq.write_table(table, path, row_group_size=7)
    else:
        with pa.OSFile(str(path), "wb") as sink, (
            pa.ipc.new_stream if kind == "stream" else pa.ipc.new_file
        )(sink, table.schema) as w:
            for batch in table.to_batches(max_chunksize=5):
                w.write_batch(batch)
    return path


@pytest.mark.parametrize("kind", ["parquet", "stream", "file"])
def test_parquet_and_arrow_match_jsonl(tmp_path, kind):
    docs = make_docs(40, seed=8)
    want = run_tokenize([write_jsonl(tmp_path / "a.jsonl", docs, key="content")],
                        str(tmp_path / "j"), opts(text_key="content"))[0]
    src = _columnar(tmp_path / f"a.{'parquet' if kind == 'parquet' else 'arrow'}", docs, kind)
    (got,) = run_tokenize([src], str(tmp_path / "c"), opts(text_key="content"))
    assert Path(got["output_prefix"] + ".bin").read_bytes() == \
        Path(want["output_prefix"] + ".bin").read_bytes()
    assert got["documents"] == 40 and got["input_files"][0]["lines"] == 40


def test_parquet_without_the_column_or_with_nulls_is_reported(tmp_path):
    src = _columnar(tmp_path / "a.parquet", ["one doc.", None, "two docs."], "parquet")
    (s,) = run_tokenize([src], str(tmp_path / "o"), opts(text_key="content"))
    assert s["documents"] == 2 and s["skipped"] == {"not_a_string": 1}
    assert s["skipped_examples"][0]["line"] == 2 and "null" in s["skipped_examples"][0]["detail"]
    with pytest.raises(EmptyOutputError):
        run_tokenize([src], str(tmp_path / "o2"), opts(text_key="text"))
    (s,) = run_tokenize([src], str(tmp_path / "o2"), opts(text_key="text", allow_empty=True))
    assert "no column 'text' (columns: id, content)" in s["skipped_examples"][0]["detail"]


def test_list_of_sentences_text_as_megatron_reads_it(tmp_path):
    """Megatron-LM's preprocess_data.py: a list is pre-split sentences, one sequence each
    (empty ones dropped), EOS appended to the document's last."""
    from test_data_common import sp_model

    sents = ["First sentence here.", "Second one.", "", "Third and last."]
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"text": sents}) + "\n" + json.dumps({"text": "Plain."}) + "\n")
    (s,) = run_tokenize([path], str(tmp_path / "o"), opts())
    ds = read_dataset(s["output_prefix"])
    sp = sp_model()
    want = [sp.encode(t) for t in sents if sp.encode(t)]
    want[-1] = want[-1] + [sp.eos_id()]
    assert [ds[i].tolist() for i in range(len(want))] == want
    assert list(ds.document_indices) == [0, len(want), len(want) + 1]
    assert s["documents"] == 2 and s["sequences"] == len(want) + 1


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory) -> str:
    """A tiny byte-level BPE tokenizer.json with EOS and the FIM tokens, trained offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from data_prep.fim import FIM_PIECES

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", *FIM_PIECES],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(make_docs(300, seed=2), trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def test_hf_tokenizer_json_matches_the_library_encoding(tmp_path, hf_tokenizer):
    from tokenizers import Tokenizer

    docs = make_docs(60, seed=9) + ["Unicode: café, 東京 🎉"]
    (s,) = run_tokenize([write_jsonl(tmp_path / "a.jsonl", docs)], str(tmp_path / "o"),
                        opts(tokenizer_model=hf_tokenizer, workers=2))
    tok = Tokenizer.from_file(hf_tokenizer)
    eos = tok.token_to_id("<|endoftext|>")
    ds = read_dataset(s["output_prefix"])
    assert [ds[i].tolist() for i in range(len(docs))] == [
        tok.encode(d, add_special_tokens=False).ids + [eos] for d in docs]
    assert ds.index.dtype == np.uint16 and s["tokenizer"]["kind"] == "huggingface"
    assert s["tokenizer"]["eos_id"] == eos


def test_hf_tokenizer_fim_and_eos_rules(tmp_path, hf_tokenizer, capsys):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(hf_tokenizer)
    docs = make_docs(20, seed=11)
    (s,) = run_tokenize([write_jsonl(tmp_path / "a.jsonl", docs)], str(tmp_path / "o"),
                        opts(tokenizer_model=hf_tokenizer, fim_rate=1.0, fim_spm_rate=0.0))
    ds = read_dataset(s["output_prefix"])
    first = ds[0].tolist()
    assert first[0] == tok.token_to_id("<fim_prefix>") and first[-1] == tok.token_to_id(
        "<|endoftext|>")
    rc = main([str(tmp_path / "a.jsonl"), "--tokenizer-model", hf_tokenizer, "--eos-token",
               "<nope>", "--output-prefix", str(tmp_path / "x"), "--no-progress"])
    assert rc == EXIT_BAD_ARGS and "name it with --eos-token" in capsys.readouterr().err
