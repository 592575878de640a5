"""LLaMA-style transformer layer specs for Megatron-Core's ``GPTModel``.

Why a module of our own: the architecture is chosen in two places in Megatron-Core, the layer
``ModuleSpec`` (which classes: norm, attention, MLP) and the ``TransformerConfig`` (how they
behave: RMSNorm vs LayerNorm, gated SiLU, biases, query groups). ``megatron_patches.configs`` sets the
config; this module picks the classes, with Transformer Engine's fused modules when TE imports
and Megatron's own local modules otherwise (CPU, or a cluster without TE).

The local spec is written out here rather than taken from ``get_gpt_layer_local_spec`` because
that function mutates a module global to switch norm classes; ``WrappedTorchNorm`` reads
``config.normalization`` itself, so one explicit spec serves RMSNorm and LayerNorm. Its
``sharded_state_dict_keys_map`` matches Megatron's, so checkpoints load across TE and local.
"""

from __future__ import annotations

import functools

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules


@functools.cache
def transformer_engine_available() -> bool:
    """True when Transformer Engine imports with a usable CUDA device."""
    try:
        import torch
        import transformer_engine  # noqa: F401
        from megatron.core.extensions import transformer_engine as _te  # noqa: F401
    except Exception:  # TE raises assorted errors without CUDA libraries
        return False
    return torch.cuda.is_available()


def llama_layer_spec(use_transformer_engine: bool | None = None,
                     qk_layernorm: bool = False) -> ModuleSpec:
    """The decoder-layer spec: TE's fused spec when available (or asked for), else local.
    ``qk_layernorm`` normalises queries and keys per head with the model's norm (the
    TransformerConfig's ``qk_layernorm`` must be set too: Megatron then all-reduces their
    gradients across tensor-parallel ranks)."""
    if use_transformer_engine is None:
        use_transformer_engine = transformer_engine_available()
    if use_transformer_engine:
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        # TE fuses the pre-attention/pre-MLP norm into the following linear layer and picks
        # RMSNorm vs LayerNorm from config.normalization.
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    return local_llama_layer_spec(qk_layernorm)


def local_llama_layer_spec(qk_layernorm: bool = False) -> ModuleSpec:
    """Megatron-Core-only modules: torch norms, tensor-parallel linears, unfused attention."""
    qk_norm = WrappedTorchNorm if qk_layernorm else IdentityOp
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=WrappedTorchNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=DotProductAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=WrappedTorchNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(
                    linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear
                ),
            ),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
            },
        ),
    )
