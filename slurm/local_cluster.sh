#!/usr/bin/env bash
# A Slurm cluster on this machine, to try the launchers (and to test them): munged, slurmctld and
# slurmd on localhost, every file under one directory. It installs nothing: it needs Slurm's
# daemons and munge (Debian/Ubuntu: apt-get install slurm-wlm munge), and root.
#
#   sudo slurm/local_cluster.sh start          # prints the line to export: SLURM_CONF=...
#   export SLURM_CONF=/tmp/ringflash-slurm/slurm.conf
#   sinfo; srun -n2 hostname; sbatch ...; python slurm/submit.py --gpus-per-node 0 ...
#   sudo slurm/local_cluster.sh stop           # cancels the jobs, stops the daemons
#
# Options (after start, stop or status):
#   --dir DIR     where the configuration, state, logs and munge key live
#                 (default: $RINGFLASH_SLURM_DIR or /tmp/ringflash-slurm)
#   --port P      slurmctld's port; the slurmds take the next ones (default 6817)
#   --cpus N      CPUs of each node (default: nproc); more than nproc oversubscribes the cores
#   --nodes N     1 (default) or 2 emulated nodes on this host, one slurmd each (slurmd -N): the
#                 nodes are named after this host and localhost, which both resolve here, as
#                 the launchers' rendezvous needs
#   --debug LEVEL slurmctld's log level (default info; debug2 logs its periodic time-limit checks)
#
# The node line comes from nproc and the memory (/proc/meminfo). The plugins are the ones that
# need nothing from the host: ProctrackType=proctrack/linuxproc, TaskPlugin=task/none,
# SelectType=select/cons_tres (CPUs as the consumable), no accounting. Exit status: 0, 1 (a
# daemon did not start: its log follows; or a cluster already runs in DIR), 2 (bad usage), 3
# (Slurm or munge not installed), 4 (not root), 5 (two nodes asked for where this host's name
# cannot tell them apart).

set -euo pipefail

cmd=${1:-}
[ $# -gt 0 ] && shift
dir=${RINGFLASH_SLURM_DIR:-/tmp/ringflash-slurm}
port=6817
cpus=$(nproc)
nodes=1
debug=info
while [ $# -gt 0 ]; do
    case $1 in
        --dir) dir=$2; shift 2 ;;
        --port) port=$2; shift 2 ;;
        --cpus) cpus=$2; shift 2 ;;
        --nodes) nodes=$2; shift 2 ;;
        --debug) debug=$2; shift 2 ;;
        *) echo "local_cluster.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
case $cmd in
    start|stop|status) ;;
    *) echo "usage: $0 start|stop|status [--dir DIR] [--port P] [--cpus N] [--nodes 1|2] [--debug LEVEL]" >&2; exit 2 ;;
esac
case $nodes in
    1|2) ;;
    *) echo "local_cluster.sh: --nodes is 1 or 2; got $nodes" >&2; exit 2 ;;
esac

conf=$dir/slurm.conf
export SLURM_CONF=$conf
socket=$dir/run/munge.socket  # its directory must be open to all: clients connect as any user

host=$(hostname -s 2>/dev/null || hostname)
node_names() {
    # (Slurm 22.05 takes the pair only in this order: localhost first is a "duplicated NodeHostName".)
    if [ "$nodes" = 1 ]; then echo localhost; else echo "$host localhost"; fi
}

# The pid in a pid file, if that process is alive.
alive_pid() {
    local pid
    [ -f "$1" ] || return 1
    pid=$(cat "$1" 2>/dev/null) || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

# Stop the processes of some pid files together: SIGTERM, up to 10 s, then SIGKILL.
stop_pids() {
    local f pid i pids=() files=()
    for f in "$@"; do
        if pid=$(alive_pid "$f"); then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
        files+=("$f")
    done
    for i in $(seq 100); do
        local alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ $alive = 0 ] && break
        sleep 0.1
    done
    for pid in "${pids[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            echo "local_cluster.sh: pid $pid ($(cat "/proc/$pid/comm" 2>/dev/null)) did not stop on SIGTERM;" \
                "killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    rm -f "${files[@]}"
}

