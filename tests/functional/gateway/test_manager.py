"""The gateway manager with a real HAProxy: instances stand-ins are threaded Python
servers on loopback addresses (127.0.0.N, each the deployment's port), the dispatcher a
stand-in answering a fixed gateway state, the network agent the fake one."""
import copy
import http.client
import os
import signal
import socket
import socketserver
import threading
import time

from vmcloud import rpc
from vmcloud.gateway import config
from vmcloud.gateway import haproxy
from vmcloud.gateway import load
from vmcloud.gateway import manager
from vmcloud.network import fake as fake_network
from tests import base
from tests.functional.gateway import free_port_block

SLOTS = 4
# Bound on waiting for HAProxy to take a server (its first check) or to come back.
SETTLE = 15.0
# New connections per listener in the weights test, and how far each instance's share
# may be from the expected one (weighted round-robin is exact over a cycle of the
# weights' sum; the slack covers a partial cycle and a connection that failed over).
REQUESTS = 400
SHARE_SLACK = 0.05


class _Instance(socketserver.ThreadingTCPServer):
    """One instance stand-in at ``address``:``port``: answers each connection with its
    name (TCP: the name and a newline, then an echo; HTTP: the name as every GET's
    body, keep-alive)."""
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, name: str, address: str, port: int, protocol: str):
        self.name = name
        self.protocol = protocol
        super().__init__((address, port), _Handler)

    def handle_error(self, request, client_address):
        pass  # health checks connect and go at once


class _Handler(socketserver.StreamRequestHandler):
    def handle(self):
        if self.server.protocol == 'tcp':
            self.wfile.write(self.server.name.encode() + b'\n')
            while data := self.request.recv(4096):
                self.request.sendall(data)
            return
        while True:
            line = self.rfile.readline()
            if not line:
                return
            while self.rfile.readline() not in (b'\r\n', b'\n', b''):
                pass  # the headers: no body in a GET
            body = self.server.name.encode()
            self.wfile.write(b'HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s'
                             % (len(body), body))


def get(sock: socket.socket) -> str:
    """One GET on an open connection: the answering instance's name."""
    sock.sendall(b'GET / HTTP/1.1\r\nHost: gateway\r\n\r\n')
    response = http.client.HTTPResponse(sock)
    response.begin()
    assert response.status == 200, response.status
    return response.read().decode()


class FakeDispatcher:
    """Answers register_gateway and gateway_state with ``state``."""

    def __init__(self, state: dict):
        self.state = state

    def register_gateway(self, name: str, vtep_address: str = '') -> dict:
        return copy.deepcopy(self.state)

    def gateway_state(self) -> dict:
        return copy.deepcopy(self.state)


def host(busy: float) -> dict:
    return {'cpus': 2, 'cpu_busy': busy, 'vcpus': 2, 'vcpus_used': 1, 'memory_mib': 4096,
            'memory_mib_used': 256, 'up': True}


