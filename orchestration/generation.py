"""Greedy decoding with the training model, and a callback that keeps a sample gallery.

Why: loss curves say little about what a model has learned; a fixed set of prompts completed
every N steps (``<run_dir>/samples.jsonl``) shows it, and catches a broken tokenizer or a
diverged run early. Decoding runs Megatron's own ``GPTModel`` forward (full recompute per
token, no KV cache: these are short samples), so it works at any tensor-parallel size with no
conversion. Every TP rank runs the same forward (the vocab-sharded logits are gathered) and
takes the same argmax; only rank 0 writes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from orchestration.callbacks import Callback

if TYPE_CHECKING:
    from orchestration.trainer import StepResult, Trainer

log = logging.getLogger(__name__)


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
    from megatron.core import parallel_state

    from orchestration.model import unwrap

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
        with torch.no_grad():
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
    from megatron.core import parallel_state

    from orchestration.distributed import comm_device

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


class SampleGalleryCallback(Callback):
    """Every ``every_steps`` steps (and at the last step) complete each prompt greedily and
    append ``{"step", "prompt", "completion"}`` lines to ``<run_dir>/samples.jsonl``.

    Prompts are encoded with the run's sentencepiece model (``data.tokenizer_model``, or
    ``tokenizer_model`` when given). Generation needs no randomness, so it does not move any
    RNG and a resumed run stays bit-identical. Pipeline parallelism is not supported.
    """

    name = "sample_gallery"

    def __init__(
        self,
        prompts: list[str],
        every_steps: int = 100,
        max_new_tokens: int = 32,
        tokenizer_model: str | None = None,
        filename: str = "samples.jsonl",
    ) -> None:
        self.prompts = list(prompts)
        self.every_steps = every_steps
        self.max_new_tokens = max_new_tokens
        self.tokenizer_model = tokenizer_model
        self.filename = filename
        self._sp = None

    def on_fit_start(self, trainer: Trainer) -> None:
        import sentencepiece as spm

        path = self.tokenizer_model or trainer.cfg.data.tokenizer_model
        self._sp = spm.SentencePieceProcessor(model_file=str(path))

    def after_step(self, trainer: Trainer, result: StepResult) -> None:
        from orchestration.stages import total_steps

        done = result.step + 1
        due = self.every_steps > 0 and done % self.every_steps == 0
        if not self.prompts or not (due or done == total_steps(trainer.stages)):
            return
        rows = [
            {"step": done, "prompt": p, "completion": self.complete(trainer, p)}
            for p in self.prompts
        ]
        if _is_main():
            with open(Path(trainer.run_dir) / self.filename, "a") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
            log.info("step %d sample: %r -> %r", done, rows[0]["prompt"], rows[0]["completion"])

    def complete(self, trainer: Trainer, prompt: str) -> str:
        """The greedy completion of ``prompt`` by the trainer's model (all TP ranks call it)."""
        sp = self._sp
        ids = sp.encode(prompt) or [sp.eos_id()]  # an empty prompt starts after a document end
        new = greedy_generate(
            trainer.o.model_chunks[0],
            ids,
            self.max_new_tokens,
            eod_id=sp.eos_id(),
            vocab_size=sp.get_piece_size(),
        )
        # Decode with the prompt so the boundary's whitespace survives, then cut the prompt off.
        return sp.decode(ids + new)[len(sp.decode(ids)) :]


def _is_main() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0
