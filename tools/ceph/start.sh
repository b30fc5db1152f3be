#!/usr/bin/env bash
# Start a single-node Ceph 16 cluster for vmcloud's tests and CI, without systemd or cephadm.
#
#   tools/ceph/start.sh [STATE_DIR]      (default: $VMCLOUD_CEPH_DIR, else .cache/ceph in the repo)
#
# One mon, one mgr and one bluestore OSD on a sparse file, cephx on, msgr v2 on 127.0.0.1
# only. vmcloud's reads, writes, omap and object locks need only the mon and the OSD; the mgr
# (about 300 MB of RSS) is what a real cluster has and what `ceph -s`, `ceph df` and the pool
# statistics need, so the tests run against the cluster users have. The start does not wait
# for the mgr to become active: clients do not need it. Everything lives under STATE_DIR.
# Writes there:
#   ceph.conf                 for the daemons, the `ceph`/`rados` CLI and librados clients
#   client.admin.keyring      full rights (used by this script and the benchmark's baseline)
#   client.vmcloud.keyring    caps on the vmcloud pool only (what vmcloud uses)
#   vmcloud.conf              the [storage_rados] options pointing at the two files above
# Idempotent: with the cluster up it does nothing; with the state present and the daemons
# gone (a machine restart) it starts them again from that state. Every wait is bounded.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
DIR=$(realpath -m "${1:-${VMCLOUD_CEPH_DIR:-$REPO/.cache/ceph}}")
PORT=${VMCLOUD_CEPH_PORT:-3300}
POOL=${VMCLOUD_CEPH_POOL:-vmcloud}
OSD_SIZE=${VMCLOUD_CEPH_OSD_SIZE:-20G}
WAIT=${VMCLOUD_CEPH_WAIT:-120}   # seconds, total, for the whole start
CONF=$DIR/ceph.conf
START=$(date +%s)

fail() { echo "tools/ceph/start.sh: $*" >&2; exit 1; }
left() { echo $((WAIT - ($(date +%s) - START))); }
admin() {
    local budget
    budget=$(left)
    ((budget > 0)) || fail "out of time ($WAIT s) before: ceph $*"
    timeout "$budget" ceph --conf "$CONF" --name client.admin --connect-timeout "$budget" "$@"
}
running() { [[ -f $DIR/run/$1.pid ]] && kill -0 "$(cat "$DIR/run/$1.pid")" 2>/dev/null; }
wait_until() {  # description, command...
    local what=$1
    shift
    until "$@" >/dev/null 2>&1; do
        (($(left) > 0)) || fail "$what not reached after $WAIT s; logs in $DIR/log"
        sleep 0.5
    done
}

for tool in ceph-mon ceph-mgr ceph-osd ceph ceph-authtool monmaptool; do
    command -v "$tool" >/dev/null ||
        fail "$tool missing: apt-get install ceph-mon ceph-mgr ceph-osd ceph-common"
done

