"""The gateway host's join and leave against a fake machine: the exact commands, what
is made and removed, and how a joined network lives with reconcile and with ports of
the same agent (the all-in-one)."""
import os

from vmcloud import exception
from vmcloud.network import agent as agent_mod
from vmcloud.network import fake
from tests import base
from tests.unit.network import test_agent

NET = test_agent.NET
DHCP = test_agent.DHCP
P1 = test_agent.P1
GATEWAY = '10.200.3.1'
GATEWAY_MAC = '52:54:00:c8:03:01'


class JoinTestBase(base.TestCase):
    def setUp(self):
        super().setUp()
        self.conf.set_override('vtep_address', '10.77.0.1', group='network')
        self.conf.set_override('host', 'h1')
        self.runner = test_agent.FakeRunner()
        self.agent = agent_mod.NetworkAgent(self.conf, runner=self.runner)
        self.alias = f'vmcloud:{self.agent.tag}'
        self.table = f'vmcloud_gw_{self.agent.tag}'
        self.guard = f'vmcloud_1000_{self.agent.tag}'
        self.ns = f'vmcloud-1000-{self.agent.tag}'

    def claim(self, name: str) -> list[str]:
        return ['ip', 'link', 'set', name, 'alias', self.alias]

    def gateway_guard(self) -> list[str]:
        return ['nft', f'table inet {self.table}; delete table inet {self.table}; '
                f'table inet {self.table} {{ '
                'chain forward { type filter hook forward priority 0; policy accept; '
                'iifname "vmcg*" drop; oifname "vmcg*" drop; }; '
                'chain input { type filter hook input priority 0; policy accept; '
                'iifname "vmcg*" ct state established,related accept; '
                'iifname "vmcg*" drop; }; }']

    def gateway_veth(self) -> list[list[str]]:
        return [
            self.gateway_guard(),
            ['ip', 'link', 'add', 'vmcg1000', 'mtu', '1450', 'address', GATEWAY_MAC,
             'type', 'veth', 'peer', 'name', 'vmcp1000', 'mtu', '1450'],
            ['disable_ipv6', 'vmcg1000'],
            self.claim('vmcg1000'),
            ['disable_ipv6', 'vmcp1000'],
            self.claim('vmcp1000'),
            ['ipv4_conf', 'vmcg1000', {'proxy_arp': 0, 'rp_filter': 0, 'arp_ignore': 1,
                                       'arp_announce': 2}],
            ['ip', 'addr', 'add', f'{GATEWAY}/24', 'dev', 'vmcg1000'],
            ['ip', 'link', 'set', 'vmcp1000', 'master', 'vmcb1000', 'up'],
            ['ip', 'link', 'set', 'vmcg1000', 'up'],
        ]

    def join(self, peers=('10.77.0.2',)) -> str:
        return self.agent.join(NET, GATEWAY, list(peers))


