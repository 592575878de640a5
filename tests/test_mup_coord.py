"""muP coordinate check, numerically: activations stay flat in width under muP, grow under SP.

The plotted version is bench/mup_coord_check.py (docs/mup.md); this is the same measurement at
widths 32/64/128 on the synthetic corpus, 3 Adam steps at lr 1e-2, two seeds averaged (a few
seconds). The bounds leave room for seed noise: over seeds 1234-1239 one seed alone gave muP a
logits growth of 0.95-1.40x and SP 2.3-4.7x; the last layer 0.8-1.9x (muP) vs 13-45x (SP).
The two-seed means asserted on here: logits 1.16x (muP) vs 3.19x (SP), last layer 1.39x vs 26x.
"""

from __future__ import annotations

import pytest
from conftest import make_tiny_cfg

from bench.mup_coord_check import (
    build_objects,
    coord_check,
    coord_check_settings,
    variant,
)

WIDTHS = (32, 64, 128)
STEPS = 3
LR = 1e-2


@pytest.fixture(scope="module")
def base_cfg(corpus, tmp_path_factory):
    cfg = make_tiny_cfg(corpus, tmp_path_factory.mktemp("mup_coord") / "run")
    return coord_check_settings(cfg, steps=STEPS, lr=LR, batch=8, seq_length=32)


@pytest.fixture(scope="module")
def result(base_cfg, megatron_env):
    return coord_check(base_cfg, WIDTHS, STEPS, seeds=(1234, 1235), base_width=WIDTHS[0])


def test_mup_logits_flat_in_width(result):
    mup, sp = result.growth("muP", "logits"), result.growth("SP", "logits")
    assert mup < 1.6, f"muP logits grow {mup:.2f}x from width 32 to 128"
    assert sp > 2.0 and sp > 1.5 * mup, f"SP logits grow only {sp:.2f}x (muP {mup:.2f}x)"


def test_mup_hidden_activations_flat_in_width(result):
    last = [site for site in result.sites if site.startswith("layer")][-1]
    mup, sp = result.growth("muP", last), result.growth("SP", last)
    assert mup < 2.0, f"muP {last} grows {mup:.2f}x from width 32 to 128"
    assert sp > 5 * mup, f"SP {last} grows {sp:.2f}x, muP {mup:.2f}x"
    embedding = result.growth("muP", "embedding")
    assert embedding == pytest.approx(1.0, abs=0.2)


def test_first_adam_step_sizes_follow_table_3(base_cfg, megatron_env):
    """One Adam step moves each entry by ~lr (|m/sqrt(v)| = 1 on step 1): hidden matrices by
    lr/m, the unembedding and norms by lr, at width 128 = 4x the base width."""
    from megatron_patches.model import unwrap
    from orchestration.loop.trainer import Trainer

    cfg = variant(base_cfg, 128, "muP", seed=1234, base_width=32)
    objects = build_objects(cfg)
    gpt = unwrap(objects.model)
    before = {n: p.detach().clone() for n, p in gpt.named_parameters()}
    trainer = Trainer(cfg, objects)
    assert trainer.run_step().updated
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in gpt.named_parameters()}
    for name, step in moved.items():
        hidden = name.endswith(
            ("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight")
        )
        assert step == pytest.approx(LR / 4 if hidden else LR, rel=1e-3), name
