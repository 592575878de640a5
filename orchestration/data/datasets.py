"""A stage's datasets: Megatron's blended GPT datasets over indexed ``.bin/.idx`` files.

Blend weights come from ``data_prep.mix`` (tokens x multiplier per source). Training samples
come from per-source streams that continue across stages (``streams.py``); held-out sets are
Megatron's valid split of each source. Indices are cached in ``run_dir/data_cache`` (shared
with ``python -m orchestration.prebuild``), so every rank of every job loads the index rank 0
built once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist

from megatron_patches.datasets import GPTDataset, build_held_out
from orchestration.common.imports import import_object
from orchestration.config import ConfigError, DataConfig, RunConfig
from orchestration.data.stage_data import StageTrainData
from orchestration.data.streams import RunStreams, gpt_config, plan_segments
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
    train: StageTrainData
    valid: GPTDataset | None
    valid_per_source: dict[str, GPTDataset] = field(default_factory=dict)


def build_held_out_sets(data: DataConfig, tokenizer: TokenizerInfo, seq_length: int, seed: int,
                        valid_samples: int, cache_dir: Path, per_source: bool = False
                        ) -> tuple[GPTDataset | None, dict[str, GPTDataset]]:
    """The blended held-out (valid) set of a mix and, with ``per_source``, each source's own
    held-out set (the same documents the blend holds out). ``subset`` does not apply here: every
    stage evaluates on the same held-out documents of a source."""
    shares = source_shares(data)
    config = gpt_config(data, tokenizer, seq_length, seed, cache_dir, blend_of(data, shares))
    if config.split_matrix[1] is None or valid_samples <= 0:
        return None, {}
    prefixes, weights = config.blend
    valid = build_held_out(config, prefixes, valid_samples, weights)
    held_out = {}
    if per_source and len(data.sources) > 1 and valid is not None:
        for share in shares:  # a sharded source: one held-out set over all its shards
            held_out[share.name] = build_held_out(config, share.prefixes, valid_samples,
                                                  share.prefix_weights())
    return valid, held_out


def build_datasets(data: DataConfig, tokenizer: TokenizerInfo, seq_length: int, seed: int,
                   train_samples: int, valid_samples: int, cache_dir: Path,
                   per_source: bool = False) -> StageDatasets:
    """One stage of ``train_samples`` reading ``data`` from the start of every source, with its
    held-out sets (a single-stage run; :func:`stage_datasets` places a stage in its run)."""
    from orchestration.loop.stages import Stage

    gbs = 1
    stage = Stage(0, "main", data, None, gbs, seq_length, train_samples, 0)
    streams = RunStreams(seed, cache_dir, lambda _data: tokenizer)
    train = StageTrainData(stage, streams.blends(plan_segments([stage], []), 0))
    valid, held_out = build_held_out_sets(data, tokenizer, seq_length, seed, valid_samples,
                                          cache_dir, per_source)
    return StageDatasets(train=train, valid=valid, valid_per_source=held_out)


def run_streams(cfg: RunConfig) -> RunStreams:
    """The streams of ``cfg``'s run (one per session; every stage reads through it)."""
    return RunStreams(cfg.train.seed, Path(cfg.run_dir) / "data_cache",
                      lambda data: load_tokenizer(cfg.model, data))


def stage_train_data(stages: list, stage, streams: RunStreams,
                     history: list[dict] | None = None) -> StageTrainData:
    """The training samples of ``stage``: its segments, each source continuing where the
    earlier segments of the run left it (orchestration/data/streams.py)."""
    segments = plan_segments(stages, history or [])
    last = max(i for i, seg in enumerate(segments) if seg.stage.index == stage.index)
    blends = streams.blends(segments, last)
    return StageTrainData(stage, [b for b in blends if b.segment.stage.index == stage.index])


def stage_datasets(cfg: RunConfig, stage, stages: list | None = None,
                   streams: RunStreams | None = None,
                   history: list[dict] | None = None) -> StageDatasets:
    """A stage's datasets, cached in ``run_dir/data_cache`` (shared with orchestration.prebuild)."""
    from orchestration.loop.stages import plan_stages

    stages = stages or plan_stages(cfg)
    train = stage_train_data(stages, stage, streams or run_streams(cfg), history)
    valid, held_out = build_held_out_sets(
        stage.data, load_tokenizer(cfg.model, stage.data), stage.seq_length,
        seed=cfg.train.seed + stage.index,
        # Every evaluation reads the same first eval_iters batches, so curves are comparable.
        valid_samples=max(cfg.train.eval_iters, 1) * stage.global_batch_size,
        cache_dir=Path(cfg.run_dir) / "data_cache", per_source=cfg.train.eval_per_source)
    return StageDatasets(train=train, valid=valid, valid_per_source=held_out)


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
