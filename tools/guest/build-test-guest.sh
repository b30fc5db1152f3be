#!/usr/bin/env bash
# Build the test guest from Debian packages only: the Debian cloud kernel, a busybox
# initramfs (tools/guest/init, with network.sh, udhcpc.script and http-count.cgi under
# /lib/vmcloud) that loads the virtio modules (disk, NIC) in dependency order, and a
# small ext4 data disk. Output in $VMCLOUD_GUEST_DIR (default .cache/guest); skipped when
# already built.
set -euo pipefail
script=$(realpath "$0")
cd "$(dirname "$script")/../.."
OUT=${VMCLOUD_GUEST_DIR:-$PWD/.cache/guest}
# Rebuilt whenever this script or a file the guest carries changes.
GUEST_FILES=(tools/guest/init tools/guest/network.sh tools/guest/udhcpc.script tools/guest/http-count.cgi)
stamp=$(cat "$script" "${GUEST_FILES[@]}" | sha256sum | cut -d' ' -f1)
[ "$(cat "$OUT/ready" 2>/dev/null)" = "$stamp" ] && exit 0
MODULES=(virtio_blk virtio_pci virtio_net button evdev)

mkdir -p "$OUT/debs"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
meta=linux-image-cloud-amd64
image=$(apt-cache depends "$meta" | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[ -n "$image" ] || { echo "build-test-guest: cannot resolve $meta (run apt-get update)" >&2; exit 1; }
if ! ls "$OUT/debs/${image}"_*.deb >/dev/null 2>&1; then
    (cd "$OUT/debs" && apt-get download "$image" 2>/dev/null)
fi
dpkg-deb -x "$OUT/debs/${image}"_*.deb "$work/kernel"
version=$(ls "$work/kernel/lib/modules")
moddir=$work/kernel/lib/modules/$version
/sbin/depmod -b "$work/kernel" "$version"

# Module files in dependency order (dependencies first), each once.
ordered=()
add_module() {
    local name=$1 dep path
    for dep in $(/sbin/modinfo -b "$work/kernel" -k "$version" -F depends "$name" | tr ',' ' '); do
        add_module "$dep"
    done
    path=$(/sbin/modinfo -b "$work/kernel" -k "$version" -n "$name")
    [[ " ${ordered[*]} " == *" $path "* ]] || ordered+=("$path")
}
for module in "${MODULES[@]}"; do add_module "$module"; done

root=$work/initramfs
mkdir -p "$root"/{bin,dev,proc,sys,mnt,run,lib/modules,lib/vmcloud}
cp /bin/busybox "$root/bin/busybox"
for applet in sh mount umount insmod sleep cat echo md5sum sync poweroff dd mknod \
              grep sed tr ls date head tail seq mkdir switch_root basename dirname \
              ip udhcpc ipcalc httpd nc wget timeout awk rmdir usleep printf chmod cp; do
    ln -s busybox "$root/bin/$applet"
done
: > "$root/lib/modules/load-order"
for path in "${ordered[@]}"; do
    name=$(basename "$path")
    case "$name" in
        *.ko.xz) xz -dc "$path" > "$root/lib/modules/${name%.xz}"; name=${name%.xz} ;;
        *.ko.zst) zstd -qdc "$path" > "$root/lib/modules/${name%.zst}"; name=${name%.zst} ;;
        *) cp "$path" "$root/lib/modules/$name" ;;
    esac
    echo "$name" >> "$root/lib/modules/load-order"
done
install -m 0755 tools/guest/init "$root/init"
install -m 0644 tools/guest/network.sh "$root/lib/vmcloud/network.sh"
install -m 0755 tools/guest/udhcpc.script tools/guest/http-count.cgi "$root/lib/vmcloud/"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$work/initrd.img"

# The data disk: files the guest reads, room for the file it writes.
mkdir -p "$work/disk"
seq 1 20000 > "$work/disk/data.txt"
echo "vmcloud test disk" > "$work/disk/README"
truncate -s 64M "$work/disk.img"
/sbin/mkfs.ext4 -q -F -L vmcloud-test -d "$work/disk" "$work/disk.img"

# Each file renamed into place whole: tests running while the guest is rebuilt read
# the old file or the new one, never a part. ready goes last.
publish() { cp "$1" "$OUT/.$2.tmp" && mv -f "$OUT/.$2.tmp" "$OUT/$2"; }
cp "$work/kernel/boot/vmlinuz-$version" "$work/vmlinuz"
md5sum "$work/disk/data.txt" | cut -d' ' -f1 > "$work/data.md5"
echo "$stamp" > "$work/ready"
for leaf in vmlinuz initrd.img disk.img data.md5 ready; do publish "$work/$leaf" "$leaf"; done
echo "build-test-guest: kernel $version, modules: $(tr '\n' ' ' < "$root/lib/modules/load-order")"
