# shellcheck shell=bash
# Shared by launch/*.sbatch, launch/node.sh and launch/local.sh: one place that turns the SLURM_*
# environment into the srun and torchrun commands, so tests can source this file with a fake
# environment and check the commands (`print_torchrun_cmd`, `print_srun_cmd`).
#
# Environment read (all optional):
#   REPO_DIR        checkout to run from (default: this file's parent directory)
#   RUN_ROOT        parent of run dirs (default: runs); RUN_DIR overrides the whole path
#   GPUS_PER_NODE   ranks per node (default: SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE, else 1)
#   RANKS_PER_NODE  ranks per node on a CPU partition (GPUS_PER_NODE=0; default 1)
#   IMAGE           container image for pyxis/enroot (srun --container-image); unset: no container
#   CONTAINER_MOUNTS extra comma-separated host:container mounts for the container
#   TORCHRUN        launcher command (default: torchrun on PATH, else .venv/bin/torchrun)
#   MASTER_ADDR/MASTER_PORT  rendezvous host/port (default: first node / derived from job id)
#   PYTHON          python for orchestration/cluster/nodelist.py without scontrol (default: python3)

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="${REPO_DIR:-$(dirname "$LAUNCH_DIR")}"
PYTHON="${PYTHON:-python3}"

log_msg() {
  echo "[launch $(date '+%F %T')] $*" >&2
}

# Hosts of a SLURM node list, one per line. scontrol knows every syntax SLURM emits; where it is
# missing or cannot run (containers, laptops, a SLURM client with no slurm.conf, tests)
# orchestration/cluster/nodelist.py (standard library only) handles ranges, padding, suffixes.
expand_nodelist() {
  local hosts
  if command -v scontrol >/dev/null 2>&1 && hosts="$(scontrol show hostnames "$1" 2>/dev/null)"; then
    [[ -z "$hosts" ]] || echo "$hosts"
  else
    (cd "$REPO_DIR" && "$PYTHON" -m orchestration.cluster.nodelist "$1")
  fi
}

# First host of the list; awk reads all input, so a long list cannot SIGPIPE the producer.
first_host() {
  expand_nodelist "$1" | awk 'NR == 1'
}

# Port from the job id (same rule as orchestration.cluster.slurm.master_port): 10000-29999 is below the
# kernel's ephemeral range, and two jobs sharing a node rarely collide.
master_port() {
  echo $((10000 + ${1:-0} % 20000))
}

# Ranks per node: explicit GPUS_PER_NODE, else what SLURM allocated ("h100:8" -> 8), else 1.
# A CPU partition (--gpus-per-node=0, or no GPUs) runs RANKS_PER_NODE ranks (default 1).
gpus_per_node() {
  local n="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-1}}}"
  n="${n##*:}"
  if [[ -z "$n" || "$n" == 0 ]]; then
    n="${RANKS_PER_NODE:-1}"
  fi
  echo "$n"
}

# The torchrun launcher as words: TORCHRUN, torchrun on PATH, or the repo's virtualenv.
resolve_torchrun() {
  if [[ -n "${TORCHRUN:-}" ]]; then
    read -r -a TORCHRUN_LAUNCHER <<<"$TORCHRUN"
  elif command -v torchrun >/dev/null 2>&1; then
    TORCHRUN_LAUNCHER=(torchrun)
  elif [[ -x "$REPO_DIR/.venv/bin/torchrun" ]]; then
    TORCHRUN_LAUNCHER=("$REPO_DIR/.venv/bin/torchrun")
  else
    TORCHRUN_LAUNCHER=("$PYTHON" -m torch.distributed.run)
  fi
}

