"""Run planning (orchestration/plan.py): FLOPs, memory arithmetic, the Chinchilla fit, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from orchestration.config import ModelConfig
from orchestration.metrics.flops import flops_per_token, matmul_params
from orchestration.plan import (
    ChinchillaFit,
    activation_bytes_per_layer,
    chinchilla_tokens,
    fit_chinchilla,
    load_model_config,
    memory_per_gpu,
    stage_params,
    training_days,
)

REPO = Path(__file__).resolve().parents[1]
# Hoffmann et al. 2022's fitted constants (their eq. 10).
CHINCHILLA = ChinchillaFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
SMALL_GRID = {
    "a": np.array([0.0, 5.0, 10.0]), "b": np.array([0.0, 5.0, 10.0]),
    "e": np.array([0.0, 0.5]), "alpha": np.array([0.2, 0.5]), "beta": np.array([0.2, 0.5]),
}  # fmt: skip
LLAMA_7B = ModelConfig(num_layers=32, hidden_size=4096, ffn_hidden_size=11008,
                       num_attention_heads=32, num_query_groups=32, seq_length=2048,
                       vocab_size=32000)  # fmt: skip
K2_YAML = """\
name: k2_65b
num_layers: 80
hidden_size: 8192
ffn_hidden_size: 22016
num_attention_heads: 64
num_query_groups: 64
seq_length: 2048
vocab_size: 32032
"""


def _synthetic_runs(noise: float = 0.0, seed: int = 0):
    n, d = np.meshgrid(np.logspace(7, 10, 6), np.logspace(9, 12, 6))
    n, d = n.ravel(), d.ravel()
    loss = np.array([CHINCHILLA.loss(a, b) for a, b in zip(n, d, strict=True)])
    loss *= np.exp(np.random.default_rng(seed).normal(0.0, noise, loss.shape))
    return n, d, loss


def test_fit_recovers_constants_from_noiseless_points():
    pytest.importorskip("scipy")
    fit = fit_chinchilla(*_synthetic_runs(), starts=4, grid=SMALL_GRID)
    for name in ("E", "A", "B", "alpha", "beta"):
        assert getattr(fit, name) == pytest.approx(getattr(CHINCHILLA, name), rel=1e-3), name


def test_fit_with_noise_recovers_exponents_and_allocation():
    pytest.importorskip("scipy")
    fit = fit_chinchilla(*_synthetic_runs(noise=0.01), starts=4, grid=SMALL_GRID)
    assert fit.alpha == pytest.approx(0.34, abs=0.05)
    assert fit.beta == pytest.approx(0.28, abs=0.05)
    assert abs(fit.E - 1.69) < 0.1
    n_true, d_true = CHINCHILLA.compute_optimal(1e24)
    n_fit, d_fit = fit.compute_optimal(1e24)
    assert 0.7 < n_fit / n_true < 1.4 and 0.7 < d_fit / d_true < 1.4


def test_compute_optimal_closed_form_matches_brute_force():
    c = 5.88e21
    n_opt, d_opt = CHINCHILLA.compute_optimal(c)
    assert 6 * n_opt * d_opt == pytest.approx(c)
    grid = np.logspace(8, 12, 200_001)  # minimise L(N, C / 6N) along the constraint
    losses = CHINCHILLA.E + CHINCHILLA.A / grid**0.34 + CHINCHILLA.B / (c / 6 / grid) ** 0.28
    assert grid[np.argmin(losses)] == pytest.approx(n_opt, rel=1e-3)


def test_seven_billion_at_twenty_tokens_per_parameter():
    tokens = chinchilla_tokens(7e9)
    assert tokens == 1.4e11
    assert 6 * 7e9 * tokens == pytest.approx(5.88e21)
    # LLaMA-7B shape: matmul weights 6,607,077,376; attention 12 x 32 layers x 2048 x 4096
    n = matmul_params(LLAMA_7B)
    assert n == 32 * (4096 * 3 * 4096 + 4096 * 4096 + 4096 * 2 * 11008 + 11008 * 4096) + (
        32000 * 4096
    )
    total = flops_per_token(LLAMA_7B) * tokens
    assert total == pytest.approx((6 * n + 12 * 32 * 2048 * 4096) * 1.4e11)
    assert total > 6 * n * tokens  # attention on top of 6ND
    # 5.88e21 FLOPs on 8 GPUs at 989 TFLOP/s and 50 % MFU: 5.88e21 / 3.956e15 s = 17.2 days
    assert training_days(5.88e21, 8, 989e12, 0.5) == pytest.approx(5.88e21 / 3.956e15 / 86400)


# hidden 64, 4 heads, MHA, ffn 128 SwiGLU, 4 layers, vocab 1000 (padded: 1024 at TP 1 and 2)
HAND = ModelConfig(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                   num_query_groups=4, seq_length=256, vocab_size=1000)  # fmt: skip


def test_memory_by_hand():
    # per layer: qkv 64x192 = 12288, proj 4096, fc1 64x256 = 16384, fc2 8192, norms 128 = 41088
    # TP 2, PP 2: a stage has 2 layers = 82176; first stage: + embedding 1024x64 = 65536;
    # last stage: + output 65536 + final norm 64 -> heavier: 82176 + 65600 = 147776; / TP 2
    assert stage_params(HAND, tp=2, pp=2) == 73_888
    mem = memory_per_gpu(HAND, tp=2, pp=2, dp=4, micro_batch=2, sequence_parallel=True)
    assert mem.weights == 2 * 73_888  # bf16
    assert mem.grads == 4 * 73_888  # fp32 main grads
    assert mem.optimizer == 12 * 73_888 / 4  # master + m + v, ZeRO-1 over DP 4
    # activations per layer (TP+SP, flash): s*b*(split + replicated)/t, s=256, b=2, t=2
    # split = Q 2h + K,V 4kv + proj-in 2h + fc1-out 2*2f + fc2-in 2f = 128+256+128+512+256
    # replicated = 10h = 640 -> per layer 256*2*(1280 + 640)/2 = 491520 bytes
    layer = 256 * 2 * (1280 + 640) / 2
    logits = 4 * 256 * 2 * 1024 / 2
    assert mem.activations == 4 * layer + logits
    assert mem.activations_full_recompute == 4 * (2 * 256 * 2 * 64 / 2) + layer + logits
    assert mem.total == mem.weights + mem.grads + mem.optimizer + mem.activations


def test_interleaved_pipeline_holds_more_activations():
    """Rank 0 of an interleaved pipeline warms up with 2*(pp-1) + (vp-1)*group chunk forwards
    (Megatron-Core's get_pp_rank_microbatches) and holds one more: K2 (80 layers, PP4, VP5,
    groups of 5) holds (6 + 20 + 1) chunks of 4 layers = 108 layers' activations, 1.35x 1F1B."""
    from orchestration.planning.memory import layers_in_flight

    assert layers_in_flight(80, pp=4) == 80
    assert layers_in_flight(80, pp=4, vp=5, microbatch_group=5) == 108
    assert layers_in_flight(80, pp=4, vp=5) == 80 * (1 + 3 / 20)  # default groups of PP
    plain = memory_per_gpu(HAND, tp=2, pp=2, micro_batch=2)
    interleaved = memory_per_gpu(HAND, tp=2, pp=2, micro_batch=2, vp=2)
    assert interleaved.weights == plain.weights
    assert interleaved.activations > plain.activations


