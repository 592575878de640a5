"""The sbatch scripts run end to end on this machine with fake ``srun``/``torchrun``/``scontrol``:
the batch shell, launch/node.sh and the requeue hand-off, as on one node of a real job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_SCRUB = ("SLURM_", "MASTER_", "GPUS_PER_NODE", "RUN_DIR", "RUN_ROOT", "IMAGE", "CONTAINER_",
          "TORCHRUN", "OMP_", "NCCL_", "TORCH_NCCL_", "CUDA_", "K2_", "STAGE1_")  # fmt: skip

FAKE_SRUN = """#!/bin/bash
echo "$@" > "$LOG_DIR/srun.args"
while [[ "$1" == --* ]]; do shift; done   # drop srun's options, run the task locally
SLURM_NODEID=0 exec "$@"
"""

FAKE_TORCHRUN = """#!{python}
import json, os, signal, sys
keys = ("CUDA_DEVICE_MAX_CONNECTIONS", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "MASTER_ADDR",
        "MASTER_PORT", "OMP_NUM_THREADS", "RUN_DIR")
with open(os.path.join(os.environ["LOG_DIR"], "torchrun.json"), "w") as fh:
    json.dump({{"argv": sys.argv[1:], "env": {{k: os.environ.get(k) for k in keys}},
               "usr1_ignored": signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN}}, fh)
if os.environ.get("ASK_REQUEUE"):
    open(os.path.join(os.environ["RUN_DIR"], "requeue.request"), "w").write("77\\n")
"""


@pytest.fixture
def job_env(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = (f'if [[ "$1" == show ]]; then cd {REPO} && {sys.executable} '
                '-m orchestration.cluster.nodelist "$3"; '
                'else echo "$@" >> "$LOG_DIR/scontrol"; fi')  # fmt: skip
    for name, body in (("srun", FAKE_SRUN), ("scontrol", scontrol),
                       ("torchrun", FAKE_TORCHRUN.format(python=sys.executable))):  # fmt: skip
        tool = bin_dir / name
        tool.write_text(body if body.startswith("#!") else f"#!/bin/bash\n{body}\n")
        tool.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUB)}
    return env | {
        "PATH": f"{bin_dir}:/usr/bin:/bin", "LOG_DIR": str(tmp_path), "SLURM_JOB_ID": "77",
        "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "gpu[05-06]", "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_CPUS_PER_TASK": "16", "GPUS_PER_NODE": "8", "RUN_ROOT": str(tmp_path / "runs"),
        # These fake nodes carry layouts the real configs do not fit (K2 on 8 GPUs): the
        # commands are under test here; the config check has its own test below.
        "SKIP_CONFIG_CHECK": "1",
    }  # fmt: skip


def _sbatch(script: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", f"launch/{script}", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def _torchrun_record(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "torchrun.json").read_text())


def test_train_sbatch_runs_torchrun_on_the_node(job_env, tmp_path):
    proc = _sbatch("train.sbatch", "llama_1b", "train.max_steps=100", "name=a b", env=job_env)
    assert proc.returncode == 0, proc.stderr
    srun = (tmp_path / "srun.args").read_text().split()
    assert srun[:3] == ["--nodes=1", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert "--cpus-per-task=16" in srun
    run = _torchrun_record(tmp_path)
    run_dir = str(tmp_path / "runs" / "llama_1b")
    assert run["argv"][-5:] == ["orchestration.train", "experiment=llama_1b",
                                f"run_dir={run_dir}", "train.max_steps=100", "name=a b"]  # fmt: skip
    assert "--rdzv-endpoint=gpu05:10077" in run["argv"] and "--nproc-per-node=8" in run["argv"]
    assert run["usr1_ignored"]  # torchrun must survive SLURM's --signal=USR1
    assert run["env"]["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert run["env"]["MASTER_ADDR"] == "gpu05" and run["env"]["OMP_NUM_THREADS"] == "2"
    assert Path(run_dir).is_dir() and not (tmp_path / "scontrol").exists()


def test_unusable_nodelist_stops_the_job(job_env, tmp_path):
    (tmp_path / "bin" / "scontrol").write_text("#!/bin/bash\nexit 0\n")  # prints no host
    proc = _sbatch("train.sbatch", "tiny", env=job_env)
    assert proc.returncode == 1 and "first host" in proc.stderr
    assert not (tmp_path / "srun.args").exists()


def test_train_sbatch_requires_an_experiment(job_env):
    proc = _sbatch("train.sbatch", env=job_env)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_batch_shell_requeues_when_training_asks(job_env, tmp_path):
    proc = _sbatch("train.sbatch", "tiny", env=job_env | {"ASK_REQUEUE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "scontrol").read_text().split() == ["requeue", "77"]


def test_k2_stage2_needs_a_stage1_checkpoint(job_env):
    proc = _sbatch("k2_stage2.sbatch", env=job_env)
    assert proc.returncode == 1 and "STAGE1_CHECKPOINT" in proc.stderr


def test_k2_stage2_starts_from_stage1_final_checkpoint(job_env, tmp_path):
    checkpoints = tmp_path / "runs" / "k2_stage1" / "checkpoints"
    for step in ("step_00001000", "step_00002000"):
        (checkpoints / step).mkdir(parents=True)
        (checkpoints / step / "checkpoint_info.json").write_text("{}")
    (checkpoints / "step_00003000.tmp").mkdir()  # an interrupted save is never used
    proc = _sbatch("k2_stage2.sbatch", "train.max_steps=5", env=job_env)
    assert proc.returncode == 0, proc.stderr
    argv = _torchrun_record(tmp_path)["argv"]
    assert argv[argv.index("-m") + 2 :] == [
        "experiment=k2_stage2", f"run_dir={tmp_path / 'runs' / 'k2_stage2'}",
        "parallel.tensor=8", "parallel.pipeline=4",
        f"checkpoint.load={checkpoints / 'step_00002000'}", "train.max_steps=5",
    ]  # fmt: skip


def test_k2_stage1_layout(job_env, tmp_path):
    proc = _sbatch("k2_stage1.sbatch", env=job_env)
    assert proc.returncode == 0, proc.stderr
    argv = _torchrun_record(tmp_path)["argv"]
    assert "experiment=k2_stage1" in argv and "parallel.tensor=8" in argv


def test_a_batch_that_does_not_split_fails_before_srun(job_env, tmp_path):
    """The batch shell checks the config against nodes x ranks before starting any step:
    demo's global batch 16 at micro-batch 8 cannot split over 8 data-parallel ranks."""
    env = {k: v for k, v in job_env.items() if k != "SKIP_CONFIG_CHECK"}
    proc = _sbatch("train.sbatch", "demo", env=env)
    assert proc.returncode == 2
    assert "world size 8" in proc.stderr and "train.global_batch_size=16" in proc.stderr
    assert not (tmp_path / "torchrun.json").exists(), "no torchrun was started"
    ok = _sbatch("train.sbatch", "demo", "train.global_batch_size=64", env=env)
    assert ok.returncode == 0, ok.stderr


