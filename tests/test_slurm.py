"""The real sbatch scripts on a real SLURM: the 2-node test cluster of launch/testcluster/start.sh.

No fake srun or scontrol here: ``sbatch launch/train.sbatch demo ...`` and
``launch/k2_stage1.sbatch`` made tiny by command-line options and overrides (a CPU partition,
``--gpus-per-node=0``, RANKS_PER_NODE ranks), preemption by ``scancel --signal=USR1`` (to the
steps, and to the batch shell only), by the ``--signal=USR1@N`` time-limit warning and by a plain
``scancel`` (SIGTERM), each requeued and resumed with per-step losses identical to an
uninterrupted run, a node's processes killed with SIGKILL, a Hydra submitit sweep and the
tokenize array job. Skipped when no cluster is up; start one with
``sudo launch/testcluster/start.sh`` (docs/slurm.md, "Testing on a real SLURM").
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, run_losses, submitter_env

pytestmark = pytest.mark.slurm

STATE_DIR = Path(os.environ.get("SLURM_TESTCLUSTER_DIR", "/tmp/open-pretrain-slurm"))
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}  # fmt: skip
# The demo experiment made tiny: 8 steps of 4 sequences, no eval or samples.
DEMO = ["train.max_steps=8", "train.log_interval=1", "train.eval_interval=0",
        "train.sample_interval=0", "train.global_batch_size=4", "train.micro_batch_size=1",
        "checkpoint.save_interval=4"]  # fmt: skip
# Rank 0 sleeps before step 4: the signal of a drill lands while the job is surely running.
STALL = "runtime.fault_drill='stall:rank=0,step=4,seconds={},until=signal'"
CPU = ["--gpus-per-node=0", "--cpus-per-task=2"]  # a CPU node of the test cluster fits two jobs


def _cluster_conf() -> tuple[str | None, str]:
    conf = os.environ.get("SLURM_CONF") or str(STATE_DIR / "slurm.conf")
    if shutil.which("sbatch") is None:
        return None, "SLURM is not installed (apt-get install slurm-wlm munge)"
    if not Path(conf).is_file():
        return None, f"no SLURM test cluster ({conf} missing)"
    try:
        proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True,
                              text=True, timeout=20, env={**os.environ, "SLURM_CONF": conf})
    except subprocess.TimeoutExpired:
        return None, "sinfo timed out"
    up = [line for line in proc.stdout.splitlines() if line.split()[-1] in ("idle", "mix", "alloc")]
    if proc.returncode != 0 or len(up) < 2:
        said = (proc.stdout or proc.stderr).strip().replace("\n", "; ")
        return None, f"the SLURM test cluster is not up (sinfo: {said})"
    return conf, ""


@pytest.fixture(scope="module")
def cluster() -> str:
    conf, why = _cluster_conf()
    if conf is None:
        pytest.skip(f"{why}: start it with `sudo launch/testcluster/start.sh` (docs/slurm.md)")
    return conf


@pytest.fixture(scope="module")
def slurm(cluster, tmp_path_factory) -> Slurm:
    """Submits jobs with the demo corpus prepared once (OPT_DATA_DIR) in a temporary dir."""
    data = tmp_path_factory.mktemp("opt_data")
    prep = subprocess.run([sys.executable, "-m", "data_prep.prepare_demo", "--out",
                           str(data / "demo")], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert prep.returncode == 0, prep.stderr[-3000:]
    return Slurm(cluster, data, tmp_path_factory.mktemp("jobs"))


@dataclass
class Job:
    id: str
    slurm: Slurm
    run_dir: Path | None = None

    def infos(self) -> list[dict[str, str]]:
        """`scontrol show job`: one record, or one per task of an array."""
        out = self.slurm.run(["scontrol", "show", "job", "-o", self.id]).stdout
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line]

    def info(self) -> dict[str, str]:
        return self.infos()[0]

    def wait(self, timeout: float = 300) -> dict[str, str]:
        """Poll until the job (every task of an array) is finished; its `scontrol show job`."""
        deadline = time.time() + timeout
        while True:
            infos = self.infos()
            if infos and all(i.get("JobState") in FINISHED for i in infos):
                return infos[0]
            if time.time() > deadline:
                self.slurm.run(["scancel", self.id])
                raise AssertionError(f"job {self.id} not finished after {timeout}s: {infos}\n"
                                     f"{self.log()[-4000:]}")
            time.sleep(0.5)

    def log(self) -> str:
        """The job's stdout and stderr, every attempt (--open-mode=append)."""
        return "".join(p.read_text(errors="replace")
                       for p in sorted(self.slurm.logs.glob(f"*-{self.id}[._]*")))

    def losses(self) -> dict[int, float]:
        return run_losses(self.run_dir)


