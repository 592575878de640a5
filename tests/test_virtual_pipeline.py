"""Interleaved pipeline (``parallel.virtual_pipeline``): the same training as plain 1F1B.

Two pipeline ranks with two model chunks each (Megatron's interleaved 1F1B schedule) must give
the per-step losses of the same run at PP=2 without interleaving, and their checkpoints must
hold the same model: the chunks are saved under Megatron-LM's ``model0``/``model1`` keys with
global layer numbers, so export (a TP=1/PP=1 model) and resuming both read them.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from dist import run_distributed, run_single

pytestmark = pytest.mark.distributed

STEPS = 4


@pytest.fixture(scope="module")
def four_layer_init(tmp_path_factory, corpus):
    """A 4-layer muP model's step-0 checkpoint (PP ranks would otherwise initialise their layers
    from different RNG streams), and the single-process losses from it."""
    from conftest import make_tiny_cfg

    cfg = make_tiny_cfg(corpus, tmp_path_factory.mktemp("vp_ref") / "run")
    cfg.model.num_layers = 4
    cfg.mup.enabled = True  # the multipliers hook into the chunks that embed and unembed
    cfg.mup.base_width = 32
    cfg.train.max_steps = STEPS
    cfg.checkpoint.save_initial = True
    return cfg, run_single(cfg)


def _pipeline_cfg(base, run_dir: Path, virtual: int):
    cfg = copy.deepcopy(base)
    cfg.run_dir = str(run_dir)
    cfg.checkpoint.save_initial = False
    cfg.checkpoint.load = f"{base.run_dir}/checkpoints/step_00000000"
    cfg.checkpoint.load_optimizer = False
    cfg.checkpoint.save_interval = 2
    cfg.parallel.pipeline, cfg.parallel.virtual_pipeline = 2, virtual
    return cfg


def _final_weights(cfg) -> dict[str, torch.Tensor]:
    from orchestration.hf.offline import load_megatron_weights

    return load_megatron_weights(Path(cfg.run_dir) / "checkpoints" / f"step_{STEPS:08d}", cfg)


def test_interleaved_pipeline_matches_plain_pipeline(four_layer_init, tmp_path):
    base, single = four_layer_init
    plain = _pipeline_cfg(base, tmp_path / "pp2", virtual=1)
    interleaved = _pipeline_cfg(base, tmp_path / "pp2vp2", virtual=2)
    plain_out = run_distributed(plain, 2)
    vp_out = run_distributed(interleaved, 2)

    assert len(vp_out["losses"]) == STEPS
    assert vp_out["losses"] == pytest.approx(plain_out["losses"], abs=1e-5)
    assert vp_out["losses"] == pytest.approx(single["losses"], abs=2e-4)
    info = (Path(interleaved.run_dir) / "checkpoints" / f"step_{STEPS:08d}"
            / "checkpoint_info.json").read_text()
    assert '"vp": 2' in info

    # The interleaved checkpoint opens as one TP=1/PP=1 model with every layer in place.
    plain_weights, vp_weights = _final_weights(plain), _final_weights(interleaved)
    assert sorted(vp_weights) == sorted(plain_weights)
    assert any(".layers.3." in name for name in vp_weights)
    for name, tensor in plain_weights.items():
        torch.testing.assert_close(vp_weights[name], tensor, atol=1e-5, rtol=0)


@pytest.mark.slow  # ~60 s on 2 cores: two 2-rank runs
def test_interleaved_pipeline_resumes_exactly(four_layer_init, tmp_path):
    """Weights and Adam state of both chunks round-trip: a resume from step 2 repeats the
    uninterrupted run's steps 3-4 bit for bit."""
    base, _ = four_layer_init
    cfg = _pipeline_cfg(base, tmp_path / "run", virtual=2)
    full = run_distributed(cfg, 2)["losses"]
    shutil.rmtree(Path(cfg.run_dir) / "checkpoints" / f"step_{STEPS:08d}")
    resumed = run_distributed(cfg, 2)["losses"]
    assert resumed == full[2:]


def test_virtual_pipeline_config_errors(tiny_cfg):
    from orchestration.config import ConfigError, validate

    cfg = copy.deepcopy(tiny_cfg)
    cfg.parallel.virtual_pipeline = 2
    with pytest.raises(ConfigError, match="virtual_pipeline=2 needs parallel.pipeline >= 2"):
        validate(cfg, world_size=1)
    cfg.parallel.pipeline = 2  # 2 layers cannot fill 4 chunks
    with pytest.raises(ConfigError, match="num_layers=2 is not divisible by parallel.pipeline x"):
        validate(cfg, world_size=2)
    cfg.model.num_layers = 4
    validate(cfg, world_size=2)  # 4 micro-batches in groups of 2
    cfg.train.global_batch_size = 6  # 3 micro-batches: groups of 2 leave a group of 1
    with pytest.raises(ConfigError, match="3 micro-batches .* groups of 2 .*the last group "
                       "would have 1.*microbatch_group_size=3"):
        validate(cfg, world_size=2)
    cfg.parallel.microbatch_group_size = 3
    validate(cfg, world_size=2)


def test_microbatch_groups_follow_megatrons_rule():
    """K2's layout: 2040 / (4 x DP15) = 34 micro-batches per rank at PP4. Groups of 4 leave 2,
    which Megatron refuses; groups of 5 leave 4 (= PP), which it runs."""
    from orchestration.config.validate import valid_microbatch_group

    assert not valid_microbatch_group(34, 4, 4)
    assert valid_microbatch_group(34, 5, 4)
    assert valid_microbatch_group(34, 17, 4)
    assert not valid_microbatch_group(3, 4, 4)  # a group larger than the micro-batches
    assert not valid_microbatch_group(8, 2, 4)  # a group smaller than the pipeline
