#!/usr/bin/env bash
# benches/run.sh - PostgreSQL direct vs Debian's pgbouncer vs pgrelay, side by side, in one interleaved run.
#
# Sets up everything in a temp dir and tears it down on exit (nothing is left running):
#   - a throwaway PostgreSQL 15 (initdb, its own port on 127.0.0.1, max_connections 600,
#     md5 passwords, pgbench -i -s SCALE),
#   - pgbouncer (transaction mode, pool POOL, auth_type md5 with a userlist),
#   - pgrelay (transaction mode, pool POOL, [auth] type md5 with the same userlist),
# both proxies reaching PostgreSQL the same way (Unix socket by default, -T tcp for loopback TCP).
# When a tls* workload is selected, a self-signed certificate is made with openssl and all three
# accept TLS from clients (PostgreSQL ssl = on, pgbouncer client_tls_sslmode = allow, pgrelay
# [tls] mode = "allow"); the proxies still talk to PostgreSQL without TLS.
# Then, for every workload, runs pgbench against the targets interleaved for R rounds
# (direct, pgbouncer, pgrelay, direct, ...) and prints a table per workload.
#
# Usage:
#   benches/run.sh [options]
#
# Options:
#   -w LIST        workloads, comma separated (default: all built-in ones, see below)
#   -W 'NAME:ARGS' define/override a workload (pgbench args without -T), repeatable
#   -t LIST        targets, comma separated, from direct,pgbouncer,pgrelay,pgrelay-noobs,pgrelay-busypoll
#                  (default direct,pgbouncer,pgrelay); pgrelay-busypoll = pgrelay with busy_poll = "$BUSY_POLL"
#                  (environment, default 200us)
#   --observability off
#                  observability comparison mode: targets pgrelay (observability = true) and
#                  pgrelay-noobs (observability = false), unless -t says otherwise;
#                  default workloads select-simple,select-extended
#   -r ROUNDS      rounds per workload (default 3)
#   -d SECONDS     duration of every pgbench run (default 10)
#   -p POOL        pool size of both proxies (default 20)
#   -s SCALE       pgbench scale factor (default 10)
#   -T unix|tcp    how the proxies reach PostgreSQL (default unix)
#   -b BINARY      pgrelay binary (default target/release/pgrelay of this checkout, built if missing)
#   -o DIR         results dir (default benches/results/<date>)
#   -k             keep pgbench per-transaction logs (default: deleted after parsing)
#   -K             keep the temp dir (data dir, configs) after exit
#   -u SECONDS     warm-up per target before the first workload (default 3, 0 = off)
#   -S DIR         summary only: re-print the tables of an existing results dir
#   -h             help
#
# Built-in workloads (pgbench -n ... -T DURATION; all against 127.0.0.1):
#   select-simple    -S -M simple   -c 20 -j 2
#   select-extended  -S -M extended -c 20 -j 2
#   select-prepared  -S -M prepared -c 20 -j 2   (pgbouncer runs -M extended instead: 1.18 breaks on
#                                                   prepared statements in transaction mode)
#   tpcb             -M simple -c 20 -j 2         (VACUUM/TRUNCATE history/CHECKPOINT before each run)
#   c1               -S -M simple -c 1 -j 1       (single-client latency)
#   c500             -S -M simple -c 500 -j 2     (many clients, pool POOL)
#   reconnect        -S -M simple -C -c 50 -j 2   (new connection per transaction, md5 auth each time)
#   tls              -S -M simple -c 20 -j 2      (clients connect with TLS: PGSSLMODE=require)
#   c2000            -S -M simple -c 2000 -j 2    (2000 clients, pool POOL; direct is skipped, "n/a",
#                                                   when PostgreSQL's max_connections cannot take them)
# A workload whose name starts with "tls" connects with PGSSLMODE=require (so -W 'tls-ext:-S -M extended
# -c 20 -j 2' adds another TLS workload); every other workload connects with PGSSLMODE=disable.
# Both proxies get max_client_conn = max(1000, largest -c + 100); the script raises `ulimit -n`.
#
# Per run it records: TPS, average latency and percentiles p1 ... p99.99 and max (pgbench per-transaction log), failed
# transactions, aborted clients, proxy process CPU (user and system, /proc/PID/stat), proxy context
# switches (voluntary/nonvoluntary, summed over /proc/PID/task/*/status), PostgreSQL process tree CPU,
# pgbench CPU, machine busy CPU and machine context switches (/proc/stat).
# Results dir: runs.tsv + runs.jsonl (raw, one line per run), summary.md, summary.txt, header.txt,
# latency.svg (latency percentile curves per workload and target),
# logs/ (postgres, pgbouncer, pgrelay logs; pgbench stdout/stderr per run).

