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
check_config "${NPROC:-1}" "$@" || exit 2
# torchrun has no SIGUSR1 handler: the default action would kill it and orphan its ranks. With
# the signal ignored (a disposition that survives exec), torchrun and the ranks ignore it until
# each rank installs its own handler; a USR1 or TERM to this script is forwarded to the ranks
# (torchrun's children) as USR1, so each finishes its step, checkpoints and exits cleanly.
trap '' USR1
"${LOCAL_CMD[@]}" &
launcher=$!
# shellcheck disable=SC2329  # invoked by the trap below
forward_stop() {
  pkill -USR1 -P "$launcher" 2>/dev/null || true
}
trap forward_stop USR1 TERM INT
status=0
while true; do
  wait "$launcher" && status=0 || status=$?
  # wait returns early (status > 128) when a trapped signal arrives; keep waiting for torchrun.
  if ! kill -0 "$launcher" 2>/dev/null; then
    break
  fi
done
exit "$status"