def test_activations_reproduce_korthikanti_for_gpt3_shapes():
    # GPT-3 layout (MHA, GeLU, ffn 4h): per-layer bytes s*b*h*(34 + 5*a*s/h) without parallelism
    gpt = ModelConfig(num_layers=1, hidden_size=1024, ffn_hidden_size=4096, activation="gelu",
                      num_attention_heads=16, num_query_groups=16, seq_length=2048)  # fmt: skip
    s, b, h, a, t = 2048, 1, 1024, 16, 4
    no_tp = activation_bytes_per_layer(gpt, s, b, 1, False, flash_attention=False)
    assert no_tp == pytest.approx(s * b * h * (34 + 5 * a * s / h))
    tp_only = activation_bytes_per_layer(gpt, s, b, t, False, flash_attention=False)
    assert tp_only == pytest.approx(s * b * h * (10 + 24 / t + 5 * a * s / (h * t)))
    tp_sp = activation_bytes_per_layer(gpt, s, b, t, True, flash_attention=False)
    assert tp_sp == pytest.approx(s * b * h / t * (34 + 5 * a * s / h))
    flash = activation_bytes_per_layer(gpt, s, b, t, True, flash_attention=True)
    assert flash == pytest.approx(s * b * h / t * 34)


def test_tied_embeddings_keep_a_copy_on_the_last_stage():
    tied = ModelConfig(**{**HAND.__dict__, "tie_embeddings": True})
    assert stage_params(tied, 1, 1) == 4 * 41088 + 64 + 65536  # one shared matrix
    assert stage_params(tied, 1, 2) == stage_params(HAND, 1, 2)  # last stage holds a copy


