"""muP on Megatron-Core: Crystal-7B's parameter groups and init stds, LR scaling at two widths."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO
from hydra import compose, initialize_config_dir
from megatron.core.optimizer import get_megatron_optimizer

from megatron_patches.configs import build_megatron_configs
from megatron_patches.model import build_gpt_model
from megatron_patches.optimizer import apply_lr, param_group_overrides
from orchestration.config import register_configs, to_run_config

register_configs()


def _crystal(**overrides):
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        cfg = to_run_config(compose("config", overrides=[
            "run_dir=/tmp/unused", "experiment=crystal", "train.precision=fp32",
            *[f"{k}={v}" for k, v in overrides.items()]]))
    return cfg


@pytest.fixture(scope="module")
def crystal_model(megatron_env):
    """Crystal at full width (4096) but one layer: the muP numbers depend on width only."""
    cfg = _crystal(**{"model.num_layers": 1})
    mc = build_megatron_configs(cfg, on_cpu=True)
    return cfg, mc, build_gpt_model(cfg, mc)


def test_crystal_init_stds(crystal_model):
    cfg, mc, model = crystal_model
    params = dict(model.named_parameters())
    expected = {
        "embedding.word_embeddings.weight": 0.073,
        "decoder.layers.0.self_attention.linear_qkv.weight": 0.01825,
        "decoder.layers.0.mlp.linear_fc1.weight": 0.01825,
        "decoder.layers.0.self_attention.linear_proj.weight": 0.00228125,
        "decoder.layers.0.mlp.linear_fc2.weight": 0.00228125,
    }
    for name, std in expected.items():
        w = params[name].detach()
        # truncated at 2 std: the sample std is 0.8796 of the parameter, and |w| <= 2 std
        assert w.std().item() == pytest.approx(std * 0.8796, rel=0.02), name
        assert w.abs().max().item() <= 2 * std + 1e-9, name
    assert mc.transformer.softmax_scale == pytest.approx(1 / 128)  # 1/d_head, d_head = 128
    assert cfg.mup.output_multiplier * cfg.mup.base_width / cfg.model.hidden_size == \
        pytest.approx(0.13875)


def test_crystal_param_groups(crystal_model):
    cfg, mc, model = crystal_model
    from megatron_patches.model import wrap_for_training

    optimizer = get_megatron_optimizer(mc.optimizer, [wrap_for_training(model, mc)],
                                       config_overrides=param_group_overrides(cfg, mc))
    apply_lr(optimizer, lr=0.012, weight_decay=0.1)
    seen = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            seen[p.numel()] = seen.get(p.numel(), []) + [(group["lr"], group["weight_decay"],
                                                         group["eps"])]
    shapes = {n: p.numel() for n, p in model.named_parameters()}
    hidden = shapes["decoder.layers.0.self_attention.linear_qkv.weight"]
    embedding = shapes["embedding.word_embeddings.weight"]
    norm = shapes["decoder.layers.0.input_layernorm.weight"]
    assert (pytest.approx(0.012 * 0.0625), 0.1, 1e-9) == seen[hidden][0]
    assert seen[embedding][0] == (0.012, 0.1, 1e-9)
    assert all(lr == 0.012 and wd == 0.0 for lr, wd, _ in seen[norm])  # norms and biases


@pytest.mark.parametrize("width, expected_mult", [(512, 0.5), (1024, 0.25)])
def test_hidden_lr_scales_with_width(width, expected_mult, megatron_env):
    cfg = _crystal(**{"model.num_layers": 1, "model.hidden_size": width,
                      "model.ffn_hidden_size": 2 * width, "model.num_attention_heads": 8,
                      "model.num_query_groups": 8, "mup.scale_adam_eps": "true"})
    mc = build_megatron_configs(cfg, on_cpu=True)
    from megatron_patches.mup import mup_param_group_overrides

    overrides = mup_param_group_overrides(cfg, mc.optimizer)
    hidden = [v for v in overrides.values() if "lr_mult" in v]
    assert hidden == [{"lr_mult": pytest.approx(expected_mult),
                       "eps": pytest.approx(1e-9 * expected_mult)}]


def test_multipliers_scale_embedding_and_logits(megatron_env):
    cfg = _crystal(**{"model.num_layers": 1, "model.hidden_size": 512,
                      "model.ffn_hidden_size": 1024, "model.num_attention_heads": 8,
                      "model.num_query_groups": 8})
    mc = build_megatron_configs(cfg, on_cpu=True)
    model = build_gpt_model(cfg, mc)
    tokens = torch.randint(0, 1000, (1, 16))
    position_ids = torch.arange(16)[None]
    emb = model.embedding(tokens, position_ids)
    raw = torch.nn.functional.embedding(tokens, model.embedding.word_embeddings.weight)
    assert torch.allclose(emb, raw.transpose(0, 1) * 14.6, atol=1e-6)
    hidden = torch.randn(16, 1, 512)
    logits, _ = model.output_layer(hidden, weight=model.shared_embedding_or_output_weight())
    plain = hidden @ model.shared_embedding_or_output_weight().t()
    assert torch.allclose(logits, plain * 2.22 * 256 / 512, atol=1e-5)


def _untied(width: int, base_width: int, tie: bool = False):
    cfg = _crystal(**{"model.num_layers": 1, "model.hidden_size": width,
                      "model.ffn_hidden_size": 2 * width, "model.num_attention_heads": 8,
                      "model.num_query_groups": 8, "model.tie_embeddings": str(tie).lower(),
                      "model.vocab_size": 4096, "mup.base_width": base_width,
                      "mup.embedding_init_std": "null", "mup.hidden_init_std": "null",
                      "mup.output_proj_init_std": "null"})
    mc = build_megatron_configs(cfg, on_cpu=True)
    return cfg, build_gpt_model(cfg, mc)


def test_untied_output_layer_initialised_like_the_embedding(megatron_env):
    """Upstream Megatron-LM's muP (and TP5 Table 3's readout, 1/fan_in^2 variance with no
    multiplier = width-independent variance under the 1/m multiplier): an untied output layer
    is drawn with the embedding's std, not the hidden matrices' sigma/sqrt(m). Before the fix
    its std at width 1024 = 16 x base was 0.02/4 = 0.005."""
    cfg, model = _untied(1024, 64)
    sigma = cfg.model.init_method_std
    out = model.output_layer.weight.detach()
    qkv = model.decoder.layers[0].self_attention.linear_qkv.weight.detach()
    assert out.std().item() == pytest.approx(sigma * 0.8796, rel=0.02)
    assert out.abs().max().item() <= 2 * sigma + 1e-9
    assert qkv.std().item() == pytest.approx(sigma / 4 * 0.8796, rel=0.02)  # hidden: /sqrt(16)
    emb = model.embedding.word_embeddings.weight.detach()
    assert not torch.equal(out, emb)  # untied: its own draw


def test_tied_output_layer_is_the_embedding(megatron_env):
    from megatron_patches.mup import reinit_untied_output_layer

    _, model = _untied(512, 64, tie=True)
    assert model.output_layer.weight is None
    assert reinit_untied_output_layer(model) is False


def test_output_init_patch_still_needed_upstream():
    """The re-initialisation replaces 0.16.1's hard-coded ``init_method=config.init_method`` for
    the output layer with Megatron's own helpers. Fails when the helpers move, or when
    ``GPTModel`` chooses the output init itself (as upstream's ``use_mup`` does): then drop
    ``reinit_untied_output_layer`` and set upstream's fields instead."""
    import inspect

    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, layers

    assert "skip_set_tensor_parallel_attributes" in inspect.signature(
        layers._initialize_affine_weight_cpu).parameters
    assert callable(get_cuda_rng_tracker)
    source = inspect.getsource(GPTModel.__init__)
    assert "init_method=config.init_method," in source
    assert "use_mup" not in source
