"""GatewayManager.apply against a HAProxy modelled in memory: what it sends to HAProxy
and the network agent for each change of the gateway state."""
import copy
import threading

from vmcloud import exception
from vmcloud import rpc
from vmcloud.gateway import config as config_mod
from vmcloud.gateway import haproxy as haproxy_mod
from vmcloud.gateway import load
from vmcloud.gateway import manager
from tests import base

WAIT = 10
# What changes HAProxy; the rest only reads it.
MUTATING = ('set_map_entry', 'del_map_entry', 'add_server', 'del_server', 'set_weight',
            'enable_server', 'disable_server', 'set_server_address', 'start', 'stop')


class FakeHAProxy:
    """HAProxy's runtime state as the manager sees it: maps, dynamic servers and their
    connections (``connections``: (backend, server) -> count, set by the test). Every
    command, reading or not, goes to ``log`` (shared with the network agent's, to check
    their order)."""

    def __init__(self, conf, log: list):
        self.slots = {slot for protocol in config_mod.PROTOCOLS
                      for slot in config_mod.slot_names(conf, protocol)}
        self.log = log
        self.maps: dict[str, dict[str, str]] = {name: {} for name in config_mod.MAPS}
        self.backends: dict[str, dict[str, dict]] = {}
        self.connections: dict[tuple[str, str], int] = {}
        self.running = False
        self.starts = 0

    def _record(self, *command) -> None:
        self.log.append(command)

    # -- the process ---------------------------------------------------------------

    def adopt(self) -> bool:
        self._record('adopt')
        return self.running

    def start(self) -> None:
        self._record('start')
        self.running = True
        self.starts += 1
        # Dynamic servers live in the process only; the maps are files it loads.
        self.backends = {}

    def alive(self) -> bool:
        return self.running

    def stop(self) -> None:
        self._record('stop')
        self.running = False

    def die(self) -> None:
        self.running = False
        self.backends = {}

    # -- maps ----------------------------------------------------------------------

    def map_entries(self, name: str) -> dict[str, str]:
        return dict(self.maps[name])

    def set_map_entry(self, name: str, key, value: str) -> None:
        self._record('set_map_entry', name, int(key), value)
        self.maps[name][str(key)] = str(value)

    def del_map_entry(self, name: str, key) -> None:
        self._record('del_map_entry', name, int(key))
        del self.maps[name][str(key)]

    # -- servers -------------------------------------------------------------------

    def _server(self, backend: str, name: str) -> dict:
        try:
            return self.backends[backend][name]
        except KeyError:
            raise exception.HAProxyError(f'x {backend}/{name}', 'No such server.') from None

    def add_server(self, backend, name, address, port, weight, check_interval_ms=None) -> None:
        assert backend in self.slots, backend
        assert 1 <= weight <= 256, weight
        if name in self.backends.get(backend, {}):
            raise exception.HAProxyError(f'add server {backend}/{name}', 'Already exists.')
        self._record('add_server', backend, name, address, port, weight)
        self.backends.setdefault(backend, {})[name] = {
            'address': address, 'port': port, 'weight': weight, 'maintenance': False}

    def del_server(self, backend: str, name: str) -> None:
        self._server(backend, name)['maintenance'] = True
        if self.connections.get((backend, name)):
            raise exception.HAProxyError(f'del server {backend}/{name}',
                                         'Server still has connections attached to it.')
        self._record('del_server', backend, name)
        del self.backends[backend][name]

    def set_weight(self, backend: str, name: str, weight: int) -> None:
        self._record('set_weight', backend, name, weight)
        self._server(backend, name)['weight'] = weight

    def enable_server(self, backend: str, name: str) -> None:
        self._record('enable_server', backend, name)
        self._server(backend, name)['maintenance'] = False

    def disable_server(self, backend: str, name: str) -> None:
        self._record('disable_server', backend, name)
        self._server(backend, name)['maintenance'] = True

    def command(self, line: str) -> str:
        words = line.split()
        assert words[:2] == ['set', 'server'] and words[3] == 'addr', line
        backend, name = words[2].split('/')
        self._record('set_server_address', backend, name, words[4], int(words[6]))
        self._server(backend, name).update(address=words[4], port=int(words[6]))
        return ''

    def servers(self, backend: str) -> dict[str, haproxy_mod.Server]:
        assert backend in self.slots, backend
        return {name: haproxy_mod.Server(
            backend=backend, id=n + 1, name=name, address=server['address'],
            port=server['port'], op_state=2, admin_state=1 if server['maintenance'] else 0,
            weight=server['weight'], check_status=0)
            for n, (name, server) in enumerate(self.backends.get(backend, {}).items())}

    def server_connections(self, backend: str) -> dict[str, int]:
        return {name: self.connections.get((backend, name), 0)
                for name in self.backends.get(backend, {})}

    def stat(self) -> list[dict]:
        rows = []
        for backend, servers in self.backends.items():
            rows.append({'pxname': backend, 'svname': 'BACKEND', 'scur': '0'})
            rows += [{'pxname': backend, 'svname': name,
                      'scur': str(self.connections.get((backend, name), 0))}
                     for name in servers]
        return rows

    def show_table(self, name: str, filter: str | None = None) -> list[dict]:
        return []

    def sessions(self) -> list[dict]:
        return []

    def run_id(self) -> str:
        return f'run-{self.starts}'

    def all_servers(self) -> dict[str, tuple]:
        """server name -> (address, port), of every backend."""
        return {name: (server['address'], server['port'])
                for servers in self.backends.values() for name, server in servers.items()}

    # -- what the tests look at ----------------------------------------------------

    def slot_of(self, port: int) -> str | None:
        return self.maps[config_mod.MAP_SLOT].get(str(port))

    def weights(self, backend: str) -> dict[str, int]:
        return {name: server['weight'] for name, server in self.backends.get(backend, {}).items()
                if not server['maintenance']}