show_log() {
    if [ -f "$1" ]; then
        echo "---- $1 (last lines)" >&2
        tail -n 20 "$1" >&2
    fi
}

fail_start() {
    echo "local_cluster.sh: $1" >&2
    for log in "$dir"/log/*.log; do show_log "$log"; done
    stop_all
    exit 1
}

stop_all() {
    local name files=()
    for name in $(node_names); do files+=("$dir/run/slurmd-$name.pid"); done
    stop_pids "${files[@]}" "$dir/run/slurmctld.pid"
    stop_pids "$dir/run/munged.pid"  # last: the others talk through it until they stop
}

if [ "$cmd" = status ]; then
    [ -f "$conf" ] || { echo "no cluster in $dir"; exit 1; }
    # --nodes as the cluster was started with
    [ "$(grep -c '^NodeName=' "$conf")" = 2 ] && nodes=2
    up=0
    alive_pid "$dir/run/munged.pid" >/dev/null && echo "munged: running" || { echo "munged: stopped"; up=1; }
    alive_pid "$dir/run/slurmctld.pid" >/dev/null && echo "slurmctld: running" || { echo "slurmctld: stopped"; up=1; }
    for name in $(node_names); do
        alive_pid "$dir/run/slurmd-$name.pid" >/dev/null && echo "slurmd ($name): running" \
            || { echo "slurmd ($name): stopped"; up=1; }
    done
    [ $up = 0 ] && sinfo
    echo "export SLURM_CONF=$conf"
    exit $up
fi

if [ "$cmd" = stop ]; then
    [ -f "$conf" ] || { echo "local_cluster.sh: no cluster in $dir" >&2; exit 0; }
    [ "$(grep -c '^NodeName=' "$conf")" = 2 ] && nodes=2
    if alive_pid "$dir/run/slurmctld.pid" >/dev/null; then
        # Cancel every job and wait for them to end (Slurm signals the tasks, then kills them).
        scancel --full --quiet $(squeue -h -o %i 2>/dev/null) 2>/dev/null || true
        for i in $(seq 600); do
            [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
            sleep 0.1
        done
        [ -z "$(squeue -h -o %i 2>/dev/null)" ] || echo "local_cluster.sh: jobs still listed after 60 s:" \
            "$(squeue -h -o '%i %T')" >&2
    fi
    stop_all
    echo "stopped the cluster in $dir"
    exit 0
fi

# -- start ------------------------------------------------------------------------------------

missing=()
for prog in munged munge unmunge slurmctld slurmd sbatch srun scontrol squeue sinfo scancel; do
    command -v "$prog" >/dev/null || missing+=("$prog")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "local_cluster.sh: not installed: ${missing[*]} (Debian/Ubuntu: apt-get install slurm-wlm munge)" >&2
    exit 3
fi
if [ "$(id -u)" != 0 ]; then
    echo "local_cluster.sh: the daemons run as root (SlurmUser=root, jobs as their submitter): run it as root" >&2
    exit 4
fi
if [ "$nodes" = 2 ]; then
    # Two slurmds on one host: the first node is this host's name, which must resolve here and
    # differ from localhost (the launchers meet at the first node's name).
    if [ "$host" = localhost ] || ! getent hosts "$host" >/dev/null; then
        echo "local_cluster.sh: two nodes need a host name other than localhost that resolves here" \
            "(the first node's name); this host is '$host': use --nodes 1" >&2
        exit 5
    fi
fi
if alive_pid "$dir/run/slurmctld.pid" >/dev/null || alive_pid "$dir/run/munged.pid" >/dev/null; then
    echo "local_cluster.sh: a cluster is already running in $dir (stop it first)" >&2
    exit 1
fi

rm -rf "$dir/state" "$dir/spool" "$dir/log" "$dir/run" "$dir/munge"
mkdir -p "$dir/state" "$dir/spool" "$dir/log" "$dir/run" "$dir/munge"
chmod 755 "$dir"
chmod 700 "$dir/munge"

# munge: its own key and socket, so that nothing of a system munge is used or changed.
dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$dir/munge/munge.key"
munged --socket="$socket" --key-file="$dir/munge/munge.key" --pid-file="$dir/run/munged.pid" \
    --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed" \
    || fail_start "munged did not start"
for i in $(seq 100); do
    munge -n -S "$socket" 2>/dev/null | unmunge -S "$socket" >/dev/null 2>&1 && break
    [ "$i" = 100 ] && fail_start "munged does not answer on $socket"
    sleep 0.1
done

# A requeued job may start again cred_expire + 1 s after its requeue (Slurm's default: 120 s).
# It also bounds how long a job step's credential stays valid: ample on one machine.
cred_expire=5
mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
{
    echo "# written by slurm/local_cluster.sh"
    echo "ClusterName=ringflash"
    echo "SlurmctldHost=localhost"
    echo "SlurmctldPort=$port"
    echo "SlurmdPort=$((port + 1))"
    echo "SlurmUser=root"
    echo "SlurmdUser=root"
    echo "AuthType=auth/munge"
    echo "CredType=cred/munge"
    echo "AuthInfo=socket=$socket,cred_expire=$cred_expire"
    echo "StateSaveLocation=$dir/state"
    echo "SlurmdSpoolDir=$dir/spool/%n"
    echo "SlurmctldPidFile=$dir/run/slurmctld.pid"
    echo "SlurmdPidFile=$dir/run/slurmd-%n.pid"
    echo "SlurmctldLogFile=$dir/log/slurmctld.log"
    echo "SlurmdLogFile=$dir/log/slurmd-%n.log"
    echo "SlurmctldDebug=$debug"
    echo "SlurmdDebug=info"
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_CPU"
    echo "SchedulerType=sched/backfill"
    echo "SchedulerParameters=sched_interval=1,bf_interval=1"
    echo "SwitchType=switch/none"
    echo "MpiDefault=none"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "AccountingStorageType=accounting_storage/none"
    echo "JobCompType=jobcomp/none"
    echo "ReturnToService=2"
    # The node lines as written, even where they claim more CPUs than this host has (--cpus).
    echo "SlurmdParameters=config_overrides"
    echo "MailProg=/bin/true"
    if [ "$nodes" = 1 ]; then
        echo "NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
    else
        n=0
        for name in $(node_names); do
            n=$((n + 1))
            # Both at 127.0.0.1, each slurmd on its own port; NodeHostname only tells them apart.
            echo "NodeName=$name NodeHostname=node$n NodeAddr=127.0.0.1 Port=$((port + n))" \
                "CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
        done
    fi
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
} > "$conf"

slurmctld -f "$conf" || fail_start "slurmctld did not start"
for name in $(node_names); do
    mkdir -p "$dir/spool/$name"
    slurmd -f "$conf" -N "$name" || fail_start "slurmd ($name) did not start"
done

# Up when every node is idle.
for i in $(seq 300); do
    states=$(sinfo -h -N -o '%N %T' 2>/dev/null || true)
    if grep -qE ' (inval|drain|down)' <<<"$states"; then
        fail_start "a node did not come up: $states; $(sinfo -h -R 2>&1 || true)"
    fi
    if [ -n "$states" ] && ! grep -qv ' idle$' <<<"$states"; then
        echo "a Slurm cluster of $nodes node(s) x $cpus CPUs runs in $dir:"
        echo "export SLURM_CONF=$conf"
        exit 0
    fi
    sleep 0.1
done
fail_start "the nodes did not come up in 30 s: $(sinfo -h -N -o '%N %T' 2>&1 || true)"