set -u -o pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
PGBIN=/usr/lib/postgresql/15/bin
ROUNDS=3
DURATION=10
POOL=20
SCALE=10
TRANSPORT=unix
PGRELAY_BIN=""
OUTDIR=""
KEEP_LOGS=0
KEEP_TMP=0
WARMUP=3
PAUSE=1
MAX_CONNECTIONS=600
# quantiles stored per run (runs.tsv column lat_pct_ms, runs.jsonl): name=fraction; max is added after them
PCT_POINTS="p1=0.01 p5=0.05 p10=0.10 p25=0.25 p50=0.50 p75=0.75 p90=0.90 p95=0.95 p99=0.99 p99.5=0.995 p99.9=0.999 p99.99=0.9999"
SUMMARY_ONLY=""
OBS_MODE=""
TARGETS=""
WORKLOADS=""
DEFAULT_WORKLOADS="select-simple,select-extended,select-prepared,tpcb,c1,c500,reconnect,tls,c2000"
declare -A WL
WL[select-simple]="-S -M simple -c 20 -j 2"
WL[select-extended]="-S -M extended -c 20 -j 2"
WL[select-prepared]="-S -M prepared -c 20 -j 2"
WL[tpcb]="-M simple -c 20 -j 2"
WL[c1]="-S -M simple -c 1 -j 1"
WL[c500]="-S -M simple -c 500 -j 2"
WL[reconnect]="-S -M simple -C -c 50 -j 2"
WL[tls]="-S -M simple -c 20 -j 2"
WL[c2000]="-S -M simple -c 2000 -j 2"
# per workload+target overrides
declare -A WL_FOR
WL_FOR[select-prepared/pgbouncer]="-S -M extended -c 20 -j 2"

usage() { sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "run.sh: $*" >&2; exit 1; }

# long options first
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --observability) [ "${2:-}" = off ] || die "--observability takes 'off'"; OBS_MODE=off; shift 2 ;;
    --observability=off) OBS_MODE=off; shift ;;
    --help) usage 0 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
set -- "${ARGS[@]+"${ARGS[@]}"}"
while getopts "w:W:t:r:d:p:s:T:b:o:kKu:S:h" opt; do
  case "$opt" in
    w) WORKLOADS=$OPTARG ;;
    W) WL[${OPTARG%%:*}]=${OPTARG#*:} ;;
    t) TARGETS=$OPTARG ;;
    r) ROUNDS=$OPTARG ;;
    d) DURATION=$OPTARG ;;
    p) POOL=$OPTARG ;;
    s) SCALE=$OPTARG ;;
    T) TRANSPORT=$OPTARG ;;
    b) PGRELAY_BIN=$OPTARG ;;
    o) OUTDIR=$OPTARG ;;
    k) KEEP_LOGS=1 ;;
    K) KEEP_TMP=1 ;;
    u) WARMUP=$OPTARG ;;
    S) SUMMARY_ONLY=$OPTARG ;;
    h) usage 0 ;;
    *) usage 1 ;;
  esac
done
shift $((OPTIND - 1))
[ $# -eq 0 ] || die "unexpected argument '$1' (see -h)"

if [ -n "$SUMMARY_ONLY" ]; then
  exec python3 "$HERE/summarize.py" "$SUMMARY_ONLY"
fi

if [ "$OBS_MODE" = off ]; then
  [ -n "$TARGETS" ] || TARGETS="pgrelay,pgrelay-noobs"
  [ -n "$WORKLOADS" ] || WORKLOADS="select-simple,select-extended"
fi
[ -n "$TARGETS" ] || TARGETS="direct,pgbouncer,pgrelay"
[ -n "$WORKLOADS" ] || WORKLOADS=$DEFAULT_WORKLOADS
TARGETS=${TARGETS//,/ }
WORKLOADS=${WORKLOADS//,/ }
for t in $TARGETS; do
  case "$t" in direct|pgbouncer|pgrelay|pgrelay-noobs|pgrelay-busypoll) ;; *) die "unknown target '$t'" ;; esac
done
for w in $WORKLOADS; do [ -n "${WL[$w]:-}" ] || die "unknown workload '$w'"; done
wl_args() { echo "${WL_FOR[$1/$2]:-${WL[$1]}}"; }          # wl_args WORKLOAD TARGET
wl_clients() {                                               # wl_clients ARGS: pgbench's -c (default 1)
  local a=" $1 "
  if [[ "$a" =~ \ -c\ *([0-9]+)\  ]]; then echo "${BASH_REMATCH[1]}"; else echo 1; fi
}
wl_sslmode() { case "$1" in tls*) echo require ;; *) echo disable ;; esac; }
NEED_TLS=0
MAX_CLIENTS=1
for w in $WORKLOADS; do
  [ "$(wl_sslmode "$w")" = require ] && NEED_TLS=1
  for t in $TARGETS; do
    c=$(wl_clients "$(wl_args "$w" "$t")")
    [ "$c" -gt "$MAX_CLIENTS" ] && MAX_CLIENTS=$c
  done
