#!/usr/bin/env bash
# Start a real one-node Slurm (munged, slurmctld, slurmd) on this Debian machine, as root, for the
# Slurm tests. Idempotent: packages, key and config are made once; running daemons are left alone.
# Everything Slurm writes lives in $MEGATRONLITE_SLURM_DIR; clients need SLURM_CONF=$DIR/slurm.conf.
# .ci/slurm_down.sh stops the daemons again.
set -euo pipefail
DIR=${MEGATRONLITE_SLURM_DIR:-/tmp/megatronlite-slurm}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

die() { echo "slurm_up: $*" >&2; exit 1; }
alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

[[ $(id -u) == 0 ]] || die "needs root to install and run the Slurm daemons"
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
    || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || die "slurmctld/slurmd/sbatch/munged missing and no apt-get to install them"
    echo "slurm_up: installing slurmctld slurmd slurm-client munge"
    apt-get update -qq >/dev/null || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null \
        || die "apt-get install slurmctld slurmd slurm-client munge failed"
fi

KEY=/etc/munge/munge.key
if [[ ! -s $KEY ]]; then
    mkdir -p /etc/munge
    head -c 1024 /dev/urandom >"$KEY"
fi
chown munge:munge /etc/munge "$KEY"
chmod 400 "$KEY"
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown -R munge:munge /run/munge /var/log/munge /var/lib/munge
alive /run/munge/munged.pid || runuser -u munge -- munged || die "munged did not start"

mkdir -p "$DIR/state" "$DIR/spool"
HOST=$(hostname)
NODE=$(slurmd -C | head -n 1)  # this machine's real CPUs, cores and memory, as slurmd will see them
cat >"$CONF" <<EOF
ClusterName=megatronlite
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
# a step credential lives 20 s (default 120): Slurm holds a requeued job back that long (cred_expire + 1),
# so the requeue test waits seconds, not minutes, and never starts the job while its old credential is revoked
AuthInfo=cred_expire=20
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
$NODE State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

alive "$DIR/slurmctld.pid" || slurmctld -f "$CONF" || die "slurmctld did not start (see $DIR/slurmctld.log)"
alive "$DIR/slurmd.pid" || slurmd -f "$CONF" || die "slurmd did not start (see $DIR/slurmd.log)"

for _ in $(seq 60); do
    if [[ $(sinfo -h -N -o %t 2>/dev/null) == idle* ]]; then
        echo "slurm_up: node $HOST idle; export SLURM_CONF=$CONF"
        exit 0
    fi
    sleep 1
done
die "the node did not become idle in 60 s: $(sinfo -N 2>&1 | tail -n 1) (see $DIR/*.log)"
