#!/usr/bin/env bash
# slurm_cluster.sh - a throw-away single-node SLURM cluster on localhost for the tests (no systemd; run as root).
#
# Usage:  bash tests/slurm_cluster.sh install|start|stop|status
#   install: install Debian's SLURM packages (and MariaDB) if missing, without starting anything.
#   start : install if needed, write a config for this machine, start slurmdbd + MariaDB
#           (so `sacct` works), slurmctld and slurmd, wait until the node is idle. Wipes the old state first.
#   stop  : cancel our jobs, stop our daemons (only the PIDs in our own pid files).
#   status: sinfo + squeue.
# After `start`, point the SLURM commands at the cluster:  export SLURM_CONF="$SLURM_LOCAL_DIR/etc/slurm.conf"
# (or `source "$SLURM_LOCAL_DIR/env.sh"`). Nothing is written outside SLURM_LOCAL_DIR except the packages.
#
# Environment variables:
#   SLURM_LOCAL_DIR    where config, state, logs and the database live     (default /tmp/vlm-regression-slurm)
#   SLURM_ACCOUNTING   1 = slurmdbd + MariaDB so `sacct` works; 0 = none    (default 1)
#   SLURM_CTLD_PORT    slurmctld port                                       (default 6817)
#   SLURMD_PORT        slurmd port                                          (default 6818)
#   SLURMDBD_PORT      slurmdbd port                                        (default 6819)
#   SLURM_DB_PORT      MariaDB port                                         (default 13306)
#   SLURM_START_TIMEOUT  seconds to wait for the node to become idle        (default 60)
#   SLURM_CRED_EXPIRE  seconds a requeued job is held before it may restart (SLURM's default: 120)  (default 10)
# Distinct ports and SLURM_LOCAL_DIR let two clusters (say, two test runs) share a machine.
#
# Adapted from a recipe that works on these machines (Debian 12, SLURM 22.05): about 11 s from nothing when the
# packages are installed. Facts it encodes: `auth/none` needs no munged; slurmd -C gives the node's real CPUs and
# memory; postinst scripts must not start services (policy-rc.d); mariadbd runs as user mysql, so its pid file and
# socket live in a folder that user owns.
set -euo pipefail