class Slurm:
    def __init__(self, conf: str, data: Path, logs: Path):
        self.conf, self.data, self.logs = conf, data, logs

    def env(self, **extra: str) -> dict[str, str]:
        env = submitter_env()
        return env | {
            "SLURM_CONF": self.conf, "PYTHONPATH": str(REPO), "OPT_DATA_DIR": str(self.data),
            # torchrun and python of this environment, in the job too (sbatch exports PATH)
            "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}",
            "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
        } | extra  # fmt: skip

    def run(self, cmd: list[str], env: dict | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, cwd=REPO, env=env or self.env(), capture_output=True,
                              text=True, timeout=timeout)

    def submit(self, script: str, *args: str, options: tuple[str, ...] = (),
               run_dir: Path | None = None, **env: str) -> Job:
        if run_dir is not None:
            env["RUN_DIR"] = str(run_dir)
        name = "%x-%A_%a" if any(o.startswith("--array") for o in options) else "%x-%j"
        proc = self.run(["sbatch", "--parsable", f"--output={self.logs}/{name}.out",
                         f"--error={self.logs}/{name}.err", *options, f"launch/{script}", *args],
                        env=self.env(**env))
        assert proc.returncode == 0, proc.stderr
        return Job(proc.stdout.strip().split(";")[0], self, run_dir)


def _demo(slurm: Slurm, tmp: Path, name: str, *extra: str, nodes: int = 1,
          options: tuple[str, ...] = ()) -> Job:
    return slurm.submit("train.sbatch", "demo", *DEMO, *extra, run_dir=tmp / name,
                        options=(*CPU, f"--nodes={nodes}", "--time=10", *options),  # last wins
                        RANKS_PER_NODE="2")


def _assert_done(job: Job, info: dict[str, str], steps: int = 8) -> None:
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", job.log()[-4000:]
    assert sorted(job.losses()) == list(range(1, steps + 1))
    assert f"done: step {steps}," in job.log()
    # torchrun ignores --node-rank with the c10d rendezvous and says so: it is not passed.
    assert "node_rank is only used for static" not in job.log()


# ------------------------------------------------------------------ the sbatch scripts run


@pytest.fixture(scope="module")
def reference(slurm, drills, tmp_path_factory) -> dict[str, tuple[Job, dict]]:
    """Uninterrupted demo runs: 1 node x 2 ranks and 2 nodes x 2 ranks, submitted together, and
    after the preemption drills, which run meanwhile (`drills`)."""
    tmp = tmp_path_factory.mktemp("reference")
    jobs = {"1x2": _demo(slurm, tmp, "one_node"), "2x2": _demo(slurm, tmp, "two_nodes", nodes=2)}
    return {shape: (job, job.wait()) for shape, job in jobs.items()}


@pytest.mark.parametrize("shape", ["1x2", "2x2"])
def test_train_sbatch_demo_runs_to_the_end(reference, shape):
    """`sbatch --gpus-per-node=0 launch/train.sbatch demo ...` on a CPU partition: RANKS_PER_NODE
    ranks per node (never --nproc-per-node=0), to the last step, exit 0."""
    job, info = reference[shape]
    _assert_done(job, info)
    assert "--nproc-per-node=2" in job.log() and "--nproc-per-node=0" not in job.log()
    nodes = shape[0]
    assert f"--nnodes={nodes}" in job.log() and f"{nodes} nodes x 2 GPUs" in job.log()


