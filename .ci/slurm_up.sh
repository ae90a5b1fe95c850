#!/usr/bin/env bash
# Bring up a real single-node SLURM cluster (munge + slurmctld + slurmd) on this machine, so that the
# tests marked `slurm` run against a real scheduler instead of a mock. Debian 12, root, no systemd needed.
#
#   bash .ci/slurm_up.sh          # install (first time), configure, start, wait until the node is idle
#
# Idempotent: when the controller already answers and the node is up, it returns at once.
#
# Choices (see docs/slurm.md):
# - No accounting (no slurmdbd/mariadb): 31 MB and ~4 s less, nothing more to keep alive. The price is
#   that submitit cannot read job states (`sacct` fails, state is UNKNOWN) and waits forever on a job that
#   was killed without writing its result; the tests therefore put a timeout around every wait.
# - Fast requeue: `AuthInfo=cred_expire=10` and `sched_interval=2,bf_interval=2`, otherwise a requeued job
#   waits ~160 s before it runs again. `DefMemPerCPU` so that jobs do not each take the whole node's memory.
# - The node's CPU/socket/core/memory line comes from `slurmd -C`, so the node never comes up INVALID.
set -euo pipefail

WAIT_S=${SLURM_UP_WAIT_S:-60}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm
NODE=$(hostname -s)

log() { echo "[slurm_up] $*"; }

if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then exec sudo -E bash "$0" "$@"; fi
  log "needs root (or sudo)"; exit 1
fi

node_state() { sinfo -h -N -n "$NODE" -o '%t' 2>/dev/null | head -n1; }
running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
node_usable() {
  # idle, mix or alloc (plus a trailing flag char like '*' or '~' only when unusable: excluded)
  case "$(node_state)" in idle|mix|alloc|comp) return 0 ;; *) return 1 ;; esac
}

t0=$(date +%s)

# 1. Packages (only what is missing). Keep postinst scripts from starting services: there is no systemd.
if ! command -v slurmctld >/dev/null 2>&1 || ! command -v slurmd >/dev/null 2>&1 \
   || ! command -v munged >/dev/null 2>&1 || ! command -v sbatch >/dev/null 2>&1; then
  created_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    created_policy=1
  fi
  log "installing munge slurmctld slurmd slurm-client"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends munge slurmctld slurmd slurm-client >/dev/null
  if [ "$created_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
fi

# 2. munge: key readable by munge only, runtime folder, daemon as the munge user.
if [ ! -s /etc/munge/munge.key ]; then
  if command -v mungekey >/dev/null 2>&1; then mungekey --create --force; else
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; fi
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
if ! munge_ok; then
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 1 50); do munge_ok && break; sleep 0.1; done
  munge -n | unmunge >/dev/null || { log "munge does not work"; exit 1; }
fi

# 3. slurm.conf from this machine's hardware.
mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
hw=$(slurmd -C | head -n1)   # NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ... RealMemory=N
hw=${hw#NodeName=* }
new_conf=$(cat <<EOF
# Written by .ci/slurm_up.sh: a single-node cluster for tests. Do not edit by hand.
ClusterName=densecl
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
JobRequeue=1
ReturnToService=2
KillWait=5
MinJobAge=600
InactiveLimit=0
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$NODE NodeAddr=127.0.0.1 $hw State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
)
# Fast path: same config, daemons alive, controller answers, node usable -> nothing to do.
if [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$new_conf" ] && running /run/slurmctld.pid && running /run/slurmd.pid \
   && munge_ok && timeout 10 scontrol ping 2>/dev/null | grep -q UP && node_usable; then
  log "SLURM already answers; node $NODE is $(node_state)"
  exit 0
fi

restart=0
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$new_conf" ]; then
  printf '%s\n' "$new_conf" > "$CONF"
  restart=1
  log "wrote $CONF"
fi

# 4. Daemons (daemon mode, no systemd). A changed config needs a restart (AuthInfo is read at start only).
stop() {
  if running "$1"; then
    local pid; pid=$(cat "$1"); kill "$pid"
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$1"
}
if [ "$restart" = 1 ]; then stop /run/slurmd.pid; stop /run/slurmctld.pid; fi
if ! running /run/slurmctld.pid; then log "starting slurmctld"; slurmctld; fi
if ! running /run/slurmd.pid; then log "starting slurmd"; slurmd; fi

# 5. Wait until the node is idle (bounded). A node left DOWN/DRAIN by an earlier run is resumed.
deadline=$(( $(date +%s) + WAIT_S ))
while ! node_usable; do
  st=$(node_state || true)
  case "$st" in down*|drain*|drng*|fail*) scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;; esac
  if [ "$(date +%s)" -ge "$deadline" ]; then
    log "node $NODE not idle after ${WAIT_S}s (state: '${st}')"
    tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" || true
    exit 1
  fi
  sleep 0.5
done
# 6. One real job step end to end (munge credentials, slurmd launch): fails here rather than in the tests.
if ! timeout 60 srun -N1 -n1 -t 1 true; then
  log "srun smoke test failed"; tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" || true; exit 1
fi
log "SLURM up in $(( $(date +%s) - t0 ))s: $(sinfo -h -o '%P %a %D %t %C')"
