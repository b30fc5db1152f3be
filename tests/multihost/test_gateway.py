"""The gateway on emulated hosts (issue 16): clients reach applications through it only,
it weighs new connections by the hosts' loads, holds each cloud to its connection
limit exactly, and accounts for every connection as the clients hold them.

What runs where (tests/multihost/cluster.py): the controller; compute hosts node1 and
node2, each in a cgroup of its own that its compute service measures its CPU load in
(``[compute] load_cgroup``, ``load_cpus = 1``: each emulated host is one CPU of the
machine's, so busy loops in its cgroup make it busy and no other host); the
gateway host ``gw`` running ``vmcloud gateway`` (its HAProxy listens on gw's address,
gw joins the deployment networks it serves); client hosts client1..client3 on the
same switch, which have no route anywhere (and client1, in one check, a route to the
deployment subnet via gw). Every connection of a test is a socket of the test process
made in a client host's namespace (netns.Host.connect), so the test knows exactly what
each client holds: its address and port, and the instance that answered it (the test
guest's HTTP server and its ``vmcloud.tcp_hold`` service both answer with the
instance's name).

- GatewayHttpTest: application ``web`` (HTTP, port 80), 4 instances in cloud ``shop``
  (node1 and node2): 1000 requests reach all 4 and a direct connection to a guest
  fails, also with a route via gw, whose forwarding is on (the guests route back via
  gw: ``vmcloud.gateway_route``); a busy loop on node1 gives its instances a smaller
  share of new connections, the share the documented calculation
  (vmcloud.gateway.load) expects from the loads the dispatcher recorded; limit 50:
  exactly 50 of 100 long-lived connections admitted, 50 answered 503 naming the
  limit, ``available`` = 50 - active at every sample; 100 connections from 3 clients,
  1000 opens and closes: the gateway's connections and stats equal what the clients
  hold at every sample.
- GatewayTcpTest: application ``hold`` (TCP, port 7000), 2 instances in cloud
  ``stream``: limit 50 refuses by closing at once; an instance whose qemu is killed is
  out of the pool within 2 s while the connections held to the other keep working;
  a new deployment's instance gets traffic within 1 s of becoming active; the gateway
  killed and started again (HAProxy runs on) keeps established connections.

One cloud per class (the controller and 4 or 2 TCG guests take minutes to boot);
every test leaves its cloud's limits and pool as it found them. Every wait and every
load loop is bounded in count and time. Needs root, RabbitMQ, PostgreSQL, dnsmasq,
HAProxy, cgroup v2 and the test guest.
"""
import collections
import concurrent.futures
import datetime
import glob
import http.client
import os
import random
import shutil
import signal
import socket
import sys
import threading
import time

import fixtures
import testtools.content

from vmcloud.gateway import config as gateway_config
from vmcloud.gateway import load
from tests import base
from tests import guest
from tests.multihost import cluster
from tests.multihost import netns
from tests.multihost import test_cluster

TEST_TIMEOUT = 900
DEPLOY_TIMEOUT = 600
MEMORY_MIB = 192
HOLD_PORT = 7000
CMDLINE = (f'{guest.CMDLINE} vmcloud.id={{name}} vmcloud.tcp_hold={HOLD_PORT} '
           'vmcloud.gateway_route=1')
# One answer through the gateway: a TCG guest forks a shell per request, and on a
# loaded machine its accept queue overflows now and then, which costs HAProxy a 5 s
# connect timeout before it retries (3 tries): more than those.
IO_TIMEOUT = 30.0
# A connection that must fail: a reachable guest answers in milliseconds.
PROBE_TIMEOUT = 3.0
# Each emulated host counts as one CPU of the machine's (see the module's docstring).
OPTIONS = {'compute': {'load_cpus': 1}}
REQUESTS = 1000
# Concurrent clients: more would overrun the TCG guests' accept queues (see IO_TIMEOUT).
WORKERS = 4
LIMIT = 50
# The busy loops' own bound (the load test ends them sooner); two of them, so that the
# loaded host's one CPU is busy even while the machine's other work competes.
HOG_SECONDS = 300
HOG_LOOPS = 2
# How much busier the loaded host must be than the other before the measurement.
BUSY_GAP = 0.4
# "Measurably smaller": at most this fraction of the loaded host's fair share.
SMALLER = 0.75
# The load test's requests: batches, the hosts' loads read after each.
LOAD_BATCHES = 10
LOAD_BATCH = 40
LOAD_WORKERS = 2
# |measured - expected| share of the loaded host's instances: the loads move between
# two readings (a heartbeat a second, a poll every 2 s), HAProxy's weights with them.
SHARE_BOUND = 0.08
# The accounting test: 100 connections opened in batches, then batches of closes and
# opens (half each) until EVENTS events.
HELD = 100
OPEN_BATCH = 25
CHURN_BATCH = 50
EVENTS = 1000
# What a killed instance, and a new one, may take to leave or join the pool.
LEAVE_SECONDS = 2.0
JOIN_SECONDS = 1.0
# A client retrying a listener whose instance is not active yet.
RETRY_INTERVAL = 0.05
REQUEST = b'GET / HTTP/1.1\r\nHost: app\r\n\r\n'