class JoinTest(JoinTestBase):

    def test_join_makes_the_segment_and_the_gateway_veth_and_no_dhcp(self):
        self.assertEqual('vmcg1000', self.join(['10.77.0.2', '']))
        self.assertEqual([
            ['ip', 'link', 'add', 'vmcb1000', 'mtu', '1450', 'type', 'bridge'],
            ['disable_ipv6', 'vmcb1000'],
            self.claim('vmcb1000'),
            *test_agent.AgentTest.make_guard(self),
            ['ip', 'link', 'set', 'vmcb1000', 'up'],
            ['ip', 'link', 'add', 'vmcx1000', 'mtu', '1450', 'type', 'vxlan', 'id', '1000',
             'dstport', '4789', 'local', '10.77.0.1', 'nolearning'],
            ['disable_ipv6', 'vmcx1000'],
            self.claim('vmcx1000'),
            ['ip', 'link', 'set', 'vmcx1000', 'master', 'vmcb1000', 'up'],
            ['bridge', 'fdb', 'append', '00:00:00:00:00:00', 'dev', 'vmcx1000', 'dst',
             '10.77.0.2'],
            *self.gateway_veth()], self.runner.take())
        self.assertEqual(set(), self.runner.namespaces)
        self.assertEqual({}, self.runner.procs)
        for name, link in self.runner.links.items():
            self.assertEqual(self.alias, link.get('ifalias'), name)
        self.assertEqual({'vmcg1000': [f'{GATEWAY}/24']}, self.runner.addresses)
        self.assertEqual({NET['id']: {'network': NET, 'address': GATEWAY,
                                      'peers': ['10.77.0.2'], 'interface': 'vmcg1000'}},
                         self.agent.joined())
        self.assertEqual({}, self.agent.networks()[NET['id']]['ports'])
        self.assertEqual(['link vmcb1000', 'link vmcg1000', 'link vmcp1000', 'link vmcx1000',
                          f'nft netdev {self.guard}', f'nft inet {self.table}'],
                         self.agent.leftovers())

    def test_the_gateway_guard_is_there_before_the_gateway_veth(self):
        self.join()
        calls = self.runner.take()
        self.assertLess(calls.index(self.gateway_guard()),
                        calls.index(self.gateway_veth()[1]))
        self.assertEqual({'forward': ['iifname "vmcg*" drop', 'oifname "vmcg*" drop'],
                          'input': ['iifname "vmcg*" ct state established,related accept',
                                    'iifname "vmcg*" drop']}, self.runner.inet[self.table])

    def test_joining_again_changes_nothing_but_peers_and_repairs_what_is_missing(self):
        self.join()
        self.runner.take()
        self.join()
        self.assertEqual([], self.runner.take())
        self.join(['10.77.0.3'])
        self.assertEqual([
            ['bridge', 'fdb', 'append', '00:00:00:00:00:00', 'dev', 'vmcx1000', 'dst',
             '10.77.0.3'],
            ['bridge', 'fdb', 'del', '00:00:00:00:00:00', 'dev', 'vmcx1000', 'dst',
             '10.77.0.2']], self.runner.take())
        self.assertEqual(['10.77.0.3'], self.agent.joined()[NET['id']]['peers'])
        # Damage: the guard emptied by hand, the address lost, the port off the bridge.
        self.runner.inet[self.table]['forward'] = []
        self.runner.addresses['vmcg1000'] = ['10.9.9.9/8']
        self.runner.links['vmcp1000']['master'] = None
        self.join(['10.77.0.3'])
        self.assertEqual([self.gateway_guard(),
                          ['ip', 'addr', 'del', '10.9.9.9/8', 'dev', 'vmcg1000'],
                          ['ip', 'addr', 'add', f'{GATEWAY}/24', 'dev', 'vmcg1000'],
                          ['ip', 'link', 'set', 'vmcp1000', 'master', 'vmcb1000', 'up']],
                         self.runner.take())
        # The veth gone (its pair with it): made again.
        del self.runner.links['vmcg1000'], self.runner.links['vmcp1000']
        self.runner.addresses.clear()
        self.join(['10.77.0.3'])
        self.assertEqual(self.gateway_veth()[1:], self.runner.take())

    def test_set_peers_updates_a_joined_networks_fdb(self):
        self.join(['10.77.0.2', '10.77.0.3'])
        self.runner.take()
        self.agent.set_peers(NET['id'], ['10.77.0.3', '10.77.0.4'])
        self.assertEqual({'10.77.0.3', '10.77.0.4'}, self.runner.fdb['vmcx1000'])
        self.assertEqual(['10.77.0.3', '10.77.0.4'], self.agent.joined()[NET['id']]['peers'])

    def test_leave_removes_everything_join_made_and_not_joined_is_no_error(self):
        self.join()
        self.runner.take()
        self.agent.leave(NET['id'])
        # vmcp1000 goes with vmcg1000 (its del fails, and it is seen gone).
        self.assertEqual([['ip', 'link', 'del', 'vmcg1000'],
                          ['ip', 'link', 'del', 'vmcp1000'],
                          ['ip', 'link', 'del', 'vmcx1000'],
                          ['ip', 'link', 'del', 'vmcb1000'],
                          ['nft', 'delete', 'table', 'netdev', self.guard],
                          ['nft', 'delete', 'table', 'inet', self.table]], self.runner.take())
        self.assertEqual(({}, {}, {}, {}), (self.runner.links, self.runner.tables,
                                            self.runner.inet, self.agent.networks()))
        self.assertEqual([], self.agent.leftovers())
        self.agent.leave(NET['id'])
        self.agent.leave('never-joined')
        self.assertEqual([], self.runner.take())

    def test_the_gateway_guard_stays_while_another_network_is_joined(self):
        other = {'id': 'net-2', 'vni': 1001, 'cidr': '10.200.4.0/24'}
        self.join()
        self.agent.join(other, '10.200.4.1', [])
        self.agent.leave(NET['id'])
        self.assertIn(self.table, self.runner.inet)
        self.assertEqual({'vmcb1001', 'vmcx1001', 'vmcg1001', 'vmcp1001'},
                         set(self.runner.links))
        self.agent.leave('net-2')
        self.assertEqual({}, self.runner.inet)

    def test_a_bad_address_or_another_agents_device_is_refused_and_nothing_made(self):
        for address in ('10.200.4.1', '10.200.3.0', '10.200.3.255', 'nonsense'):
            error = self.assertRaises(exception.NetworkError, self.agent.join, NET, address,
                                      [])
            self.assertIn(NET['id'], str(error))
            self.assertIn(address, str(error))
        self.runner.links['vmcg1000'] = {'flags': ['UP'], 'master': None,
                                         'ifalias': 'vmcloud:abcd1234'}
        error = self.assertRaises(exception.NetworkError, self.join)
        self.assertIn('gateway veth vmcg1000 belongs to another vmcloud network agent',
                      str(error))
        self.assertEqual([], self.runner.take())
        self.assertEqual({}, self.agent.networks())

    def test_a_failing_command_leaves_nothing_of_a_new_network(self):
        self.runner.fail = ['ip', 'addr', 'add']
        error = self.assertRaises(exception.NetworkError, self.join)
        self.assertIn(f'ip addr add {GATEWAY}/24 dev vmcg1000', str(error))
        self.assertEqual(({}, {}, {}, {}), (self.runner.links, self.runner.tables,
                                            self.runner.inet, self.agent.networks()))

    def test_reconcile_keeps_joined_networks_repairs_them_and_removes_stray_gateway_parts(self):
        self.join()
        # Strays: a gateway veth of a network not joined, a gateway guard of none.
        self.runner.links['vmcg1077'] = {'flags': ['UP'], 'master': None,
                                         'ifalias': self.alias, 'pair': 'vmcp1077'}
        self.runner.links['vmcp1077'] = {'flags': ['UP'], 'master': None,
                                         'ifalias': self.alias, 'pair': 'vmcg1077'}
        self.runner.links.pop('vmcx1000')    # lost: made again
        self.runner.take()
        self.agent.reconcile({})
        self.assertIn(NET['id'], self.agent.joined())
        self.assertEqual({'vmcb1000', 'vmcx1000', 'vmcg1000', 'vmcp1000'},
                         set(self.runner.links))
        self.assertIn(['ip', 'link', 'del', 'vmcg1077'], self.runner.take())
        self.agent.leave(NET['id'])
        self.runner.inet[self.table] = {}
        self.agent.reconcile({})
        self.assertEqual({}, self.runner.inet)
        self.assertEqual([], self.agent.leftovers())


