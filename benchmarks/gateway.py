"""The gateway's data path: requests per second and added latency through vmcloud's
gateway against a hand-written HAProxy config and against no proxy at all, with one
load tool against one fast backend, in one run; optionally the end-to-end figure
through a real gateway to TCG guests.

    sudo .venv/bin/python benchmarks/gateway.py [--rounds N] [--duration S]
        [--connections N] [--quick] [--guests]

Needs root: two hosts emulated with network namespaces (tests/multihost/netns.py) on
one switch, unshaped veth links: a client host running wrk, a gateway host running
the backend and the proxies under test.

a) The data path. The backend is an HAProxy on the gateway host answering every
   request itself (``http-request return status 200 ... string ok``): no file, no
   fork, no upstream, so it is faster than any proxy in front of it and the proxy is
   what is measured. Three contenders, the same wrk (``-t1 -cN -dS --latency``, HTTP
   keep-alive) from the client host:
   - direct: wrk to the backend;
   - HAProxy, hand-written: an HAProxy with a minimal static frontend and backend to
     the backend, with vmcloud's global settings (``nbthread 1``, the same timeouts
     and maxconn), the config written below in this file;
   - vmcloud gateway: the HAProxy vmcloud.gateway starts and programs:
     ``HAProxy(conf).start()`` (config.render's static config) then
     ``GatewayManager(...).apply(state)`` with a state holding one cloud, one HTTP
     listener and one active instance whose address is the backend, a fake dispatcher
     and FakeNetworkAgent (no guest network is needed: the backend is on the gateway
     host). Every connection crosses vmcloud's per-connection rules (the port's maps,
     the cloud and application limits checked, three stick tables tracked) and every
     answer its per-request rule (the answering server recorded), as in production.
   Added latency is a percentile through a proxy less the same percentile direct,
   both measured in the same round. Rounds interleave the contenders (A B C, then
   B C A, ...), each round one wrk run of each; medians of the rounds. Every run must
   answer only 200s with no socket error, or the benchmark fails (a proxy answering
   503 fast would otherwise look good). The unloaded figure (one connection) is the
   latency a request pays for the proxy without queueing behind others.
b) ``--guests``: the multi-host harness (tests/multihost/cluster.py) with 2 compute
   hosts, a gateway host running ``vmcloud gateway`` and a client host; one HTTP
   application of 2 TCG test guests deployed in the default cloud. wrk from the client
   host through the gateway's listener, against wrk from the gateway host straight to
   the guests' addresses (the gateway host is on the deployment network): two wrk
   processes at once, one per guest, with half the connections each, their rates
   summed. The guests' busybox httpd forks a CGI per request on an emulated CPU, so
   both figures are the guests' limit; their ratio is what the gateway costs end to
   end.
"""
import argparse
import json
import os
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time

if __package__ in (None, ''):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from oslo_config import cfg  # noqa: E402

import vmcloud.conf  # noqa: E402,F401 - registers options
from benchmarks import common  # noqa: E402

CONF = cfg.CONF
SCRIPT = os.path.abspath(__file__)
HAPROXY = '/usr/sbin/haproxy'
WRK = '/usr/bin/wrk'
BACKEND_PORT = 20080
HAND_PORT = 20081
# The first port of vmcloud's HTTP listener range: the one listener of the state.
LISTENER_PORT = 21000
CLOUD = 'default'
APPLICATION = 'bench'
DEPLOYMENT = 'bench-deployment'
INSTANCE = 'bench-instance'
# Far above the wrk connections: no connection may be refused at the limit.
CONNECTION_LIMIT = 10000
DIRECT = 'direct (no proxy)'
HAND = 'HAProxy, hand-written config'
VMCLOUD = 'vmcloud gateway'
CONTENDERS = (DIRECT, HAND, VMCLOUD)
MAX_CONNECTIONS = 100000
SPARE_FDS = 4096
START_TIMEOUT = 60.0
# wrk's own limit per request; a run longer than its duration plus this is stuck.
WRK_TIMEOUT = 10.0
GUEST_BOOT_TIMEOUT = 600.0
READY = 'VMCLOUD-GATEWAY-BENCH-READY'
LATENCY = re.compile(r'^\s*(50|99)%\s+([\d.]+)(us|ms|s)\s*$', re.MULTILINE)
RATE = re.compile(r'^Requests/sec:\s+([\d.]+)', re.MULTILINE)
TOTAL = re.compile(r'^\s*(\d+) requests in', re.MULTILINE)
NON_2XX = re.compile(r'^\s*Non-2xx or 3xx responses:.*$', re.MULTILINE)
SOCKET_ERRORS = re.compile(r'^\s*Socket errors: connect (\d+), read (\d+), write (\d+), '
                           r'timeout (\d+)', re.MULTILINE)
