"""launch/eval.sbatch: the array job's commands run task by task as SLURM would run them
(SLURM_ARRAY_TASK_ID set, no SLURM), and, where a SLURM cluster answers, submitted for real."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, submitter_env
from test_export import export_cfg, save_random_checkpoint

OPTIONS = ["--", "--tasks", "tiny_mc", "--limit", "2", "--device", "cpu"]


@pytest.fixture
def run_dir(corpus, tmp_path, megatron_env) -> Path:
    """A run with two kept checkpoints (steps 2 and 4)."""
    cfg = export_cfg(corpus, tmp_path / "run")
    for step, seed in ((2, 0), (4, 1)):
        save_random_checkpoint(cfg, step=step, seed=seed)
    return Path(cfg.run_dir)


def _env(**extra: str) -> dict[str, str]:
    env = submitter_env(keep=("SLURM_CONF",))  # the test cluster's config stays
    return {**env, "PYTHON": sys.executable, "PYTHONPATH": str(REPO), **extra}


def _sbatch(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "launch/eval.sbatch", *args], cwd=REPO, env=_env(**env),
                          capture_output=True, text=True, timeout=600)


def _list_file(run_dir: Path) -> Path:
    (found,) = sorted((run_dir / "eval").glob("array-*.txt"))
    return found


def test_submit_sizes_the_array_from_the_checkpoint_list(run_dir):
    r = _sbatch("submit", str(run_dir), *OPTIONS, DRY_RUN="1", MAX_PARALLEL="4",
                SBATCH_ARGS="--partition=eval --gpus-per-node=8")
    assert r.returncode == 0, r.stderr
    array, table = r.stdout.splitlines()
    assert "--array=1-2%4" in array and "--partition=eval --gpus-per-node=8" in array
    assert array.split().index("task") > array.split().index("launch/eval.sbatch")
    assert "--dependency=afterany:DRYRUN" in table and " table " in table
    lines = _list_file(run_dir).read_text().splitlines()
    assert [Path(p).name for p in lines] == ["step_00000002", "step_00000004"]


def test_task_skips_a_pruned_checkpoint_and_rejects_a_missing_line(run_dir, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"{run_dir}/checkpoints/step_00000099\n")
    r = _sbatch("task", str(listing), *OPTIONS, SLURM_ARRAY_TASK_ID="1")
    assert r.returncode == 0 and "pruned" in r.stderr
    r = _sbatch("task", str(listing), *OPTIONS, SLURM_ARRAY_TASK_ID="2")
    assert r.returncode == 2 and "no line 2" in r.stderr
    assert _sbatch("bogus", "x").returncode == 2


@pytest.mark.slow  # five interpreters importing megatron-core and lm-eval: ~60 s on 2 cores
def test_array_tasks_one_by_one_then_table(run_dir):
    r = _sbatch("submit", str(run_dir), *OPTIONS, DRY_RUN="1")
    assert r.returncode == 0, r.stderr
    listing = _list_file(run_dir)
    for task in ("1", "2"):
        r = _sbatch("task", str(listing), *OPTIONS, SLURM_ARRAY_TASK_ID=task)
        assert r.returncode == 0, r.stderr
    results = run_dir / "eval" / "step_00000002" / "results.json"
    mtime = results.stat().st_mtime_ns
    r = _sbatch("task", str(listing), *OPTIONS, SLURM_ARRAY_TASK_ID="1")
    assert r.returncode == 0 and "cached" in r.stderr and results.stat().st_mtime_ns == mtime
    r = _sbatch("table", str(run_dir), *OPTIONS)
    assert r.returncode == 0, r.stderr
    table = (run_dir / "eval" / "benchmarks.csv").read_text().splitlines()
    assert table[0].startswith("step,tokens,tiny_mc/acc") and len(table) == 3
    assert not (run_dir / "eval" / "hf").exists(), "exports removed"
    listing.unlink()
    r = _sbatch("submit", str(run_dir), *OPTIONS, DRY_RUN="1")
    assert r.returncode == 0 and "nothing to submit" in r.stderr and not r.stdout


def _slurm_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        return subprocess.run(["sinfo"], capture_output=True, timeout=20).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@pytest.mark.slurm
@pytest.mark.skipif(not _slurm_up(), reason="no SLURM cluster answers sinfo")
def test_submitted_to_slurm_for_real(run_dir):
    """The array job and its table job on a real cluster (CPU nodes: no GPUs asked for)."""
    r = _sbatch("submit", str(run_dir), *OPTIONS,
                SBATCH_ARGS="--gpus-per-node=0 --cpus-per-task=2 --time=00:15:00",
                REPO_DIR=str(REPO))
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().splitlines()[-1]
    deadline = time.time() + 900
    table = run_dir / "eval" / "benchmarks.csv"
    while time.time() < deadline and not (table.is_file() and _done(job)):
        time.sleep(5)
    lines = table.read_text().splitlines()
    assert len(lines) == 3, lines
    for name in ("step_00000002", "step_00000004"):
        assert (run_dir / "eval" / name / "results.json").is_file()


def _done(job: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True)
    return out.returncode == 0 and not out.stdout.strip()
