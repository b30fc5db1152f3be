#!/usr/bin/env bash
# After the test suite (tools/run-tests.sh): nothing the tests made may be left on the
# machine: guest network devices (bridges vmcb*, VXLAN vmcx*, DHCP veths vmcd*, taps vmct*,
# the gateway's veths vmcg*, the driver tests' bridges vtbr*), the network agents' DHCP
# namespaces (vmcloud-*) and the harness's host namespaces (vmcnet-*), the bridges'
# nftables guards and the gateway's forward guards, the agents' dnsmasq, any qemu, any
# HAProxy of a test (every one but the machine's own service, /etc/haproxy), any
# chromedriver or Chromium of the browser tests and the harness's host cgroups. Each test
# cleans up after itself; this catches what one forgot. Exits 1 listing every leftover.
set -uo pipefail
left=()
while read -r name; do
    left+=("link $name")
done < <(ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 \
         | grep -E '^(vmc[bxdtg][0-9a-f]+|vtbr[0-9a-f]+)$')
while read -r name _; do
    left+=("netns $name")
done < <(ip netns list | grep -E '^(vmcloud|vmcnet)-')
# The bridges' guards: nftables netdev tables vmcloud_<vni>_<tag>.
while read -r _ _ name; do
    left+=("nft netdev table $name")
done < <(nft list tables netdev 2>/dev/null | grep -E '^table netdev vmcloud_')
# The gateway host's guard against forwarding: nftables inet tables vmcloud_gw_<tag>.
while read -r _ _ name; do
    left+=("nft inet table $name")
done < <(nft list tables inet 2>/dev/null | grep -E '^table inet vmcloud_')
# The agents' dnsmasq: no config file, one hosts file per network (libvirt's own has a
# config file of its own and is not ours).
while read -r pid _; do
    left+=("dnsmasq pid $pid")
done < <(pgrep -a dnsmasq | grep -- '--conf-file=/dev/null' | grep -- '--dhcp-hostsfile=')
while read -r pid _; do
    left+=("qemu pid $pid")
done < <(pgrep -a -f '^qemu-system-|/qemu-system-' || true)
# A gateway's HAProxy outlives `vmcloud gateway` by design: a test must stop it.
while read -r pid _; do
    left+=("haproxy pid $pid")
done < <(pgrep -a -x haproxy | grep -v -- ' /etc/haproxy/' || true)
# The dashboard tests' browser: chromedriver and the Chromium it drives (the browser's
# processes, its crash handler included; /proc's names are cut at 15 characters).
for program in chromedriver chromium chrome_crashpad; do
    while read -r pid _; do
        left+=("$program pid $pid")
    done < <(pgrep -a -x "$program" || true)
done
# The multi-host harness's per-host cgroups (tests/multihost/cluster.py).
for root in /sys/fs/cgroup /sys/fs/cgroup/unified; do
    [ -e "$root/cgroup.controllers" ] || continue
    for path in "$root"/vmcloud-*; do
        [ -d "$path" ] && left+=("cgroup $path")
    done
    break
done
if [ ${#left[@]} -gt 0 ]; then
    echo "check-leftovers: the tests left ${#left[@]} things behind:" >&2
    printf '  %s\n' "${left[@]}" >&2
    exit 1
fi
echo "check-leftovers: nothing left behind"
