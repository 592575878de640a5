"""SLURM launching without SLURM: sbatch headers, shellcheck, the commands common.sh builds for
fake SLURM_* environments, node-list expansion and cluster presets."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from launch.check_sbatch import header_errors, parse_sbatch_headers, run_shellcheck
from launch.cluster import exports, load_preset, sbatch_args, time_to_minutes
from orchestration.cluster.nodelist import expand_nodelist

REPO = Path(__file__).resolve().parents[1]
SBATCH_SCRIPTS = sorted((REPO / "launch").glob("*.sbatch"))
_SCRUB = ("SLURM_", "MASTER_", "GPUS_PER_NODE", "RUN_DIR", "RUN_ROOT", "IMAGE", "CONTAINER_",
          "TORCHRUN", "NPROC", "DRY_RUN", "OMP_", "NCCL_", "TORCH_NCCL_", "CUDA_")  # fmt: skip


def _env(tmp_path: Path | None = None, **extra: str) -> dict[str, str]:
    """The test's environment without SLURM/launcher variables, plus ``extra``.

    PATH is reduced to system dirs (plus ``tmp_path/bin`` for fake tools first), so a real
    scontrol on a developer's machine cannot leak in.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUB)}
    path = "/usr/local/bin:/usr/bin:/bin"
    if tmp_path is not None:
        path = f"{tmp_path / 'bin'}:{path}"
    env |= {"PATH": path, "PYTHON": sys.executable, "TORCHRUN": "torchrun"} | extra
    return env


