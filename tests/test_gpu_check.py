"""``bench/gpu_check.sh``: its summary table, and its CPU dry run end to end (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.gpu_summary import table  # noqa: E402


def _row(mbs, recompute, tokens=None, full=None, causal=None, **extra):
    row = {"shape": "llama_1b", "mbs": mbs, "recompute": recompute, "spec": "te", **extra}
    if tokens is not None:
        row |= {"tokens_per_s": tokens, "mfu": {"full_attn": full, "causal": causal}}
    return row


def test_summary_table_is_best_first_with_both_mfu_conventions(tmp_path):
    (tmp_path / "versions.json").write_text(json.dumps(
        {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.9", "cuda": "12.9",
         "megatron-core": "0.16.1", "transformer-engine": "2.9", "commit": "abc", "date": "d"}))
    (tmp_path / "mfu.json").write_text(json.dumps([
        _row(4, "none", 40_000.0, 0.34, 0.296), _row(8, "none", oom=True),
        _row(8, "selective", 45_000.0, 0.383, 0.333)]))
    (tmp_path / "overhead.json").write_text(json.dumps(
        {"driver_ms": 501.0, "bare_ms": 500.0, "paired_ratio": 1.002, "driver_syncs": 1,
         "bare_syncs": 1}))
    text = table(str(tmp_path))
    lines = text.splitlines()
    rows = [line for line in lines if line.startswith("| MFU")]
    assert "mbs 8, recompute selective | 45,000 tokens/s; MFU 38.3% full-attention / 33.3% " \
           "causal" in rows[0]
    assert "mbs 4, recompute none" in rows[1] and "out of memory" in rows[2]
    assert "device syncs per step: driver 1, bare 1" in text
    assert "NVIDIA H100 80GB HBM3" in lines[0] and "checkpoint stall" not in text


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT_DIR": str(tmp_path),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = (tmp_path / "summary.md").read_text()
    assert "| MFU (local spec) | tiny, mbs 4, recompute none |" in summary
    assert "device syncs per step: driver 1, bare 1" in summary
    assert "| checkpoint stall |" in summary
    for section in ("versions and layer spec", "MFU grid", "driver step vs bare",
                    "checkpoint stall", "summary (paste"):
        assert section in proc.stdout
    assert "layer_spec: local" in proc.stdout
