"""Provenance records (orchestration/metrics/run_record.py): config, versions, git, data manifest."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import yaml

from orchestration.metrics import run_record
from orchestration.metrics.run_record import data_manifest, list_run_records, write_run_record

REPO = Path(__file__).resolve().parents[1]
CONFIG = {"name": "t", "model": {"num_layers": 2, "hidden_size": 64}, "note": "${not.resolved}"}


def _dataset(root: Path, name: str, idx: bytes, bin_size: int) -> str:
    prefix = root / name
    prefix.with_suffix(".idx").write_bytes(idx)
    prefix.with_suffix(".bin").write_bytes(b"\0" * bin_size)
    return str(prefix)


def _clear_slurm(monkeypatch) -> None:
    for key in list(os.environ):
        if key.startswith("SLURM_"):
            monkeypatch.delenv(key)


def test_record_has_config_versions_and_manifest(tmp_path, monkeypatch):
    _clear_slurm(monkeypatch)
    monkeypatch.setenv("SLURM_JOB_ID", "321")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[1-2]")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    monkeypatch.setenv("NCCL_DEBUG", "WARN")
    data = tmp_path / "data"
    data.mkdir()
    prefix = _dataset(data, "web_text_document", b"MMIDIDX\x00\x00" + bytes(range(50)), 4096)
    path = write_run_record(tmp_path / "run", CONFIG, [prefix, str(data / "missing")])
    assert path.parent == tmp_path / "run" / "record" and "job321-restart1" in path.name
    assert yaml.safe_load((path / "config.yaml").read_text()) == CONFIG
    record = json.loads((path / "record.json").read_text())
    versions = record["versions"]
    assert versions["python"] and versions["torch"] and versions["hydra-core"]
    assert "megatron-core" in versions and "cuda_available" in versions
    assert record["job"]["job_id"] == "321" and record["job"]["nodes"] == ["gpu1", "gpu2"]
    assert record["hostname"] and record["environment"]["NCCL_DEBUG"] == "WARN"
    present, missing = record["data"]
    idx_bytes = Path(prefix + ".idx").read_bytes()
    assert present["idx"]["sha256"] == hashlib.sha256(idx_bytes).hexdigest()
    assert present["idx"]["size"] == len(idx_bytes)
    assert present["bin"]["size"] == 4096 and "mtime" in present["bin"]
    assert "sha256" not in present["bin"]  # multi-TB token files are never hashed
    assert missing["idx"]["exists"] is False and missing["bin"]["exists"] is False


def test_each_start_adds_a_record(tmp_path, monkeypatch):
    _clear_slurm(monkeypatch)
    first = write_run_record(tmp_path, CONFIG, [], code_dir=tmp_path)
    second = write_run_record(tmp_path, {**CONFIG, "name": "resumed"}, [], code_dir=tmp_path)
    assert first != second and list_run_records(tmp_path) == [first, second]
    assert yaml.safe_load((first / "config.yaml").read_text())["name"] == "t"
    assert not [p for p in (tmp_path / "record").iterdir() if p.name.endswith(".tmp")]


def test_outside_a_git_repo(tmp_path, monkeypatch):
    _clear_slurm(monkeypatch)
    outside = tmp_path / "not_a_repo"
    outside.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # don't find a parent repo
    path = write_run_record(tmp_path / "run", CONFIG, [], code_dir=outside)
    record = json.loads((path / "record.json").read_text())
    assert record["git"]["available"] is False and record["git"]["error"]
    assert (path / "git.diff").read_text() == ""


def test_git_state_of_this_checkout():
    info, diff = run_record.git_info(REPO)
    if not info["available"]:  # e.g. an exported tarball
        return
    assert isinstance(info["status"], list) and "dirty" in info
    assert info["commit"] is None or len(info["commit"]) == 40
    assert isinstance(diff, str)


def test_idx_hashes_are_cached_by_size_and_mtime(tmp_path, monkeypatch):
    prefix = _dataset(tmp_path, "d", b"abc", 10)
    calls = []
    real = run_record._sha256
    monkeypatch.setattr(run_record, "_sha256", lambda p: calls.append(p) or real(p))
    cache: dict = {}
    data_manifest([prefix], cache)
    data_manifest([prefix], cache)
    assert len(calls) == 1
    Path(prefix + ".idx").write_bytes(b"abcd")  # size changed: hashed again
    entry = data_manifest([prefix], cache)[0]
    assert len(calls) == 2 and entry["idx"]["sha256"] == hashlib.sha256(b"abcd").hexdigest()


def test_huge_idx_is_not_hashed(tmp_path, monkeypatch):
    monkeypatch.setattr(run_record, "HASH_LIMIT_BYTES", 2)
    entry = data_manifest([_dataset(tmp_path, "d", b"abc", 1)])[0]
    assert entry["idx"]["sha256"] is None and "not hashed" in entry["idx"]["note"]
