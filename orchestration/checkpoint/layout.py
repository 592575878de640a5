"""The layout of a run's checkpoints, and what can be read without loading one.

Under ``<run_dir>/checkpoints/``::

    step_00000100/            # complete: renamed from step_00000100.tmp after every rank wrote
        checkpoint_info.json  # step, layout, time; written last, before the rename
        rng/rank_00000.pt     # per-rank RNG states (restored when the layout is unchanged)
        ...                   # dist_checkpointing shards + common.pt (trainer state)

``step_N`` holds the model after global step N (1-based; ``step_00000000`` the initial weights).
A directory without ``checkpoint_info.json`` or still named ``*.tmp`` is never loaded, so a job
killed mid-save (or a full disk) leaves the previous checkpoint as the newest complete one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

PREFIX = "step_"
INFO_FILE = "checkpoint_info.json"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:08d}"


def step_of(path: Path) -> int:
    """The step a ``step_XXXXXXXX`` checkpoint directory holds."""
    return int(path.name[len(PREFIX):].removesuffix(".tmp"))


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and not p.name.endswith(".tmp") and (p / INFO_FILE).is_file()]
    return sorted(found, key=step_of)


def read_metadata(path: Path) -> dict[str, Any]:
    return json.loads((path / INFO_FILE).read_text())


SHAPE_SECTIONS = ("model", "mup")  # what decides whether a checkpoint's tensors fit a model


def shape_config(config: dict[str, Any]) -> dict[str, Any]:
    """The flattened ``model.*``/``mup.*`` keys of a run config, recorded in each checkpoint so
    that a checkpoint that does not load can be told *incompatible* from *damaged*."""
    return {f"{section}.{key}": value for section in SHAPE_SECTIONS
            for key, value in sorted(config.get(section, {}).items())}


def config_differences(path: Path, current: dict[str, Any]) -> list[str]:
    """``key: checkpoint X, this run Y`` for each recorded shape key that differs."""
    try:
        saved = read_metadata(path).get("config")
    except (OSError, ValueError):
        return []
    if not saved:
        return []
    return [f"{key}: checkpoint {saved.get(key)!r}, this run {current.get(key)!r}"
            for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]


def is_release(path: Path) -> bool:
    """A release checkpoint (``release`` in its info, e.g. the end of a stage): never pruned."""
    try:
        return bool(read_metadata(path).get("release"))
    except (OSError, ValueError):
        return True  # unreadable info: keep it rather than guess


def prune(root: Path, keep_last: int, keep_every: int = 0) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (0: keep every one), never
    one whose step is a multiple of ``keep_every`` or that is marked ``release`` (the release
    checkpoints). Unloadable ones are not candidates: they were moved to ``unloadable/`` and
    are not complete checkpoints."""
    if keep_last <= 0:
        return
    for old in complete_checkpoints(root)[:-keep_last]:
        if (keep_every > 0 and step_of(old) % keep_every == 0) or is_release(old):
            continue
        shutil.rmtree(old, ignore_errors=True)
