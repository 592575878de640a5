"""Process-group and model-parallel start-up for torchrun, SLURM and a bare ``python`` call."""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from megatron_patches import cpu_compat
from orchestration.config import RunConfig


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    on_cpu: bool

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

    Works under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set) and as a single plain process.
    """
    from orchestration.slurm import torch_distributed_env

    os.environ.update(torch_distributed_env())  # srun/submitit tasks as ranks, no torchrun
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
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        if not on_cpu:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(
            backend="gloo" if on_cpu else "nccl", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=cfg.runtime.distributed_timeout_s))
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.parallel.tensor,
        pipeline_model_parallel_size=cfg.parallel.pipeline,
        distributed_timeout_minutes=cfg.runtime.distributed_timeout_s / 60)
    seed_everything(cfg.train.seed)
    if on_cpu and cfg.runtime.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, on_cpu=on_cpu)


def seed_everything(seed: int) -> None:
    """Same seed on every rank: with CPU initialisation the full weights are identical, and
    Megatron's tracker derives the tensor-parallel streams from it on GPUs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, inference_rng_tracker=cpu_compat.is_enabled())


def shutdown() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def single_process_group() -> None:
    """A one-rank gloo world for single-process tools: Megatron's dataset builder asks for the
    rank (``torch.distributed.get_rank``) whenever it builds a blend, even on one process."""
    if not dist.is_initialized():  # a fresh port: nobody else joins a one-rank world
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def comm_device() -> torch.device:
    """Where tensors for collectives live: the current GPU under NCCL, the CPU under gloo."""
    if cpu_compat.is_enabled() or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())
