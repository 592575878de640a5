"""muP coordinate check, numerically: activations stay flat in width under muP, grow under SP.

The plotted version is bench/mup_coord_check.py (docs/mup.md); this is the same measurement at
widths 32/64/128 on the synthetic corpus, 3 AdamW steps at lr 1e-2, two seeds averaged (a few
seconds), with what makes it sensitive (see the bench's docstring): the head dimension grows
with the width (one head of 32, 64, 128: the 1/d_head attention rule matters), muP's embedding
multiplier is 10, weight decay 0.1, and the probe is a batch the steps do not train on.

Two-seed means at the time of writing (docs/mup.md has the bench's wider check): after 3 steps
muP's logits grow 1.05x from width 32 to 128 (SP 4.15x), the last layer 1.06x (SP 27x), the
last layer's attention scores 1.08x (SP 23x; muP with 1/sqrt(d) scores instead: 2.17x). At init
muP's logits scale as width^-0.50 (TP5's readout; the output layer drawn with the hidden std,
as before the fix, gives width^-1.00) and its attention scores as width^-0.50 (1/d of an
uncorrelated q.k; 1/sqrt(d) gives width^0.0).
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
WEIGHT_DECAY = 0.1


@pytest.fixture(scope="module")
def base_cfg(corpus, tmp_path_factory):
    cfg = make_tiny_cfg(corpus, tmp_path_factory.mktemp("mup_coord") / "run")
    return coord_check_settings(cfg, steps=STEPS, lr=LR, batch=8, seq_length=32,
                                weight_decay=WEIGHT_DECAY, embedding_multiplier=10.0)


@pytest.fixture(scope="module")
def result(base_cfg, megatron_env):
    return coord_check(base_cfg, WIDTHS, STEPS, seeds=(1234, 1235), base_width=WIDTHS[0],
                       grow="head_dim")


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


def test_mup_attention_scores_flat_in_head_dim(result):
    """The 1/d_head rule: with d_head growing 4x, scores scaled by 1/sqrt(d) would grow ~2x."""
    last = [site for site in result.sites if site.startswith("attn")][-1]
    mup, sp = result.growth("muP", last), result.growth("SP", last)
    assert mup < 1.5, f"muP {last} scores grow {mup:.2f}x from head_dim 32 to 128"
    assert sp > 3 * mup, f"SP {last} scores grow {sp:.2f}x, muP {mup:.2f}x"


def test_mup_init_scaling_follows_tp5(result):
    """At init (t = 0) the readout and attention scores vanish as width^-1/2 under muP: the
    output layer's init is width-independent (TP5 Table 3 readout, upstream Megatron-LM) under
    the 1/m multiplier, and an uncorrelated q.k is O(sqrt(d)) under the 1/d scale. An output
    layer drawn with the hidden matrices' std (sigma/sqrt(m)) gives logits ~ width^-1."""
    logits = result.slope("muP", "logits")
    assert logits == pytest.approx(-0.5, abs=0.15), f"logits at init ~ width^{logits:.2f}"
    scores = result.slope("muP", "attn 0")
    assert scores == pytest.approx(-0.5, abs=0.15), f"scores at init ~ width^{scores:.2f}"


def test_first_adam_step_sizes_follow_table_3(base_cfg, megatron_env):
    """One AdamW step moves each entry by ~lr (|m/sqrt(v)| = 1 on step 1, plus the decoupled
    decay lr * wd * |p|): hidden matrices by lr/m, the unembedding and norms by lr, at width
    128 = 4x the base width."""
    from megatron_patches.model import unwrap
    from orchestration.loop.trainer import Trainer

    cfg = variant(base_cfg, 128, "muP", seed=1234, base_width=32)
    objects = build_objects(cfg)
    gpt = unwrap(objects.model_chunks[0])
    before = {n: p.detach().clone() for n, p in gpt.named_parameters()}
    trainer = Trainer(cfg, objects)
    assert trainer.run_step().updated
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in gpt.named_parameters()}
    for name, step in moved.items():
        hidden = name.endswith(
            ("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight")
        )
        lr = LR / 4 if hidden else LR
        decayed = "layernorm" not in name and "norm" not in name.rsplit(".", 2)[-2]
        bound = lr * (1 + (WEIGHT_DECAY * before[name].abs().max().item() if decayed else 0))
        # below lr only by Adam's eps: g / (|g| + eps), 0.998 for a norm's tiny gradients
        assert lr * (1 - 5e-3) <= step <= bound * (1 + 1e-3), name
