"""Open a run's checkpoint in one CPU process: its run config, a TP=1 model, its weights.

Used by the tools that work on finished checkpoints (export, averaging, evaluation): the
checkpoint is sharded by ``dist_checkpointing`` at whatever TP/PP layout it was saved with;
Megatron reshards it on load into a TP=1/PP=1 ``GPTModel``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from megatron_patches.configs import build_megatron_configs
from megatron_patches.model import build_gpt_model, model_weights
from megatron_patches.parallel import single_process_world
from orchestration.checkpoint import store
from orchestration.checkpoint.layout import read_metadata
from orchestration.config import (
    Fp8Config,
    FusionConfig,
    ParallelConfig,
    RunConfig,
    load_run_config,
    padded_vocab_size,
)


def run_config_candidates(ckpt: Path) -> list[Path]:
    """Where a checkpoint's run config lives, best first.

    A checkpoint may carry its own ``run_config.yaml`` (averaged checkpoints do). The run
    record's copy (newest job start) was resolved when the run started, so it holds
    the paths and values training used; Hydra's ``.hydra/config.yaml`` is unresolved
    (``${hydra:...}``, ``${oc.env:...}``) and is resolved here, against today's environment.
    """
    run_dir = Path(ckpt).resolve().parent.parent
    records = sorted((run_dir / "record").glob("*/config.yaml"), key=lambda p: p.parent.name)
    return [Path(ckpt) / "run_config.yaml", *reversed(records), run_dir / ".hydra" / "config.yaml"]


def checkpoint_run_config(ckpt: Path, override: Path | None = None) -> RunConfig:
    """The RunConfig a checkpoint was trained with (``override`` wins when given)."""
    candidates = [Path(override)] if override else run_config_candidates(ckpt)
    errors = []
    run_dir = str(Path(ckpt).resolve().parent.parent)  # replaces `${hydra:...}` in .hydra
    for path in candidates:
        if not path.is_file():
            continue
        try:
            return load_run_config(path, run_dir=run_dir)
        except Exception as err:  # an interpolation that only resolves inside Hydra
            errors.append(f"{path}: {err}")
    tried = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(
        f"no usable run config for {ckpt} (tried {tried}; {errors}); pass --run-config PATH"
    )


def build_cpu_model(cfg: RunConfig, saved_tp: int):
    """An uninitialised fp32 TP=1 GPTModel with the vocabulary padded as it was saved."""
    cfg = copy.deepcopy(cfg)
    cfg.parallel = ParallelConfig(tensor=1, pipeline=1, sequence_parallel=False)
    cfg.train.precision, cfg.runtime.device = "fp32", "cpu"
    cfg.mup.enabled = False  # multipliers are folded into the weights, not run
    # A GPU run's kernels (TE spec, fusions, fp8) are not needed to read its weights: the local
    # spec loads TE checkpoints (llama_spec's keys map), so a CPU tool opens any checkpoint.
    cfg.model.layer_spec = "local"
    cfg.fusions, cfg.fp8 = FusionConfig(), Fp8Config()
    mc = build_megatron_configs(cfg, on_cpu=True)
    mc.padded_vocab_size = padded_vocab_size(cfg.model, saved_tp)
    mc.transformer.perform_initialization = False  # every weight comes from the checkpoint
    return build_gpt_model(cfg, mc)


def saved_tensor_parallel(ckpt: Path) -> int:
    return int(read_metadata(ckpt).get("layout", {}).get("tp", 1))


def load_megatron_weights(ckpt: Path, cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The checkpoint's full (unsharded) model weights under Megatron's TP=1 names."""
    single_process_world()
    model = build_cpu_model(cfg, saved_tensor_parallel(ckpt))
    store.load(ckpt, model, None, with_optimizer=False)
    return model_weights(model)
