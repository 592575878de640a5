"""Shared fixtures: a synthetic corpus, a tiny run config, and gloo multi-process launching."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))  # tests/corpus.py, tests/dist.py

from corpus import build_corpus  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict:
    return build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture
def tiny_cfg(corpus, tmp_path):
    return make_tiny_cfg(corpus, tmp_path / "run")


def make_tiny_cfg(corpus: dict, run_dir: Path):
    """A fast tiny-model run config on the synthetic corpus (fp32, CPU, no W&B)."""
    from orchestration.config import RunConfig, SourceConfig

    cfg = RunConfig(name="test", run_dir=str(run_dir))
    cfg.model.vocab_size = 256
    cfg.model.num_layers = 2
    cfg.model.hidden_size = 64
    cfg.model.ffn_hidden_size = 128
    cfg.model.seq_length = 64
    cfg.data.tokenizer_model = corpus["tokenizer"]
    cfg.data.sources = [SourceConfig(name=k, path=v) for k, v in corpus["sources"].items()]
    cfg.train.micro_batch_size = 2
    cfg.train.global_batch_size = 8
    cfg.train.max_steps = 6
    cfg.train.eval_interval = 0
    cfg.optim.warmup_steps = 2
    cfg.checkpoint.save_interval = 0
    cfg.logging.wandb_mode = "disabled"
    cfg.runtime.device = "cpu"
    return cfg


@pytest.fixture(scope="session")
def megatron_env():
    """This process as a one-rank gloo world with Megatron's model-parallel groups (TP=PP=1).

    Training runs use spawned processes (tests/dist.py); this is for inspecting built models.
    """
    from megatron_patches.parallel import seed_everything, single_process_world

    single_process_world()
    seed_everything(1234)
    yield


def load_model_config(name: str):
    """conf/model/<name>.yaml as a typed ModelConfig."""
    from orchestration.config import load_model_config as load

    return load(name)


def submitter_env(keep: tuple[str, ...] = ()) -> dict[str, str]:
    """This process's environment as a test passes it to ``sbatch`` (which exports it to the
    job): without an enclosing job's ``SLURM_*`` (they would describe the wrong job) and
    without ``MASTER_ADDR/PORT`` (a test's rendezvous; every job would share that port)."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "MASTER_")) or k in keep}


def run_losses(run_dir: Path) -> dict[int, float]:
    """Per-step loss of a run's metrics.jsonl ({} before it exists); a step re-run after a
    restart keeps its last value."""
    path = run_dir / "metrics.jsonl"
    out = {}
    for line in (path.read_text().splitlines() if path.exists() else []):
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def run_checkpoints(run_dir: Path) -> list[str]:
    """The names under a run's checkpoints/ ([] before it exists), sorted."""
    root = run_dir / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def cli_experiment(conf_dir: Path, name: str, corpus: dict, **sections) -> Path:
    """Write ``conf_dir/experiment/<name>.yaml`` for tests that train through the CLI
    (``--config-dir conf_dir experiment=<name>``): the tiny model on the synthetic corpus, a
    12-step job saving every 3 steps (the fault drills' job); ``sections`` replace sections."""
    exp = {
        "name": name,
        "model": {"vocab_size": 256, "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128,
                  "seq_length": 64},
        "data": {"name": "synthetic", "tokenizer_model": corpus["tokenizer"], "prepare": None,
                 "sources": [{"name": k, "path": v} for k, v in corpus["sources"].items()]},
        "train": {"micro_batch_size": 2, "global_batch_size": 8, "max_steps": 12,
                  "eval_interval": 0, "log_interval": 1},
        "optim": {"warmup_steps": 2},
        "checkpoint": {"save_interval": 3, "keep_last": 5},
        "logging": {"wandb_mode": "disabled"},
        "runtime": {"device": "cpu"},
        **sections,
    }
    path = conf_dir / "experiment" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# @package _global_\n" + yaml.safe_dump(exp))
    return path
