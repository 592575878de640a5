#!/usr/bin/env bash
# Runs once per node (srun --ntasks-per-node=1 from common.sh's run_job): build this node's
# torchrun command from SLURM_NODEID & co. and replace this shell with it.
#   usage (by srun only): bash launch/node.sh EXPERIMENT [HYDRA_OVERRIDES...]
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# SLURM's --signal=USR1@120 (no "B:") reaches every process of the step, torchrun included.
# torchrun installs no USR1/USR2 handler, so the default action would kill it and its ranks
# before they could checkpoint. An ignored disposition survives exec and fork, so torchrun
# ignores them; each training rank replaces it with orchestration.cluster.signals' handler.
trap '' USR1 USR2
# scancel's SIGTERM reaches torchrun too, which passes it on and then waits this long (its own
# default: 30 s) for the ranks' stop checkpoint before it kills them; SLURM's KillWait still
# bounds the whole.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}"

build_torchrun_cmd "$@"
log_msg "node ${SLURM_NODEID:-0} ($(hostname)): ${TORCHRUN_CMD[*]}"
exec "${TORCHRUN_CMD[@]}"
