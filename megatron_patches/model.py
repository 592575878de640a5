"""Build this rank's GPT model chunks (one per virtual pipeline stage), wrapped in DDP."""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.module import Float16Module

from megatron_patches.configs import MegatronConfigs
from megatron_patches.llama_spec import llama_layer_spec
from orchestration.config import RunConfig


def build_gpt_model(cfg: RunConfig, mc: MegatronConfigs, vp_stage: int | None = None) -> GPTModel:
    """The unwrapped ``GPTModel`` for this rank's pipeline stage, or for its model chunk
    ``vp_stage`` when the pipeline is interleaved (``parallel.virtual_pipeline > 1``)."""
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
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False,
                                                           vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False,
                                                           vp_stage=vp_stage),
        share_embeddings_and_output_weights=m.tie_embeddings,
        position_embedding_type=m.position_embedding,
        rotary_percent=m.rotary_percent,
        rotary_base=m.rotary_base,
        vp_stage=vp_stage,
    )
    if cfg.mup.enabled:
        from megatron_patches.mup import apply_mup_to_model

        apply_mup_to_model(model, cfg)
    return model


def build_model_chunks(cfg: RunConfig, mc: MegatronConfigs) -> list[GPTModel]:
    """This rank's model chunks: one, or ``parallel.virtual_pipeline`` under interleaving.

    As Megatron-LM's ``get_model``: chunk ``i`` of pipeline rank ``r`` holds the layers of
    virtual stage ``i * pipeline + r``; only chunk 0 of the first rank embeds and only the last
    chunk of the last rank has the output layer.
    """
    chunks = mc.transformer.virtual_pipeline_model_parallel_size
    if chunks is None:
        return [build_gpt_model(cfg, mc)]
    return [build_gpt_model(cfg, mc, vp_stage=i) for i in range(chunks)]


def wrap_for_training(model: GPTModel, mc: MegatronConfigs,
                      chunk_index: int = 0) -> DistributedDataParallel:
    """Move to the device, cast for mixed precision and wrap in Megatron DDP (grad buckets).
    As in Megatron-LM, only the first chunk's buffers are split into buckets: later chunks'
    gradients reduce as one bucket each, when their backward ends."""
    if not mc.on_cpu:
        model.cuda(torch.cuda.current_device())
    module: torch.nn.Module = model
    if mc.precision in ("bf16", "fp16"):
        module = Float16Module(mc.transformer, model)
    return DistributedDataParallel(config=mc.transformer, ddp_config=mc.ddp, module=module,
                                   disable_bucketing=chunk_index > 0)


def unwrap(model: torch.nn.Module) -> GPTModel:
    """Strip DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model  # type: ignore[return-value]


def model_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under Megatron's names, without TE's ``_extra_state`` entries."""
    return {k: v.detach() for k, v in unwrap(model).state_dict().items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
