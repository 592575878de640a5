"""Build the GPT model chunk for this pipeline stage, wrapped in Megatron's DDP."""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.module import Float16Module

from megatron_patches.configs import MegatronConfigs
from megatron_patches.llama_spec import llama_layer_spec
from orchestration.config import RunConfig


def build_gpt_model(cfg: RunConfig, mc: MegatronConfigs) -> GPTModel:
    """The unwrapped ``GPTModel`` for this rank's pipeline stage."""
    m = cfg.model
    model_class = GPTModel
    if cfg.train.z_loss_coeff > 0:  # the loss output becomes [LM loss, log(Z)^2] per token
        from megatron_patches.z_loss import ZLossGPTModel

        if mc.transformer.mtp_num_layers:
            raise ValueError("train.z_loss_coeff > 0 is not supported with multi-token "
                             "prediction (mtp_num_layers)")
        model_class = ZLossGPTModel
    model = model_class(
        config=mc.transformer,
        transformer_layer_spec=llama_layer_spec(mc.layer_spec, qk_layernorm=m.qk_layernorm),
        vocab_size=mc.padded_vocab_size,
        max_sequence_length=m.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=m.tie_embeddings,
        position_embedding_type=m.position_embedding,
        rotary_percent=m.rotary_percent,
        rotary_base=m.rotary_base,
    )
    if cfg.mup.enabled:
        from megatron_patches.mup import apply_mup_to_model

        apply_mup_to_model(model, cfg)
    return model


def wrap_for_training(model: GPTModel, mc: MegatronConfigs) -> DistributedDataParallel:
    """Move to the device, cast for mixed precision and wrap in Megatron DDP (grad buckets)."""
    if not mc.on_cpu:
        model.cuda(torch.cuda.current_device())
    module: torch.nn.Module = model
    if mc.precision in ("bf16", "fp16"):
        module = Float16Module(mc.transformer, model)
    return DistributedDataParallel(config=mc.transformer, ddp_config=mc.ddp, module=module)


def unwrap(model: torch.nn.Module) -> GPTModel:
    """Strip DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model  # type: ignore[return-value]


def model_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under Megatron's names, without TE's ``_extra_state`` entries."""
    return {k: v.detach() for k, v in unwrap(model).state_dict().items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
