"""A provenance record per job start: config, code version, software, hosts and data.

Why: months into a run, "which code, which data, which NCCL trained step 180k?" must have an
answer that does not depend on anyone's memory. Rank 0 calls :func:`write_run_record` when a
job starts; each start (first launch and every requeue) adds a new timestamped directory

    <run_dir>/record/20250101T120000Z-job123-restart0/
        config.yaml    the resolved config
        record.json    git commit/status, package and CUDA/NCCL versions, the cluster's job
                       facts (SLURM job id, nodes, restart count), host,
                       data manifest
        git.diff       uncommitted changes to tracked files (``git diff HEAD``; untracked
                       files are listed in the status, not diffed)

written under a temporary name and renamed into place, so a record is complete or absent.
Data manifest: size and sha256 of every ``.idx`` (small: per-document offsets), but only size
and mtime of every ``.bin``: hashing multi-terabyte token files would delay every (re)start
by hours. Hashes are cached by (size, mtime) in ``record/manifest_cache.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from orchestration.cluster.base import detect_cluster
from orchestration.common.files import write_json_atomic
from orchestration.common.paths import REPO_DIR

PACKAGES = ("torch", "megatron-core", "hydra-core", "omegaconf", "sentencepiece", "numpy",
            "transformer-engine", "transformer_engine_torch", "flash-attn", "apex", "wandb",
            "hydra-submitit-launcher")  # fmt: skip
ENV_PREFIXES = ("NCCL_", "TORCH_NCCL_", "CUDA_", "NVTE_", "OMP_NUM_THREADS", "WORLD_SIZE",
                "MASTER_ADDR", "MASTER_PORT", "PYTORCH_CUDA_ALLOC_CONF")  # fmt: skip
HASH_LIMIT_BYTES = 16 * 2**30  # an .idx above this is recorded without a hash


def _git(repo: Path, *args: str) -> str:
    # --no-optional-locks: never write the index (other processes may be using the repo).
    proc = subprocess.run(
        ["git", "--no-optional-locks", "-C", str(repo), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return proc.stdout


def git_info(repo: Path) -> tuple[dict[str, Any], str]:
    """(commit, branch, porcelain status, dirty flag) and the diff; degrades outside git."""
    if shutil.which("git") is None:
        return {"available": False, "error": "git not installed"}, ""
    try:
        status = _git(repo, "status", "--porcelain")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        err = getattr(exc, "stderr", None) or str(exc)
        return {"available": False, "error": err.strip()}, ""
    info: dict[str, Any] = {
        "available": True,
        "status": status.splitlines(),
        "dirty": bool(status.strip()),
    }
    try:
        info["commit"] = _git(repo, "rev-parse", "HEAD").strip()
        info["branch"] = _git(repo, "rev-parse", "--abbrev-ref", "HEAD").strip()
        diff = _git(repo, "diff", "HEAD")
    except subprocess.CalledProcessError:  # no commit yet: staged + unstaged changes
        info["commit"] = None
        diff = _git(repo, "diff", "--cached") + _git(repo, "diff")
    return info, diff


def package_versions() -> dict[str, Any]:
    """Versions of the packages that change numerics or speed, plus Python/CUDA/NCCL."""
    versions: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    versions |= _cuda_versions()
    return versions


def _cuda_versions() -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {}
    out: dict[str, Any] = {
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        try:
            nccl = torch.cuda.nccl.version()
            out["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
            out["cudnn"] = torch.backends.cudnn.version()
            out["gpu"] = torch.cuda.get_device_name()
            out["gpus_per_node"] = torch.cuda.device_count()
        except Exception as exc:  # a record must never stop training
            out["cuda_error"] = repr(exc)
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _file_entry(path: Path, want_hash: bool, cache: dict[str, Any]) -> dict[str, Any]:
    path = path.absolute()  # relative prefixes depend on the cwd: record where they pointed
    if not path.is_file():
        return {"path": str(path), "exists": False}
    st = path.stat()
    entry: dict[str, Any] = {
        "path": str(path),
        "exists": True,
        "size": st.st_size,
        "mtime": st.st_mtime,
    }
    if not want_hash:
        return entry
    if st.st_size > HASH_LIMIT_BYTES:
        entry["sha256"] = None
        entry["note"] = f"larger than {HASH_LIMIT_BYTES} bytes: not hashed"
        return entry
    key = str(path.resolve())
    cached = cache.get(key)
    if cached and cached["size"] == st.st_size and cached["mtime_ns"] == st.st_mtime_ns:
        entry["sha256"] = cached["sha256"]
    else:
        entry["sha256"] = _sha256(path)
        cache[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": entry["sha256"]}
    return entry


def data_manifest(prefixes: list[str], cache: dict[str, Any] | None = None) -> list[dict]:
    """Per Megatron indexed-dataset prefix: ``.idx`` size + sha256, ``.bin`` size + mtime."""
    cache = {} if cache is None else cache
    return [
        {
            "prefix": p,
            "idx": _file_entry(Path(p + ".idx"), True, cache),
            "bin": _file_entry(Path(p + ".bin"), False, cache),
        }
        for p in prefixes
    ]


def _environment() -> dict[str, str]:
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)}


def _record_name(record_root: Path, job: dict[str, Any]) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    base = f"{stamp}-job{job['job_id'] or 'local'}-restart{job['restart_count']}"
    path, n = record_root / base, 1
    while path.exists():
        n += 1
        path = record_root / f"{base}-{n}"
    return path


def _load_cache(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_run_record(
    run_dir: Path, resolved_config: dict, data_prefixes: list[str], code_dir: Path | None = None
) -> Path:
    """Write this job start's record under ``run_dir/record/`` and return its directory.

    ``code_dir`` is the checkout whose git state is recorded (default: this project's).
    """
    record_root = Path(run_dir) / "record"
    record_root.mkdir(parents=True, exist_ok=True)
    job = detect_cluster().job_info()
    cache_path = record_root / "manifest_cache.json"
    cache = _load_cache(cache_path)
    git, diff = git_info(code_dir or REPO_DIR)
    record = {
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "argv": sys.argv,
        "cwd": os.getcwd(),
        "git": git,
        "versions": package_versions(),
        "job": job,
        "environment": _environment(),
        "data": data_manifest(list(data_prefixes), cache),
    }
    final = _record_name(record_root, job)
    tmp = record_root / f".{final.name}.tmp"
    tmp.mkdir()
    try:
        (tmp / "config.yaml").write_text(yaml.safe_dump(resolved_config, sort_keys=False))
        (tmp / "git.diff").write_text(diff)
        write_json_atomic(tmp / "record.json", record)
        os.replace(tmp, final)
    except OSError:  # a full disk: leave no partial record behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_json_atomic(cache_path, cache)
    return final


def list_run_records(run_dir: Path) -> list[Path]:
    """Complete records of a run dir, oldest first."""
    root = Path(run_dir) / "record"
    return (
        sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if root.is_dir()
        else []
    )
