"""The published recipes, number by number, against LLM360's released configs.

``tests/reference/llm360.yaml`` vendors the numbers of LLM360/crystalcoder-train's
``params/phase{1,2,3}/params.yaml`` and LLM360/k2-train's ``scripts/pretrain_65b.sh`` (repo,
commit and path of each). The LR at chosen steps is computed by ``loop/lr.py`` and compared with
the schedule those files describe: Cerebras's chained ``Linear`` schedulers for Crystal, and
Megatron-Core's own ``OptimizerParamScheduler`` for K2 (Megatron-LM flags). Steps: this repo's
step ``n`` uses the schedule's value after ``n`` updates (``loop/lr.py``).
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from hydra import compose, initialize_config_dir

from orchestration.common.paths import CONF_DIR
from orchestration.config import register_configs, to_run_config
from orchestration.loop.lr import lr_for_step
from orchestration.loop.stages import plan_stages

REFERENCE = yaml.safe_load((Path(__file__).parent / "reference" / "llm360.yaml").read_text())


def _compose(experiment: str):
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        return to_run_config(compose("config", overrides=[f"experiment={experiment}",
                                                          "run_dir=/tmp/unused"]))


def _cerebras_lr(schedulers: list[dict], g: int) -> float:
    """Cerebras modelzoo's chained schedulers after ``g`` updates: each ``Linear`` runs for its
    ``steps`` (the last one for ever) and is ``end + (initial - end) * (1 - t / decay_steps)``
    at its own step ``t``, ``end`` from ``decay_steps`` on."""
    for i, s in enumerate(schedulers):
        length = s.get("steps", s.get("decay_steps"))
        if g < length or i == len(schedulers) - 1:
            decay = s.get("decay_steps", s.get("steps"))
            if g >= decay:
                return s["end_learning_rate"]
            return s["end_learning_rate"] + (s["initial_learning_rate"]
                                             - s["end_learning_rate"]) * (1 - g / decay)
        g -= length
    raise AssertionError("unreachable")


CRYSTAL = REFERENCE["crystal"]["phases"]


def test_crystal_phases_match_crystalcoder_train():
    cfg = _compose("crystal")
    assert [s.name for s in cfg.stages] == [p["name"] for p in CRYSTAL]
    assert cfg.lr_schedule == "per_stage"
    for sc, ref in zip(cfg.stages, CRYSTAL, strict=True):
        warm, decay = ref["optimizer.learning_rate"]
        o = sc.optim
        assert sc.max_steps == ref["runconfig.max_steps"], sc.name
        assert sc.global_batch_size == ref["train_input.batch_size"], sc.name
        assert (sc.seq_length or cfg.model.seq_length) == ref["model.max_position_embeddings"]
        assert (o.init_lr, o.lr, o.warmup_steps) == (
            warm["initial_learning_rate"], warm["end_learning_rate"], warm["steps"]), sc.name
        assert decay["initial_learning_rate"] == warm["end_learning_rate"]  # no jump
        assert (o.decay_style, o.min_lr, o.decay_steps) == (
            "linear", decay["end_learning_rate"], decay["decay_steps"]), sc.name
        assert (o.weight_decay, o.beta1, o.beta2, o.eps, o.clip_grad) == (
            ref["optimizer.weight_decay_rate"], ref["optimizer.beta1"], ref["optimizer.beta2"],
            ref["optimizer.eps"], ref["optimizer.max_gradient_norm"]), sc.name
        assert cfg.mup.base_width / cfg.model.hidden_size == (
            ref["optimizer.adjust_learning_rate.decoder_kernel"])
        assert cfg.train.seed == ref["runconfig.seed"]
    assert cfg.train.global_batch_size == CRYSTAL[0]["train_input.batch_size"]
    assert cfg.optim.eps == CRYSTAL[0]["optimizer.eps"]


def test_crystal_phase3_tokens_round_up_to_its_max_steps():
    phase3 = CRYSTAL[2]
    tokens_per_step = phase3["train_input.batch_size"] * phase3["model.max_position_embeddings"]
    assert math.ceil(phase3["train_input.tokens_comment"] / tokens_per_step) == (
        phase3["runconfig.max_steps"])
    cfg = _compose("crystal")
    stage = plan_stages(cfg)[2]
    assert stage.tokens == phase3["runconfig.max_steps"] * tokens_per_step
    assert 0 <= stage.tokens - phase3["train_input.tokens_comment"] < tokens_per_step


@pytest.mark.parametrize("phase", range(3))
def test_crystal_lr_follows_the_cerebras_schedule(phase):
    cfg = _compose("crystal")
    stages = plan_stages(cfg)
    stage, ref = stages[phase], CRYSTAL[phase]
    warmup = ref["optimizer.learning_rate"][0]["steps"]
    chosen = sorted({1, 2, warmup // 2, warmup - 1, warmup, warmup + 1, warmup + 1000,
                     stage.steps // 3, stage.steps // 2, stage.steps - 1, stage.steps})
    for n in chosen:
        expected = _cerebras_lr(ref["optimizer.learning_rate"], n)
        assert lr_for_step(cfg, stages, stage.steps_before + n) == pytest.approx(
            expected, rel=1e-12, abs=1e-15), (stage.name, n)


def test_crystal_phase1_stops_part_way_down_at_phase2s_peak():
    """Phase 1 decays over 294,337 steps but stops after 79,721: it ends near 0.00879, where
    phase 2 warms up to (0.0087825), not at its min_lr 1.2408e-4."""
    cfg = _compose("crystal")
    stages = plan_stages(cfg)
    end_of_phase1 = lr_for_step(cfg, stages, stages[0].last_step)
    assert end_of_phase1 == pytest.approx(0.00879, abs=5e-6)
    assert end_of_phase1 == pytest.approx(stages[1].optim.lr, rel=1e-3)
    assert lr_for_step(cfg, stages, stages[1].steps_before + 86) == stages[1].optim.lr
    assert lr_for_step(cfg, stages, stages[1].last_step) == pytest.approx(0.00013679)
    assert lr_for_step(cfg, stages, stages[2].last_step) == pytest.approx(0.0002)


K2 = REFERENCE["k2_stage1"]["flags"]


@pytest.mark.parametrize("experiment", ["k2", "k2_stage1"])
def test_k2_stage1_matches_k2_train(experiment):
    cfg = _compose(experiment)
    sc, o = cfg.stages[0], cfg.stages[0].optim
    assert sc.name == "stage1"
    assert (sc.max_steps, sc.global_batch_size) == (K2["--train-iters"],
                                                     K2["--global-batch-size"])
    assert (o.lr, o.min_lr, o.decay_style, o.warmup_steps) == (
        K2["--lr"], K2["--min-lr"], K2["--lr-decay-style"], K2["--lr-warmup-iters"])
    assert o.decay_steps is None  # Megatron's --lr-decay-iters default: --train-iters
    assert (o.weight_decay, o.clip_grad, o.beta1, o.beta2) == (
        K2["--weight-decay"], K2["--clip-grad"], K2["--adam-beta1"], K2["--adam-beta2"])
    assert (o.eps, o.init_lr) == (1e-8, 0.0)  # Megatron-LM's defaults; the script sets neither
    t, p, m = cfg.train, cfg.parallel, cfg.model
    assert (t.micro_batch_size, t.global_batch_size, t.seed, t.precision) == (
        K2["--micro-batch-size"], K2["--global-batch-size"], K2["--seed"], "bf16")
    assert (p.tensor, p.pipeline, p.sequence_parallel) == (
        K2["--tensor-model-parallel-size"], K2["--pipeline-model-parallel-size"], True)
    assert cfg.checkpoint.save_interval == K2["--save-interval"]
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads,
            m.num_query_groups, m.vocab_size, m.seq_length, m.norm_epsilon) == (
        K2["--num-layers"], K2["--hidden-size"], K2["--ffn-hidden-size"],
        K2["--num-attention-heads"], K2["--num-attention-heads"], K2["--vocab-size"],
        K2["--seq-length"], K2["--layernorm-epsilon"])
    assert (m.normalization, m.position_embedding, m.activation, m.add_bias_linear,
            m.tie_embeddings) == (K2["--normalization"], K2["--position-embedding-type"],
                                  "swiglu", False, False)


def _megatron_scheduler(**kwargs):
    """Megatron-Core's own LR scheduler on a stand-in optimizer (it only sets param groups)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(SimpleNamespace(param_groups=[{}]), start_wd=0.1,
                                   end_wd=0.1, wd_incr_steps=1, wd_incr_style="constant",
                                   **kwargs)


def test_k2_stage1_lr_matches_megatrons_scheduler():
    """Megatron-LM (iteration-based) runs its scheduler in samples: warmup and decay steps x
    global batch, advanced by the global batch each iteration."""
    cfg = _compose("k2_stage1")
    stages = plan_stages(cfg)
    gbs, iters = K2["--global-batch-size"], K2["--train-iters"]
    scheduler = _megatron_scheduler(
        init_lr=0.0, max_lr=K2["--lr"], min_lr=K2["--min-lr"],
        lr_warmup_steps=K2["--lr-warmup-iters"] * gbs, lr_decay_steps=iters * gbs,
        lr_decay_style=K2["--lr-decay-style"])
    for n in (1, 1000, 1999, 2000, 2001, 100_000, 200_000, iters - 1, iters):
        scheduler.num_steps = n * gbs
        assert lr_for_step(cfg, stages, n) == pytest.approx(scheduler.get_lr({}), rel=1e-12)
