#!/usr/bin/env bash
# A throw-away single-node SLURM cluster on this machine, for the tests in tests/test_slurm.py (and for trying the
# sbatch scripts by hand). Needs root and a Debian/Ubuntu apt; installs slurmctld, slurmd, slurm-client, munge
# when they are missing (~10-30 s from a mirror). Exit status 3: cannot install here (not root, no apt, no mirror).
#
#   launch/local_slurm.sh start DIR   # writes DIR/slurm.conf, starts munged, slurmctld, slurmd; prints the export
#   export SLURM_CONF=DIR/slurm.conf  # then: sinfo, sbatch, squeue, scontrol, scancel
#   launch/local_slurm.sh stop DIR    # scontrol shutdown; stops munged if this script started it
#   launch/local_slurm.sh config DIR  # only writes DIR/slurm.conf (to read it, or to start the daemons by hand)
#
# The node is called `localhost` (slurmd -N), with every CPU of the machine; one partition `debug`.
set -euo pipefail

action=${1:?usage: local_slurm.sh start|stop|config DIR}
dir=$(realpath -m "${2:?usage: local_slurm.sh start|stop|config DIR}")
export SLURM_CONF=$dir/slurm.conf

install_if_missing() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return
    fi
    [ "$(id -u)" = 0 ] || { echo "local_slurm.sh: installing SLURM needs root" >&2; exit 3; }
    command -v apt-get >/dev/null || { echo "local_slurm.sh: no apt-get to install SLURM with" >&2; exit 3; }
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            slurmctld slurmd slurm-client munge >/dev/null; }; then
        echo "local_slurm.sh: apt-get could not install slurmctld slurmd slurm-client munge" >&2
        exit 3
    fi
}

write_config() {
    mkdir -p "$dir"/{run,spool/slurmd,state,log}
    cat >"$SLURM_CONF" <<EOF
ClusterName=local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmdSpoolDir=$dir/spool/slurmd
StateSaveLocation=$dir/state
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
# Schedule every 1-2 s, not every minute: a test cluster should start (and restart) jobs at once.
SchedulerParameters=bf_interval=1,sched_interval=2
# Forget finished jobs after 4 s. sbatch --wait polls every MinJobAge/2 at most (else 2, 8, 32, 32... s), so this
# makes it return within ~2 s of the end of a job.
MinJobAge=4
KillWait=20
# the machine's online cores: nproc would report OMP_NUM_THREADS when it is set, and the starting shell's affinity
# (taskset) otherwise, so a 2-CPU job would stay pending forever on a node declared with 1
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$(getconf _NPROCESSORS_ONLN) RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    install_if_missing
    write_config
    if ! pgrep -x munged >/dev/null; then
        [ -s /etc/munge/munge.key ] || /usr/sbin/mungekey --create >/dev/null
        mkdir -p /run/munge && chown munge:munge /run/munge
        runuser -u munge -- /usr/sbin/munged
        touch "$dir/run/started_munged"
    fi
    slurmctld
    slurmd -N localhost
    for _ in $(seq 1 60); do
        if [ "$(sinfo -h -n localhost -o %T 2>/dev/null)" = idle ]; then
            echo "export SLURM_CONF=$SLURM_CONF"
            return
        fi
        sleep 0.5
    done
    echo "local_slurm.sh: the node did not become idle; see $dir/log" >&2
    exit 1
}

stop() {
    scontrol shutdown >/dev/null 2>&1 || true
    for pidfile in "$dir/run/slurmctld.pid" "$dir/run/slurmd.pid"; do
        for _ in $(seq 1 20); do [ -e "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null || break; sleep 0.25; done
    done
    if [ -e "$dir/run/started_munged" ] && [ -s /run/munge/munged.pid ]; then
        kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
        rm -f "$dir/run/started_munged"
    fi
}

case $action in
    start) start ;;
    stop) stop ;;
    config) write_config ;;
    *) echo "usage: local_slurm.sh start|stop|config DIR" >&2; exit 2 ;;
esac
