"""Megatron's datasets: the indexed ``.bin/.idx`` format and the blended GPT datasets.

``orchestration.data`` decides *what* a stage reads (blend, split, sizes, seeds); this module
holds the Megatron calls that build it, and ``data_prep`` writes the same file format through
:func:`indexed_dataset_module`.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from types import ModuleType

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

__all__ = ["GPTDataset", "GPTDatasetConfig", "build_split", "build_held_out",
           "indexed_dataset_module", "count_tokens", "read_tokens"]


def indexed_dataset_module() -> ModuleType:
    """``megatron.core.datasets.indexed_dataset`` (the reader, writer and builder classes)."""
    with warnings.catch_warnings():  # Megatron warns about missing Apex/TE on import
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def count_tokens(prefix: str) -> int:
    """Tokens in a Megatron dataset, from its ``.idx`` alone (no ``.bin`` read or needed)."""
    index = indexed_dataset_module()._IndexReader(prefix + ".idx", multimodal=False)
    try:
        return int(index.sequence_lengths.sum(dtype="int64"))
    finally:
        del index


def read_tokens(prefix: str):
    """Every token of ``prefix`` as one numpy array (small datasets only: the demo corpus)."""
    import numpy as np

    dataset = indexed_dataset_module().IndexedDataset(prefix)
    return np.fromfile(prefix + ".bin", dtype=dataset.index.dtype)


def build_split(config: GPTDatasetConfig, sizes: list[int]):
    """(train, valid, test) datasets of ``config.blend`` with ``sizes`` samples each."""
    return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()


def build_held_out(config: GPTDatasetConfig, prefix: str | list[str], valid_samples: int,
                   weights: list[float] | None = None):
    """One source's held-out (validation) set under the split of ``config``: the documents the
    blend holds out of that source, without building (and caching) a train index for it. A
    sharded source passes its prefixes and their ``weights`` (one blend over its shards)."""
    prefixes = [prefix] if isinstance(prefix, str) else list(prefix)
    single = replace(config, blend=(prefixes, weights if len(prefixes) > 1 else None))
    single.split_matrix = [None, single.split_matrix[1], None]
    _, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [0, valid_samples, 0], lambda: True, single).build()
    return valid
