"""Tensor, pipeline and data parallelism give the single-process losses (spawned gloo ranks)."""

from __future__ import annotations

import copy
import math

import pytest
from dist import run_distributed, run_single

pytestmark = pytest.mark.distributed

LAYOUTS = {"tp2": (2, 1, 2), "pp2": (1, 2, 2), "dp2": (1, 1, 2)}  # tensor, pipeline, world


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
    """TP=1 run whose step-0 checkpoint seeds every layout (PP stages init layers separately)."""
    from conftest import make_tiny_cfg

    cfg = make_tiny_cfg(corpus, tmp_path_factory.mktemp("ref") / "run")
    cfg.checkpoint.save_initial = True
    summary = run_single(cfg)
    return cfg, summary


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, reference, tmp_path):
    ref_cfg, ref = reference
    tp, pp, world = LAYOUTS[layout]
    cfg = copy.deepcopy(ref_cfg)
    cfg.run_dir = str(tmp_path / layout)
    cfg.checkpoint.save_initial = False
    cfg.checkpoint.load = f"{ref_cfg.run_dir}/checkpoints/step_00000000"
    cfg.checkpoint.load_optimizer = False  # Adam state at step 0 is empty anyway
    cfg.parallel.tensor, cfg.parallel.pipeline = tp, pp
    out = run_distributed(cfg, world)
    assert len(out["losses"]) == len(ref["losses"]) == ref_cfg.train.max_steps
    assert out["losses"] == pytest.approx(ref["losses"], abs=2e-4)
    assert out["losses"][-1] < out["losses"][0]


@pytest.mark.slow  # ~50 s on 2 cores: run by CI after the default suite
def test_tp2_checkpoint_loads_at_tp1(reference, tmp_path):
    """Weights saved at TP=2 load at TP=1 (resharded) and give the same held-out loss; resuming
    the TP=2 run at TP=1 with its Adam state fails with a clear message unless allowed."""
    ref_cfg, _ = reference
    cfg = copy.deepcopy(ref_cfg)
    cfg.run_dir = str(tmp_path / "tp2")
    cfg.checkpoint.save_initial = False
    cfg.parallel.tensor = 2
    cfg.train.eval_interval = cfg.train.max_steps  # evaluate once, at the end
    tp2 = run_distributed(cfg, 2)

    at_tp1 = copy.deepcopy(ref_cfg)
    at_tp1.run_dir = str(tmp_path / "tp1")
    at_tp1.checkpoint.save_initial = False
    at_tp1.checkpoint.load = f"{cfg.run_dir}/checkpoints/step_{cfg.train.max_steps:08d}"
    at_tp1.checkpoint.load_optimizer = False
    at_tp1.train.eval_only = True
    tp1 = run_single(at_tp1)
    assert tp1["val_loss"] == pytest.approx(tp2["val_loss"], abs=1e-5)
    assert math.isfinite(tp1["val_loss"])

    at_tp1.checkpoint.load_optimizer = True
    with pytest.raises(Exception, match="reset_optimizer_on_reshard"):
        run_single(at_tp1)
