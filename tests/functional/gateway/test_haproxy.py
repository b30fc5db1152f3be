"""The gateway's HAProxy for real: its config, process and runtime API, the connection
limits and the accounting, against backends on loopback (threaded Python servers
standing in for the instances)."""
import http.client
import http.server
import os
import random
import signal
import socket
import socketserver
import threading
import time

from vmcloud import exception
from vmcloud.gateway import accounting
from vmcloud.gateway import config
from vmcloud.gateway import haproxy
from tests import base
from tests.functional.gateway import free_port_block

LIMIT = 50
# Ports per protocol of a test's listener ranges.
RANGE = 16
# Bounds on waiting for HAProxy to see a closed connection or a dead server; a check
# every 500 ms failing twice takes a server out within about 1 s.
SETTLE = 10.0
CHECK_BOUND = 2.0
# [gateway]'s HTTP listeners give a client this long to send its request.
HTTP_REQUEST_TIMEOUT = 10.0


class _Quiet:
    def handle_error(self, request, client_address):
        pass  # health checks connect and go at once


class EchoServer(_Quiet, socketserver.ThreadingTCPServer):
    """A TCP instance: sends its name and a newline, then echoes until EOF."""
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, name: str):
        self.name = name
        super().__init__(('127.0.0.1', 0), _EchoHandler)


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.sendall(self.server.name.encode() + b'\n')
        while data := self.request.recv(4096):
            self.request.sendall(data)


class WebServer(_Quiet, http.server.ThreadingHTTPServer):
    """An HTTP instance (keep-alive): answers every GET with its name."""
    daemon_threads = True

    def __init__(self, name: str):
        self.name = name
        super().__init__(('127.0.0.1', 0), _WebHandler)


class _WebHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'

    def do_GET(self):
        body = self.server.name.encode()
        self.send_response(200)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def get(sock: socket.socket) -> http.client.HTTPResponse:
    """One GET on an open connection; the response, read."""
    sock.sendall(b'GET / HTTP/1.1\r\nHost: gateway\r\n\r\n')
    response = http.client.HTTPResponse(sock)
    response.begin()
    response.body = response.read()
    return response


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b''
    except ConnectionResetError:
        return True


def refused(port: int) -> bool:
    """Whether a TCP connection to ``port`` is closed at once (on loopback HAProxy's
    reset may come before connect() returns)."""
    try:
        sock = socket.create_connection(('127.0.0.1', port), timeout=SETTLE)
    except ConnectionResetError:
        return True
    with sock:
        return closed_by_peer(sock)


def first_line(sock: socket.socket) -> bytes:
    """The greeting of an echo server ('' if the connection was refused)."""
    try:
        return sock.makefile('rb').readline()
    except ConnectionResetError:
        return b''