done
PROXY_MAX_CLIENT_CONN=$((MAX_CLIENTS + 100 > 1000 ? MAX_CLIENTS + 100 : 1000))
[[ "$ROUNDS" =~ ^[0-9]+$ && "$ROUNDS" -ge 1 && "$ROUNDS" -le 50 ]] || die "bad -r"
[[ "$DURATION" =~ ^[0-9]+$ && "$DURATION" -ge 1 && "$DURATION" -le 3600 ]] || die "bad -d"
[[ "$POOL" =~ ^[0-9]+$ && "$POOL" -ge 1 && "$POOL" -le 200 ]] || die "bad -p"
[[ "$SCALE" =~ ^[0-9]+$ && "$SCALE" -ge 1 ]] || die "bad -s"
[ "$TRANSPORT" = unix ] || [ "$TRANSPORT" = tcp ] || die "-T takes unix or tcp"
[ "$(id -u)" = 0 ] || die "run as root (PostgreSQL and pgbouncer are started as the postgres user via setpriv)"
for b in "$PGBIN/initdb" "$PGBIN/postgres" "$PGBIN/pg_isready" /usr/bin/pgbench /usr/bin/psql python3 setpriv ss bc; do
  command -v "$b" >/dev/null || die "missing $b"
done
[ "$NEED_TLS" = 0 ] || command -v openssl >/dev/null || die "missing openssl (needed by the tls workloads)"
# Every client socket is a descriptor in pgbench and in the proxy (which inherits this limit through setpriv).
ulimit -n 65536 2>/dev/null || ulimit -n 16384 2>/dev/null || ulimit -n 4096 2>/dev/null || true
NOFILE=$(ulimit -n)
[ "$NOFILE" = unlimited ] || [ "$NOFILE" -ge $((MAX_CLIENTS + 256)) ] \
  || die "ulimit -n is $NOFILE, too low for $MAX_CLIENTS clients (raise the hard limit)"
if [[ " $TARGETS " == *" pgbouncer "* ]]; then
  command -v pgbouncer >/dev/null || die "missing pgbouncer (apt-get install -y pgbouncer)"
fi
if [[ " $TARGETS " == *" pgrelay"* ]]; then
  if [ -z "$PGRELAY_BIN" ]; then
    PGRELAY_BIN=${CARGO_TARGET_DIR:-$REPO/target}/release/pgrelay
    if [ ! -x "$PGRELAY_BIN" ]; then
      echo "building pgrelay (cargo build --release) ..."
      (cd "$REPO" && cargo build --release -j 2) || die "cargo build failed"
    fi
  fi
  [ -x "$PGRELAY_BIN" ] || die "no pgrelay binary at $PGRELAY_BIN"
fi

# ---------- layout ----------
STAMP=$(date +%Y%m%d-%H%M%S)
[ -n "$OUTDIR" ] || OUTDIR=$HERE/results/$STAMP
mkdir -p "$OUTDIR/logs/pgbench" || die "cannot create $OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
TMP=$(mktemp -d /tmp/pgrelay-bench.XXXXXX) || die "mktemp failed"
chmod 755 "$TMP"
mkdir -p "$TMP/data" "$TMP/sock" "$TMP/txlog"
TLS_CERT=$TMP/tls/server.crt
TLS_KEY=$TMP/tls/server.key
if [ "$NEED_TLS" = 1 ]; then
  # Self-signed, for this run only. Owned by postgres, key 0600: PostgreSQL refuses a key others can read.
  mkdir -p "$TMP/tls"
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=localhost" \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" -keyout "$TLS_KEY" -out "$TLS_CERT" \
    >"$TMP/openssl.log" 2>&1 || { cat "$TMP/openssl.log" >&2; die "openssl could not make a certificate"; }
  chmod 600 "$TLS_KEY"
fi
chown -R postgres:postgres "$TMP"
HZ=$(getconf CLK_TCK)
NCPU=$(nproc)

as_pg() { (cd "$TMP" && exec setpriv --reuid=postgres --regid=postgres --init-groups "$@"); }
# for `as_pg_bg prog ... &`: the backgrounded function already runs in a forked subshell; exec makes
# that subshell become prog (setpriv execs too), so $! is prog's PID (for CPU accounting and teardown)
as_pg_bg() { cd "$TMP" && exec setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }

USED_PORTS=" "
free_port() {
  local p
  # Below the ephemeral range (32768+), where thousands of benchmark client sockets would collide.
  for p in $(shuf -i 20000-32000 -n 300); do
    [[ "$USED_PORTS" == *" $p "* ]] && continue
    if [ -z "$(ss -Hltn "sport = :$p" 2>/dev/null)" ]; then USED_PORTS+="$p "; echo "$p"; return 0; fi
  done
  return 1
}