# Check the config against the world size about to start (orchestration/check.py), so a batch
# that does not split over data parallelism fails here, in seconds, not after torchrun started.
# Arguments: WORLD_SIZE HYDRA_ARGS...; SKIP_CONFIG_CHECK=1 skips it.
check_config() {
  [[ -n "${SKIP_CONFIG_CHECK:-}" ]] && return 0
  local python="$PYTHON"
  if [[ -x "$REPO_DIR/.venv/bin/python" && "$python" == python3 ]]; then
    python="$REPO_DIR/.venv/bin/python"
  fi
  local world="$1"
  shift
  (cd "$REPO_DIR" && "$python" -m orchestration.check --world-size "$world" "$@")
}

# Environment that large Megatron-Core runs need; every value can be overridden beforehand.
setup_distributed_env() {
  # Megatron's TP/SP communication overlap needs kernels issued in program order on a single
  # hardware queue, so a collective is scheduled before the GEMM it overlaps with.
  export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
  # A rank whose collective fails or times out aborts its communicators and exits, so the job
  # dies (and can be requeued) instead of hanging until the time limit. Old name: NCCL_*.
  export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
  export NCCL_ASYNC_ERROR_HANDLING="${NCCL_ASYNC_ERROR_HANDLING:-1}"
  # TORCH_NCCL_BLOCKING_WAIT is deliberately left unset (0): it makes the host thread block on
  # every collective, which serialises Megatron's compute/communication overlap; the watchdog
  # with async error handling above already turns hangs into errors after the PG timeout.
  # On a watchdog timeout, every rank dumps its last collectives (PyTorch's flight recorder).
  # PyTorch renamed the recorder's variables: TORCH_NCCL_TRACE_BUFFER_SIZE -> TORCH_FR_BUFFER_SIZE
  # and TORCH_NCCL_DEBUG_INFO_TEMP_FILE -> TORCH_FR_DUMP_TEMP_FILE (torch 2.13 warns on every
  # rank when the old names are set). A torch older than the rename reads only the old names:
  # export TORCH_NCCL_TRACE_BUFFER_SIZE=2000 yourself in such an image.
  export TORCH_FR_BUFFER_SIZE="${TORCH_FR_BUFFER_SIZE:-2000}"
  export TORCH_NCCL_DUMP_ON_TIMEOUT="${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}"
  if [[ -n "${RUN_DIR:-}" ]]; then
    export TORCH_FR_DUMP_TEMP_FILE="${TORCH_FR_DUMP_TEMP_FILE:-$RUN_DIR/nccl_trace_rank_}"
  fi
  # Free NCCL send buffers when the collective finishes rather than via recordStream (less
  # memory held by the caching allocator; Megatron/NeMo set this too).
  export TORCH_NCCL_AVOID_RECORD_STREAMS="${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}"
  # Warnings and errors only; INFO prints topology per rank (use it when debugging the fabric).
  export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
  # Fabric settings are cluster specific: put them in conf/cluster/<name>.yaml `env:` or export
  # them before sbatch. Typical: NCCL_SOCKET_IFNAME=ib0 (bootstrap interface, excludes docker0/
  # lo), NCCL_IB_HCA=mlx5_0,mlx5_1,... (HCAs to use), NCCL_IB_GID_INDEX=3 (RoCE),
  # NCCL_IB_TIMEOUT=22 (longer IB retry timeout on large fabrics). Unset here: NCCL autodetects.
  # NCCL 2.12 installed its own SIGUSR1 handler and swallowed SLURM's warning; later versions
  # only do so when NCCL_PROXY_DUMP_SIGNAL is set, so keep that unset.
  # Logs reach the --open-mode=append files immediately, not at buffer flush.
  export PYTHONUNBUFFERED=1
  # torchrun would force 1 thread per rank; give each rank its share of the node's CPUs.
  local cpus="${SLURM_CPUS_PER_TASK:-$(nproc)}" ranks
  ranks="$(gpus_per_node)"
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$((cpus / ranks > 0 ? cpus / ranks : 1))}"
}

