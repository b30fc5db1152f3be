"""The gateway host joins a deployment network, for real (tests/multihost/netns): a
"gateway" host and a "compute" host on one underlay, the compute host's agent plugs a
guest stand-in (a namespace on a veth port of its bridge) serving HTTP, the gateway
host's agent joins the network; a third host routes the guests' subnet via the gateway
host. Needs root."""
import json
import os
import re
import subprocess
import sys
import time

from tests import base
from tests.functional.network import test_agent
from tests.multihost import netns

WAIT = 30.0
PROBE_TIMEOUT = 3.0
HTTP_PORT = 8000
# A service of the gateway host itself, on every address.
HOST_PORT = 9000
GATEWAY = '10.200.0.1'


class GatewayJoinTest(base.TestCase):

    def setUp(self):
        super().setUp()
        if os.geteuid() != 0:
            self.fail('the network agent tests need root (network namespaces); run them '
                      'as root like the README\'s test command')
        self.net = netns.Network()
        self.net.open()
        self.addCleanup(self.net.close)
        self.gateway = self.net.add_host('gw')
        self.compute = self.net.add_host('c1')
        self.client = self.net.add_host('client')
        self.a = test_agent.network('a', 1000, '10.200.0.0/24')
        self.gw_tag = test_agent.tag_of(self.gateway.state_dir)

    # -- helpers -------------------------------------------------------------

    def call(self, host, method: str, *args):
        """``method`` of the network agent of ``host`` (see test_agent's call)."""
        request = {'state_dir': host.state_dir, 'vtep': host.address, 'host': host.name,
                   'call': method, 'args': list(args)}
        done = subprocess.run(['nsenter', f'--net=/run/netns/{host.namespace}',
                               sys.executable, '-m', 'tests.functional.network.agent_child',
                               json.dumps(request)], capture_output=True, text=True,
                              cwd=netns.REPO, timeout=120)
        if done.returncode:
            self.fail(f'{host.name}: {method} failed: {done.stderr}')
        return json.loads(done.stdout)

    def guest_on_compute(self) -> test_agent.Guest:
        """The network on the compute host (its peer: the gateway's VTEP) and a guest
        stand-in there with .2, its default route via the gateway address (what a
        guest that trusts its gateway would have), serving HTTP."""
        port = test_agent.port(self.a, 2)
        bridge = self.call(self.compute, 'plug', self.a, test_agent.port(self.a, 254),
                           [self.gateway.address], 'g1', port)
        self.addCleanup(self.call, self.compute, 'unplug', self.a['id'], 'g1')
        namespace = self.net._name('guest')
        self.addCleanup(netns.delete_namespace, namespace)
        for argv in (['ip', 'netns', 'add', namespace],
                     ['ip', '-n', namespace, 'link', 'set', 'lo', 'up'],
                     ['ip', '-n', self.compute.namespace, 'link', 'add', 'gst1', 'mtu', '1450',
                      'type', 'veth', 'peer', 'name', 'eth0', 'netns', namespace],
                     ['ip', '-n', self.compute.namespace, 'link', 'set', 'gst1', 'master',
                      bridge, 'up'],
                     ['ip', '-n', namespace, 'link', 'set', 'eth0', 'address', port['mac'],
                      'mtu', '1450', 'up'],
                     ['ip', '-n', namespace, 'addr', 'add', f'{port["address"]}/24', 'dev',
                      'eth0'],
                     ['ip', '-n', namespace, 'route', 'add', 'default', 'via', GATEWAY]):
            subprocess.run(argv, check=True, capture_output=True, timeout=WAIT)
        guest = test_agent.Guest(namespace, port)
        server = subprocess.Popen(
            ['ip', 'netns', 'exec', namespace, sys.executable, '-c', netns.HTTP_SERVER, 'g1',
             guest.address, str(HTTP_PORT)], start_new_session=True)
        self.addCleanup(base.stop_process, server, 10)
        return guest

    def join(self, peers: list[str] | None = None) -> str:
        return self.call(self.gateway, 'join', self.a, GATEWAY,
                         [self.compute.address] if peers is None else peers)

    def fetch(self, run, url: str) -> subprocess.CompletedProcess:
        """GET ``url`` with ``run`` (a Host's or a Guest's run)."""
        return run([sys.executable, '-c', netns.HTTP_FETCH, url, str(PROBE_TIMEOUT)],
                   check=False, timeout=PROBE_TIMEOUT + 30)

    def wait_fetch(self, run, url: str) -> str:
        deadline = time.monotonic() + WAIT
        while True:
            done = self.fetch(run, url)
            if done.returncode == 0:
                return done.stdout
            if time.monotonic() > deadline:
                self.fail(f'cannot GET {url}: {done.stderr}')
            time.sleep(0.2)

    def links(self, host) -> dict[str, dict]:
        """Our devices in the host's namespace, checked independently of the agent."""
        links = json.loads(host.run(['ip', '-j', '-d', 'addr', 'show']).stdout)
        return {link['ifname']: link for link in links
                if re.match(r'^vmc[bxdgp]\d+$', link['ifname'])}

    def fdb_peers(self, host) -> set[str]:
        entries = json.loads(host.run(['bridge', '-j', 'fdb', 'show', 'dev', 'vmcx1000']).stdout)
        return {e['dst'] for e in entries if e.get('mac') == '00:00:00:00:00:00'}

    def inet_tables(self, host) -> list[str]:
        return re.findall(r'^table inet (\S+)$',
                          host.run(['nft', 'list', 'tables', 'inet']).stdout, re.M)

    # -- tests ---------------------------------------------------------------

    def test_the_gateway_reaches_the_guests_but_routes_nothing_to_them(self):
        guest = self.guest_on_compute()
        self.assertEqual('vmcg1000', self.join())
        url = f'http://{guest.address}:{HTTP_PORT}/'
        self.assertEqual('g1\n', self.wait_fetch(self.gateway.run, url))

        # A client that routes the guests' subnet via the gateway host, which forwards
        # (and does not filter by reverse path): only the gateway guard stands between.
        for setting in ('net.ipv4.ip_forward=1', 'net.ipv4.conf.all.rp_filter=0'):
            self.gateway.run(['sysctl', '-w', setting])
        self.client.run(['ip', 'route', 'add', '10.200.0.0/24', 'via', self.gateway.address])
        self.assertNotEqual(0, self.fetch(self.client.run, url).returncode)
        # The control: without the guard the route works (so the guard is what blocks)...
        self.gateway.run(['nft', 'delete', 'table', 'inet', f'vmcloud_gw_{self.gw_tag}'])
        self.assertEqual('g1\n', self.wait_fetch(self.client.run, url))
        # ... and joining again makes it again.
        self.join()
        self.assertNotEqual(0, self.fetch(self.client.run, url).returncode)
        self.assertEqual('g1\n', self.wait_fetch(self.gateway.run, url))

        # The guest opens nothing on the gateway host: neither on its gateway address
        # nor on the host's other addresses (its default route is the gateway).
        server = self.gateway.popen([sys.executable, '-c', netns.HTTP_SERVER, 'host',
                                     '0.0.0.0', str(HOST_PORT)])
        self.addCleanup(base.stop_process, server, 10)
        self.assertEqual('host\n', self.wait_fetch(
            self.client.run, f'http://{self.gateway.address}:{HOST_PORT}/'))
        for address in (GATEWAY, self.gateway.address):
            done = self.fetch(guest.run, f'http://{address}:{HOST_PORT}/')
            self.assertNotEqual(0, done.returncode, f'the guest reached {address}')

    def test_join_is_idempotent_takes_new_peers_and_leave_removes_everything(self):
        guest = self.guest_on_compute()
        self.join()
        self.assertEqual('g1\n', self.wait_fetch(
            self.gateway.run, f'http://{guest.address}:{HTTP_PORT}/'))
        links = self.links(self.gateway)
        self.assertEqual({'vmcb1000', 'vmcx1000', 'vmcg1000', 'vmcp1000'}, set(links))
        for name, link in links.items():
            self.assertEqual(f'vmcloud:{self.gw_tag}', link.get('ifalias'), name)
            self.assertEqual(1450, link['mtu'], name)
        self.assertEqual([f'{GATEWAY}/24'], [
            f'{a["local"]}/{a["prefixlen"]}' for a in links['vmcg1000']['addr_info']])
        self.assertEqual('vmcb1000', links['vmcp1000']['master'])
        for name in ('vmcb1000', 'vmcx1000', 'vmcp1000'):
            self.assertEqual([], links[name]['addr_info'], name)
        for setting, value in (('rp_filter', '0'), ('proxy_arp', '0')):
            self.assertEqual(value, self.gateway.run(
                ['cat', f'/proc/sys/net/ipv4/conf/vmcg1000/{setting}']).stdout.strip())
        # No DHCP server on the gateway host.
        self.assertEqual([], [n for n in netns.namespaces() if n.endswith(f'-{self.gw_tag}')])
        self.assertEqual({self.compute.address}, self.fdb_peers(self.gateway))
        leftovers = self.call(self.gateway, 'leftovers')
        self.assertEqual(['link vmcb1000', 'link vmcg1000', 'link vmcp1000', 'link vmcx1000',
                          f'nft netdev vmcloud_1000_{self.gw_tag}',
                          f'nft inet vmcloud_gw_{self.gw_tag}'], leftovers)
        self.assertEqual({self.a['id']: {'network': self.a, 'address': GATEWAY,
                                         'peers': [self.compute.address],
                                         'interface': 'vmcg1000'}},
                         self.call(self.gateway, 'joined'))

        # Again: nothing changes (the same devices, not made anew).
        self.join()
        self.assertEqual({n: link['ifindex'] for n, link in links.items()},
                         {n: link['ifindex'] for n, link in self.links(self.gateway).items()})
        self.assertEqual(leftovers, self.call(self.gateway, 'leftovers'))
        # A joined network is no stray: reconcile (no ports wanted) leaves it.
        self.call(self.gateway, 'reconcile', {})
        self.assertEqual(leftovers, self.call(self.gateway, 'leftovers'))
        self.assertIn(self.a['id'], self.call(self.gateway, 'joined'))

        # New peers, by set_peers and by joining again.
        self.call(self.gateway, 'set_peers', self.a['id'], [self.compute.address, '10.77.0.99'])
        self.assertEqual({self.compute.address, '10.77.0.99'}, self.fdb_peers(self.gateway))
        self.join(['10.77.0.98'])
        self.assertEqual({'10.77.0.98'}, self.fdb_peers(self.gateway))
        self.assertEqual(['10.77.0.98'],
                         self.call(self.gateway, 'joined')[self.a['id']]['peers'])
        self.join()
        self.assertEqual('g1\n', self.wait_fetch(
            self.gateway.run, f'http://{guest.address}:{HTTP_PORT}/'))

        self.call(self.gateway, 'leave', self.a['id'])
        self.assertEqual([], self.call(self.gateway, 'leftovers'))
        self.assertEqual({}, self.call(self.gateway, 'joined'))
        self.assertEqual({}, self.call(self.gateway, 'networks'))
        # Checked independently of the agent.
        self.assertEqual({}, self.links(self.gateway))
        self.assertEqual([], self.inet_tables(self.gateway))
        self.assertNotIn(f'vmcloud_1000_{self.gw_tag}', self.gateway.run(
            ['nft', 'list', 'tables', 'netdev']).stdout)
        self.call(self.gateway, 'leave', self.a['id'])     # not joined: no error
        # The compute host's part of the network is untouched.
        self.assertIn('vmcd1000', self.links(self.compute))
