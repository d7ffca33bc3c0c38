#!/usr/bin/env bash
# The tiny rehearsal of the paper grid through the SLURM profile on the one-node test cluster, with
# the runs logged live to the tracking server (issue #25, item 5). It follows docs/cluster.md as a
# user would: a copy of the profile with account and partition filled in and squeue as the status
# command (the test cluster has no accounting), the server recipe with --allowed-hosts.
#
#   benchmarks/slurm_rehearsal.sh [--cut] STATE [targets...]
#     --cut: the test's sample (config/rehearsal_cut.yaml, 80 jobs) instead of the whole rehearsal
# Root, SLURM installed (tests/cluster/start_slurm.sh --install), and the python on PATH with mmrepro
# and the SLURM plugin (pip install -e '.[slurm]'). Everything goes under STATE: the cluster's state
# and logs (cluster/), the profile copy (profile/), the request overlay (requests.yaml), the run
# itself in work/ (its results in work/results_rehearsal/, the server's store there too), and
# snakemake.log, jobs.txt (`scontrol show job` of every job), load.txt (loadavg each minute),
# mlflow_check.txt and summary.txt (wall seconds, jobs finished and failed, the SLURM jobs' queue,
# run and notice times, runs on the server, load).
# Stops its cluster and server on exit.
set -euo pipefail
configs=(config/config.yaml config/paper.yaml config/rehearsal.yaml)
if [[ "${1:-}" == "--cut" ]]; then configs+=(config/rehearsal_cut.yaml); shift; fi
state=$(realpath -m "${1:?usage: benchmarks/slurm_rehearsal.sh [--cut] STATE [targets...]}"); shift
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
configs=("${configs[@]/#/$repo/}")
work="$state/work"
results="$work/results_rehearsal"
[[ ! -e "$work" ]] || { echo "slurm_rehearsal.sh: $work exists; give a new STATE" >&2; exit 2; }
mkdir -p "$results"

server="" sampler=""
stop() {
  [[ -z "$sampler" ]] || kill "$sampler" 2>/dev/null || true
  if [[ -n "$server" ]]; then kill -- -"$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
  if [[ -n "${SLURM_CONF:-}" ]]; then
    [[ -s "$state/jobs.txt" ]] || scontrol show job -o > "$state/jobs.txt" 2>/dev/null || true
    squeue -h -o %i | xargs -r scancel || true   # jobs left by an interrupted run (the cluster is ours alone)
  fi
  tests/cluster/start_slurm.sh --stop "$state/cluster"
}
trap stop EXIT
tests/cluster/start_slurm.sh "$state/cluster"
export SLURM_CONF=/etc/slurm/slurm.conf

# the profile, edited as docs/cluster.md tells a user (account: any, the cluster keeps no accounts)
cp -r workflow/profiles/slurm "$state/profile"
sed -i 's/"your_account"/mmrepro_rehearsal/; s/"your_partition"/mmrepro/; s/^# slurm-status-command: squeue/slurm-status-command: squeue/' \
  "$state/profile/config.yaml"
grep -q '^slurm-status-command: squeue' "$state/profile/config.yaml" || { echo "the profile's edit failed" >&2; exit 2; }

# paper.yaml's memory requests are the REAL data's (up to 46 GB: never scheduled on this node, and
# 16 GB ones one at a time); the stand-ins are tiny, so every request is capped at the node's memory
# per CPU (the overlay says which; paper.yaml is left as it is)
read -r node_mb node_cpus < <(sinfo -h -N -o "%m %c" | head -1)
python benchmarks/slurm_rehearsal.py requests --cap-mb $(( node_mb / node_cpus )) "${configs[@]:1}" \
  > "$state/requests.yaml" 2> "$state/requests.log"
configs+=("$state/requests.yaml")

# docs/cluster.md's server, on a free port, its store in the run's results folder; without its
# `--app-name mmrepro` (the UI's pages only, and an environment installed before that entry point
# lacks it): the jobs use the tracking API alone
port=$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
set -m   # the server in its own process group, stopped by that id
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_SQLALCHEMYSTORE_POOLCLASS=NullPool \
  mlflow server --host "$(hostname)" --port "$port" --workers 2 \
  --allowed-hosts "$(hostname),$(hostname):$port" \
  --backend-store-uri "sqlite:///$results/mlflow.db" --artifacts-destination "$results/mlartifacts" \
  > "$state/server.log" 2>&1 &
server=$!
set +m
export MLFLOW_TRACKING_URI="http://$(hostname):$port"
for _ in $(seq 150); do
  curl -sf -o /dev/null "$MLFLOW_TRACKING_URI/health" && break
  kill -0 "$server" 2>/dev/null || break
  sleep 2
done
curl -sf -o /dev/null "$MLFLOW_TRACKING_URI/health" || { echo "the server did not start: $state/server.log" >&2; exit 3; }

(while true; do echo "$(date -u +%H:%M:%S) $(cat /proc/loadavg)"; sleep 60; done) > "$state/load.txt" &
sampler=$!
start=$(date +%s.%N)
rc=0
(cd "$work" && python -m snakemake -s "$repo/workflow/Snakefile" --profile "$state/profile" --keep-going "$@" \
   --configfile "${configs[@]}") > "$state/snakemake.log" 2>&1 || rc=$?
wall=$(python -c "import time; print(round(time.time() - $start))")
scontrol show job -o > "$state/jobs.txt"   # the controller keeps finished jobs for MinJobAge (an hour)
python benchmarks/slurm_rehearsal.py check "$results" --uri "$MLFLOW_TRACKING_URI" > "$state/mlflow_check.txt" || rc=$(( rc ? rc : 4 ))
{
  echo "snakemake wall ${wall} s: $(grep -E 'steps \([0-9]+%\) done' "$state/snakemake.log" | tail -1)"
  python benchmarks/slurm_rehearsal.py jobs "$state/jobs.txt" "$state/snakemake.log" "$work"
  head -1 "$state/mlflow_check.txt"
  echo "load average (1, 5, 15 min) at start: $(head -1 "$state/load.txt" | cut -d' ' -f2-4), at end: $(cut -d' ' -f1-3 /proc/loadavg); exit $rc"
} | tee "$state/summary.txt"
exit $rc