class JoinedAndPluggedTest(JoinTestBase):
    """One agent for a compute host and the gateway (the all-in-one): the network's
    segment stays while either needs it, each part goes with its last user."""

    def test_a_port_and_the_gateway_share_the_network(self):
        self.join()
        self.agent.plug(NET, DHCP, ['10.77.0.2'], 'i-1', P1)
        self.assertIn(self.ns, self.runner.namespaces)
        self.assertEqual(1, len(self.runner.procs))
        self.runner.take()
        # The last port goes: its DHCP server with it, the rest stays for the gateway.
        self.agent.unplug(NET['id'], 'i-1')
        self.assertEqual([['ip', 'netns', 'delete', self.ns]], self.runner.take())
        self.assertEqual(({}, set()), (self.runner.procs, self.runner.namespaces))
        self.assertIsNone(self.agent.networks()[NET['id']]['dhcp_port'])
        self.assertFalse(os.path.exists(os.path.join(self.state_path, 'network', NET['id'])))
        # A port again (a new DHCP port), then the gateway leaves: the port keeps it.
        dhcp = {'mac': '52:54:00:00:03:fd', 'address': '10.200.3.253'}
        self.agent.plug(NET, dhcp, ['10.77.0.2'], 'i-2', P1)
        self.assertIn(['ip', '-n', self.ns, 'addr', 'add', '10.200.3.253/24', 'dev', 'eth0'],
                      self.runner.take())
        self.agent.leave(NET['id'])
        self.assertEqual([['ip', 'link', 'del', 'vmcg1000'],
                          ['ip', 'link', 'del', 'vmcp1000'],
                          ['nft', 'delete', 'table', 'inet', self.table]], self.runner.take())
        self.assertEqual({'vmcb1000', 'vmcx1000', 'vmcd1000'}, set(self.runner.links))
        self.assertEqual({}, self.agent.joined())
        self.agent.unplug(NET['id'], 'i-2')
        self.assertEqual([], self.agent.leftovers())
        self.assertEqual({}, self.agent.networks())

    def test_reconcile_of_the_compute_host_leaves_the_gateway_joined(self):
        self.join()
        self.agent.plug(NET, DHCP, ['10.77.0.2'], 'i-1', P1)
        self.agent.reconcile({})
        self.assertEqual({'vmcb1000', 'vmcx1000', 'vmcg1000', 'vmcp1000'},
                         set(self.runner.links))
        self.assertEqual(({}, set()), (self.runner.procs, self.runner.namespaces))
        self.assertIn(NET['id'], self.agent.joined())


class FakeJoinTest(base.TestCase):
    def test_join_leave_and_joined_are_recorded(self):
        agent = fake.FakeNetworkAgent(self.conf)
        self.assertEqual('vmcg1000', agent.join(NET, GATEWAY, ['10.77.0.2', '']))
        agent.join(NET, GATEWAY, ['10.77.0.3'])
        self.assertEqual({NET['id']: {'network': NET, 'address': GATEWAY,
                                      'peers': ['10.77.0.3'], 'interface': 'vmcg1000'}},
                         agent.joined())
        self.assertIn(f'nft inet vmcloud_gw_{agent.tag}', agent.leftovers())
        agent.set_peers(NET['id'], ['10.77.0.4'])
        self.assertEqual(['10.77.0.4'], agent.joined()[NET['id']]['peers'])
        self.assertRaises(exception.NetworkError, agent.join, NET, '10.1.1.1', [])
        agent.leave(NET['id'])
        agent.leave(NET['id'])
        self.assertEqual(({}, []), (agent.joined(), agent.leftovers()))
        self.assertEqual(['join', 'join', 'set_peers', 'join', 'leave', 'leave'],
                         [c[0] for c in agent.calls])
