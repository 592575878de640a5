"""PaLM's z-loss (``train.z_loss_coeff``) and QK layernorm (``model.qk_layernorm``) on real
Megatron-Core models: what they compute, that training optimises and logs them, and export."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from dist import run_distributed, run_single

from megatron_patches.configs import build_megatron_configs
from megatron_patches.model import build_gpt_model
from orchestration.config import RunConfig
from orchestration.metrics.flops import parameter_count


def _tiny(**train) -> RunConfig:
    cfg = RunConfig()
    cfg.model.vocab_size, cfg.model.seq_length = 256, 32
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def _batch(cfg: RunConfig, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_length), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    positions = torch.arange(cfg.model.seq_length).expand(2, -1)
    return tokens, positions, labels


def test_z_loss_model_returns_lm_loss_and_log_z_squared(megatron_env):
    cfg = _tiny(z_loss_coeff=1e-4)
    model = build_gpt_model(cfg, build_megatron_configs(cfg, on_cpu=True))
    tokens, positions, labels = _batch(cfg)
    both = model(tokens, positions, None, labels=labels)
    assert both.shape == (2, 2, cfg.model.seq_length)
    logits = model(tokens, positions, None)  # [b, s, vocab]
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    torch.testing.assert_close(both[0].flatten().detach(), ce.detach(), rtol=1e-5, atol=1e-6)
    log_z = torch.logsumexp(logits.double(), dim=-1)
    torch.testing.assert_close(both[1].double().detach(), log_z.square().detach(), rtol=1e-5,
                               atol=1e-6)

    # Its gradient is that of log(Z)^2: compare on the output layer's weight.
    weight = model.output_layer.weight
    (g_model,) = torch.autograd.grad(both[1].mean(), weight)
    logits = model(tokens, positions, None)
    (g_direct,) = torch.autograd.grad(torch.logsumexp(logits, -1).square().mean(), weight)
    assert torch.allclose(g_model, g_direct, rtol=1e-4, atol=1e-7)


def test_qk_layernorm_normalises_queries_and_keys_per_head(megatron_env):
    cfg = _tiny()
    cfg.model.qk_layernorm = True
    mc = build_megatron_configs(cfg, on_cpu=True)
    assert mc.transformer.qk_layernorm  # Megatron all-reduces their grads across TP by it
    model = build_gpt_model(cfg, mc)
    head_dim = cfg.model.hidden_size // cfg.model.num_attention_heads
    attention = model.decoder.layers[0].self_attention
    for norm in (attention.q_layernorm, attention.k_layernorm):
        assert isinstance(norm, torch.nn.RMSNorm)  # the model's normalization (LLaMA: RMSNorm)
        assert norm.weight.shape == (head_dim,) and norm.eps == cfg.model.norm_epsilon
    assert sum(p.numel() for p in model.parameters()) == parameter_count(cfg.model).total
    tokens, positions, labels = _batch(cfg)
    before = model(tokens, positions, None, labels=labels).detach()
    with torch.no_grad():
        attention.k_layernorm.weight.mul_(3.0)  # scales every attention logit of layer 0
    after = model(tokens, positions, None, labels=labels).detach()
    assert not torch.allclose(before, after)
    assert sum(1 for name, _ in model.named_parameters() if "q_layernorm" in name) == (
        cfg.model.num_layers)


@pytest.mark.parametrize("mup", [False, True])
def test_qk_layernorm_exports_as_qwen3_with_the_same_logits(megatron_env, corpus, tmp_path, mup):
    """Qwen3ForCausalLM is Llama with per-head q/k RMSNorms before RoPE: the export of a
    QK-norm checkpoint gives Megatron's logits (with muP, the query factor goes into q_norm)."""
    from test_export import TOKENS, export_cfg, hf_logits, megatron_logits, randomize, write_record

    from orchestration.checkpoint import layout as ckpt
    from orchestration.checkpoint import store
    from orchestration.export import export

    cfg = export_cfg(corpus, tmp_path / "run")
    cfg.model.qk_layernorm = True
    if mup:
        cfg.mup.enabled, cfg.mup.base_width, cfg.mup.attention_scale_power = True, 16, 1.0
    model = build_gpt_model(cfg, build_megatron_configs(cfg, on_cpu=True))
    randomize(model, seed=2)
    write_record(cfg)
    path = store.save(ckpt.checkpoint_dir(cfg.run_dir), 1, model, None, {"step": 1}, 0)
    out = export(path, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["model_type"] == "qwen3"
    torch.testing.assert_close(hf_logits(out, TOKENS), megatron_logits(model, TOKENS),
                               atol=1e-4, rtol=1e-4)


def _metrics(run_dir: str) -> dict[int, dict]:
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def test_training_logs_and_optimises_the_z_loss(tiny_cfg, tmp_path):
    """Real training: `z_loss` is logged next to the LM loss; the first step's LM loss is that
    of a run without the z-loss (same weights, same batch), later ones differ because the
    z-loss gradient changed the update."""
    plain = copy.deepcopy(tiny_cfg)
    plain.run_dir, plain.train.max_steps = str(tmp_path / "plain"), 3
    with_z = copy.deepcopy(plain)
    with_z.run_dir, with_z.train.z_loss_coeff = str(tmp_path / "z"), 0.5  # large: visible
    run_single(plain)
    run_single(with_z)
    a, b = _metrics(plain.run_dir), _metrics(with_z.run_dir)
    assert "z_loss" not in a[1] and b[1]["z_loss"] > 0
    assert b[1]["loss"] == a[1]["loss"]
    assert b[3]["loss"] != pytest.approx(a[3]["loss"], rel=1e-6)
    assert b[3]["z_loss"] < b[1]["z_loss"]  # a coefficient this large pulls log Z to 0


@pytest.mark.slow  # three short runs
def test_qk_layernorm_with_z_loss_trains_and_resumes_exactly(tiny_cfg, tmp_path):
    qk = copy.deepcopy(tiny_cfg)
    qk.run_dir, qk.model.qk_layernorm, qk.train.z_loss_coeff = str(tmp_path / "qk"), True, 1e-4
    qk.train.max_steps, qk.train.exit_after_steps = 4, 2
    first = run_single(qk)
    qk.train.exit_after_steps = None
    second = run_single(qk)
    losses = first["losses"] + second["losses"]
    assert len(losses) == 4 and losses[-1] < losses[0]
    whole = copy.deepcopy(qk)
    whole.run_dir = str(tmp_path / "qk_whole")
    assert run_single(whole)["losses"] == losses


@pytest.mark.slow  # two runs, one on two gloo ranks
@pytest.mark.distributed
def test_z_loss_and_qk_layernorm_at_tp2_match_tp1(tiny_cfg, tmp_path):
    """log Z across vocabulary shards (TP=2) equals the unsharded one, and the QK-norm weights'
    gradients are reduced across TP: losses and z-losses match TP=1."""
    base = copy.deepcopy(tiny_cfg)
    base.model.qk_layernorm, base.train.z_loss_coeff, base.train.max_steps = True, 1e-2, 4
    one = copy.deepcopy(base)
    one.run_dir = str(tmp_path / "tp1")
    two = copy.deepcopy(base)
    two.run_dir, two.parallel.tensor = str(tmp_path / "tp2"), 2
    ref = run_single(one)
    out = run_distributed(two, 2)
    assert out["losses"] == pytest.approx(ref["losses"], abs=2e-4)
    z1, z2 = _metrics(one.run_dir), _metrics(two.run_dir)
    assert [z2[s]["z_loss"] for s in z2] == pytest.approx([z1[s]["z_loss"] for s in z1],
                                                          rel=1e-3)
