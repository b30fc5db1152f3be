"""The network agent on two emulated hosts (tests/multihost/netns), for real: bridges,
VXLAN between the hosts, dnsmasq, and "fake guests" (a namespace each, on a veth port
of a host's bridge, standing in for a guest's tap). Needs root."""
import hashlib
import json
import os
import re
import secrets
import subprocess
import sys
import time

from vmcloud import exception
from vmcloud.network import probe
from tests import base
from tests.multihost import netns

REPO = netns.REPO
WAIT = 30.0
PROBE_TIMEOUT = 3.0
HTTP_PORT = 8000

DHCP_SCRIPT = '''#!/bin/sh
case "$1" in
bound|renew)
    ip addr add "$ip/$mask" dev "$interface"
    echo "$ip/$mask router=$router dns=$dns" > "$0.out.$interface.$(cat /proc/sys/kernel/hostname)"
    ;;
esac
'''


# A VXLAN datagram carrying one Ethernet frame with a UDP datagram to a guest:
#   VXLAN_SEND VNI DST_MAC DST_ADDRESS PORT PAYLOAD TARGET [DEVICE]
# sends it three times to TARGET:4789 (from DEVICE, SO_BINDTODEVICE, when given).
VXLAN_SEND = '''
import socket, struct, sys
vni, mac, address, port, payload, target = sys.argv[1:7]
def checksum(data):
    words = sum(struct.unpack(f"!{len(data) // 2}H", data))
    words = (words >> 16) + (words & 0xffff)
    return ~(words + (words >> 16)) & 0xffff
udp = struct.pack("!HHHH", 4321, int(port), 8 + len(payload), 0) + payload.encode()
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                 socket.inet_aton(address.rsplit(".", 1)[0] + ".99"), socket.inet_aton(address))
ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
frame = bytes.fromhex(mac.replace(":", "")) + bytes.fromhex("02000000aa01") + b"\\x08\\x00"
datagram = struct.pack("!II", 0x08000000, int(vni) << 8) + frame + ip + udp
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
if len(sys.argv) > 7:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, sys.argv[7].encode())
for _ in range(3):
    s.sendto(datagram, (target, 4789))
'''

# Prints "ready", then the payload of every UDP datagram to PORT, until one reads "control".
UDP_LISTEN = '''
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(float(sys.argv[2]))
print("ready", flush=True)
while True:
    payload = s.recv(2048).decode()
    print(payload, flush=True)
    if payload == "control":
        break
'''


def tag_of(state_dir: str) -> str:
    return hashlib.sha1(os.path.realpath(state_dir).encode()).hexdigest()[:8]


def network(name: str, vni: int, cidr: str) -> dict:
    return {'id': f'{name}-{secrets.token_hex(4)}', 'vni': vni, 'cidr': cidr}


def mac(vni: int, last: int) -> str:
    return f'52:54:00:{vni >> 8 & 0xff:02x}:{vni & 0xff:02x}:{last:02x}'


def port(net: dict, last: int) -> dict:
    prefix = net['cidr'].rsplit('.', 1)[0]
    return {'mac': mac(net['vni'], last), 'address': f'{prefix}.{last}'}


class Guest:
    """A fake guest: a namespace whose eth0 is a veth pair's end, the other a port of a
    host's bridge."""

    def __init__(self, namespace: str, port: dict):
        self.namespace = namespace
        self.port = port
        self.address = port['address']

    def run(self, argv, timeout=WAIT, check=True) -> subprocess.CompletedProcess:
        done = subprocess.run(['ip', 'netns', 'exec', self.namespace, *argv],
                              capture_output=True, text=True, timeout=timeout)
        if check and done.returncode:
            raise AssertionError(f'{" ".join(argv)} in {self.namespace}: {done.stderr}')
        return done


