"""Every YAML in conf/ composes against the schema; bad combinations fail naming the keys."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO
from hydra import compose, initialize_config_dir

from orchestration.config import ConfigError, RunConfig, register_configs, to_run_config, validate

register_configs()
CONF = REPO / "conf"


def _compose(*overrides: str) -> RunConfig:
    with initialize_config_dir(str(CONF), version_base=None):
        cfg = compose("config", overrides=["run_dir=/tmp/unused", *overrides])
    return to_run_config(cfg)


def _group(name: str) -> list[str]:
    return sorted(p.stem for p in (CONF / name).glob("*.yaml"))


@pytest.mark.parametrize("model", _group("model"))
def test_model_yaml_composes(model):
    cfg = _compose(f"model={model}")
    assert cfg.model.name == model
    validate(cfg)


@pytest.mark.parametrize("data", _group("data"))
def test_data_yaml_composes(data):
    cfg = _compose(f"data={data}")
    assert cfg.data.sources, f"conf/data/{data}.yaml lists no sources"


@pytest.mark.parametrize("experiment", _group("experiment"))
def test_experiment_yaml_composes(experiment):
    validate(_compose(f"experiment={experiment}"))


@pytest.mark.parametrize("override", ["model.num_layer=3", "+model.num_layer=3"])
def test_unknown_key_is_rejected_by_schema(override):
    with pytest.raises(Exception, match="num_layer"):
        _compose(override)


@pytest.mark.parametrize("overrides, message", [
    (["parallel.tensor=3"], "model.num_attention_heads=4 is not divisible by parallel.tensor=3"),
    (["model.num_query_groups=3"], "not divisible by model.num_query_groups=3"),
    (["model.hidden_size=130"], "model.hidden_size=130 is not divisible by"),
    (["model.make_vocab_size_divisible_by=100"], "must be a multiple of 64"),
    (["parallel.sequence_parallel=true"], "needs parallel.tensor > 1"),
    (["model.normalization=BatchNorm"], "model.normalization='BatchNorm' is not one of"),
])
def test_bad_combinations_fail_with_named_keys(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(_compose(*overrides))


def test_batch_must_divide_over_data_parallel():
    cfg = _compose("train.global_batch_size=10", "train.micro_batch_size=4")
    with pytest.raises(ConfigError, match="train.global_batch_size=10"):
        validate(cfg, world_size=2)


def test_vocab_padding_follows_tp():
    from orchestration.config import padded_vocab_size

    cfg = _compose("model=k2_65b")
    assert padded_vocab_size(cfg.model, 1) == 32064
    assert padded_vocab_size(cfg.model, 8) == 32256


def test_cli_prints_resolved_config_without_training(tmp_path):
    out = subprocess.run([sys.executable, "-m", "orchestration.train", "--cfg", "job",
                          "model=k2_65b", "parallel.tensor=8"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "num_layers: 80" in out.stdout and "tensor: 8" in out.stdout
