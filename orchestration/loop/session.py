"""Build everything a run needs, in order: process groups, model, optimizer, stages, data."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from megatron_patches.configs import MegatronConfigs, build_megatron_configs
from megatron_patches.model import build_model_chunks, wrap_for_training
from megatron_patches.optimizer import build_optimizer
from megatron_patches.parallel import initialize_tp_comm_overlap
from orchestration.cluster.distributed import DistInfo, init_distributed
from orchestration.config import RunConfig, validate
from orchestration.data.datasets import (
    StageDatasets,
    check_sources_exist,
    prepare_data,
    run_streams,
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
    _datasets: dict[tuple, StageDatasets] = field(default_factory=dict)
    _streams: object = None  # orchestration.data.streams.RunStreams, built on first use

    def datasets_for(self, stage: Stage, history: list[dict] | None = None) -> StageDatasets:
        """The stage's datasets given the run's ``data_history`` (mix changes on resume):
        collective on first use (every rank builds the same stage at the same step)."""
        import json

        if self._streams is None:
            self._streams = run_streams(self.cfg)
        past = [e for e in history or [] if e["stage"] <= stage.index]
        key = (stage.index, json.dumps(past, sort_keys=True))
        if key not in self._datasets:
            self._datasets[key] = stage_datasets(self.cfg, stage, self.stages, self._streams,
                                                 past)
        return self._datasets[key]


def build_session(cfg: RunConfig, info: DistInfo | None = None) -> TrainingSession:
    """Start the process groups (unless ``info`` says they exist), then build the model,
    optimizer, stages and data checks of ``cfg``."""
    info = init_distributed(cfg) if info is None else info
    validate(cfg, world_size=info.world_size)
    mc = build_megatron_configs(cfg, on_cpu=info.on_cpu)
    if info.is_main:  # what the kernels and overlaps are, and why (also: --explain)
        log.info("%s; %s", mc.platform.describe(), "; ".join(
            f"{key} {why}" for key, why in mc.gpu_path.reasons.items()))
    initialize_tp_comm_overlap(cfg)  # TE's userbuffers, before the model (tp_comm_overlap)
    model_chunks = [wrap_for_training(chunk, mc, i)
                    for i, chunk in enumerate(build_model_chunks(cfg, mc))]
    optimizer = build_optimizer(cfg, mc, model_chunks)
    stages = plan_stages(cfg)
    for stage in stages:  # build or check every stage's data now, not hours into the run
        prepare_data(stage.data, info.is_main)
        check_sources_exist(stage.data)
    return TrainingSession(cfg, info, mc, model_chunks, optimizer, stages)