class GatewayManagerTest(base.TestCase):
    def setUp(self):
        super().setUp()
        rpc.register_opts(self.conf)
        self.conf.set_override('transport_url', 'fake://')
        self.addCleanup(rpc.cleanup)
        low = free_port_block(2 * SLOTS)
        self.http_port, self.tcp_port = low, low + SLOTS
        for key, value in (('state_path', os.path.join(self.tmp, 'gateway')),
                           ('listen_address', '127.0.0.1'),
                           ('listener_ports', f'{low}-{low + SLOTS - 1}'),
                           ('tcp_listener_ports', f'{low + SLOTS}-{low + 2 * SLOTS - 1}'),
                           ('backend_slots', SLOTS), ('name', f'gw-{os.getpid()}'),
                           ('poll_interval', 0.5)):
            self.conf.set_override(key, value, 'gateway')
        # h1 75 % busy, h2 idle: weights 64 and 256 (see load.weights).
        self.hosts = {'h1': host(0.75), 'h2': host(0.0)}
        self.listeners = [self.listener('web', 'http', self.http_port, 2),
                          self.listener('db', 'tcp', self.tcp_port, 3)]
        self.dispatcher = FakeDispatcher({
            'clouds': {'c1': {'connection_limit': 1000}},
            'applications': {'web': {'connection_limit': None},
                             'db': {'connection_limit': None}},
            'hosts': self.hosts, 'listeners': self.listeners})
        self.haproxy = haproxy.HAProxy(self.conf)
        self.addCleanup(self.haproxy.stop)
        self.agent = fake_network.FakeNetworkAgent(self.conf)

    def listener(self, application: str, protocol: str, listener_port: int,
                 subnet: int) -> dict:
        """A listener with an instance on h1 and one on h2, each served by a stand-in."""
        instances = []
        port = None
        for n, host_name in enumerate(('h1', 'h2')):
            address = f'127.0.{subnet}.{n + 2}'
            server = _Instance(f'{application}-{host_name}', address, port or 0, protocol)
            port = server.server_address[1]
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self.addCleanup(server.server_close)
            self.addCleanup(server.shutdown)
            instances.append({'id': f'{application}-{host_name}', 'name': f'vm-{n}',
                              'host': host_name, 'address': address, 'state': 'active'})
        return {'deployment': f'dep-{application}', 'cloud': 'c1',
                'application': application, 'listener_port': listener_port,
                'protocol': protocol, 'port': port,
                'network': {'id': f'net-{application}', 'vni': 1000 + subnet,
                            'cidr': f'10.{subnet}.0.0/24'},
                'peers': [], 'instances': instances}

    def start_gateway(self) -> manager.GatewayManager:
        gateway = manager.GatewayManager(self.conf, self.dispatcher,
                                         haproxy.HAProxy(self.conf), self.agent)
        gateway.start()
        self.addCleanup(gateway.stop)
        return gateway

    def wait_until_served(self) -> None:
        """Until every instance is up in HAProxy (its first check passed)."""
        deadline = time.monotonic() + SETTLE
        slots = self.haproxy.map_entries(config.MAP_SLOT)
        while True:
            up = {name for slot in slots.values()
                  for name, server in self.haproxy.servers(slot).items() if server.up}
            if up == {i['id'] for lst in self.listeners for i in lst['instances']}:
                return
            self.assertLess(time.monotonic(), deadline, f'only {sorted(up)} are up')
            time.sleep(0.05)

    def connect(self, port: int) -> socket.socket:
        sock = socket.create_connection(('127.0.0.1', port), timeout=SETTLE)
        self.addCleanup(sock.close)
        return sock

    def answer(self, listener: dict) -> str:
        """The instance that serves one new connection to ``listener``."""
        with socket.create_connection(('127.0.0.1', listener['listener_port']),
                                      timeout=SETTLE) as sock:
            if listener['protocol'] == 'http':
                return get(sock)
            return sock.makefile('rb').readline().decode().strip()

    def test_new_connections_follow_the_weights(self):
        self.start_gateway()
        self.wait_until_served()
        for listener in self.listeners:
            weights = load.weights(self.hosts, listener['instances'], {})
            slot = self.haproxy.map_entries(config.MAP_SLOT)[str(listener['listener_port'])]
            self.assertEqual(weights, {name: server.weight for name, server
                                       in self.haproxy.servers(slot).items()})
            counts = dict.fromkeys(weights, 0)
            for _ in range(REQUESTS):
                counts[self.answer(listener)] += 1
            expected = load.expected_shares(weights)
            self.assertEqual({f'{listener["application"]}-h1': 0.2,
                              f'{listener["application"]}-h2': 0.8}, expected)
            for ident, count in counts.items():
                self.assertAlmostEqual(expected[ident], count / REQUESTS, delta=SHARE_SLACK,
                                       msg=f'{listener["protocol"]}: {counts}')

    def test_a_new_manager_adopts_haproxy_and_connections_survive(self):
        gateway = self.start_gateway()
        self.wait_until_served()
        pid = self.haproxy.info()['Pid']
        web, db = self.listeners
        tcp = self.connect(db['listener_port'])
        tcp_reader = tcp.makefile('rb')
        tcp_server = tcp_reader.readline().strip()
        keep_alive = self.connect(web['listener_port'])
        web_server = get(keep_alive)
        gateway.stop()
        # The gateway is away: HAProxy serves on.
        self.assertEqual(web_server, get(keep_alive))
        self.start_gateway()
        self.assertEqual(pid, self.haproxy.info()['Pid'])
        tcp.sendall(b'still there\n')
        self.assertEqual(b'still there\n', tcp_reader.readline())
        self.assertIn(tcp_server.decode(), {i['id'] for i in db['instances']})
        self.assertEqual(web_server, get(keep_alive))
        self.assertIn(self.answer(web), {i['id'] for i in web['instances']})

    def test_a_removed_instance_keeps_its_connection_and_takes_no_new_one(self):
        self.start_gateway()
        self.wait_until_served()
        db = self.listeners[1]
        held = {}
        while len(held) < 2:
            sock = self.connect(db['listener_port'])
            reader = sock.makefile('rb')
            name = reader.readline().decode().strip()
            if name in held:
                reader.close()
                sock.close()
            else:
                held[name] = (sock, reader)
        gone, kept = db['instances']
        db['instances'] = [kept]
        slot = self.haproxy.map_entries(config.MAP_SLOT)[str(db['listener_port'])]
        deadline = time.monotonic() + SETTLE
        while self.haproxy.servers(slot)[gone['id']].enabled:
            self.assertLess(time.monotonic(), deadline, 'not drained')
            time.sleep(0.05)
        for _ in range(20):
            self.assertEqual(kept['id'], self.answer(db))
        for name, (sock, reader) in held.items():
            sock.sendall(f'to {name}\n'.encode())
            self.assertEqual(f'to {name}\n'.encode(), reader.readline())
        # Deleted once its connection ends.
        for each in held[gone['id']]:
            each.close()
        while gone['id'] in self.haproxy.servers(slot):
            self.assertLess(time.monotonic(), deadline + SETTLE, 'not deleted')
            time.sleep(0.05)

    def test_the_watchdog_starts_a_killed_haproxy_again_and_programs_it(self):
        self.start_gateway()
        self.wait_until_served()
        pid = int(open(self.haproxy.paths.pid).read().split()[0])
        # -D made the master a session and group leader; its worker is in the group.
        os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + SETTLE
        while not self.haproxy.alive() or not self._answers():
            self.assertLess(time.monotonic(), deadline, 'HAProxy not back')
            time.sleep(0.1)
        self.assertNotEqual(pid, int(open(self.haproxy.paths.pid).read().split()[0]))
        self.wait_until_served()
        for listener in self.listeners:
            self.assertEqual({i['id'] for i in listener['instances']},
                             {self.answer(listener) for _ in range(10)})

    def _answers(self) -> bool:
        try:
            return bool(self.haproxy.map_entries(config.MAP_SLOT)) and all(
                self.answer(listener) for listener in self.listeners)
        except (OSError, AssertionError, http.client.HTTPException,
                haproxy.exception.HAProxyError):
            return False

    def test_connections_and_stats_name_what_is_held(self):
        gateway = self.start_gateway()
        self.wait_until_served()
        web, db = self.listeners
        tcp = self.connect(db['listener_port'])
        tcp_server = tcp.makefile('rb').readline().decode().strip()
        keep_alive = self.connect(web['listener_port'])
        web_server = get(keep_alive)
        deadline = time.monotonic() + SETTLE
        while len(records := gateway.connections({}, cloud='c1')) < 2:
            self.assertLess(time.monotonic(), deadline, f'connections: {records}')
            time.sleep(0.05)
        self.assertEqual({(db['listener_port'], tcp.getsockname()[1], tcp_server),
                          (web['listener_port'], keep_alive.getsockname()[1], web_server)},
                         {(r['listener_port'], r['client_port'], r['instance'])
                          for r in records})
        stats = gateway.stats({}, cloud='c1')['c1']
        self.assertEqual((2, 1, 998, 2), (stats['active_connections'],
                                          stats['users_connected'],
                                          stats['available_connections'],
                                          stats['applications_running']))
        self.assertEqual({web_server: 1, tcp_server: 1},
                         {k: v for k, v in stats['per_instance'].items() if v})
