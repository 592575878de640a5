"""PaLM's z-loss on the output logits, through ``GPTModel``'s loss method.

Why a subclass: Megatron-Core 0.16 has a z-loss only for MoE routers (``moe_z_loss_coeff``);
the language-model loss is ``LanguageModule.compute_language_model_loss(labels, logits)``, the
one place where the (vocab-parallel) logits and the labels meet. :class:`ZLossGPTModel`
overrides it to return, per token, the LM loss Megatron computes (fused or not) *and*
``log(Z)^2``, Z the softmax normaliser (PaLM, Chowdhery et al. 2022, sec. 5: loss +
1e-4 * log(Z)^2 keeps log Z near 0). The output is ``[2, b, s]``; the loop's loss function
(``orchestration/loop/step.py: masked_loss``) masks both, optimises LM + coeff * z and
reports them apart. Megatron's multi-token prediction reuses the method with its own
contract, so the two are not combined (``build_gpt_model`` refuses).

With tensor parallelism each rank holds a vocabulary slice of the logits: log Z is the
log-sum-exp across the slices (the max all-reduced without gradient, the sum of exponentials
with Megatron's differentiable all-reduce), so it is the same at every TP size. It costs one
more [s, b, vocab/TP] fp32 tensor (the exponentials, kept for the backward pass).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region


def vocab_parallel_log_z(logits: torch.Tensor, tp_group) -> torch.Tensor:
    """log sum_v exp(logits[..., v]) over the whole (TP-split) vocabulary, in fp32."""
    logits = logits.float()
    shift = logits.detach().max(dim=-1, keepdim=True).values
    if tp_group is not None and tp_group.size() > 1:
        dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=tp_group)
    sum_exp = torch.exp(logits - shift).sum(dim=-1)
    sum_exp = reduce_from_tensor_model_parallel_region(sum_exp, group=tp_group)
    return torch.log(sum_exp) + shift.squeeze(-1)


class ZLossGPTModel(GPTModel):
    """``GPTModel`` whose loss output is ``[2, b, s]``: the LM loss and log(Z)^2 per token."""

    def compute_language_model_loss(self, labels: torch.Tensor,
                                    logits: torch.Tensor) -> torch.Tensor:
        # First: Megatron's unfused cross entropy shifts the fp32 logits in place.
        log_z = vocab_parallel_log_z(logits, self.pg_collection.tp)  # [s, b]
        lm = super().compute_language_model_loss(labels, logits)  # [b, s]
        return torch.stack([lm.float(), log_z.transpose(0, 1).square()])
