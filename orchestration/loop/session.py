"""Build everything a run needs, in order: process groups, model, optimizer, stages, data."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from megatron_patches.configs import MegatronConfigs, build_megatron_configs
from megatron_patches.model import build_model_chunks, wrap_for_training
from megatron_patches.optimizer import build_optimizer
from orchestration.cluster.distributed import DistInfo, init_distributed
from orchestration.config import RunConfig, validate
from orchestration.data.datasets import (
    StageDatasets,
    check_sources_exist,
    prepare_data,
    stage_datasets,
)
from orchestration.loop.stages import Stage, plan_stages

log = logging.getLogger(__name__)


@dataclass
class TrainingSession:
    """The built objects of one training process; datasets are built per stage on first use."""

    cfg: RunConfig
    dist: DistInfo
    mc: MegatronConfigs
    model_chunks: list  # Megatron DDP-wrapped model chunks of this pipeline rank (one per
    # virtual pipeline stage; a single one without interleaving)
    optimizer: object  # Megatron ChainedOptimizer
    stages: list[Stage]
    _datasets: dict[int, StageDatasets] = field(default_factory=dict)

    def datasets_for(self, stage: Stage) -> StageDatasets:
        if stage.index not in self._datasets:
            self._datasets[stage.index] = stage_datasets(self.cfg, stage)
        return self._datasets[stage.index]


def build_session(cfg: RunConfig, info: DistInfo | None = None) -> TrainingSession:
    """Start the process groups (unless ``info`` says they exist), then build the model,
    optimizer, stages and data checks of ``cfg``."""
    info = init_distributed(cfg) if info is None else info
    validate(cfg, world_size=info.world_size)
    mc = build_megatron_configs(cfg, on_cpu=info.on_cpu)
    model_chunks = [wrap_for_training(chunk, mc, i)
                    for i, chunk in enumerate(build_model_chunks(cfg, mc))]
    optimizer = build_optimizer(cfg, mc, model_chunks)
    stages = plan_stages(cfg)
    for stage in stages:  # build or check every stage's data now, not hours into the run
        prepare_data(stage.data, info.is_main)
        check_sources_exist(stage.data)
    return TrainingSession(cfg, info, mc, model_chunks, optimizer, stages)
