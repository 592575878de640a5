"""orchestration.cluster.slurm: job facts, the preemption flag and self-requeue, without SLURM."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

from orchestration.cluster import signals as slurm
from orchestration.cluster.signals import PreemptionSignal
from orchestration.cluster.slurm import (
    in_slurm,
    master_port,
    requeue_job,
    slurm_info,
    torch_distributed_env,
)


@pytest.fixture
def no_slurm(monkeypatch):
    for key in list(os.environ):
        if key.startswith("SLURM_") or key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(key)
    return monkeypatch


def _fake_scontrol(tmp_path: Path, monkeypatch, exit_code: int = 0) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.args"
    tool = bin_dir / "scontrol"
    tool.write_text(f'#!/bin/sh\necho "$@" > {log}\necho "boom" >&2\nexit {exit_code}\n')
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    return log


def test_slurm_info_outside_and_inside_slurm(no_slurm):
    assert not in_slurm()
    info = slurm_info()
    assert info["job_id"] is None and info["nodes"] == [] and info["restart_count"] == 0
    no_slurm.setenv("SLURM_JOB_ID", "123")
    no_slurm.setenv("SLURM_ARRAY_TASK_ID", "4")
    no_slurm.setenv("SLURM_JOB_NODELIST", "node[01-02],gpu5")
    no_slurm.setenv("SLURM_JOB_NUM_NODES", "3")
    no_slurm.setenv("SLURM_RESTART_COUNT", "2")
    info = slurm_info()
    assert in_slurm() and info["job_id"] == "123" and info["array_task_id"] == 4
    assert info["nodes"] == ["node01", "node02", "gpu5"] and info["num_nodes"] == 3
    assert info["restart_count"] == 2 and info["node_list"] == "node[01-02],gpu5"


def test_torch_distributed_env_from_slurm_tasks(no_slurm):
    assert torch_distributed_env() == {}
    for key, value in {"SLURM_JOB_ID": "777", "SLURM_PROCID": "9", "SLURM_LOCALID": "1",
                       "SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8(x2)",
                       "SLURM_JOB_NODELIST": "gpu[3-4]"}.items():  # fmt: skip
        no_slurm.setenv(key, value)
    env = torch_distributed_env()
    assert env == {"RANK": "9", "LOCAL_RANK": "1", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8",
                   "MASTER_ADDR": "gpu3", "MASTER_PORT": str(master_port(777))}  # fmt: skip
    no_slurm.setenv("RANK", "0")  # torchrun already set everything
    assert torch_distributed_env() == {}


def test_master_port_matches_common_sh_rule():
    assert master_port(123) == 10123 and master_port("20123") == 10123
    assert all(10000 <= master_port(j) < 30000 for j in (0, 1, 19999, 10**9 + 7))


def test_preemption_signal_sets_flag_and_restores_handlers():
    calls = []

    def previous(signum, frame):
        calls.append(signum)

    old_usr1 = signal.signal(signal.SIGUSR1, previous)
    old_term = signal.getsignal(signal.SIGTERM)
    try:
        flag = PreemptionSignal(signals=(signal.SIGUSR1, signal.SIGTERM))
        assert not flag.requested and flag.signal_name is None
        assert signal.getsignal(signal.SIGTERM) == flag._handle  # before sending SIGTERM!
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.requested and flag.signal_name == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)  # the first signal is kept as the reason
        assert flag.signal_name == "SIGUSR1" and flag.received_at is not None
        flag.clear()
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.signal_name == "SIGTERM"
        assert calls == []  # our handler replaced the previous one, it did not chain
        flag.uninstall()
        assert signal.getsignal(signal.SIGUSR1) is previous
        assert signal.getsignal(signal.SIGTERM) == old_term
        os.kill(os.getpid(), signal.SIGUSR1)
        assert calls == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, old_usr1)
        signal.signal(signal.SIGTERM, old_term)


def test_preemption_signal_defaults_and_context_manager():
    before = {s: signal.getsignal(s) for s in slurm.DEFAULT_SIGNALS}
    with PreemptionSignal() as flag:
        assert set(flag.signals) == {signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM}
        os.kill(os.getpid(), signal.SIGUSR2)  # submitit's preemption signal
        assert flag.signal_name == "SIGUSR2"
    assert {s: signal.getsignal(s) for s in slurm.DEFAULT_SIGNALS} == before


def test_preemption_signal_needs_the_main_thread():
    errors = []

    def install():
        try:
            PreemptionSignal(signals=(signal.SIGUSR1,))
        except ValueError as exc:
            errors.append(exc)

    thread = threading.Thread(target=install)
    thread.start()
    thread.join()
    assert errors  # CPython only allows handlers in the main thread: fail loudly


def test_requeue_job_without_slurm_or_scontrol(no_slurm, tmp_path, caplog):
    assert requeue_job() is False  # no SLURM_JOB_ID
    no_slurm.setenv("SLURM_JOB_ID", "55")
    no_slurm.setenv("PATH", str(tmp_path))  # no scontrol here
    assert requeue_job() is False
    assert "scontrol not found" in caplog.text
    assert requeue_job(run_dir=tmp_path / "run") is False
    assert (tmp_path / "run" / "requeue.request").read_text().strip() == "55"


def test_requeue_job_calls_scontrol(no_slurm, tmp_path):
    log = _fake_scontrol(tmp_path, no_slurm)
    no_slurm.setenv("SLURM_JOB_ID", "4242")
    assert requeue_job(run_dir=tmp_path / "run") is True
    assert log.read_text().split() == ["requeue", "4242"]
    assert not (tmp_path / "run" / "requeue.request").exists()
    assert requeue_job("99") is True and log.read_text().split() == ["requeue", "99"]


def test_requeue_job_reports_scontrol_failure(no_slurm, tmp_path, caplog):
    _fake_scontrol(tmp_path, no_slurm, exit_code=1)
    no_slurm.setenv("SLURM_JOB_ID", "1")
    assert requeue_job() is False
    assert "exited 1" in caplog.text and "boom" in caplog.text
