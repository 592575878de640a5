#!/usr/bin/env bash
# Submit an sbatch script with a cluster preset's resources and environment.
#   launch/submit.sh CLUSTER SCRIPT [ARGS...]
#   launch/submit.sh k2_cluster launch/k2_stage1.sbatch
#   launch/submit.sh k2_cluster launch/train.sbatch llama_1b train.max_steps=1000
#   DRY_RUN=1 launch/submit.sh k2_cluster launch/train.sbatch k2   # print, don't submit
# The preset (conf/cluster/CLUSTER.yaml) becomes sbatch options, which override the script's
# #SBATCH headers, and exported variables (IMAGE, GPUS_PER_NODE, NCCL_*...), which sbatch
# passes into the job. Run from the project environment (launch/cluster.py needs PyYAML).
set -euo pipefail
if (($# < 2)); then
  sed -n '2,9p' "$0" >&2
  exit 2
fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cluster="$1"
script="$2"
shift 2
PYTHON="${PYTHON:-python3}"
if [[ -x .venv/bin/python && "$PYTHON" == python3 ]]; then
  PYTHON=.venv/bin/python
fi
options="$("$PYTHON" launch/cluster.py "$cluster" --sbatch-args)"
exports="$("$PYTHON" launch/cluster.py "$cluster" --exports)"
mapfile -t sbatch_options <<<"$options"
eval "$exports"
cmd=(sbatch "${sbatch_options[@]}" "$script" "$@")
if [[ -n "${DRY_RUN:-}" ]]; then
  printf '%s\n' "$exports"
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
