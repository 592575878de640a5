"""``python -m orchestration.average RUN_DIR (--last K | --steps a,b,c) [--ema DECAY] --out DIR``

Average the weights of several checkpoints of a run into a new checkpoint. Why: the mean of
the last few checkpoints (or an EMA-style weighting of them) is often a better model than the
last one alone, at no training cost (LAWA, Kaddour 2022; Sanyal et al. 2023). Each checkpoint is loaded into one TP=1/PP=1 CPU model (Megatron reshards whatever
layout it was saved at), the weighted sum is accumulated in float64, and the result is saved
with ``dist_checkpointing`` like any checkpoint, without optimizer state, so a run can start
from it with ``checkpoint.load=DIR checkpoint.load_optimizer=false`` at any layout. Keep DIR
out of a run's ``checkpoints/`` folder: a resume there would pick it up as the newest step.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from orchestration.checkpoint import layout as ckpt
from orchestration.common.files import write_json_atomic, write_text_atomic
from orchestration.common.quiet import install_warning_filters

log = logging.getLogger(__name__)


def select_checkpoints(
    run_dir: Path, last: int | None = None, steps: list[int] | None = None
) -> list[Path]:
    """The checkpoints to average, oldest first: the newest ``last`` or exactly ``steps``."""
    found = ckpt.complete_checkpoints(ckpt.checkpoint_dir(run_dir))
    by_step = {ckpt.read_metadata(p)["step"]: p for p in found}
    if steps is not None:
        missing = sorted(set(steps) - set(by_step))
        if missing:
            raise FileNotFoundError(
                f"{run_dir}: no complete checkpoint for steps {missing} (have {sorted(by_step)})"
            )
        return [by_step[s] for s in sorted(set(steps))]
    if not last or last < 1 or last > len(found):
        raise ValueError(f"--last {last}: {run_dir} has {len(found)} complete checkpoints")
    return found[-last:]


def average_weights(k: int, ema: float | None = None) -> list[float]:
    """Uniform ``1/k``, or ``ema**(k-1-i)`` normalised (the newest checkpoint weighs most)."""
    if ema is None:
        return [1.0 / k] * k
    if not 0.0 < ema <= 1.0:
        raise ValueError(f"--ema {ema} must be in (0, 1]")
    raw = [ema ** (k - 1 - i) for i in range(k)]
    return [w / sum(raw) for w in raw]


def average(
    paths: list[Path], weights: list[float], out: Path, run_config: Path | None = None
) -> Path:
    """Write the weighted average of the checkpoints ``paths`` to the checkpoint dir ``out``."""
    from megatron_patches.checkpointing import save_weights_only
    from megatron_patches.parallel import single_process_world
    from orchestration.hf.offline import build_cpu_model, checkpoint_run_config

    single_process_world()
    cfg = checkpoint_run_config(paths[-1], run_config)
    layouts = {ckpt.read_metadata(p).get("layout", {}).get("tp", 1) for p in paths}
    if len(layouts) > 1:  # the padded vocabulary depends on the TP size it was saved at
        raise ValueError(f"checkpoints were saved at different TP sizes {sorted(layouts)}")
    model = build_cpu_model(cfg, layouts.pop())
    total = _weighted_sum(model, paths, weights)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name in total:
                tensor.copy_(total[name].to(tensor.dtype))
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    steps = [ckpt.read_metadata(p)["step"] for p in paths]
    trainer_state = {"step": steps[-1], "averaged_from": steps}
    save_weights_only(model, trainer_state, tmp)
    _write_run_config(cfg, tmp / "run_config.yaml")
    info = {
        "step": steps[-1],
        "time": time.time(),
        "has_optimizer": False,
        "layout": {"tp": 1, "pp": 1, "dp": 1, "world": 1},
        "averaged_from": [
            {"path": str(p.resolve()), "step": s, "weight": w}
            for p, s, w in zip(paths, steps, weights, strict=True)
        ],
    }
    write_json_atomic(tmp / ckpt.INFO_FILE, info)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    log.info("averaged steps %s -> %s", steps, out)
    return out


def _write_run_config(cfg, path: Path) -> None:
    """The run config travels with the averaged checkpoint (it has no run dir of its own)."""
    import yaml

    from orchestration.config import to_dict

    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _weighted_sum(model, paths: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    """sum_i w_i * weights_i in float64, loading one checkpoint at a time into ``model``."""
    from orchestration.checkpoint import store

    total: dict[str, torch.Tensor] = {}
    for path, weight in zip(paths, weights, strict=True):
        store.load(path, model, None, with_optimizer=False)
        for name, tensor in model.state_dict().items():
            if not isinstance(tensor, torch.Tensor) or name.endswith("_extra_state"):
                continue
            term = tensor.detach().to(torch.float64) * weight
            total[name] = total[name] + term if name in total else term
    return total


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--last", type=int, help="the newest K complete checkpoints")
    which.add_argument("--steps", help="comma-separated checkpoint steps, e.g. 800,900,1000")
    p.add_argument("--ema", type=float, help="weight checkpoint i by DECAY**(K-1-i)")
    p.add_argument("--out", type=Path, required=True, help="the checkpoint directory to write")
    p.add_argument("--run-config", type=Path, help="run config YAML (default: the run's own)")
    args = p.parse_args(argv)
    install_warning_filters()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    steps = [int(s) for s in args.steps.split(",")] if args.steps else None
    paths = select_checkpoints(args.run_dir, args.last, steps)
    average(paths, average_weights(len(paths), args.ema), args.out, args.run_config)


if __name__ == "__main__":
    main()
