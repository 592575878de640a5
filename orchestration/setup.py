"""Build everything a run needs, in order: process groups, model, optimizer, stages, data."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer.optimizer import ChainedOptimizer

from orchestration.build import MegatronConfigs, build_megatron_configs
from orchestration.config import ConfigError, DataConfig, RunConfig, validate
from orchestration.data import StageDatasets, TokenizerInfo, build_datasets
from orchestration.distributed import DistInfo, init_distributed
from orchestration.model import build_gpt_model, wrap_for_training
from orchestration.stages import Stage, plan_stages

log = logging.getLogger(__name__)


@dataclass
class TrainingObjects:
    cfg: RunConfig
    dist: DistInfo
    mc: MegatronConfigs
    model: object  # megatron DistributedDataParallel
    optimizer: ChainedOptimizer
    stages: list[Stage]
    _datasets: dict[int, StageDatasets] = field(default_factory=dict)

    @property
    def model_chunks(self) -> list:
        return [self.model]

    def datasets_for(self, stage: Stage) -> StageDatasets:
        if stage.index not in self._datasets:
            self._datasets[stage.index] = stage_datasets(self.cfg, stage)
        return self._datasets[stage.index]


def build_training(cfg: RunConfig) -> TrainingObjects:
    info = init_distributed(cfg)
    validate(cfg, world_size=info.world_size)
    mc = build_megatron_configs(cfg, on_cpu=info.on_cpu)
    model = wrap_for_training(build_gpt_model(cfg, mc), mc)
    optimizer = get_megatron_optimizer(mc.optimizer, [model], config_overrides=_overrides(cfg, mc))
    _connect_schedule_hooks(mc, model, optimizer, cfg)
    stages = plan_stages(cfg)
    for stage in stages:  # build or check every stage's data now, not hours into the run
        prepare_data(stage.data, info.is_main)
        check_sources_exist(stage.data)
    return TrainingObjects(cfg, info, mc, model, optimizer, stages)


def check_sources_exist(data: DataConfig) -> None:
    for i, source in enumerate(data.sources):
        missing = [f"{source.path}{ext}" for ext in (".bin", ".idx")
                   if not Path(f"{source.path}{ext}").is_file()]
        if missing:
            raise FileNotFoundError(
                f"data '{data.name}' sources[{i}] ({source.name}): missing {', '.join(missing)}; "
                "tokenize it with `python data_prep/tokenize.py` or fix the path")


def _connect_schedule_hooks(mc: MegatronConfigs, model, optimizer, cfg: RunConfig) -> None:
    """What Megatron's pipeline schedules call back into, as Megatron-LM's training.py sets it:
    the data-parallel gradient reduction (plus SP layer-norm and tied-embedding reductions) at
    the end of the step, loss scaling for fp16, and no-sync while accumulating micro-batches."""
    tc = mc.transformer
    tc.finalize_model_grads_func = finalize_model_grads
    tc.grad_scale_func = optimizer.scale_loss
    if cfg.parallel.overlap_grad_reduce:
        tc.no_sync_func = model.no_sync
    if cfg.parallel.overlap_param_gather:
        tc.param_sync_func = model.start_param_sync


def _overrides(cfg: RunConfig, mc: MegatronConfigs):
    if not cfg.mup.enabled:
        return None  # Megatron's standard groups: no weight decay on biases and norms
    from megatron_patches.mup import mup_param_group_overrides

    return mup_param_group_overrides(cfg, mc.optimizer)


def prepare_data(data: DataConfig, is_main: bool) -> None:
    """Build the embedded demo corpus when a data config asks for it and it is missing."""
    if data.prepare != "demo":
        return
    if is_main:
        from data_prep.demo import prepare_demo_data

        prepare_demo_data(Path(data.tokenizer_model).parent)
    if dist.is_initialized():
        dist.barrier()


def load_tokenizer(cfg: RunConfig, data: DataConfig) -> TokenizerInfo:
    if not data.tokenizer_model:
        raise ConfigError(f"data.tokenizer_model is empty for data mix '{data.name}'")
    tokenizer = TokenizerInfo.from_sentencepiece(data.tokenizer_model)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"tokenizer {data.tokenizer_model} has {tokenizer.vocab_size} tokens but "
            f"model.vocab_size={cfg.model.vocab_size}; set model.vocab_size >= the tokenizer's")
    return tokenizer


def stage_datasets(cfg: RunConfig, stage: Stage) -> StageDatasets:
    """A stage's datasets, cached in ``run_dir/data_cache`` (shared with orchestration.prebuild)."""
    tokenizer = load_tokenizer(cfg, stage.data)
    return build_datasets(
        stage.data, tokenizer, stage.seq_length, seed=cfg.train.seed + stage.index,
        train_samples=stage.steps * stage.global_batch_size,
        # Every evaluation reads the same first eval_iters batches, so curves are comparable.
        valid_samples=max(cfg.train.eval_iters, 1) * stage.global_batch_size,
        cache_dir=Path(cfg.run_dir) / "data_cache", per_source=cfg.train.eval_per_source)
