#!/usr/bin/env bash
# A one-node SLURM on localhost, for trying the batch scripts and for CI (needs root, no systemd).
#
#   tools/slurm_local.sh start     # install if missing, write slurm.conf, start munged, slurmctld, slurmd
#   export SLURM_CONF=/var/spool/fedmpi-slurm/slurm.conf     # (start prints this line) then sbatch, srun, squeue
#   tools/slurm_local.sh status    # exit 0 when the node answers, 1 when not
#   tools/slurm_local.sh stop      # scontrol shutdown, then munged by its pid (only if start started it)
#
# Environment: FEDMPI_SLURM_DIR (state dir, default /var/spool/fedmpi-slurm; batch scripts are copied and
# run from there, so it must not be on a noexec mount such as some /tmp), FEDMPI_SLURM_CPUS (default 16:
# CPUs the node claims, so -n 16 fits on 2 cores), FEDMPI_SLURM_PORTS (default "6817 6818").
set -euo pipefail

STATE=${FEDMPI_SLURM_DIR:-/var/spool/fedmpi-slurm}
CONF=$STATE/slurm.conf
CPUS=${FEDMPI_SLURM_CPUS:-16}
read -r CTLD_PORT D_PORT <<<"${FEDMPI_SLURM_PORTS:-6817 6818}"
HOST=$(hostname -s)
export SLURM_CONF=$CONF

die() { echo "slurm_local: $*" >&2; exit 1; }
alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_if_missing() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null && dpkg -s libpmix2 >/dev/null 2>&1 && return
    echo "slurm_local: installing slurm-wlm munge libpmix2 (apt)"
    # libpmix2 must be there before slurmd starts, else `srun --mpi=pmix` hangs the node.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge libpmix2 >/dev/null \
        || die "apt-get install slurm-wlm munge libpmix2 failed (run apt-get update first?)"
}

write_conf() {
    mkdir -p "$STATE/ctld" "$STATE/d" "$STATE/log"
    # Why each line: see ../shared/docs/hpc-facts.md (measured on a 2-core Debian 12 machine).
    cat >"$CONF" <<EOF
ClusterName=fedmpi-local
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$D_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again only after the credential lifetime (default 120 s): keep it short here.
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
EnforcePartLimits=ALL
ReturnToService=2
KillWait=5
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=local Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return  # someone else's munged answers: use it, and leave it running on stop
    fi
    mkdir -p /run/munge && chown munge:munge /run/munge
    runuser -u munge -- /usr/sbin/munged || die "munged did not start"
    cp /run/munge/munged.pid "$STATE/munged.pid"  # ours: stop kills it
}

wait_idle() {
    local state=""
    for _ in $(seq 1 100); do
        state=$(sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -1 || true)
        [[ $state == idle || $state == mixed || $state == allocated ]] && return
        sleep 0.2
    done
    die "node $HOST not idle after 20 s (state '${state:-no answer}'); see $STATE/log/"
}

cmd_start() {
    [[ $(id -u) == 0 ]] || die "needs root (munged, slurmctld and slurmd run as root here)"
    if alive "$STATE/slurmctld.pid" && alive "$STATE/slurmd.pid"; then
        echo "slurm_local: already running"; echo "export SLURM_CONF=$CONF"; return
    fi
    install_if_missing
    write_conf
    start_munge
    slurmctld -f "$CONF" || die "slurmctld did not start; see $STATE/log/slurmctld.log"
    slurmd -f "$CONF" || die "slurmd did not start; see $STATE/log/slurmd.log"
    wait_idle
    echo "slurm_local: node $HOST idle ($CPUS CPUs)"
    echo "export SLURM_CONF=$CONF"
}

pid_of() { alive "$1" && cat "$1" || true; }

wait_gone() {  # wait up to 15 s for a pid to exit, then SIGKILL it
    [[ -n $1 ]] || return 0
    for _ in $(seq 1 75); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.2; done
    echo "slurm_local: pid $1 still there after 15 s: SIGKILL" >&2
    kill -9 "$1" 2>/dev/null || true
}

cmd_stop() {
    # Read the pids first: the daemons remove their pid files as they exit.
    local ctld d munged
    ctld=$(pid_of "$STATE/slurmctld.pid"); d=$(pid_of "$STATE/slurmd.pid"); munged=$(pid_of "$STATE/munged.pid")
    if [[ -n $ctld ]]; then scontrol shutdown >/dev/null 2>&1 || kill "$ctld" 2>/dev/null || true; fi
    wait_gone "$ctld"
    [[ -z $d ]] || kill "$d" 2>/dev/null || true  # slurmd alone (no controller to tell it)
    wait_gone "$d"
    if [[ -n $munged ]]; then kill "$munged" 2>/dev/null || true; wait_gone "$munged"; fi
    rm -f "$STATE/munged.pid" "$STATE/slurmctld.pid" "$STATE/slurmd.pid"
    echo "slurm_local: stopped"
}

cmd_status() {
    alive "$STATE/slurmctld.pid" && alive "$STATE/slurmd.pid" || { echo "slurm_local: not running"; return 1; }
    sinfo -N -n "$HOST" -o "%N %T %c" || return 1
    echo "export SLURM_CONF=$CONF"
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) die "usage: $0 start|stop|status" ;;
esac
