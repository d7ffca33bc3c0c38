#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for tests/test_slurm.py (root needed).
#   tests/cluster/start_slurm.sh --install   install Debian's slurm-wlm and munge first
#   tests/cluster/start_slurm.sh [STATE_DIR] start munged, slurmctld and slurmd (default /tmp/mmrepro-slurm)
#   tests/cluster/start_slurm.sh --stop [STATE_DIR]
# The node is localhost with this machine's CPUs and memory, one partition `mmrepro`, no accounting
# database. Prints `export SLURM_CONF=...` for the shell that submits jobs.
set -euo pipefail

if [[ "${1:-}" == "--install" ]]; then
  shift
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y --no-install-recommends slurm-wlm munge
fi
stop=0
if [[ "${1:-}" == "--stop" ]]; then stop=1; shift; fi
STATE="${1:-/tmp/mmrepro-slurm}"
CONF="$STATE/slurm.conf"

if [[ $stop == 1 ]]; then
  for pidfile in "$STATE"/slurmd.pid "$STATE"/slurmctld.pid "$STATE"/munged.pid; do
    [[ -f "$pidfile" ]] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  exit 0
fi

[[ $(id -u) == 0 ]] || { echo "start_slurm.sh: needs root (slurmd runs jobs as their users)" >&2; exit 3; }
for cmd in slurmctld slurmd munged sbatch; do
  command -v "$cmd" >/dev/null || { echo "start_slurm.sh: $cmd not found; run with --install" >&2; exit 3; }
done

mkdir -p "$STATE/spool" "$STATE/state" "$STATE/munge" /run/munge /etc/munge
# munge: one key, a socket in the usual place (the SLURM clients look there)
[[ -s /etc/munge/munge.key ]] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none; }
chmod 400 /etc/munge/munge.key
if ! munge -n >/dev/null 2>&1; then
  munged --force --pid-file="$STATE/munged.pid" --log-file="$STATE/munged.log" --seed-file="$STATE/munge/seed"
fi

CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
NODE=$(hostname -s)
cat > "$CONF" <<CONF
ClusterName=mmrepro
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MinJobAge=3600
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=mmrepro Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$CONF"
slurmctld -f "$CONF"
slurmd -f "$CONF"
for _ in $(seq 60); do
  if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
    echo "export SLURM_CONF=$CONF"
    exit 0
  fi
  sleep 1
done
echo "start_slurm.sh: the node did not become idle; see $STATE/slurmctld.log and $STATE/slurmd.log" >&2
exit 4