PG_PM="" ; PGB_PID="" ; declare -A RELAY_PID ; declare -A PORT ; declare -A CPU_PID
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  local p
  for t in "${!RELAY_PID[@]}"; do
    p=${RELAY_PID[$t]}; [ -n "$p" ] && kill -INT "$p" 2>/dev/null
  done
  [ -n "$PGB_PID" ] && kill -TERM "$PGB_PID" 2>/dev/null
  for i in $(seq 1 50); do
    local alive=0
    for p in "${RELAY_PID[@]}" $PGB_PID; do [ -n "$p" ] && kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break; sleep 0.2
  done
  for p in "${RELAY_PID[@]}" $PGB_PID; do [ -n "$p" ] && kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null; done
  if [ -n "$PG_PM" ] && kill -0 "$PG_PM" 2>/dev/null; then
    kill -INT "$PG_PM" 2>/dev/null   # fast shutdown
    for i in $(seq 1 100); do kill -0 "$PG_PM" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$PG_PM" 2>/dev/null && kill -QUIT "$PG_PM" 2>/dev/null
  fi
  wait 2>/dev/null
  cp -f "$TMP"/*.log "$OUTDIR/logs/" 2>/dev/null
  cp -f "$TMP"/*.toml "$TMP"/*.ini "$OUTDIR/logs/" 2>/dev/null
  if [ "$KEEP_TMP" = 1 ]; then echo "temp dir kept: $TMP"; else rm -rf "$TMP"; fi
  exit $rc
}
trap cleanup EXIT
trap 'echo "interrupted" >&2; exit 130' INT TERM

log_tail() {  # log_tail NAME FILE
  echo "---- last 30 lines of $1 log ($2) ----" >&2
  tail -n 30 "$2" >&2 2>/dev/null
  echo "----" >&2
}

# ---------- PostgreSQL ----------
PGPORT=$(free_port) || die "no free port"
echo "== setting up in $TMP (results: $OUTDIR)"
as_pg "$PGBIN/initdb" -D "$TMP/data" -U postgres --auth-local=trust --auth-host=md5 -E UTF8 --no-sync \
  >"$TMP/initdb.log" 2>&1 || { cat "$TMP/initdb.log" >&2; die "initdb failed"; }
cat >>"$TMP/data/postgresql.conf" <<EOF
port = $PGPORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$TMP/sock'
max_connections = $MAX_CONNECTIONS
shared_buffers = 256MB
password_encryption = md5
synchronous_commit = off
checkpoint_timeout = 30min
max_wal_size = 4GB
logging_collector = off
log_min_messages = warning
EOF
if [ "$NEED_TLS" = 1 ]; then
  cat >>"$TMP/data/postgresql.conf" <<EOF
ssl = on
ssl_cert_file = '$TLS_CERT'
ssl_key_file = '$TLS_KEY'
EOF
fi
as_pg_bg "$PGBIN/postgres" -D "$TMP/data" >"$TMP/postgres.log" 2>&1 &
PG_PM=$!
for i in $(seq 1 100); do
  "$PGBIN/pg_isready" -q -h "$TMP/sock" -p "$PGPORT" -U postgres -d postgres && break
  kill -0 "$PG_PM" 2>/dev/null || { log_tail postgres "$TMP/postgres.log"; die "postgres did not start"; }
  sleep 0.2
done
"$PGBIN/pg_isready" -q -h "$TMP/sock" -p "$PGPORT" -U postgres -d postgres || die "postgres not ready"
psql_su() { psql -X -q -h "$TMP/sock" -p "$PGPORT" -U postgres -v ON_ERROR_STOP=1 "$@"; }
psql_su -d postgres -c "CREATE ROLE bench LOGIN PASSWORD 'bench'" -c "CREATE DATABASE bench OWNER bench" \
  || die "creating role/database failed"
echo "== pgbench -i -s $SCALE"
pgbench -i -q -s "$SCALE" -h "$TMP/sock" -p "$PGPORT" -U bench bench >"$TMP/pgbench-init.log" 2>&1 \
  || { cat "$TMP/pgbench-init.log" >&2; die "pgbench -i failed"; }
psql_su -d bench -c "VACUUM ANALYZE" -c "CHECKPOINT" || die "vacuum failed"
PORT[direct]=$PGPORT
CPU_PID[direct]=""
# Direct runs share max_connections with the proxies' idle pools (and superuser_reserved_connections = 3);
# a workload with more clients than what is left is skipped for direct (n/a in the tables).
n_proxies=0
for t in $TARGETS; do [ "$t" = direct ] || n_proxies=$((n_proxies + 1)); done
DIRECT_MAX_CLIENTS=$((MAX_CONNECTIONS - 3 - n_proxies * POOL - 5))

cat >"$TMP/userlist.txt" <<'EOF'
"bench" "bench"
"pgrelay" "pgrelay"
"pgbouncer" "pgbouncer"
EOF
if [ "$TRANSPORT" = unix ]; then SRV_HOST=$TMP/sock; else SRV_HOST=127.0.0.1; fi

# ---------- pgbouncer ----------
if [[ " $TARGETS " == *" pgbouncer "* ]]; then
  PORT[pgbouncer]=$(free_port) || die "no free port"
  cat >"$TMP/pgbouncer.ini" <<EOF
[databases]
bench = host=$SRV_HOST port=$PGPORT dbname=bench

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = ${PORT[pgbouncer]}
unix_socket_dir =
auth_type = md5
auth_file = $TMP/userlist.txt
admin_users = pgbouncer
pool_mode = transaction
default_pool_size = $POOL
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = $PROXY_MAX_CLIENT_CONN
max_db_connections = 0
listen_backlog = 1024
ignore_startup_parameters = extra_float_digits
logfile = $TMP/pgbouncer.log
pidfile = $TMP/pgbouncer.pid
log_connections = 0
log_disconnections = 0
EOF
  if [ "$NEED_TLS" = 1 ]; then
    cat >>"$TMP/pgbouncer.ini" <<EOF
client_tls_sslmode = allow
client_tls_cert_file = $TLS_CERT
client_tls_key_file = $TLS_KEY
EOF
  fi
  chown postgres:postgres "$TMP/pgbouncer.ini" "$TMP/userlist.txt"
  as_pg_bg pgbouncer "$TMP/pgbouncer.ini" >"$TMP/pgbouncer.stderr.log" 2>&1 &
  PGB_PID=$!
  CPU_PID[pgbouncer]=$PGB_PID
fi

# ---------- pgrelay (one instance per pgrelay target) ----------
if [[ " $TARGETS " == *" pgrelay"* ]]; then
  cp "$PGRELAY_BIN" "$TMP/pgrelay" && chmod 755 "$TMP/pgrelay"   # the measured binary stays fixed
  chown postgres:postgres "$TMP/userlist.txt"
fi
for t in $TARGETS; do
  extra=
  case "$t" in
    pgrelay) obs=true ;;
    pgrelay-noobs) obs=false ;;
    pgrelay-busypoll) obs=true; extra="busy_poll = \"${BUSY_POLL:-200us}\"" ;;
    *) continue ;;
  esac
  PORT[$t]=$(free_port) || die "no free port"
  mport=$(free_port) || die "no free port"
  cat >"$TMP/$t.toml" <<EOF
[proxy]
listen = "127.0.0.1:${PORT[$t]}"
pool_mode = "transaction"
max_client_conn = $PROXY_MAX_CLIENT_CONN
default_pool_size = $POOL
min_pool_size = 0
reserve_pool_size = 0
observability = $obs
$extra

[auth]
type = "md5"
file = "$TMP/userlist.txt"
admin_users = ["pgrelay"]

[metrics]
listen = "127.0.0.1:$mport"

[databases.bench]
host = "$SRV_HOST"
port = $PGPORT
dbname = "bench"
EOF
  if [ "$NEED_TLS" = 1 ]; then
    printf '\n[tls]\nmode = "allow"\ncert = "%s"\nkey = "%s"\n' "$TLS_CERT" "$TLS_KEY" >>"$TMP/$t.toml"
  fi
  chown postgres:postgres "$TMP/$t.toml"
  as_pg "$TMP/pgrelay" check --config "$TMP/$t.toml" >"$TMP/$t.check.log" 2>&1 \
    || { cat "$TMP/$t.check.log" >&2; die "pgrelay check rejected $t.toml"; }
  NO_COLOR=1 as_pg_bg "$TMP/pgrelay" --config "$TMP/$t.toml" >"$TMP/$t.log" 2>&1 &
  RELAY_PID[$t]=$!
  CPU_PID[$t]=${RELAY_PID[$t]}
done

# wait for listeners
for t in $TARGETS; do
  [ "$t" = direct ] && continue
  for i in $(seq 1 50); do
    [ -n "$(ss -Hltn "sport = :${PORT[$t]}" 2>/dev/null)" ] && break
    kill -0 "${CPU_PID[$t]}" 2>/dev/null || break
    sleep 0.2
  done
  if [ -z "$(ss -Hltn "sport = :${PORT[$t]}" 2>/dev/null)" ]; then
    if [ "$t" = pgbouncer ]; then log_tail pgbouncer "$TMP/pgbouncer.log"; log_tail pgbouncer-stderr "$TMP/pgbouncer.stderr.log"
    else log_tail "$t" "$TMP/$t.log"; fi
    die "$t did not start listening on ${PORT[$t]}"
  fi
done
export PGPASSWORD=bench
# Non-TLS workloads must stay plaintext now that the targets may offer TLS (libpq's default, prefer, would take it).
export PGSSLMODE=disable
for t in $TARGETS; do
  psql -X -q -h 127.0.0.1 -p "${PORT[$t]}" -U bench -d bench -tAc "select 1" >/dev/null 2>"$TMP/smoke.err" \
    || { cat "$TMP/smoke.err" >&2; die "smoke query through $t failed"; }
  if [ "$NEED_TLS" = 1 ]; then   # sslmode=require fails unless the target really speaks TLS to the client
    PGSSLMODE=require psql -X -q -h 127.0.0.1 -p "${PORT[$t]}" -U bench -d bench -tAc "select 1" >/dev/null \
      2>"$TMP/smoke.err" || { cat "$TMP/smoke.err" >&2; die "TLS smoke query through $t failed"; }
  fi
done
if [ "$NEED_TLS" = 1 ]; then
  ssl_seen=$(PGSSLMODE=require psql -X -h 127.0.0.1 -p "$PGPORT" -U bench -d bench -tAc \
    "select ssl from pg_stat_ssl where pid = pg_backend_pid()" 2>/dev/null)
  [ "$ssl_seen" = t ] || die "direct TLS check: pg_stat_ssl says ssl='$ssl_seen'"
fi

# ---------- header ----------
GIT_REV=$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)
SRC_REV=$(git -C "$REPO" log -1 --format=%h -- src Cargo.toml Cargo.lock 2>/dev/null || echo unknown)
GIT_DIRTY=$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo " (dirty)" || true)
{
  echo "# run.sh $(date -Is)"
  echo "# command: benches/run.sh ${ARGS[*]-}"
  echo "# host: nproc=$NCPU cpu='$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')' kernel=$(uname -r) mem=$(free -m | awk '/^Mem:/{print $2}')MB"
  echo "# load average at start: $(cut -d" " -f1-3 /proc/loadavg)"
  echo "# os: $(. /etc/os-release && echo "$PRETTY_NAME")"
  echo "# postgres: $("$PGBIN/postgres" --version)"
  echo "# pgbench: $(pgbench --version)"
  [[ " $TARGETS " == *" pgbouncer "* ]] && echo "# pgbouncer: $(pgbouncer --version | head -1)"
  [[ " $TARGETS " == *" pgrelay"* ]] && echo "# pgrelay: commit $GIT_REV$GIT_DIRTY (last src change $SRC_REV) binary $PGRELAY_BIN sha256 $(sha256sum "$TMP/pgrelay" | cut -c1-16)"
  echo "# settings: rounds=$ROUNDS duration=${DURATION}s pool=$POOL scale=$SCALE proxy->postgres=$TRANSPORT auth=md5 warmup=${WARMUP}s order=rotating per round"
  echo "# limits: postgres max_connections=$MAX_CONNECTIONS (direct runs up to $DIRECT_MAX_CLIENTS clients) proxies max_client_conn=$PROXY_MAX_CLIENT_CONN ulimit -n $NOFILE"
  if [ "$NEED_TLS" = 1 ]; then
    echo "# tls: clients of tls* workloads connect with sslmode=require, others with sslmode=disable; self-signed RSA 2048 certificate ($(openssl version | cut -d' ' -f1-2)); postgres ssl=on, pgbouncer client_tls_sslmode=allow, pgrelay [tls] mode=allow; proxy->postgres without TLS"
  else
    echo "# tls: none (every client connects with sslmode=disable)"
  fi
  for t in $TARGETS; do echo "# target $t port=${PORT[$t]} cpu_pid=${CPU_PID[$t]:-'(postgres tree)'}"; done
  for w in $WORKLOADS; do
    echo "# workload $w: pgbench -n ${WL[$w]} -T $DURATION (sslmode=$(wl_sslmode "$w"))"
    for t in $TARGETS; do
      [ -n "${WL_FOR[$w/$t]:-}" ] && echo "#   ($t runs: pgbench -n ${WL_FOR[$w/$t]} -T $DURATION)"
      if [ "$t" = direct ] && [ "$(wl_clients "$(wl_args "$w" "$t")")" -gt "$DIRECT_MAX_CLIENTS" ]; then
        echo "#   (direct skipped: more clients than max_connections leaves free)"
      fi
    done
  done
} | tee "$OUTDIR/header.txt"

# ---------- /proc sampling ----------
proc_ut_st() {  # utime stime ticks of a whole process
  awk '{ s=$0; i=index(s, ") "); split(substr(s,i+2), f, " "); print f[12], f[13] }' "/proc/$1/stat" 2>/dev/null || echo "0 0"
}
proc_cs() {  # voluntary nonvoluntary context switches summed over the process's threads
  cat /proc/"$1"/task/*/status 2>/dev/null |
    awk '/^voluntary_ctxt_switches/{v+=$2} /^nonvoluntary_ctxt_switches/{n+=$2} END{print v+0, n+0}'
}
pg_tree_ticks() {  # postmaster self+reaped children + live children utime+stime
  cat /proc/[0-9]*/stat 2>/dev/null | awk -v pm="$1" '
    { s=$0; i=index(s, ") "); pid=substr(s,1,index(s," ")-1); split(substr(s,i+2), f, " ");
      if (pid==pm) t+=f[12]+f[13]+f[14]+f[15]; else if (f[2]==pm) t+=f[12]+f[13] }
    END { print t+0 }'
}
sys_sample() {  # busy ticks, context switches of the machine
  awk '/^cpu /{ b=$2+$3+$4+$7+$8+$9 } /^ctxt /{ c=$2 } END { print b, c }' /proc/stat
}
ms() { echo "scale=3; $1/1000" | bc -l | sed 's/^\./0./'; }