# TORCHRUN_CMD: what one node runs (launch/node.sh calls it on the node). No --node-rank: with
# the c10d rendezvous torchrun assigns node ranks in the order nodes join and ignores the flag
# (it warns "node_rank is only used for static rdzv_backend"), so global rank 0 may be on any
# node; the rendezvous store is on MASTER_ADDR. Overrides pass through as separate words.
build_torchrun_cmd() {
  local experiment="$1"
  shift
  local addr="${MASTER_ADDR:-}"
  if [[ -z "$addr" ]]; then
    addr="$(first_host "${SLURM_JOB_NODELIST:-localhost}")"
  fi
  local port="${MASTER_PORT:-$(master_port "${SLURM_JOB_ID:-0}")}"
  resolve_torchrun
  TORCHRUN_CMD=(
    "${TORCHRUN_LAUNCHER[@]}"
    --nnodes="${SLURM_NNODES:-1}"
    --nproc-per-node="$(gpus_per_node)"
    --rdzv-id="${SLURM_JOB_ID:-local}"
    --rdzv-backend=c10d
    --rdzv-endpoint="$addr:$port"
    --max-restarts="${MAX_RESTARTS:-0}"
    -m orchestration.train
    "experiment=$experiment"
    "run_dir=${RUN_DIR:-${RUN_ROOT:-runs}/$experiment}"
    "$@"
  )
}

print_torchrun_cmd() {
  build_torchrun_cmd "$@"
  printf '%q ' "${TORCHRUN_CMD[@]}"
  echo
}

# SRUN_CMD: one task per node running launch/node.sh, in a pyxis container when IMAGE is set.
build_srun_cmd() {
  SRUN_CMD=(srun --nodes="${SLURM_NNODES:-1}" --ntasks-per-node=1 --kill-on-bad-exit=1)
  # Since Slurm 22.05 srun no longer inherits sbatch's --cpus-per-task; pass it on.
  if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
    SRUN_CMD+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
  fi
  if [[ -n "${IMAGE:-}" ]]; then
    # The checkout is mounted at the same path, so code, conf/ and runs/ are the host's.
    SRUN_CMD+=(--container-image="$IMAGE"
      --container-mounts="$REPO_DIR:$REPO_DIR${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}"
      --container-workdir="$REPO_DIR")
  fi
  SRUN_CMD+=(bash "$LAUNCH_DIR/node.sh" "$@")
}

print_srun_cmd() {
  build_srun_cmd "$@"
  printf '%q ' "${SRUN_CMD[@]}"
  echo
}

# run_forwarding_stop MODE COMMAND...: run COMMAND in the background and return its status. A
# SIGUSR1 or SIGTERM to this shell means "checkpoint and stop": SIGUSR1 goes to COMMAND itself
# (MODE=self: srun, which passes it on to its tasks, launch/node.sh) or to COMMAND's children
# (MODE=children: torchrun's ranks), and again every STOP_RESEND_S seconds (default 5) until
# COMMAND exits. Why this is needed:
# - SLURM delivers a signal other than SIGKILL (scancel --signal, --signal=USR1@N, scancel's
#   SIGTERM) only to the processes slurmstepd started itself, the tasks, not to their children
#   (proctrack/cgroup's "only signal slurm tasks unless signal is SIGKILL"). torchrun starts
#   each rank in a session of its own, so nothing SLURM sends reaches a rank on its own.
# - A rank ignores SIGUSR1 (inherited from here: a rank killed by it could not checkpoint)
#   until its handler is installed, after the model and data are built; a warning that lands
#   during that start-up would be lost, so it is sent again until the command is gone.
# The handler in every rank keeps the first signal; the ranks agree on the step in the step's
# all-reduce, checkpoint it and exit 0, and rank 0 requeues the job.
run_forwarding_stop() {
  local mode="$1" child status=0 told=""
  shift
  trap '' USR1  # COMMAND inherits "ignored"; SIG_DFL would kill it (torchrun has no handler)
  "$@" &
  child=$!
  STOP_SIGNAL=""
  trap 'STOP_SIGNAL=${STOP_SIGNAL:-USR1}' USR1
  trap 'STOP_SIGNAL=${STOP_SIGNAL:-TERM}' TERM
  while :; do
    wait "$child" && status=0 || status=$?
    kill -0 "$child" 2>/dev/null || break  # it exited: status is its own
    while [[ -n "$STOP_SIGNAL" ]] && kill -0 "$child" 2>/dev/null; do
      if [[ -z "$told" ]]; then
        log_msg "SIG$STOP_SIGNAL: asking $([[ $mode == self ]] && echo "$1" ||
          echo "the ranks of $1") (pid $child) to checkpoint and stop"
        told=1
      fi
      if [[ "$mode" == self ]]; then
        kill -USR1 "$child" 2>/dev/null || true
      else
        pkill -USR1 -P "$child" 2>/dev/null || true
      fi
      sleep "${STOP_RESEND_S:-5}" &
      wait $! 2>/dev/null || true
    done
  done
  wait "$child" 2>/dev/null && status=0 || status=$?
  trap - USR1 TERM
  return "$status"
}

