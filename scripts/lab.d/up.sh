#!/usr/bin/env bash
# Bring up (or complete) pgrelay's loopback-only Patroni lab: etcd + node1 + node2
# (adapted from shared/lab/patroni/up.sh; ports and directory come from lib.sh's env variables).
# Idempotent: whatever is already running is left alone, whatever is missing is (re)started
# -- so after killing a node, running up.sh again restarts just that node and waits until it
# has rejoined as a streaming replica.
# Prints "READY ..." with the leader's host:port and the bring-up time, exit 0;
# exit 1 if the cluster is not ready within READY_TIMEOUT seconds (default 120).
#
#   env: see lib.sh (PGRELAY_LAB, LAB_*_PORT*, LAB_SYNC_MODE, READY_TIMEOUT, PG_BIN)
set -euo pipefail
. "$(dirname "$0")/lib.sh"

T0=$(now)
READY_TIMEOUT=${READY_TIMEOUT:-120}

# ---- preflight -------------------------------------------------------------------------------
for b in "$PG_BIN/postgres" "$PG_BIN/initdb" "$PG_BIN/pg_rewind" "$PATRONI_BIN" "$ETCD_BIN" /usr/bin/python3; do
  [ -x "$b" ] || die "missing $b ($INSTALL_HINT)"
done
command -v curl >/dev/null || die "curl missing"
command -v setpriv >/dev/null || die "setpriv (util-linux) missing"
ensure_user

mkdir -p "$LAB/run" "$LAB/log" "$LAB/conf"
[ "$(id -u)" = 0 ] && chown "$RUN_USER:" "$LAB/log" "$LAB/conf"
chmod 755 "$LAB"   # RUN_USER must be able to traverse $LAB

# Render the configs from the template (ports, paths and synchronous_mode come from the environment).
case "${LAB_SYNC_MODE:-0}" in 1|true|on) SYNC=true;; *) SYNC=false;; esac
for n in $NODES; do
  dst=$LAB/conf/patroni$n.yml
  [ -r "$KIT/patroni.yml.in" ] || die "missing $KIT/patroni.yml.in"
  sed -e "s#@NAME@#node$n#g" -e "s#@PG_PORT@#$(pg_port "$n")#g" -e "s#@REST_PORT@#$(rest_port "$n")#g" \
      -e "s#@ETCD_PORT@#$ETCD_CLIENT_PORT#g" -e "s#@LAB@#$LAB#g" -e "s#@PG_BIN@#$PG_BIN#g" -e "s#@SYNC@#$SYNC#g" \
      "$KIT/patroni.yml.in" > "$dst.tmp" && mv -f "$dst.tmp" "$dst"
  chmod 640 "$dst"
  [ "$(id -u)" = 0 ] && chown "$RUN_USER:" "$dst"
done

# ---- etcd --------------------------------------------------------------------------------------
"$KIT/etcd.sh" start

# ---- patroni nodes -----------------------------------------------------------------------------
start_node() {
  local n=$1 pidfile=$LAB/run/patroni$1.pid conf=$LAB/conf/patroni$1.yml dir=$LAB/node$1 pid pm
  pid=$(read_pidfile "$pidfile") || true
  if pid_matches "$pid" "$conf"; then
    log "node$n: patroni already running (pid $pid)"
    return 0
  fi
  if port_busy "$(rest_port "$n")"; then
    die "node$n: REST port 127.0.0.1:$(rest_port "$n") is busy but our patroni is not running"
  fi
  if port_busy "$(pg_port "$n")"; then
    pm=$(read_pidfile "$dir/data/postmaster.pid") || true
    if pid_matches "$pm" "$dir/data"; then
      log "node$n: orphan postmaster pid $pm still running; patroni will adopt it"
    else
      die "node$n: PostgreSQL port 127.0.0.1:$(pg_port "$n") is busy (not this lab's postgres)"
    fi
  fi
  mkdir -p "$dir"
  [ "$(id -u)" = 0 ] && chown "$RUN_USER:" "$dir"
  chmod 700 "$dir"
  rm -f "$pidfile"
  # setsid: patroni (and the postgres it daemonises) must not die with the caller's terminal/process group.
  # The inner bash writes its own PID and then execs (setpriv ->) patroni, so the pid file holds patroni's PID.
  ( cd "$dir" && exec setsid bash -c 'echo $$ > "$0"; exec "$@"' "$pidfile" \
      $( [ "$(id -u)" = 0 ] && echo setpriv --reuid="$RUN_USER" --regid="$(id -g "$RUN_USER")" --init-groups -- ) \
      "$PATRONI_BIN" "$conf" >>"$LAB/log/patroni$n.log" 2>&1 </dev/null & )
  for _ in $(seq 1 50); do [ -s "$pidfile" ] && break; sleep 0.02; done
  log "node$n: patroni started (pid $(read_pidfile "$pidfile")), PostgreSQL 127.0.0.1:$(pg_port "$n"), REST 127.0.0.1:$(rest_port "$n"), log $LAB/log/patroni$n.log"
}