RUNS_TSV=$OUTDIR/runs.tsv
printf 'workload\ttarget\tround\tpgbench_args\ttps\tlat_avg_ms\tp50_ms\tp99_ms\tp999_ms\tn_tx\tfailed_tx\taborted_clients\trc\tproxy_user_s\tproxy_sys_s\tproxy_vcs\tproxy_nvcs\tpg_cpu_s\tpgbench_cpu_s\tsys_busy_s\tsys_ctxt\twall_s\tproxy_alive\tfirst_error\tlat_pct_ms\tskipped\n' >"$RUNS_TSV"

run_one() {  # run_one WORKLOAD TARGET ROUND
  local w=$1 t=$2 r=$3 port=${PORT[$2]} tag="$1_$2_r$3"
  local args; args=$(wl_args "$w" "$t")
  local out=$OUTDIR/logs/pgbench/$tag.out err=$OUTDIR/logs/pgbench/$tag.err tf=$TMP/$tag.time logp=$TMP/txlog/$tag
  local sslmode; sslmode=$(wl_sslmode "$w")
  if [ "$t" = direct ] && [ "$(wl_clients "$args")" -gt "$DIRECT_MAX_CLIENTS" ]; then
    local why="max_connections $MAX_CONNECTIONS leaves $DIRECT_MAX_CLIENTS clients"
    printf '%s\t%s\t%s\t%s\tNA\tNA\tNA\tNA\tNA\t0\tNA\t0\tNA\tNA\tNA\tNA\tNA\tNA\tNA\tNA\tNA\tNA\t-\t-\t-\t%s\n' \
      "$w" "$t" "$r" "$args" "$why" >>"$RUNS_TSV"
    printf '%-16s %-14s r%-2s skipped (%s)\n' "$w" "$t" "$r" "$why"
    return 0
  fi
  if [[ " $args " != *" -S "* ]]; then   # write workload: same starting point for every run
    timeout 300 psql -X -q -h "$TMP/sock" -p "$PGPORT" -U postgres -d bench -v ON_ERROR_STOP=1 \
      -c "VACUUM pgbench_branches, pgbench_tellers, pgbench_accounts" -c "TRUNCATE pgbench_history" -c "CHECKPOINT" \
      >/dev/null 2>>"$OUTDIR/logs/prep.err" || echo "WARNING: maintenance failed before $tag" >&2
  fi
  local pp=${CPU_PID[$t]} u0=0 u1=0 s0=0 s1=0 v0=0 v1=0 n0=0 n1=0 g0 g1 b0 b1 x0 x1 t0 t1
  [ -n "$pp" ] && { read -r u0 s0 < <(proc_ut_st "$pp"); read -r v0 n0 < <(proc_cs "$pp"); }
  g0=$(pg_tree_ticks "$PG_PM"); read -r b0 x0 < <(sys_sample); t0=$(date +%s.%N)
  # shellcheck disable=SC2086
  { TIMEFORMAT='%U %S'; time PGSSLMODE=$sslmode timeout $((DURATION + 120)) \
      pgbench -h 127.0.0.1 -p "$port" -U bench -n $args -T "$DURATION" \
              --log --log-prefix="$logp" bench >"$out" 2>"$err" ; } 2>"$tf"
  local rc=$?
  t1=$(date +%s.%N); read -r b1 x1 < <(sys_sample); g1=$(pg_tree_ticks "$PG_PM")
  [ -n "$pp" ] && { read -r u1 s1 < <(proc_ut_st "$pp"); read -r v1 n1 < <(proc_cs "$pp"); }
  local alive=-
  if [ -n "$pp" ]; then
    if kill -0 "$pp" 2>/dev/null; then alive=yes; else
      alive=no
      echo "ERROR: $t (pid $pp) is gone after $tag" >&2
      if [ "$t" = pgbouncer ]; then log_tail pgbouncer "$TMP/pgbouncer.log"; else log_tail "$t" "$TMP/$t.log"; fi
    fi
  fi
  local tps lat ntx failed aborted e pct p50 p99 p999 pctl
  tps=$(grep -oP '^tps = \K[0-9.]+' "$out" | head -1)
  lat=$(grep -oP '^latency average = \K[0-9.]+' "$out" | head -1)
  ntx=$(grep -oP '^number of transactions actually processed: \K[0-9]+' "$out" | head -1)
  failed=$(grep -oP '^number of failed transactions: \K[0-9]+' "$out" | head -1)
  aborted=$(grep -c 'aborted in command\|aborted while' "$err")
  e=$(grep -m1 -E 'ERROR|FATAL|error:|aborted' "$err" | tr '\t' ' ' | cut -c1-200)
  # field 3 of pgbench's per-transaction log = latency in microseconds. Nearest-rank percentiles: p50, p99,
  # p99.9 for the tables, and every PCT_POINTS quantile plus max as "p1=0.123;...;max=9.870" (ms) for the chart.
  pct=$(cat "$logp".* 2>/dev/null | awk '$3 ~ /^[0-9]+$/ { print $3 }' | sort -n -S 128M |
        awk -v pts="$PCT_POINTS" '
             function at(q,  i) { i=int(NR*q); if (i<NR*q) i++; if (i<1) i=1; return a[i]/1000 }
             { a[NR]=$1 }
             END { if (NR==0) { print "NA NA NA -"; exit }
                   n=split(pts, P, " "); s=""
                   for (k=1; k<=n; k++) { split(P[k], kv, "="); s=s sprintf("%s=%.3f;", kv[1], at(kv[2]+0)) }
                   printf "%.3f %.3f %.3f %smax=%.3f\n", at(0.50), at(0.99), at(0.999), s, a[NR]/1000 }')
  read -r p50 p99 p999 pctl <<<"${pct:-NA NA NA -}"
  [ "$KEEP_LOGS" = 1 ] && mkdir -p "$OUTDIR/txlog" && mv "$logp".* "$OUTDIR/txlog/" 2>/dev/null
  rm -f "$logp".*
  local ptime; ptime=$(awk '{ printf "%.2f", $1+$2 }' "$tf" 2>/dev/null)
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%.2f\t%.2f\t%s\t%s\t%.2f\t%s\t%.2f\t%s\t%.3f\t%s\t%s\t%s\t-\n' \
    "$w" "$t" "$r" "$args" "${tps:-NA}" "${lat:-NA}" "$p50" "$p99" "$p999" "${ntx:-0}" "${failed:-NA}" "$aborted" "$rc" \
    "$(echo "($u1-$u0)/$HZ" | bc -l)" "$(echo "($s1-$s0)/$HZ" | bc -l)" "$((v1 - v0))" "$((n1 - n0))" \
    "$(echo "($g1-$g0)/$HZ" | bc -l)" "${ptime:-NA}" "$(echo "($b1-$b0)/$HZ" | bc -l)" "$((x1 - x0))" \
    "$(echo "$t1-$t0" | bc -l)" "$alive" "${e:--}" "$pctl" >>"$RUNS_TSV"
  printf '%-16s %-14s r%-2s tps=%-9s lat=%-7s p99=%-7s fail=%-4s abort=%-3s rc=%s %s\n' \
    "$w" "$t" "$r" "${tps:-NA}" "${lat:-NA}" "$p99" "${failed:-NA}" "$aborted" "$rc" \
    "$( [ -n "$e" ] && echo "first error: $e")"
}

# ---------- warm-up (not recorded) ----------
if [ "$WARMUP" -gt 0 ]; then
  for t in $TARGETS; do
    timeout $((WARMUP + 60)) pgbench -h 127.0.0.1 -p "${PORT[$t]}" -U bench -n -S -c "$POOL" -j 2 -T "$WARMUP" bench \
      >/dev/null 2>"$TMP/warmup.err" || { echo "warm-up of $t returned $?:" >&2; head -3 "$TMP/warmup.err" >&2; }
  done
fi

# ---------- main loop: workload -> round -> target (interleaved) ----------
# The order of the targets rotates by one each round: the position in a round matters on a small noisy machine
# (with a fixed order, pgrelay ran 0.85x pgBouncer on select-simple behind it and 1.03x in front of it, same
# binaries), so with ROUNDS a multiple of the number of targets every target runs in every position equally often.
echo "== runs"
read -r -a TARGET_LIST <<<"$TARGETS"
for w in $WORKLOADS; do
  for ((r = 1; r <= ROUNDS; r++)); do
    n_t=${#TARGET_LIST[@]}
    for ((i = 0; i < n_t; i++)); do
      t=${TARGET_LIST[$(((i + r - 1) % n_t))]}
      run_one "$w" "$t" "$r"
      sleep "$PAUSE"
    done
  done
done

# ---------- after the runs: proxy state and log excerpts ----------
for t in $TARGETS; do
  case "$t" in
    pgrelay*) PGPASSWORD=pgrelay psql -X -h 127.0.0.1 -p "${PORT[$t]}" -U pgrelay pgrelay -c 'show pools' -c 'show stats' \
                >"$OUTDIR/logs/$t.admin.txt" 2>&1 ;;
    pgbouncer) PGPASSWORD=pgbouncer psql -X -h 127.0.0.1 -p "${PORT[$t]}" -U pgbouncer pgbouncer -c 'show pools' -c 'show stats' \
                >"$OUTDIR/logs/$t.admin.txt" 2>&1 ;;
  esac
done
{
  for t in $TARGETS; do
    case "$t" in pgbouncer) f=$TMP/pgbouncer.log ;; pgrelay*) f=$TMP/$t.log ;; *) f=$TMP/postgres.log ;; esac
    n=$(grep -ciE 'error|warn|fatal|panic' "$f" 2>/dev/null)
    echo "$t log: $(wc -l <"$f" 2>/dev/null) lines, $n matching error|warn|fatal|panic"
    grep -iE 'error|warn|fatal|panic' "$f" 2>/dev/null | sed -E 's/\x1b\[[0-9;]*m//g; s/^[0-9TZ:.-]+ +(UTC +\[[0-9]+\] +)?//; s/(client=|pid=)[^ ]+/\1*/g' | cut -c1-220 |
      sort | uniq -c | sort -rn | head -8 | sed 's/^/    /'
  done
} | tee "$OUTDIR/log-excerpts.txt"

python3 "$HERE/summarize.py" "$OUTDIR"
echo "results: $OUTDIR"
