"""Fault injection: kill -9, SIGTERM/SIGUSR1, corrupt checkpoints, a stalled rank, full disk,
and a Hydra multirun, all through the real CLI (`python -m orchestration.train`/torchrun)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, cli_experiment, run_checkpoints, run_losses

pytestmark = pytest.mark.distributed


@pytest.fixture
def cli(corpus, tmp_path):
    """Write a `fault` experiment for the synthetic corpus and return a command builder."""
    cli_experiment(tmp_path / "conf", "fault", corpus)

    def command(run_dir: Path, *overrides: str, nproc: int = 0) -> list[str]:
        hydra = ["--config-dir", str(tmp_path / "conf"), "experiment=fault",
                 f"run_dir={run_dir}", f"hydra.run.dir={run_dir}", *overrides]
        if nproc:
            port = 20000 + os.getpid() % 20000
            return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                    f"--master-port={port}", "-m", "orchestration.train", *hydra]
        return [sys.executable, "-m", "orchestration.train", *hydra]

    return command


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run(command: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def reference(cli, tmp_path):
    out = _run(cli(tmp_path / "reference"))
    assert out.returncode == 0, out.stderr[-3000:]
    return run_losses(tmp_path / "reference")


@pytest.mark.slow
@pytest.mark.parametrize("writer", ["sync", "async"])
def test_kill_9_then_restart_resumes_exactly(cli, reference, tmp_path, writer):
    """With ``async``, a background write is often in flight when the kill lands: its
    ``*.tmp`` is never published and the restart takes the previous complete checkpoint."""
    run_dir = tmp_path / "killed"
    extra = ["checkpoint.async_save=true"] if writer == "async" else []
    proc = subprocess.Popen(cli(run_dir, *extra, nproc=2), cwd=REPO, env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while "step_00000006" not in run_checkpoints(run_dir) and time.time() < deadline:
        time.sleep(0.2)
    proc.kill()  # torchrun's pid, as a user does; the ranks follow it (parent watch)
    proc.wait()
    time.sleep(3)
    assert not _job_processes(run_dir), "no rank outlives torchrun"
    killed_at = max(run_losses(run_dir))
    assert 6 <= killed_at < 12, "killed mid-run, after the step-6 checkpoint"
    out = _run(cli(run_dir, *extra, nproc=2))
    assert out.returncode == 0, out.stderr[-3000:]
    assert run_losses(run_dir) == pytest.approx(reference, abs=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "writer"), [(signal.SIGTERM, "sync"), (signal.SIGUSR1, "async")])
def test_signal_checkpoints_current_step_and_resume_continues(sig, writer, cli, reference,
                                                              tmp_path):
    """With the async writer the job exits only once the stop checkpoint is published."""
    run_dir = tmp_path / sig.name
    extra = ["checkpoint.async_save=true"] if writer == "async" else []
    proc = subprocess.Popen(cli(run_dir, *extra), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not (run_dir / "metrics.jsonl").exists() or len(run_losses(run_dir)) < 4:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    stopped_at = max(run_losses(run_dir))
    assert stopped_at < 12 and f"step_{stopped_at:08d}" in run_checkpoints(run_dir)
    out = _run(cli(run_dir, *extra))
    assert out.returncode == 0 and "resumed from" in out.stdout + out.stderr
    assert run_losses(run_dir) == reference


def test_corrupt_newest_checkpoint_falls_back_to_previous(cli, reference, tmp_path):
    run_dir = tmp_path / "corrupt"
    out = _run(cli(run_dir, "train.exit_after_steps=9"))
    assert out.returncode == 0, out.stderr[-3000:]
    newest = run_dir / "checkpoints" / "step_00000009"
    for shard in newest.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])  # truncated mid-write
    (run_dir / "checkpoints" / "step_00000010.tmp").mkdir()  # a save that never finished
    out = _run(cli(run_dir))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step_00000009 is unreadable" in out.stdout + out.stderr
    assert "resumed from" in out.stdout and "step_00000006" in out.stdout
    assert run_losses(run_dir) == reference
    kept = list((run_dir / "checkpoints" / "unloadable").glob("step_00000009-*"))
    assert len(kept) == 1 and len(list(kept[0].glob("*.distcp"))) > 0, "damaged one kept aside"
    assert all(len(p.read_bytes()) == 100 for p in kept[0].glob("*.distcp"))


def test_unloadable_checkpoints_refuse_a_silent_restart(cli, tmp_path):
    """A changed model shape or damage to every checkpoint must not restart from step 0 and
    prune the old checkpoints: the run exits non-zero before any step, naming each one; only
    checkpoint.allow_fresh_start=true trains from scratch, keeping them aside."""
    run_dir = tmp_path / "unloadable"
    out = _run(cli(run_dir, "train.exit_after_steps=6"))
    assert out.returncode == 0, out.stderr[-3000:]
    saved = run_checkpoints(run_dir)
    assert saved == ["step_00000003", "step_00000006"]
    lines = (run_dir / "metrics.jsonl").read_text().count("\n")

    shape = _run(cli(run_dir, "model.num_layers=4"))
    assert shape.returncode != 0
    assert "none of its 2 checkpoint(s) loads" in shape.stdout + shape.stderr
    assert "step_00000006: incompatible with this config (model.num_layers: checkpoint 2, " \
           "this run 4)" in shape.stdout + shape.stderr
    for shard in (run_dir / "checkpoints").glob("step_*/*.distcp"):
        shard.write_bytes(b"garbage")
    damaged = _run(cli(run_dir))
    text = damaged.stdout + damaged.stderr
    assert damaged.returncode != 0
    assert all(f"checkpoints/{name}: damaged (" in text for name in saved), text[-3000:]
    assert run_checkpoints(run_dir) == saved, "nothing pruned or overwritten"
    assert (run_dir / "metrics.jsonl").read_text().count("\n") == lines, "no step trained"

    fresh = _run(cli(run_dir, "checkpoint.allow_fresh_start=true", "train.max_steps=3"))
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    kept = sorted(p.name.split("-")[0] for p in (run_dir / "checkpoints" / "unloadable").iterdir())
    assert kept == saved


@pytest.mark.slow
def test_second_job_on_a_run_dir_fails_naming_the_holder(cli, tmp_path):
    run_dir = tmp_path / "locked"
    stall = "runtime.fault_drill='stall:rank=0,step=3,seconds=45'"  # holds the lock meanwhile
    first = subprocess.Popen(cli(run_dir, stall, "checkpoint.save_interval=0"),
                             cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not (run_dir / "metrics.jsonl").exists():
        assert time.time() < deadline and first.poll() is None
        time.sleep(0.1)
    second = _run(cli(run_dir))
    text = second.stdout + second.stderr
    assert second.returncode != 0 and f"pid {first.pid}" in text and "is in use by" in text
    output, _ = first.communicate(timeout=240)
    assert first.returncode == 0, output[-3000:]
    assert sorted(run_losses(run_dir)) == list(range(1, 13)), "the first run was not disturbed"
    again = _run(cli(run_dir, "train.max_steps=13", "checkpoint.save_interval=0"))
    assert again.returncode == 0, "the lock of a finished job does not block the next"


@pytest.mark.slow
def test_sigusr1_to_local_sh_checkpoints_and_leaves_no_rank(cli, tmp_path):
    """launch/local.sh forwards USR1/TERM to the ranks: every rank checkpoints the same step
    and exits; nothing of the job survives."""
    import psutil

    run_dir = tmp_path / "local_sh"
    hydra = cli(run_dir, nproc=2)
    hydra = hydra[hydra.index("orchestration.train") + 1:]
    env = {**_env(), "NPROC": "2", "TORCHRUN": f"{sys.executable} -m torch.distributed.run"}
    proc = subprocess.Popen(["bash", "launch/local.sh", *hydra], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not (run_dir / "metrics.jsonl").exists() or len(run_losses(run_dir)) < 4:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, output[-3000:]
    stopped_at = max(run_losses(run_dir))
    assert stopped_at < 12 and f"step_{stopped_at:08d}" in run_checkpoints(run_dir)
    time.sleep(2)
    alive = [p.pid for p in psutil.process_iter(["cmdline"])
             if str(run_dir) in " ".join(p.info["cmdline"] or [])]
    assert not alive, f"processes of the job still alive: {alive}"


@pytest.mark.slow
def test_stalled_rank_fails_within_timeout_naming_it(cli, tmp_path):
    start = time.time()
    out = _run(cli(tmp_path / "stall", "runtime.distributed_timeout_s=15",
                   "runtime.fault_drill='stall:rank=1,step=4,seconds=600'", nproc=2),
               timeout=240)
    assert out.returncode != 0
    assert time.time() - start < 180
    text = out.stdout + out.stderr
    assert "rank 0 of 2: a collective timed out during step 4" in text
    assert "did not arrive: rank 1 (host " in text and "last seen at step 4's start" in text, text[-3000:]


def test_hydra_multirun_completes_both_points(cli, tmp_path):
    sweep = tmp_path / "sweep"
    command = [c for c in cli(tmp_path / "unused", "train.max_steps=3", "checkpoint.save_interval=0")
               if not c.startswith(("run_dir=", "hydra.run.dir="))]
    command.insert(3, "--multirun")
    command += ["optim.lr=1e-3,2e-3", f"hydra.sweep.dir={sweep}"]
    out = _run(command)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = sorted(p for p in sweep.iterdir() if (p / "metrics.jsonl").exists())
    assert len(runs) == 2 and all(len(run_losses(r)) == 3 for r in runs)


def _job_processes(run_dir: Path) -> list[int]:
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if str(run_dir) in " ".join(proc.info["cmdline"] or []):
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def test_kill_9_of_torchrun_leaves_no_rank_training(cli, tmp_path):
    """torchrun gives each worker its own session, so only the ranks' own parent watch ends
    them: kill the launcher's pid, as a user does, and no rank may survive it."""
    import psutil

    run_dir = tmp_path / "orphans"
    stall = "runtime.fault_drill='stall:rank=0,step=3,seconds=120'"  # keeps both ranks alive
    launcher = subprocess.Popen(cli(run_dir, stall, nproc=2), cwd=REPO, env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while len(run_losses(run_dir) if (run_dir / "metrics.jsonl").exists() else {}) < 2:
        assert time.time() < deadline and launcher.poll() is None
        time.sleep(0.2)
    ranks = psutil.Process(launcher.pid).children()
    assert len(ranks) == 2 and all(os.getsid(r.pid) != os.getsid(launcher.pid) for r in ranks)
    launcher.kill()
    launcher.wait()
    gone, alive = psutil.wait_procs(ranks, timeout=10)
    assert not alive, f"ranks outlived torchrun: {[p.pid for p in alive]}"
    assert not _job_processes(run_dir)


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs (needs root, as on CI machines): a disk that fills."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs",
                                            str(mount)]).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    yield mount
    subprocess.run(["umount", "-l", str(mount)])


@pytest.mark.slow
@pytest.mark.parametrize("writer", ["sync", "async"])
def test_full_disk_says_so_keeps_the_previous_checkpoint_and_resumes(cli, reference, small_disk,
                                                                     writer):
    """With ``async`` the shards fail in the background writer and surface at finalize."""
    extra = ["checkpoint.async_save=true"] if writer == "async" else []
    run_dir = small_disk / "run"
    out = _run(cli(run_dir, "train.exit_after_steps=3", *extra))
    assert out.returncode == 0, out.stderr[-3000:]
    filler = small_disk / "filler"
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler.write_bytes(b"\0" * (free - 300_000))  # room for the logs, not for a checkpoint

    full = _run(cli(run_dir, *extra))
    text = full.stdout + full.stderr
    assert full.returncode != 0
    assert "checkpoint_info" not in text and "the disk is full (" in text, text[-3000:]
    assert f"free on {run_dir}/checkpoints" in text and "likely to fail for lack of space" in text
    assert run_checkpoints(run_dir) == ["step_00000003"], "partial .tmp removed, step 3 intact"

    filler.unlink()
    again = _run(cli(run_dir, *extra))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout and run_losses(run_dir) == reference