def test_load_model_config(tmp_path):
    path = tmp_path / "k2.yaml"
    path.write_text(K2_YAML)
    model = load_model_config(str(path))
    assert model.num_layers == 80 and model.vocab_size == 32032
    wrapped = tmp_path / "wrapped.yaml"
    wrapped.write_text("defaults: []\nmodel:\n  name: w\n  num_layers: 3\n")
    assert load_model_config(str(wrapped)).num_layers == 3
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "named.yaml").write_text("name: named\nhidden_size: 256\n")
    assert load_model_config("named", tmp_path).hidden_size == 256
    with pytest.raises(FileNotFoundError):
        load_model_config("missing", tmp_path)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestration.plan", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_cli_help():
    proc = _cli("--help")
    assert proc.returncode == 0 and "--model" in proc.stdout and "fit" in proc.stdout


def test_cli_plan_for_a_model_yaml(tmp_path):
    path = tmp_path / "k2.yaml"
    path.write_text(K2_YAML)
    base = ["--model", str(path), "--tp", "8", "--pp", "4", "--dp", "15", "--tokens", "1.4e12"]
    proc = _cli(*base, "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["parameters"]["total"] == 80 * 809_517_056 + 8192 + 2 * 32_256 * 8192
    assert plan["layout"]["gpus"] == 480
    assert 5.5e23 < plan["training_flops"] < 5.8e23
    assert 20 < plan["days"]["0.5"] < plan["days"]["0.4"] < 45
    text = _cli(*base, "--mfu", "0.45")
    assert text.returncode == 0 and "MFU 45%" in text.stdout and "GiB" in text.stdout


def test_cli_fit(tmp_path):
    pytest.importorskip("scipy")
    n, d, loss = _synthetic_runs()
    runs = tmp_path / "runs.csv"
    runs.write_text("params,tokens,loss\n" + "".join(f"{a},{b},{c}\n" for a, b, c in
                                                     zip(n, d, loss, strict=True)))  # fmt: skip
    proc = _cli("fit", str(runs), "--starts", "4", "--budget", "1e22", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["fit"]["alpha"] == pytest.approx(0.34, rel=1e-2)
    assert out["optimal"][0]["n"] == pytest.approx(CHINCHILLA.compute_optimal(1e22)[0], rel=0.05)
    jsonl = tmp_path / "runs.jsonl"
    jsonl.write_text("".join(json.dumps({"N": a, "D": b, "loss": c}) + "\n"
                             for a, b, c in zip(n, d, loss, strict=True)))  # fmt: skip
    assert _cli("fit", str(jsonl), "--starts", "2").returncode == 0