@pytest.mark.parametrize("nodes", [1, 2])
def test_k2_stage1_sbatch_made_tiny_runs_to_the_end(slurm, tmp_path, nodes):
    """K2's stage-1 script as shipped (TP 8, PP 4, 60 nodes in its header), shrunk from the
    command line: the later overrides win. 1 node runs the default 1 rank (RANKS_PER_NODE
    unset), 2 nodes run 2 ranks each."""
    overrides = ["parallel.tensor=1", "parallel.pipeline=1", "parallel.sequence_parallel=false",
                 "parallel.virtual_pipeline=1", "parallel.microbatch_group_size=null",
                 "parallel.tp_comm_overlap=false", "model=tiny", "data=demo",
                 "train.precision=fp32", "train.micro_batch_size=1",
                 "stages=[{name: stage1, mix: demo, max_steps: 4, global_batch_size: 4}]",
                 "train.eval_interval=0", "train.log_interval=1", "checkpoint.async_save=false",
                 "checkpoint.save_interval=2", "checkpoint.keep_every=0"]  # fmt: skip
    env = {"RANKS_PER_NODE": "2"} if nodes == 2 else {}
    job = slurm.submit("k2_stage1.sbatch", *overrides, run_dir=tmp_path / "k2",
                       options=(*CPU, f"--nodes={nodes}", "--time=10"), **env)
    _assert_done(job, job.wait(), steps=4)
    ranks = 2 if nodes == 2 else 1
    assert f"--nnodes={nodes} --nproc-per-node={ranks}" in job.log()
    assert (tmp_path / "k2" / "checkpoints" / "step_00000004").is_dir()


# ------------------------------------------------------------------ preemption and requeue


@dataclass
class Drill:
    """How the stop reaches the job: a scancel command once step 3 is logged, or SLURM's own
    time-limit warning (`--signal`)."""

    name: str
    scancel: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    stall: int = 5


DRILLS = [
    Drill("scancel_usr1", scancel=("--signal=USR1",)),
    Drill("scancel_batch_usr1", scancel=("--batch", "--signal=USR1")),
    # The warning is due 100 s after the start; slurmctld sends it at a periodic check (every
    # 30 s), "up to 60 s early" (sbatch(1)), so 40-100 s in. Due at 10 s, it once came before
    # the step existed, and SLURM drops a signal with no step to take it: the job ran to the
    # end. Rank 0 stalls before step 4 until the signal (or 120 s); if it lands during
    # start-up instead, node.sh resends it until the ranks take it.
    Drill("time_limit_warning", options=("--time=5", "--signal=USR1@200"), stall=120),
    # node.sh passes SLURM's SIGTERM on to the ranks as SIGUSR1 (torchrun never sees it).
    Drill("scancel_term", scancel=()),
]