def wait_until(predicate, timeout: float = SETTLE, what: str = 'the condition',
               explain=None):
    """Poll ``predicate`` until it is true; ``explain()`` describes a failure."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            detail = f': {explain()}' if explain else ''
            raise AssertionError(f'{what} not reached within {timeout:g} s{detail}')
        time.sleep(0.02)
    return value


class HAProxyTestCase(base.TestCase):
    def setUp(self):
        super().setUp()
        low = free_port_block(2 * RANGE)
        self.http_ports = range(low, low + RANGE)
        self.tcp_ports = range(low + RANGE, low + 2 * RANGE)
        self.conf.set_override('state_path', os.path.join(self.tmp, 'gw'), 'gateway')
        self.conf.set_override('listen_address', '127.0.0.1', 'gateway')
        self.conf.set_override('listener_ports',
                               f'{low}-{low + RANGE - 1}', 'gateway')
        self.conf.set_override('tcp_listener_ports',
                               f'{low + RANGE}-{low + 2 * RANGE - 1}', 'gateway')
        self.conf.set_override('backend_slots', 4, 'gateway')
        self.haproxy = haproxy.HAProxy(self.conf)
        self.addCleanup(self.haproxy.stop)
        self.state = {'clouds': {}, 'applications': {}, 'hosts': {}, 'listeners': []}
        self.slots: dict[int, str] = {}
        self.counters = accounting.Counters(self.haproxy.paths.counters)

    def backend(self, cls, name: str):
        server = cls(name)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        self.addCleanup(self.stop_backend, server)
        return server

    @staticmethod
    def stop_backend(server):
        if server.socket.fileno() != -1:
            server.shutdown()
            server.server_close()

    def client(self, port: int) -> socket.socket:
        sock = socket.create_connection(('127.0.0.1', port), timeout=SETTLE)
        self.addCleanup(sock.close)
        return sock

    def expose(self, protocol: str, index: int, cloud: str, cloud_limit: int,
               servers: list, application: str | None = None,
               app_limit: int | None = None) -> int:
        """Program a listener as the gateway manager does: servers, then the maps."""
        port = (self.http_ports if protocol == 'http' else self.tcp_ports)[index]
        slot = config.slot_name(protocol, index)
        for server in servers:
            self.haproxy.add_server(slot, server.name, '127.0.0.1', server.server_address[1],
                                    weight=10)
        self.haproxy.set_map_entry(config.MAP_CLOUD, port, cloud)
        self.haproxy.set_map_entry(config.MAP_CLOUD_LIMIT, port, cloud_limit)
        if application is not None:
            self.haproxy.set_map_entry(config.MAP_APP, port, application)
            if app_limit is not None:
                self.haproxy.set_map_entry(config.MAP_APP_LIMIT, port, app_limit)
        # Last: the port takes connections from now on.
        self.haproxy.set_map_entry(config.MAP_SLOT, port, slot)
        self.slots[port] = slot
        self.state['clouds'][cloud] = {'connection_limit': cloud_limit}
        if application is not None:
            self.state['applications'][application] = {'connection_limit': app_limit}
        self.state['listeners'].append({
            'deployment': f'd-{port}', 'cloud': cloud, 'application': application,
            'listener_port': port, 'protocol': protocol, 'port': 0,
            'network': {'id': 'n', 'vni': 1, 'cidr': '127.0.0.0/8'}, 'peers': [],
            'instances': [{'id': s.name, 'name': s.name, 'host': 'h', 'address': '127.0.0.1',
                           'state': 'active'} for s in servers]})
        return port

    def records(self) -> list[dict]:
        rows = self.haproxy.show_table(config.TABLE_CONNS, 'data.conn_cur gt 0')
        servers = {slot: self.haproxy.servers(slot) for slot in set(self.slots.values())}
        return accounting.connections(rows, self.haproxy.sessions(), servers,
                                      self.state['listeners'], self.slots)

    def stats(self) -> dict[str, dict]:
        cloud_rows = self.haproxy.show_table(config.TABLE_CLOUDS)
        current = accounting.run_counters(cloud_rows,
                                          self.haproxy.show_table(config.TABLE_REJECTS))
        totals = self.counters.update(self.haproxy.run_id(), current)
        return accounting.cloud_stats(self.state, self.records(), cloud_rows, totals)


class HAProxyLimitTest(HAProxyTestCase):
    def test_tcp_admits_exactly_the_limit_and_refuses_the_rest_at_once(self):
        self.haproxy.start()
        echo = self.backend(EchoServer, 'i-tcp')
        port = self.expose('tcp', 0, 'c1', LIMIT, [echo], 'a1')
        admitted, refused_count = [], 0
        for _ in range(2 * LIMIT):
            try:
                sock = self.client(port)
            except ConnectionResetError:
                refused_now = True
            else:
                line = first_line(sock)
                self.assertIn(line, (b'i-tcp\n', b''))
                if line == b'i-tcp\n':
                    admitted.append(sock)
                refused_now = line == b''
            if refused_now:
                refused_count += 1
            stats = self.stats()['c1']
            self.assertEqual(len(admitted), stats['active_connections'])
            self.assertEqual(LIMIT - len(admitted), stats['available_connections'])
        self.assertEqual(LIMIT, len(admitted))
        self.assertEqual(LIMIT, refused_count)
        self.assertEqual(LIMIT, self.stats()['c1']['rejected_connections'])
        self.assertEqual(LIMIT, self.stats()['c1']['total_connections'])
        # An admitted connection works both ways.
        admitted[0].sendall(b'ping')
        self.assertEqual(b'ping', admitted[0].recv(4))

        for sock in admitted[:10]:
            sock.close()
        wait_until(lambda: self.stats()['c1']['active_connections'] == LIMIT - 10,
                   what='10 closed connections leaving the count')
        self.assertEqual(10, self.stats()['c1']['available_connections'])
        for _ in range(10):
            self.assertEqual(b'i-tcp\n', self.client(port).makefile('rb').readline())
        self.assertTrue(refused(port))
        stats = self.stats()['c1']
        self.assertEqual((LIMIT, 0, LIMIT + 1, LIMIT + 10),
                         (stats['active_connections'], stats['available_connections'],
                          stats['rejected_connections'], stats['total_connections']))

    def test_http_admits_exactly_the_limit_and_answers_the_rest_503(self):
        self.haproxy.start()
        web = self.backend(WebServer, 'i-web')
        port = self.expose('http', 0, 'c1', LIMIT, [web], 'a1')
        admitted, refused_count = [], 0
        for _ in range(2 * LIMIT):
            sock = self.client(port)
            response = get(sock)
            if response.status == 200:
                self.assertEqual(b'i-web', response.body)
                admitted.append(sock)
            else:
                self.assertEqual(503, response.status)
                self.assertEqual(b'vmcloud: cloud c1 is at its connection limit 50\n',
                                 response.body)
                self.assertEqual('close', response.getheader('Connection'))
                self.assertTrue(closed_by_peer(sock))
                refused_count += 1
            stats = self.stats()['c1']
            self.assertEqual(len(admitted), stats['active_connections'])
            self.assertEqual(LIMIT - len(admitted), stats['available_connections'])
        self.assertEqual((LIMIT, LIMIT), (len(admitted), refused_count))
        # Answered 503 but never counted as admitted.
        self.assertEqual((LIMIT, LIMIT), (self.stats()['c1']['rejected_connections'],
                                          self.stats()['c1']['total_connections']))
        # Idle keep-alive connections are held, and keep working.
        self.assertEqual(b'i-web', get(admitted[-1]).body)

        for sock in admitted[:5]:
            sock.close()
        wait_until(lambda: self.stats()['c1']['active_connections'] == LIMIT - 5,
                   what='5 closed connections leaving the count')
        for _ in range(5):
            self.assertEqual(200, get(self.client(port)).status)
        self.assertEqual(503, get(self.client(port)).status)

    def test_a_silent_client_of_a_cloud_at_its_limit_is_closed(self):
        # A refused connection is counted nowhere until its 503 goes out: one that
        # never sends a request must not hold its socket for timeout client (1 h).
        self.haproxy.start()
        port = self.expose('http', 0, 'c1', 1, [self.backend(WebServer, 'i-web')])
        admitted = self.client(port)
        self.assertEqual(200, get(admitted).status)
        silent = self.client(port)
        silent.settimeout(HTTP_REQUEST_TIMEOUT + SETTLE)
        answer = silent.recv(4096)  # HAProxy's 408, then the close
        self.assertIn(b'408', answer.split(b'\r\n')[0])
        self.assertTrue(closed_by_peer(silent))
        # An admitted client idle as long keeps its connection.
        self.assertEqual(200, get(admitted).status)

    def test_the_application_limit_and_the_cloud_limit_both_apply(self):
        self.haproxy.start()
        web, echo = self.backend(WebServer, 'i-web'), self.backend(EchoServer, 'i-tcp')
        # Cloud c1: 6 connections; application small: 2 (HTTP), tiny: 1 (TCP), big: none.
        small = self.expose('http', 1, 'c1', 6, [web], 'small', app_limit=2)
        tiny = self.expose('tcp', 1, 'c1', 6, [echo], 'tiny', app_limit=1)
        big = self.expose('tcp', 2, 'c1', 6, [echo], 'big')
        held = [self.client(small) for _ in range(2)]
        self.assertEqual([200, 200], [get(sock).status for sock in held])
        third = get(self.client(small))
        self.assertEqual(503, third.status)
        self.assertEqual(b'vmcloud: application small is at its connection limit 2\n',
                         third.body)
        self.assertEqual(b'i-tcp\n', first_line(self.client(tiny)))
        self.assertTrue(refused(tiny))
        # No limit of its own: the 3 connections left of the cloud's.
        for _ in range(3):
            self.assertEqual(b'i-tcp\n', first_line(self.client(big)))
        self.assertTrue(refused(big))
        stats = self.stats()['c1']
        self.assertEqual((6, 0, 3), (stats['active_connections'],
                                     stats['available_connections'],
                                     stats['rejected_connections']))
        self.assertEqual({'i-web': 2, 'i-tcp': 4}, stats['per_instance'])
        self.assertEqual(1, stats['users_connected'])
        self.assertEqual((3, 3), (stats['applications_deployed'],
                                  stats['applications_running']))

    def test_a_port_no_listener_holds_is_refused(self):
        self.haproxy.start()
        self.assertTrue(refused(self.tcp_ports[3]))
        self.assertTrue(refused(self.http_ports[3]))


class HAProxyAccountingTest(HAProxyTestCase):
    def test_the_records_are_the_connections_the_clients_hold(self):
        self.haproxy.start()
        tcp_servers = [self.backend(EchoServer, f'i-tcp-{n}') for n in range(2)]
        web_servers = [self.backend(WebServer, f'i-web-{n}') for n in range(2)]
        tcp_port = self.expose('tcp', 2, 'c1', 1000, tcp_servers, 'echo')
        web_port = self.expose('http', 2, 'c2', 1000, web_servers, 'web')
        held: dict[tuple, socket.socket] = {}
        rng = random.Random(16)

        def open_one():
            port = rng.choice((tcp_port, web_port))
            sock = self.client(port)
            if port == tcp_port:
                instance = sock.makefile('rb').readline().decode().strip()
            else:
                instance = get(sock).body.decode()
            key = ('127.0.0.1', sock.getsockname()[1], port, instance)
            held[key] = sock

        def expected():
            return sorted(held)

        def seen():
            return sorted((r['client'], r['client_port'], r['listener_port'], r['instance'])
                          for r in self.records())

        def difference():
            have, want = set(seen()), set(expected())
            return f'not held: {sorted(have - want)}, not seen: {sorted(want - have)}'

        started = int(time.time())
        for event in range(300):
            if held and rng.random() < 0.4:
                held.pop(rng.choice(sorted(held))).close()
            else:
                open_one()
            if event % 25 == 24:
                wait_until(lambda: seen() == expected(), what='the records matching',
                           explain=difference)
        wait_until(lambda: seen() == expected(), what='the records matching',
                   explain=difference)
        records = self.records()
        self.assertEqual({('c1', 'echo', f'd-{tcp_port}'), ('c2', 'web', f'd-{web_port}')},
                         {(r['cloud'], r['application'], r['deployment']) for r in records})
        for record in records:
            self.assertLessEqual(started - 1, record['started_at'])
            self.assertLessEqual(record['started_at'], time.time() + 1)
        self.assertEqual({'c1'}, {r['cloud'] for r in accounting.connections(
            self.haproxy.show_table(config.TABLE_CONNS, 'data.conn_cur gt 0'),
            self.haproxy.sessions(), {}, self.state['listeners'], self.slots, cloud='c1')})
        stats = self.stats()
        for cloud, port in (('c1', tcp_port), ('c2', web_port)):
            mine = [key for key in held if key[2] == port]
            self.assertEqual(len(mine), stats[cloud]['active_connections'])
            per_instance = {}
            for key in mine:
                per_instance[key[3]] = per_instance.get(key[3], 0) + 1
            self.assertEqual(per_instance,
                             {k: v for k, v in stats[cloud]['per_instance'].items() if v})


class HAProxyServersTest(HAProxyTestCase):
    def test_an_added_server_takes_connections_and_a_dead_one_leaves_rotation(self):
        self.haproxy.start()
        first = self.backend(EchoServer, 'i-1')
        port = self.expose('tcp', 0, 'c1', 1000, [first])

        clients = []

        def served(count):
            names = []
            for _ in range(count):
                clients.append(self.client(port))
                names.append(first_line(clients[-1]).decode().strip())
            return names

        self.assertEqual({'i-1'}, set(served(4)))
        second = self.backend(EchoServer, 'i-2')
        self.haproxy.add_server('tcp_slot0', 'i-2', '127.0.0.1', second.server_address[1],
                                weight=10)
        wait_until(lambda: self.haproxy.servers('tcp_slot0')['i-2'].up, what='i-2 up')
        self.assertEqual({'i-1': 5, 'i-2': 5}, _count(served(10)))

        self.stop_backend(second)
        stopped = time.monotonic()
        wait_until(lambda: not self.haproxy.servers('tcp_slot0')['i-2'].up,
                   timeout=CHECK_BOUND + 1, what='i-2 out of rotation')
        self.assertLess(time.monotonic() - stopped, CHECK_BOUND)
        self.assertEqual({'i-1'}, set(served(6)))

        self.haproxy.set_weight('tcp_slot0', 'i-1', 0)
        self.assertEqual(0, self.haproxy.servers('tcp_slot0')['i-1'].weight)
        # Its clients' connections still open through it: not deleted yet.
        self.assertRaises(exception.HAProxyError, self.haproxy.del_server, 'tcp_slot0', 'i-2')
        for sock in clients:
            sock.close()
        wait_until(lambda: self.haproxy.server_connections('tcp_slot0')['i-2'] == 0,
                   what='i-2 holding no connection')
        self.haproxy.del_server('tcp_slot0', 'i-2')
        self.assertEqual(['i-1'], list(self.haproxy.servers('tcp_slot0')))

    def test_an_added_server_reuses_its_connections_to_the_instance(self):
        # HAProxy 2.6 keeps no idle connection of a dynamic server unless told to: every
        # request would then open a connection to the instance (a third of the
        # throughput through the gateway, benchmarks/gateway.py).
        self.haproxy.start()
        web = self.backend(WebServer, 'i-1')
        port = self.expose('http', 0, 'c1', 1000, [web])
        requests = 40
        sock = self.client(port)  # keep-alive, as wrk and browsers are
        for _ in range(requests):
            self.assertEqual(200, get(sock).status)
        row = next(r for r in self.haproxy.stat()
                   if r['pxname'] == 'http_slot0' and r['svname'] == 'i-1')
        self.assertLessEqual(int(row['connect']), requests // 4,
                             f'{row["connect"]} connections opened for {requests} requests')

    def test_runtime_refusals_are_errors(self):
        self.haproxy.start()
        error = self.assertRaises(exception.HAProxyError, self.haproxy.set_weight,
                                  'tcp_slot0', 'nobody', 3)
        self.assertIn('No such server', error.answer)
        self.assertEqual('set server tcp_slot0/nobody weight 3', error.command)
        self.assertRaises(exception.HAProxyError, self.haproxy.command, 'no such command')
        self.assertRaises(exception.HAProxyError, self.haproxy.servers, 'nope')
        echo = self.backend(EchoServer, 'i-1')
        self.haproxy.add_server('tcp_slot1', 'i-1', '127.0.0.1', echo.server_address[1], 1)
        error = self.assertRaises(exception.HAProxyError, self.haproxy.add_server,
                                  'tcp_slot1', 'i-1', '127.0.0.1', 1, 1)
        self.assertIn('Already exists', error.answer)
        self.assertRaises(exception.HAProxyError, self.haproxy.set_weight,
                          'tcp_slot1', 'i-1', 300)
        # A server holding a connection is not deleted (the gateway drains it first).
        sock = self.client(self.expose('tcp', 1, 'c1', 10, []))
        self.assertEqual(b'i-1\n', sock.makefile('rb').readline())
        self.assertEqual({'i-1': 1}, self.haproxy.server_connections('tcp_slot1'))
        self.assertRaises(exception.HAProxyError, self.haproxy.del_server, 'tcp_slot1', 'i-1')
        sock.close()
        wait_until(lambda: self.haproxy.server_connections('tcp_slot1') == {'i-1': 0})
        self.haproxy.del_server('tcp_slot1', 'i-1')
        self.assertEqual({}, self.haproxy.servers('tcp_slot1'))


def _count(names: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return counts


class HAProxyProcessTest(HAProxyTestCase):
    def test_a_config_haproxy_refuses_is_named(self):
        self.conf.set_override('listen_address', '256.0.0.1', 'gateway')
        error = self.assertRaises(exception.HAProxyError, self.haproxy.start)
        self.assertIn('haproxy -c', error.command)
        self.assertIn('256.0.0.1', error.answer)
        self.assertFalse(self.haproxy.alive())

    def test_adopt_start_twice_and_stop(self):
        self.assertFalse(self.haproxy.adopt())
        self.haproxy.start()
        self.assertTrue(self.haproxy.alive())
        other = haproxy.HAProxy(self.conf)
        self.assertTrue(other.adopt())
        self.assertEqual(self.haproxy.run_id(), other.run_id())
        error = self.assertRaises(exception.HAProxyError, other.start)
        self.assertIn('running already', str(error))
        other.stop()
        # Workers included: the ports are free again.
        for port in (self.http_ports[0], self.tcp_ports[-1]):
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(('127.0.0.1', port))
                sock.listen()
        self.assertFalse(self.haproxy.alive())
        self.assertFalse(self.haproxy.adopt())
        self.assertRaises(exception.HAProxyError, self.haproxy.command, 'show info')

    def test_killed_and_started_again_it_has_the_same_listeners_and_counters_go_on(self):
        self.haproxy.start()
        echo = self.backend(EchoServer, 'i-1')
        port = self.expose('tcp', 0, 'c1', 3, [echo], 'a1', app_limit=3)
        self.haproxy.set_map_entry(config.MAP_CLOUD_LIMIT, port, 2)  # changed: replaced
        held = [self.client(port) for _ in range(2)]
        self.assertEqual([b'i-1\n'] * 2, [first_line(sock) for sock in held])
        self.assertTrue(refused(port))
        for sock in held:
            sock.close()
        # Bytes are counted as a connection ends.
        before = wait_until(lambda: (stats := self.stats()['c1'])['active_connections'] == 0
                            and stats)
        self.assertEqual((2, 1, 2 * len(b'i-1\n')),
                         (before['total_connections'], before['rejected_connections'],
                          before['bytes_out']))
        maps = {name: self.haproxy.map_entries(name) for name in config.MAPS}
        self.assertEqual({str(port): '2'}, maps[config.MAP_CLOUD_LIMIT])
        first_run = self.haproxy.run_id()

        os.killpg(self.haproxy._pid(), signal.SIGKILL)
        wait_until(lambda: not self.haproxy.alive(), what='HAProxy gone')
        self.haproxy.start()
        self.assertNotEqual(first_run, self.haproxy.run_id())
        self.assertEqual(maps, {name: self.haproxy.map_entries(name) for name in config.MAPS})
        # The servers are the gateway's to add again; the maps came from the files.
        self.assertEqual({}, self.haproxy.servers('tcp_slot0'))
        self.haproxy.add_server('tcp_slot0', 'i-1', '127.0.0.1', echo.server_address[1], 10)
        again = [self.client(port) for _ in range(2)]
        self.assertEqual([b'i-1\n'] * 2, [first_line(sock) for sock in again])
        self.assertTrue(refused(port))
        after = self.stats()['c1']
        self.assertEqual((4, 2, 2), (after['total_connections'],
                                     after['rejected_connections'],
                                     after['active_connections']))
        # The deleted entry stays deleted in the file, so in the next run too.
        self.haproxy.del_map_entry(config.MAP_APP_LIMIT, port)
        self.haproxy.del_map_entry(config.MAP_APP_LIMIT, port)
        with open(self.haproxy.paths.map(config.MAP_APP_LIMIT)) as f:
            self.assertEqual('', f.read())
