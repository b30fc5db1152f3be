"""The network agent against a fake machine: the exact commands it runs."""
import contextlib
import json
import os
import re
import signal

from vmcloud import exception
from vmcloud.network import agent as agent_mod
from tests import base

NET = {'id': 'net-1', 'vni': 1000, 'cidr': '10.200.3.0/24'}
DHCP = {'mac': '52:54:00:00:03:fe', 'address': '10.200.3.254'}
P1 = {'mac': '52:54:00:00:03:02', 'address': '10.200.3.2'}
P2 = {'mac': '52:54:00:00:03:03', 'address': '10.200.3.3'}


class FakeRunner:
    """A machine that keeps the links, namespaces, FDB entries and dnsmasq processes
    the commands make, and records every command (queries apart, in ``calls``) and
    signal (``signals``). ``fail`` = a command prefix that fails. Like the kernel, ``ip
    link add`` of a name that is there fails, and a veth goes with its peer; ``locks``
    counts namespace_lock()s held."""

    def __init__(self):
        self.calls: list[list[str]] = []
        self.signals: list[tuple[int, int]] = []
        self.links: dict[str, dict] = {}
        self.namespaces: set[str] = set()
        self.fdb: dict[str, set[str]] = {}
        self.procs: dict[int, list[str]] = {}
        #: nftables netdev table -> its chains (name -> the chain's spec)
        self.tables: dict[str, dict[str, str]] = {}
        #: nftables inet table -> its chains (name -> its rules)
        self.inet: dict[str, dict[str, list[str]]] = {}
        #: device -> its IPv4 addresses ('ADDRESS/PREFIX')
        self.addresses: dict[str, list[str]] = {}
        #: device -> its IPv4 settings written (ipv4_conf)
        self.ipv4: dict[str, dict[str, int]] = {}
        self.next_pid = 4000
        self.fail: list[str] | None = None
        self.locks = 0

    def run(self, argv, timeout=None):
        argv = list(argv)
        if argv[:3] == ['ip', '-j', '-d']:
            return json.dumps([{'ifname': n, **v} for n, v in self.links.items()])
        if argv[:3] == ['ip', '-j', 'netns']:
            return json.dumps([{'name': n} for n in sorted(self.namespaces)])
        if argv[:3] == ['bridge', '-j', 'fdb']:
            return json.dumps([{'mac': '00:00:00:00:00:00', 'dst': d}
                               for d in sorted(self.fdb.get(argv[-1], ()))])
        if argv == ['nft', '-j', 'list', 'ruleset', 'netdev']:
            items = [{'metainfo': {'json_schema_version': 1}}]
            for table, chains in sorted(self.tables.items()):
                items.append({'table': {'family': 'netdev', 'name': table}})
                items += [{'chain': {'family': 'netdev', 'table': table, 'name': c}}
                          for c in sorted(chains)]
            return json.dumps({'nftables': items})
        if argv == ['nft', '-j', 'list', 'ruleset', 'inet']:
            items = [{'metainfo': {'json_schema_version': 1}}]
            for table, chains in sorted(self.inet.items()):
                items.append({'table': {'family': 'inet', 'name': table}})
                items += [{'chain': {'family': 'inet', 'table': table, 'name': c}}
                          for c in sorted(chains)]
                items += [{'rule': {'family': 'inet', 'table': table, 'chain': c, 'expr': r}}
                          for c, rules in sorted(chains.items()) for r in rules]
            return json.dumps({'nftables': items})
        if argv[:5] == ['ip', '-j', 'addr', 'show', 'dev']:
            return json.dumps([{'ifname': argv[5], 'addr_info': [
                {'family': 'inet', 'local': a.split('/')[0], 'prefixlen': int(a.split('/')[1])}
                for a in self.addresses.get(argv[5], ())]}])
        self.calls.append(argv)
        if self.fail is not None and argv[:len(self.fail)] == self.fail:
            raise exception.NetworkError(f'{" ".join(argv)} failed (2): boom')
        if argv[:3] == ['ip', 'link', 'add']:
            if argv[3] in self.links:
                raise exception.NetworkError(f'{" ".join(argv)} failed (2): File exists')
            self.links[argv[3]] = {'flags': [], 'master': None}
            if 'veth' in argv and 'netns' in argv:
                self.links[argv[3]]['peer'] = argv[argv.index('netns') + 1]
            elif 'veth' in argv:
                # Both ends here: each goes with the other.
                end = argv[argv.index('peer') + 2]
                self.links[argv[3]]['pair'] = end
                self.links[end] = {'flags': [], 'master': None, 'pair': argv[3]}
        elif argv[:3] == ['ip', 'link', 'set'] and argv[3] in self.links:
            link = self.links[argv[3]]
            if 'up' in argv:
                link['flags'] = ['UP']
            if 'master' in argv:
                link['master'] = argv[argv.index('master') + 1]
            if 'alias' in argv:
                link['ifalias'] = argv[argv.index('alias') + 1]
        elif argv[:3] == ['ip', 'link', 'del']:
            if argv[3] not in self.links:
                raise exception.NetworkError(f'{" ".join(argv)} failed (1): no such device')
            link = self.links.pop(argv[3])
            self.links.pop(link.get('pair'), None)
            self.addresses.pop(argv[3], None)
        elif argv[:3] == ['ip', 'addr', 'add']:
            self.addresses.setdefault(argv[-1], []).append(argv[3])
        elif argv[:3] == ['ip', 'addr', 'del']:
            self.addresses[argv[-1]].remove(argv[3])
        elif argv[:3] == ['ip', 'netns', 'add']:
            self.namespaces.add(argv[3])
        elif argv[:3] == ['ip', 'netns', 'delete']:
            self.namespaces.discard(argv[3])
            for name in [n for n, v in self.links.items() if v.get('peer') == argv[3]]:
                del self.links[name]
        elif argv[:2] == ['bridge', 'fdb']:
            peers = self.fdb.setdefault(argv[5], set())
            (peers.add if argv[2] == 'append' else peers.discard)(argv[7])
        elif argv[:4] == ['nft', 'add', 'table', 'netdev']:
            self.tables.setdefault(argv[4], {})
        elif argv[:4] == ['nft', 'add', 'chain', 'netdev']:
            self.tables[argv[4]][argv[5]] = argv[6]
        elif argv[:4] == ['nft', 'delete', 'table', 'netdev']:
            del self.tables[argv[4]]
        elif argv[:4] == ['nft', 'delete', 'table', 'inet']:
            del self.inet[argv[4]]
        elif argv[0] == 'nft' and len(argv) == 2:
            self._nft_script(argv[1])
        elif argv[:3] == ['ip', 'netns', 'exec']:
            self.next_pid += 1
            self.procs[self.next_pid] = argv[4:]
        return ''

    def _nft_script(self, script: str) -> None:
        """``table inet T; delete table inet T; table inet T { chain C { ...; R; ... } ...}``:
        the table replaced by one with those chains and rules, as one transaction."""
        match = re.fullmatch(r'table inet (\S+); delete table inet \1; table inet \1 '
                             r'\{ (.*) \}', script)
        if match is None:
            raise exception.NetworkError(f'nft: cannot parse {script!r}')
        chains = {}
        for name, body in re.findall(r'chain (\w+) \{ ([^}]*) \}', match.group(2)):
            parts = [p.strip() for p in body.split(';') if p.strip()]
            # The first two are the hook and the policy.
            chains[name] = parts[2:]
        self.inet[match.group(1)] = chains

    def processes(self):
        return list(self.procs.items())

    def cmdline(self, pid):
        return self.procs.get(pid)

    def kill(self, pid, signum=signal.SIGTERM):
        if pid not in self.procs:
            return False
        self.signals.append((pid, signum))
        if signum != signal.SIGHUP:
            del self.procs[pid]
        return True

    @contextlib.contextmanager
    def namespace_lock(self):
        self.locks += 1
        try:
            yield
        finally:
            self.locks -= 1

    def disable_ipv6(self, device):
        self.calls.append(['disable_ipv6', device])

    def ipv4_conf(self, device, settings):
        self.calls.append(['ipv4_conf', device, dict(settings)])
        self.ipv4.setdefault(device, {}).update(settings)

    def take(self) -> list[list[str]]:
        calls, self.calls = self.calls, []
        return calls


class AgentTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.conf.set_override('vtep_address', '10.77.0.1', group='network')
        self.conf.set_override('host', 'h1')
        self.runner = FakeRunner()
        self.agent = agent_mod.NetworkAgent(self.conf, runner=self.runner)
        self.ns = f'vmcloud-1000-{self.agent.tag}'
        self.files = os.path.join(self.state_path, 'network', 'net-1')
        self.alias = f'vmcloud:{self.agent.tag}'
        self.guard = f'vmcloud_1000_{self.agent.tag}'

    def claim(self, name: str) -> list[str]:
        return ['ip', 'link', 'set', name, 'alias', self.alias]

    def make_guard(self, vni: int = 1000) -> list[list[str]]:
        table = f'vmcloud_{vni}_{self.agent.tag}'
        return [['nft', 'add', 'table', 'netdev', table],
                ['nft', 'add', 'chain', 'netdev', table, 'host',
                 f'{{ type filter hook ingress device "vmcb{vni}" priority 0; '
                 'policy drop; }']]

    def dnsmasq(self) -> list[str]:
        return ['ip', 'netns', 'exec', self.ns, 'dnsmasq', '--conf-file=/dev/null',
                '--no-hosts', '--no-resolv', '--port=0', '--dhcp-option=3',
                '--dhcp-option=6', '--bind-interfaces', '--interface=eth0',
                '--except-interface=lo', '--user=root', '--group=root',
                f'--pid-file={self.files}/pid', f'--dhcp-hostsfile={self.files}/hosts',
                f'--dhcp-leasefile={self.files}/leases',
                '--dhcp-range=10.200.3.0,static,255.255.255.0,86400']

    def new_network(self) -> list[list[str]]:
        return [
            ['ip', 'link', 'add', 'vmcb1000', 'mtu', '1450', 'type', 'bridge'],
            ['disable_ipv6', 'vmcb1000'],
            self.claim('vmcb1000'),
            *self.make_guard(),
            ['ip', 'link', 'set', 'vmcb1000', 'up'],
            ['ip', 'link', 'add', 'vmcx1000', 'mtu', '1450', 'type', 'vxlan', 'id', '1000',
             'dstport', '4789', 'local', '10.77.0.1', 'nolearning'],
            ['disable_ipv6', 'vmcx1000'],
            self.claim('vmcx1000'),
            ['ip', 'link', 'set', 'vmcx1000', 'master', 'vmcb1000', 'up'],
            ['bridge', 'fdb', 'append', '00:00:00:00:00:00', 'dev', 'vmcx1000', 'dst',
             '10.77.0.2'],
            ['ip', 'netns', 'add', self.ns],
            ['ip', '-n', self.ns, 'link', 'set', 'lo', 'up'],
            ['ip', 'link', 'add', 'vmcd1000', 'mtu', '1450', 'type', 'veth', 'peer', 'name',
             'eth0', 'mtu', '1450', 'netns', self.ns],
            ['disable_ipv6', 'vmcd1000'],
            self.claim('vmcd1000'),
            ['ip', '-n', self.ns, 'link', 'set', 'eth0', 'address', DHCP['mac']],
            ['ip', '-n', self.ns, 'addr', 'add', '10.200.3.254/24', 'dev', 'eth0'],
            ['ip', '-n', self.ns, 'link', 'set', 'eth0', 'up'],
            ['ip', 'link', 'set', 'vmcd1000', 'master', 'vmcb1000', 'up'],
            self.dnsmasq(),
        ]

    def hosts(self) -> str:
        with open(os.path.join(self.files, 'hosts')) as f:
            return f.read()

    def test_plug_a_new_network(self):
        self.assertEqual('vmcb1000', self.agent.plug(NET, DHCP, ['10.77.0.2', ''], 'i-1', P1))
        self.assertEqual(self.new_network(), self.runner.take())
        self.assertEqual('52:54:00:00:03:02,10.200.3.2,i-1\n', self.hosts())
        self.assertEqual(self.ns, self.agent.namespace('net-1'))
        record = self.agent.networks()['net-1']
        self.assertEqual({'i-1': P1}, record['ports'])
        self.assertEqual(['10.77.0.2'], record['peers'])

    def test_plug_into_an_existing_network_and_twice(self):
        self.agent.plug(NET, DHCP, ['10.77.0.2'], 'i-1', P1)
        self.runner.take()
        [pid] = self.runner.procs
        self.agent.plug(NET, DHCP, ['10.77.0.2'], 'i-2', P2)
        self.assertEqual([], self.runner.take())    # every device is there
        self.assertEqual([(pid, signal.SIGHUP)], self.runner.signals)
        self.assertEqual('52:54:00:00:03:02,10.200.3.2,i-1\n'
                         '52:54:00:00:03:03,10.200.3.3,i-2\n', self.hosts())
        self.agent.plug(NET, DHCP, ['10.77.0.2'], 'i-2', P2)
        self.assertEqual([], self.runner.take())
        self.assertEqual(1, len(self.runner.signals))    # nothing changed: no SIGHUP
        self.assertEqual(['i-1', 'i-2'], sorted(self.agent.networks()['net-1']['ports']))

    def test_every_device_made_carries_our_alias(self):
        self.agent.plug(NET, DHCP, ['10.77.0.2'], 'i-1', P1)
        self.assertEqual({'vmcb1000', 'vmcx1000', 'vmcd1000'}, set(self.runner.links))
        for name, link in self.runner.links.items():
            self.assertEqual(self.alias, link.get('ifalias'), name)
        # Set right after each add, under the namespace's lock.
        calls = self.runner.take()
        for name in ('vmcb1000', 'vmcx1000', 'vmcd1000'):
            add = next(i for i, c in enumerate(calls) if c[:4] == ['ip', 'link', 'add', name])
            self.assertEqual(self.claim(name), calls[add + 2])
        self.assertEqual(0, self.runner.locks)

    def test_a_device_already_there_is_reused_and_adopted(self):
        # Without an alias: an agent's from before aliases.
        self.runner.links['vmcb1000'] = {'flags': ['UP'], 'master': None}
        self.agent.plug(NET, DHCP, [], 'i-1', P1)
        self.assertNotIn(['ip', 'link', 'add', 'vmcb1000', 'mtu', '1450', 'type', 'bridge'],
                         self.runner.calls)
        self.assertEqual(self.claim('vmcb1000'), self.runner.take()[0])
        self.assertEqual(self.alias, self.runner.links['vmcb1000']['ifalias'])
        self.runner.links.pop('vmcx1000')   # lost: made again
        self.agent.plug(NET, DHCP, [], 'i-2', P2)
        self.assertEqual([
            ['ip', 'link', 'add', 'vmcx1000', 'mtu', '1450', 'type', 'vxlan', 'id', '1000',
             'dstport', '4789', 'local', '10.77.0.1', 'nolearning'],
            ['disable_ipv6', 'vmcx1000'],
            self.claim('vmcx1000'),
            ['ip', 'link', 'set', 'vmcx1000', 'master', 'vmcb1000', 'up']],
            self.runner.take())

    def test_another_agents_device_is_refused_and_nothing_made(self):
        for name, kind in (('vmcb1000', 'bridge'), ('vmcx1000', 'VXLAN device'),
                           ('vmcd1000', 'veth')):
            theirs = {name: {'flags': ['UP'], 'master': None, 'ifalias': 'vmcloud:abcd1234'}}
            self.runner.links = json.loads(json.dumps(theirs))
            error = self.assertRaises(exception.NetworkError, self.agent.plug, NET, DHCP,
                                      ['10.77.0.2'], 'i-1', P1)
            self.assertIn(f'{kind} {name} belongs to another vmcloud network agent '
                          f'(vmcloud:abcd1234): one machine namespace serves one cloud',
                          str(error))
            self.assertEqual([], self.runner.take())
            self.assertEqual(theirs, self.runner.links)
            self.assertEqual(set(), self.runner.namespaces)
            self.assertEqual({}, self.runner.procs)
            self.assertEqual({}, self.agent.networks())
            self.assertEqual([], self.agent.leftovers())

    def test_a_device_taken_by_another_agent_is_left_by_reconcile_and_unplug(self):
        self.agent.plug(NET, DHCP, [], 'i-1', P1)
        # Ours went (deleted by hand) and another agent made one of that name.
        self.runner.links['vmcb1000'] = {'flags': ['UP'], 'master': None,
                                         'ifalias': 'vmcloud:abcd1234'}
        self.runner.take()
        error = self.assertRaises(exception.NetworkError, self.agent.reconcile,
                                  {'net-1': {'i-1'}})
        self.assertIn('bridge vmcb1000 belongs to another', str(error))
        self.agent.unplug('net-1', 'i-1')
        self.assertNotIn(['ip', 'link', 'del', 'vmcb1000'], self.runner.take())
        self.assertEqual('vmcloud:abcd1234', self.runner.links['vmcb1000']['ifalias'])
        self.assertEqual([], self.agent.leftovers())

    def test_unplug_of_the_last_port_tears_down(self):
        self.agent.plug(NET, DHCP, ['10.77.0.2'], 'i-1', P1)
        self.agent.plug(NET, DHCP, ['10.77.0.2'], 'i-2', P2)
        [pid] = self.runner.procs
        self.runner.take()
        self.agent.unplug('net-1', 'i-1')
        self.assertEqual([], self.runner.take())
        self.assertEqual((pid, signal.SIGHUP), self.runner.signals[-1])
        self.agent.unplug('net-1', 'i-2')
        self.assertEqual((pid, signal.SIGTERM), self.runner.signals[-1])
        # dnsmasq, the namespace (its veth goes with it), the vxlan, the bridge.
        self.assertEqual([['ip', 'netns', 'delete', self.ns],
                          ['ip', 'link', 'del', 'vmcx1000'],
                          ['ip', 'link', 'del', 'vmcb1000'],
                          ['nft', 'delete', 'table', 'netdev', self.guard]], self.runner.take())
        self.assertEqual({}, self.runner.tables)
        self.assertEqual({}, self.agent.networks())
        self.assertEqual([], self.agent.leftovers())
        self.assertFalse(os.path.exists(self.files))
        self.agent.unplug('net-1', 'i-2')      # unknown: no error
        self.agent.unplug('other', 'i-2')
        self.assertRaises(exception.NetworkNotFound, self.agent.namespace, 'net-1')

    def test_a_network_with_the_vni_of_one_gone_tears_that_one_down_first(self):
        # net-1 was released by the dispatcher while its unplug here failed; its VNI went
        # to net-2, whose devices have the same names: net-1's must not pass for net-2's.
        self.agent.plug(NET, DHCP, ['10.77.0.2'], 'i-1', P1)
        [old_dnsmasq] = self.runner.procs
        self.runner.take()
        net2 = dict(NET, id='net-2', cidr='10.200.4.0/24')
        dhcp2 = {'mac': '52:54:00:00:04:fe', 'address': '10.200.4.254'}
        self.agent.plug(net2, dhcp2, [], 'i-9', {'mac': '52:54:00:00:04:02',
                                                 'address': '10.200.4.2'})
        self.assertEqual(['net-2'], list(self.agent.networks()))
        self.assertIn((old_dnsmasq, signal.SIGTERM), self.runner.signals)
        commands = self.runner.take()
        # net-1's parts went first, then net-2's were made anew, its DHCP port the new one.
        self.assertLess(commands.index(['ip', 'netns', 'delete', self.ns]),
                        commands.index(['ip', 'netns', 'add', self.ns]))
        self.assertIn(['ip', '-n', self.ns, 'addr', 'add', '10.200.4.254/24', 'dev', 'eth0'],
                      commands)
        self.assertFalse(os.path.exists(self.files))

    def test_managers_of_one_machine_unplug_and_reconcile_only_their_own_ports(self):
        # Two compute managers share the agent's records (one machine): a restarted one
        # reconciles its own ports, and an instance rebuilt on the other under the same
        # name keeps the port the other plugged.
        self.agent.plug(NET, DHCP, [], 'i-1', P1, owner='node1')
        self.agent.plug(NET, DHCP, [], 'i-2', P2, owner='node2')
        self.agent.reconcile({}, owner='node1')
        self.assertEqual({'i-2': P2}, self.agent.networks()['net-1']['ports'])
        self.agent.unplug('net-1', 'i-2', owner='node1')
        self.assertEqual({'i-2': P2}, self.agent.networks()['net-1']['ports'])
        self.agent.unplug('net-1', 'i-2', owner='node2')
        self.assertEqual({}, self.agent.networks())

    def test_set_peers_adds_and_removes_fdb_entries(self):
        self.agent.plug(NET, DHCP, ['10.77.0.2', '10.77.0.3'], 'i-1', P1)
        self.runner.take()
        self.agent.set_peers('net-1', ['10.77.0.3', '10.77.0.4'])
        self.assertEqual([
            ['bridge', 'fdb', 'append', '00:00:00:00:00:00', 'dev', 'vmcx1000', 'dst',
             '10.77.0.4'],
            ['bridge', 'fdb', 'del', '00:00:00:00:00:00', 'dev', 'vmcx1000', 'dst',
             '10.77.0.2']], self.runner.take())
        self.assertEqual(['10.77.0.3', '10.77.0.4'], self.agent.networks()['net-1']['peers'])
        self.agent.set_peers('unknown', ['10.77.0.9'])
        self.assertEqual([], self.runner.take())

    def test_a_failing_command_mid_plug_leaves_nothing(self):
        self.runner.fail = ['ip', '-n', self.ns, 'addr', 'add']
        error = self.assertRaises(exception.NetworkError, self.agent.plug, NET, DHCP,
                                  ['10.77.0.2'], 'i-1', P1)
        self.assertIn('ip -n ' + self.ns + ' addr add 10.200.3.254/24 dev eth0', str(error))
        self.assertIn('boom', str(error))
        self.assertEqual([], self.agent.leftovers())
        self.assertEqual({}, self.agent.networks())
        self.assertEqual({}, self.runner.links)
        self.assertEqual(set(), self.runner.namespaces)
        self.assertEqual({}, self.runner.tables)

    def test_reconcile(self):
        self.agent.plug(NET, DHCP, [], 'i-1', P1)
        self.agent.plug(NET, DHCP, [], 'i-2', P2)
        other = {'id': 'net-2', 'vni': 1001, 'cidr': '10.200.4.0/24'}
        self.agent.plug(other, DHCP, [], 'i-3', P1)
        # Strays: a bridge and a namespace of no record, and a dead dnsmasq. Another
        # agent's devices of no record of ours (one of our records' VNI too), and one
        # without an alias, stay.
        self.runner.links['vmcb1077'] = {'flags': ['UP'], 'master': None,
                                         'ifalias': self.alias}
        theirs = {'vmcb1078': {'flags': ['UP'], 'master': None, 'ifalias': 'vmcloud:0ther000'},
                  'vmcd1078': {'flags': ['UP'], 'master': 'vmcb1078',
                               'ifalias': 'vmcloud:0ther000'},
                  'vmcx1079': {'flags': ['UP'], 'master': None, 'ifalias': 'vmcloud:0ther000'},
                  'vmcb1080': {'flags': ['UP'], 'master': None}}
        self.runner.links.update(theirs)
        self.runner.namespaces.add(f'vmcloud-1077-{self.agent.tag}')
        self.runner.namespaces.add('vmcloud-1077-someoneelse')
        self.runner.tables[f'vmcloud_1077_{self.agent.tag}'] = {}
        self.runner.tables['vmcloud_1077_someoneelse'] = {}
        for pid, argv in list(self.runner.procs.items()):
            if f'--pid-file={self.files}/pid' in argv:
                del self.runner.procs[pid]
        self.runner.take()
        self.agent.reconcile({'net-1': {'i-1'}})
        self.assertEqual({'net-1'}, set(self.agent.networks()))
        self.assertEqual({'i-1': P1}, self.agent.networks()['net-1']['ports'])
        self.assertEqual('52:54:00:00:03:02,10.200.3.2,i-1\n', self.hosts())
        calls = self.runner.take()
        self.assertEqual(self.dnsmasq(), calls[0])    # the dead dnsmasq restarted
        self.assertEqual([['ip', 'netns', 'delete', f'vmcloud-1001-{self.agent.tag}'],
                          ['ip', 'link', 'del', 'vmcx1001'],
                          ['ip', 'link', 'del', 'vmcb1001'],
                          ['nft', 'delete', 'table', 'netdev', f'vmcloud_1001_{self.agent.tag}'],
                          ['ip', 'netns', 'delete', f'vmcloud-1077-{self.agent.tag}'],
                          ['ip', 'link', 'del', 'vmcb1077'],
                          ['nft', 'delete', 'table', 'netdev', f'vmcloud_1077_{self.agent.tag}']],
                         calls[1:])
        self.assertIn('vmcloud-1077-someoneelse', self.runner.namespaces)
        self.assertEqual({self.guard, 'vmcloud_1077_someoneelse'}, set(self.runner.tables))
        for name, link in theirs.items():
            self.assertEqual(link, self.runner.links[name])
        self.assertEqual(['link vmcb1000', 'link vmcd1000', 'link vmcx1000', f'netns {self.ns}',
                          f'nft netdev {self.guard}'],
                         [x for x in self.agent.leftovers() if not x.startswith('dnsmasq')])

    def test_the_bridge_is_guarded_before_it_is_up_and_again_when_made_again(self):
        # What the bridge passes up to the host is dropped (a guest reaches nothing
        # of the host through it): the guard is there before the bridge goes up.
        self.agent.plug(NET, DHCP, [], 'i-1', P1)
        calls = self.runner.take()
        self.assertLess(calls.index(self.make_guard()[1]),
                        calls.index(['ip', 'link', 'set', 'vmcb1000', 'up']))
        self.assertEqual({self.guard: {'host': self.make_guard()[1][-1]}}, self.runner.tables)
        # Lost: made again.
        self.runner.tables.clear()
        self.agent.reconcile({'net-1': {'i-1'}})
        self.assertEqual(self.make_guard(), [c for c in self.runner.take() if c[0] == 'nft'])
        # A table without its chain is no guard; a bridge made again needs a chain on
        # the new device.
        for damage in (lambda: self.runner.tables[self.guard].clear(),
                       lambda: self.runner.links.pop('vmcb1000')):
            damage()
            self.agent.reconcile({'net-1': {'i-1'}})
            self.assertEqual([['nft', 'delete', 'table', 'netdev', self.guard],
                              *self.make_guard()],
                             [c for c in self.runner.take() if c[0] == 'nft'])
        self.agent.plug(NET, DHCP, [], 'i-2', P2)   # all there: nothing to do
        self.assertEqual([], self.runner.take())

    def test_a_dnsmasq_whose_namespace_went_is_replaced(self):
        self.agent.plug(NET, DHCP, [], 'i-1', P1)
        [old] = self.runner.procs
        # `ip netns delete` by hand: dnsmasq keeps the old namespace (and the veth's eth0
        # in it) alive, so it runs on, serving nobody.
        self.runner.namespaces.discard(self.ns)
        self.runner.take()
        self.agent.reconcile({'net-1': {'i-1'}})
        self.assertIn((old, signal.SIGTERM), self.runner.signals)
        [new] = self.runner.procs
        self.assertNotEqual(old, new)
        calls = self.runner.take()
        self.assertIn(['ip', 'netns', 'add', self.ns], calls)
        self.assertEqual(self.dnsmasq(), calls[-1])

    def test_a_network_whose_id_ends_in_anothers_keeps_its_dnsmasq(self):
        self.agent.plug(NET, DHCP, [], 'i-1', P1)
        other = {'id': 'xnet-1', 'vni': 1001, 'cidr': '10.200.4.0/24'}
        self.agent.plug(other, DHCP, [], 'i-2', P2)
        self.assertEqual(2, len(self.runner.procs))
        self.agent.unplug('net-1', 'i-1')
        [(_, argv)] = self.runner.procs.items()
        self.assertIn(f'--pid-file={self.state_path}/network/xnet-1/pid', argv)

    def test_names_fit_15_characters(self):
        self.conf.set_override('vtep_address', '', group='network')
        big = {'id': 'net-9', 'vni': 999999, 'cidr': '10.200.9.0/24'}
        self.assertEqual('vmcb999999', self.agent.plug(big, DHCP, [], 'i-1', P1))
        for argv in self.runner.take():
            if argv[:3] == ['ip', 'link', 'add']:
                self.assertLessEqual(len(argv[3]), 15)
        self.assertFalse(any(n.startswith('vmcx') for n in self.runner.links))
        self.assertRaises(exception.NetworkError, self.agent.bridge_name, 10 ** 11)
        self.assertRaises(exception.NetworkError, self.agent.bridge_name, 0)
