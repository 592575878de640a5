"""Bad input is counted with file and line, --strict stops on it, interrupted runs are safe."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import zstandard
from test_data_common import REPO, make_docs, read_dataset, tiny_tokenizer, write_jsonl

from data_prep.pipeline import TEST_DELAY_ENV, TokenizeOptions
from data_prep.tokenize_cli import EXIT_BAD_DATA, main, run_tokenize

GOOD = json.dumps({"text": "A fine document."}).encode()
BAD_LINES = [  # (raw line, reason): one of every kind of unusable line
    (GOOD, None),
    (b'{"text": "unterminated', "invalid_json"),
    (json.dumps({"content": "wrong key"}).encode(), "missing_key"),
    (b'{"text": "caf\xe9 in latin-1"}', "invalid_utf8"),
    (json.dumps({"text": ""}).encode(), "empty_document"),
    (json.dumps({"text": "  \n\t "}).encode(), "empty_document"),
    (b"", "blank_line"),
    (b"[1, 2, 3]", "not_an_object"),
    (json.dumps({"text": 42}).encode(), "not_a_string"),
    (b'{"text": "lone \\ud800 surrogate"}', "invalid_unicode"),
    (GOOD, None),
]


def opts(**kw) -> TokenizeOptions:
    return TokenizeOptions(
        tokenizer_model=tiny_tokenizer(), workers=kw.pop("workers", 2), progress=False, **kw
    )


def bad_file(path: Path) -> Path:
    path.write_bytes(b"\n".join(line for line, _ in BAD_LINES) + b"\n")
    return path


def test_each_bad_line_is_counted_with_file_and_line(tmp_path):
    path = bad_file(tmp_path / "bad.jsonl")
    (s,) = run_tokenize([path], str(tmp_path / "out"), opts())
    expected = [(i + 1, reason) for i, (_, reason) in enumerate(BAD_LINES) if reason]
    assert [(e["line"], e["reason"]) for e in s["skipped_examples"]] == expected
    assert all(e["file"] == str(path) for e in s["skipped_examples"])
    assert s["skipped"] == {
        "blank_line": 1,
        "empty_document": 2,
        "invalid_json": 1,
        "invalid_unicode": 1,
        "invalid_utf8": 1,
        "missing_key": 1,
        "not_a_string": 1,
        "not_an_object": 1,
    }
    assert s["documents"] == 2 and s["lines"] == len(BAD_LINES)
    assert s["input_files"][0]["skipped"] == 9
    missing = next(e for e in s["skipped_examples"] if e["reason"] == "missing_key")
    assert "'text'" in missing["detail"] and "content" in missing["detail"]
    assert (
        "0xe9" in next(e for e in s["skipped_examples"] if e["reason"] == "invalid_utf8")["detail"]
    )
    assert len(read_dataset(s["output_prefix"])) == 2


def test_line_numbers_hold_across_blocks_and_files(tmp_path):
    docs = make_docs(200, seed=1)
    lines = [json.dumps({"text": d}) for d in docs]
    lines[150] = "{broken"
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "in" / "b.jsonl").write_text("\n".join(lines[:10]) + "\n{oops\n")
    (s,) = run_tokenize([tmp_path / "in"], str(tmp_path / "o"), opts(block_bytes=1000))
    assert [(Path(e["file"]).name, e["line"]) for e in s["skipped_examples"]] == [
        ("a.jsonl", 151),
        ("b.jsonl", 11),
    ]


def truncated(data: bytes, kind: str) -> bytes:
    packed = gzip.compress(data) if kind == "gz" else zstandard.ZstdCompressor().compress(data)
    return packed[: len(packed) * 2 // 3]


def test_truncated_gzip_and_zstd_are_reported(tmp_path):
    docs = make_docs(3000, seed=2)
    data = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    for kind in ("gz", "zst"):
        path = tmp_path / f"cut.jsonl.{kind}"
        path.write_bytes(truncated(data, kind))
        (s,) = run_tokenize([path], str(tmp_path / kind), opts(block_bytes=1 << 14))
        (e,) = s["skipped_examples"]
        assert e["reason"] == "truncated_input" and e["file"] == str(path)
        assert e["line"] == s["documents"] + 1 and 0 < s["documents"] < len(docs)
        assert s["skipped"] == {"truncated_input": 1}


def test_strict_fails_on_first_bad_line_and_leaves_nothing(tmp_path, capsys):
    path = bad_file(tmp_path / "bad.jsonl")
    rc = main(
        [
            str(path),
            "--tokenizer-model",
            tiny_tokenizer(),
            "--output-prefix",
            str(tmp_path / "out"),
            "--strict",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_DATA == 3
    assert f"{path}:2: invalid_json: not valid JSON" in err and "--strict" in err
    assert list(tmp_path.glob("out*")) == []


def test_strict_reports_truncated_gzip(tmp_path, capsys):
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(truncated(b"".join(GOOD + b"\n" for _ in range(5000)), "gz"))
    rc = main(
        [
            str(path),
            "--tokenizer-model",
            tiny_tokenizer(),
            "--output-prefix",
            str(tmp_path / "out"),
            "--strict",
            "--no-progress",
        ]
    )
    assert rc == EXIT_BAD_DATA and "truncated_input: gzip stream ended early" in capsys.readouterr().err
    assert list(tmp_path.glob("out*")) == []


def _valid_pair(prefix: str) -> bool:
    if not (Path(prefix + ".bin").exists() and Path(prefix + ".idx").exists()):
        return False
    try:
        read_dataset(prefix)
        return True
    except Exception:  # noqa: BLE001 - any failure to open means "not a valid pair"
        return False


def _start_slow_run(inputs: Path, prefix: Path) -> subprocess.Popen:
    env = {**os.environ, TEST_DELAY_ENV: "0.2"}
    return subprocess.Popen(
        [
            sys.executable,
            "data_prep/tokenize.py",
            str(inputs),
            "--tokenizer-model",
            tiny_tokenizer(),
            "--output-prefix",
            str(prefix),
            "--block-mb",
            "0.002",
            "--workers",
            "1",
            "--no-progress",
            "--force",  # the previous output is up to date; redo it anyway
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _kill_when_writing(proc: subprocess.Popen, directory: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not list(directory.glob("*.tmp-*.bin")):
        assert proc.poll() is None, "tokenize finished or failed before it could be killed"
        assert time.monotonic() < deadline, "no temporary output appeared"
        time.sleep(0.05)
    time.sleep(0.5)  # a few chunks into the run
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_sigkill_mid_run_leaves_no_valid_looking_pair(tmp_path):
    inputs = write_jsonl(tmp_path / "in.jsonl", make_docs(2000, seed=3))
    prefix = tmp_path / "out" / "run"
    proc = _start_slow_run(inputs, prefix)
    _kill_when_writing(proc, prefix.parent)
    final = str(prefix) + "_text_document"
    assert not _valid_pair(final)
    assert not Path(final + ".idx").exists()
    assert list(prefix.parent.glob("*.tmp-*"))  # the killed run's leftovers...
    (s,) = run_tokenize([inputs], str(prefix), opts())
    assert s["documents"] == 2000 and _valid_pair(final)
    assert not list(prefix.parent.glob("*.tmp-*"))  # ...are removed by the next run


def test_killed_rerun_keeps_the_previous_complete_output(tmp_path):
    inputs = write_jsonl(tmp_path / "in.jsonl", make_docs(2000, seed=4))
    prefix = tmp_path / "out" / "run"
    (first,) = run_tokenize([inputs], str(prefix), opts())
    before = (
        Path(first["output_prefix"] + ".bin").read_bytes(),
        Path(first["output_prefix"] + ".idx").read_bytes(),
    )
    proc = _start_slow_run(inputs, prefix)
    _kill_when_writing(proc, prefix.parent)
    after = (
        Path(first["output_prefix"] + ".bin").read_bytes(),
        Path(first["output_prefix"] + ".idx").read_bytes(),
    )
    assert after == before


def test_sigterm_mid_run_cleans_up_its_temporary_files(tmp_path):
    inputs = write_jsonl(tmp_path / "in.jsonl", make_docs(2000, seed=5))
    prefix = tmp_path / "out" / "run"
    proc = _start_slow_run(inputs, prefix)
    deadline = time.monotonic() + 60
    while not list(prefix.parent.glob("*.tmp-*.bin")) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert list(prefix.parent.glob("run*")) == []
