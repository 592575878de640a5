"""Megatron's datasets: the indexed ``.bin/.idx`` format and the blended GPT datasets.

``orchestration.data`` decides *what* a stage reads (blend, split, sizes, seeds); this module
holds the Megatron calls that build it, and ``data_prep`` writes the same file format through
:func:`indexed_dataset_module`.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from types import ModuleType

from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

__all__ = ["BlendedDataset", "GPTDataset", "GPTDatasetConfig", "build_split", "build_held_out",
           "build_epoch", "build_blend", "document_count", "train_documents",
           "indexed_dataset_module", "count_tokens", "read_tokens"]


def indexed_dataset_module() -> ModuleType:
    """``megatron.core.datasets.indexed_dataset`` (the reader, writer and builder classes)."""
    with warnings.catch_warnings():  # Megatron warns about missing Apex/TE on import
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def count_tokens(prefix: str, documents: tuple[int, int] | None = None) -> int:
    """Tokens in a Megatron dataset (or in its documents ``[begin, end)``), from its ``.idx``
    alone (no ``.bin`` read or needed)."""
    index = indexed_dataset_module()._IndexReader(prefix + ".idx", multimodal=False)
    try:
        lengths = index.sequence_lengths
        if documents is not None:
            lengths = lengths[documents[0]:documents[1]]
        return int(lengths.sum(dtype="int64"))
    finally:
        del index


def document_count(prefix: str) -> int:
    """Documents (sequences, as GPTDataset splits them) in ``prefix``, from its ``.idx``."""
    index = indexed_dataset_module()._IndexReader(prefix + ".idx", multimodal=False)
    try:
        return int(index.sequence_lengths.shape[0])
    finally:
        del index


def train_documents(config: GPTDatasetConfig, num_documents: int) -> tuple[int, int]:
    """The documents ``[begin, end)`` that ``config.split`` gives the train split of a prefix
    of ``num_documents`` documents, rounded as ``BlendedMegatronDatasetBuilder`` rounds."""
    begin, end = config.split_matrix[0] or (0.0, 0.0)
    return int(round(begin * num_documents)), int(round(end * num_documents))


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


def build_epoch(config: GPTDatasetConfig, prefix: str, documents: tuple[int, int],
                num_documents: int, seed: int) -> GPTDataset:
    """One epoch over documents ``[begin, end)`` of ``prefix``: Megatron's GPTDataset with
    ``num_samples=None`` (each document once, packed into samples of ``sequence_length``),
    documents and samples shuffled with ``seed``. Built through the builder, so rank 0 writes
    the index into ``path_to_cache`` first and the other ranks load it; the documents enter the
    cache key through the split matrix."""
    single = replace(config, blend=([prefix], None), random_seed=seed)
    begin, end = documents
    single.split_matrix = [(begin / num_documents, end / num_documents), None, None]
    train, _, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [None, None, None], lambda: True, single).build()
    return train


def build_blend(datasets: list, weights: list[float], size: int,
                config: GPTDatasetConfig) -> BlendedDataset:
    """Megatron's BlendedDataset of ``size`` samples over ``datasets`` (anything with
    ``__len__``, ``__getitem__``, ``index_split`` and ``unique_identifiers``) in proportion to
    ``weights``: its greedy blending index (the same sequence for every ``size``, so a blend is
    a prefix of any longer one) and cache, built on rank 0 first."""
    return BlendedMegatronDatasetBuilder.build_generic_dataset(
        BlendedDataset, lambda: True, True, datasets, weights, size, config)