UNITS = {'us': 1e-6, 'ms': 1e-3, 's': 1.0}

# vmcloud's global settings as vmcloud/gateway/config.py renders them, and nothing
# else: the hand-written proxy differs from vmcloud's only in what vmcloud adds per
# connection and per request.
HAND_CONFIG = """\
global
    nbthread 1
    maxconn {maxconn}
    stats socket {state}/hand-admin.sock level admin mode 600
    stats timeout 10s

defaults
    mode http
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
    option clitcpka
    option srvtcpka
    option dontlognull
    maxconn {maxconn}

frontend fe_hand
    bind {address}:{port}
    default_backend be_hand

backend be_hand
    balance roundrobin
    server backend {backend_address}:{backend_port}
"""

# The fast backend: every request answered by HAProxy itself.
BACKEND_CONFIG = """\
global
    nbthread 1
    maxconn {maxconn}

defaults
    mode http
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    option dontlognull

frontend fe_backend
    bind {address}:{port}
    http-request return status 200 content-type text/plain string ok
"""


def maxconn() -> int:
    """What the proxies may hold: two descriptors a connection within the open file
    limit HAProxy cannot raise (root's hard limit too, in a container), at most
    vmcloud's 100000."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(1000, min(MAX_CONNECTIONS, (hard - SPARE_FDS) // 2))


class BenchError(Exception):
    """A server did not start, or a load run failed or answered other than 200."""


# -- the vmcloud gateway: a worker process inside the gateway host -------------------

class FakeDispatcher:
    """What the gateway manager asks of the dispatcher, answered from one state."""

    def __init__(self, state: dict):
        self.state = state

    def register_gateway(self, name: str, vtep_address: str) -> dict:
        return self.state

    def gateway_state(self) -> dict:
        return self.state


def gateway_state(address: str, port: int) -> dict:
    """One cloud, one HTTP listener and one active instance at ``address:port``, on a
    host with all its CPUs free (gateway_state's format: contract of issue 16)."""
    return {
        'clouds': {CLOUD: {'connection_limit': CONNECTION_LIMIT}},
        'applications': {APPLICATION: {'connection_limit': None}},
        'hosts': {'gateway': {'cpus': os.cpu_count() or 1, 'cpu_busy': 0.0, 'vcpus': 2,
                              'vcpus_used': 1, 'memory_mib': 1024, 'memory_mib_used': 256,
                              'up': True}},
        'listeners': [{
            'deployment': DEPLOYMENT, 'cloud': CLOUD, 'application': APPLICATION,
            'listener_port': LISTENER_PORT, 'protocol': 'http', 'port': port,
            'network': {'id': 'bench-network', 'vni': 4000, 'cidr': '10.210.0.0/24'},
            'peers': [],
            'instances': [{'id': INSTANCE, 'name': INSTANCE, 'host': 'gateway',
                           'address': address, 'state': 'active'}]}],
    }


def gateway_worker(spec: dict) -> None:
    """Start vmcloud's HAProxy, program it with the state, say so, and stop it when
    stdin closes (run inside the gateway host, so HAProxy binds there)."""
    from vmcloud.gateway import haproxy
    from vmcloud.gateway import manager
    from vmcloud.network import fake
    CONF([], project='vmcloud', default_config_files=[])
    CONF.set_override('state_path', spec['state_dir'])
    CONF.set_override('listen_address', spec['address'], 'gateway')
    CONF.set_override('name', 'bench-gateway', 'gateway')
    CONF.set_override('vtep_address', spec['address'], 'network')
    state = gateway_state(spec['address'], spec['backend_port'])
    proxy = haproxy.HAProxy(CONF)
    proxy.start()
    try:
        gateway = manager.GatewayManager(CONF, FakeDispatcher(state), proxy,
                                         fake.FakeNetworkAgent(CONF))
        gateway.apply(state)
        print(READY, flush=True)
        sys.stdin.read()
    finally:
        proxy.stop()


# -- the data path: the orchestrator -------------------------------------------------

def seconds(value: str, unit: str) -> float:
    return float(value) * UNITS[unit]


def parse_wrk(output: str, server_closes: bool = False) -> dict:
    """Requests per second, p50 and p99 latency (s) of one ``wrk --latency`` run.
    ``server_closes``: the server closes the connection after each answer (busybox
    httpd: HTTP/1.0, the body ends with the connection), which wrk counts as a read
    error each time; then read errors up to one per request are no failure.

    :raises: BenchError if any answer was not 2xx/3xx, any other socket error happened,
        or the output has no rate.
    """
    failures = [m.group(0).strip() for m in NON_2XX.finditer(output)]
    errors = SOCKET_ERRORS.search(output)
    if errors is not None:
        connect, read, write, timeout = (int(n) for n in errors.groups())
        total = TOTAL.search(output)
        closes = int(total.group(1)) if server_closes and total else 0
        if connect or write or timeout or read > closes:
            failures.append(errors.group(0).strip())
    rate, total = RATE.search(output), TOTAL.search(output)
    if failures or rate is None or total is None or int(total.group(1)) == 0:
        raise BenchError(f'wrk run failed: {"; ".join(failures) or "no requests"}:\n{output}')
    latency = {m.group(1): seconds(m.group(2), m.group(3)) for m in LATENCY.finditer(output)}
    if set(latency) != {'50', '99'}:
        raise BenchError(f'wrk printed no latency distribution:\n{output}')
    return {'rate': float(rate.group(1)), 'p50': latency['50'], 'p99': latency['99'],
            'requests': int(total.group(1))}


def wrk_argv(url: str, connections: int, duration: float) -> list[str]:
    return [WRK, '-t1', f'-c{connections}', f'-d{duration:g}s', '--latency',
            f'--timeout={WRK_TIMEOUT:g}s', url]


class Bench:
    def __init__(self, net, args):
        self.args = args
        self.client = net.add_host('client')
        self.gateway = net.add_host('gateway')
        self.address = self.gateway.address
        self.worker: subprocess.Popen | None = None
        self.urls = {DIRECT: f'http://{self.address}:{BACKEND_PORT}/',
                     HAND: f'http://{self.address}:{HAND_PORT}/',
                     VMCLOUD: f'http://{self.address}:{LISTENER_PORT}/'}

    def _haproxy(self, name: str, text: str, port: int) -> None:
        path = os.path.join(self.gateway.state_dir, f'{name}.cfg')
        with open(path, 'w') as f:
            f.write(text)
        self.gateway.run([HAPROXY, '-c', '-q', '-f', path])
        # In the foreground (-db) so the Network stops it with the host.
        process = self.gateway.popen([HAPROXY, '-db', '-f', path], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client.wait_for_tcp(self.address, port, START_TIMEOUT, process)

    def prepare(self) -> None:
        """The backend, the hand-written proxy and vmcloud's, each answering 200 from
        the client host.

        :raises: BenchError, NetnsError.
        """
        state = self.gateway.state_dir
        self._haproxy('backend', BACKEND_CONFIG.format(
            address=self.address, port=BACKEND_PORT, maxconn=maxconn()), BACKEND_PORT)
        self._haproxy('hand', HAND_CONFIG.format(
            state=state, address=self.address, port=HAND_PORT,
            backend_address=self.address, backend_port=BACKEND_PORT, maxconn=maxconn()),
            HAND_PORT)
        spec = {'state_dir': state, 'address': self.address, 'backend_port': BACKEND_PORT}
        log = open(os.path.join(state, 'gateway-worker.log'), 'w')
        self.worker = self.gateway.popen(
            [sys.executable, SCRIPT, '--gateway-worker', json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
            cwd=common.REPO)
        log.close()
        line = self.worker.stdout.readline()
        if READY not in line:
            self.worker.wait(START_TIMEOUT)
            with open(os.path.join(state, 'gateway-worker.log')) as f:
                raise BenchError(f'vmcloud\'s gateway did not start:\n{f.read()[-3000:]}')
        for name in CONTENDERS:
            self.wait_ok(name)

    def wait_ok(self, name: str) -> None:
        """Wait until a GET through ``name`` answers ``ok`` (vmcloud's server is in
        rotation once its first health check passed).

        :raises: BenchError after START_TIMEOUT.
        """
        from tests.multihost import netns
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            done = self.client.run([sys.executable, '-c', netns.HTTP_FETCH, self.urls[name],
                                    '2'], check=False)
            if done.returncode == 0 and done.stdout.strip() == 'ok':
                return
            if time.monotonic() >= deadline:
                raise BenchError(f'{name} did not answer ok in {START_TIMEOUT:g} s: '
                                 f'{done.stdout.strip()} {done.stderr.strip()}')
            time.sleep(0.2)

    def reuse(self) -> dict[str, dict[str, int]]:
        """Each proxy's backend connections: requests sent, connections opened and
        reused (``show stat``), from its admin socket (a unix socket: reachable from
        this namespace). A proxy that opens one per request pays a TCP handshake to the
        backend on every one."""
        sockets = {HAND: (os.path.join(self.gateway.state_dir, 'hand-admin.sock'),
                          lambda name: name == 'be_hand'),
                   VMCLOUD: (os.path.join(self.gateway.state_dir, 'gateway', 'admin.sock'),
                             lambda name: name.startswith('http_slot'))}
        found = {}
        for contender, (path, ours) in sockets.items():
            rows = backend_rows(admin_command(path, 'show stat'))
            used = [r for r in rows if ours(r['pxname']) and int(r['stot'] or 0)]
            found[contender] = {key: sum(int(r[key] or 0) for r in used)
                                for key in ('stot', 'connect', 'reuse')}
        return found

    def close(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            self.worker.stdin.close()
            try:
                self.worker.wait(START_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass  # the Network kills what is left in the gateway host

    def load(self, name: str, connections: int) -> dict:
        """One wrk run through ``name``. :raises: BenchError, NetnsError."""
        duration = self.args.duration
        done = self.client.run(wrk_argv(self.urls[name], connections, duration),
                               timeout=duration + 2 * WRK_TIMEOUT + 30)
        return parse_wrk(done.stdout)

    def rounds(self, connections: int) -> dict[str, list[dict]]:
        """``--rounds`` rounds of one run of each contender, order rotated; each proxy
        run gets its latencies less the direct run's of the same round."""
        results = {name: [] for name in CONTENDERS}
        for number in range(self.args.rounds):
            shift = number % len(CONTENDERS)
            for name in CONTENDERS[shift:] + CONTENDERS[:shift]:
                results[name].append(self.load(name, connections))
            direct = results[DIRECT][-1]
            for name in (HAND, VMCLOUD):
                run = results[name][-1]
                run['added_p50'] = run['p50'] - direct['p50']
                run['added_p99'] = run['p99'] - direct['p99']
            print(f'  {connections} connections, round {number + 1}: ' + ', '.join(
                f'{n}: {results[n][-1]["rate"]:.0f}/s' for n in CONTENDERS), flush=True)
        return results


def admin_command(path: str, line: str) -> str:
    """One command on an HAProxy admin socket; its answer.

    :raises: OSError.
    """
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(START_TIMEOUT)
        sock.connect(path)
        sock.sendall(line.encode() + b'\n')
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b''.join(chunks).decode()


def backend_rows(stat: str) -> list[dict[str, str]]:
    """The BACKEND rows of ``show stat`` CSV."""
    lines = [line for line in stat.splitlines() if line]
    header = lines[0].lstrip('# ').split(',')
    rows = [dict(zip(header, line.split(','))) for line in lines[1:]]
    return [r for r in rows if r.get('svname') == 'BACKEND']


def reuse_text(reuse: dict[str, dict[str, int]]) -> str:
    return ' '.join(
        f'{name}: {r["connect"]} backend connections opened for {r["stot"]} requests '
        f'({r["reuse"]} reused a connection).' for name, r in reuse.items())


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def ms(value: float) -> str:
    return f'{value * 1e3:.3f}'


def data_path_table(results: dict[str, list[dict]]) -> str:
    rate = {name: median(runs, 'rate') for name, runs in results.items()}
    rows = []
    for name, runs in results.items():
        proxied = name != DIRECT
        rows.append((name, f'{rate[name]:.0f}', ' '.join(f'{r["rate"]:.0f}' for r in runs),
                     f'{rate[name] / rate[HAND]:.3f}', f'{rate[name] / rate[DIRECT]:.3f}',
                     ms(median(runs, 'p50')), ms(median(runs, 'p99')),
                     ms(median(runs, 'added_p50')) if proxied else '-',
                     ms(median(runs, 'added_p99')) if proxied else '-'))
    return common.table(('contender', 'requests/s (median)', 'runs', 'vs hand-written',
                         'vs direct', 'p50 ms', 'p99 ms', 'added p50 ms', 'added p99 ms'),
                        rows)


def goals_table(results: dict[str, list[dict]]) -> str:
    """The issue's goals, met or not, from this run's numbers."""
    ours, theirs = results[VMCLOUD], results[HAND]
    ratio = median(ours, 'rate') / median(theirs, 'rate')
    rows = [('vmcloud / hand-written HAProxy requests/s', '>= 0.9', f'{ratio:.3f}',
             'met' if ratio >= 0.9 else 'NOT met')]
    for key in ('added_p50', 'added_p99'):
        mine, hand = median(ours, key), median(theirs, key)
        # An added latency at or below the hand-written one meets the goal whatever the
        # ratio of two numbers near zero (or a noisy negative one) says.
        met = mine <= max(1.1 * hand, hand)
        ratio_text = f'{mine / hand:.3f}' if hand > 0 else 'hand-written adds none'
        rows.append((f'vmcloud / hand-written added latency {key[6:]}', '<= 1.1',
                     f'{ratio_text} ({ms(mine)} ms vs {ms(hand)} ms)',
                     'met' if met else 'NOT met'))
    return common.table(('goal', 'target', 'measured', ''), rows)


# -- b) end to end through a real gateway to TCG guests -----------------------------

class GuestBench:
    """The multi-host harness with a gateway: one HTTP application of 2 TCG guests."""

    def __init__(self, cloud, args):
        self.cloud = cloud
        self.args = args

    def prepare(self) -> None:
        """Compute hosts, the gateway, a client host; the application deployed, its 2
        instances active and in the gateway's pool.

        :raises: ClusterError, NetnsError, BenchError.
        """
        from tests import guest
        cloud = self.cloud
        cloud.import_guest()
        cloud.start_compute('node1')
        cloud.start_compute('node2')
        cloud.wait_host_states({'node1': 'up', 'node2': 'up'})
        self.gateway = cloud.start_gateway('gw')
        self.client = cloud.add_client('client')
        cloud.cli_json('app', 'create', APPLICATION, '--image', 'guest', '--port', '80',
                       '--protocol', 'http', '--memory', '256', '--kernel', 'guest-kernel',
                       '--initrd', 'guest-initrd', '--cmdline', guest.CMDLINE,
                       '--health', 'http:80/')
        deployed = cloud.cli_json('app', 'deploy', APPLICATION, '--cloud', CLOUD, '-n', '2',
                                  '--wait', '--timeout', str(int(GUEST_BOOT_TIMEOUT)),
                                  timeout=GUEST_BOOT_TIMEOUT + 60)
        shown = cloud.deployment(deployed['id'])
        self.addresses = [i['address'] for i in shown['instances'] if i['state'] == 'active']
        if len(self.addresses) != 2:
            raise BenchError(f'the application has not 2 active instances: {shown}')
        self.listener = f'http://{self.gateway.address}:{shown["listener_port"]}/'
        self.wait_pool()

    def wait_pool(self) -> None:
        """Wait until a GET through the gateway answers 200 (bounded)."""
        from tests.multihost import netns
        deadline = time.monotonic() + START_TIMEOUT
        while self.client.run([sys.executable, '-c', netns.HTTP_FETCH, self.listener, '10'],
                              check=False).returncode != 0:
            if time.monotonic() >= deadline:
                raise BenchError(f'{self.listener} did not answer in {START_TIMEOUT:g} s')
            time.sleep(0.5)

    def through_gateway(self) -> float:
        done = self.client.run(wrk_argv(self.listener, self.args.guest_connections,
                                        self.args.duration),
                               timeout=self.args.duration + 2 * WRK_TIMEOUT + 30)
        # The guests' httpd answers Connection: close, which HAProxy passes on: the
        # client's connection ends with each answer as it does direct.
        return parse_wrk(done.stdout, server_closes=True)['rate']

    def direct(self) -> float:
        """Both guests at once from the gateway host, half the connections each."""
        half = max(1, self.args.guest_connections // 2)
        processes = [self.gateway.popen(wrk_argv(f'http://{address}/', half,
                                                 self.args.duration),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
                     for address in self.addresses]
        rates = []
        for process in processes:
            out, err = process.communicate(timeout=self.args.duration + 2 * WRK_TIMEOUT + 30)
            rates.append(parse_wrk(out + err, server_closes=True)['rate'])
        return sum(rates)

    def measure(self) -> dict[str, list[float]]:
        contenders = {'direct to the 2 guests (from the gateway host)': self.direct,
                      'through the gateway (from the client host)': self.through_gateway}
        return common.rotate(list(contenders), self.args.rounds,
                             lambda name: contenders[name]())


def guests_table(rates: dict[str, list[float]]) -> str:
    names = list(rates)
    baseline = statistics.median(rates[names[0]])
    rows = [(name, f'{statistics.median(values):.1f}', ' '.join(f'{v:.1f}' for v in values),
             f'{statistics.median(values) / baseline:.3f}') for name, values in rates.items()]
    return common.table(('path', 'requests/s (median)', 'runs', 'vs direct'), rows)


def run_guests(args) -> str:
    from tests.multihost import cluster
    with cluster.Cluster() as cloud:
        bench = GuestBench(cloud, args)
        bench.prepare()
        rates = bench.measure()
    return guests_table(rates)


# -- main ---------------------------------------------------------------------------

def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rounds', type=int, default=5,
                        help='rounds of one run of each contender (median)')
    parser.add_argument('--duration', type=float, default=10.0, help='seconds per wrk run')
    parser.add_argument('--connections', type=int, default=32,
                        help='wrk connections of the loaded runs')
    parser.add_argument('--guests', action='store_true',
                        help='also the end-to-end figure through a real gateway to 2 TCG '
                             'guests (boots a multi-host cloud: minutes)')
    parser.add_argument('--guest-connections', type=int, default=4,
                        help='wrk connections against the guests')
    parser.add_argument('--quick', action='store_true', help='2 rounds of 3 s')
    parser.add_argument('--gateway-worker', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.duration = 2, 3.0
    if args.rounds < 1 or args.duration <= 0 or args.connections < 1:
        parser.error('--rounds, --duration and --connections must be positive')
    return args


def main() -> int:
    args = parse_arguments()
    if args.gateway_worker:
        gateway_worker(json.loads(args.gateway_worker))
        return 0
    from tests.multihost import netns

    def terminate(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, terminate)
    facts = common.machine()
    with netns.Network() as net:
        bench = Bench(net, args)
        try:
            bench.prepare()
            loaded = bench.rounds(args.connections)
            unloaded = bench.rounds(1)
            reuse = bench.reuse()
        finally:
            bench.close()
    loaded_body = data_path_table(loaded)
    unloaded_body = data_path_table(unloaded)
    goals = goals_table(loaded)
    sections = [
        ('Goals', f'At {args.connections} connections.\n\n' + goals),
        (f'Data path, {args.connections} connections',
         'Ratios against the hand-written HAProxy and against no proxy; added latency '
         'is the percentile through the proxy less the direct one of the same round '
         '(medians of the rounds). Under this load a request mostly waits behind the '
         'others: its latency is about connections / rate.\n\n' + loaded_body
         + '\n\nOver all runs of both loads: ' + reuse_text(reuse)),
        ('Data path, 1 connection (unloaded)',
         'The latency a request pays for the proxy alone, queueing behind no other.\n\n'
         + unloaded_body)]
    for heading, body in sections:
        print(f'\n{heading}\n{body}', flush=True)
    if args.guests:
        guests_body = run_guests(args)
        print(f'\nEnd to end, 2 TCG guests\n{guests_body}', flush=True)
        sections.append(('End to end: 2 TCG guests behind vmcloud\'s gateway',
                         f'wrk -t1 -c{args.guest_connections} -d{args.duration:g}s; direct '
                         'is two wrk processes at once, one per guest, '
                         f'{max(1, args.guest_connections // 2)} connections each, rates '
                         'summed; through the gateway one wrk. Each guest\'s busybox httpd '
                         'forks a CGI per request on an emulated CPU: both figures are the '
                         'guests\' limit.\n\n' + guests_body))
    facts.update({
        'haproxy': subprocess.run([HAPROXY, '-v'], capture_output=True,
                                  text=True).stdout.splitlines()[0],
        'wrk': f'wrk -t1 -c{args.connections} (and -c1) -d{args.duration:g}s --latency, '
               'HTTP/1.1 keep-alive',
        'hosts': 'network namespaces on one bridge (tests/multihost/netns.py): wrk in a '
                 'client host, backend and proxies in a gateway host, unshaped veths',
        'backend': 'HAProxy answering every request itself (200, body "ok"), nbthread 1',
        'proxies': 'nbthread 1 each; vmcloud: HAProxy(conf).start() + '
                   'GatewayManager.apply(one cloud, one HTTP listener, one instance)',
        'rounds': f'{args.rounds}, contenders interleaved, order rotated; medians',
        'load': 'two cores shared by wrk, the backend, the proxy and other work: a lower '
                'bound',
    })
    path = common.write_results('gateway', 'The gateway\'s data path', sections, facts)
    print(f'written to {os.path.relpath(path, common.REPO)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
