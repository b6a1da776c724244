#!/usr/bin/env bash
# pgrelay next to pgbouncer in one run, same PostgreSQL, same userlist, both with trust for clients:
#   1. RSS with 0, 1,000 and 10,000 idle clients, and per idle client;
#   2. pgbench -S -c 1000 -j 2 and -c 2000 -j 2 against a pool of 20: TPS and p99 latency (from pgbench -l).
# Usage: benches/memory.sh [seconds per pgbench run, default 15]. Builds pgrelay --release. Needs root (PostgreSQL and
# pgbouncer run as user postgres via setpriv), Debian's postgresql, pgbouncer and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-15}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
ulimit -n "$(ulimit -Hn)"
cargo build --release -q
RELAY=${CARGO_TARGET_DIR:-target}/release/pgrelay
W=$(mktemp -d /tmp/pgrelay-bench.XXXXXX)
chmod 755 "$W"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PGP=$(free_port); RP=$(free_port); BP=$(free_port); MP=$(free_port)
as_pg() { setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }
cleanup() {
  [ -n "${HOLD_PID:-}" ] && kill "$HOLD_PID" 2>/dev/null || true
  [ -n "${RELAY_PID:-}" ] && kill -INT "$RELAY_PID" 2>/dev/null || true
  [ -n "${BOUNCER_PID:-}" ] && kill -TERM "$BOUNCER_PID" 2>/dev/null || true
  as_pg "$PG_BIN/pg_ctl" -D "$W/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$W"
}
trap cleanup EXIT

# PostgreSQL.
echo secret >"$W/pw"; chown -R postgres:postgres "$W"
as_pg "$PG_BIN/initdb" -D "$W/data" -U postgres --auth=scram-sha-256 --pwfile="$W/pw" -E UTF8 --locale=C >/dev/null
cat >>"$W/data/postgresql.conf" <<CONF
fsync = off
synchronous_commit = off
max_connections = 200
shared_buffers = 128MB
listen_addresses = '127.0.0.1'
unix_socket_directories = '$W'
CONF
as_pg "$PG_BIN/pg_ctl" -D "$W/data" -l "$W/pg.log" -o "-p $PGP" -w start >/dev/null
export PGPASSWORD=secret
pgbench -i -s 10 -q -h 127.0.0.1 -p "$PGP" -U postgres postgres >/dev/null 2>&1

# Same userlist for both.
printf '"postgres" "secret"\n' >"$W/userlist.txt"
cat >"$W/proxy.toml" <<CONF
[proxy]
listen = "127.0.0.1:$RP"
max_client_conn = 20000
default_pool_size = 20
query_wait_timeout = "60s"
[auth]
type = "trust"
file = "userlist.txt"
[metrics]
listen = "127.0.0.1:$MP"
[health]
enabled = false
[databases.postgres]
host = "127.0.0.1"
port = $PGP
CONF
cat >"$W/pgbouncer.ini" <<CONF
[databases]
postgres = host=127.0.0.1 port=$PGP dbname=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BP
unix_socket_dir =
auth_type = trust
auth_file = $W/userlist.txt
pool_mode = transaction
default_pool_size = 20
max_client_conn = 20000
query_wait_timeout = 60
logfile = $W/pgbouncer.log
CONF
chown -R postgres:postgres "$W"
RUST_LOG=warn "$RELAY" --config "$W/proxy.toml" >"$W/pgrelay.log" 2>&1 &
RELAY_PID=$!
# Not through the as_pg function: a backgrounded function is a subshell, and $! would be that shell, not pgbouncer.
setpriv --reuid=postgres --regid=postgres --init-groups pgbouncer -q "$W/pgbouncer.ini" &
BOUNCER_PID=$!
for p in $RP $BP; do
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null && break; sleep 0.1; done
done
# One transaction each, so both have a server connection and their steady-state allocations.
for p in $RP $BP; do psql -X -q -h 127.0.0.1 -p "$p" -U postgres -c 'select 1' postgres >/dev/null; done

rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
idle_rss() { # name pid port n
  local rss0 rss1 fifo
  rss0=$(rss "$2")
  fifo="$W/hold.$3.$4"; mkfifo "$fifo"; rm -f "$W/hold.out"
  python3 benches/idle_clients.py "$3" "$4" <"$fifo" >"$W/hold.out" & HOLD_PID=$!
  exec 5>"$fifo"
  for _ in $(seq 600); do grep -q ready "$W/hold.out" 2>/dev/null && break; sleep 0.1; done
  grep -q ready "$W/hold.out" || { echo "$1: $4 idle clients did not connect"; cat "$W/hold.out"; }
  sleep 1
  rss1=$(rss "$2")
  if [ "$4" -gt 0 ]; then
    printf '%-10s %6d idle clients: RSS %8d KiB (base %d KiB) = %7.0f bytes per client\n' "$1" "$4" "$rss1" "$rss0" \
      "$(echo "($rss1 - $rss0) * 1024 / $4" | bc -l)"
  else
    printf '%-10s %6d idle clients: RSS %8d KiB\n' "$1" 0 "$rss1"
  fi
  exec 5>&-; wait "$HOLD_PID" 2>/dev/null || true; HOLD_PID=
  rm -f "$fifo"; sleep 1
}
echo "== RSS per idle client (connections held open by benches/idle_clients.py)"
for n in 0 1000 10000; do
  idle_rss pgrelay "$RELAY_PID" "$RP" "$n"
  idle_rss pgbouncer "$BOUNCER_PID" "$BP" "$n"
done

echo "== pgbench -S -j 2 -T $SECS against a pool of 20 (p99 from the per-transaction log)"
bench() { # name port clients
  local dir="$W/log.$1.$3"; mkdir -p "$dir"
  local out
  out=$(cd "$dir" && pgbench -n -S -c "$3" -j 2 -T "$SECS" -l -h 127.0.0.1 -p "$2" -U postgres postgres 2>&1) || {
    echo "$1 c$3: pgbench failed"; echo "$out" | tail -5; return; }
  local tps p99 p50 failed
  tps=$(echo "$out" | awk -F'= ' '/^tps/ {print $2}' | awk '{print $1}')
  failed=$(echo "$out" | awk -F': ' '/failed transactions/ {print $2}' | awk '{print $1}')
  read -r p50 p99 < <(cat "$dir"/pgbench_log.* | awk '{print $3}' | sort -n | awk '{a[NR]=$1} END {printf "%.2f %.2f\n", a[int(NR*0.5)]/1000, a[int(NR*0.99)]/1000}')
  printf '%-10s -c %4d: tps %9.0f  p50 %7.2f ms  p99 %7.2f ms  failed %s\n' "$1" "$3" "$tps" "$p50" "$p99" "$failed"
  rm -rf "$dir"
}
for c in 1000 2000; do
  bench pgrelay "$RP" "$c"
  bench pgbouncer "$BP" "$c"
done
