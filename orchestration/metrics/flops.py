"""Parameter counts, model FLOPs per token and MFU for the LLaMA-style GPTModel we train.

Why a module of its own: the planner (``python -m orchestration.plan``), the training loop's throughput
log and the benchmarks must agree on one definition of "parameters" and "FLOPs", otherwise MFU
numbers from different tools are not comparable. Everything here is arithmetic on
:class:`orchestration.config.ModelConfig`; nothing builds a model. Two attention conventions
exist in the field (:data:`CONVENTIONS`, 15% apart at llama_1b/4096); the metrics log and the
benchmarks report both, labelled, so a figure can be compared with either kind of anchor.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestration.config import ModelConfig, padded_vocab_size

# Dense (no 2:4 sparsity) BF16 tensor-core peaks per GPU, in FLOP/s. NVIDIA's datasheets give
# the sparse figure with a footnote; dense is half of it: H100 SXM 1,979 TF -> 989, H100 NVL
# 1,671 -> 835, H100 PCIe 1,513 -> 756 (NVIDIA H100 Tensor Core GPU datasheet); H200 SXM
# 1,979 -> 989, H200 NVL 1,671 -> 835 (H200 datasheet); GH200 989 (GH200 Grace Hopper
# Superchip datasheet, its H100/H200 GPU); B200 4.5 PF sparse -> 2,250 TF (HGX B200,
# DGX B200 datasheets, per GPU); A100 312 dense for all four of 40/80 GB x SXM/PCIe (A100
# datasheet); L40S 733 sparse -> 362; A10G 125 (A10 datasheet); MI300X 1,307 (AMD).
PEAK_BF16_FLOPS: dict[str, float] = {
    "h100_sxm": 989e12,
    "h100_nvl": 835e12,
    "h100_pcie": 756e12,
    "h200": 989e12,
    "h200_nvl": 835e12,
    "gh200": 989e12,
    "b200": 2250e12,
    "a100": 312e12,
    "a10g": 125e12,
    "l40s": 362e12,
    "mi300x": 1307e12,
}


# Fragments of torch.cuda.get_device_name(), lower-cased, to table keys; the more specific
# fragments come first ("gh200" before "h200", "h100 nvl"/"h100 pcie" before "h100"). Names as
# the driver reports them: "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 NVL", "NVIDIA H100
# PCIe", "NVIDIA H200", "NVIDIA H200 NVL", "NVIDIA GH200 480GB", "NVIDIA B200",
# "NVIDIA A100-SXM4-80GB", "NVIDIA A100-PCIE-40GB", "NVIDIA A100 80GB PCIe".
_DEVICE_KEYS = (("gh200", "gh200"), ("h200 nvl", "h200_nvl"), ("h200", "h200"),
                ("h100 nvl", "h100_nvl"), ("h100 pcie", "h100_pcie"), ("h100", "h100_sxm"),
                ("b200", "b200"), ("a100", "a100"), ("a10g", "a10g"), ("l40s", "l40s"),
                ("mi300x", "mi300x"))  # fmt: skip

#: The two ways of counting attention in model FLOPs, as metric suffixes (``mfu_full_attn``):
#: ``full_attn`` is PaLM's (Chowdhery et al. 2022, appendix B) and Megatron-LM's formula before
#: 2025; ``causal`` is Megatron-LM's ``num_floating_point_operations`` since (megatron/training/
#: training.py; megatron-core's pip package does not ship it), which halves attention's
#: QK^T and AV for the causal mask. At llama_1b, seq 4096: 8.421e9 vs 7.314e9 FLOPs per token.
CONVENTIONS = ("full_attn", "causal")


def peak_flops_for_device(device_name: str) -> float | None:
    """Dense BF16 peak for a GPU name such as "NVIDIA H100 80GB HBM3"; None when unknown."""
    name = device_name.lower().replace("-", " ")
    for fragment, key in _DEVICE_KEYS:
        if fragment in name:
            return PEAK_BF16_FLOPS[key]
    return None


@dataclass(frozen=True)
class ParameterCount:
    """Exact parameter counts of Megatron-Core's ``GPTModel`` for one config.

    ``embedding`` is the input side (word embeddings, plus learned absolute position
    embeddings when used); ``output`` is the untied output layer (0 when tied, because the
    weight is shared and counted once); ``non_embedding`` is the transformer layers plus the
    final norm (Kaplan et al.'s N).
    """

    total: int
    embedding: int
    output: int
    per_layer: int
    non_embedding: int


def head_dim(model: ModelConfig) -> int:
    return model.hidden_size // model.num_attention_heads


def _qkv_width(model: ModelConfig) -> int:
    """Output width of the fused QKV projection: all query heads plus the K and V groups."""
    d = head_dim(model)
    return model.num_attention_heads * d + 2 * model.num_query_groups * d


def _fc1_width(model: ModelConfig) -> int:
    """SwiGLU's fc1 computes the gate and the up projection in one matmul: twice as wide."""
    return model.ffn_hidden_size * (2 if model.activation == "swiglu" else 1)


def layer_matmul_params(model: ModelConfig) -> int:
    """Weights of the four matmuls of one layer: QKV, attention output, fc1, fc2."""
    h = model.hidden_size
    attn_out = model.num_attention_heads * head_dim(model)
    return h * _qkv_width(model) + attn_out * h + h * _fc1_width(model) + model.ffn_hidden_size * h


def _norm_params(model: ModelConfig) -> int:
    """RMSNorm has a scale only; LayerNorm has a scale and a bias."""
    return model.hidden_size * (2 if model.normalization == "LayerNorm" else 1)


def _layer_bias_params(model: ModelConfig) -> int:
    if not model.add_bias_linear:
        return 0
    return _qkv_width(model) + model.hidden_size + _fc1_width(model) + model.hidden_size


def parameter_count(model: ModelConfig, tensor_parallel: int = 1) -> ParameterCount:
    """Count parameters exactly as ``GPTModel`` allocates them (summed over all TP shards).

    The vocabulary is padded to a multiple of ``make_vocab_size_divisible_by x TP`` (Megatron's
    rule), so the embedding and output sizes depend on ``tensor_parallel``.
    """
    h = model.hidden_size
    vocab = padded_vocab_size(model, tensor_parallel)
    per_layer = layer_matmul_params(model) + _layer_bias_params(model) + 2 * _norm_params(model)
    if model.qk_layernorm:  # one norm over head_dim each for queries and keys, shared by heads
        head_dim = model.hidden_size // model.num_attention_heads
        per_layer += 2 * _norm_params(model) * head_dim // model.hidden_size
    embedding = vocab * h
    if model.position_embedding == "learned_absolute":
        embedding += model.seq_length * h
    output = 0 if model.tie_embeddings else vocab * h
    non_embedding = model.num_layers * per_layer + _norm_params(model)
    return ParameterCount(
        total=embedding + output + non_embedding,
        embedding=embedding,
        output=output,
        per_layer=per_layer,
        non_embedding=non_embedding,
    )


def matmul_params(model: ModelConfig, tensor_parallel: int = 1) -> int:
    """N in 6N: every weight used in a matmul, including the output layer even when tied.

    Input embeddings (a lookup), norms and biases do no matmul FLOPs and are left out.
    """
    output = padded_vocab_size(model, tensor_parallel) * model.hidden_size
    return model.num_layers * layer_matmul_params(model) + output


def flops_per_token(
    model: ModelConfig, seq_length: int | None = None, tensor_parallel: int = 1,
    causal: bool = False,
) -> float:
    """Model FLOPs (forward + backward) per trained token, with no recompute counted.

    Formula (PaLM, Chowdhery et al. 2022, appendix B; Megatron-LM's MFU accounting)::

        full attention:  6 * N + 12 * L * S * (heads * head_dim)
        causal:          6 * N +  6 * L * S * (heads * head_dim)

    * ``6 * N``: each matmul weight costs 2 FLOPs per token forward (multiply + add) and 4
      backward (input and weight gradients). N is :func:`matmul_params` (layers' matmul weights
      plus the output layer over the vocabulary padded for ``tensor_parallel``; no input
      embedding lookup).
    * ``12 * L * S * d``: per layer and token, Q @ K^T and softmax @ V each cost 2 * S * d
      FLOPs forward (4 * S * d), times 3 for forward + backward.

    The two conventions differ only there (see :data:`CONVENTIONS`): by default the causal mask
    is *not* used to halve the attention term, as in PaLM and Megatron-LM before 2025;
    ``causal=True`` halves it, which is exactly Megatron-LM's current
    ``num_floating_point_operations`` for a dense GQA/MHA model (tests/test_flops.py checks it
    against a transcription of that function). Report which one a figure uses. Activation
    recomputation is not counted either: this is model FLOPs (MFU), not hardware FLOPs (HFU).
    """
    s = model.seq_length if seq_length is None else seq_length
    attn_width = model.num_attention_heads * head_dim(model)
    attention = (6.0 if causal else 12.0) * model.num_layers * s * attn_width
    return 6.0 * matmul_params(model, tensor_parallel) + attention


def flops_per_token_by_convention(model: ModelConfig, seq_length: int | None = None,
                                  tensor_parallel: int = 1) -> dict[str, float]:
    """``{"full_attn": ..., "causal": ...}``: both conventions for one model and sequence."""
    return {name: flops_per_token(model, seq_length, tensor_parallel, causal=name == "causal")
            for name in CONVENTIONS}


def training_flops(model: ModelConfig, tokens: float, seq_length: int | None = None) -> float:
    """Total model FLOPs to train on ``tokens`` tokens: ``flops_per_token * D`` (full
    attention, the planner's convention)."""
    return flops_per_token(model, seq_length) * tokens


def mfu(
    tokens_per_second: float, flops_per_token: float, num_gpus: int, peak_flops_per_gpu: float
) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the cluster's peak FLOP/s."""
    if num_gpus <= 0 or peak_flops_per_gpu <= 0:
        raise ValueError("num_gpus and peak_flops_per_gpu must be positive")
    return tokens_per_second * flops_per_token / (num_gpus * peak_flops_per_gpu)


def mfu_by_convention(tokens_per_second: float, per_token: dict[str, float], num_gpus: int,
                      peak_flops_per_gpu: float) -> dict[str, float]:
    """``{"mfu_full_attn": ..., "mfu_causal": ...}`` from :func:`flops_per_token_by_convention`."""
    return {f"mfu_{name}": mfu(tokens_per_second, flops, num_gpus, peak_flops_per_gpu)
            for name, flops in per_token.items()}