class DrillRunner(threading.Thread):
    """Submits every drill's job at once and, in the background while other tests run, sends
    each its signal once step 3 is logged; rank 0 then requeues it and it resumes to the end."""

    def __init__(self, slurm: Slurm, tmp: Path):
        super().__init__(daemon=True)
        self.slurm = slurm
        self.jobs = {d.name: _demo(slurm, tmp, d.name, STALL.format(d.stall), options=d.options)
                     for d in DRILLS}  # fmt: skip
        self.results: dict[str, tuple[Job, dict]] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._drive()
        except BaseException as exc:  # re-raised in the test thread by outcome()
            self.error = exc

    def _drive(self) -> None:
        done: set[str] = set()  # drills whose signal was sent / whose requeued job was extended
        finished_since: dict[str, float] = {}
        deadline = time.time() + 900
        while len(self.results) < len(DRILLS):
            for drill in (d for d in DRILLS if d.name not in self.results):
                job = self.jobs[drill.name]
                info = job.info()
                first = info.get("Restarts") == "0"
                if drill.name.startswith("scancel") and first and drill.name not in done \
                        and (job.run_dir / "metrics.jsonl").exists() and 3 in job.losses():
                    self.slurm.run(["scancel", *drill.scancel, job.id])
                    done.add(drill.name)
                if drill.options and not first and drill.name not in done:
                    # The requeued job gets a full time slot, as after a 24-hour job's warning.
                    self.slurm.run(["scontrol", "update", f"JobId={job.id}", "TimeLimit=10"])
                    done.add(drill.name)
                # COMPLETED ends it; a scancel'ed job shows CANCELLED until rank 0, after its
                # checkpoint, requeues it: any other end state must last past the kill wait.
                if info.get("JobState") not in FINISHED:
                    finished_since.pop(drill.name, None)
                elif info["JobState"] == "COMPLETED" or \
                        time.time() - finished_since.setdefault(drill.name, time.time()) > 150:
                    self.results[drill.name] = (job, info)
            if time.time() > deadline:
                pending = [j.id for n, j in self.jobs.items() if n not in self.results]
                self.slurm.run(["scancel", *pending])
                raise AssertionError(f"drill jobs {pending} not finished after 900 s")
            time.sleep(0.5)

    def outcome(self) -> dict[str, tuple[Job, dict]]:
        self.join()
        if self.error is not None:
            raise self.error
        return self.results


@pytest.fixture(scope="module")
def drills(slurm, tmp_path_factory) -> DrillRunner:
    runner = DrillRunner(slurm, tmp_path_factory.mktemp("preempted"))
    runner.start()
    return runner


@pytest.fixture(scope="module")
def preempted(drills) -> dict[str, tuple[Job, dict]]:
    return drills.outcome()


@pytest.mark.parametrize("drill", DRILLS, ids=lambda d: d.name)
def test_preemption_checkpoints_requeues_and_resumes_bit_identical(preempted, reference, drill):
    job, info = preempted[drill.name]
    log = job.log()
    # Rank 0 logs its own signal, or the vote of a rank whose handler was in first.
    stop = re.search(r"stopped on (signal SIGUSR1|stop requested on another rank) at step (\d+); "
                     r"requeue requested", log)
    assert stop, f"no stop on a signal before the end:\n{log[-5000:]}"
    assert "SIGUSR1: asking the ranks" in log or "SIGTERM: asking the ranks" in log
    step = int(stop.group(2))
    assert 1 <= step < 8
    assert f"saved {job.run_dir}/checkpoints/step_{step:08d}" in log, "the stop step is saved"
    assert info["Restarts"] == "1", "requeued once, by rank 0"
    assert f"resumed from {job.run_dir}/checkpoints/step_{step:08d}" in log
    _assert_done(job, info)
    assert job.losses() == reference["1x2"][0].losses(), "per-step losses bit for bit"
    if drill.name == "time_limit_warning":  # the warning stopped it, not the limit's SIGTERM
        assert re.search(r"\] SIG(\w+): asking the ranks", log).group(1) == "USR1", log[-5000:]


# ------------------------------------------------------------------ a node lost


def test_a_nodes_processes_killed_end_the_job_naming_it_and_a_resubmit_resumes(
        slurm, reference, tmp_path):
    """SIGKILL to every process of the step on node n2 (its node.sh, torchrun and ranks), while
    rank 0 stalls before step 5 (step 4 saved): srun names the node, the job fails, and the same
    command resubmitted resumes from step 4 to the reference's losses."""
    import psutil

    run_dir = tmp_path / "killed"
    job = _demo(slurm, tmp_path, "killed", "runtime.fault_drill='stall:rank=0,step=5,seconds=45'",
                nodes=2)
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "step_00000004" / "checkpoint_info.json").exists():
        assert time.time() < deadline and job.info()["JobState"] not in FINISHED, job.log()[-4000:]
        time.sleep(0.5)
    listed = slurm.run(["scontrol", "listpids", f"{job.id}.0", "n2"]).stdout.split("\n")[1:]
    pids = [int(line.split()[0]) for line in listed if line.strip()]
    victims = [psutil.Process(p) for p in pids if psutil.pid_exists(p)]
    victims += [c for v in victims for c in v.children(recursive=True)]
    assert len(victims) >= 4, "node.sh, torchrun and 2 ranks on n2"
    for proc in victims:
        proc.kill()
    info = job.wait(timeout=180)
    log = job.log()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", info
    assert re.search(r"srun: error: n2: task \d+: Killed", log), log[-4000:]
    assert sorted(job.losses())[-1] == 4, "no step after the kill"

    again = _demo(slurm, tmp_path, "killed", nodes=2)
    _assert_done(again, again.wait())
    assert "resumed from" in again.log() and "step_00000004" in again.log()
    assert again.losses() == reference["2x2"][0].losses()


