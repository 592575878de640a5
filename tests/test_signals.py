"""A signal to any process of a job (torchrun, launch/local.sh, one rank) ends with every rank
checkpointing the same step and exiting cleanly, nothing of the job left running, and a resume
whose per-step losses equal an uninterrupted run's bit for bit. Plus the pieces: Megatron's
writer helper process survives stop signals, a vanished stdout does not end a save, a stop
signal during start-up is kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from conftest import REPO, cli_experiment, run_checkpoints, run_losses


@pytest.fixture(scope="module")
def conf_dir(corpus, tmp_path_factory) -> Path:
    conf = tmp_path_factory.mktemp("signals") / "conf"
    cli_experiment(conf, "fault", corpus)  # the same tiny job as tests/test_faults.py
    return conf


def _hydra(conf: Path, run_dir: Path, *overrides: str) -> list[str]:
    return ["--config-dir", str(conf), "experiment=fault", f"run_dir={run_dir}",
            f"hydra.run.dir={run_dir}", *overrides]


def _torchrun(conf: Path, run_dir: Path, *overrides: str, flags: tuple = ()) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
            *flags, "-m", "orchestration.train", *_hydra(conf, run_dir, *overrides)]


def _local_sh(conf: Path, run_dir: Path, *overrides: str) -> list[str]:
    return ["bash", "launch/local.sh", *_hydra(conf, run_dir, *overrides)]


def _node_sh(conf: Path, run_dir: Path, *overrides: str) -> list[str]:
    """What srun runs on each node (launch/node.sh execs torchrun), as on a one-node job.
    node.sh puts EXPERIMENT first, so the test's conf dir comes as an override."""
    return ["bash", "launch/node.sh", "fault", f"hydra.searchpath=[file://{conf}]",
            f"hydra.run.dir={run_dir}", *overrides]


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    return env | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "NPROC": "2",
                  "GPUS_PER_NODE": "2",
                  "TORCHRUN": f"{sys.executable} -m torch.distributed.run"} | extra


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def reference(conf_dir, tmp_path_factory) -> dict[int, float]:
    """The uninterrupted two-rank run's per-step losses."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    out = subprocess.run(_torchrun(conf_dir, run_dir), cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return run_losses(run_dir)


class Job:
    """A launched job, the processes it has had (Megatron's spawned helpers included: their
    command lines do not name the run dir), and its output."""

    def __init__(self, command: list[str], run_dir: Path, **env: str) -> None:
        self.run_dir = run_dir
        self.log = run_dir.parent / f"{run_dir.name}.log"
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(command, cwd=REPO, env=_env(**env), stdout=log,
                                         stderr=subprocess.STDOUT)
        self.seen: dict[int, psutil.Process] = {}

    def _track(self) -> None:
        try:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                self.seen.setdefault(child.pid, child)
        except psutil.Error:
            pass

    def wait_for(self, ready, what: str, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while not ready():
            self._track()
            assert self.proc.poll() is None, f"exited before {what}:\n{self.text()[-3000:]}"
            assert time.time() < deadline, f"no {what} in {timeout} s:\n{self.text()[-3000:]}"
            time.sleep(0.1)
        self._track()

    def ranks(self) -> list[psutil.Process]:
        """The training ranks: torchrun's children (a rank's forked writers share its command
        line and environment, so they are told apart by their parent)."""
        return [p for p in self.torchrun().children()
                if "orchestration.train" in " ".join(p.cmdline())]

    def torchrun(self) -> psutil.Process:
        """The launched process itself, or its torchrun child (launch/local.sh)."""
        launched = psutil.Process(self.proc.pid)
        for proc in (launched, *launched.children()):
            try:
                if "torch.distributed.run" in " ".join(proc.cmdline()):
                    return proc
            except psutil.Error:
                continue
        raise AssertionError("no torchrun process found")

    def finish(self, timeout: float = 300) -> int:
        deadline = time.time() + timeout
        while self.proc.poll() is None and time.time() < deadline:
            self._track()
            time.sleep(0.2)
        if self.proc.poll() is None:
            self.proc.kill()
            pytest.fail(f"still running after {timeout} s:\n{self.text()[-3000:]}")
        return self.proc.returncode

    def survivors(self, grace: float = 10) -> list[str]:
        """Processes of the job still alive ``grace`` seconds after it ended."""
        _, alive = psutil.wait_procs(list(self.seen.values()), timeout=grace)
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        for proc in psutil.process_iter(["cmdline"]):  # anything naming the run dir
            if str(self.run_dir) in " ".join(proc.info["cmdline"] or []) and proc not in alive:
                alive.append(proc)
        described = []
        for proc in alive:
            try:
                described.append(f"{proc.pid} {' '.join(proc.cmdline())[:200]}")
                proc.kill()  # leave nothing behind for the next test
            except psutil.Error:
                continue
        return described

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def _signal_target(job: Job, target: str) -> int:
    if target == "torchrun":
        return job.torchrun().pid
    if target == "local.sh":
        return job.proc.pid
    ranks = sorted(job.ranks(), key=lambda p: int(p.environ()["RANK"]))
    assert len(ranks) == 2, "both ranks found"
    return ranks[1].pid  # rank 1: not the rank that logs and requeues


def _assert_clean_stop(job: Job, status: int, launcher_status: int | None) -> int:
    """Every rank checkpointed the same step and exited 0; nothing of the job survives."""
    text = job.text()
    survivors = job.survivors()
    assert not survivors, f"processes of the job still alive: {survivors}"
    if launcher_status is not None:
        assert status == launcher_status, text[-3000:]
    assert "Error executing job" not in text and _only_torchruns_traceback(text), text[-3000:]
    assert "forcefully exiting" not in text, "torchrun had to SIGKILL a rank"
    assert "done: step" in text, "rank 0 finished the run"
    stopped_at = max(run_losses(job.run_dir))
    assert stopped_at < 12, "stopped before the end"
    assert run_checkpoints(job.run_dir)[-1] == f"step_{stopped_at:08d}", "checkpoint of the stop step"
    assert not any(c.endswith(".tmp") for c in run_checkpoints(job.run_dir)), "no partial save left"
    return stopped_at


def _only_torchruns_traceback(text: str) -> bool:
    return text.count("Traceback") == text.count("SignalException: Process")


# (who is signalled, how the job is launched, the signal, torchrun's exit status: it re-raises
# the signal it passed on; None where not checked)
DRILLS = {
    "TERM-to-torchrun": ("torchrun", "torchrun", signal.SIGTERM, 1),
    "INT-to-torchrun": ("torchrun", "torchrun", signal.SIGINT, 1),
    "USR1-to-torchrun-under-local.sh": ("torchrun", "local.sh", signal.SIGUSR1, 1),
    "TERM-to-torchrun-under-node.sh": ("torchrun", "node.sh", signal.SIGTERM, 1),
    "TERM-to-local.sh": ("local.sh", "local.sh", signal.SIGTERM, 0),
    "TERM-to-one-rank": ("rank", "torchrun", signal.SIGTERM, 0),
}


def _launch(how: str, conf: Path, run_dir: Path, *overrides: str) -> Job:
    if how == "local.sh":
        return Job(_local_sh(conf, run_dir, *overrides), run_dir)
    if how == "node.sh":
        return Job(_node_sh(conf, run_dir, *overrides), run_dir, RUN_DIR=str(run_dir),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    return Job(_torchrun(conf, run_dir, *overrides), run_dir)


def test_sigterm_to_torchrun_checkpoints_the_stop_step_on_every_rank(conf_dir, tmp_path):
    """The default-suite drill: SIGTERM to torchrun's pid, as ``kill PID`` or a job scheduler
    does. torchrun passes it on with ``killpg`` to every rank's process group, which also holds
    Megatron's checkpoint-writer helper (a Manager process): before the fix it died, and both
    ranks failed their stop checkpoint with BrokenPipeError, leaving ``step_N.tmp`` (the helper
    starts with a rank's first save, hence one before the signal)."""
    run_dir = tmp_path / "term"
    job = _launch("torchrun", conf_dir, run_dir, "checkpoint.save_interval=2")
    job.wait_for(lambda: "step_00000002" in run_checkpoints(run_dir) and len(run_losses(run_dir)) >= 3,
                 "the step-2 checkpoint and step 3")
    os.kill(job.torchrun().pid, signal.SIGTERM)
    status = job.finish()
    _assert_clean_stop(job, status, 1)


@pytest.mark.slow
@pytest.mark.parametrize("drill", list(DRILLS))
def test_signal_anywhere_stops_every_rank_at_one_step_and_resumes_exactly(
        drill, conf_dir, reference, tmp_path):
    target, how, sig, launcher_status = DRILLS[drill]
    run_dir = tmp_path / drill
    job = _launch(how, conf_dir, run_dir)
    job.wait_for(lambda: "step_00000003" in run_checkpoints(run_dir) and len(run_losses(run_dir)) >= 4,
                 "the step-3 checkpoint and step 4")
    os.kill(_signal_target(job, target), sig)
    status = job.finish()
    stopped_at = _assert_clean_stop(job, status, launcher_status)
    assert stopped_at >= 4

    again = _launch("torchrun", conf_dir, run_dir)
    assert again.finish() == 0, again.text()[-3000:]
    assert f"resumed from {run_dir}/checkpoints/step_{stopped_at:08d}" in again.text()
    assert run_losses(run_dir) == reference, "per-step losses equal the uninterrupted run's"
    assert not again.survivors()


# ------------------------------------------------------------------------ the pieces


def _python(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_writer_queue_survives_stop_signals_and_dies_with_its_process(tmp_path):
    """The queue's server ignores TERM/USR1/INT/HUP sent to its process group, keeps serving,
    and is gone within seconds of a SIGKILL of the process that started it. Fails, too, when
    Megatron-Core moves what megatron_patches/writer_queue.py replaces."""
    code = """
        import inspect, os, signal, sys, time
        from megatron.core.dist_checkpointing.strategies import filesystem_async
        from megatron_patches import writer_queue
        module, queue, factory = writer_queue.UPSTREAM
        assert hasattr(module, queue), f"{module.__name__}.{queue} moved"
        source = inspect.getsource(getattr(module, factory))
        assert "Manager()" in source and queue in source, "no longer a Manager queue"
        writer_queue.shield()
        server = writer_queue.server_pid()
        print(server, flush=True)
        signal.signal(signal.SIGTERM, lambda *a: None)  # as a training rank: only a flag
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP):
            os.kill(server, sig)
        time.sleep(1)
        queue = filesystem_async._get_write_results_queue()
        queue.put("still serving")
        print(queue.get(), flush=True)
        time.sleep(600)
    """
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        server = int(proc.stdout.readline())
        assert proc.stdout.readline().strip() == "still serving", proc.stderr.read()[-3000:]
        assert psutil.Process(server).ppid() == proc.pid
    finally:
        proc.kill()
        proc.wait()
    _, alive = psutil.wait_procs([psutil.Process(server)], timeout=10)
    assert not alive, "the server outlived its rank"


def test_a_vanished_stdout_does_not_end_the_process(tmp_path):
    """A reader that went away (``| tee`` hit by Ctrl-C) must not turn the next print, log
    line or the exit-time flush into an error."""
    done = tmp_path / "done"
    code = f"""
        import logging, sys, time
        from orchestration.cluster.streams import guard_standard_streams
        guard_standard_streams()
        logging.basicConfig(stream=sys.stdout, level=logging.INFO)
        time.sleep(1)  # the reader is gone by now
        for _ in range(200):
            print("x" * 200)
            logging.info("a log line")
            print("y", file=sys.stderr)
        open({str(done)!r}, "w").write("saved")
    """
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    proc.stderr.close()
    assert proc.wait(timeout=120) == 0
    assert done.read_text() == "saved"


def test_stop_signal_during_start_up_is_kept_and_a_second_ctrl_c_aborts():
    out = _python("""
        import os, signal
        from orchestration.cluster import signals
        early = signals.catch_early()
        os.kill(os.getpid(), signal.SIGTERM)  # while the job is still starting
        loop = signals.PreemptionSignal(signals.STOP_SIGNALS)
        assert loop.signal_name == "SIGTERM" and not early.requested, "taken over once"
        later = signals.PreemptionSignal(signals.STOP_SIGNALS)
        assert not later.requested, "a later job of the process does not see it again"
        os.kill(os.getpid(), signal.SIGINT)
        assert later.signal_name == "SIGINT"
        try:
            os.kill(os.getpid(), signal.SIGINT)
        except KeyboardInterrupt:
            print("aborted")
    """)
    assert out.stdout.strip() == "aborted", out.stderr[-3000:]
    assert "SIGTERM: finishing the step, then every rank saves a checkpoint" in out.stderr


@pytest.mark.parametrize("ignored", [True, False])
def test_a_stop_signal_while_the_process_exits_is_ignored(ignored):
    """The SIGUSR1 node.sh passes on after a requeue's SIGTERM reached ranks whose stop
    checkpoint was saved: CPython had reset the handlers while finalizing, the ranks died of it
    (exit -10) and torchrun reported a failure. Without ignore_while_exiting it still does."""
    out = _python(f"""
        import os, subprocess, time
        from orchestration.cluster import signals
        signals.catch_early()
        if {ignored}:
            signals.ignore_while_exiting()
        class SlowToFinalize:  # a module global torn down after the signal handlers
            def __del__(self):
                time.sleep(1.5)
        subprocess.Popen(["bash", "-c", f"sleep 0.5; kill -USR1 {{os.getpid()}}"])
        slow = SlowToFinalize()
    """)
    assert out.returncode == (0 if ignored else -signal.SIGUSR1), out.stderr[-2000:]


def test_stall_drill_until_signal_ends_on_a_stop_signal_and_a_plain_one_does_not():
    out = _python("""
        import os, signal, threading, time
        from megatron_patches.parallel import single_process_group
        from orchestration.cluster.signals import PreemptionSignal
        from orchestration.loop.step import maybe_stall
        single_process_group()
        stop = PreemptionSignal()
        def requested():
            return stop.requested
        for drill in ("stall:rank=0,step=4,seconds=60,until=signal",
                      "stall:rank=0,step=4,seconds=3"):
            stop.clear()
            threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGUSR1)).start()
            start = time.monotonic()
            maybe_stall(drill, 4, requested)
            print(f"{time.monotonic() - start:.1f}")
        maybe_stall("stall:rank=0,step=4,seconds=60,until=signal", 5, requested)  # no stall
    """)
    until_signal, plain = map(float, out.stdout.split())
    assert 0.4 < until_signal < 5 and plain >= 3, out.stderr[-2000:]


def test_unhandled_by_reads_what_a_process_would_die_of():
    from orchestration.cluster.signals import unhandled_by

    sleeper = subprocess.Popen(["bash", "-c", "trap '' USR2; trap 'exit 0' TERM; sleep 60"])
    try:
        deadline = time.time() + 10
        while "SIGTERM" in unhandled_by(sleeper.pid, (signal.SIGTERM,)) and time.time() < deadline:
            time.sleep(0.05)
        assert unhandled_by(sleeper.pid, (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)) == [
            "SIGUSR1"]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_metrics_wait_in_memory_while_the_disk_is_full(tmp_path):
    """A full disk (here a file-size limit: EFBIG, with a partial write first) must not end
    the run from the metrics log: the lines wait in memory and land whole, once each."""
    out = _python(f"""
        import json, logging, resource, signal
        from pathlib import Path
        logging.basicConfig(level=logging.INFO)
        from orchestration.config import LoggingConfig
        from orchestration.metrics.logger import MetricsLogger
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        logger = MetricsLogger(Path({str(tmp_path)!r}), LoggingConfig(wandb_mode="disabled"),
                               "t", {{}}, True)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))
        for step in range(1, 41):
            logger.log({{"step": step, "loss": 1.0 / step}}, echo=False)
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        logger.log({{"step": 41, "loss": 0.5}}, echo=False)
        logger.close()
        lines = Path({str(tmp_path)!r}, "metrics.jsonl").read_text().splitlines()
        print([json.loads(line)["step"] for line in lines] == list(range(1, 42)))
    """)
    assert out.stdout.strip() == "True", out.stderr[-3000:]
    assert "cannot append to" in out.stderr and "is written again" in out.stderr


def test_what_a_rank_forks_dies_with_it():
    """Megatron's background checkpoint writer is a fork of the rank, and its write workers
    forks of that: once the rank is SIGKILLed (its launcher died) none may live on."""
    code = """
        import multiprocessing as mp, os, time
        from orchestration.cluster.parent_watch import die_with_launcher

        def writer(depth):
            if depth:
                mp.get_context("fork").Process(target=writer, args=(depth - 1,)).start()
            print(os.getpid(), flush=True)
            time.sleep(600)

        if __name__ == "__main__":
            assert die_with_launcher()
            mp.get_context("fork").Process(target=writer, args=(1,)).start()
            time.sleep(600)
    """
    env = {**os.environ, "TORCHELASTIC_RUN_ID": "test"}
    rank = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        forked = [psutil.Process(int(rank.stdout.readline())) for _ in range(2)]
    finally:
        rank.kill()
        rank.wait()
    _, alive = psutil.wait_procs(forked, timeout=10)
    for proc in alive:
        proc.kill()
    assert not alive, "a fork of the rank outlived it"