class AgentOnTwoHostsTest(base.TestCase):

    def setUp(self):
        super().setUp()
        if os.geteuid() != 0:
            self.fail('the network agent tests need root (network namespaces); run them '
                      'as root like the README\'s test command')
        self.net = netns.Network()
        self.net.open()
        self.addCleanup(self.net.close)
        self.hosts = [self.net.add_host('h1'), self.net.add_host('h2')]
        for host in self.hosts:
            self.addCleanup(self._sweep_agent, host)
        self.guests = 0
        self.a = network('a', 1000, '10.200.0.0/24')
        self.script = os.path.join(self.tmp, 'dhcp-script')
        with open(self.script, 'w') as f:
            f.write(DHCP_SCRIPT)
        os.chmod(self.script, 0o755)
        os.chmod(self.tmp, 0o755)

    # -- helpers -------------------------------------------------------------

    def _sweep_agent(self, host, state_dir: str | None = None) -> None:
        """Whatever the agent of ``host`` (or of ``state_dir`` in it) left: its DHCP
        namespaces (and the dnsmasq in them); its devices go with the host's namespace."""
        tag = tag_of(state_dir or host.state_dir)
        for namespace in netns.namespaces():
            if namespace.startswith('vmcloud-') and namespace.endswith(f'-{tag}'):
                netns.delete_namespace(namespace)

    def call(self, host, method: str, *args, check=True, state_dir: str | None = None):
        """``method`` of the agent of ``host`` (of ``state_dir`` in it: another agent
        in the host's namespace)."""
        request = {'state_dir': state_dir or host.state_dir, 'vtep': host.address,
                   'host': host.name, 'call': method, 'args': list(args)}
        # nsenter, not `ip netns exec`: only the network namespace is the host's. ip's
        # private mount namespace would hide the DHCP namespaces' mounts that the agent
        # makes in /run/netns from every other process.
        done = subprocess.run(['nsenter', f'--net=/run/netns/{host.namespace}',
                               sys.executable, '-m', 'tests.functional.network.agent_child',
                               json.dumps(request)], capture_output=True, text=True,
                              cwd=REPO, timeout=120)
        if check and done.returncode:
            self.fail(f'{host.name}: {method} failed: {done.stderr}')
        if done.returncode:
            return done
        return json.loads(done.stdout)

    def peers(self, host) -> list[str]:
        return [h.address for h in self.hosts if h is not host]

    def plug(self, host, net: dict, dhcp_last: int, instance: str, last: int) -> str:
        return self.call(host, 'plug', net, port(net, dhcp_last), self.peers(host),
                         instance, port(net, last))

    def guest(self, host, bridge: str, port_: dict) -> Guest:
        self.guests += 1
        namespace = self.net._name(f'g{self.guests}')
        self.addCleanup(netns.delete_namespace, namespace)
        subprocess.run(['ip', 'netns', 'add', namespace], check=True)
        device = f'vmcg{self.guests}'
        for argv in (['ip', '-n', namespace, 'link', 'set', 'lo', 'up'],
                     ['ip', '-n', host.namespace, 'link', 'add', device, 'mtu', '1450',
                      'type', 'veth', 'peer', 'name', 'eth0', 'netns', namespace],
                     ['ip', '-n', host.namespace, 'link', 'set', device, 'master', bridge,
                      'up'],
                     ['ip', '-n', namespace, 'link', 'set', 'eth0', 'address', port_['mac'],
                      'mtu', '1450', 'up']):
            subprocess.run(argv, check=True, capture_output=True, timeout=WAIT)
        return Guest(namespace, port_)

    def dhcp(self, guest: Guest) -> str:
        """DHCP on the guest's eth0; what udhcpc got ('ADDR/PREFIX router= dns=')."""
        done = guest.run(['busybox', 'udhcpc', '-i', 'eth0', '-n', '-q', '-f', '-t', '10',
                          '-T', '1', '-s', self.script], check=False, timeout=60)
        outs = [n for n in os.listdir(self.tmp) if n.startswith('dhcp-script.out.')]
        self.assertEqual(0, done.returncode, done.stderr + done.stdout)
        self.assertTrue(outs, done.stderr)
        with open(os.path.join(self.tmp, outs[0])) as f:
            got = f.read().strip()
        for name in outs:
            os.unlink(os.path.join(self.tmp, name))
        return got

    def serve(self, guest: Guest, name: str) -> None:
        process = subprocess.Popen(
            ['ip', 'netns', 'exec', guest.namespace, sys.executable, '-c', netns.HTTP_SERVER, name,
             guest.address, str(HTTP_PORT)], start_new_session=True)
        self.addCleanup(base.stop_process, process, 10)

    def fetch(self, guest: Guest, address: str, timeout=PROBE_TIMEOUT):
        return guest.run([sys.executable, '-c', netns.HTTP_FETCH, f'http://{address}:{HTTP_PORT}/',
                          str(timeout)], check=False, timeout=timeout + 30)

    def wait_fetch(self, guest: Guest, address: str) -> str:
        deadline = time.monotonic() + WAIT
        while True:
            done = self.fetch(guest, address)
            if done.returncode == 0:
                return done.stdout
            if time.monotonic() > deadline:
                self.fail(f'{guest.address} cannot reach {address}: {done.stderr}')
            time.sleep(0.2)

    def two_guests(self, net: dict, names=('g1', 'g2')) -> tuple[Guest, Guest]:
        """``net`` on both hosts, one guest on each, configured by DHCP, serving HTTP."""
        guests = []
        for i, host in enumerate(self.hosts):
            bridge = self.plug(host, net, 254 - i, names[i], 2 + i)
            self.assertEqual(f'vmcb{net["vni"]}', bridge)
            guest = self.guest(host, bridge, port(net, 2 + i))
            got = self.dhcp(guest)
            self.assertEqual(f'{guest.address}/24 router= dns=', got)
            self.serve(guest, names[i])
            guests.append(guest)
        return guests[0], guests[1]

    # -- tests ---------------------------------------------------------------

    def test_guests_get_their_address_by_dhcp_and_reach_each_other_across_hosts(self):
        g1, g2 = self.two_guests(self.a)
        self.assertEqual('g2\n', self.wait_fetch(g1, g2.address))
        self.assertEqual('g1\n', self.wait_fetch(g2, g1.address))
        # The bridge and its ports carry [network] mtu, no address on the bridge.
        links = json.loads(subprocess.run(
            ['ip', '-n', self.hosts[0].namespace, '-j', 'addr', 'show'],
            capture_output=True, text=True, check=True).stdout)
        ours = {link['ifname']: link for link in links
                if link['ifname'] in ('vmcb1000', 'vmcx1000', 'vmcd1000')}
        self.assertEqual({'vmcb1000', 'vmcx1000', 'vmcd1000'}, set(ours))
        for link in ours.values():
            self.assertEqual(1450, link['mtu'])
            self.assertEqual([], link['addr_info'])

    def test_a_second_network_cannot_reach_the_first(self):
        a1, a2 = self.two_guests(self.a)
        b = network('b', 1001, '10.200.1.0/24')
        b1, b2 = self.two_guests(b, names=('b1', 'b2'))
        for guest in (a1, a2, b1, b2):
            # On-link for the whole pool: only the missing layer 2 keeps them apart.
            guest.run(['ip', 'route', 'add', '10.200.0.0/16', 'dev', 'eth0'])
        self.assertEqual('b2\n', self.wait_fetch(b1, b2.address))
        self.assertEqual('g2\n', self.wait_fetch(a1, a2.address))
        for source, target in ((a1, b2), (a1, b1), (b1, a2), (b2, a1)):
            done = self.fetch(source, target.address)
            self.assertNotEqual(0, done.returncode,
                                f'{source.address} reached {target.address}')
        self.assertNotEqual(self.call(self.hosts[0], 'namespace', self.a['id']),
                            self.call(self.hosts[0], 'namespace', b['id']))

    def test_probes_from_the_dhcp_namespace(self):
        g1, g2 = self.two_guests(self.a)
        b = network('b', 1001, '10.200.1.0/24')
        (b1, _) = self.two_guests(b, names=('b1', 'b2'))
        namespace = self.call(self.hosts[0], 'namespace', self.a['id'])
        self.wait_fetch(g2, g1.address)
        probe.tcp_connect(namespace, g1.address, HTTP_PORT, PROBE_TIMEOUT)
        # g2 is on the other host: across the VXLAN.
        self.assertEqual((200, b'g2\n'),
                         probe.http_get(namespace, g2.address, HTTP_PORT, '/', PROBE_TIMEOUT))
        error = self.assertRaises(exception.NetworkError, probe.tcp_connect, namespace,
                                  g1.address, HTTP_PORT + 1, PROBE_TIMEOUT)
        self.assertIn(f'{g1.address}:{HTTP_PORT + 1}', str(error))
        self.assertIn(namespace, str(error))
        error = self.assertRaises(exception.NetworkError, probe.http_get, namespace,
                                  b1.address, HTTP_PORT, '/', PROBE_TIMEOUT)
        self.assertIn(f'{b1.address}:{HTTP_PORT}', str(error))
        self.assertIn(namespace, str(error))

    def _dnsmasqs(self, host) -> list[int]:
        return [p.pid for p in map(netns.read_process, netns._pids())
                if p is not None and p.program == 'dnsmasq' and p.state != 'Z' and
                any(host.state_dir in a for a in p.argv)]

    def test_unplug_of_the_last_port_removes_everything(self):
        host = self.hosts[0]
        self.plug(host, self.a, 254, 'g1', 2)
        self.plug(host, self.a, 254, 'g1', 2)   # idempotent: still one port
        self.plug(host, self.a, 254, 'g3', 3)
        self.assertEqual(['g1', 'g3'], sorted(
            self.call(host, 'networks')[self.a['id']]['ports']))
        namespace = self.call(host, 'namespace', self.a['id'])
        self.assertIn(namespace, netns.namespaces())
        self.assertEqual(1, len(self._dnsmasqs(host)))
        self.call(host, 'unplug', self.a['id'], 'g1')
        self.assertEqual(1, len(self._dnsmasqs(host)))
        self.call(host, 'unplug', self.a['id'], 'g3')
        self.call(host, 'unplug', self.a['id'], 'g3')   # unknown: no error
        self.assertEqual([], self.call(host, 'leftovers'))
        self.assertEqual({}, self.call(host, 'networks'))
        # Checked independently of the agent.
        self.assertNotIn(namespace, netns.namespaces())
        links = host.run(['ip', '-o', 'link', 'show']).stdout
        self.assertIsNone(re.search(r'vmc[bxd]\d', links), links)
        self.assertEqual([], self._dnsmasqs(host))

    def test_reconcile_restarts_a_dead_dnsmasq_and_drops_unwanted_ports(self):
        host = self.hosts[0]
        self.plug(host, self.a, 254, 'g1', 2)
        self.plug(host, self.a, 254, 'g3', 3)
        [pid] = self._dnsmasqs(host)
        os.kill(pid, 9)
        deadline = time.monotonic() + WAIT
        while pid in self._dnsmasqs(host) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual([], self._dnsmasqs(host))
        self.call(host, 'reconcile', {self.a['id']: ['g1']})
        [again] = self._dnsmasqs(host)
        self.assertNotEqual(pid, again)
        self.assertEqual(['g1'], list(self.call(host, 'networks')[self.a['id']]['ports']))
        # The restarted dnsmasq serves g1's address.
        guest = self.guest(host, 'vmcb1000', port(self.a, 2))
        self.assertEqual(f'{guest.address}/24 router= dns=', self.dhcp(guest))
        self.call(host, 'reconcile', {})
        self.assertEqual([], self.call(host, 'leftovers'))

    def test_a_dnsmasq_whose_namespace_was_deleted_is_replaced_by_reconcile(self):
        host = self.hosts[0]
        self.plug(host, self.a, 254, 'g1', 2)
        namespace = self.call(host, 'namespace', self.a['id'])
        [pid] = self._dnsmasqs(host)
        # By hand: the dnsmasq keeps the namespace alive, unnamed, and serves nobody.
        subprocess.run(['ip', 'netns', 'delete', namespace], check=True, timeout=WAIT)
        self.call(host, 'reconcile', {self.a['id']: ['g1']})
        self.assertIn(namespace, netns.namespaces())
        [again] = self._dnsmasqs(host)
        self.assertNotEqual(pid, again)
        guest = self.guest(host, 'vmcb1000', port(self.a, 2))
        self.assertEqual(f'{guest.address}/24 router= dns=', self.dhcp(guest))

    def test_a_guest_injects_nothing_through_the_hosts_vxlan_socket(self):
        # A bridge without an address still passes broadcasts up to the host, whose
        # VXLAN socket listens on every address: a guest of network a sending a VXLAN
        # datagram to 255.255.255.255 (or to the host's address) would put its inner
        # frame into network b on this host.
        host, other = self.hosts
        b = network('b', 1001, '10.200.1.0/24')
        bridges = [self.plug(host, net, 254, name, 2) for net, name in ((self.a, 'a1'),
                                                                        (b, 'b1'))]
        a1, b1 = (self.guest(host, bridge, port(net, 2))
                  for bridge, net in zip(bridges, (self.a, b)))
        for guest_ in (a1, b1):
            guest_.run(['ip', 'addr', 'add', f'{guest_.address}/24', 'dev', 'eth0'])
        a1.run(['ip', 'route', 'add', f'{host.address}/32', 'dev', 'eth0'])
        listener = subprocess.Popen(
            ['ip', 'netns', 'exec', b1.namespace, sys.executable, '-c', UDP_LISTEN, '9999',
             str(WAIT)], stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.addCleanup(base.stop_process, listener, 10)
        self.assertEqual('ready\n', listener.stdout.readline())
        frame = [str(b['vni']), b1.port['mac'], b1.address, '9999']
        for target in ('255.255.255.255', host.address):
            a1.run([sys.executable, '-c', VXLAN_SEND, *frame, 'attack', target, 'eth0'])
        # The same datagram from the other host, on the underlay: it is delivered (so
        # the datagram is right and the listener listens), after the attacks.
        other.run([sys.executable, '-c', VXLAN_SEND, *frame, 'control', host.address])
        out, _ = listener.communicate(timeout=WAIT + 10)
        self.assertEqual(0, listener.returncode, out)
        self.assertEqual(['control'], out.split())

    def _links(self, host) -> dict[str, dict]:
        """Our devices in the host's namespace, checked independently of the agent."""
        links = json.loads(host.run(['ip', '-j', '-d', 'link', 'show']).stdout)
        keys = ('ifindex', 'ifalias', 'master', 'flags')
        return {link['ifname']: {k: link.get(k) for k in keys}
                for link in links if re.match(r'^vmc[bxd]\d+$', link['ifname'])}

    def test_a_second_agent_in_one_namespace_is_refused_and_leaves_the_first_alone(self):
        host = self.hosts[0]
        other = os.path.join(self.tmp, 'other-agent')
        self.addCleanup(self._sweep_agent, host, other)
        bridge = self.plug(host, self.a, 254, 'g1', 2)
        guest = self.guest(host, bridge, port(self.a, 2))
        before = self._links(host)
        self.assertEqual({'vmcb1000', 'vmcx1000', 'vmcd1000'}, set(before))
        for name, link in before.items():
            self.assertEqual(f'vmcloud:{tag_of(host.state_dir)}', link['ifalias'], name)
        [dnsmasq] = self._dnsmasqs(host)

        # Another cloud's agent on the same machine namespace, the same VNI.
        b = network('b', 1000, '10.200.1.0/24')
        done = self.call(host, 'plug', b, port(b, 254), [], 'x1', port(b, 2), check=False,
                         state_dir=other)
        self.assertNotEqual(0, done.returncode)
        self.assertIn(f'bridge vmcb1000 belongs to another vmcloud network agent '
                      f'(vmcloud:{tag_of(host.state_dir)}): one machine namespace serves '
                      f'one cloud', done.stderr)
        self.assertEqual({}, self.call(host, 'networks', state_dir=other))
        self.assertEqual([], self.call(host, 'leftovers', state_dir=other))
        # Its reconcile (it has no record) removes nothing of the first's.
        self.call(host, 'reconcile', {}, state_dir=other)
        self.assertEqual(before, self._links(host))
        self.assertEqual([dnsmasq], self._dnsmasqs(host))
        self.assertIn(self.call(host, 'namespace', self.a['id']), netns.namespaces())
        self.assertEqual(f'{guest.address}/24 router= dns=', self.dhcp(guest))
        self.assertEqual(sorted(f'link {n}' for n in before), [
            x for x in self.call(host, 'leftovers') if x.startswith('link ')])