CMD=${1:-}
D=${SLURM_LOCAL_DIR:-/tmp/vlm-regression-slurm}
ACCT=${SLURM_ACCOUNTING:-1}
CTLD_PORT=${SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${SLURMD_PORT:-6818}
DBD_PORT=${SLURMDBD_PORT:-6819}
DB_PORT=${SLURM_DB_PORT:-13306}
START_TIMEOUT=${SLURM_START_TIMEOUT:-60}
CRED_EXPIRE=${SLURM_CRED_EXPIRE:-10}
export SLURM_CONF="$D/etc/slurm.conf"

log() { echo "[slurm_cluster $(date +%T)] $*" >&2; }
trap 'log "failed (exit $?) at line $LINENO: $BASH_COMMAND"' ERR
alive() { local s; s=$(ps -o stat= -p "$1" 2>/dev/null) || return 1; [ -n "$s" ] && [ "${s#Z}" = "$s" ]; }
pid_of() { if [ -s "$1" ]; then cat "$1"; fi; }
wait_gone() {  # wait_gone SECONDS PID...
  local end=$((SECONDS + $1)) p any; shift
  while :; do
    any=0
    for p in "$@"; do if [ -n "$p" ] && alive "$p"; then any=1; fi; done
    [ "$any" = 0 ] && return 0
    [ "$SECONDS" -ge "$end" ] && return 1
    sleep 0.2
  done
}
stop_pid() {  # stop_pid NAME PID: TERM, then KILL after 10 s
  local name=$1 pid=$2
  if [ -z "$pid" ] || ! alive "$pid"; then return 0; fi
  kill -TERM "$pid" 2>/dev/null || true
  if ! wait_gone 10 "$pid"; then
    log "$name ($pid) ignored SIGTERM, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    wait_gone 5 "$pid" || true
  fi
}

install_packages() {
  local pkgs=(slurmctld slurmd slurm-client) missing=() p made_policy=0
  if [ "$ACCT" = 1 ]; then pkgs+=(slurmdbd mariadb-server); fi
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
  done
  [ "${#missing[@]}" = 0 ] && return 0
  log "installing: ${missing[*]}"
  # keep the packages' postinst scripts from starting system services
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    made_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q --no-install-recommends "${missing[@]}" > "$D/apt.log" 2>&1; then
    apt-get update -q >> "$D/apt.log" 2>&1
    apt-get install -y -q --no-install-recommends "${missing[@]}" >> "$D/apt.log" 2>&1 ||
      { log "apt-get install failed:"; tail -20 "$D/apt.log" >&2; return 1; }
  fi
  if [ "$made_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
}

write_config() {
  local host hw
  host=$(hostname -s)
  # the real hardware, e.g. "CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
  hw=$(slurmd -C | head -1 | sed 's/^NodeName=[^ ]* //')
  {
    echo "ClusterName=vlmtest"
    echo "SlurmctldHost=$host(127.0.0.1)"
    echo "SlurmUser=root"
    echo "SlurmdUser=root"
    echo "AuthType=auth/none"
    echo "CredType=cred/none"
    # how long slurmd refuses a job id it has just killed; a requeued job is held this long + 1 s (default 120)
    echo "AuthInfo=cred_expire=$CRED_EXPIRE"
    echo "SlurmctldPort=$CTLD_PORT"
    echo "SlurmdPort=$SLURMD_PORT"
    echo "StateSaveLocation=$D/state"
    echo "SlurmdSpoolDir=$D/spool"
    echo "SlurmctldPidFile=$D/run/slurmctld.pid"
    echo "SlurmdPidFile=$D/run/slurmd.pid"
    echo "SlurmctldLogFile=$D/log/slurmctld.log"
    echo "SlurmdLogFile=$D/log/slurmd.log"
    echo "SlurmctldDebug=info"
    echo "SlurmdDebug=info"
    echo "MailProg=/bin/true"
    echo "MpiDefault=none"
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "JobAcctGatherType=jobacct_gather/linux"
    if [ "$ACCT" = 1 ]; then
      echo "AccountingStorageType=accounting_storage/slurmdbd"
      echo "AccountingStorageHost=127.0.0.1"
      echo "AccountingStoragePort=$DBD_PORT"
    else
      echo "AccountingStorageType=accounting_storage/none"
    fi
    echo "SchedulerType=sched/backfill"
    echo "SchedulerParameters=bf_interval=2"  # a requeued job starts soon after its hold ends (default 30 s)
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_Core"
    echo "ReturnToService=2"
    echo "KillWait=5"
    echo "MinJobAge=600"
    echo "NodeName=$host NodeHostname=$host NodeAddr=127.0.0.1 $hw State=UNKNOWN"
    echo "PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP"
  } > "$D/etc/slurm.conf"
  if [ "$ACCT" = 1 ]; then
    cat > "$D/etc/slurmdbd.conf" <<EOF
AuthType=auth/none
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$D/log/slurmdbd.log
PidFile=$D/run/slurmdbd.pid
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$D/etc/slurmdbd.conf"
  fi
  echo "export SLURM_CONF=$D/etc/slurm.conf" > "$D/env.sh"
}

start_accounting() {
  mkdir -p "$D/db"
  chown mysql:mysql "$D/db"
  if ! runuser -u mysql -- test -w "$D/db"; then
    log "user mysql cannot write $D/db: make SLURM_LOCAL_DIR's parent folders traversable (chmod o+x) or move it"
    return 1
  fi
  if ! mariadb-install-db --user=mysql --datadir="$D/db/data" --auth-root-authentication-method=normal \
    --skip-test-db > "$D/log/mariadb-install.log" 2>&1; then
    log "mariadb-install-db failed:"; tail -20 "$D/log/mariadb-install.log" >&2; return 1
  fi
  nohup setsid mariadbd --no-defaults --user=mysql --datadir="$D/db/data" --socket="$D/db/mysqld.sock" \
    --pid-file="$D/db/mariadbd.pid" --bind-address=127.0.0.1 --port="$DB_PORT" \
    --log-error="$D/db/mariadbd.err" --innodb-lock-wait-timeout=900 < /dev/null > /dev/null 2>&1 &
  local up=0
  for _ in $(seq 150); do
    if mariadb-admin --socket="$D/db/mysqld.sock" ping > /dev/null 2>&1; then up=1; break; fi
    sleep 0.2
  done
  if [ "$up" != 1 ]; then log "mariadbd did not come up"; tail -20 "$D/db/mariadbd.err" >&2; return 1; fi
  mariadb --socket="$D/db/mysqld.sock" -uroot -e "
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw';
    CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
    FLUSH PRIVILEGES;"
  slurmdbd  # reads slurmdbd.conf next to $SLURM_CONF
  local end=$((SECONDS + 30))
  while [ "$SECONDS" -lt "$end" ]; do
    if timeout 5 sacctmgr -n show cluster > /dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  log "slurmdbd did not come up"
  tail -20 "$D/log/slurmdbd.log" >&2
  return 1
}

do_stop() {
  local ctld node dbd db jobs
  ctld=$(pid_of "$D/run/slurmctld.pid")
  node=$(pid_of "$D/run/slurmd.pid")
  dbd=$(pid_of "$D/run/slurmdbd.pid")
  db=$(pid_of "$D/db/mariadbd.pid")
  if [ -n "$ctld" ] && alive "$ctld"; then
    jobs=$(timeout 5 squeue -h -o %i 2> /dev/null || true)
    if [ -n "$jobs" ]; then
      # shellcheck disable=SC2086  # one argument per job id
      timeout 5 scancel $jobs 2> /dev/null || true
      for _ in $(seq 100); do
        [ -z "$(timeout 5 squeue -h -o %i 2> /dev/null)" ] && break
        sleep 0.2
      done
    fi
    timeout 10 scontrol shutdown > /dev/null 2>&1 || true
  fi
  wait_gone 15 "$ctld" "$node" || true
  stop_pid slurmd "$node"
  stop_pid slurmctld "$ctld"
  stop_pid slurmdbd "$dbd"
  if [ -n "$db" ] && alive "$db"; then
    mariadb-admin --socket="$D/db/mysqld.sock" shutdown > /dev/null 2>&1 || true
    wait_gone 15 "$db" || true
  fi
  stop_pid mariadbd "$db"
  rm -f "$D"/run/*.pid
  log "stopped"
}

do_start() {
  mkdir -p "$D"
  if command -v scontrol > /dev/null 2>&1; then do_stop; fi
  install_packages
  rm -rf "${D:?}/state" "$D/spool" "$D/log" "$D/run" "$D/db" "${D:?}/etc"
  mkdir -p "$D/etc" "$D/state" "$D/spool" "$D/log" "$D/run"
  write_config
  if [ "$ACCT" = 1 ]; then start_accounting; fi
  slurmctld -i -f "$SLURM_CONF"
  slurmd -f "$SLURM_CONF"
  local host state="" end=$((SECONDS + START_TIMEOUT))
  host=$(hostname -s)
  while [ "$SECONDS" -lt "$end" ]; do
    state=$(timeout 5 sinfo -h -n "$host" -o %t 2> /dev/null || true)
    [ "$state" = idle ] && break
    sleep 0.2
  done
  if [ "$state" != idle ]; then
    log "node state is '$state', not idle; logs:"
    tail -20 "$D/log/slurmctld.log" "$D/log/slurmd.log" >&2
    exit 1
  fi
  log "cluster up: node $host idle; export SLURM_CONF=$SLURM_CONF"
}

case "$CMD" in
  install) mkdir -p "$D"; install_packages ;;
  start) do_start ;;
  stop) do_stop ;;
  status) sinfo; squeue ;;
  *) sed -n '2,10p' "$0" >&2; exit 2 ;;
esac
