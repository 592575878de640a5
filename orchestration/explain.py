"""``python -m orchestration.explain [experiment=NAME] [key=value ...]`` (also
``python -m orchestration.train ... --explain``): print what Megatron-Core would receive.

The config is composed exactly as ``orchestration.train`` composes it and turned into
``TransformerConfig``, ``DistributedDataParallelConfig``, ``OptimizerConfig`` and the layer spec
as a GPU job builds them (CUDA with Transformer Engine and apex, as in the NGC image), on any
machine and without a GPU. ``--this-machine`` builds them for this machine's probed platform
instead (what a job started here would get, e.g. a CPU run's settings).
"""

from __future__ import annotations

import argparse
import sys

from orchestration.common.quiet import install_warning_filters


def main(argv: list[str] | None = None) -> int:
    install_warning_filters()  # before anything imports megatron-core
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--this-machine", action="store_true",
                   help="probe this machine instead of assuming a GPU job")
    p.add_argument("--config-dir", help="an extra config directory (as for train)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for train")
    args = p.parse_args(argv)
    from megatron_patches.explain import explain
    from megatron_patches.platform import GPU_JOB, LayerSpecError, probe_platform
    from orchestration.check import compose
    from orchestration.config import ConfigError

    try:
        cfg = compose(args.overrides, args.config_dir)
        platform = GPU_JOB
        if args.this_machine:
            from orchestration.cluster.distributed import use_cpu

            platform = probe_platform(use_cpu(cfg.runtime.device))
        print(explain(cfg, platform))
    except (ConfigError, LayerSpecError) as err:
        print(f"orchestration.explain: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
