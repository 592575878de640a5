#!/usr/bin/env bash
# One device check of the GPU path, at most ~8 minutes on one H100/H200 (NGC PyTorch image, or
# a CUDA torch with megatron-core and Transformer Engine installed), run from the repo root:
#
#   bash bench/gpu_check.sh              # the GPU check
#   bash bench/gpu_check.sh --dry-run    # the same steps on CPU with the tiny model (tested)
#
# It prints, in order: the versions and the layer spec a job gets; llama_1b MFU at sequence
# 4096 over a micro-batch x recompute grid, best first, in both MFU conventions; the driver's
# step against a bare Megatron-Core loop with the same settings, with each one's device syncs
# per step; the checkpoint stall, synchronous and asynchronous; and a summary table to paste
# into docs/benchmarks.md. Results (JSON and the table) go to $OUT_DIR (default: a new
# directory under runs/gpu_check/). Grid and sizes can be changed through the variables below.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
PY="${PYTHON:-python}"
[[ -x .venv/bin/python && -z "${PYTHON:-}" ]] && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
OUT_DIR="${OUT_DIR:-runs/gpu_check/$(date +%Y%m%dT%H%M%S)}"
mkdir -p "$OUT_DIR"

if [[ $DRY_RUN == 1 ]]; then  # CPU, tiny model, one repetition of everything
  DEVICE=cpu MODEL=tiny
  MFU_ARGS=(--seq-length 128 --global-batch-size 8 --micro-batch-sizes "${MBS:-4}"
            --recompute ${RECOMPUTE:-none} --steps 1 --warmup 1)
  OVERHEAD_ARGS=(--steps 2 --block 1 --warmup 1 --micro-batch-size 4 --global-batch-size 8)
  STALL_ARGS=(--small --reps 1 --steps-per-block 1 --micro-batch-size 4 --global-batch-size 8)
else
  DEVICE=cuda MODEL=llama_1b
  MFU_ARGS=(--seq-length 4096 --global-batch-size "${GBS:-16}"
            --micro-batch-sizes ${MBS:-4 8} --recompute ${RECOMPUTE:-none selective}
            --steps "${STEPS:-6}" --warmup 2)
  OVERHEAD_ARGS=(--steps 20 --block 5 --warmup 3 --micro-batch-size 2 --global-batch-size 8
                 model.seq_length=4096)
  STALL_ARGS=(--small --reps 2 --steps-per-block 4 --micro-batch-size 2
              --global-batch-size 8 model.seq_length=2048)
fi
# A GPU whose Transformer Engine does not import fails loudly (model.layer_spec=auto); set
# LAYER_SPEC=local to measure Megatron's local spec instead.
SPEC=(model.layer_spec="${LAYER_SPEC:-auto}")

section() { printf '\n==== %s (%s)\n' "$1" "$(date +%T)"; }

section "versions and layer spec"
"$PY" bench/gpu_summary.py versions "$OUT_DIR/versions.json" "$DEVICE"

if [[ $DRY_RUN == 0 ]]; then
  section "GPU-only tests (TE spec names, sync-free loss copy)"
  "$PY" -m pytest -q -m gpu tests/test_gpu_path.py || echo "GPU tests FAILED (see above)"
fi

section "MFU grid: $MODEL, best first, both conventions"
"$PY" bench/mfu.py --device "$DEVICE" --model "$MODEL" "${MFU_ARGS[@]}" \
  --json-out "$OUT_DIR/mfu.json" "${SPEC[@]}"

section "driver step vs bare Megatron-Core loop, device syncs per step"
"$PY" bench/step_overhead.py --device "$DEVICE" --model "$MODEL" --no-parts \
  "${OVERHEAD_ARGS[@]}" --json-out "$OUT_DIR/overhead.json" "${SPEC[@]}"

section "checkpoint stall: synchronous vs async save"
"$PY" bench/checkpoint_stall.py --device "$DEVICE" --model "$MODEL" "${STALL_ARGS[@]}" \
  --json-out "$OUT_DIR/checkpoint.json" "${SPEC[@]}"

section "summary (paste into docs/benchmarks.md)"
"$PY" bench/gpu_summary.py table "$OUT_DIR" | tee "$OUT_DIR/summary.md"
