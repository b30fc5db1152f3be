#!/usr/bin/env bash
# Build the realistic guest used by benchmarks: a Debian 12 minimal root filesystem made
# with debootstrap from Debian's mirror, booting systemd, with the test guest's kernel and
# initramfs (vmcloud.root=/dev/vda hands over to systemd; virtio_net is loaded before).
# It is networked the way an unmodified cloud image is: systemd-networkd asks DHCP for an
# address on every en*/eth* link, and a busybox httpd unit answers GET / on port 80. Its
# vmcloud phase markers come from a systemd unit that vmcloud.markers=0 on the kernel
# command line turns off: then it is an image that knows nothing of vmcloud, whose
# readiness comes from a health check (tcp/http).
# systemd-logind (hence dbus) turns the ACPI power button into a poweroff. Cached in
# $VMCLOUD_GUEST_DIR/realistic; rebuilt when this script changes.
set -euo pipefail
script=$(realpath "$0")
cd "$(dirname "$script")/../.."
GUEST=${VMCLOUD_GUEST_DIR:-$PWD/.cache/guest}
OUT=$GUEST/realistic
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
stamp=$(sha256sum < "$script" | cut -d' ' -f1)
tools/guest/build-test-guest.sh
[ "$(cat "$OUT/ready" 2>/dev/null)" = "$stamp" ] && exit 0
mkdir -p "$OUT"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rootfs=$work/rootfs
debootstrap --variant=minbase --include=systemd-sysv,udev,dbus,busybox-static bookworm \
    "$rootfs" "$MIRROR" > "$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; exit 1; }

# DHCP on whatever the NIC is called once udev renamed it (ens3, enp0s3, eth0).
cat > "$rootfs/etc/systemd/network/80-dhcp.network" <<'NETWORK'
[Match]
Name=en* eth*

[Network]
DHCP=ipv4
NETWORK
cat > "$rootfs/etc/systemd/system/busybox-httpd.service" <<'UNIT'
[Unit]
Description=busybox httpd on port 80
After=network.target

[Service]
ExecStart=/bin/busybox httpd -f -p 80 -h /srv/www
Restart=on-failure

[Install]
WantedBy=multi-user.target
UNIT
cat > "$rootfs/etc/systemd/system/vmcloud-phase.service" <<'UNIT'
[Unit]
Description=vmcloud phase markers on the serial console
ConditionKernelCommandLine=!vmcloud.markers=0

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'echo "VMCLOUD-PHASE boot-done" > /dev/ttyS0; cat /etc/os-release > /dev/null; echo "VMCLOUD-PHASE app-running" > /dev/ttyS0'
ExecStop=/bin/sh -c 'echo "VMCLOUD-PHASE shutdown-started" > /dev/ttyS0'

[Install]
WantedBy=multi-user.target
UNIT
mkdir -p "$rootfs/srv/www"
echo "vmcloud realistic guest" > "$rootfs/srv/www/index.html"
for unit in systemd-networkd.service busybox-httpd.service vmcloud-phase.service; do
    chroot "$rootfs" systemctl enable "$unit" >/dev/null 2>&1 \
        || ln -sf "/etc/systemd/system/$unit" \
            "$rootfs/etc/systemd/system/multi-user.target.wants/$unit"
done
# Nothing waits for network-online.target here; do not hold the boot for it.
chroot "$rootfs" systemctl disable systemd-networkd-wait-online.service >/dev/null 2>&1 || true
echo vmcloud-guest > "$rootfs/etc/hostname"
echo '/dev/vda / ext4 defaults 0 1' > "$rootfs/etc/fstab"
rm -rf "$rootfs/var/cache/apt/archives"/*.deb

truncate -s 2G "$work/root.img"
/sbin/mkfs.ext4 -q -F -L vmcloud-root -d "$rootfs" "$work/root.img"
mv "$work/root.img" "$OUT/root.img"
echo "console=ttyS0 quiet no_timer_check vmcloud.root=/dev/vda" > "$OUT/cmdline"
echo "$stamp" > "$OUT/ready"
echo "build-realistic-guest: $(du -sh --apparent-size "$OUT/root.img" | cut -f1) image, \
$(du -sh "$OUT/root.img" | cut -f1) allocated"
