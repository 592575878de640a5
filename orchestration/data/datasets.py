"""A stage's datasets: Megatron's blended GPT datasets over indexed ``.bin/.idx`` files.

Blend weights come from ``data_prep.mix`` (tokens x multiplier per source). Indices are cached
in ``run_dir/data_cache`` (shared with ``python -m orchestration.prebuild``), so every rank of
every job loads the index rank 0 built once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist

from megatron_patches.datasets import GPTDataset, GPTDatasetConfig, build_held_out, build_split
from orchestration.common.imports import import_object
from orchestration.config import ConfigError, DataConfig, RunConfig
from orchestration.data.tokenizer import TokenizerInfo, load_tokenizer

log = logging.getLogger(__name__)


def source_shares(data: DataConfig) -> list:
    """Each source's share of the blend and its prefixes (``data_prep.mix.SourceShare``)."""
    if not data.sources:
        raise ValueError(f"data '{data.name}': data.sources is empty; list at least one source")
    from data_prep.mix import compute_mix

    return compute_mix(data.sources)


def blend_of(data: DataConfig, shares: list | None = None) -> tuple[list[str], list[float] | None]:
    """Megatron ``blend``: source prefixes (every shard of a sharded source) and weights
    proportional to tokens x multiplier."""
    from data_prep.mix import blend_for_megatron

    prefixes, weights = blend_for_megatron(shares or source_shares(data))
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
    shares = source_shares(data)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend_of(data, shares),
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
    train, valid, _ = build_split(config, [train_samples, valid_samples, 0])
    if train is None:
        raise ValueError(f"data '{data.name}': split '{data.split}' leaves no training data")
    held_out = {}
    if per_source and len(data.sources) > 1 and valid is not None:
        for share in shares:  # a sharded source: one held-out set over all its shards
            held_out[share.name] = build_held_out(config, share.prefixes, valid_samples,
                                                  share.prefix_weights())
    return StageDatasets(train=train, valid=valid, valid_per_source=held_out)


def stage_datasets(cfg: RunConfig, stage) -> StageDatasets:
    """A stage's datasets, cached in ``run_dir/data_cache`` (shared with orchestration.prebuild)."""
    tokenizer = load_tokenizer(cfg.model, stage.data)
    return build_datasets(
        stage.data, tokenizer, stage.seq_length, seed=cfg.train.seed + stage.index,
        train_samples=stage.samples,  # with a batch-size ramp, fewer than steps x gbs
        # Every evaluation reads the same first eval_iters batches, so curves are comparable.
        valid_samples=max(cfg.train.eval_iters, 1) * stage.global_batch_size,
        cache_dir=Path(cfg.run_dir) / "data_cache", per_source=cfg.train.eval_per_source)


def check_sources_exist(data: DataConfig) -> None:
    from data_prep.mix import source_prefixes

    for i, source in enumerate(data.sources):
        prefixes = source_prefixes(source)
        if not prefixes:
            patterns = ", ".join([source.path, *source.paths]).strip(", ") or "(no path)"
            raise FileNotFoundError(
                f"data '{data.name}' sources[{i}] ({source.name}): {patterns} matches no .idx "
                "file; tokenize it with `python data_prep/tokenize.py` or fix the path")
        missing = [f"{p}{ext}" for p in prefixes for ext in (".bin", ".idx")
                   if not Path(f"{p}{ext}").is_file()]
        if missing:
            raise FileNotFoundError(
                f"data '{data.name}' sources[{i}] ({source.name}): missing {', '.join(missing)}; "
                "tokenize it with `python data_prep/tokenize.py` or fix the path")


def prepare_data(data: DataConfig, is_main: bool) -> None:
    """Run the mix's ``prepare`` hook (``module:function``, called with the DataConfig) on the
    main rank, e.g. the demo mix builds its embedded corpus when it is missing."""
    if not data.prepare:
        return
    if is_main:
        _prepare_function(data)(data)
    if dist.is_initialized():
        dist.barrier()


def _prepare_function(data: DataConfig):
    try:
        return import_object(data.prepare)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"data '{data.name}': data.prepare={data.prepare!r}: {err}") from err
