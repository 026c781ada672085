#!/usr/bin/env bash
# Start a single-node Slurm (slurmctld + slurmd + munge) on this machine, for testing
# `difstudy sweep --executor slurm` against the real thing. Needs root and Debian's slurm-wlm
# (`apt-get install -y slurm-wlm`; .ci/run installs it). Prints `slurm: up` and exits 0 once
# `sinfo` answers and the node is idle, or explains what failed and exits 1.
set -euo pipefail
command -v slurmctld >/dev/null || { echo "slurm: slurmctld missing; apt-get install -y slurm-wlm" >&2; exit 1; }
host="$(hostname -s)"
grep -qE "[[:space:]]$host([[:space:]]|\$)" /etc/hosts || echo "127.0.0.1 $host" >> /etc/hosts
cpus="$(nproc)"
mem="$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))"
mkdir -p /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /etc/slurm
chown -R slurm:slurm /var/spool/slurmctld /var/log/slurm
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=local
SlurmctldHost=$host
SlurmUser=slurm
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
pgrep -x munged >/dev/null || /usr/sbin/munged --force
pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld
pgrep -x slurmd >/dev/null || /usr/sbin/slurmd
for _ in $(seq 60); do
  if sinfo -h -o "%t" 2>/dev/null | grep -qE "idle|mix"; then echo "slurm: up ($host, $cpus CPUs)"; exit 0; fi
  sleep 1
done
echo "slurm: the node did not come up within 60 s; see /var/log/slurm/*.log" >&2
tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 1
