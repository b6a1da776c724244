#!/usr/bin/env bash
# What clients see through pgrelay across a Patroni switchover and a crash failover.
#
# Needs the lab: `scripts/lab up` (etcd + 2 Patroni nodes + pgrelay on 127.0.0.1:6432). For each event it runs
# pgbench (tpcb-like, -c 8 -j 2, no --max-tries) through pgrelay with a per-transaction log (-l), plus a probe
# (one client through pgrelay writing every 20 ms and polling Patroni's /cluster every 20 ms), then prints:
#   - client-visible errors: pgbench's failed transactions and aborted clients, and the probe's failed writes
#   - the longest transaction latency in pgbench's per-transaction log
#   - Patroni's change (first /cluster poll naming the new leader) -> pgrelay's "routing to new leader" log line
#     -> the probe's first committed write on the new leader
# Every wait is bounded. Usage: benches/failover.sh [switchover] [crash]   (default: both)
#   env: PGRELAY_LAB, RELAY_PORT (6432), BENCH_SECONDS (20), BENCH_CLIENTS (8), EVENT_AT (6 s into the run)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
D=$ROOT/scripts/lab.d
. "$D/lib.sh"

RELAY_PORT=${RELAY_PORT:-6432}
SECS=${BENCH_SECONDS:-20}
CLIENTS=${BENCH_CLIENTS:-8}
EVENT_AT=${EVENT_AT:-6}
RELAY_LOG=$LAB/log/pgrelay.log
OUT=$LAB/bench/failover-$(date +%Y%m%d-%H%M%S)
EVENTS=("$@")
[ ${#EVENTS[@]} -gt 0 ] || EVENTS=(switchover crash)
export PGPASSWORD=postgres

command -v pgbench >/dev/null || die "pgbench missing: apt-get install -y postgresql-contrib"
[ -n "$(leader_name)" ] || die "no Patroni leader on :$(rest_port 1)/:$(rest_port 2): run scripts/lab up first"
PGCONNECT_TIMEOUT=3 psql -X -q -h 127.0.0.1 -p "$RELAY_PORT" -U postgres postgres -c 'select 1' >/dev/null \
  || die "pgrelay not answering on 127.0.0.1:$RELAY_PORT: run scripts/lab up first"
mkdir -p "$OUT"

leader=$(leader_name)
log "pgbench -i -s 2 on the leader ($leader)"
timeout 120 pgbench -i -q -s 2 -h 127.0.0.1 -p "$(pg_port "${leader#node}")" -U postgres postgres >"$OUT/init.log" 2>&1 \
  || { cat "$OUT/init.log"; die "pgbench -i failed"; }

# probe.py DURATION OUTFILE: writes through pgrelay every 20 ms and polls /cluster every 20 ms; JSON lines out.
cat >"$OUT/probe.py" <<'PY'
import json, sys, threading, time, urllib.request
import psycopg2
dur, out, relay_port, cand_port, rest_ports = float(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
events, lock, stop = [], threading.Lock(), time.time() + dur
def rec(**kw):
    with lock:
        events.append(kw)
def cluster():
    last = None
    while time.time() < stop:
        leader = None
        for p in rest_ports:
            try:
                with urllib.request.urlopen('http://127.0.0.1:%s/cluster' % p, timeout=0.3) as r:
                    ms = json.load(r)['members']
                leader = next((m['name'] for m in ms if m['role'] == 'leader' and m['state'] == 'running'), '')
                break
            except Exception:
                continue
        if leader is not None and leader != last:
            rec(kind='cluster', t=time.time(), leader=leader)
            last = leader
        time.sleep(0.02)
def writer():
    conn = None
    while time.time() < stop:
        t = time.time()
        try:
            if conn is None:
                conn = psycopg2.connect(host='127.0.0.1', port=relay_port, user='postgres', password='postgres',
                                        dbname='postgres', connect_timeout=5)
                conn.autocommit = True
            with conn.cursor() as c:
                c.execute('insert into bench_probe(at) values (clock_timestamp()) returning inet_server_port()')
                rec(kind='write', t=t, end=time.time(), port=c.fetchone()[0])
        except Exception as e:
            rec(kind='write', t=t, end=time.time(), error=str(e).strip().splitlines()[0][:160])
            try:
                conn.close()
            except Exception:
                pass
            conn = None
        time.sleep(0.02)
def promoted():
    # Direct connection to the candidate: when does PostgreSQL itself accept writes (Patroni's promotion)?
    conn = None
    while time.time() < stop:
        try:
            if conn is None:
                conn = psycopg2.connect(host='127.0.0.1', port=cand_port, user='postgres', password='postgres',
                                        dbname='postgres', connect_timeout=2)
                conn.autocommit = True
            with conn.cursor() as c:
                c.execute('select pg_is_in_recovery()')
                if c.fetchone()[0] is False:
                    rec(kind='writable', t=time.time())
                    return
        except Exception:
            conn = None
        time.sleep(0.005)
ts = [threading.Thread(target=cluster), threading.Thread(target=writer), threading.Thread(target=promoted)]
[t.start() for t in ts]
[t.join() for t in ts]
with open(out, 'w') as f:
    for e in events:
        f.write(json.dumps(e) + '\n')
PY
psql -X -q -h 127.0.0.1 -p "$RELAY_PORT" -U postgres postgres \
  -c 'create table if not exists bench_probe(id bigserial primary key, at timestamptz)' >/dev/null

# utc_epoch "2026-11-29T02:54:41.192197Z" -> seconds since the epoch
utc_epoch() { date -u -d "$1" +%s.%N; }

run_event() {
  local ev=$1 dir=$OUT/$1 old new t_ev bench_pid probe_pid rc
  mkdir -p "$dir"
  old=$(leader_name); [ -n "$old" ] || die "no leader before $ev"
  new=$([ "$old" = node1 ] && echo node2 || echo node1)
  log "== $ev: $old -> $new; pgbench -c $CLIENTS -j 2 -T $SECS through pgrelay, event at ${EVENT_AT} s"
  local relay_lines; relay_lines=$(wc -l <"$RELAY_LOG")
  /usr/bin/python3 "$OUT/probe.py" $((SECS + 4)) "$dir/probe.jsonl" "$RELAY_PORT" "$(pg_port "${new#node}")" \
    "$(rest_port 1)" "$(rest_port 2)" &
  probe_pid=$!
  (cd "$dir" && exec timeout $((SECS + 60)) pgbench -c "$CLIENTS" -j 2 -T "$SECS" -P 1 -l --log-prefix=tx \
      -h 127.0.0.1 -p "$RELAY_PORT" -U postgres postgres >"$dir/pgbench.out" 2>&1) &
  bench_pid=$!
  sleep "$EVENT_AT"
  t_ev=$(now)
  case $ev in
    switchover) "$D/ha.sh" switchover >"$dir/event.log" 2>&1 || { cat "$dir/event.log"; die "switchover failed"; };;
    crash) "$D/ha.sh" kill-leader >"$dir/event.log" 2>&1 || { cat "$dir/event.log"; die "kill failed"; };;
  esac
  rc=0; wait "$bench_pid" || rc=$?
  wait "$probe_pid" || true
  if [ "$ev" = crash ]; then
    log "restarting $old so it rejoins as a replica"
    "$D/up.sh" >"$dir/rejoin.log" 2>&1 || { tail -5 "$dir/rejoin.log"; die "rejoin failed"; }
  fi
  tail -n +"$((relay_lines + 1))" "$RELAY_LOG" | sed 's/\x1b\[[0-9;]*m//g' >"$dir/pgrelay.log"
  local route_ts route_epoch="" hold_ts hold_epoch="" stop_ts stop_epoch=""
  route_ts=$(grep "routing to new leader.*leader=127.0.0.1:$(pg_port "${new#node}")" "$dir/pgrelay.log" | head -n1 | awk '{print $1}' || true)
  [ -n "$route_ts" ] && route_epoch=$(utc_epoch "$route_ts")
  # Switchover only: when pgrelay began holding new transactions (failover key seen) vs. when the old leader's
  # PostgreSQL got its fast shutdown request (its log line in the patroni log, default prefix "%m [%p] ").
  hold_ts=$(grep "switchover pending" "$dir/pgrelay.log" | head -n1 | awk '{print $1}' || true)
  [ -n "$hold_ts" ] && hold_epoch=$(utc_epoch "$hold_ts")
  stop_ts=$(grep "received fast shutdown request" "$LAB/log/patroni${old#node}.log" 2>/dev/null | tail -n1 | awk '{print $1" "$2" "$3}' || true)
  [ "$ev" = switchover ] && [ -n "$stop_ts" ] && stop_epoch=$(utc_epoch "$stop_ts")
  /usr/bin/python3 - "$ev" "$dir" "$t_ev" "$new" "$(pg_port "${new#node}")" "$rc" "$route_epoch" "$hold_epoch" "$stop_epoch" <<'PY'
import glob, json, re, sys
ev, d, t_ev, new, new_port, rc, route = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4], int(sys.argv[5]), int(sys.argv[6]), sys.argv[7]
hold = float(sys.argv[8]) if sys.argv[8] else None
pgstop = float(sys.argv[9]) if sys.argv[9] else None
out = open(d + '/pgbench.out', errors='replace').read()
def num(label):
    m = re.search(re.escape(label) + r'\s*(\d+)', out)
    return int(m.group(1)) if m else None
processed, failed = num('number of transactions actually processed:'), num('number of failed transactions:')
aborted = len(re.findall(r'client \d+ (?:script \d+ )?aborted', out))
errs = sorted(set(l.strip() for l in out.splitlines() if 'ERROR' in l or 'FATAL' in l or 'aborted' in l or 'error' in l.lower()))
lat, n = 0, 0
for f in glob.glob(d + '/tx.*'):
    for line in open(f):
        p = line.split()
        if len(p) >= 6 and p[2].isdigit():
            n += 1
            lat = max(lat, int(p[2]))
ev_log = [json.loads(l) for l in open(d + '/probe.jsonl')]
named = next((e['t'] for e in ev_log if e['kind'] == 'cluster' and e['leader'] == new and e['t'] >= t_ev), None)
first = min((e['end'] for e in ev_log if e['kind'] == 'write' and e.get('port') == new_port and e['t'] >= t_ev), default=None)
writable = next((e['t'] for e in ev_log if e['kind'] == 'writable'), None)
perr = [e for e in ev_log if e['kind'] == 'write' and 'error' in e]
kinds = {}
for e in perr:
    kinds[e['error']] = kinds.get(e['error'], 0) + 1
print('---- %s -> %s ----' % (ev, new))
print('pgbench: exit %d, processed %s, failed %s, aborted clients %d' % (rc, processed, failed, aborted))
for e in errs[:6]:
    print('  pgbench: ' + e[:200])
print('probe: %d failed writes%s' % (len(perr), ''.join('\n  %dx %s' % (v, k) for k, v in kinds.items())))
print('longest transaction (pgbench -l, %d transactions): %.0f ms' % (n, lat / 1000.0))
f = lambda a, b: '%.0f ms' % ((b - a) * 1000) if a is not None and b is not None else 'n/a'
print('event -> /cluster names %s: %s' % (new, f(t_ev, named)))
print('/cluster names %s -> pgrelay "routing to new leader": %s' % (new, f(named, float(route) if route else None)))
print('/cluster names %s -> PostgreSQL on %s leaves recovery (direct probe): %s' % (new, new, f(named, writable)))
print('/cluster names %s -> first probe write committed on it via pgrelay: %s (%s after PostgreSQL became writable)'
      % (new, f(named, first), f(writable, first)))
if ev == 'switchover':
    print('failover key: pgrelay held new transactions %s before the old leader\'s fast shutdown request; hold -> new leader routed: %s'
          % (f(hold, pgstop), f(hold, float(route) if route else None)))
json.dump(dict(event=ev, new=new, pgbench_exit=rc, processed=processed, failed=failed, aborted=aborted,
               probe_errors=len(perr), longest_ms=lat / 1000.0,
               cluster_after_event_ms=(named - t_ev) * 1000 if named else None,
               route_after_cluster_ms=(float(route) - named) * 1000 if (route and named) else None,
               first_write_after_cluster_ms=(first - named) * 1000 if (first and named) else None,
               writable_after_cluster_ms=(writable - named) * 1000 if (writable and named) else None,
               hold_before_shutdown_ms=(pgstop - hold) * 1000 if (hold and pgstop) else None),
          open(d + '/summary.json', 'w'))
PY
}

for ev in "${EVENTS[@]}"; do
  case $ev in switchover|crash) run_event "$ev";; *) die "unknown event $ev (switchover|crash)";; esac
  sleep 2
done
log "raw data in $OUT"
