"""Megatron-Core's GPTModel weights as Hugging Face ``LlamaForCausalLM`` weights, and back.

A model with ``qk_layernorm`` is exported as ``Qwen3ForCausalLM``: Llama plus an RMSNorm over
each head's queries and keys before RoPE (``q_norm``/``k_norm``), which is what Megatron-Core's
``q_layernorm``/``k_layernorm`` compute.

The conversion lives next to the model, as torchtitan's ``state_dict_adapter`` does: names,
the fused QKV split per query group, SwiGLU's ``[gate; up]`` split, and muP's run-time
multipliers folded into plain weights (a Llama forward has no muP). ``llama_to_megatron`` and
``unfold_mup`` are the exact inverses, used by ``orchestration.import_hf``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from orchestration.config import ModelConfig, RunConfig


class UnsupportedArchitecture(ValueError):
    """The run's architecture has no plain ``LlamaForCausalLM`` equivalent."""


def check_llama_compatible(m: ModelConfig) -> None:
    """Raise naming each model field that LlamaForCausalLM cannot express."""
    wanted = {
        "normalization": "RMSNorm",
        "activation": "swiglu",
        "add_bias_linear": False,
        "position_embedding": "rope",
        "rotary_percent": 1.0,
    }
    bad = [
        f"model.{k}={getattr(m, k)!r} (Llama needs {v!r})"
        for k, v in wanted.items()
        if getattr(m, k) != v
    ]
    if bad:
        raise UnsupportedArchitecture("cannot export to LlamaForCausalLM: " + "; ".join(bad))


def megatron_to_llama(sd: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename and split Megatron's fused tensors into Llama's (no rescaling here)."""
    heads, groups, hidden = m.num_attention_heads, m.num_query_groups, m.hidden_size
    head_dim, per_group = hidden // heads, heads // groups
    out = {
        "model.embed_tokens.weight": sd["embedding.word_embeddings.weight"],
        "model.norm.weight": sd["decoder.final_layernorm.weight"],
    }
    if "output_layer.weight" in sd and not m.tie_embeddings:
        out["lm_head.weight"] = sd["output_layer.weight"]
    for i in range(m.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        # Rows are grouped per query group: [per_group query heads, 1 key, 1 value] x head_dim.
        qkv = sd[src + "self_attention.linear_qkv.weight"].view(
            groups, per_group + 2, head_dim, hidden
        )
        out[dst + "self_attn.q_proj.weight"] = qkv[:, :per_group].reshape(-1, hidden)
        out[dst + "self_attn.k_proj.weight"] = qkv[:, per_group].reshape(-1, hidden)
        out[dst + "self_attn.v_proj.weight"] = qkv[:, per_group + 1].reshape(-1, hidden)
        out[dst + "self_attn.o_proj.weight"] = sd[src + "self_attention.linear_proj.weight"]
        gate, up = sd[src + "mlp.linear_fc1.weight"].chunk(2, dim=0)  # SwiGLU: [gate; up]
        out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = gate, up
        out[dst + "mlp.down_proj.weight"] = sd[src + "mlp.linear_fc2.weight"]
        out[dst + "input_layernorm.weight"] = sd[src + "input_layernorm.weight"]
        out[dst + "post_attention_layernorm.weight"] = sd[src + "pre_mlp_layernorm.weight"]
        if m.qk_layernorm:  # Qwen3's per-head norms
            out[dst + "self_attn.q_norm.weight"] = sd[src + "self_attention.q_layernorm.weight"]
            out[dst + "self_attn.k_norm.weight"] = sd[src + "self_attention.k_layernorm.weight"]
    return out


def llama_to_megatron(sd: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of :func:`megatron_to_llama`: Llama's names fused into Megatron's tensors.

    Q, K and V are interleaved per query group (``[per_group q heads, k, v] x head_dim`` rows),
    as Megatron's ``linear_qkv`` holds them, so that a TP split of the fused rows gives each rank
    whole query groups; ``gate_proj`` and ``up_proj`` are stacked as ``[gate; up]``.
    """
    heads, groups, hidden = m.num_attention_heads, m.num_query_groups, m.hidden_size
    head_dim, per_group = hidden // heads, heads // groups
    out = {
        "embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
        "decoder.final_layernorm.weight": sd["model.norm.weight"],
    }
    if not m.tie_embeddings:
        out["output_layer.weight"] = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    for i in range(m.num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        q = sd[src + "self_attn.q_proj.weight"].reshape(groups, per_group, head_dim, hidden)
        k = sd[src + "self_attn.k_proj.weight"].reshape(groups, 1, head_dim, hidden)
        v = sd[src + "self_attn.v_proj.weight"].reshape(groups, 1, head_dim, hidden)
        qkv = torch.cat([q, k, v], dim=1).reshape(-1, hidden)
        out[dst + "self_attention.linear_qkv.weight"] = qkv
        out[dst + "self_attention.linear_proj.weight"] = sd[src + "self_attn.o_proj.weight"]
        out[dst + "mlp.linear_fc1.weight"] = torch.cat(
            [sd[src + "mlp.gate_proj.weight"], sd[src + "mlp.up_proj.weight"]], dim=0
        )
        out[dst + "mlp.linear_fc2.weight"] = sd[src + "mlp.down_proj.weight"]
        out[dst + "input_layernorm.weight"] = sd[src + "input_layernorm.weight"]
        out[dst + "pre_mlp_layernorm.weight"] = sd[src + "post_attention_layernorm.weight"]
    return out


def llama_config(
    cfg: RunConfig, vocab: int, tied: bool, dtype: str, special: dict[str, int]
) -> dict:
    """config.json contents (LlamaConfig's fields; read by transformers 4.45+ and 5), or
    Qwen3Config's for a model with QK layernorm (transformers 4.51+)."""
    m = cfg.model
    qwen3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
             "use_sliding_window": False, "sliding_window": None,
             "max_window_layers": m.num_layers}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups,
        "head_dim": m.hidden_size // m.num_attention_heads,
        "hidden_act": "silu",
        "max_position_embeddings": m.seq_length,
        "rms_norm_eps": m.norm_epsilon,
        "rope_theta": float(m.rotary_base),
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": m.init_method_std,
        "tie_word_embeddings": tied,
        "torch_dtype": dtype,
        "use_cache": True,
        **{f"{k}_token_id": v for k, v in special.items() if k in ("bos", "eos", "pad")},
        **(qwen3 if m.qk_layernorm else {}),
    }


