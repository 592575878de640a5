"""Turn a :class:`RunConfig` into Megatron-Core's config objects, in one place.

Everything Megatron needs to know about a run (architecture, parallel layout, precision, fused
kernels, optimizer, DDP buckets) is decided here from the typed schema, so a reader can see the
whole mapping at once and no other module interprets raw config for Megatron.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig
from megatron.core.transformer import TransformerConfig

from orchestration.config import OptimConfig, RunConfig, padded_vocab_size

#: ``train.precision`` values to torch dtypes (``auto`` is resolved first).
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class MegatronConfigs:
    """What ``build_megatron_configs`` returns: Megatron's configs plus GPTModel's arguments."""

    transformer: TransformerConfig
    optimizer: OptimizerConfig
    ddp: DistributedDataParallelConfig
    padded_vocab_size: int
    precision: str
    on_cpu: bool


def resolve_precision(precision: str, on_cpu: bool) -> str:
    """``auto`` is bf16 on GPUs and fp32 on CPU (where bf16 matmuls are slow and inexact)."""
    if precision != "auto":
        return precision
    return "fp32" if on_cpu else "bf16"


def build_megatron_configs(cfg: RunConfig, on_cpu: bool) -> MegatronConfigs:
    precision = resolve_precision(cfg.train.precision, on_cpu)
    transformer = _transformer_config(cfg, precision, on_cpu)
    return MegatronConfigs(
        transformer=transformer,
        optimizer=optimizer_config(cfg.optim, cfg, precision),
        ddp=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
            overlap_param_gather=cfg.parallel.overlap_param_gather,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
            bucket_size=None if on_cpu else 40_000_000,
        ),
        padded_vocab_size=padded_vocab_size(cfg.model, cfg.parallel.tensor),
        precision=precision,
        on_cpu=on_cpu,
    )


def _transformer_config(cfg: RunConfig, precision: str, on_cpu: bool) -> TransformerConfig:
    m, p = cfg.model, cfg.parallel
    swiglu = m.activation == "swiglu"
    fused = not on_cpu  # Megatron's jit/triton fusions and apex kernels need CUDA
    recompute = {} if p.recompute == "none" else {"recompute_granularity": p.recompute}
    if p.recompute == "full":
        recompute |= {"recompute_method": "uniform", "recompute_num_layers": 1}
    extra = {}
    if cfg.mup.enabled:
        from megatron_patches.mup import mup_transformer_kwargs

        extra = mup_transformer_kwargs(cfg)
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.hidden_size // m.num_attention_heads,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        add_bias_linear=m.add_bias_linear,
        add_qkv_bias=m.add_bias_linear,
        gated_linear_unit=swiglu,
        activation_func=F.silu if swiglu else F.gelu,
        init_method_std=m.init_method_std,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        virtual_pipeline_model_parallel_size=(p.virtual_pipeline if p.virtual_pipeline > 1
                                              else None),
        microbatch_group_size_per_vp_stage=p.microbatch_group_size,
        **_p2p_kwargs(p.virtual_pipeline),
        sequence_parallel=p.sequence_parallel,
        params_dtype=PRECISION_DTYPES[precision],
        pipeline_dtype=PRECISION_DTYPES[precision],
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        # On CPU, initialise the full master weight and split it: the same seed gives the same
        # model at every TP size, which the parallel-equivalence tests rely on.
        use_cpu_initialization=on_cpu,
        bias_activation_fusion=fused and swiglu,
        bias_dropout_fusion=fused,
        masked_softmax_fusion=fused,
        persist_layer_norm=fused,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        deterministic_mode=on_cpu and cfg.runtime.deterministic,
        **recompute,
        **extra,
    )


def _p2p_kwargs(virtual_pipeline: int) -> dict:
    """Megatron-LM's defaults for the interleaved schedule: overlapped, unbatched p2p. The
    batched ops would also be wrong at PP=2: a rank's previous and next stage are then the same
    peer, and one batch's activation and gradient messages to it are matched in the wrong order
    (measured on gloo: micro-batches 3-4 of a step got each other's tensors).
    ``_p2p_ops`` sends each direction over its own process group instead."""
    if virtual_pipeline <= 1:
        return {}
    return {"overlap_p2p_comm": True, "batch_p2p_comm": False}


def optimizer_config(optim: OptimConfig, cfg: RunConfig, precision: str) -> OptimizerConfig:
    """AdamW (decoupled weight decay) with Megatron's mixed-precision and ZeRO-1 machinery."""
    return OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.beta1,
        adam_beta2=optim.beta2,
        adam_eps=optim.eps,
        clip_grad=optim.clip_grad,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        params_dtype=PRECISION_DTYPES[precision],
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        log_num_zeros_in_grad=False,
    )
