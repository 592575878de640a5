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
# A USR1/USR2 sent to torchrun itself is passed on to the ranks like TERM/INT/HUP (without
# this torchrun has no USR1 handler, and the default action would kill the job unsaved), and
# torchrun waits up to TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (its default: 30) for the ranks'
# stop checkpoint before it kills them. torchrun itself then exits 1 (SignalException).
export PET_SIGNALS_TO_HANDLE="${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2}"
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}"
# USR1 is ignored until torchrun installs its handler. A USR1/TERM/INT to this script is
# forwarded to the ranks (torchrun's children) as USR1: each finishes its step, they all
# checkpoint that step and exit cleanly, and so does torchrun.
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
