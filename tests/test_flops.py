"""Parameter counts, FLOPs per token and MFU (orchestration/metrics/flops.py), checked by hand."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from orchestration.config import ModelConfig
from orchestration.metrics.flops import (
    PEAK_BF16_FLOPS,
    flops_per_token,
    flops_per_token_by_convention,
    matmul_params,
    mfu,
    mfu_by_convention,
    parameter_count,
    peak_flops_for_device,
    training_flops,
)

REPO = Path(__file__).resolve().parents[1]

# hidden 8, 2 heads of dim 4, 1 KV group, ffn 16, 2 layers, vocab 100 -> padded to 128.
SMALL = ModelConfig(num_layers=2, hidden_size=8, ffn_hidden_size=16, num_attention_heads=2,
                    num_query_groups=1, seq_length=32, vocab_size=100)  # fmt: skip

K2_65B = ModelConfig(name="k2_65b", num_layers=80, hidden_size=8192, ffn_hidden_size=22016,
                     num_attention_heads=64, num_query_groups=64, seq_length=2048,
                     vocab_size=32032)  # fmt: skip

LLAMA_7B = ModelConfig(name="llama_7b", num_layers=32, hidden_size=4096, ffn_hidden_size=11008,
                       num_attention_heads=32, num_query_groups=32, seq_length=2048,
                       vocab_size=32000)  # fmt: skip


def test_small_config_counted_by_hand():
    # qkv: 8 x (2*4 + 2*1*4) = 8 x 16 = 128; proj: 8 x 8 = 64
    # fc1 (SwiGLU, gate + up): 8 x 2*16 = 256; fc2: 16 x 8 = 128; two RMSNorms: 2 x 8 = 16
    per_layer = 128 + 64 + 256 + 128 + 16  # = 592
    non_embedding = 2 * per_layer + 8  # layers + final RMSNorm = 1192
    embedding = 128 * 8  # padded vocab (100 -> 128) x hidden = 1024
    count = parameter_count(SMALL)
    assert count.per_layer == per_layer == 592
    assert count.non_embedding == non_embedding == 1192
    assert count.embedding == count.output == embedding
    assert count.total == 1192 + 1024 + 1024 == 3240


def test_layernorm_gelu_biases_tied_learned_positions():
    m = ModelConfig(num_layers=2, hidden_size=8, ffn_hidden_size=16, num_attention_heads=2,
                    num_query_groups=2, seq_length=32, vocab_size=100, normalization="LayerNorm",
                    activation="gelu", add_bias_linear=True, tie_embeddings=True,
                    position_embedding="learned_absolute")  # fmt: skip
    # qkv: 8 x (8 + 2*2*4) = 8 x 24 = 192; proj 64; fc1 8 x 16 = 128; fc2 16 x 8 = 128
    # biases: qkv 24 + proj 8 + fc1 16 + fc2 8 = 56; two LayerNorms (weight + bias): 2 x 16 = 32
    per_layer = 192 + 64 + 128 + 128 + 56 + 32  # = 600
    count = parameter_count(m)
    assert count.per_layer == per_layer
    assert count.non_embedding == 2 * 600 + 16  # final LayerNorm has a bias too
    assert count.embedding == 128 * 8 + 32 * 8  # words + learned positions (seq 32)
    assert count.output == 0  # tied: shared with the embedding, counted once
    assert count.total == 1216 + 1280


def test_vocab_padding_depends_on_tensor_parallel():
    # 100 pads to 128 at TP 1 (multiple of 64) and to 256 at TP 4 (multiple of 256).
    assert parameter_count(SMALL, 4).embedding == 256 * 8
    assert parameter_count(SMALL, 4).non_embedding == parameter_count(SMALL).non_embedding


def test_k2_65b_is_65_billion():
    count = parameter_count(K2_65B)
    # per layer: qkv 8192*24576 + proj 8192^2 + fc1 8192*44032 + fc2 22016*8192 + 2 norms
    per_layer = 201_326_592 + 67_108_864 + 360_710_144 + 180_355_072 + 16_384
    assert count.per_layer == per_layer == 809_517_056
    assert count.embedding == count.output == 32_064 * 8192  # 32032 padded to 32064
    assert count.total == 80 * per_layer + 8192 + 2 * 32_064 * 8192 == 65_286_709_248
    assert 65.0e9 < count.total < 65.5e9


def test_llama_7b_is_6_74_billion():
    # The LLaMA paper's "6.7B"; the HF checkpoint has 6,738,415,616 parameters.
    assert parameter_count(LLAMA_7B).total == 6_738_415_616


def test_flops_per_token_small_by_hand():
    # matmul weights: 2 layers x (128 + 64 + 256 + 128) + output 128 x 8 = 1152 + 1024 = 2176
    assert matmul_params(SMALL) == 2176
    # 6N = 13056; attention 12 x L x S x (heads x head_dim) = 12 x 2 x 32 x 8 = 6144
    assert flops_per_token(SMALL) == 13056 + 6144
    assert flops_per_token(SMALL, seq_length=64) == 13056 + 2 * 6144
    assert training_flops(SMALL, 1000) == 1000 * (13056 + 6144)


def test_tied_output_layer_still_costs_flops():
    tied = ModelConfig(**{**SMALL.__dict__, "tie_embeddings": True})
    assert parameter_count(tied).output == 0
    assert flops_per_token(tied) == flops_per_token(SMALL)


def test_llama_7b_flops_close_to_6n():
    n = matmul_params(LLAMA_7B)
    assert n == 6_738_415_616 - 131_072_000 - 32 * 2 * 4096 - 4096  # no embedding/norms
    attention = 12 * 32 * 2048 * 4096
    assert flops_per_token(LLAMA_7B) == 6 * n + attention
    assert 1.05 < flops_per_token(LLAMA_7B) / (6 * 6.74e9) < 1.07  # attention adds ~8 %


def test_mfu_arithmetic():
    # 1M tokens/s on 480 H100s at 4e11 FLOPs/token: 4e17 / (480 x 989e12) = 0.8426...
    value = mfu(1e6, 4e11, 480, PEAK_BF16_FLOPS["h100_sxm"])
    assert value == pytest.approx(4e17 / 4.7472e17)
    assert mfu(100.0, 1e12, 1, 1e15) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        mfu(1.0, 1.0, 0, 1e15)
    assert PEAK_BF16_FLOPS["a100"] == 312e12 and PEAK_BF16_FLOPS["h200"] == 989e12


@pytest.mark.parametrize("name, peak", [
    # torch.cuda.get_device_name() as each GPU reports it; dense bf16 from NVIDIA's datasheets
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 NVL", 835e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA B200", 2250e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100-SXM4-40GB", 312e12),
    ("NVIDIA A100-PCIE-40GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12), ("NVIDIA A10G", 125e12),
    ("Tesla V100-SXM2-32GB", None),
])
def test_peak_flops_for_device_names(name, peak):
    assert peak_flops_for_device(name) == peak


def _megatron_lm_flops_per_token(m: ModelConfig, seq: int, padded_vocab: int) -> float:
    """Megatron-LM's ``num_floating_point_operations(args, batch_size=1) / seq_length``
    (megatron/training/training.py, transformer_flops(), dense GQA/MHA branch), transcribed
    term by term: 3 (fwd + wgrad + dgrad) x 2 (FMA) x [qkv proj + core attention with the
    causal /2 + out proj] per layer, the MLP (x3 with SwiGLU, x2 without) and the logits."""
    kv = m.hidden_size // m.num_attention_heads
    q, k, v = kv * m.num_attention_heads, kv * m.num_query_groups, kv * m.num_query_groups
    attn = 3 * 2 * (m.hidden_size * (q + k + v) + q * seq / 2 * 2 + q * m.hidden_size)
    ffn = 3 if m.activation == "swiglu" else 2
    mlp = 3 * 2 * m.hidden_size * m.ffn_hidden_size * ffn
    logits = 3 * 2 * m.hidden_size * padded_vocab
    return m.num_layers * (attn + mlp) + logits


LLAMA_1B = ModelConfig(name="llama_1b", num_layers=22, hidden_size=2048, ffn_hidden_size=5632,
                       num_attention_heads=32, num_query_groups=4, seq_length=2048,
                       vocab_size=32000)  # fmt: skip


@pytest.mark.parametrize("model, seq, tp", [(LLAMA_1B, 4096, 1), (LLAMA_1B, 2048, 8),
                                            (K2_65B, 2048, 8), (LLAMA_7B, 4096, 2), (SMALL, 32, 4)])
def test_causal_convention_is_megatron_lms_current_formula(model, seq, tp):
    from orchestration.config import padded_vocab_size

    reference = _megatron_lm_flops_per_token(model, seq, padded_vocab_size(model, tp))
    assert flops_per_token(model, seq, tp, causal=True) == pytest.approx(reference, rel=1e-12)
    gelu = ModelConfig(**{**model.__dict__, "activation": "gelu"})
    reference = _megatron_lm_flops_per_token(gelu, seq, padded_vocab_size(gelu, tp))
    assert flops_per_token(gelu, seq, tp, causal=True) == pytest.approx(reference, rel=1e-12)


def test_the_two_conventions_at_llama_1b_4096():
    both = flops_per_token_by_convention(LLAMA_1B, 4096)
    assert both["full_attn"] == pytest.approx(8.421e9, rel=2e-4)
    assert both["causal"] == pytest.approx(7.314e9, rel=2e-4)
    assert both["full_attn"] - both["causal"] == 6 * 22 * 4096 * 2048  # the halved attention
    rates = mfu_by_convention(50_000, both, 1, 989e12)
    assert rates["mfu_full_attn"] == pytest.approx(50_000 * both["full_attn"] / 989e12)
    assert rates["mfu_causal"] < rates["mfu_full_attn"]


def test_live_mfu_uses_the_stage_sequence_and_the_tp_padded_vocab():
    from dataclasses import replace
    from types import SimpleNamespace

    from orchestration.callbacks.metrics import MetricsCallback
    from orchestration.config import RunConfig, StageConfig
    from orchestration.loop.control import StepResult
    from orchestration.loop.stages import plan_stages

    cfg = RunConfig()
    cfg.model = replace(LLAMA_1B, vocab_size=32032)  # pads to 32064 at TP 1, 32256 at TP 8
    cfg.parallel.tensor = 8
    cfg.stages = [StageConfig(name="short", max_steps=2, seq_length=2048),
                  StageConfig(name="long", max_steps=2, seq_length=8192)]
    stages = plan_stages(cfg)
    records = []
    logger = SimpleNamespace(log=lambda record, echo: records.append(record))
    callback = MetricsCallback(logger, cfg.model, cfg.parallel.tensor, 989e12, 8)
    trainer = SimpleNamespace(stages=stages, cfg=cfg)
    for step, stage in ((2, stages[0]), (3, stages[1])):
        callback.after_step(trainer, StepResult(step, stage, 0, 1.0, 1.0, 1e-4, True, None,
                                                True, 1.0))
    for record, seq in zip(records, (2048, 8192), strict=True):
        assert record["flops_per_token_full_attn"] == flops_per_token(cfg.model, seq, 8)
        assert record["flops_per_token_causal"] == flops_per_token(cfg.model, seq, 8, True)
        tokens = record["tokens_per_s"]
        assert record["mfu_causal"] == pytest.approx(
            tokens * flops_per_token(cfg.model, seq, 8, True) / (8 * 989e12))
    assert records[0]["flops_per_token_full_attn"] != flops_per_token(cfg.model, 2048, 1)


_COUNT_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[1]}", rank=0,
                            world_size=1)
    from megatron.core import parallel_state
    parallel_state.initialize_model_parallel(1, 1)
    from megatron_patches.configs import build_megatron_configs
    from orchestration.config import ModelConfig, RunConfig
    from orchestration.metrics.flops import parameter_count
    from megatron_patches.model import build_gpt_model
    cases = [
        ModelConfig(),
        ModelConfig(normalization="LayerNorm", activation="gelu", add_bias_linear=True,
                    tie_embeddings=True, position_embedding="learned_absolute",
                    num_query_groups=4, vocab_size=1000),
        ModelConfig(add_bias_linear=True, vocab_size=1001),
    ]
    for m in cases:
        cfg = RunConfig(model=m)
        model = build_gpt_model(cfg, build_megatron_configs(cfg, on_cpu=True))
        real = sum(p.numel() for p in model.parameters())
        print(real, parameter_count(m).total)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_count_matches_megatron_gptmodel():
    """The formula against the real model (CPU, local spec), in a fresh process (~9 s)."""
    pytest.importorskip("megatron.core")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _COUNT_SCRIPT, str(_free_port())],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.strip()]
    assert len(rows) == 3
    for real, ours in rows:
        assert int(real) == int(ours)
