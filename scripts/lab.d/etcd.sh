#!/usr/bin/env bash
# Single-member etcd 3.4 for pgrelay's Patroni lab (adapted from shared/lab/patroni/etcd.sh), loopback only.
#   etcd.sh start   -- start (idempotent), wait <= 15 s for /health
#   etcd.sh stop    -- SIGTERM by PID, SIGKILL after 10 s
#   etcd.sh status
# Patroni 3.0.2 talks to it through the "etcd3:" config section (v3 gRPC-gateway JSON API, /v3/...).
# The v2 API ("etcd:" section) is OFF by default in etcd 3.4: add --enable-v2=true if you need it.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

PIDFILE=$LAB/run/etcd.pid
DATA=$LAB/etcd/data

running_pid() {
  local pid
  pid=$(read_pidfile "$PIDFILE") || true
  if pid_matches "$pid" "$ETCD_BIN" && pid_matches "$pid" "$DATA"; then echo "$pid"; return 0; fi
  return 1
}

start() {
  local pid t0
  if pid=$(running_pid); then
    etcd_healthy && { log "etcd already running (pid $pid)"; return 0; }
  fi
  if port_busy "$ETCD_CLIENT_PORT" || port_busy "$ETCD_PEER_PORT"; then
    die "127.0.0.1:$ETCD_CLIENT_PORT or :$ETCD_PEER_PORT is already in use by a process that is not this lab's etcd"
  fi
  [ -x "$ETCD_BIN" ] || die "$ETCD_BIN missing: $INSTALL_HINT"
  ensure_user
  mkdir -p "$LAB/etcd" "$LAB/run" "$LAB/log"
  [ "$(id -u)" = 0 ] && chown "$RUN_USER:" "$LAB/etcd" "$LAB/log"
  chmod 700 "$LAB/etcd"
  rm -f "$PIDFILE"
  t0=$(now)
  # Unset ETCD_* env vars: etcd reads them as flags and refuses a flag given twice.
  ( cd "$LAB/etcd" && exec env $(env | awk -F= '/^ETCD_/{printf "-u %s ", $1}') \
      setsid bash -c 'echo $$ > "$0"; exec "$@"' "$PIDFILE" \
      $( [ "$(id -u)" = 0 ] && echo setpriv --reuid="$RUN_USER" --regid="$(id -g "$RUN_USER")" --init-groups -- ) \
      "$ETCD_BIN" \
        --name lab0 \
        --data-dir "$DATA" \
        --listen-client-urls "http://127.0.0.1:$ETCD_CLIENT_PORT" \
        --advertise-client-urls "http://127.0.0.1:$ETCD_CLIENT_PORT" \
        --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-cluster "lab0=http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-cluster-state new \
        --initial-cluster-token patroni-lab \
        --logger zap --log-outputs stderr --log-level warn \
      >>"$LAB/log/etcd.log" 2>&1 </dev/null & )
  for _ in $(seq 1 150); do
    if etcd_healthy; then
      pid=$(read_pidfile "$PIDFILE")
      log "etcd up (pid $pid) on 127.0.0.1:$ETCD_CLIENT_PORT after $(elapsed "$t0") s"
      return 0
    fi
    sleep 0.1
  done
  tail -n 20 "$LAB/log/etcd.log" >&2 || true
  die "etcd not healthy after 15 s (log: $LAB/log/etcd.log)"
}

stop() {
  local pid
  if ! pid=$(running_pid); then log "etcd not running"; rm -f "$PIDFILE"; return 0; fi
  kill -TERM "$pid" 2>/dev/null || true
  if ! wait_gone "$pid" 10; then
    log "etcd pid $pid ignored SIGTERM for 10 s -> SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    wait_gone "$pid" 5 || die "etcd pid $pid survived SIGKILL"
  fi
  rm -f "$PIDFILE"
  log "etcd stopped (pid $pid)"
}

status() {
  local pid
  if pid=$(running_pid); then
    log "etcd running (pid $pid), health: $(curl -s --max-time 1 "http://127.0.0.1:$ETCD_CLIENT_PORT/health" || echo unreachable)"
  else
    log "etcd not running"; return 1
  fi
}

case "${1:-}" in
  start) start;;
  stop) stop;;
  status) status;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2;;
esac
