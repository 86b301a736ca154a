#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine (root; Debian's slurm-wlm and munge installed):
# munged, slurmctld and slurmd, one partition `debug` with all CPUs, a GPU GRES backed by
# /dev/null so that --gres/--gpus requests are accepted (measured with Debian's SLURM 22.05.8).
# Writes the daemons' pids to $SLURM_CI_DIR/pids for .ci/slurm-down.sh. About 10 s.
set -euo pipefail
DIR=${SLURM_CI_DIR:-/tmp/hcformer-slurm}
mkdir -p "$DIR" /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
H=$(hostname)
CPUS=$(nproc)
MEM=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))

cat > /etc/slurm/slurm.conf <<CONF
ClusterName=local
SlurmctldHost=$H
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
JobRequeue=1
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=600
KillWait=5
NodeName=$H CPUs=$CPUS RealMemory=$MEM Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=$H Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
echo "NodeName=$H Name=gpu File=/dev/null" > /etc/slurm/gres.conf

if [ ! -s /etc/munge/munge.key ]; then
    if command -v mungekey > /dev/null; then mungekey -c -f -k /etc/munge/munge.key; else create-munge-key -f; fi
fi
chown munge:munge /etc/munge/munge.key /run/munge
chmod 400 /etc/munge/munge.key
: > "$DIR/pids"
if ! pgrep -u munge munged > /dev/null; then
    su -s /bin/sh munge -c /usr/sbin/munged
    pgrep -u munge -n munged >> "$DIR/pids"
fi
/usr/sbin/slurmctld -i
/usr/sbin/slurmd
for _ in $(seq 1 100); do
    [ -s "$DIR/slurmctld.pid" ] && [ -s "$DIR/slurmd.pid" ] && break
    sleep 0.1
done
cat "$DIR/slurmctld.pid" "$DIR/slurmd.pid" >> "$DIR/pids"
for _ in $(seq 1 100); do
    state=$(sinfo -h -N -o %t 2>/dev/null || true)
    case "$state" in idle*|mix*|alloc*) echo "slurm-up: node $H $state (pids $(tr '\n' ' ' < "$DIR/pids"))"; exit 0 ;; esac
    sleep 0.2
done
echo "slurm-up: the node did not come up; see /var/log/slurm/" >&2
exit 1
