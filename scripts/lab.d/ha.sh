#!/usr/bin/env bash
# HA actions on pgrelay's Patroni lab (ports and directory from lib.sh's env variables).
#   ha.sh leader             print the running leader's name (empty if none), exit 1 if none
#   ha.sh switchover         patronictl switchover from the current leader to the other node (--force)
#   ha.sh kill-leader        SIGKILL the leader's patroni, its postmaster and every postmaster child, in one kill(1);
#                            prints "KILLED <node> <epoch seconds>" (the node stays down: `up.sh` restarts it)
#   ha.sh wait-leader OLD S  wait up to S seconds until /cluster names a running leader other than OLD;
#                            prints "LEADER <node> <epoch seconds>"
set -euo pipefail
. "$(dirname "$0")/lib.sh"

other() { [ "$1" = node1 ] && echo node2 || echo node1; }

cmd=${1:-}
case "$cmd" in
  leader)
    l=$(leader_name); echo "$l"; [ -n "$l" ];;
  switchover)
    old=$(leader_name); [ -n "$old" ] || die "no running leader to switch over from"
    new=$(other "$old")
    log "switchover $old -> $new (patronictl)"
    t0=$(now)
    timeout 60 "$PATRONICTL_BIN" -c "$LAB/conf/patroni1.yml" switchover --leader "$old" --candidate "$new" --force \
      || die "patronictl switchover failed"
    log "patronictl returned after $(elapsed "$t0") s";;
  kill-leader)
    old=$(leader_name); [ -n "$old" ] || die "no running leader to kill"
    n=${old#node}
    pat=$(patroni_pid "$n") || true
    pm=$(postmaster_pid "$n") || true
    [ -n "$pat" ] || die "$old: patroni pid not found"
    [ -n "$pm" ] || die "$old: postmaster pid not found"
    # A process that exits during the scan makes awk fail on its vanished /proc file: not an error here.
    kids=$(awk -v p="$pm" '{sub(/.*\) /, ""); if ($2 == p) print FILENAME}' /proc/[0-9]*/stat 2>/dev/null \
           | cut -d/ -f3 | tr '\n' ' ' || true)
    # shellcheck disable=SC2086
    kill -KILL "$pat" "$pm" $kids 2>/dev/null || true
    echo "KILLED $old $(now)"
    log "SIGKILL -> $old: patroni $pat, postmaster $pm, children: $kids";;
  wait-leader)
    old=${2:-}; secs=${3:-30}
    for ((i = 0; i < secs * 20; i++)); do
      l=$(leader_name)
      if [ -n "$l" ] && [ "$l" != "$old" ]; then echo "LEADER $l $(now)"; exit 0; fi
      sleep 0.05
    done
    die "no new leader (other than '$old') within $secs s";;
  *) echo "usage: $0 leader|switchover|kill-leader|wait-leader OLD SECS" >&2; exit 2;;
esac
