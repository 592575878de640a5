"""Cluster presets (conf/cluster/<name>.yaml) as sbatch options and environment variables.

Why: the #SBATCH headers of launch/*.sbatch are static, and the Hydra submitit launcher reads
its resources from its own config; a preset names a cluster's partition, account, node shape
and container once, and this turns it into what each consumer reads:

* ``--sbatch-args``: one option per line (``--nodes=60``...), which launch/submit.sh puts on
  the sbatch command line, where it overrides the script's headers;
* ``--exports``: ``export NAME=value`` lines for ``eval``: GPUS_PER_NODE, IMAGE,
  CONTAINER_MOUNTS and the preset's ``env:`` (read by launch/common.sh inside the job), and
  CLUSTER_* / SLURM_ACCOUNT / SLURM_PARTITION, read by conf/hydra/launcher/slurm.yaml.

Needs PyYAML (a dependency of omegaconf, so any project environment has it).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "cluster"
_SBATCH_KEYS = {
    "nodes": "nodes", "gpus_per_node": "gpus-per-node", "cpus_per_task": "cpus-per-task",
    "mem": "mem", "time": "time", "partition": "partition", "account": "account",
    "qos": "qos", "constraint": "constraint",
}  # fmt: skip


def load_preset(name: str, conf_dir: Path = CONF_DIR) -> dict[str, Any]:
    """A preset by name (conf/cluster/<name>.yaml) or by path."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else conf_dir / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in conf_dir.glob("*.yaml"))
        raise FileNotFoundError(f"no cluster preset {name!r} ({path}); known: {known}")
    preset = yaml.safe_load(path.read_text()) or {}
    unknown = (
        set(preset) - set(_SBATCH_KEYS) - {"name", "exclusive", "image", "container_mounts", "env"}
    )
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
    return preset


def time_to_minutes(value: str | int) -> int:
    """SLURM time formats (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in whole minutes."""
    text = str(value)
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:
        parts += [0] * (3 - len(parts))  # D-HH[:MM[:SS]]
        h, m, s = parts
    elif len(parts) == 3:
        h, m, s = parts
    else:
        h, (m, s) = 0, (parts + [0])[:2]  # MM or MM:SS
    return (int(days or 0) * 24 + h) * 60 + m + (1 if s else 0)


def sbatch_args(preset: dict[str, Any]) -> list[str]:
    args = [
        f"--{opt}={preset[key]}" for key, opt in _SBATCH_KEYS.items() if preset.get(key) is not None
    ]
    if preset.get("exclusive"):
        args.append("--exclusive")
    return args


def exports(preset: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {"CLUSTER_NAME": str(preset.get("name", ""))}
    for key in ("nodes", "gpus_per_node", "cpus_per_task"):
        if preset.get(key) is not None:
            out[f"CLUSTER_{key.upper()}"] = str(preset[key])
    if preset.get("time") is not None:
        out["CLUSTER_TIME_MIN"] = str(time_to_minutes(preset["time"]))
    if preset.get("gpus_per_node") is not None:
        out["GPUS_PER_NODE"] = str(preset["gpus_per_node"])
    for key, var in (("partition", "SLURM_PARTITION"), ("account", "SLURM_ACCOUNT")):
        if preset.get(key) is not None:
            out[var] = str(preset[key])
    if preset.get("image"):
        out["IMAGE"] = str(preset["image"])
    if preset.get("container_mounts"):
        out["CONTAINER_MOUNTS"] = ",".join(preset["container_mounts"])
    out |= {str(k): str(v) for k, v in (preset.get("env") or {}).items() if v is not None}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("preset", help="conf/cluster/<NAME>.yaml, or a YAML path")
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--sbatch-args", action="store_true", help="sbatch options, one a line")
    mode.add_argument("--exports", action="store_true", help="`export K=V` lines for eval")
    args = ap.parse_args(argv)
    try:
        preset = load_preset(args.preset)
    except (OSError, ValueError) as exc:
        print(f"cluster.py: {exc}", file=sys.stderr)
        return 1
    if args.sbatch_args:
        print("\n".join(sbatch_args(preset)))
    else:
        print("\n".join(f"export {k}={shlex.quote(v)}" for k, v in exports(preset).items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