# Fresh lab (no data dir yet): start node1 alone and wait for it to become the primary, so the
# bootstrap is deterministic (node1 = initdb + leader, node2 = pg_basebackup clone of node1).
fresh=1
for n in $NODES; do [ -d "$LAB/node$n/data" ] && fresh=0; done
if [ "$fresh" = 1 ]; then
  start_node 1
  ok=0
  for _ in $(seq 1 300); do   # <= 60 s
    [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "http://127.0.0.1:$(rest_port 1)/primary")" = 200 ] && { ok=1; break; }
    sleep 0.2
  done
  [ "$ok" = 1 ] || die "node1 did not become primary within 60 s (log: $LAB/log/patroni1.log)"
  log "node1 bootstrapped (initdb) and is primary after $(elapsed "$T0") s"
fi
for n in $NODES; do start_node "$n"; done

# ---- wait until: one leader answering 200 on /primary, every other member a running replica that
#      the leader reports as "streaming" in /patroni .replication[] ----------------------------------
/usr/bin/python3 - "$READY_TIMEOUT" "$T0" "$LAB" $(for n in $NODES; do rest_port "$n"; done) <<'PY'
import json, os, sys, time, urllib.request, urllib.error

timeout, t0, lab, ports = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4:]

def patroni_died():
    """fail fast if a patroni we started has exited (bad config, root, port clash, ...)"""
    for i in range(1, len(ports) + 1):
        try:
            pid = int(open('%s/run/patroni%d.pid' % (lab, i)).read().split()[0])
            with open('/proc/%d/stat' % pid) as f:
                if f.read().rsplit(')', 1)[1].split()[0] not in ('Z', 'X'):
                    continue
        except (OSError, ValueError, IndexError):
            pass
        return 'node%d' % i
    return None

def get(url):
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status, json.loads(r.read() or b'null')
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b'null')
        except ValueError:
            return e.code, None
    except Exception:
        return None, None

deadline = time.time() + timeout
last = None
while time.time() < deadline:
    why = None
    dead = patroni_died()
    if dead:
        log = '%s/log/patroni%s.log' % (lab, dead[4:])
        print('FAILED: patroni of %s exited; last lines of %s:' % (dead, log), flush=True)
        try:
            print(''.join(open(log, errors='replace').readlines()[-15:]), flush=True)
        except OSError:
            pass
        sys.exit(1)
    cluster = None
    for cport in ports:
        code, body = get('http://127.0.0.1:%s/cluster' % cport)
        if code == 200 and body:
            cluster = body
            break
    if not cluster:
        why = 'no REST API answers /cluster yet'
    else:
        members = cluster.get('members', [])
        leaders = [m for m in members if m.get('role') == 'leader']
        # with synchronous_mode on, wait until the replica is registered as sync_standby
        # (a replica that is not the sync standby is never promoted automatically)
        code, conf = get('http://127.0.0.1:%s/config' % cport)
        sync = code == 200 and bool(conf) and conf.get('synchronous_mode') is True
        replicas = [m for m in members if m.get('role') in (('sync_standby',) if sync else ('replica', 'sync_standby'))]
        if len(members) < len(ports):
            why = 'members registered: %s' % [m['name'] for m in members]
        elif len(leaders) != 1:
            why = 'no leader yet'
        else:
            ld = leaders[0]
            api = ld['api_url'].rsplit('/', 1)[0]
            code, st = get(api + '/primary')
            streaming = {r.get('application_name') for r in (st or {}).get('replication', [])
                         if r.get('state') == 'streaming'}
            lagging = [r['name'] for r in replicas if r.get('state') != 'running' or r['name'] not in streaming]
            if code != 200:
                why = 'leader %s /primary -> %s' % (ld['name'], code)
            elif len(replicas) != len(members) - 1 or lagging:
                why = 'waiting for streaming replicas%s: %s' % (' (sync_standby)' if sync else '', lagging or [m['name'] for m in members if m not in replicas and m['role'] != 'leader'])
            else:
                print('READY in %.1f s: leader %s %s:%s (REST %s); replicas %s' % (
                    time.time() - t0, ld['name'], ld['host'], ld['port'], api,
                    ', '.join('%s %s:%s' % (r['name'], r['host'], r['port']) for r in replicas)), flush=True)
                sys.exit(0)
    if why != last:
        print('%s waiting: %s' % (time.strftime('%H:%M:%S'), why), flush=True)
        last = why
    time.sleep(0.2)
print('NOT READY after %.0f s (last state: %s); see logs in the lab log/ directory' % (timeout, last), flush=True)
sys.exit(1)
PY
