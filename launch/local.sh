#!/usr/bin/env bash
# One machine, no SLURM: the same entry point as the cluster scripts, under torchrun.
#   NPROC=2 launch/local.sh experiment=tiny_k2 train.max_steps=20
# NPROC ranks (default 1). Arguments are Hydra overrides, passed through unchanged. Without
# GPUs the driver picks the gloo backend itself. --standalone runs a private rendezvous on a
# free port, so several local runs can share the machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=launch/common.sh
source launch/common.sh

build_local_cmd() {
  resolve_torchrun
  LOCAL_CMD=("${TORCHRUN_LAUNCHER[@]}" --standalone --nnodes=1 --nproc-per-node="${NPROC:-1}"
    -m orchestration.train "$@")
}

export GPUS_PER_NODE="${NPROC:-1}"
setup_distributed_env
build_local_cmd "$@"
if [[ -n "${DRY_RUN:-}" ]]; then
  printf '%q ' "${LOCAL_CMD[@]}"
  echo
  exit 0
fi
exec "${LOCAL_CMD[@]}"