# -- what a client does --------------------------------------------------------------

class Refused(Exception):
    """The gateway refused the connection: the body of its 503, or '' (TCP: closed)."""


def http_request(sock: socket.socket) -> tuple[int, str, bool]:
    """GET / on an open connection. :returns: (status, body, whether the gateway closes
    the connection after it). :raises: OSError, http.client.HTTPException."""
    sock.sendall(REQUEST)
    response = http.client.HTTPResponse(sock)
    response.begin()
    body = response.read().decode('utf-8', 'replace')
    return response.status, body, response.will_close


def read_line(sock: socket.socket) -> str:
    """One line from the connection ('' if it closed first). :raises: OSError."""
    data = b''
    while not data.endswith(b'\n'):
        chunk = sock.recv(256)
        if not chunk:
            return ''
        data += chunk
    return data.decode('utf-8', 'replace').strip()


def close(sock: socket.socket) -> None:
    """Close a connection and wait (IO_TIMEOUT) until the gateway closed its side too,
    so that it counts the connection gone before the next sample; never raises."""
    try:
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(4096):
            pass
    except OSError:
        pass
    finally:
        sock.close()


class Connection:
    """A connection a client holds through the gateway, and who answered it."""

    def __init__(self, client: netns.Host, sock: socket.socket, instance: str):
        self.client = client
        self.sock = sock
        self.instance = instance
        self.address, self.port = sock.getsockname()[:2]

    def key(self) -> tuple[str, int]:
        return self.address, self.port


def open_http(client: netns.Host, address: str, port: int) -> Connection:
    """A long-lived HTTP connection through the gateway, one request answered.

    :raises: Refused (a 503, the connection closed after it), AssertionError (another
        answer), OSError.
    """
    sock = client.connect(address, port, IO_TIMEOUT)
    try:
        status, body, closing = http_request(sock)
    except BaseException:
        sock.close()
        raise
    if status == 503:
        closed = closing and read_line(sock) == ''
        sock.close()
        if not closed:
            raise AssertionError(f'a 503 that left the connection open: {body!r}')
        raise Refused(body)
    if status != 200 or closing:
        sock.close()
        raise AssertionError(f'GET / through the gateway answered {status} '
                             f'(closing: {closing}): {body!r}')
    return Connection(client, sock, body.split()[0])


def open_hold(client: netns.Host, address: str, port: int) -> Connection:
    """A long-lived TCP connection through the gateway to a ``vmcloud.tcp_hold`` service,
    its first line read.

    :raises: Refused (closed or reset before any line), OSError.
    """
    try:
        sock = client.connect(address, port, IO_TIMEOUT)
    except ConnectionResetError as exc:
        # The gateway accepted and reset it at once, before connect() returned.
        raise Refused('') from exc
    try:
        line = read_line(sock)
    except ConnectionResetError:
        line = ''
    except BaseException:
        sock.close()
        raise
    if not line:
        sock.close()
        raise Refused('')
    return Connection(client, sock, line.split()[0])


def still_answers(connection: Connection, protocol: str) -> bool:
    """Whether the connection still gets answers (IO_TIMEOUT): over TCP from its
    instance; over HTTP from any (HAProxy balances each request of a connection: its
    instance is then the one that answered last, as the gateway accounts for it)."""
    try:
        if protocol == 'http':
            status, body, closing = http_request(connection.sock)
            if status != 200 or closing:
                return False
            connection.instance = body.split()[0]
            return True
        connection.sock.sendall(b'ping\n')
        return read_line(connection.sock).split()[:1] == [connection.instance]
    except (OSError, http.client.HTTPException):
        return False


