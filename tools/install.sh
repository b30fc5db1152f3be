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
    # Emulated hosts (tests/multihost: namespaces, veth, tc, ss, nft drop rules) and the
    # network benchmark
    iproute2 nftables curl
    # Guest networks: each network's DHCP server (tests: busybox udhcpc, above)
    dnsmasq-base
    # The gateway's load balancer, and the load tool of its benchmark
    haproxy wrk
    # The dashboard's browser tests (tests/multihost/test_dashboard.py): headless Chromium
    # and its WebDriver, Debian's own (Selenium never downloads a browser or driver)
    chromium chromium-driver
)

# The rados warehouse backend and the single-node Ceph cluster its tests run on
# (tools/ceph/start.sh): a mon, a mgr and an OSD, without the packages they merely recommend.
CEPH_PACKAGES=(ceph-mon ceph-mgr ceph-osd ceph-common python3-rados)

sudo_cmd=()
[ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
updated=no
apt_install() {  # apt_install [apt-get options] -- PACKAGE...
    local options=() missing=()
    while [ "$1" != -- ]; do options+=("$1"); shift; done
    shift
    for package in "$@"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$package")
    done
    [ ${#missing[@]} -gt 0 ] || return 0
    echo "install: apt-get install ${missing[*]}"
    if [ $updated = no ]; then
        "${sudo_cmd[@]}" apt-get update -qq
        updated=yes
    fi
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${options[@]}" \
        "${missing[@]}" >/dev/null
}
apt_install -- "${PACKAGES[@]}"
apt_install --no-install-recommends -- "${CEPH_PACKAGES[@]}"

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]' 2>&1 \
    | grep -v -e '^WARNING: Location' -e 'is ignored: it is neither' || true
# librados' Python binding is not on PyPI and the venv may come from another CPython 3.11
# build that does not see Debian's dist-packages: link Debian's module in.
site_packages=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ln -sf /usr/lib/python3/dist-packages/rados.cpython-311-x86_64-linux-gnu.so "$site_packages/"
.venv/bin/python -W ignore -c 'import vmcloud, libvirt, qemu.qmp, oslo_messaging, rados, selenium' \
    || { echo 'install: the virtualenv is incomplete' >&2; exit 1; }
