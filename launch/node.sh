#!/usr/bin/env bash
# Runs once per node (srun --ntasks-per-node=1 from common.sh's run_job): build this node's
# torchrun command from SLURM_* and run it, passing SLURM's stop signals on to the ranks.
#   usage (by srun only): bash launch/node.sh EXPERIMENT [HYDRA_OVERRIDES...]
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# torchrun installs no USR2 handler; ignored here (a disposition that survives exec and fork),
# a stray USR2 cannot kill it (run_forwarding_stop does the same for USR1). Each training rank
# replaces the disposition with orchestration.cluster.signals' handler.
trap '' USR2
# Where a SIGTERM reaches torchrun too (other proctrack plugins signal the whole step), it
# passes it on and then waits this long (its own default: 30 s) for the ranks' stop checkpoint
# before it kills them; SLURM's KillWait still bounds the whole.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}"

build_torchrun_cmd "$@"
log_msg "node ${SLURM_NODEID:-0} ($(hostname)): ${TORCHRUN_CMD[*]}"
# Not exec: SLURM's signals (--signal=USR1@N, scancel --signal=USR1, scancel's SIGTERM) reach
# this shell, the step's task, but not torchrun's ranks, which run in sessions of their own;
# this shell passes them on to the ranks as SIGUSR1 (common.sh, run_forwarding_stop).
run_forwarding_stop children "${TORCHRUN_CMD[@]}"
