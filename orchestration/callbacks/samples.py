"""A sample gallery kept during training: fixed prompts completed greedily every N steps.

Why: loss curves say little about what a model has learned; a fixed set of prompts completed
every N steps (``<run_dir>/samples.jsonl``) shows it, and catches a broken tokenizer or a
diverged run early. Decoding runs the training model itself (``megatron_patches.generation``),
at any tensor-parallel size; only rank 0 writes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from megatron_patches.generation import greedy_generate
from orchestration.callbacks.base import Callback
from orchestration.loop.stages import total_steps

log = logging.getLogger(__name__)


class SampleGalleryCallback(Callback):
    """Every ``every_steps`` steps (and at the last step) complete each prompt greedily and
    append ``{"step", "prompt", "completion"}`` lines to ``<run_dir>/samples.jsonl``.

    Prompts are encoded with the run's sentencepiece model (``data.tokenizer_model``, or
    ``tokenizer_model`` when given). Generation needs no randomness, so it does not move any
    RNG and a resumed run stays bit-identical. Pipeline parallelism is not supported.
    """

    name = "samples"
    order = 40

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

    @classmethod
    def from_config(cls, context, **options) -> SampleGalleryCallback | None:
        train = context.cfg.train
        if not options and not (train.sample_interval and train.sample_prompts):
            return None
        defaults = {"prompts": list(train.sample_prompts), "every_steps": train.sample_interval,
                    "max_new_tokens": train.sample_tokens}
        return cls(**{**defaults, **options})

    def on_fit_start(self, trainer) -> None:
        import sentencepiece as spm

        path = self.tokenizer_model or trainer.cfg.data.tokenizer_model
        self._sp = spm.SentencePieceProcessor(model_file=str(path))

    def after_step(self, trainer, result) -> None:
        done = result.step
        due = self.every_steps > 0 and done % self.every_steps == 0
        if not self.prompts or not (due or done == total_steps(trainer.stages)):
            return
        rows = [
            {"step": done, "prompt": p, "completion": self.complete(trainer, p)}
            for p in self.prompts
        ]
        if trainer.is_main:
            with open(Path(trainer.run_dir) / self.filename, "a") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
            log.info("step %d sample: %r -> %r", done, rows[0]["prompt"], rows[0]["completion"])

    def complete(self, trainer, prompt: str) -> str:
        """The greedy completion of ``prompt`` by the trainer's model (all TP ranks call it)."""
        sp = self._sp
        ids = sp.encode(prompt) or [sp.eos_id()]  # an empty prompt starts after a document end
        new = greedy_generate(
            trainer.model_chunks[0],
            ids,
            self.max_new_tokens,
            eod_id=sp.eos_id(),
            vocab_size=sp.get_piece_size(),
        )
        # Decode with the prompt so the boundary's whitespace survives, then cut the prompt off.
        return sp.decode(ids + new)[len(sp.decode(ids)) :]
