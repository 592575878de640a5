"""Sharded checkpoints with ``megatron.core.dist_checkpointing``: atomic, pruned, resumable.

Layout under ``<run_dir>/checkpoints/``::

    step_00000100/            # complete: renamed from step_00000100.tmp after every rank wrote
        checkpoint_info.json         # step, layout, time; written last, before the rename
        rng/rank_00000.pt     # per-rank RNG states (restored when the layout is unchanged)
        ...                   # dist_checkpointing shards + common.pt (trainer state)

A directory without ``checkpoint_info.json`` or still named ``*.tmp`` is never loaded, so a job killed
mid-save (or a full disk) leaves the previous checkpoint as the newest complete one. Sharded
tensors are resharded on load, so a checkpoint saved at one TP/PP/DP layout loads at another.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException subclass

from megatron_patches.optimizer_state import ensure_adam_state, restore_adam_steps
from orchestration.distributed import comm_device
from orchestration.model import unwrap

if TYPE_CHECKING:
    from orchestration.async_checkpoint import AsyncSaver

log = logging.getLogger(__name__)

OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
_PREFIX = "step_"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(root: Path, step: int) -> Path:
    return root / f"{_PREFIX}{step:08d}"


def step_of(path: Path) -> int:
    """The step a ``step_XXXXXXXX`` checkpoint directory holds."""
    return int(path.name[len(_PREFIX):])


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX)
             and not p.name.endswith(".tmp") and (p / "checkpoint_info.json").is_file()]
    return sorted(found, key=step_of)


def read_metadata(path: Path) -> dict[str, Any]:
    return json.loads((path / "checkpoint_info.json").read_text())


def _layout() -> dict[str, int]:
    return {"tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "dp": parallel_state.get_data_parallel_world_size(),
            "world": dist.get_world_size()}


def _rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def sharded_state(model, optimizer, trainer_state: dict, is_loading: bool,
                  with_optimizer: bool = True) -> dict[str, Any]:
    model_sd = unwrap(model).sharded_state_dict()  # keys without DDP's "module." prefix
    state: dict[str, Any] = {"model": model_sd, "trainer": trainer_state}
    if with_optimizer and optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=OPTIM_METADATA)
    return state


def save(root: Path, step: int, model, optimizer, trainer_state: dict, keep_last: int,
         saver: AsyncSaver | None = None) -> Path:
    """Write ``step_<step>`` atomically on all ranks; prune to the newest ``keep_last``.

    With ``saver`` the shards are written in the background (``orchestration.async_checkpoint``)
    and ``step_<step>`` appears when ``saver.finalize`` finds every rank's writer done; without
    it this returns once the checkpoint is complete. The RNG files are written after the save
    starts, since Megatron warns about a non-empty target directory. Before the first update
    Adam has no state to save, so a step-0 checkpoint holds weights only.
    """
    with_optimizer = step > 0
    final, tmp = step_dir(root, step), step_dir(root, step).with_suffix(".tmp")
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    t0 = time.time()
    state = sharded_state(model, optimizer, trainer_state, False, with_optimizer)
    publish = functools.partial(_publish, root, step, keep_last, with_optimizer, t0)
    if saver is None:
        dist_checkpointing.save(state, str(tmp))
    else:
        saver.schedule(state, tmp, final, publish)  # publish runs once all ranks have written
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
    if saver is None:
        publish()
    return final


def _publish(root: Path, step: int, keep_last: int, with_optimizer: bool, t0: float) -> None:
    """On all ranks once every shard is written: marker, rename ``*.tmp`` -> final, prune."""
    final, tmp = step_dir(root, step), step_dir(root, step).with_suffix(".tmp")
    dist.barrier()
    if dist.get_rank() == 0:
        meta = {"step": step, "layout": _layout(), "time": time.time(),
                "has_optimizer": with_optimizer,
                "save_seconds": round(time.time() - t0, 3)}
        _write_json_atomic(tmp / "checkpoint_info.json", meta)
        if final.exists():  # a re-save of the same step (e.g. after a rollback)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(root, keep_last)
    dist.barrier()


class LayoutChangeError(RuntimeError):
    """Optimizer state saved at another TP/PP layout, which this Megatron-Core can't reshard."""


def load(path: Path, model, optimizer, with_optimizer: bool = True,
         reset_optimizer_on_reshard: bool = False) -> dict[str, Any]:
    """Load model (+ optimizer) in place; return the trainer state saved with it."""
    meta = read_metadata(path)
    with_optimizer = with_optimizer and meta.get("has_optimizer", True)
    if with_optimizer and _model_parallel_changed(meta):
        if not reset_optimizer_on_reshard:
            raise LayoutChangeError(
                f"{path} was saved at tp={meta['layout']['tp']} pp={meta['layout']['pp']} but "
                f"this run has tp={_layout()['tp']} pp={_layout()['pp']}: Megatron-Core's "
                "distributed-optimizer checkpoints reshard across data parallelism only. Set "
                "checkpoint.reset_optimizer_on_reshard=true to load the weights and restart "
                "Adam's moments, or keep parallel.tensor/pipeline as saved.")
        log.warning("%s: TP/PP layout changed; loading weights only, Adam state restarts", path)
        with_optimizer = False
    if with_optimizer and optimizer is not None:
        ensure_adam_state(optimizer)
    template = sharded_state(model, optimizer, {}, True, with_optimizer)
    template.pop("trainer")
    state = dist_checkpointing.load(template, str(path))
    with torch.no_grad():  # fp32 main params are views of the (grad-requiring) weights
        unwrap(model).load_state_dict(state["model"])
        if with_optimizer and optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
            restore_adam_steps(optimizer, state["optimizer"])
    common = dist_checkpointing.load_common_state_dict(str(path))
    rng_file = path / "rng" / f"rank_{dist.get_rank():05d}.pt"
    if meta.get("layout") == _layout() and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return common.get("trainer", {})


def _model_parallel_changed(meta: dict[str, Any]) -> bool:
    saved, now = meta.get("layout", {}), _layout()
    return (saved.get("tp"), saved.get("pp")) != (now["tp"], now["pp"])


def load_latest(root: Path, load_fn: Callable[[Path], dict]) -> tuple[Path, dict] | None:
    """Load the newest complete checkpoint, falling back to older ones if it is unreadable."""
    for path in reversed(complete_checkpoints(root)):
        error = None
        try:
            if not dist_checkpointing.check_is_distributed_checkpoint(str(path)):
                raise ValueError("no dist_checkpointing metadata")
            trainer_state = load_fn(path)
        except LayoutChangeError:
            raise  # a config problem, not a damaged checkpoint: don't fall back silently
        except (Exception, CheckpointException) as err:  # corrupt or truncated shard, ...
            error = err
        if _all_ranks_ok(error is None):
            return path, trainer_state
        log.warning("checkpoint %s is unreadable (%s); trying the previous one", path,
                    f"{type(error).__name__}: {error}" if error else "failed on another rank",
                    exc_info=error)
    return None


def _all_ranks_ok(ok: bool) -> bool:
    """Every rank must take the same checkpoint, so one rank's failure fails it for all."""
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=comm_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for old in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)