def one_request(client: netns.Host, address: str, port: int) -> str:
    """One GET / on a new connection through the gateway, closed after it.

    :returns: the instance that answered. :raises: AssertionError, Refused, OSError.
    """
    connection = open_http(client, address, port)
    close(connection.sock)
    return connection.instance


def in_pool(server: dict | None) -> bool:
    """Whether an HAProxy server (GatewayTestCase.haproxy_servers) takes new connections:
    running (op_state 2), no maintenance or drain (admin_state 0), a weight."""
    return (server is not None and server['op_state'] == 2 and server['admin_state'] == 0
            and server['weight'] > 0)


def utc_epoch(text: str) -> float:
    """A dispatcher timestamp (ISO, UTC, with or without its zone) as epoch seconds."""
    stamp = datetime.datetime.fromisoformat(text)
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=datetime.timezone.utc)
    return stamp.timestamp()


# -- the test cases ---------------------------------------------------------------

class GatewayTestCase(base.TestCase):
    """A cloud of a controller, node1 and node2 in cgroups of their own, the gateway
    host gw and client1..client3, started once for the class; ``prepare`` deploys the
    class's application."""

    cloud: cluster.Cluster
    #: the application's name, protocol, port, health check; its cloud
    APP = ''
    PROTOCOL = ''
    PORT = 0
    COUNT = 0
    CLOUD = ''

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        if os.geteuid() != 0:
            raise AssertionError('tests.multihost need root (network namespaces); run '
                                 'them as root like the README\'s test command')
        cls.cloud = cluster.Cluster(rate='1gbit', options=OPTIONS, host_cgroups=True)
        cls.prefix = f'{netns.PREFIX}-{os.getpid()}-{cls.cloud.network.tag}-'
        cls.cgroup_prefix = (f'{cluster.CGROUP_PREFIX}-{os.getpid()}-'
                             f'{cls.cloud.network.tag}-')
        try:
            cls.cloud.open()
            cls.cloud.import_guest()
            for name in ('node1', 'node2'):
                cls.cloud.start_compute(name)
            cls.cloud.wait_host_states({'node1': 'up', 'node2': 'up'})
            cls.gateway = cls.cloud.start_gateway('gw')
            cls.clients = [cls.cloud.add_client(f'client{i}') for i in (1, 2, 3)]
            cls.prepare()
        except BaseException:
            cls.close_cloud()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.close_cloud()
        super().tearDownClass()

    @classmethod
    def close_cloud(cls) -> None:
        """Close the cloud, then check (and remove) that nothing of it is left: no
        namespace, process (HAProxy included), state directory or cgroup.

        :raises: AssertionError naming what was left.
        """
        cls.cloud.close()
        root = os.path.join(cls.cloud.network.state_root, cls.prefix)
        left = [n for n in netns.namespaces() if n.startswith(cls.prefix)]
        stray = test_cluster.processes_naming(root)
        state = glob.glob(root + '*')
        try:
            cgroups = glob.glob(os.path.join(cluster.cgroup2_root(), cls.cgroup_prefix + '*'))
        except cluster.ClusterError:
            cgroups = []
        for namespace in left:
            netns.delete_namespace(namespace)
        for pid in stray:
            os.kill(pid, signal.SIGKILL)
        for path in state:
            shutil.rmtree(path, ignore_errors=True)
        for path in cgroups:
            cluster.remove_cgroup(path)
        if left or stray or state or cgroups:
            raise AssertionError(f'left after the cloud closed: namespaces {left}, '
                                 f'processes {stray}, state directories {state}, '
                                 f'cgroups {cgroups}')

    @classmethod
    def prepare(cls) -> None:
        """Cloud CLOUD on node1 and node2, application APP, COUNT instances of it
        deployed there and answering through the gateway."""
        cloud = cls.cloud
        cloud.cli_json('cloud', 'create', cls.CLOUD, '--connection-limit', '1000',
                       '--host', 'node1', '--host', 'node2')
        health = f'http:{cls.PORT}' if cls.PROTOCOL == 'http' else f'tcp:{cls.PORT}'
        cloud.cli_json('app', 'create', cls.APP, '--image', 'guest', '--port', str(cls.PORT),
                       '--protocol', cls.PROTOCOL, '--memory', str(MEMORY_MIB),
                       '--kernel', 'guest-kernel', '--initrd', 'guest-initrd',
                       '--cmdline', CMDLINE, '--health', health)
        cls.deployment = cloud.cli_json(
            'app', 'deploy', cls.APP, '--cloud', cls.CLOUD, '-n', str(cls.COUNT), '--wait',
            '--timeout', str(DEPLOY_TIMEOUT), timeout=DEPLOY_TIMEOUT + 60)
        if cls.deployment['state'] != 'active' or not cls.deployment.get('listener_port'):
            raise AssertionError(f'{cls.APP} not deployed behind a listener: '
                                 f'{cls.deployment}')
        cls.listener_port = cls.deployment['listener_port']
        cloud.wait_for(f'{cls.APP} to answer through the gateway', cls.answers_once,
                       lambda seen: seen is True, 120)

    @classmethod
    def answers_once(cls) -> bool | str:
        try:
            opener = open_http if cls.PROTOCOL == 'http' else open_hold
            connection = opener(cls.clients[0], cls.gateway.address, cls.listener_port)
        except (OSError, AssertionError, Refused, http.client.HTTPException) as exc:
            return repr(exc)
        close(connection.sock)
        return True

    def setUp(self):
        super().setUp()
        self.useFixture(fixtures.Timeout(TEST_TIMEOUT, gentle=True))
        self.addOnException(self.attach_logs)
        self.measured: dict[str, object] = {}
        self.addCleanup(lambda: self.addDetail('measured', testtools.content.json_content(
            self.measured)))
        self.held: list[Connection] = []
        self.addCleanup(self.close_held)

    def attach_logs(self, _exc_info) -> None:
        for name, path in self.cloud.logs().items():
            if os.path.exists(path):
                self.addDetail(f'{name}.log', testtools.content.content_from_file(
                    path, buffer_now=True))
        haproxy_log = gateway_config.Paths(self.gateway_root()).log
        if os.path.exists(haproxy_log):
            self.addDetail('haproxy.log', testtools.content.content_from_file(
                haproxy_log, buffer_now=True))

    def close_held(self) -> None:
        for connection in self.held:
            close(connection.sock)
        self.held.clear()

    # -- the gateway as the operator and the clients see it ------------------------

    @classmethod
    def gateway_root(cls) -> str:
        return os.path.join(cls.gateway.state_dir, 'gateway')

    def opener(self):
        return open_http if self.PROTOCOL == 'http' else open_hold

    def open(self, client: netns.Host, port: int | None = None) -> Connection:
        """A connection held through the gateway (closed at the test's end).

        :raises: Refused, AssertionError, OSError.
        """
        connection = self.opener()(client, self.gateway.address, port or self.listener_port)
        self.held.append(connection)
        return connection

    def drop(self, connection: Connection) -> None:
        self.held.remove(connection)
        close(connection.sock)

    def stats(self) -> dict:
        """``vmcloud gateway stats --cloud CLOUD -f json``: this cloud's figures."""
        answer = self.cloud.cli_json('gateway', 'stats', '--cloud', self.CLOUD)
        if isinstance(answer, list):
            [answer] = [s for s in answer if s.get('cloud') == self.CLOUD]
        elif self.CLOUD in answer and isinstance(answer[self.CLOUD], dict):
            answer = answer[self.CLOUD]
        self.assertEqual(self.CLOUD, answer.get('cloud'), answer)
        return answer

    def connections(self) -> list[dict]:
        """``vmcloud gateway connections --cloud CLOUD -f json``."""
        return self.cloud.cli_json('gateway', 'connections', '--cloud', self.CLOUD)

    def listener(self, state: dict | None = None, deployment_id: str | None = None) -> dict:
        """The gateway state's listener of the class's deployment (or another)."""
        state = state or self.cloud.gateway_state()
        wanted = deployment_id or self.deployment['id']
        found = [entry for entry in state['listeners'] if entry['deployment'] == wanted]
        self.assertEqual(1, len(found), state['listeners'])
        return found[0]

    def instance_ids(self) -> dict[str, str]:
        """Instance name -> id, of the class's deployment."""
        return {i['name']: i['id']
                for i in self.cloud.deployment(self.deployment['id'])['instances']}

    def set_limit(self, limit: int) -> None:
        """The cloud's limit, once the gateway applies it (its stats say it)."""
        self.cloud.cli_json('cloud', 'update', self.CLOUD, '--connection-limit', str(limit))
        self.cloud.wait_for(f'the gateway to apply limit {limit} to {self.CLOUD}', self.stats,
                            lambda seen: seen['connection_limit'] == limit, 30)

    def haproxy_servers(self) -> dict[str, dict]:
        """HAProxy's servers (instance id -> backend, weight, states), read on its admin
        socket: the weights the gateway set."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(gateway_config.Paths(self.gateway_root()).admin_socket)
            sock.sendall(b'show servers state\n')
            out = b''
            while chunk := sock.recv(65536):
                out += chunk
        lines = out.decode().splitlines()
        header = next(line for line in lines if line.startswith('# be_id'))[2:].split()
        servers = {}
        for line in lines:
            fields = line.split()
            if not fields or line.startswith('#') or len(fields) < len(header):
                continue
            row = dict(zip(header, fields))
            servers[row['srv_name']] = {
                'backend': row['be_name'], 'weight': int(row['srv_uweight']),
                'op_state': int(row['srv_op_state']),
                'admin_state': int(row['srv_admin_state'])}
        return servers

    def check_limit(self, opener_name: str) -> None:
        """Limit LIMIT: 2 x LIMIT connections opened one after the other admit exactly
        LIMIT, refuse the rest at once; ``available`` is LIMIT - active at each batch;
        connections closed make room for as many new ones, and no more."""
        before = self.stats()
        self.set_limit(LIMIT)
        self.addCleanup(self.set_limit, before['connection_limit'])
        client = self.clients[0]
        refusals: list[str] = []
        samples = []

        def sample(what: str) -> None:
            seen = self.stats()
            samples.append({'after': what, 'held': len(self.held),
                            'active': seen['active_connections'],
                            'available': seen['available_connections']})

        for batch in range(2 * LIMIT // 10):
            for _ in range(10):
                try:
                    self.open(client)
                except Refused as refused:
                    refusals.append(str(refused))
            sample(f'{(batch + 1) * 10} opened')
        self.assertEqual((LIMIT, LIMIT), (len(self.held), len(refusals)))
        for body in refusals:
            if opener_name == 'http':
                self.assertIn(f'vmcloud: cloud {self.CLOUD} is at its connection limit '
                              f'{LIMIT}', body)
        for connection in self.held[:10]:
            self.assertTrue(still_answers(connection, self.PROTOCOL), connection.instance)
        after_full = self.stats()
        self.assertEqual(LIMIT, after_full['rejected_connections']
                         - before['rejected_connections'], after_full)
        self.assertEqual(LIMIT, after_full['total_connections']
                         - before['total_connections'], after_full)

        for connection in list(self.held[:10]):
            self.drop(connection)
        sample('10 closed')
        for _ in range(10):
            self.open(client)  # admitted: a refusal raises
        sample('10 opened again')
        self.assertRaises(Refused, self.open, client)
        sample('one more refused')
        self.close_held()
        sample('all closed')
        self.measured['samples'] = samples
        self.assertEqual([], [s for s in samples if s['active'] != s['held']
                              or s['available'] != LIMIT - s['active']], samples)
        self.assertEqual(0, samples[-1]['active'], samples)


class GatewayHttpTest(GatewayTestCase):
    APP = 'web'
    PROTOCOL = 'http'
    PORT = 80
    COUNT = 4
    CLOUD = 'shop'

    def test_requests_reach_every_instance_through_the_gateway_only(self):
        client = self.clients[0]
        instances = self.cloud.deployment(self.deployment['id'])['instances']
        names = {i['name'] for i in instances}
        self.assertEqual({'node1', 'node2'}, {i['host'] for i in instances}, instances)

        with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
            futures = [pool.submit(one_request, client, self.gateway.address,
                                   self.listener_port) for _ in range(REQUESTS)]
            answered = collections.Counter()
            failed = []
            for future in futures:
                try:
                    answered[future.result()] += 1
                except (OSError, AssertionError, Refused, http.client.HTTPException) as exc:
                    failed.append(repr(exc))
        self.measured['answered'] = dict(answered)
        self.assertEqual([], failed[:10])
        self.assertEqual(REQUESTS, sum(answered.values()))
        self.assertEqual(names, set(answered), answered)

        # The gateway itself reaches every guest (the control: the addresses answer).
        for instance in instances:
            done = self.gateway.run([sys.executable, '-c', netns.HTTP_FETCH,
                                     f'http://{instance["address"]}/', str(PROBE_TIMEOUT)],
                                    check=False, timeout=PROBE_TIMEOUT + 30)
            self.assertEqual(instance['name'], (done.stdout.split() or [''])[0], done.stderr)
        # The client host does not, first without any route, then with one to the
        # deployment subnet via the gateway host, forwarding on there: only the gateway's
        # guard stops it (the guests route back via the gateway, vmcloud.gateway_route).
        self.assert_unreachable(client, instances)
        cidr = self.deployment['network']['cidr']
        self.set_forwarding(True)
        self.addCleanup(self.set_forwarding, False)
        client.run(['ip', 'route', 'add', cidr, 'via', self.gateway.address])
        self.addCleanup(client.run, ['ip', 'route', 'del', cidr, 'via', self.gateway.address])
        self.assert_unreachable(client, instances)

    def set_forwarding(self, on: bool) -> None:
        """IPv4 forwarding on the gateway host (its namespace's own sysctl)."""
        self.gateway.run(['sh', '-c', f'echo {int(on)} > /proc/sys/net/ipv4/ip_forward'])

    def assert_unreachable(self, client: netns.Host, instances: list[dict]) -> None:
        for instance in instances:
            for port in (80, HOLD_PORT):
                try:
                    sock = client.connect(instance['address'], port, PROBE_TIMEOUT)
                except OSError:
                    continue
                sock.close()
                self.fail(f'{client.name} reached {instance["name"]} at '
                          f'{instance["address"]}:{port} directly')

    def test_loaded_host_gets_a_smaller_share_of_new_connections(self):
        client = self.clients[0]
        instances = self.listener()['instances']
        on = collections.Counter(i['host'] for i in instances)
        self.assertEqual({'node1', 'node2'}, set(on), instances)
        fair = on['node1'] / len(instances)
        host_of = {i['name']: i['host'] for i in instances}
        ids_on_node1 = {i['id'] for i in instances if i['host'] == 'node1'}

        hogs = self.cloud.cpu_hog('node1', HOG_SECONDS, HOG_LOOPS)
        for hog in hogs:
            self.addCleanup(base.stop_process, hog, 10)

        # The dispatcher has node1 busier than node2, and the gateway weighs it so.
        def busier(state: dict) -> bool:
            hosts = state['hosts']
            return hosts['node1']['cpu_busy'] - hosts['node2']['cpu_busy'] >= BUSY_GAP
        self.cloud.wait_for('node1 busier than node2 in the gateway state',
                            self.cloud.gateway_state, busier, 60)

        def weighed(servers: dict) -> bool:
            loaded = [s['weight'] for i, s in servers.items() if i in ids_on_node1]
            others = [s['weight'] for i, s in servers.items()
                      if i not in ids_on_node1 and s['backend'].startswith('http')]
            return bool(loaded) and bool(others) and max(loaded) < min(others)
        self.cloud.wait_for('HAProxy to weigh node1\'s instances lower',
                            self.haproxy_servers, weighed, 30)

        expected, measured = [], collections.Counter()
        for batch in range(LOAD_BATCHES):
            state = self.cloud.gateway_state()
            weights = load.weights(state['hosts'], self.listener(state)['instances'], {})
            shares = load.expected_shares(weights)
            expected.append(sum(shares[i] for i in ids_on_node1))
            with concurrent.futures.ThreadPoolExecutor(LOAD_WORKERS) as pool:
                for name in pool.map(lambda _: one_request(client, self.gateway.address,
                                                           self.listener_port),
                                     range(LOAD_BATCH)):
                    measured[host_of[name]] += 1
        state = self.cloud.gateway_state()
        expected.append(sum(load.expected_shares(load.weights(
            state['hosts'], self.listener(state)['instances'], {}))[i] for i in ids_on_node1))
        for hog in hogs:
            base.stop_process(hog, 10)

        share = measured['node1'] / sum(measured.values())
        mean_expected = sum(expected) / len(expected)
        self.measured.update(fair_share=fair, measured_share=share, expected=expected,
                             mean_expected=mean_expected, answered=dict(measured),
                             hosts=state['hosts'])
        # Measurably smaller than its fair share, and what the calculation says.
        self.assertLess(mean_expected, fair * SMALLER, self.measured)
        self.assertLess(share, fair * SMALLER, self.measured)
        self.assertLessEqual(abs(share - mean_expected), SHARE_BOUND, self.measured)

    def test_cloud_limit_admits_exactly_the_limit(self):
        self.check_limit('http')

    def test_accounting_matches_what_the_clients_hold(self):
        ids = self.instance_ids()
        chooser = random.Random(16)
        mismatches: list[dict] = []
        events = 0
        samples = 0
        pool = concurrent.futures.ThreadPoolExecutor(WORKERS)
        self.addCleanup(pool.shutdown)

        def open_some(count: int) -> None:
            clients = [self.clients[chooser.randrange(len(self.clients))]
                       for _ in range(count)]
            for connection in pool.map(lambda c: open_http(c, self.gateway.address,
                                                           self.listener_port), clients):
                self.held.append(connection)

        def sample() -> None:
            nonlocal samples
            samples += 1
            truth = {c.key(): ids[c.instance] for c in self.held}
            records = self.connections()
            seen = {(r['client'], r['client_port']): r['instance'] for r in records}
            stats = self.stats()
            per_instance = {i: n for i, n in stats['per_instance'].items() if n}
            wanted = {
                'connections': (truth, seen, len(records)),
                'active_connections': (len(truth), stats['active_connections']),
                'users_connected': (len({address for address, _ in truth}),
                                    stats['users_connected']),
                'per_instance': (dict(collections.Counter(truth.values())), per_instance),
            }
            for what, (held, reported, *more) in wanted.items():
                if held != reported or (more and more[0] != len(held)):
                    mismatches.append({'after_events': events, 'what': what,
                                       'held': str(held)[:2000],
                                       'reported': str(reported)[:2000]})

        while len(self.held) < HELD:
            open_some(min(OPEN_BATCH, HELD - len(self.held)))
            events += OPEN_BATCH
            sample()
        while events < EVENTS:
            half = min(CHURN_BATCH, EVENTS - events) // 2
            for connection in chooser.sample(self.held, half):
                self.drop(connection)
            open_some(half)
            events += 2 * half
            sample()
        self.measured.update(events=events, samples=samples, mismatches=mismatches[:20])
        self.assertEqual(EVENTS, events)
        self.assertEqual(3, len({c.address for c in self.held}))
        self.assertEqual([], mismatches[:20])


class GatewayTcpTest(GatewayTestCase):
    APP = 'hold'
    PROTOCOL = 'tcp'
    PORT = HOLD_PORT
    COUNT = 2
    CLOUD = 'stream'

    def active_instances(self) -> list[dict]:
        """The class's deployment's instances in the gateway's pool (active), at least
        one (a test that killed one leaves the other)."""
        return self.cloud.wait_for('an active instance of hold', lambda: self.listener()[
            'instances'], lambda seen: len(seen) >= 1, DEPLOY_TIMEOUT)

    def test_cloud_limit_closes_refused_connections(self):
        self.active_instances()
        self.check_limit('tcp')

    def test_killed_instance_leaves_the_pool_others_keep_their_connections(self):
        instances = self.cloud.wait_for(
            'both instances of hold active', lambda: self.listener()['instances'],
            lambda seen: len(seen) == 2, DEPLOY_TIMEOUT)
        by_name = {i['name']: i for i in instances}
        for index in range(10):
            self.open(self.clients[index % len(self.clients)])
        self.assertEqual(set(by_name), {c.instance for c in self.held})
        victim, survivor = instances
        [pid] = self.cloud.guests(victim['host'])[victim['name']]
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()

        # The other instance's connections keep working meanwhile.
        others = [c for c in self.held if c.instance != victim['name']]
        self.assertEqual([], [c.key() for c in others
                              if not still_answers(c, self.PROTOCOL)])
        time.sleep(max(0.0, killed + LEAVE_SECONDS - time.monotonic()))
        # LEAVE_SECONDS after the kill, HAProxy sends it nothing new (HAProxy would
        # also retry a dead server's connection elsewhere, so the answers alone would
        # not show it), and every new connection is the survivor's.
        servers = self.haproxy_servers()
        self.measured['victim_server'] = servers.get(victim['id'])
        self.assertFalse(in_pool(servers.get(victim['id'])), servers)
        self.assertTrue(in_pool(servers.get(survivor['id'])), servers)
        fresh = [self.open(self.clients[i % len(self.clients)]) for i in range(20)]
        self.measured['after_kill'] = dict(collections.Counter(c.instance for c in fresh))
        self.assertEqual({survivor['name']}, {c.instance for c in fresh})
        # Only the killed instance's connections fail.
        self.assertEqual([], [c.key() for c in others
                              if not still_answers(c, self.PROTOCOL)])
        victims = [c for c in self.held if c.instance == victim['name']]
        for connection in victims:
            connection.sock.settimeout(PROBE_TIMEOUT)
        self.assertEqual([], [c.key() for c in victims if still_answers(c, self.PROTOCOL)])

    def test_new_deployment_gets_traffic_within_a_second_of_active(self):
        deployment = self.cloud.cli_json('app', 'deploy', self.APP, '--cloud', self.CLOUD,
                                         '-n', '1')
        self.addCleanup(self.delete, deployment['id'])
        port = deployment['listener_port']
        self.assertIsNotNone(port, deployment)
        self.assertNotEqual(self.listener_port, port, deployment)
        first: list[tuple[float, str]] = []
        stop = threading.Event()

        def probe() -> None:
            deadline = time.monotonic() + DEPLOY_TIMEOUT
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    connection = open_hold(self.clients[1], self.gateway.address, port)
                except (Refused, OSError):
                    time.sleep(RETRY_INTERVAL)
                    continue
                first.append((time.time(), connection.instance))
                close(connection.sock)
                return
        prober = threading.Thread(target=probe, daemon=True)
        prober.start()
        self.addCleanup(prober.join, 30)
        self.addCleanup(stop.set)
        shown = self.cloud.wait_for(
            f'deployment {deployment["id"]} active and answered',
            lambda: self.cloud.deployment(deployment['id']),
            lambda seen: seen['state'] == 'active' and bool(first), DEPLOY_TIMEOUT)
        [instance] = shown['instances']
        activated = utc_epoch(instance['updated_at'])
        answered, name = first[0]
        self.measured.update(activated=activated, first_answer=answered,
                             seconds=answered - activated)
        self.assertEqual(instance['name'], name)
        self.assertLessEqual(answered - activated, JOIN_SECONDS, self.measured)

    def delete(self, deployment_id: str) -> None:
        self.cloud.cli_json('delete', deployment_id)
        self.cloud.wait_for(f'deployment {deployment_id} deleted',
                            lambda: self.cloud.deployment(deployment_id),
                            lambda d: d['state'] == 'deleted', DEPLOY_TIMEOUT)

    def test_gateway_restart_keeps_established_connections(self):
        self.active_instances()
        for index in range(10):
            self.open(self.clients[index % len(self.clients)])
        haproxy = self.cloud.haproxy_pids()
        self.assertTrue(haproxy)
        before = self.stats()

        self.cloud.kill('gateway-gw')
        self.assertEqual(haproxy, self.cloud.haproxy_pids())
        self.assertEqual([], [c.key() for c in self.held
                              if not still_answers(c, self.PROTOCOL)])
        # HAProxy serves on without its manager.
        self.open(self.clients[0])

        self.cloud.restart('gateway-gw')
        # Adopted, not started again: the same processes, every connection still there.
        self.assertEqual(haproxy, self.cloud.haproxy_pids())
        self.assertEqual([], [c.key() for c in self.held
                              if not still_answers(c, self.PROTOCOL)])
        self.open(self.clients[1])
        reported = {(r['client'], r['client_port']) for r in self.connections()}
        self.assertEqual({c.key() for c in self.held}, reported)
        after = self.stats()
        self.assertEqual(len(self.held), after['active_connections'], after)
        self.assertGreaterEqual(after['total_connections'],
                                before['total_connections'] + 2, (before, after))
