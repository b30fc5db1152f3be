#!/usr/bin/env bash
# Build the realistic guest used by benchmarks: a Debian 12 minimal root filesystem made
# with debootstrap from Debian's mirror, booting systemd, with the test guest's kernel and
# initramfs (vmcloud.root=/dev/vda hands over to systemd). Phase markers come from a
# systemd unit; systemd-logind (hence dbus) turns the ACPI power button into a poweroff. Cached in $VMCLOUD_GUEST_DIR/realistic; not rebuilt when present.
set -euo pipefail
cd "$(dirname "$0")/../.."
GUEST=${VMCLOUD_GUEST_DIR:-$PWD/.cache/guest}
OUT=$GUEST/realistic
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
[ -f "$OUT/ready" ] && exit 0
tools/guest/build-test-guest.sh
mkdir -p "$OUT"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rootfs=$work/rootfs
debootstrap --variant=minbase --include=systemd-sysv,udev,dbus bookworm "$rootfs" "$MIRROR" \
    > "$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log" >&2; exit 1; }

cat > "$rootfs/etc/systemd/system/vmcloud-phase.service" <<'UNIT'
[Unit]
Description=vmcloud phase markers on the serial console

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'echo "VMCLOUD-PHASE boot-done" > /dev/ttyS0; cat /etc/os-release > /dev/null; echo "VMCLOUD-PHASE app-running" > /dev/ttyS0'
ExecStop=/bin/sh -c 'echo "VMCLOUD-PHASE shutdown-started" > /dev/ttyS0'

[Install]
WantedBy=multi-user.target
UNIT
chroot "$rootfs" systemctl enable vmcloud-phase.service >/dev/null 2>&1 \
    || ln -sf /etc/systemd/system/vmcloud-phase.service \
        "$rootfs/etc/systemd/system/multi-user.target.wants/vmcloud-phase.service"
echo vmcloud-guest > "$rootfs/etc/hostname"
echo '/dev/vda / ext4 defaults 0 1' > "$rootfs/etc/fstab"
rm -rf "$rootfs/var/cache/apt/archives"/*.deb

truncate -s 2G "$work/root.img"
/sbin/mkfs.ext4 -q -F -L vmcloud-root -d "$rootfs" "$work/root.img"
mv "$work/root.img" "$OUT/root.img"
echo "console=ttyS0 quiet no_timer_check vmcloud.root=/dev/vda" > "$OUT/cmdline"
date -u +%FT%TZ > "$OUT/ready"
echo "build-realistic-guest: $(du -sh --apparent-size "$OUT/root.img" | cut -f1) image, \
$(du -sh "$OUT/root.img" | cut -f1) allocated"
