#!/usr/bin/env bash
# Start libvirtd without systemd, idempotently, and wait until it answers.
set -euo pipefail
if [ -e /dev/kvm ]; then
    # Without this, libvirt's capability probing stalls ~40 s on every define.
    chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
fi
mkdir -p /run/libvirt
pgrep -x virtlogd >/dev/null || virtlogd -d
pgrep -x libvirtd >/dev/null || libvirtd -d
for _ in $(seq 1 100); do
    virsh -c qemu:///system version >/dev/null 2>&1 && exit 0
    sleep 0.2
done
echo "start-libvirtd: libvirtd does not answer on qemu:///system" >&2
exit 1
