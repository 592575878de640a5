"""LLaMA-style transformer layer specs for Megatron-Core's ``GPTModel``.

Why a module of our own: the architecture is chosen in two places in Megatron-Core, the layer
``ModuleSpec`` (which classes: norm, attention, MLP) and the ``TransformerConfig`` (how they
behave: RMSNorm vs LayerNorm, gated SiLU, biases, query groups). ``megatron_patches.configs`` sets the
config; this module picks the classes: Transformer Engine's fused modules (``te``) or Megatron's
own local modules (``local``: CPU, or a GPU job that asks for them with model.layer_spec=local).

The local spec is written out here rather than taken from ``get_gpt_layer_local_spec`` because
that function mutates a module global to switch norm classes; ``WrappedTorchNorm`` reads
``config.normalization`` itself, so one explicit spec serves RMSNorm and LayerNorm. Its
``sharded_state_dict_keys_map`` matches Megatron's, so checkpoints load across TE and local.
"""

from __future__ import annotations

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


def llama_layer_spec(layer_spec: str, qk_layernorm: bool = False) -> ModuleSpec:
    """The decoder-layer spec for ``MegatronConfigs.layer_spec``: ``te`` (Transformer Engine's
    fused modules) or ``local``. Which one a run gets is decided, loudly, by
    ``megatron_patches.platform.resolve_layer_spec``; nothing here falls back.
    ``qk_layernorm`` normalises queries and keys per head with the model's norm (the
    TransformerConfig's ``qk_layernorm`` must be set too: Megatron then all-reduces their
    gradients across tensor-parallel ranks)."""
    if layer_spec == "te":
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        # TE fuses the pre-attention/pre-MLP norm into the following linear layer and picks
        # RMSNorm vs LayerNorm from config.normalization.
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    if layer_spec != "local":
        raise ValueError(f"layer spec {layer_spec!r} is not 'te' or 'local'")
    return local_llama_layer_spec(qk_layernorm)


#: The modules of Megatron's TE spec (``TESpecProvider``, megatron/core/extensions/
#: transformer_engine_spec_provider.py), printed by ``--explain`` where TE is not installed;
#: ``tests/test_gpu_path.py`` checks them against the real spec on a GPU machine.
TE_SPEC_MODULES = {
    "input_layernorm": "IdentityOp (fused into linear_qkv)",
    "self_attention": "SelfAttention (causal)",
    "self_attention.linear_qkv": "TELayerNormColumnParallelLinear",
    "self_attention.core_attention": "TEDotProductAttention",
    "self_attention.linear_proj": "TERowParallelLinear",
    "pre_mlp_layernorm": "IdentityOp (fused into linear_fc1)",
    "mlp": "MLP",
    "mlp.linear_fc1": "TELayerNormColumnParallelLinear",
    "mlp.linear_fc2": "TERowParallelLinear",
}


def describe_spec(spec: ModuleSpec) -> dict[str, str]:
    """``{submodule path: class name}`` of a decoder-layer spec, for ``--explain``."""
    out: dict[str, str] = {}

    def walk(prefix: str, node) -> None:
        subs = getattr(node, "submodules", None)
        if subs is None:
            return
        for name in getattr(subs, "__dataclass_fields__", {}):
            value = getattr(subs, name)
            if value is None:
                continue
            module = value.module if isinstance(value, ModuleSpec) else value
            label = getattr(module, "__name__", type(module).__name__)
            out[f"{prefix}{name}"] = label
            if isinstance(value, ModuleSpec):
                walk(f"{prefix}{name}.", value)

    walk("", spec)
    return out


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