class StubAgent:
    """The network agent's join/leave, recorded in the shared log."""

    def __init__(self, log: list):
        self.log = log
        self.records: dict[str, dict] = {}

    def join(self, network: dict, address: str, peers: list[str]) -> str:
        self.log.append(('join', network['id'], address, tuple(peers)))
        self.records[network['id']] = {'network': network, 'address': address,
                                       'peers': list(peers)}
        return f'vmcg{network["vni"]}'

    def leave(self, network_id: str) -> None:
        self.log.append(('leave', network_id))
        self.records.pop(network_id, None)

    def joined(self) -> dict[str, dict]:
        return copy.deepcopy(self.records)


class FakeDispatcher:
    def __init__(self, state: dict):
        self.state = state
        self.calls: list[tuple] = []
        self.read = threading.Condition()
        self.register_errors: list[Exception] = []

    def register_gateway(self, name: str, vtep_address: str = '') -> dict:
        self.calls.append(('register_gateway', name, vtep_address))
        if self.register_errors:
            raise self.register_errors.pop(0)
        return copy.deepcopy(self.state)

    def gateway_state(self) -> dict:
        with self.read:
            self.calls.append(('gateway_state',))
            self.read.notify_all()
            return copy.deepcopy(self.state)


def host(cpus: int = 2, busy: float = 0.0, up: bool = True) -> dict:
    return {'cpus': cpus, 'cpu_busy': busy, 'vcpus': cpus, 'vcpus_used': 0,
            'memory_mib': 4096, 'memory_mib_used': 0, 'up': up}


def listener(deployment: str, port: int, instances: list[dict], protocol: str = 'http',
             cloud: str = 'c1', application: str | None = 'web', vni: int = 1001,
             peers: tuple = ('192.0.2.1', '192.0.2.2')) -> dict:
    return {'deployment': deployment, 'cloud': cloud, 'application': application,
            'listener_port': port, 'protocol': protocol, 'port': 8080,
            'network': {'id': f'net-{deployment}', 'vni': vni, 'cidr': f'10.{vni % 250}.0.0/24'},
            'peers': list(peers),
            'instances': instances}


def instance(ident: str, host_name: str, address: str) -> dict:
    return {'id': ident, 'name': f'vm-{ident}', 'host': host_name, 'address': address,
            'state': 'active'}


