# shellcheck shell=bash
# Shared helpers for pgrelay's loopback-only Patroni lab (sourced by the scripts in scripts/lab.d and by scripts/lab).
# Adapted from the project's lab kit (shared/lab/patroni): ports and the lab directory are configurable so that
# tests/patroni.rs can run its own cluster on other ports. Everything binds to 127.0.0.1; every wait is bounded;
# processes are stopped by PID (pid files, postmaster.pid), never by name.
#
# env: PGRELAY_LAB (default /tmp/pgrelay-lab), LAB_USER (default postgres, used when run as root),
#      LAB_ETCD_PORT (2379) LAB_ETCD_PEER_PORT (2380) LAB_PG_PORT1 (15432) LAB_PG_PORT2 (15433)
#      LAB_REST_PORT1 (8008) LAB_REST_PORT2 (8009) LAB_SYNC_MODE (0; 1 = bootstrap with synchronous_mode on)
#      PG_BIN (/usr/lib/postgresql/15/bin) READY_TIMEOUT (120)

LAB=${PGRELAY_LAB:-/tmp/pgrelay-lab}
LAB=${LAB%/}
KIT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
ETCD_BIN=${ETCD_BIN:-/usr/bin/etcd}
PATRONI_BIN=${PATRONI_BIN:-/usr/bin/patroni}
PATRONICTL_BIN=${PATRONICTL_BIN:-/usr/bin/patronictl}

ETCD_CLIENT_PORT=${LAB_ETCD_PORT:-2379}
ETCD_PEER_PORT=${LAB_ETCD_PEER_PORT:-2380}
NODES="1 2"
pg_port() { local v="LAB_PG_PORT$1"; echo "${!v:-$((15431 + $1))}"; }     # node1 -> 15432, node2 -> 15433
rest_port() { local v="LAB_REST_PORT$1"; echo "${!v:-$((8007 + $1))}"; }  # node1 -> 8008,  node2 -> 8009
INSTALL_HINT="apt-get install -y patroni etcd-server etcd-client python3-psycopg2 postgresql (or run: scripts/lab up, which installs them)"

case "$LAB" in
  ""|/|/tmp|/root|/home|/var|/usr|/etc) echo "refusing PGRELAY_LAB='$LAB'" >&2; exit 2;;
esac

# PostgreSQL and Patroni refuse to run as root, so when invoked as root every lab process runs as $RUN_USER.
if [ "$(id -u)" = 0 ]; then
  RUN_USER=${LAB_USER:-postgres}
else
  RUN_USER=$(id -un)
fi

log() { printf '%s %s\n' "$(date +%H:%M:%S.%3N)" "$*"; }
die() { log "ERROR: $*" >&2; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.2f", b-a}'; }

as_user() {
  if [ "$(id -u)" = 0 ]; then
    setpriv --reuid="$RUN_USER" --regid="$(id -g "$RUN_USER")" --init-groups -- "$@"
  else
    "$@"
  fi
}

ensure_user() {
  [ "$(id -u)" = 0 ] || return 0
  if ! getent passwd "$RUN_USER" >/dev/null; then
    log "creating system user $RUN_USER"
    useradd --system --user-group --home-dir /var/lib/postgresql --shell /bin/bash "$RUN_USER" \
      || die "cannot create user $RUN_USER"
  fi
}

# port_busy PORT -> 0 if something accepts TCP connections on 127.0.0.1:PORT
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# pid_matches PID SUBSTRING -> 0 if PID is alive and its command line contains SUBSTRING
# (guards against a stale pid file whose PID was recycled by an unrelated process)
pid_matches() {
  local pid=$1 want=$2 cmd
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  cmd=$(tr '\0' ' ' 2>/dev/null < "/proc/$pid/cmdline") || return 1
  case "$cmd" in *"$want"*) return 0;; esac
  return 1
}

read_pidfile() { [ -s "$1" ] && head -n1 "$1" | tr -dc '0-9'; }

# alive PID -> 0 if PID exists and is not a zombie (kill -0 succeeds on a zombie; PID 1 may reap late).
alive() {
  local st
  st=$(awk '{sub(/.*\) /, ""); print $1}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}

# wait_gone PID SECONDS -> 0 once PID has exited, 1 on timeout (polls every 0.1 s)
wait_gone() {
  local pid=$1 n=$(( $2 * 10 )) i
  for ((i = 0; i < n; i++)); do
    alive "$pid" || return 0
    sleep 0.1
  done
  ! alive "$pid"
}

# Processes of this lab: cwd inside $LAB/etcd or $LAB/node<N> (etcd, patroni, every postgres process), or a
# command line naming $LAB/conf/ or $LAB/etcd/ (patroni, pgrelay). Prints "PID<TAB>cmdline".
# Never lists this shell or its parents.
lab_pids() {
  local p chain=" $$ " q=$$
  for _ in 1 2 3 4 5 6 7 8; do
    q=$(awk '/^PPid:/{print $2}' "/proc/$q/status" 2>/dev/null) || break
    [ -n "$q" ] && [ "$q" != 0 ] || break
    chain="$chain$q "
  done
  {
    find /proc/[0-9]*/cwd -maxdepth 0 \( -lname "$LAB/etcd" -o -lname "$LAB/etcd/*" \
         -o -lname "$LAB/node[0-9]" -o -lname "$LAB/node[0-9]/*" \) 2>/dev/null | cut -d/ -f3 || true
    grep -l -a -F -e "$LAB/conf/" -e "$LAB/etcd/" /proc/[0-9]*/cmdline 2>/dev/null | cut -d/ -f3 || true
  } | sort -un | while read -r p; do
    case "$chain" in *" $p "*) continue;; esac
    [ -r "/proc/$p/cmdline" ] || continue
    printf '%s\t%s\n' "$p" "$(tr '\0' ' ' 2>/dev/null < "/proc/$p/cmdline")"
  done
  return 0
}

etcd_healthy() { curl -s --max-time 1 "http://127.0.0.1:$ETCD_CLIENT_PORT/health" 2>/dev/null | grep -q '"health":"true"'; }

# The /cluster JSON from the first member that answers (empty if none does).
cluster_json() {
  local n
  for n in $NODES; do
    curl -sf --max-time 0.5 "http://127.0.0.1:$(rest_port "$n")/cluster" 2>/dev/null && return 0
  done
  return 1
}

# Name of the running leader according to /cluster ("" if none).
leader_name() {
  cluster_json | /usr/bin/python3 -c 'import json,sys
try:
    print([m["name"] for m in json.load(sys.stdin)["members"] if m["role"]=="leader" and m["state"]=="running"][0])
except Exception:
    pass' 2>/dev/null || true
}

patroni_pid() {  # prints the PID of node $1's patroni if it is running
  local pid
  pid=$(read_pidfile "$LAB/run/patroni$1.pid") || true
  pid_matches "$pid" "$LAB/conf/patroni$1.yml" && echo "$pid"
}
postmaster_pid() {  # prints the PID of node $1's postmaster if it is running
  local pm
  pm=$(read_pidfile "$LAB/node$1/data/postmaster.pid") || true
  pid_matches "$pm" "$LAB/node$1/data" && echo "$pm"
}
