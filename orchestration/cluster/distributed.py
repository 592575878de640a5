"""Process-group start-up for torchrun, one-task-per-rank launchers and a bare ``python`` call."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_patches import cpu_compat
from megatron_patches.parallel import (
    comm_device,
    free_port,
    init_model_parallel,
    seed_everything,
    shutdown,
)
from orchestration.cluster.base import Cluster, detect_cluster
from orchestration.config import RunConfig

__all__ = ["DistInfo", "comm_device", "init_distributed", "shutdown", "use_cpu"]


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    on_cpu: bool
    cluster: Cluster

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def use_cpu(device: str) -> bool:
    if device == "cpu":
        return True
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device=cuda but torch.cuda.is_available() is False")
    return not torch.cuda.is_available()


def init_distributed(cfg: RunConfig) -> DistInfo:
    """Create the default process group (NCCL on GPUs, gloo on CPU) and Megatron's groups.

    Works under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set), under a launcher whose tasks are the
    ranks (the cluster's ``rank_env``: srun, submitit) and as a single plain process.
    """
    cluster = detect_cluster()
    os.environ.update(cluster.rank_env())
    on_cpu = use_cpu(cfg.runtime.device)
    if on_cpu:
        cpu_compat.enable(force=True)
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            # A plain single process: rendezvous on a fresh local port, never an inherited one
            # (a parent's MASTER_PORT, or the previous job of a sequential Hydra multirun).
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        if not on_cpu:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(
            backend="gloo" if on_cpu else "nccl", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=cfg.runtime.distributed_timeout_s))
    init_model_parallel(cfg.parallel.tensor, cfg.parallel.pipeline,
                        cfg.runtime.distributed_timeout_s, context=cfg.parallel.context,
                        virtual_pipeline=cfg.parallel.virtual_pipeline)
    seed_everything(cfg.train.seed)
    if on_cpu and cfg.runtime.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, on_cpu=on_cpu,
                    cluster=cluster)
