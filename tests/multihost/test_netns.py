"""The netns harness's own behaviour: hosts, links, shaping, faults (a link down, packets
dropped), the processes of a host, and that it leaves nothing behind.

These tests create real network namespaces, so they need root (CI runs them as root, as
the README's test command does). Without root they fail with a message saying so rather
than skip: a harness nobody can check is not a checked harness.
"""
import json
import os
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.request
import uuid
from unittest import mock

import fixtures

from tests import base
from tests.multihost import netns

# Per test, generous: the whole module takes seconds. It also bounds the tests that
# would otherwise hang if a wait in the harness lost its deadline.
TEST_TIMEOUT = 60
# How long a test waits for something it started inside a namespace to show up.
WAIT = 10.0


def ours() -> list[str]:
    """The harness's namespaces created by this process (other engineers' runs have other pids)."""
    return [n for n in netns.namespaces() if n.startswith(f'{netns.PREFIX}-{os.getpid()}-')]


def link(namespace: str, device: str) -> dict:
    """``ip -d link show`` of ``device`` in ``namespace``, parsed."""
    out = subprocess.run(['ip', '-n', namespace, '-j', '-d', 'link', 'show', device],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    return json.loads(out)[0]


def qdiscs(namespace: str, device: str) -> list[dict]:
    """The qdiscs on ``device`` in ``namespace``, parsed."""
    out = subprocess.run(['tc', '-n', namespace, '-j', 'qdisc', 'show', 'dev', device],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    return json.loads(out or '[]')


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has exited: it only waits for its parent)."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except FileNotFoundError:
        return False


def wait_until(predicate, what: str, timeout: float = WAIT) -> None:
    """Poll ``predicate`` until true. :raises: AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f'{what}: not after {timeout:g} s')
        time.sleep(0.05)


def connect_probe(address: str, port: int) -> list[str]:
    """A command that exits 0 if a TCP SYN to ``address:port`` is answered (accepted or refused)."""
    return [sys.executable, '-c',
            'import errno, socket, sys\n'
            's = socket.socket()\n'
            's.settimeout(2)\n'
            f'r = s.connect_ex(({address!r}, {port}))\n'
            'sys.exit(0 if r in (0, errno.ECONNREFUSED) else 1)\n']


class NetnsTestCase(base.TestCase):
    def setUp(self):
        super().setUp()
        if os.geteuid() != 0:
            self.fail('tests.multihost need root (network namespaces: CAP_NET_ADMIN, '
                      'CAP_SYS_ADMIN); run them as root like the README\'s test command')
        self.useFixture(fixtures.Timeout(TEST_TIMEOUT, gentle=True))
        self.state_root = os.path.join(self.tmp, 'netns')
        # Added first, so it runs last: after the test's own cleanups.
        self.addCleanup(self.assert_nothing_left)

    def assert_nothing_left(self) -> None:
        left = ours()
        for namespace in left:  # so one failure does not spill into the next test
            subprocess.run(['ip', 'netns', 'delete', namespace], capture_output=True, timeout=30)
        self.assertEqual([], left, 'namespaces left after the test')

    def network(self, **kwargs) -> netns.Network:
        return netns.Network(state_root=self.state_root, **kwargs)


class HostsTest(NetnsTestCase):
    def test_a_namespace_per_host_and_the_switch(self):
        with self.network() as net:
            a = net.add_host('a')
            b = net.add_host('b')
            self.assertEqual(sorted([net.switch, a.namespace, b.namespace]), sorted(ours()))
        self.assertEqual([], ours())

    def test_addresses_are_distinct_and_in_the_subnet(self):
        with self.network(subnet='10.77.5.0/24') as net:
            a = net.add_host('a')
            b = net.add_host('b')
            self.assertNotEqual(a.address, b.address)
            for host in (a, b):
                self.assertTrue(host.address.startswith('10.77.5.'), host.address)
                self.assertIn(f'{host.address}/24', host.run(
                    ['ip', '-br', 'addr', 'show', 'eth0']).stdout)

    def test_loopback_is_up(self):
        with self.network() as net:
            a = net.add_host('a')
            self.assertIn('UP', link(a.namespace, 'lo')['flags'])
            self.assertIn('UP', link(net.switch, 'lo')['flags'])

    def test_hosts_reach_each_other(self):
        with self.network() as net:
            a = net.add_host('a')
            b = net.add_host('b')
            self.assertEqual(0, b.run(connect_probe(a.address, 9), check=False).returncode)
            self.assertEqual(0, a.run(connect_probe(b.address, 9), check=False).returncode)

    def test_no_default_route(self):
        # Nothing may leave the namespaces.
        with self.network() as net:
            a = net.add_host('a')
            self.assertEqual('', a.run(['ip', 'route', 'show', 'default']).stdout.strip())
            self.assertNotEqual(0, a.run(connect_probe('192.0.2.1', 80), check=False).returncode)

    def test_state_directory_exists_then_goes(self):
        with self.network() as net:
            a = net.add_host('a')
            state = a.state_dir
            self.assertTrue(os.path.isdir(state))
        self.assertFalse(os.path.exists(state))

    def test_bad_host_names_are_refused_without_side_effects(self):
        with self.network(subnet='10.77.6.0/24') as net:
            net.add_host('a')
            for bad in ('Bad', 'switch', 'a' * 13, '1a', 'a-b', 'a'):
                exc = self.assertRaises(netns.NetnsError, net.add_host, bad)
                self.assertIn(f'invalid or taken host name {bad!r}', str(exc))
            self.assertEqual(2, len(ours()))
            # A refused name took no address: the next host gets the second one.
            self.assertEqual('10.77.6.2', net.add_host('b').address)

    def test_a_full_subnet_is_refused(self):
        with self.network(subnet='10.77.9.0/30') as net:  # two host addresses
            net.add_host('a')
            net.add_host('b')
            exc = self.assertRaises(netns.NetnsError, net.add_host, 'c')
            self.assertIn('no address left', str(exc))

    def test_a_public_subnet_is_refused(self):
        exc = self.assertRaises(netns.NetnsError, netns.Network, '8.8.8.0/24')
        self.assertIn('not a private range', str(exc))

    def test_a_closed_network_adds_no_host(self):
        net = self.network()
        self.assertRaises(netns.NetnsError, net.add_host, 'a')

    def test_non_root_is_refused_before_creating_anything(self):
        with mock.patch.object(netns.os, 'geteuid', return_value=1000):
            exc = self.assertRaises(netns.NetnsError, self.network().__enter__)
        self.assertIn('root', str(exc))


class TrafficTest(NetnsTestCase):
    def test_counters_count_what_crosses_the_link(self):
        payload = 200_000
        with open(os.path.join(self.tmp, 'blob'), 'wb') as f:
            f.write(b'x' * payload)
        with self.network() as net:
            a = net.add_host('a')
            b = net.add_host('b')
            server = a.popen([sys.executable, '-m', 'http.server', '--bind', a.address,
                              '--directory', self.tmp, '8000'],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            b.wait_for_tcp(a.address, 8000, WAIT, server)
            before_a, before_b = a.counters(), b.counters()
            fetch = ('import sys, urllib.request\n'
                     f'sys.stdout.write(str(len(urllib.request.urlopen('
                     f'"http://{a.address}:8000/blob", timeout=10).read())))\n')
            self.assertEqual(str(payload), b.run([sys.executable, '-c', fetch]).stdout)
            after_a, after_b = a.counters(), b.counters()
            self.assertGreaterEqual(after_b['rx_bytes'] - before_b['rx_bytes'], payload)
            self.assertGreaterEqual(after_a['tx_bytes'] - before_a['tx_bytes'], payload)
            self.assertGreater(after_b['tx_packets'], before_b['tx_packets'])
        self.assertIsNotNone(server.poll(), 'the server outlived its network')

    def test_wait_for_tcp_is_bounded(self):
        with self.network() as net:
            a = net.add_host('a')
            b = net.add_host('b')
            exc = self.assertRaises(netns.NetnsError, b.wait_for_tcp, a.address, 8001, 0.5)
            self.assertIn('nothing listens', str(exc))

    def test_wait_for_tcp_notices_a_dead_server(self):
        with self.network() as net:
            a = net.add_host('a')
            server = a.popen([sys.executable, '-c', 'raise SystemExit(3)'])
            server.wait(WAIT)
            exc = self.assertRaises(netns.NetnsError, a.wait_for_tcp, a.address, 8002, 30, server)
            self.assertIn('exited (3)', str(exc))

    def test_forward_carries_the_machine_s_connections_into_a_host_then_closes(self):
        with self.network() as net:
            a = net.add_host('a')
            server = a.popen([sys.executable, '-c', netns.HTTP_SERVER, 'inside', a.address,
                              '8003'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            a.wait_for_tcp(a.address, 8003, WAIT, server)
            with a.forward(a.address, 8003) as port:
                bodies = [urllib.request.urlopen(f'http://127.0.0.1:{port}/', timeout=WAIT)
                          .read() for _ in range(3)]
                # Two connections held at once, each paired with one of the host's.
                held = [socket.create_connection(('127.0.0.1', port), timeout=WAIT)
                        for _ in range(2)]
                self.addCleanup(lambda: [s.close() for s in held])
                wait_until(lambda: len(a.run(['ss', '-Htn', 'state', 'established',
                                              'sport = :8003']).stdout.splitlines()) == 2,
                           'both held connections reach the host')
            self.assertEqual([b'inside\n'] * 3, bodies)
            # The block's end closed the held connections, the port and every thread.
            self.assertEqual([b'', b''], [s.recv(16) for s in held])
            self.assertRaises(ConnectionRefusedError, socket.create_connection,
                              ('127.0.0.1', port), WAIT)
            self.assertEqual([], [t.name for t in threading.enumerate()
                                  if t.name.startswith(netns.FORWARD_THREAD)])


class ShapingTest(NetnsTestCase):
    def test_rate_shapes_both_ends_of_the_link(self):
        with self.network() as net:
            a = net.add_host('a', rate='100mbit')
            for namespace, device in ((a.namespace, 'eth0'), (net.switch, a.port)):
                [qdisc] = qdiscs(namespace, device)
                self.assertEqual('tbf', qdisc['kind'], (namespace, device))
                self.assertEqual(100_000_000 // 8, qdisc['options']['rate'], (namespace, device))

    def test_no_rate_removes_the_shaping(self):
        with self.network() as net:
            a = net.add_host('a', rate='100mbit')
            a.shape()
            for namespace, device in ((a.namespace, 'eth0'), (net.switch, a.port)):
                kinds = [q['kind'] for q in qdiscs(namespace, device)]
                self.assertNotIn('tbf', kinds, (namespace, device))

    def test_delay_needs_netem_and_says_so(self):
        with self.network() as net:
            a = net.add_host('a')
            # Whether this kernel has netem, asked independently of the harness.
            has_netem = subprocess.run(
                ['tc', '-n', a.namespace, 'qdisc', 'add', 'dev', 'lo', 'root', 'netem'],
                capture_output=True, timeout=30).returncode == 0
            if has_netem:
                a.shape(delay='1ms')
                for namespace, device in ((a.namespace, 'eth0'), (net.switch, a.port)):
                    self.assertEqual('netem', qdiscs(namespace, device)[0]['kind'])
            else:
                exc = self.assertRaises(netns.NetnsError, a.shape, delay='1ms')
                self.assertIn('no netem qdisc', str(exc))
                self.assertIn("cannot shape a's link", str(exc))

    def test_mtu_is_set_on_both_ends(self):
        with self.network() as net:
            a = net.add_host('a')
            a.set_mtu(9000)
            self.assertEqual(9000, link(a.namespace, 'eth0')['mtu'])
            self.assertEqual(9000, link(net.switch, a.port)['mtu'])

    def test_count_frames_caps_gso_at_the_mtu_and_restores_it(self):
        with self.network() as net:
            a = net.add_host('a')
            a.set_mtu(9000)
            a.count_frames()
            self.assertEqual(9000, link(a.namespace, 'eth0')['gso_max_size'])
            a.count_frames(False)
            self.assertEqual(65536, link(a.namespace, 'eth0')['gso_max_size'])


class CleanupTest(NetnsTestCase):
    def test_processes_are_stopped(self):
        with self.network() as net:
            a = net.add_host('a')
            process = a.popen(['sleep', '300'])
        self.assertIsNotNone(process.poll())

    def test_processes_are_asked_to_stop_before_they_are_killed(self):
        # A server gets SIGTERM first, so it can flush and remove what it wrote.
        ready = os.path.join(self.tmp, 'ready')
        stopped = os.path.join(self.tmp, 'stopped')
        script = ('import signal, sys, time\n'
                  'def stop(*_):\n'
                  f'    open({stopped!r}, "w").close()\n'
                  '    sys.exit(0)\n'
                  'signal.signal(signal.SIGTERM, stop)\n'
                  f'open({ready!r}, "w").close()\n'
                  'time.sleep(300)\n')
        with self.network() as net:
            a = net.add_host('a')
            process = a.popen([sys.executable, '-c', script])
            wait_until(lambda: os.path.exists(ready), 'the server started')
        self.assertEqual(0, process.poll())
        self.assertTrue(os.path.exists(stopped), 'the server got no SIGTERM')

    def test_a_failure_in_the_block_still_cleans_up_stray_children_included(self):
        # The child leaves the process group in a session of its own: only killing
        # what is inside the namespace reaches it.
        pidfile = os.path.join(self.tmp, 'stray.pid')

        def block():
            with self.network() as net:
                a = net.add_host('a')
                a.popen(['sh', '-c', f'setsid sleep 300 & echo $! > {pidfile}.tmp; '
                         f'mv {pidfile}.tmp {pidfile}; sleep 300'],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                wait_until(lambda: os.path.exists(pidfile), 'the stray child started')
                raise RuntimeError('boom')

        self.assertRaises(RuntimeError, block)
        self.assertEqual([], ours())
        with open(pidfile) as f:
            stray = int(f.read())
        if alive(stray):
            os.kill(stray, 9)
            self.fail(f'the stray child {stray} outlived its network')

    def test_a_namespace_is_removed_even_if_its_setup_fails_half_way(self):
        # ``ip netns add`` succeeded, the next command failed: the namespace exists and
        # must still be removed, which only works if it was registered before creation.
        real = netns._command

        def failing(argv, *args, **kwargs):
            if argv[-3:] == ['set', 'lo', 'up'] and argv[2].endswith('-h'):
                raise netns.NetnsError('injected failure')
            return real(argv, *args, **kwargs)

        with self.network() as net:
            with mock.patch.object(netns, '_command', failing):
                self.assertRaises(netns.NetnsError, net.add_host, 'h')
            self.assertIn(net._name('h'), ours())
        self.assertEqual([], ours())

    def test_a_failed_open_cleans_up(self):
        real = netns._command

        def failing(argv, *args, **kwargs):
            if 'bridge' in argv:
                raise netns.NetnsError('injected failure')
            return real(argv, *args, **kwargs)

        net = self.network()
        with mock.patch.object(netns, '_command', failing):
            self.assertRaises(netns.NetnsError, net.__enter__)
        self.assertEqual([], ours())

    def add_namespace(self, name: str) -> None:
        self.addCleanup(subprocess.run, ['ip', 'netns', 'delete', name],
                        capture_output=True, timeout=30)
        done = subprocess.run(['ip', 'netns', 'add', name], capture_output=True, text=True,
                              timeout=30)
        self.assertEqual(0, done.returncode, f'ip netns add {name}: {done.stderr}')

    def test_the_sweep_removes_a_dead_creator_s_namespaces_only(self):
        dead = subprocess.Popen(['true'])
        dead.wait()
        tag = uuid.uuid4().hex[:6]
        stale = f'{netns.PREFIX}-{dead.pid}-{tag}-x'
        live = f'{netns.PREFIX}-{os.getpid()}-{tag}-y'
        for name in (stale, live):
            self.add_namespace(name)
        swept = netns.sweep_stale()
        self.assertIn(stale, swept)
        self.assertNotIn(live, swept)
        self.assertNotIn(stale, netns.namespaces())
        self.assertIn(live, netns.namespaces())

    def test_opening_a_network_sweeps(self):
        dead = subprocess.Popen(['true'])
        dead.wait()
        stale = f'{netns.PREFIX}-{dead.pid}-{uuid.uuid4().hex[:6]}-z'
        self.add_namespace(stale)
        with self.network():
            self.assertNotIn(stale, netns.namespaces())


def server(port: int) -> list[str]:
    """A command that accepts TCP connections on ``port`` for 300 s."""
    return [sys.executable, '-c',
            'import socket, time\n'
            f's = socket.create_server(("0.0.0.0", {port}))\n'
            'time.sleep(300)\n']


def connect_result(host: netns.Host, address: str, port: int) -> str:
    """What a TCP connect from ``host`` to ``address:port`` gets within 2 s:
    'connected', 'refused' or 'timeout'."""
    code = ('import socket\n'
            's = socket.socket(); s.settimeout(2)\n'
            'try:\n'
            f'    s.connect(({address!r}, {port})); print("connected")\n'
            'except ConnectionRefusedError:\n'
            '    print("refused")\n'
            'except OSError:\n'
            '    print("timeout")\n')
    return host.run([sys.executable, '-c', code], timeout=30).stdout.strip()


def nft_tables(host: netns.Host) -> str:
    return host.run(['nft', 'list', 'tables']).stdout


class FaultsTest(NetnsTestCase):
    def test_link_down_cuts_the_host_off_and_comes_back_up_after_the_block(self):
        with self.network() as net:
            a, b = net.add_host('a'), net.add_host('b')
            b.popen(server(7001))
            wait_until(lambda: connect_result(a, b.address, 7001) == 'connected',
                       'the server listens')
            with a.link_down():
                self.assertNotIn('UP', link(a.namespace, 'eth0')['flags'])
                self.assertNotEqual('connected', connect_result(a, b.address, 7001))
            self.assertIn('UP', link(a.namespace, 'eth0')['flags'])
            # The address and its route came back with the link.
            wait_until(lambda: connect_result(a, b.address, 7001) == 'connected',
                       'the link is back')

    def test_link_down_holds_for_its_seconds_and_fails_up(self):
        with self.network() as net:
            a = net.add_host('a')
            slept = []
            # netns's own clock: other threads of this process may sleep meanwhile.
            clock = types.SimpleNamespace(monotonic=time.monotonic, sleep=slept.append)
            with mock.patch.object(netns, 'time', clock):
                with a.link_down(60):
                    pass
            self.assertEqual(1, len(slept))
            self.assertGreater(slept[0], 59)
            # A failing block brings the link up at once, without waiting.
            slept.clear()
            with mock.patch.object(netns, 'time', clock):
                with self.assertRaises(RuntimeError):
                    with a.link_down(60):
                        raise RuntimeError('boom')
            self.assertEqual([], slept)
            self.assertIn('UP', link(a.namespace, 'eth0')['flags'])

    def test_dropping_hangs_connections_instead_of_refusing_them(self):
        with self.network() as net:
            a, b = net.add_host('a'), net.add_host('b')
            b.popen(server(7001))
            b.popen(server(7002))
            wait_until(lambda: connect_result(a, b.address, 7001) == 'connected',
                       'the server listens')
            # Nothing listens on 7003: refused, before and after, never while dropped.
            self.assertEqual('refused', connect_result(a, b.address, 7003))
            with a.dropping(b.address, 7001):
                self.assertEqual('timeout', connect_result(a, b.address, 7001))
                self.assertEqual('connected', connect_result(a, b.address, 7002))
                self.assertIn('vmcnet_drop_', nft_tables(a))
                # Inside a's namespace only: b and the machine see no rule of it.
                self.assertNotIn('vmcnet_drop_', nft_tables(b))
            self.assertEqual('connected', connect_result(a, b.address, 7001))
            self.assertNotIn('vmcnet_drop_', nft_tables(a))
            with a.dropping(b.address):
                self.assertEqual('timeout', connect_result(a, b.address, 7003))
            self.assertEqual('refused', connect_result(a, b.address, 7003))

    def test_a_failing_block_still_removes_the_drop(self):
        with self.network() as net:
            a, b = net.add_host('a'), net.add_host('b')
            with self.assertRaises(RuntimeError):
                with a.dropping(b.address):
                    raise RuntimeError('boom')
            self.assertNotIn('vmcnet_drop_', nft_tables(a))

    def test_processes_finds_what_left_its_session_and_what_names_the_state(self):
        pidfile = os.path.join(self.tmp, 'stray.pid')
        with self.network(subnet='10.77.6.0/24') as net:
            a, b = net.add_host('a'), net.add_host('b')
            leader = a.popen(['sh', '-c', f'setsid sleep 301 & echo $! > {pidfile}.tmp; '
                              f'mv {pidfile}.tmp {pidfile}; exec sleep 302'])
            wait_until(lambda: os.path.exists(pidfile), 'the stray child started')
            with open(pidfile) as f:
                stray = int(f.read())
            # Outside every namespace, but named after a's state directory.
            outside = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(303)',
                                        a.state_dir])
            self.addCleanup(outside.wait)
            self.addCleanup(outside.kill)
            wait_until(lambda: outside.pid in [p.pid for p in a.processes()],
                       'the process outside is found')
            found = {p.pid: p for p in a.processes()}
            self.assertIn(leader.pid, found)
            self.assertEqual(('sleep', '302'), found[leader.pid].argv)
            self.assertIn(stray, found)
            self.assertEqual('sleep', found[stray].program)
            self.assertNotIn(os.getpid(), found)
            self.assertEqual([], [p for p in b.processes()
                                  if p.pid in (leader.pid, stray, outside.pid)])