# ------------------------------------------------------------------ Hydra sweep via submitit


def test_hydra_multirun_through_the_slurm_launcher(slurm, tmp_path):
    """`-m hydra/launcher=slurm`: submitit submits one SLURM job per point and waits for them."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "orchestration.train", "-m", "hydra/launcher=slurm",
           "experiment=demo", *DEMO, "train.max_steps=3", "checkpoint.save_interval=0",
           "train.micro_batch_size=2", "optim.lr=1e-3,2e-3", "hydra.launcher.gpus_per_node=0",
           "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10",
           f"hydra.sweep.dir={sweep}"]  # fmt: skip
    proc = slurm.run(cmd, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    runs = sorted(p for p in sweep.iterdir() if (p / "metrics.jsonl").exists())
    assert len(runs) == 2 and all(sorted(run_losses(r)) == [1, 2, 3] for r in runs)
    assert {"optim.lr=0.001" in r.name for r in runs} == {True, False}
    # Each point ran as a SLURM job of its own (the run record names its job id).
    jobs = {p.name.split("-job")[1].split("-")[0] for r in runs for p in (r / "record").iterdir()
            if "-job" in p.name}  # fmt: skip
    assert len(jobs) == 2, [list((r / "record").iterdir()) for r in runs]


# ------------------------------------------------------------------ tokenize array job


def test_tokenize_array_job_then_merge_equal_a_single_run(slurm, tmp_path):
    """issue 15: `sbatch --array=1-2 launch/tokenize.sbatch tokenize ...`, then its merge mode
    after the array (afterok): byte-identical to one process; a resubmitted array skips both."""
    from test_data_common import make_docs, tiny_tokenizer, write_jsonl

    from data_prep.pipeline import TokenizeOptions
    from data_prep.tokenize_run import run_tokenize

    inputs = tmp_path / "in"
    for i in range(4):
        write_jsonl(inputs / f"part-{i:03d}.jsonl", make_docs(40 + 13 * i, seed=10 + i))
    out = str(tmp_path / "k2" / "web")
    tok = ["--", "--tokenizer-model", tiny_tokenizer(), "--workers", "1"]
    cpu = ("--cpus-per-task=1",)
    array = slurm.submit("tokenize.sbatch", "tokenize", out, str(inputs), *tok,
                         options=(*cpu, "--array=1-2"))
    merge = slurm.submit("tokenize.sbatch", "merge", out,
                         options=(*cpu, f"--dependency=afterok:{array.id}"))
    info = merge.wait(timeout=300)
    assert info["JobState"] == "COMPLETED", merge.log() + array.log()
    assert "shard 1/2" in array.log() and "shard 2/2" in array.log()
    opts = TokenizeOptions(tokenizer_model=tiny_tokenizer(), workers=1, progress=False)
    (single,) = run_tokenize([inputs], str(tmp_path / "single"), opts)
    for ext in (".bin", ".idx"):
        merged = Path(out + "_text_document" + ext).read_bytes()
        assert merged == Path(single["output_prefix"] + ext).read_bytes(), ext
    rerun = slurm.submit("tokenize.sbatch", "tokenize", out, str(inputs), *tok,
                         options=(*cpu, "--array=1-2"))
    assert rerun.wait(timeout=300)["JobState"] == "COMPLETED", rerun.log()
    assert rerun.log().count("up to date") == 2, rerun.log()