def _bash(script: str, *args: str, env: dict[str, str]) -> str:
    proc = subprocess.run(
        ["bash", "-c", f"source launch/common.sh && {script}", "bash", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _fake_tool(tmp_path: Path, name: str, body: str) -> Path:
    (tmp_path / "bin").mkdir(exist_ok=True)
    tool = tmp_path / "bin" / name
    tool.write_text(f"#!/bin/bash\n{body}\n")
    tool.chmod(0o755)
    return tool


# ---------------------------------------------------------------- sbatch scripts


def test_sbatch_scripts_exist():
    names = {p.name for p in SBATCH_SCRIPTS}
    assert {"train.sbatch", "k2_stage1.sbatch", "k2_stage2.sbatch"} <= names


@pytest.mark.parametrize("script", SBATCH_SCRIPTS, ids=lambda p: p.name)
def test_sbatch_required_headers(script):
    options = parse_sbatch_headers(script.read_text())
    assert header_errors(options) == []
    assert options["signal"] == "USR1@120"
    assert options["open-mode"] == "append" and "requeue" in options
    assert "%j" in options["output"] and "%j" in options["error"]
    assert options["ntasks-per-node"] == "1" and "gpus-per-node" in options


def test_k2_scripts_use_480_gpus():
    for name in ("k2_stage1.sbatch", "k2_stage2.sbatch"):
        options = parse_sbatch_headers((REPO / "launch" / name).read_text())
        assert int(options["nodes"]) * int(options["gpus-per-node"]) == 480 == 8 * 4 * 15
    assert "checkpoint.load=" in (REPO / "launch" / "k2_stage2.sbatch").read_text()


def test_header_parser_stops_at_first_command_and_reports_missing():
    text = "#!/bin/bash\n#SBATCH -N 2\n#SBATCH --time=1:00:00\necho hi\n#SBATCH --requeue\n"
    options = parse_sbatch_headers(text)
    assert options == {"nodes": "2", "time": "1:00:00"}
    errors = header_errors(options | {"signal": "B:USR1@60", "output": "x.out"})
    assert "missing --requeue" in errors and "missing --open-mode" in errors
    assert any("B:" in e for e in errors) and any("%j" in e for e in errors)


def test_shellcheck_passes():
    ok, output = run_shellcheck(SBATCH_SCRIPTS + sorted((REPO / "launch").glob("*.sh")))
    if "skipped" in output:
        pytest.skip(output)
    assert ok, output


def test_check_sbatch_cli():
    proc = subprocess.run([sys.executable, "launch/check_sbatch.py", "--no-shellcheck"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.count("headers ok") == len(SBATCH_SCRIPTS)


# ---------------------------------------------------------------- torchrun / srun commands


def _torchrun_words(env: dict[str, str], *args: str) -> list[str]:
    return shlex.split(_bash('print_torchrun_cmd "$@"', *args, env=env))


def test_torchrun_command_for_a_fake_slurm_node():
    env = _env(SLURM_NNODES="4", SLURM_NODEID="2", SLURM_JOB_NODELIST="node[01-04]",
               SLURM_JOB_ID="123", SLURM_GPUS_ON_NODE="8")  # fmt: skip
    overrides = ["train.max_steps=100", "name=my run", "data.sources=[a,b]",
                 "logging.wandb_entity='it''s'", "note=$HOME;rm -rf x"]  # fmt: skip
    words = _torchrun_words(env, "k2", *overrides)
    assert words[0] == "torchrun"
    assert "--nnodes=4" in words and "--nproc-per-node=8" in words
    assert "--rdzv-id=123" in words
    # c10d assigns node ranks itself and warns that --node-rank is ignored: not passed.
    assert not any(w.startswith("--node-rank") for w in words)
    assert "--rdzv-backend=c10d" in words
    assert "--rdzv-endpoint=node01:10123" in words  # first host; port 10000 + 123
    module = words.index("-m")
    assert words[module + 1] == "orchestration.train"
    assert words[module + 2 :] == ["experiment=k2", "run_dir=runs/k2", *overrides]


def test_master_is_first_host_and_port_from_job_id(tmp_path):
    env = _env(SLURM_NNODES="3", SLURM_NODEID="0", SLURM_JOB_NODELIST="gpu[007-008],cpu1",
               SLURM_JOB_ID="987654", GPUS_PER_NODE="4", RUN_ROOT="/scratch/runs")  # fmt: skip
    words = _torchrun_words(env, "exp")
    assert f"--rdzv-endpoint=gpu007:{10000 + 987654 % 20000}" in words
    assert "--nproc-per-node=4" in words and "run_dir=/scratch/runs/exp" in words
    env["MASTER_ADDR"], env["MASTER_PORT"], env["RUN_DIR"] = "10.0.0.1", "29500", "/r/x"
    words = _torchrun_words(env, "exp")
    assert "--rdzv-endpoint=10.0.0.1:29500" in words and "run_dir=/r/x" in words


def test_scontrol_is_preferred_when_present(tmp_path):
    _fake_tool(tmp_path, "scontrol", 'echo "fromscontrol-$3"; echo other')
    env = _env(tmp_path, SLURM_JOB_NODELIST="node[1-2]", SLURM_JOB_ID="5")
    assert "--rdzv-endpoint=fromscontrol-node[1-2]:10005" in _torchrun_words(env, "e")


def test_srun_command_plain_and_in_a_container():
    env = _env(SLURM_NNODES="60", SLURM_CPUS_PER_TASK="64")
    words = shlex.split(_bash('print_srun_cmd "$@"', "k2", "a=b c", env=env))
    assert words[:4] == ["srun", "--nodes=60", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert "--cpus-per-task=64" in words
    assert words[-4:] == ["bash", str(REPO / "launch" / "node.sh"), "k2", "a=b c"]
    assert not any(w.startswith("--container") for w in words)
    env |= {"IMAGE": "/images/pretrain.sqsh", "CONTAINER_MOUNTS": "/data:/data"}
    words = shlex.split(_bash('print_srun_cmd "$@"', "k2", env=env))
    assert "--container-image=/images/pretrain.sqsh" in words
    assert f"--container-mounts={REPO}:{REPO},/data:/data" in words
    assert f"--container-workdir={REPO}" in words


def test_distributed_env_defaults_and_overrides():
    env = _env(SLURM_CPUS_PER_TASK="64", GPUS_PER_NODE="8", NCCL_DEBUG="INFO")
    out = _bash("setup_distributed_env && env", env=env)
    values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert values["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert values["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert values["NCCL_DEBUG"] == "INFO"  # the caller's value wins
    assert values["OMP_NUM_THREADS"] == "8"  # 64 CPUs / 8 ranks
    assert "TORCH_NCCL_BLOCKING_WAIT" not in values


def test_cpu_partition_gpus_per_node_zero():
    """--gpus-per-node=0 (a CPU partition) must not divide by zero or ask torchrun for 0
    ranks: RANKS_PER_NODE ranks per node, default 1."""
    env = _env(SLURM_NNODES="2", SLURM_NODEID="0", SLURM_JOB_NODELIST="c[1-2]",
               SLURM_JOB_ID="5", SLURM_GPUS_PER_NODE="0", SLURM_CPUS_PER_TASK="4")  # fmt: skip
    assert "--nproc-per-node=1" in _torchrun_words(env, "demo")
    assert "--nproc-per-node=2" in _torchrun_words({**env, "RANKS_PER_NODE": "2"}, "demo")
    values = dict(line.split("=", 1) for line in _bash(
        'setup_distributed_env; echo "OMP_NUM_THREADS=$OMP_NUM_THREADS"', env=env).split())
    assert values["OMP_NUM_THREADS"] == "4"


def test_local_sh_checks_the_world_size_before_torchrun():
    env = _env(NPROC="3", TORCHRUN="false")  # torchrun would fail: it must not be reached
    proc = subprocess.run(["bash", "launch/local.sh", "experiment=demo"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert "data-parallel size 3" in proc.stderr, proc.stderr


def test_local_sh_dry_run():
    env = _env(NPROC="2", DRY_RUN="1")
    proc = subprocess.run(["bash", "launch/local.sh", "experiment=tiny", "name=a b"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert shlex.split(proc.stdout) == ["torchrun", "--standalone", "--nnodes=1",
                                        "--nproc-per-node=2", "-m", "orchestration.train",
                                        "experiment=tiny", "name=a b"]  # fmt: skip


def test_show_torchrun_cli():
    cmd = [sys.executable, "launch/check_sbatch.py", "--show-torchrun", "--env",
           "SLURM_NNODES=2", "SLURM_NODEID=1", "SLURM_JOB_NODELIST=a[1-2]", "SLURM_JOB_ID=7",
           "--experiment", "k2", "x=1"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    words = shlex.split(proc.stdout)
    assert "--rdzv-endpoint=a1:10007" in words and "--nnodes=2" in words
    assert words[-3:] == ["experiment=k2", "run_dir=runs/k2", "x=1"]


def test_requeue_request_is_acted_on_by_the_batch_shell(tmp_path):
    log = tmp_path / "scontrol.log"
    _fake_tool(tmp_path, "scontrol", f'echo "$@" >> {log}')
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = _env(tmp_path, SLURM_JOB_ID="42")
    _bash('requeue_if_requested "$1"', str(run_dir), env=env)
    assert not log.exists()  # nothing asked
    (run_dir / "requeue.request").write_text("42\n")
    _bash('requeue_if_requested "$1"', str(run_dir), env=env)
    assert log.read_text().split() == ["requeue", "42"]
    assert not (run_dir / "requeue.request").exists()


def test_latest_checkpoint_skips_incomplete(tmp_path):
    root = tmp_path / "checkpoints"
    for name, complete in (("step_00000100", True), ("step_00000200", True),
                           ("step_00000300", False), ("step_00000400.tmp", True)):  # fmt: skip
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / "checkpoint_info.json").write_text("{}")
    out = _bash('latest_checkpoint "$1"', str(tmp_path), env=_env())
    assert out.strip() == str(root / "step_00000200")


# ---------------------------------------------------------------- node lists and presets


@pytest.mark.parametrize(
    ("spec", "hosts"),
    [
        ("node01", ["node01"]),
        ("node[01-04]", ["node01", "node02", "node03", "node04"]),
        ("node[01-04,07],gpu5", ["node01", "node02", "node03", "node04", "node07", "gpu5"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),
        ("n[08-11]", ["n08", "n09", "n10", "n11"]),
        ("rack1-n[1-2]-ib", ["rack1-n1-ib", "rack1-n2-ib"]),
        ("r[1-2]n[3,5]", ["r1n3", "r1n5", "r2n3", "r2n5"]),
        ("a[1-2],b,c[10-11]", ["a1", "a2", "b", "c10", "c11"]),
    ],
)
def test_nodelist_expansion(spec, hosts):
    assert expand_nodelist(spec) == hosts


@pytest.mark.parametrize("bad", ["node[01-04", "node]1[", "node[a-b]", "node[5-3]"])
def test_nodelist_rejects_malformed(bad):
    with pytest.raises(ValueError):
        expand_nodelist(bad)


def test_nodelist_cli():
    proc = subprocess.run([sys.executable, "-m", "orchestration.cluster.nodelist", "x[1-3]"], cwd=REPO,
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert proc.stdout.split() == ["x1", "x2", "x3"]


@pytest.mark.parametrize(("value", "minutes"), [("30", 30), ("30:30", 31), ("24:00:00", 1440),
                                                 ("1-00:00:00", 1440), ("2-12", 3600),
                                                 ("1-01:30", 1530)])  # fmt: skip
def test_slurm_time_to_minutes(value, minutes):
    assert time_to_minutes(value) == minutes


def test_cluster_presets():
    k2 = load_preset("k2_cluster")
    args = sbatch_args(k2)
    assert "--nodes=60" in args and "--gpus-per-node=8" in args and "--exclusive" in args
    assert not any(a.startswith("--partition") for a in args)  # null values are left out
    env = exports(k2)
    assert env["GPUS_PER_NODE"] == "8" and env["CLUSTER_TIME_MIN"] == "1440"
    local = load_preset("local")
    assert local["nodes"] == 1 and "--exclusive" not in sbatch_args(local)


def test_submit_sh_dry_run(tmp_path):
    env = _env(DRY_RUN="1")
    proc = subprocess.run(["bash", "launch/submit.sh", "k2_cluster", "launch/train.sbatch", "k2",
                           "name=a b"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    last = shlex.split(proc.stdout.strip().splitlines()[-1])
    assert last[0] == "sbatch" and "--nodes=60" in last
    assert last[-3:] == ["launch/train.sbatch", "k2", "name=a b"]


def test_hydra_submitit_launcher_config_composes(tmp_path, monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    (tmp_path / "config.yaml").write_text(
        f"x: 1\nhydra:\n  searchpath:\n    - file://{REPO / 'conf'}\n"
    )
    monkeypatch.setenv("CLUSTER_NODES", "4")
    monkeypatch.setenv("CLUSTER_GPUS_PER_NODE", "8")
    monkeypatch.delenv("SLURM_ACCOUNT", raising=False)
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(tmp_path), version_base=None):
        cfg = compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert OmegaConf.get_type(launcher).__name__ == "SlurmQueueConf"  # validated by the schema
    assert launcher.nodes == 4 and launcher.tasks_per_node == 8 and launcher.account is None
    assert launcher.signal_delay_s == 120 and launcher.max_num_timeout > 0
    assert any("CUDA_DEVICE_MAX_CONNECTIONS=1" in line for line in launcher.setup)
