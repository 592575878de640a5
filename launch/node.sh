#!/usr/bin/env bash
# Runs once per node (srun --ntasks-per-node=1 from common.sh's run_job): build this node's
# torchrun command from SLURM_* and run it, passing SLURM's stop signals on to the ranks.
#   usage (by srun only): bash launch/node.sh EXPERIMENT [HYDRA_OVERRIDES...]
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

build_torchrun_cmd "$@"
log_msg "node ${SLURM_NODEID:-0} ($(hostname)): ${TORCHRUN_CMD[*]}"
# Not exec: SLURM's signals (--signal=USR1@N, scancel --signal=USR1, scancel's SIGTERM) reach
# this shell, the step's task, but not torchrun's ranks, which run in sessions of their own;
# this shell passes them on to the ranks as SIGUSR1 (common.sh, run_forwarding_stop).
run_forwarding_stop children "${TORCHRUN_CMD[@]}"
