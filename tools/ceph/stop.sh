#!/usr/bin/env bash
# Stop the cluster tools/ceph/start.sh started; keeps its state unless --purge.
#
#   tools/ceph/stop.sh [--purge] [STATE_DIR]
# Each daemon gets SIGTERM and at most 20 s to exit, then SIGKILL.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
PURGE=0
if [[ ${1:-} == --purge ]]; then
    PURGE=1
    shift
fi
DIR=$(realpath -m "${1:-${VMCLOUD_CEPH_DIR:-$REPO/.cache/ceph}}")

for name in osd.0 mgr.x mon.a; do
    pidfile=$DIR/run/$name.pid
    [[ -f $pidfile ]] || continue
    pid=$(cat "$pidfile")
    # Only a ceph daemon of this directory: a stale pid file may name another process now.
    if kill -0 "$pid" 2>/dev/null && grep -qa "$DIR/ceph.conf" "/proc/$pid/cmdline"; then
        kill -TERM "$pid"
        for _ in $(seq 1 200); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    fi
    rm -f "$pidfile"
done
if ((PURGE)); then
    rm -rf "$DIR"
fi
