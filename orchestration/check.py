"""``python -m orchestration.check --world-size N [--config-dir DIR] [key=value ...]``

Compose the run config exactly as ``python -m orchestration.train`` would and check it against
the world size a launcher is about to start: ``launch/local.sh`` and the sbatch scripts call it
before torchrun, so a global batch that does not split over data parallelism (or heads that do
not split over TP) fails in seconds, on the login node, with the keys named, instead of after
the process group exists. Exit 0 when the config can run, 2 with the errors otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from orchestration.common.paths import CONF_DIR
from orchestration.common.quiet import install_warning_filters


def compose(overrides: list[str], config_dir: str | None = None):
    """The typed RunConfig for ``overrides`` (Hydra's compose API; ``hydra.*`` keys ignored)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from orchestration.config import register_configs, to_run_config

    register_configs()
    kept = [o for o in overrides if not o.lstrip("+~").startswith("hydra.")]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        extra = [f"hydra.searchpath=[file://{Path(config_dir).resolve()}]"] if config_dir else []
        cfg = hydra_compose(config_name="config", overrides=kept + extra)
    if "run_dir" not in {o.split("=", 1)[0].lstrip("+~") for o in kept}:
        cfg.run_dir = "runs/check"  # `${hydra:runtime.output_dir}` resolves only inside a job
    return to_run_config(cfg)


def main(argv: list[str] | None = None) -> int:
    install_warning_filters()  # before anything imports megatron-core
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-size", type=int, required=True, help="ranks the launcher starts")
    p.add_argument("--config-dir", help="an extra config directory (as for train)")
    p.add_argument("overrides", nargs="*", help="the Hydra overrides train will get")
    args = p.parse_args(argv)
    from orchestration.config import ConfigError, validate

    try:
        validate(compose(args.overrides, args.config_dir), world_size=args.world_size)
    except ConfigError as err:
        print(f"orchestration.check: world size {args.world_size}: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a bad override or a missing experiment: Hydra's own message
        print(f"orchestration.check: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
