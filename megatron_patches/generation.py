"""Greedy decoding with the training model (Megatron's own ``GPTModel`` forward).

Full recompute per token, no KV cache: these are short samples, and it works at any
tensor-parallel size with no conversion. Every TP rank runs the same forward (the vocab-sharded
logits are gathered) and takes the same argmax.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from megatron_patches.model import unwrap
from megatron_patches.optimizer import params_gathered
from megatron_patches.parallel import comm_device


def greedy_generate(
    model: torch.nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    eod_id: int | None = None,
    vocab_size: int | None = None,
) -> list[int]:
    """The ``max_new_tokens`` (fewer if ``eod_id`` comes; it is not returned) most likely
    next tokens after ``prompt_ids``. ``vocab_size`` excludes the padded embedding rows.

    ``model`` is a GPTModel, bare or DDP/Float16Module-wrapped, on every rank of a TP group.
    The context is cut to the model's trained sequence length (the newest tokens).
    """
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        raise NotImplementedError(
            "greedy_generate runs the whole model in one forward: "
            "pipeline parallelism (parallel.pipeline > 1) is unsupported"
        )
    if not prompt_ids:
        raise ValueError("greedy_generate needs at least one prompt token")
    gpt = unwrap(model)
    was_training = gpt.training
    gpt.eval()
    tokens, new = list(prompt_ids), []
    try:
        with torch.no_grad(), params_gathered([model]):
            for _ in range(max_new_tokens):
                next_id = _next_token(gpt, tokens[-gpt.max_sequence_length :], vocab_size)
                if eod_id is not None and next_id == eod_id:
                    break
                tokens.append(next_id)
                new.append(next_id)
    finally:
        gpt.train(was_training)
    return new


def _next_token(gpt: torch.nn.Module, context: list[int], vocab_size: int | None) -> int:
    """Argmax of the last position's logits, gathered over the tensor-parallel vocab shards."""
    n = len(context)
    # Sequence parallelism splits the sequence across TP ranks: pad on the right (causal
    # attention means the padding cannot change position n-1) to a multiple of TP.
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pad = -n % tp if gpt.config.sequence_parallel else 0
    device = comm_device()
    ids = torch.tensor([context + [0] * pad], dtype=torch.long, device=device)
    positions = torch.arange(n + pad, device=device).unsqueeze(0)
    logits = gpt(ids, positions, None, runtime_gather_output=True)  # [1, s, padded vocab]
    last = logits[0, n - 1].float()
    if vocab_size is not None:
        last = last[:vocab_size]
    return int(torch.argmax(last).item())