def state(*listeners: dict, hosts: dict | None = None) -> dict:
    return {'clouds': {'c1': {'connection_limit': 50}, 'c2': {'connection_limit': 7}},
            'applications': {'web': {'connection_limit': 20}, 'db': {'connection_limit': None}},
            'hosts': hosts or {'h1': host(), 'h2': host()},
            'listeners': list(listeners)}


class GatewayApplyTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.conf.set_override('state_path', self.tmp + '/gateway', 'gateway')
        self.conf.set_override('backend_slots', 3, 'gateway')
        self.log: list[tuple] = []
        self.haproxy = FakeHAProxy(self.conf, self.log)
        self.haproxy.running = True
        self.agent = StubAgent(self.log)
        self.a = instance('a', 'h1', '10.1.0.2')
        self.b = instance('b', 'h2', '10.1.0.3')
        self.web = listener('d1', 21000, [self.a, self.b])
        self.dispatcher = FakeDispatcher(state(self.web))
        self.gateway = self.new_manager()

    def new_manager(self) -> manager.GatewayManager:
        return manager.GatewayManager(self.conf, self.dispatcher, self.haproxy, self.agent)

    def commands(self) -> list[tuple]:
        """The commands that changed something since the last call."""
        found = [c for c in self.log if c[0] in MUTATING + ('join', 'leave')]
        self.log.clear()
        return found

    def test_a_listener_gets_a_slot_maps_servers_and_its_network(self):
        self.gateway.apply(state(self.web))
        slot = self.haproxy.slot_of(21000)
        self.assertEqual('http_slot0', slot)
        maps = {name: entries.get('21000') for name, entries in self.haproxy.maps.items()}
        self.assertEqual({config_mod.MAP_SLOT: slot, config_mod.MAP_CLOUD: 'c1',
                          config_mod.MAP_CLOUD_LIMIT: '50', config_mod.MAP_APP: 'web',
                          config_mod.MAP_APP_LIMIT: '20'}, maps)
        self.assertEqual({'a': 256, 'b': 256}, self.haproxy.weights(slot))
        servers = self.haproxy.all_servers()
        self.assertEqual({'a': ('10.1.0.2', 8080), 'b': ('10.1.0.3', 8080)}, servers)
        commands = self.commands()
        kinds = [c[0] for c in commands]
        # Joined before its servers are added (their addresses are on it); the port
        # mapped to its slot only once its cloud and limits are mapped.
        self.assertEqual(('join', 'net-d1', '10.1.0.1', ('192.0.2.1', '192.0.2.2')),
                         commands[0])
        self.assertLess(kinds.index('join'), kinds.index('add_server'))
        slot_set = commands.index(('set_map_entry', config_mod.MAP_SLOT, 21000, slot))
        self.assertEqual(len(commands) - 1, slot_set)

    def test_the_same_state_again_sends_nothing(self):
        self.gateway.apply(state(self.web))
        self.commands()
        self.gateway.apply(state(self.web))
        self.assertEqual([], self.commands())
        # Nor does a new manager on the same HAProxy (it adopted it): the slot map holds
        # each listener's slot, HAProxy its servers; it joins its networks again once,
        # whose peers it cannot know.
        self.new_manager().apply(state(self.web))
        self.assertEqual(['join'], [c[0] for c in self.commands()])

    def test_a_new_instance_is_added_and_the_others_are_untouched(self):
        self.gateway.apply(state(self.web))
        self.commands()
        c = instance('c', 'h2', '10.1.0.4')
        self.gateway.apply(state(listener('d1', 21000, [self.a, self.b, c])))
        # h2's two CPUs now shared by b and c.
        self.assertEqual(sorted([('set_weight', 'http_slot0', 'b', 128),
                                 ('add_server', 'http_slot0', 'c', '10.1.0.4', 8080, 128)]),
                         sorted(self.commands()))

    def test_a_removed_instance_is_drained_then_deleted(self):
        self.gateway.apply(state(self.web))
        self.haproxy.connections[('http_slot0', 'a')] = 3
        self.haproxy.connections[('http_slot0', 'b')] = 1
        self.commands()
        self.gateway.apply(state(listener('d1', 21000, [self.b])))
        # No new connection to a; its 3 are left alone, and b's one too.
        self.assertEqual([('disable_server', 'http_slot0', 'a')], self.commands())
        self.assertIn('a', set(self.haproxy.all_servers()))
        self.gateway.apply(state(listener('d1', 21000, [self.b])))
        self.assertEqual([], self.commands())
        self.haproxy.connections[('http_slot0', 'a')] = 0
        self.gateway.apply(state(listener('d1', 21000, [self.b])))
        self.assertEqual([('del_server', 'http_slot0', 'a')], self.commands())
        self.assertEqual({'b': 256}, self.haproxy.weights('http_slot0'))

    def test_an_instance_back_before_its_deletion_is_enabled_again(self):
        self.gateway.apply(state(self.web))
        self.haproxy.connections[('http_slot0', 'a')] = 1
        self.gateway.apply(state(listener('d1', 21000, [self.b])))
        self.commands()
        self.gateway.apply(state(self.web))
        # Its one connection lowers its weight a little.
        self.assertEqual([('set_weight', 'http_slot0', 'a', 253),
                          ('enable_server', 'http_slot0', 'a')], self.commands())

    def test_weights_follow_the_hosts_loads_and_connections(self):
        self.gateway.apply(state(self.web))
        busy = {'h1': host(busy=0.95), 'h2': host()}
        self.gateway.apply(state(self.web, hosts=busy))
        expected = load.weights(busy, [self.a, self.b], {})
        self.assertEqual({'a': 13, 'b': 256}, expected)
        self.assertEqual(expected, self.haproxy.weights('http_slot0'))
        self.haproxy.connections[('http_slot0', 'b')] = 100
        self.gateway.apply(state(self.web))
        self.assertEqual({'a': 256, 'b': 128}, self.haproxy.weights('http_slot0'))

    def test_a_gone_listener_leaves_the_maps_first_then_its_servers_as_they_empty(self):
        db = listener('d2', 22000, [instance('x', 'h1', '10.2.0.2')], protocol='tcp',
                      cloud='c2', application='db', vni=1002)
        self.gateway.apply(state(self.web, db))
        self.assertEqual('tcp_slot0', self.haproxy.slot_of(22000))
        # An application without a limit maps none.
        self.assertNotIn('22000', self.haproxy.maps[config_mod.MAP_APP_LIMIT])
        self.haproxy.connections[('http_slot0', 'a')] = 2
        self.commands()
        self.gateway.apply(state(db))
        commands = self.commands()
        kinds = [c[0] for c in commands]
        self.assertEqual({'del_map_entry'}, set(kinds[:5]))
        self.assertEqual(config_mod.MAP_SLOT, commands[0][1])
        for entries in self.haproxy.maps.values():
            self.assertNotIn('21000', entries)
        self.assertIn(('disable_server', 'http_slot0', 'a'), commands)
        self.assertIn(('del_server', 'http_slot0', 'b'), commands)
        self.assertNotIn(('del_server', 'http_slot0', 'a'), commands)
        self.assertIn(('leave', 'net-d1'), commands)
        # Its slot is not free while a's connections drain: a new listener takes another.
        other = listener('d3', 21001, [instance('y', 'h2', '10.3.0.2')], vni=1003)
        self.gateway.apply(state(db, other))
        self.assertEqual('http_slot1', self.haproxy.slot_of(21001))
        self.haproxy.connections[('http_slot0', 'a')] = 0
        self.gateway.apply(state(db, other))
        self.assertEqual({}, self.haproxy.backends['http_slot0'])
        # Now it is.
        again = listener('d4', 21002, [instance('z', 'h2', '10.4.0.2')], vni=1004)
        self.gateway.apply(state(db, other, again))
        self.assertEqual('http_slot0', self.haproxy.slot_of(21002))
        self.assertEqual('http_slot1', self.haproxy.slot_of(21001))

    def test_a_listener_keeps_its_slot_whatever_comes_and_goes(self):
        first = listener('d1', 21005, [self.a])
        self.gateway.apply(state(listener('d0', 21004, [self.b], vni=1009), first))
        self.assertEqual('http_slot1', self.haproxy.slot_of(21005))
        self.gateway.apply(state(first))
        self.assertEqual('http_slot1', self.haproxy.slot_of(21005))

    def test_a_command_refused_for_one_listener_leaves_the_others_served(self):
        first = listener('d0', 21000, [instance('x', 'h1', '10.9.0.2')], vni=1009)
        second = listener('d1', 21001, [self.a, self.b])
        refuse = self.haproxy.add_server

        def add_server(backend, name, *args, **kwargs):
            if name == 'x':
                raise exception.HAProxyError(f'add server {backend}/{name}', 'Refused.')
            return refuse(backend, name, *args, **kwargs)

        self.haproxy.add_server = add_server
        error = self.assertRaises(exception.HAProxyError, self.gateway.apply,
                                  state(first, second))
        self.assertIn('x', error.command)
        slot = self.haproxy.slot_of(21001)
        self.assertEqual({'a', 'b'}, set(self.haproxy.weights(slot)))

    def test_a_failed_join_again_does_not_leave_a_serving_network(self):
        self.gateway.apply(state(self.web))
        moved = listener('d1', 21000, [self.a, self.b], peers=('192.0.2.9',))

        def join(network, address, peers):
            raise exception.NetworkError(f'bridge fdb append to {peers} failed')

        self.agent.join = join
        self.assertRaises(exception.NetworkError, self.gateway.apply, state(moved))
        self.assertIn('net-d1', self.agent.records)
        self.assertNotIn(('leave', 'net-d1'), self.log)
        self.assertEqual({'a', 'b'}, set(self.haproxy.weights(self.haproxy.slot_of(21000))))

    def test_an_entry_left_in_a_listener_map_goes_with_the_next_apply(self):
        # A removal cut short after the slot map: the port's cloud must not wait there
        # for the next deployment given the port.
        self.haproxy.set_map_entry(config_mod.MAP_CLOUD, 21009, 'c2')
        self.gateway.apply(state(self.web))
        self.assertNotIn('21009', self.haproxy.maps[config_mod.MAP_CLOUD])

    def test_the_gateways_own_vtep_is_no_peer_of_its_own(self):
        self.conf.set_override('vtep_address', '192.0.2.1', 'network')
        self.gateway.apply(state(self.web))
        self.assertEqual(['192.0.2.2'], self.agent.records['net-d1']['peers'])

    def test_no_free_slot_raises_and_serves_the_others(self):
        many = [listener(f'd{n}', 21000 + n, [instance(f'i{n}', 'h1', f'10.{n}.0.2')],
                         vni=1000 + n) for n in range(4)]
        error = self.assertRaises(exception.BackendSlotsExhausted,
                                  self.gateway.apply, state(*many))
        self.assertEqual(('http', 3), (error.protocol, error.slots))
        self.assertEqual(['http_slot0', 'http_slot1', 'http_slot2', None],
                         [self.haproxy.slot_of(21000 + n) for n in range(4)])
        self.assertNotIn('i3', set(self.haproxy.all_servers()))
        self.assertNotIn('net-d3', self.agent.records)
        # One goes: the waiting one gets its slot.
        self.gateway.apply(state(*many[1:]))
        self.assertEqual('http_slot0', self.haproxy.slot_of(21003))

    def test_a_limit_change_updates_one_map_entry(self):
        self.gateway.apply(state(self.web))
        self.commands()
        changed = state(self.web)
        changed['clouds']['c1']['connection_limit'] = 60
        self.gateway.apply(changed)
        self.assertEqual([('set_map_entry', config_mod.MAP_CLOUD_LIMIT, 21000, '60')],
                         self.commands())

    def test_new_peers_join_again(self):
        self.gateway.apply(state(self.web))
        self.commands()
        moved = listener('d1', 21000, [self.a, instance('b', 'h3', '10.1.0.3')],
                         peers=('192.0.2.3', '192.0.2.1'))
        self.gateway.apply(state(moved, hosts={'h1': host(), 'h3': host()}))
        self.assertEqual([('join', 'net-d1', '10.1.0.1', ('192.0.2.1', '192.0.2.3'))],
                         self.commands())

    def test_a_restarted_haproxy_gets_its_servers_again(self):
        self.gateway.apply(state(self.web))
        self.haproxy.die()
        self.haproxy.start()
        self.commands()
        self.gateway.apply(state(self.web))
        self.assertEqual([('add_server', 'http_slot0', 'a', '10.1.0.2', 8080, 256),
                          ('add_server', 'http_slot0', 'b', '10.1.0.3', 8080, 256)],
                         sorted(self.commands()))


