"""Save, load and resume sharded checkpoints: atomic, pruned, the same on every rank.

Sharded tensors are resharded on load (``megatron_patches.checkpointing``), so a checkpoint
saved at one TP/PP/DP layout loads at another; the layout on disk is ``layout``'s.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException subclass

from megatron_patches import checkpointing
from megatron_patches.checkpointing import AsyncSaver
from megatron_patches.parallel import comm_device, layout
from orchestration.checkpoint import disk_space
from orchestration.checkpoint.layout import (
    INFO_FILE,
    complete_checkpoints,
    prune,
    read_metadata,
    step_dir,
)
from orchestration.common.files import write_json_atomic

log = logging.getLogger(__name__)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(root: Path, step: int, model, optimizer, trainer_state: dict, keep_last: int,
         saver: AsyncSaver | None = None, config: dict | None = None,
         keep_every: int = 0, release: str | None = None) -> Path:
    """Write ``step_<step>`` atomically on all ranks; prune to the newest ``keep_last`` plus
    the multiples of ``keep_every`` and the releases. ``release`` (e.g. ``end of stage X``)
    marks this checkpoint as one, in its ``checkpoint_info.json``.

    With ``saver`` the shards are written in the background and ``step_<step>`` appears when
    ``saver.finalize`` finds every rank's writer done; without it this returns once the
    checkpoint is complete. The RNG files are written after the shard save has started,
    because Megatron warns when the directory it saves into is not empty. Before the first
    update Adam has no state to save, so a step-0 checkpoint holds weights only. ``config``
    (``layout.shape_config``) goes into ``checkpoint_info.json``.
    """
    with_optimizer = step > 0
    final, tmp = step_dir(root, step), step_dir(root, step).with_suffix(".tmp")
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    publish = functools.partial(_publish, root, step, (keep_last, keep_every), with_optimizer,
                                time.time(), config or {}, release)
    expected = _previous_size(root)
    if rank == 0:
        disk_space.warn_if_short(root, expected)
    try:
        if saver is None:
            checkpointing.save_sharded(model, optimizer, trainer_state, tmp, with_optimizer)
        else:  # publish runs once all ranks have written
            saver.schedule(model, optimizer, trainer_state, tmp, final, with_optimizer, publish)
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(_rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
    except (Exception, CheckpointException) as err:
        if disk_space.looks_full(err, root, expected):
            raise disk_space.disk_full_error(final, tmp, expected) from err
        raise
    if saver is None:
        publish()
    return final


def finalize(root: Path, saver: AsyncSaver, blocking: bool) -> list[Path]:
    """Publish the background saves every rank has finished (all of them with ``blocking``);
    returns their paths. A background write that failed for lack of space fails as a sync save
    does: the partial ``*.tmp`` removed and an error naming the path, the free space and the
    previous checkpoint's size; the previous checkpoint stays the newest complete one."""
    pending = saver.in_flight[0] if saver.in_flight else None
    try:
        return saver.finalize(blocking)
    except (Exception, CheckpointException) as err:
        if pending is None:
            raise
        expected = _previous_size(root)
        if disk_space.looks_full(err, root, expected):
            raise disk_space.disk_full_error(pending, pending.with_suffix(".tmp"),
                                             expected) from err
        raise


def _previous_size(root: Path) -> int:
    """Bytes of the newest complete checkpoint: what the next save is expected to need."""
    done = complete_checkpoints(root)
    return disk_space.directory_bytes(done[-1]) if done else 0


def _publish(root: Path, step: int, keep: tuple[int, int], with_optimizer: bool, t0: float,
             config: dict, release: str | None = None) -> None:
    """On all ranks once every shard is written: marker, rename ``*.tmp`` -> final, prune."""
    final, tmp = step_dir(root, step), step_dir(root, step).with_suffix(".tmp")
    dist.barrier()
    if dist.get_rank() == 0:
        meta = {"step": step, "layout": layout(), "time": time.time(),
                "has_optimizer": with_optimizer, "save_seconds": round(time.time() - t0, 3),
                "config": config}
        if release:
            meta["release"] = release
        write_json_atomic(tmp / INFO_FILE, meta)
        if final.exists():  # a re-save of the same step (e.g. after a rollback)
            shutil.rmtree(final)
        os.replace(tmp, final)
        prune(root, *keep)
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
                f"{path} was saved at {_model_parallel(saved_layout(meta))} but this run has "
                f"{_model_parallel(layout())}: Megatron-Core's "
                "distributed-optimizer checkpoints reshard across data parallelism only. Set "
                "checkpoint.reset_optimizer_on_reshard=true to load the weights and restart "
                "Adam's moments, or keep parallel.tensor/pipeline/virtual_pipeline as saved.")
        log.warning("%s: TP/PP layout changed; loading weights only, Adam state restarts", path)
        with_optimizer = False
    trainer_state = checkpointing.load_sharded(model, optimizer, path, with_optimizer)
    rng_file = path / "rng" / f"rank_{dist.get_rank():05d}.pt"
    if saved_layout(meta) == layout() and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return trainer_state


def saved_layout(meta: dict[str, Any]) -> dict[str, int]:
    """The layout a checkpoint was saved at; ``vp`` (model chunks per pipeline rank) is 1 in
    checkpoints written before it was recorded."""
    saved = meta.get("layout", {})
    return {**saved, "vp": saved.get("vp", 1)} if saved else {}


def _model_parallel(lay: dict[str, Any]) -> str:
    return f"tp={lay.get('tp')} pp={lay.get('pp')} vp={lay.get('vp', 1)}"


def _model_parallel_changed(meta: dict[str, Any]) -> bool:
    """TP, PP or the virtual pipeline changed: the optimizer's buffers are laid out anew."""
    saved, now = saved_layout(meta), layout()
    return any(saved.get(k) != now[k] for k in ("tp", "pp", "vp"))


class UnloadableCheckpoints(RuntimeError):
    """The run dir has checkpoints and none of them loads: resuming must not start over."""


def load_latest(root: Path, load_fn: Callable[[Path], dict],
                failures: list[tuple[Path, str]] | None = None) -> tuple[Path, dict] | None:
    """Load the newest complete checkpoint, falling back to older ones if it is unreadable.
    Each checkpoint that failed is appended to ``failures`` with the reason."""
    failures = [] if failures is None else failures
    for path in reversed(complete_checkpoints(root)):
        error = None
        try:
            if not checkpointing.is_dist_checkpoint(path):
                raise ValueError("no dist_checkpointing metadata")
            trainer_state = load_fn(path)
        except LayoutChangeError:
            raise  # a config problem, not a damaged checkpoint: don't fall back silently
        except (Exception, CheckpointException) as err:  # corrupt or truncated shard, ...
            error = err
        if _all_ranks_ok(error is None):
            return path, trainer_state
        reason = (f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"
                  if error and str(error).strip() else
                  type(error).__name__ if error else "failed on another rank")
        failures.append((path, reason))
        log.warning("checkpoint %s is unreadable (%s); trying the previous one", path, reason,
                    exc_info=error)
    return None


def _all_ranks_ok(ok: bool) -> bool:
    """Every rank must take the same checkpoint, so one rank's failure fails it for all."""
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=comm_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def checkpoint_before(root: Path, first_bad_step: int) -> Path | None:
    """Newest complete checkpoint taken before ``first_bad_step`` ran."""
    candidates = [p for p in complete_checkpoints(root)
                  if int(read_metadata(p)["step"]) < first_bad_step]
    return candidates[-1] if candidates else None
