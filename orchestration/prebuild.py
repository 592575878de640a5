"""``python -m orchestration.prebuild``: every stage's data index cache, before training starts.

``python -m orchestration.prebuild experiment=k2 [key=value ...]`` takes the same config as
``orchestration.train`` and writes ``run_dir/data_cache`` exactly as the first training job
would (same blend, split, sizes and seeds, so the cache keys match).

Why: Megatron's ``BlendedMegatronDatasetBuilder`` builds the index on rank 0 while every other
rank waits in a ``torch.distributed.barrier`` bounded by the process-group timeout
(``runtime.distributed_timeout_s``, 600 s by default). For a K2-sized stage (1.3T tokens over 14
sources) the first build takes ~13 minutes on one core (docs/benchmarks.md, "Blended index
build"), so the first job of such a run would time out at step 0 with every GPU idle. Built
here first, on a CPU node or the first node of the allocation, every rank of the training job
loads the cache in seconds. ``data.builder_threads`` builds the sources of a blend in parallel.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from orchestration.common.quiet import install_warning_filters
from orchestration.config import RunConfig, register_configs, to_run_config, validate

log = logging.getLogger("orchestration.prebuild")
register_configs()


def prebuild(cfg: RunConfig) -> dict[str, dict]:
    """Build (or verify) the cached datasets of every stage; returns sample counts per stage."""
    from megatron_patches.parallel import single_process_group
    from orchestration.data.datasets import (
        check_sources_exist,
        prepare_data,
        run_streams,
        stage_datasets,
    )
    from orchestration.loop.stages import plan_stages

    validate(cfg)
    single_process_group()
    built = {}
    stages, streams = plan_stages(cfg), run_streams(cfg)
    for stage in stages:
        prepare_data(stage.data, is_main=True)
        check_sources_exist(stage.data)
        t0 = time.perf_counter()
        datasets = stage_datasets(cfg, stage, stages, streams)
        built[stage.name] = {
            "train_samples": len(datasets.train),
            "valid_samples": len(datasets.valid) if datasets.valid is not None else 0,
            "per_source_held_out": sorted(datasets.valid_per_source),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        log.info("stage %s: %s", stage.name, built[stage.name])
    log.info("data cache ready in %s", Path(cfg.run_dir) / "data_cache")
    return built


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(dcfg: DictConfig) -> None:
    install_warning_filters()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
    logging.getLogger("megatron").setLevel(logging.WARNING)
    prebuild(to_run_config(dcfg))


if __name__ == "__main__":
    main()
