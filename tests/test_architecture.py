"""The built GPTModel is the LLaMA (or Crystal) architecture the config describes."""

from __future__ import annotations

import pytest
import torch
from conftest import load_model_config

from megatron_patches.configs import build_megatron_configs
from megatron_patches.model import build_gpt_model
from orchestration.config import RunConfig
from orchestration.metrics.flops import parameter_count


def _build(name: str, meta: bool = False):
    cfg = RunConfig()
    cfg.model = load_model_config(name)
    mc = build_megatron_configs(cfg, on_cpu=True)
    if meta:  # shapes only: full-size models cost no memory on the meta device
        mc.transformer.perform_initialization = False
        with torch.device("meta"):
            return cfg, build_gpt_model(cfg, mc)
    return cfg, build_gpt_model(cfg, mc)


def test_tiny_llama_shapes(megatron_env):
    cfg, model = _build("tiny")
    m = cfg.model
    head_dim = m.hidden_size // m.num_attention_heads
    params = dict(model.named_parameters())
    layer = "decoder.layers.0."
    qkv_rows = (m.num_attention_heads + 2 * m.num_query_groups) * head_dim  # GQA: fewer KV heads
    assert params[layer + "self_attention.linear_qkv.weight"].shape == (qkv_rows, m.hidden_size)
    assert params[layer + "self_attention.linear_proj.weight"].shape == (m.hidden_size,) * 2
    assert params[layer + "mlp.linear_fc1.weight"].shape == (2 * m.ffn_hidden_size, m.hidden_size)
    assert params[layer + "mlp.linear_fc2.weight"].shape == (m.hidden_size, m.ffn_hidden_size)
    assert not [n for n in params if n.endswith(".bias")], "LLaMA has no linear or norm biases"
    emb, out = params["embedding.word_embeddings.weight"], params["output_layer.weight"]
    assert emb.shape == out.shape == (4096, m.hidden_size)
    assert emb.data_ptr() != out.data_ptr() and not torch.equal(emb, out), "untied"
    norm = model.decoder.layers[0].input_layernorm
    assert isinstance(norm, torch.nn.RMSNorm) and norm.eps == pytest.approx(1e-5)
    assert "position_embeddings" not in str(list(params)), "rotary, not learned positions"
    assert model.rotary_pos_emb is not None


def test_crystal_flags(megatron_env):
    cfg, model = _build("crystal_7b", meta=True)
    params = dict(model.named_parameters())
    assert "decoder.layers.0.mlp.linear_fc1.bias" in params
    assert "output_layer.weight" not in params  # tied to the input embedding
    assert isinstance(model.decoder.layers[0].input_layernorm, torch.nn.LayerNorm)
    head_dim = cfg.model.hidden_size // cfg.model.num_attention_heads
    assert model.rotary_pos_emb.inv_freq.numel() * 2 == int(head_dim * 0.25)


@pytest.mark.parametrize("name", ["tiny", "llama_1b", "crystal_7b", "k2_65b"])
def test_parameter_count_matches_analytic(name, megatron_env):
    cfg, model = _build(name, meta=name != "tiny")
    assert sum(p.numel() for p in model.parameters()) == parameter_count(cfg.model).total


def test_published_sizes():
    """Analytic counts from config alone for the published models (no build)."""
    assert parameter_count(load_model_config("k2_65b")).total == pytest.approx(65.3e9, rel=0.01)
    assert parameter_count(load_model_config("llama_1b")).total == pytest.approx(1.1e9, rel=0.01)
    assert parameter_count(load_model_config("crystal_7b")).total == pytest.approx(6.58e9, rel=0.01)