# A torchrun stand-in: one "rank" in a session of its own (as torch's elastic agent starts its
# workers), which ignores USR1 (inherited) while it "starts up", then installs a handler that
# records the signal and exits 0; the launcher exits with the rank's status.
FAKE_TORCHRUN_WITH_RANK = """#!{python}
import os, signal, subprocess, sys
rank = '''
import os, signal, sys, time
out = sys.argv[1]
open(out + ".started", "w").close()
time.sleep(1.5)  # start-up: USR1 still ignored, as in a rank building its model
signal.signal(signal.SIGUSR1, lambda s, f: (open(out, "w").write("USR1"), sys.exit(0)))
time.sleep(60)
'''
child = subprocess.Popen([sys.executable, "-c", rank, os.environ["LOG_DIR"] + "/rank.signal"],
                         start_new_session=True)
sys.exit(child.wait())
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_node_sh_passes_slurms_stop_signals_on_to_the_ranks(job_env, tmp_path, sig):
    """SLURM signals only the step's task (node.sh), never torchrun's ranks (sessions of their
    own): node.sh turns TERM or USR1 into USR1 for the ranks, and resends it until torchrun
    exits, so a rank that still ignored USR1 when the signal came gets it once its handler is
    in. Old node.sh exec'd torchrun: TERM killed it (and the ranks never heard of USR1)."""
    import signal
    import time

    fake = tmp_path / "bin" / "torchrun"
    fake.write_text(FAKE_TORCHRUN_WITH_RANK.format(python=sys.executable))
    env = job_env | {"MASTER_ADDR": "127.0.0.1", "STOP_RESEND_S": "0.3"}
    proc = subprocess.Popen(["bash", "launch/node.sh", "tiny"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (tmp_path / "rank.signal.started").exists():
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(getattr(signal, sig))  # while the rank still ignores USR1
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert (tmp_path / "rank.signal").read_text() == "USR1"
    assert f"{sig}: asking the ranks of" in err
