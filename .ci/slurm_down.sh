#!/usr/bin/env bash
# Stop the daemons .ci/slurm_up.sh started, by the PIDs in their pid files. Safe to run twice.
set -uo pipefail
DIR=${MEGATRONLITE_SLURM_DIR:-/tmp/megatronlite-slurm}
for pidfile in "$DIR/slurmd.pid" "$DIR/slurmctld.pid" /run/munge/munged.pid; do
    [[ -s $pidfile ]] || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
done
echo "slurm_down: stopped"