# Newest complete checkpoint of a run dir (orchestration/checkpoint/layout.py).
latest_checkpoint() {
  local dir latest=""
  for dir in "$1"/checkpoints/step_*; do
    if [[ -d "$dir" && "$dir" != *.tmp && -f "$dir/checkpoint_info.json" ]]; then
      latest="$dir"
    fi
  done
  [[ -n "$latest" ]] && echo "$latest"
}

# Requeue from the batch shell (on the host, where scontrol exists) when rank 0 could not,
# e.g. inside a container: orchestration.cluster.slurm.requeue_job leaves this file behind.
requeue_if_requested() {
  local request="$1/requeue.request"
  [[ -f "$request" ]] || return 0
  rm -f "$request"
  if command -v scontrol >/dev/null 2>&1 && [[ -n "${SLURM_JOB_ID:-}" ]]; then
    log_msg "training asked for a requeue; scontrol requeue $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
  else
    log_msg "training asked for a requeue but scontrol is unavailable; resubmit by hand"
  fi
}

# The body of every sbatch script: EXPERIMENT [OVERRIDES...].
run_job() {
  if (($# < 1)); then
    echo "usage: sbatch launch/<script>.sbatch EXPERIMENT [HYDRA_OVERRIDES...]" >&2
    return 2
  fi
  export RUN_DIR="${RUN_DIR:-${RUN_ROOT:-runs}/$1}"
  export GPUS_PER_NODE MASTER_ADDR MASTER_PORT
  GPUS_PER_NODE="$(gpus_per_node)"
  MASTER_ADDR="${MASTER_ADDR:-$(first_host "$SLURM_JOB_NODELIST")}"
  MASTER_PORT="${MASTER_PORT:-$(master_port "$SLURM_JOB_ID")}"
  if [[ -z "$MASTER_ADDR" ]]; then
    log_msg "cannot find the first host of SLURM_JOB_NODELIST=${SLURM_JOB_NODELIST}"
    return 1
  fi
  setup_distributed_env
  check_config $((${SLURM_NNODES:-1} * GPUS_PER_NODE)) "experiment=$1" "run_dir=$RUN_DIR" \
    "${@:2}" || return 2
  mkdir -p "$RUN_DIR"
  log_msg "job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0}: ${SLURM_NNODES} nodes" \
    "x ${GPUS_PER_NODE} GPUs (${SLURM_JOB_NODELIST}); master ${MASTER_ADDR}:${MASTER_PORT};" \
    "run dir ${RUN_DIR}; image ${IMAGE:-none}"
  build_srun_cmd "$@"
  local rc=0
  # A signal to this shell (scancel --batch/--full, --signal=B:USR1@N, scancel's SIGTERM) would
  # otherwise kill it and the job with it: pass it on as SIGUSR1 through srun to node.sh.
  run_forwarding_stop self "${SRUN_CMD[@]}" || rc=$?
  log_msg "srun exited with status $rc"
  requeue_if_requested "$RUN_DIR"
  return "$rc"
}