if [[ ! -f $DIR/.ready ]]; then
    # A half-made cluster (a start that failed or was killed) cannot be resumed safely.
    if [[ -e $DIR ]]; then
        "$REPO/tools/ceph/stop.sh" "$DIR" >/dev/null 2>&1 || true
        rm -rf "$DIR/mon" "$DIR/mgr" "$DIR/osd" "$DIR/run" "$DIR/log" "$DIR"/*.keyring "$DIR"/*.conf \
            "$DIR/monmap" "$DIR/osd-secret.json"
    fi
    mkdir -p "$DIR/mon" "$DIR/mgr/x" "$DIR/osd/0" "$DIR/run" "$DIR/log"
    FSID=$(cat /proc/sys/kernel/random/uuid)
    cat >"$CONF" <<EOF
[global]
fsid = $FSID
mon_host = v2:127.0.0.1:$PORT
mon_initial_members = a
public_addr = 127.0.0.1
ms_bind_msgr1 = false
ms_bind_msgr2 = true
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
auth_allow_insecure_global_id_reclaim = false
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
mon_data_avail_warn = 5
mon_data_avail_crit = 2
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_crush_chooseleaf_type = 0
run_dir = $DIR/run
pid_file = $DIR/run/\$name.pid
log_file = $DIR/log/\$name.log
# No crash dumps outside the state directory.
crash_dir = $DIR/log
# The mgr's first modules: none that listens on a port (the default starts restful).
mgr_initial_modules = status

[mon]
mon_data = $DIR/mon/\$id
admin_socket = $DIR/run/\$name.asok
keyring = $DIR/mon.keyring

[osd]
osd_data = $DIR/osd/\$id
admin_socket = $DIR/run/\$name.asok
keyring = $DIR/osd/\$id/keyring
osd_objectstore = bluestore
bluestore_block_create = true
bluestore_block_size = $(numfmt --from=iec "$OSD_SIZE")
osd_memory_target = 1073741824
# 1 GiB instead of 128 MiB: a manifest of a fully written 512 GiB+ image is larger than
# 128 MiB, and the benchmark's baseline puts a whole image as one object.
osd_max_object_size = 1073741824

[client.admin]
keyring = $DIR/client.admin.keyring

[client.vmcloud]
keyring = $DIR/client.vmcloud.keyring
EOF
    ceph-authtool --create-keyring "$DIR/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    ceph-authtool --create-keyring "$DIR/client.admin.keyring" --gen-key -n client.admin \
        --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
    ceph-authtool "$DIR/mon.keyring" --import-keyring "$DIR/client.admin.keyring" >/dev/null
    monmaptool --create --fsid "$FSID" --addv a "[v2:127.0.0.1:$PORT]" "$DIR/monmap" >/dev/null
    ceph-mon --conf "$CONF" --mkfs -i a --monmap "$DIR/monmap" --keyring "$DIR/mon.keyring" \
        >"$DIR/log/mkfs-mon.log" 2>&1 || fail "ceph-mon --mkfs failed: $DIR/log/mkfs-mon.log"
    NEW=1
fi

running mon.a || ceph-mon --conf "$CONF" -i a || fail "ceph-mon did not start: $DIR/log/mon.a.log"
wait_until "mon answering on 127.0.0.1:$PORT" admin mon stat

if [[ ! -f $DIR/mgr/x/keyring ]]; then  # also for a cluster made before it had a mgr
    mkdir -p "$DIR/mgr/x"
    admin auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
        -o "$DIR/mgr/x/keyring"
fi
# Its paths on the command line, not in ceph.conf: a cluster made before it had a mgr has a
# ceph.conf without them.
running mgr.x || ceph-mgr --conf "$CONF" -i x --mgr-data "$DIR/mgr/x" \
    --keyring "$DIR/mgr/x/keyring" --admin-socket "$DIR/run/mgr.x.asok" ||
    fail "ceph-mgr did not start: $DIR/log/mgr.x.log"

if [[ ${NEW:-0} == 1 ]]; then
    OSD_UUID=$(cat /proc/sys/kernel/random/uuid)
    OSD_KEY=$(ceph-authtool --gen-print-key)
    printf '{"cephx_secret": "%s"}\n' "$OSD_KEY" >"$DIR/osd-secret.json"
    OSD_ID=$(admin osd new "$OSD_UUID" -i "$DIR/osd-secret.json")
    rm -f "$DIR/osd-secret.json"
    [[ $OSD_ID == 0 ]] || fail "expected osd id 0, the mon gave $OSD_ID"
    ceph-authtool --create-keyring "$DIR/osd/0/keyring" --name osd.0 --add-key "$OSD_KEY" >/dev/null
    ceph-osd --conf "$CONF" -i 0 --mkfs --osd-uuid "$OSD_UUID" >"$DIR/log/mkfs-osd.log" 2>&1 ||
        fail "ceph-osd --mkfs failed: $DIR/log/mkfs-osd.log"
fi

running osd.0 || ceph-osd --conf "$CONF" -i 0 || fail "ceph-osd did not start: $DIR/log/osd.0.log"
osd_up() { admin osd dump -f json | grep -q '"up":1'; }
wait_until "osd.0 up" osd_up

if [[ ${NEW:-0} == 1 ]]; then
    admin osd pool create "$POOL" 8 8 >/dev/null
    admin osd pool set "$POOL" size 1 --yes-i-really-mean-it >/dev/null
    admin osd pool application enable "$POOL" vmcloud >/dev/null
    # Object locks are the cls "lock" class, hence x; nothing outside the pool.
    admin auth get-or-create client.vmcloud mon 'allow r' osd "allow rwx pool=$POOL" \
        -o "$DIR/client.vmcloud.keyring"
    cat >"$DIR/vmcloud.conf" <<EOF
[storage_rados]
conffile = $CONF
keyring = $DIR/client.vmcloud.keyring
client_name = client.vmcloud
pool = $POOL
EOF
fi

# A first write proves the OSD serves the pool (pgs peered), not only that it is up.
probe() {
    timeout 10 rados --conf "$CONF" --name client.vmcloud -p "$POOL" -N vmcloud-probe \
        put probe "$CONF" && timeout 10 rados --conf "$CONF" --name client.vmcloud \
        -p "$POOL" -N vmcloud-probe rm probe
}
wait_until "a write to pool $POOL" probe
touch "$DIR/.ready"
echo "ceph up in $(($(date +%s) - START)) s: conf $CONF, pool $POOL, client.vmcloud"
