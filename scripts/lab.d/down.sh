#!/usr/bin/env bash
# Stop pgrelay's loopback-only Patroni lab (adapted from shared/lab/patroni/down.sh), by PID only (pid files + postmaster.pid), then verify that
# no process of the lab is left. Idempotent; every wait is bounded.
#   down.sh          stop everything, keep data (next up.sh restarts the same cluster in a few s)
#   down.sh --wipe   also delete etcd + PostgreSQL data and rendered configs (next up.sh bootstraps anew)
# Exit 0 only if nothing of the lab is still running.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

WIPE=0
[ "${1:-}" = "--wipe" ] && WIPE=1
T0=$(now)

# Leader last: a replica whose leader stops first would take over (and then be stopped anyway).
order=""
leader=$(leader_name)
for n in $NODES; do [ "node$n" != "$leader" ] && order="$order $n"; done
for n in $NODES; do [ "node$n" = "$leader" ] && order="$order $n"; done

# SIGTERM makes patroni stop PostgreSQL (fast shutdown), drop its member/leader keys and exit.
# Replicas first; the leader is signalled once the replicas' PostgreSQL is down (so no replica can
# take over), then all patroni processes are awaited together (each exits 1-3 s after its PG is down).
declare -A PAT=()
for n in $order; do
  pid=$(patroni_pid "$n") || true
  if [ -n "$pid" ]; then
    if [ "node$n" = "$leader" ]; then
      for m in $order; do
        [ "$m" != "$n" ] && [ -n "${PAT[$m]:-}" ] || continue
        pm=$(postmaster_pid "$m") || true
        [ -n "$pm" ] && { wait_gone "$pm" 30 || log "node$m: postmaster $pm still up after 30 s"; }
      done
    fi
    kill -TERM "$pid" 2>/dev/null || true
    PAT[$n]=$pid
    log "node$n: SIGTERM -> patroni pid $pid"
  else
    log "node$n: patroni not running"
  fi
done
for n in "${!PAT[@]}"; do
  pid=${PAT[$n]}
  if ! wait_gone "$pid" 40; then
    log "node$n: patroni pid $pid still alive after 40 s -> SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    wait_gone "$pid" 5 || true
  fi
  log "node$n: patroni stopped (pid $pid)"
done
for n in $NODES; do
  rm -f "$LAB/run/patroni$n.pid"
  # PostgreSQL runs detached from patroni (own session): if patroni was SIGKILLed, postgres survives.
  pm=$(postmaster_pid "$n") || true
  if [ -n "$pm" ]; then
    log "node$n: postmaster pid $pm still running -> SIGINT (fast shutdown)"
    kill -INT "$pm" 2>/dev/null || true
    if ! wait_gone "$pm" 20; then
      kill -QUIT "$pm" 2>/dev/null || true          # immediate shutdown
      wait_gone "$pm" 5 || { kill -KILL "$pm" 2>/dev/null || true; wait_gone "$pm" 5 || true; }
    fi
  fi
done

"$KIT/etcd.sh" stop

# Anything left (e.g. orphaned postgres backends after a kill -9 experiment, pg_basebackup, ...)?
left=$(lab_pids)
if [ -n "$left" ]; then
  log "leftover lab processes, sending SIGTERM by PID:"
  printf '%s\n' "$left" | sed 's/^/    /'
  for p in $(printf '%s\n' "$left" | cut -f1); do kill -TERM "$p" 2>/dev/null || true; done
  for p in $(printf '%s\n' "$left" | cut -f1); do wait_gone "$p" 5 || kill -KILL "$p" 2>/dev/null || true; done
  sleep 0.2
  left=$(lab_pids)
fi

if [ "$WIPE" = 1 ]; then
  rm -rf "${LAB:?}/etcd" "${LAB:?}/conf" "${LAB:?}/run"
  for n in $NODES; do rm -rf "${LAB:?}/node$n"; done
  log "wiped etcd + PostgreSQL data under $LAB (logs kept in $LAB/log)"
fi

if [ -n "$left" ]; then
  log "ERROR: still running:"; printf '%s\n' "$left" | sed 's/^/    /'
  exit 1
fi
for p in $ETCD_CLIENT_PORT $ETCD_PEER_PORT $(for n in $NODES; do echo "$(pg_port "$n") $(rest_port "$n")"; done); do
  port_busy "$p" && log "WARNING: 127.0.0.1:$p still accepts connections (not a lab process?)"
done
log "DOWN in $(elapsed "$T0") s: no lab process left"
