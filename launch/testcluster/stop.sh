#!/usr/bin/env bash
# Stop the test cluster of launch/testcluster/start.sh: cancel its jobs, then stop slurmd and
# slurmctld (their pid files), waiting until they are gone. The state dir and logs are kept.
# munged is left running (other SLURM tools may use it); MUNGE=1 stops it too.
#   sudo launch/testcluster/stop.sh [--quiet]
set -euo pipefail
STATE="${SLURM_TESTCLUSTER_DIR:-/tmp/open-pretrain-slurm}"
export SLURM_CONF="$STATE/slurm.conf"
quiet="${1:-}"

say() { [[ "$quiet" == --quiet ]] || echo "[testcluster] $*" >&2; }

# Wait up to 20 s for a pid to exit, then SIGKILL it.
stop_pid() {
  local pid="$1"
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 200); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null || true
}

if [[ -f "$SLURM_CONF" ]] && timeout 10 squeue -h >/dev/null 2>&1; then
  if [[ -n "$(squeue -h -o %i)" ]]; then
    say "cancelling jobs: $(squeue -h -o %i | tr '\n' ' ')"
    squeue -h -o %A | xargs -r scancel
    for _ in $(seq 100); do
      [[ -z "$(squeue -h -o %i)" ]] && break
      sleep 0.2
    done
  fi
fi
shopt -s nullglob
for pidfile in "$STATE"/slurmd-*.pid "$STATE"/slurmctld.pid; do
  pid="$(cat "$pidfile" 2>/dev/null || true)"
  if [[ -n "$pid" && -d "/proc/$pid" ]] && grep -q slurm "/proc/$pid/comm" 2>/dev/null; then
    say "stopping $(cat "/proc/$pid/comm") (pid $pid)"
    stop_pid "$pid"
  fi
  rm -f "$pidfile"
done
if [[ -n "${MUNGE:-}" && -f /run/munge/munged.pid ]]; then
  stop_pid "$(cat /run/munge/munged.pid)"
fi
say "stopped (state and logs kept in $STATE)"
