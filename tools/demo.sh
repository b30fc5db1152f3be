#!/usr/bin/env bash
# The main job: install everything, then
# 1. the warehouse demo with the `vmcloud image` command: import a real ext4 disk image
#    (as qcow2), change a few files in it, store the change as a snapshot, export the
#    snapshot, verify the warehouse, print stats;
# 2. the all-in-one cloud (`vmcloud demo`): a dispatcher and two compute managers in one
#    process deploy 8 test guests from one image over mirrors, snapshot all 8 at once,
#    and deploy 8 again from the snapshots; it prints times, bytes fetched from the
#    repository and from the other node (apart: the nodes are peers on loopback), and
#    bytes stored. It also serves the REST API and dashboard and prints their URL and an
#    admin login.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/install.sh
tools/guest/build-test-guest.sh

DEMO=$PWD/.demo
rm -rf "$DEMO"
mkdir -p "$DEMO"
cat > "$DEMO/vmcloud.conf" <<CONF
[DEFAULT]
state_path = $DEMO/state
CONF
vmcloud() { .venv/bin/vmcloud --config-file "$DEMO/vmcloud.conf" "$@"; }
step() { printf '\n== %s\n' "$*"; }
now() { date +%s%N; }
seconds() { printf '%d.%03d' $((($2 - $1) / 1000000000)) $((($2 - $1) / 1000000 % 1000)); }

step "building a 512 MiB ext4 disk image from /usr/share/doc, converted to qcow2"
truncate -s 512M "$DEMO/disk.raw"
/sbin/mkfs.ext4 -q -F -d /usr/share/doc "$DEMO/disk.raw"
qemu-img convert -f raw -O qcow2 "$DEMO/disk.raw" "$DEMO/disk.qcow2"
ls -lhs "$DEMO/disk.raw" "$DEMO/disk.qcow2"

step "vmcloud image import disk.qcow2 debian-docs"
t0=$(now); vmcloud image import "$DEMO/disk.qcow2" debian-docs --format qcow2; t1=$(now)
import_seconds=$(seconds "$t0" "$t1")

step "changing the disk: a new 2 MiB file, bash's copyright file removed (debugfs, no mount)"
cp --sparse=always "$DEMO/disk.raw" "$DEMO/changed.raw"
head -c 2M /dev/urandom > "$DEMO/new-file"
/sbin/debugfs -w -R "write $DEMO/new-file new-file" "$DEMO/changed.raw" >/dev/null 2>&1
/sbin/debugfs -w -R "rm /bash/copyright" "$DEMO/changed.raw" >/dev/null 2>&1

step "vmcloud image snapshot debian-docs changed.raw (only changed chunks are stored)"
t0=$(now); vmcloud image snapshot debian-docs "$DEMO/changed.raw"; t1=$(now)
snapshot_seconds=$(seconds "$t0" "$t1")

step "vmcloud image export debian-docs:2 as qcow2, compared with the changed disk"
t0=$(now); vmcloud image export debian-docs:2 "$DEMO/exported.qcow2" --format qcow2; t1=$(now)
export_seconds=$(seconds "$t0" "$t1")
qemu-img compare -F raw "$DEMO/exported.qcow2" "$DEMO/changed.raw"

step "vmcloud image list / verify / stats"
vmcloud image list
vmcloud image verify
vmcloud image stats

step "summary"
printf '%-28s %10s\n' "import (qcow2, 512 MiB)" "${import_seconds}s" \
    "snapshot (whole-disk scan)" "${snapshot_seconds}s" \
    "export (qcow2)" "${export_seconds}s"

step "vmcloud demo: the all-in-one cloud deploys 8 guests, snapshots them, redeploys them"
vmcloud demo --guest "$PWD/.cache/guest" --count 8 --hosts 2
