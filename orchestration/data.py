"""Datasets and the step-indexed batch iterator.

Datasets come from Megatron's ``BlendedMegatronDatasetBuilder`` over indexed ``.bin/.idx``
files, with blend weights from ``data_prep.mix`` (tokens x multiplier per source). Batches are
addressed by *global sample index*: step ``s`` of a stage reads samples
``[s * global_batch, (s + 1) * global_batch)`` of that stage's blended dataset, and data-parallel
rank ``r`` takes micro-batch slice ``k * mbs * dp + r * mbs``. The global batch is therefore the
same at every DP size, resuming needs nothing but the step number, and a skipped batch is
identified by its sample indices.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from orchestration.config import DataConfig

log = logging.getLogger(__name__)


class TokenizerInfo:
    """The special-token ids Megatron's GPTDataset needs, read from a sentencepiece model."""

    def __init__(self, model_path: str, vocab_size: int, eod: int, pad: int | None) -> None:
        self.model_path = model_path
        self.vocab_size = vocab_size
        self.eod = eod
        self._pad = pad
        self.unique_identifiers = {"class": "SentencePiece", "path": model_path,
                                   "vocab_size": vocab_size}

    @property
    def pad(self) -> int:
        if self._pad is None:  # GPTDataset falls back to its own pad id on AttributeError
            raise AttributeError("tokenizer has no pad token")
        return self._pad

    @classmethod
    def from_sentencepiece(cls, model_path: str) -> TokenizerInfo:
        import sentencepiece as spm

        if not Path(model_path).is_file():
            raise FileNotFoundError(f"data.tokenizer_model: no sentencepiece model at {model_path}")
        sp = spm.SentencePieceProcessor(model_file=model_path)
        pad = sp.pad_id() if sp.pad_id() >= 0 else None
        return cls(model_path, sp.get_piece_size(), sp.eos_id(), pad)


def blend_of(data: DataConfig) -> tuple[list[str], list[float] | None]:
    """Megatron ``blend``: source prefixes and weights proportional to tokens x multiplier."""
    if not data.sources:
        raise ValueError(f"data '{data.name}': data.sources is empty; list at least one source")
    from data_prep.mix import blend_for_megatron, compute_mix

    shares = compute_mix([{"name": s.name, "path": s.path, "multiplier": s.multiplier,
                           "tokens": s.tokens} for s in data.sources])
    prefixes, weights = blend_for_megatron(shares)
    return prefixes, (weights if len(prefixes) > 1 else None)


@dataclass
class StageDatasets:
    train: GPTDataset
    valid: GPTDataset | None
    valid_per_source: dict[str, GPTDataset] = field(default_factory=dict)


def build_datasets(data: DataConfig, tokenizer: TokenizerInfo, seq_length: int, seed: int,
                   train_samples: int, valid_samples: int, cache_dir: Path,
                   per_source: bool = False) -> StageDatasets:
    """Build (or load the cached index of) the blended train/valid datasets of one stage, and
    with ``per_source`` each source's own held-out set (the same documents the blend holds out)."""
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend_of(data),
        split=data.split,
        path_to_cache=str(cache_dir),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=data.eod_mask_loss,
        create_attention_mask=False,
        mid_level_dataset_surplus=0.005,
        num_dataset_builder_threads=data.builder_threads,
    )
    builder = BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, valid_samples, 0], lambda: True, config)
    train, valid, _ = builder.build()
    if train is None:
        raise ValueError(f"data '{data.name}': split '{data.split}' leaves no training data")
    held_out = {}
    if per_source and len(data.sources) > 1 and valid is not None:
        for source in data.sources:
            # Keep only the validation range of the split: the same documents the blend holds
            # out, without building (and caching) a train index per source that nobody reads.
            single = replace(config, blend=([source.path], None))
            single.split_matrix = [None, single.split_matrix[1], None]
            _, held_out[source.name], _ = BlendedMegatronDatasetBuilder(
                GPTDataset, [0, valid_samples, 0], lambda: True, single).build()
    return StageDatasets(train=train, valid=valid, valid_per_source=held_out)


@dataclass
class BatchLayout:
    micro_batch_size: int
    global_batch_size: int
    dp_size: int
    dp_rank: int

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def sample_indices(self, step: int) -> np.ndarray:
        """This rank's sample indices for ``step``, shaped [num_microbatches, micro_batch]."""
        mbs, dp = self.micro_batch_size, self.dp_size
        base = step * self.global_batch_size
        rows = base + np.arange(self.num_microbatches)[:, None] * mbs * dp + self.dp_rank * mbs
        return rows + np.arange(mbs)[None, :]

    def global_indices(self, step: int) -> np.ndarray:
        return np.arange(step * self.global_batch_size, (step + 1) * self.global_batch_size)


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    keys = ("tokens", "labels", "loss_mask", "position_ids")
    return {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in keys}


def microbatches(dataset, layout: BatchLayout, step: int) -> Iterator[dict[str, torch.Tensor]]:
    """The micro-batches this rank feeds to the schedule for ``step`` (wrapping if needed)."""
    n = len(dataset)
    for row in layout.sample_indices(step):
        yield collate([dataset[int(i) % n] for i in row])


def source_of_samples(dataset, indices: np.ndarray) -> list[tuple[int, int]]:
    """(source id, sample id within source) for blended-dataset indices, for the skip log."""
    if hasattr(dataset, "dataset_index"):
        n = len(dataset)
        return [(int(dataset.dataset_index[i % n]), int(dataset.dataset_sample_index[i % n]))
                for i in indices]
    return [(0, int(i)) for i in indices]
