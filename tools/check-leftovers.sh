#!/usr/bin/env bash
# After the test suite (tools/run-tests.sh): nothing the tests made may be left on the
# machine: guest network devices (bridges vmcb*, VXLAN vmcx*, DHCP veths vmcd*, taps vmct*,
# the driver tests' bridges vtbr*), the network agents' DHCP namespaces (vmcloud-*) and the
# harness's host namespaces (vmcnet-*), the bridges' nftables guards, the agents' dnsmasq
# and any qemu. Each test cleans up after itself; this catches what one forgot. Exits 1
# listing every leftover.
set -uo pipefail
left=()
while read -r name; do
    left+=("link $name")
done < <(ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 \
         | grep -E '^(vmc[bxdt][0-9a-f]+|vtbr[0-9a-f]+)$')
while read -r name _; do
    left+=("netns $name")
done < <(ip netns list | grep -E '^(vmcloud|vmcnet)-')
# The bridges' guards: nftables netdev tables vmcloud_<vni>_<tag>.
while read -r _ _ name; do
    left+=("nft netdev table $name")
done < <(nft list tables netdev 2>/dev/null | grep -E '^table netdev vmcloud_')
# The agents' dnsmasq: no config file, one hosts file per network (libvirt's own has a
# config file of its own and is not ours).
while read -r pid _; do
    left+=("dnsmasq pid $pid")
done < <(pgrep -a dnsmasq | grep -- '--conf-file=/dev/null' | grep -- '--dhcp-hostsfile=')
while read -r pid _; do
    left+=("qemu pid $pid")
done < <(pgrep -a -f '^qemu-system-|/qemu-system-' || true)
if [ ${#left[@]} -gt 0 ]; then
    echo "check-leftovers: the tests left ${#left[@]} things behind:" >&2
    printf '  %s\n' "${left[@]}" >&2
    exit 1
fi
echo "check-leftovers: nothing left behind"
