#!/usr/bin/env bash
# Install everything vmcloud needs on Debian 12: system packages and a virtualenv in .venv.
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
    # Python and building libvirt-python
    python3 python3-venv python3-dev gcc pkg-config libvirt-dev
    # Images and hypervisors
    qemu-utils qemu-system-x86 libvirt-daemon-system libvirt-clients util-linux
    # The test guests
    busybox-static cpio e2fsprogs debootstrap xz-utils zstd kmod
    # TLS certificates for the warehouse service tests
    openssl
    # NBD servers and clients
    nbdkit nbdkit-plugin-python libnbd-bin
    # The services' message bus and database (multi-process mode)
    rabbitmq-server postgresql
)

missing=()
for package in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' \
        || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "install: apt-get install ${missing[*]}"
    sudo_cmd=()
    [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]' 2>&1 \
    | grep -v -e '^WARNING: Location' -e 'is ignored: it is neither' || true
.venv/bin/python -W ignore -c 'import vmcloud, libvirt, qemu.qmp, oslo_messaging' \
    || { echo 'install: the virtualenv is incomplete' >&2; exit 1; }
