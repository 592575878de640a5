#!/usr/bin/env bash
# A real 2-node SLURM cluster on this one machine, for the `slurm` tests (tests/test_slurm_*.py)
# and for trying the sbatch scripts without a cluster. Needs root and Debian's slurm-wlm + munge
# (SLURM 22.05; INSTALL=1 apt-get installs them). Idempotent: a cluster already up is reused.
#   sudo launch/testcluster/start.sh          # prints: export SLURM_CONF=<state dir>/slurm.conf
#   eval "$(sudo launch/testcluster/start.sh)" && sinfo
#   sudo launch/testcluster/stop.sh           # stops the daemons, cancels jobs, keeps the logs
# One munged, one slurmctld and two slurmd (`slurmd -N n1`, `-N n2`), all as root, each node at
# 127.0.0.1 on a port of its own with its own spool dir, in one partition `cpu` (Default). Process
# tracking is proctrack/cgroup (cgroup v1 where mounted, else v2), so a signal or kill reaches
# every process of a step, including torchrun's ranks, which run in sessions of their own (with
# proctrack/pgid they would be missed). No accounting: job states come from squeue/scontrol.
# Environment: SLURM_TESTCLUSTER_DIR (state dir, default /tmp/open-pretrain-slurm), CPUS (per
# node, default 4: two jobs of 2 ranks fit), KILL_WAIT (s between SIGTERM and SIGKILL, default 120).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE="${SLURM_TESTCLUSTER_DIR:-/tmp/open-pretrain-slurm}"
CONF="$STATE/slurm.conf"
export SLURM_CONF="$CONF"
NODES=(n1 n2)

say() { echo "[testcluster] $*" >&2; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v munged >/dev/null; then
    return 0
  fi
  if [[ -z "${INSTALL:-}" ]]; then
    say "slurmctld/munged not found: apt-get install slurm-wlm munge (or run with INSTALL=1)"
    exit 1
  fi
  say "installing slurm-wlm and munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurm-wlm munge >/dev/null
}

# True when `sinfo` answers and every node is idle (or busy: mixed/allocated) and responding.
cluster_up() {
  [[ -f "$CONF" ]] || return 1
  local states
  states="$(timeout 10 sinfo -h -N -o '%N %t' 2>/dev/null)" || return 1
  [[ "$(grep -cE '^n[12] (idle|mix|alloc)$' <<<"$states")" == 2 ]]
}

start_munge() {
  if timeout 5 munge -n 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1; then
    return 0
  fi
  if [[ ! -s /etc/munge/munge.key ]]; then
    mungekey --create --keyfile=/etc/munge/munge.key
  fi
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge /etc/munge
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do
    timeout 5 munge -n 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  say "munged did not come up"
  exit 1
}

# A free TCP port on 127.0.0.1 (the kernel's choice), so two clusters or other tests never clash.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

cgroup_plugin() {
  if [[ -d /sys/fs/cgroup/freezer ]]; then echo cgroup/v1; else echo cgroup/v2; fi
}

write_config() {
  mkdir -p "$STATE/ctld" "$STATE/log" "$STATE/spool"
  local host ctld_port port mem
  host="$(hostname -s)"
  ctld_port="$(free_port)"
  # Leave half of the machine's memory to everything else; SLURM only books it, nothing enforces.
  mem=$(($(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) / 4))
  cat >"$STATE/cgroup.conf" <<EOF
CgroupPlugin=$(cgroup_plugin)
CgroupAutomount=yes
ConstrainCores=no
ConstrainRAMSpace=no
ConstrainDevices=no
EOF
  cat >"$CONF" <<EOF
# Written by launch/testcluster/start.sh: a 2-node test cluster on one host.
ClusterName=opentest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again only once its step credentials expired: 120 s by default,
# 10 s here so that the requeue tests do not sit idle.
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/cgroup
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Schedule every second (default: 60 s main loop, 30 s backfill), so tests do not wait.
SchedulerParameters=sched_interval=1,bf_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
# Nodes say CPUs=${CPUS:-4} whatever the host has; several test jobs share the cores.
SlurmdParameters=config_overrides
JobRequeue=1
# Seconds between the SIGTERM of scancel or of the time limit and SIGKILL: the ranks' last step
# and stop checkpoint must fit. 30 s is SLURM's default; a CPU shared with other work saves slowly.
KillWait=${KILL_WAIT:-120}
# Finished jobs stay visible to scontrol/squeue for 10 minutes (there is no accounting).
MinJobAge=600
InactiveLimit=0
Waittime=0
EOF
  for node in "${NODES[@]}"; do
    port="$(free_port)"
    echo "NodeName=$node NodeAddr=127.0.0.1 NodeHostname=$host Port=$port CPUs=${CPUS:-4}" \
      "RealMemory=$mem State=UNKNOWN" >>"$CONF"
  done
  echo "PartitionName=cpu Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE" \
    "State=UP OverSubscribe=NO" >>"$CONF"
}

start_daemons() {
  "$HERE/stop.sh" --quiet || true
  write_config
  slurmctld -f "$CONF" -c   # -c: no jobs from an earlier cluster
  for node in "${NODES[@]}"; do
    mkdir -p "$STATE/spool/$node"
    slurmd -f "$CONF" -N "$node"
  done
}

# The batch scripts take MASTER_ADDR from the node list (n1), as on a real cluster, where node
# names resolve; here they are names for 127.0.0.1.
resolve_node_names() {
  local node
  for node in "${NODES[@]}"; do
    if ! getent hosts "$node" >/dev/null; then
      echo "127.0.0.1 $node  # open-pretrain test cluster (launch/testcluster/start.sh)" >>/etc/hosts
    fi
  done
}

wait_idle() {
  local deadline=$((SECONDS + ${START_TIMEOUT:-60}))
  until cluster_up; do
    if ((SECONDS > deadline)); then
      say "nodes not idle after ${START_TIMEOUT:-60}s; sinfo:"
      sinfo -N >&2 || true
      tail -n 20 "$STATE"/log/*.log >&2 || true
      exit 1
    fi
    # A node that registered DOWN (e.g. after an unclean stop) is brought back.
    scontrol update nodename=n1,n2 state=resume >/dev/null 2>&1 || true
    sleep 0.5
  done
}

if [[ $EUID -ne 0 ]]; then
  say "needs root (slurmd runs jobs as their owner and manages cgroups)"
  exit 1
fi
install_packages
start_munge
resolve_node_names
if cluster_up; then
  say "already up ($CONF)"
else
  start_daemons
  wait_idle
  say "up: $(sinfo -h -N -o '%N=%t' | tr '\n' ' ')($CONF)"
fi
echo "export SLURM_CONF=$CONF"
