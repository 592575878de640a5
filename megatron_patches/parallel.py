"""Megatron's model-parallel groups, seeds and layout queries, and one-rank worlds for tools.

The default process group itself is created by ``orchestration.cluster.distributed`` (it
depends on the launcher); everything that asks Megatron's ``parallel_state`` goes through here.
"""

from __future__ import annotations

import random
import socket

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import (
    get_cuda_rng_tracker,
    model_parallel_cuda_manual_seed,
)

from megatron_patches import cpu_compat


def init_model_parallel(tensor: int, pipeline: int, timeout_s: float, context: int = 1,
                        virtual_pipeline: int = 1) -> None:
    """Megatron's TP/CP/PP/DP groups over the (already initialised) default process group;
    ``virtual_pipeline`` model chunks per pipeline rank (1: no interleaving)."""
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor, pipeline_model_parallel_size=pipeline,
        virtual_pipeline_model_parallel_size=virtual_pipeline if virtual_pipeline > 1 else None,
        context_parallel_size=context, distributed_timeout_minutes=timeout_s / 60)


def context_parallel_size() -> int:
    return parallel_state.get_context_parallel_world_size()


def slice_for_context_parallel(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This CP rank's part of each sequence: Megatron's load-balanced split into 2 x CP chunks
    (``megatron.core.utils.get_batch_on_this_cp_rank``); the batch itself with CP = 1."""
    if parallel_state.get_context_parallel_world_size() == 1:
        return batch
    from megatron.core.utils import get_batch_on_this_cp_rank

    return get_batch_on_this_cp_rank(dict(batch))


def tp_comm_overlap_args(cfg) -> dict:
    """Arguments of TE's ``initialize_ub`` as Megatron-LM's ``_initialize_tp_communicators``
    (megatron/training/initialize.py) builds them: one [sequence x micro-batch / CP, hidden]
    buffer shape, the TP size, fp8, the ``ub_cfgs`` YAML and the bootstrap backend."""
    import yaml

    p, seq = cfg.parallel, cfg.model.seq_length
    ub_cfgs = {}
    if p.tp_comm_overlap_cfg:
        with open(p.tp_comm_overlap_cfg) as stream:
            ub_cfgs = yaml.safe_load(stream) or {}
    return {"shape": [seq * cfg.train.micro_batch_size // p.context, cfg.model.hidden_size],
            "tp_size": p.tensor, "use_fp8": cfg.fp8.format is not None, "ub_cfgs": ub_cfgs,
            "bootstrap_backend": p.tp_comm_bootstrap_backend}


def initialize_tp_comm_overlap(cfg) -> None:
    """Set up TE's userbuffers before the model is built (``parallel.tp_comm_overlap``)."""
    if not cfg.parallel.tp_comm_overlap:
        return
    from transformer_engine.pytorch import module as te_module

    te_module.base.initialize_ub(**tp_comm_overlap_args(cfg))


def seed_everything(seed: int) -> None:
    """Same seed on every rank: with CPU initialisation the full weights are identical, and
    Megatron's tracker derives the tensor-parallel streams from it on GPUs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, inference_rng_tracker=cpu_compat.is_enabled())


def shutdown() -> None:
    """Destroy Megatron's groups and the default process group (both idempotent)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def layout() -> dict[str, int]:
    """This run's parallel layout, as recorded with every checkpoint."""
    return {"tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "vp": virtual_pipeline_size(),
            "dp": parallel_state.get_data_parallel_world_size(),
            "world": dist.get_world_size()}


def data_parallel_size() -> int:
    return parallel_state.get_data_parallel_world_size()


def data_parallel_rank() -> int:
    return parallel_state.get_data_parallel_rank()


def virtual_pipeline_size() -> int:
    """Model chunks per pipeline rank (1 without interleaving)."""
    return parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1


def pipeline_parallel_size() -> int:
    return parallel_state.get_pipeline_model_parallel_world_size()


def tensor_parallel_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


def comm_device() -> torch.device:
    """Where tensors for collectives live: the current GPU under NCCL, the CPU under gloo."""
    if cpu_compat.is_enabled() or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def free_port() -> int:
    """A local TCP port nobody listens on now (for a private one-rank rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_group() -> None:
    """A one-rank gloo world for single-process tools: Megatron's dataset builder asks for the
    rank (``torch.distributed.get_rank``) whenever it builds a blend, even on one process."""
    if not dist.is_initialized():  # a fresh port: nobody else joins a one-rank world
        # The address goes in init_method, not MASTER_ADDR/PORT: those would stay in this
        # process's environment and reach every job it submits (sbatch exports it), where a
        # shared port makes jobs on one host join each other's rendezvous.
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}",
                                rank=0, world_size=1)


def single_process_world(seed: int = 1234) -> None:
    """This process as a 1-rank CPU world with TP=PP=1, for tools that open checkpoints
    (export, averaging, import) and for tests that inspect built models. Reused if it exists."""
    cpu_compat.enable(force=True)  # these tools always run on CPU
    single_process_group()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    if not get_cuda_rng_tracker().get_states():  # attention forks it even without dropout
        seed_everything(seed)
    sizes = (dist.get_world_size(), tensor_parallel_size(), pipeline_parallel_size())
    if sizes != (1, 1, 1):
        raise RuntimeError(f"needs a 1-process TP=PP=1 world, found world/tp/pp={sizes}")


def rng_state() -> dict:
    """Every RNG a training step draws from: Python's, NumPy's, torch's CPU and CUDA generators
    and Megatron's model-parallel tracker (dropout inside tensor-parallel regions). What
    Megatron-LM's ``RerunStateMachine._save_state`` saves, plus the tracker, so that a re-run
    of a step draws the same numbers."""
    state = {"random": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    """Put back what :func:`rng_state` took."""
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(dict(state["tracker"]))