@dataclass
class MupFactors:
    """What muP multiplies at run time, to be multiplied into plain Llama weights instead."""

    embedding: float = 1.0  # the embedding output
    logits: float = 1.0  # the output layer's logits
    query: float = 1.0  # queries, turning Llama's 1/sqrt(d) into muP's 1/d**power


def mup_factors(cfg: RunConfig) -> MupFactors:
    """muP's multipliers from the config: output_multiplier / width_mult on the logits, and
    d**(0.5 - power) on q, since q.k * d**(0.5 - power) / sqrt(d) == q.k / d**power."""
    mup = cfg.mup
    if not mup.enabled:
        return MupFactors()
    m = cfg.model
    head_dim = m.hidden_size // m.num_attention_heads
    return MupFactors(
        embedding=mup.embedding_multiplier,
        logits=mup.output_multiplier * mup.base_width / m.hidden_size,
        query=head_dim ** (0.5 - mup.attention_scale_power),
    )


def unfold_mup(weights: dict[str, torch.Tensor], f: MupFactors) -> dict[str, torch.Tensor]:
    """The inverse of :func:`fold_mup`: weights that a muP run, multiplying at run time, turns
    back into the plain Llama forward. (A tied muP run needs ``lm_head / logits`` equal to
    ``embed / embedding``; ``import_hf`` checks that.)"""
    out = dict(weights)
    out["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"] / f.embedding
    if "lm_head.weight" in weights:
        out["lm_head.weight"] = weights["lm_head.weight"] / f.logits
    for name, tensor in weights.items():
        if name.endswith("self_attn.q_proj.weight"):
            out[name] = tensor / f.query
    return out


def fold_mup(weights: dict[str, torch.Tensor], f: MupFactors) -> dict[str, torch.Tensor]:
    """Llama weights whose plain forward equals the muP forward (RoPE is linear, so scaling q
    before or after it is the same). A tied embedding is untied when the two factors differ."""
    out = dict(weights)
    embed = weights["model.embed_tokens.weight"]
    if "lm_head.weight" in weights:
        out["lm_head.weight"] = weights["lm_head.weight"] * f.logits
    elif f.logits != f.embedding:
        out["lm_head.weight"] = embed * f.logits
    out["model.embed_tokens.weight"] = embed * f.embedding
    # With a query norm (Qwen3) a scale on q_proj would be normalised away: scale the norm.
    query = "self_attn.q_norm.weight" if any(n.endswith("self_attn.q_norm.weight")
                                             for n in weights) else "self_attn.q_proj.weight"
    for name, tensor in weights.items():
        if name.endswith(query):
            out[name] = tensor * f.query
    return out