class GatewayServiceTest(base.TestCase):
    """start(), refresh() and the watchdog, on the fake:// transport."""

    def setUp(self):
        super().setUp()
        self.conf.set_override('state_path', self.tmp + '/gateway', 'gateway')
        rpc.register_opts(self.conf)
        self.conf.set_override('transport_url', 'fake://')
        self.conf.set_override('rpc_startup_timeout', 5)
        self.addCleanup(rpc.cleanup)
        # Long: only a refresh (or the watchdog) makes the manager read the state.
        self.conf.set_override('poll_interval', 3600, 'gateway')
        self.conf.set_override('backend_slots', 2, 'gateway')
        self.conf.set_override('name', 'gw1', 'gateway')
        self.log: list[tuple] = []
        self.haproxy = FakeHAProxy(self.conf, self.log)
        self.agent = StubAgent(self.log)
        self.web = listener('d1', 21000, [instance('a', 'h1', '10.1.0.2')])
        self.dispatcher = FakeDispatcher(state(self.web))
        self.gateway = manager.GatewayManager(self.conf, self.dispatcher, self.haproxy,
                                              self.agent)

    def start(self) -> None:
        self.gateway.start()
        self.addCleanup(self.gateway.stop)

    def wait_for(self, check, what: str) -> None:
        done = threading.Event()
        for _ in range(WAIT * 20):
            if check():
                return
            done.wait(0.05)
        self.fail(f'{what} did not happen within {WAIT} s')

    def test_start_starts_haproxy_registers_and_applies(self):
        self.start()
        self.assertEqual(1, self.haproxy.starts)
        self.assertEqual([('register_gateway', 'gw1', '')], self.dispatcher.calls)
        self.assertEqual('http_slot0', self.haproxy.slot_of(21000))

    def test_start_adopts_a_running_haproxy(self):
        self.haproxy.running = True
        self.start()
        self.assertEqual(0, self.haproxy.starts)

    def test_registering_is_tried_again_until_the_dispatcher_answers(self):
        self.dispatcher.register_errors = [exception.MessagingError('no dispatcher')]
        self.start()
        self.assertEqual(2, len([c for c in self.dispatcher.calls
                                 if c[0] == 'register_gateway']))

    def test_refresh_reads_the_state_at_once(self):
        self.start()
        self.dispatcher.state = state(self.web, listener(
            'd2', 21001, [instance('b', 'h2', '10.2.0.2')], vni=1002))
        self.gateway.refresh({})
        self.wait_for(lambda: self.haproxy.slot_of(21001) == 'http_slot1', 'the refresh')

    def test_refreshes_coalesce(self):
        self.start()
        with self.dispatcher.read:
            for _ in range(50):
                self.gateway.refresh({})
            self.dispatcher.read.wait_for(lambda: self.dispatcher.calls[-1:] ==
                                          [('gateway_state',)], WAIT)
        self.wait_for(lambda: not self.gateway._wake.is_set(), 'the reading')
        # 50 refreshes before the first reading: one reading, or two if the first
        # reading began before the last refresh; never one each.
        readings = [c for c in self.dispatcher.calls if c == ('gateway_state',)]
        self.assertLessEqual(len(readings), 2)

    def test_the_watchdog_starts_a_dead_haproxy_again_and_programs_it(self):
        self.start()
        self.haproxy.die()
        self.wait_for(lambda: self.haproxy.weights('http_slot0') == {'a': 256},
                      'the restart')
        self.assertEqual(2, self.haproxy.starts)

    def test_stop_leaves_haproxy_running_unless_asked(self):
        self.start()
        self.gateway.stop()
        self.assertTrue(self.haproxy.running)
        self.gateway.stop(haproxy=True)
        self.assertFalse(self.haproxy.running)
