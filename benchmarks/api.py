"""The admin REST API: how list latency grows with the rows behind it (1,000 against
100,000 of each kind, side by side in one run), and how soon a client's connection is
visible in the API against at the gateway itself.

    sudo .venv/bin/python benchmarks/api.py [--rounds N] [--requests N]
        [--turn-budget S] [--small ROWS] [--large ROWS] [--no-postgres]
        [--no-monitor] [--quick] [--guests [--freshness-rounds M]]

a) Lists. One stack per database, each a process of its own: a real dispatcher
   (vmcloud.allinone.AllInOne, the fake driver and network agent, one host) over its
   own database and ``vmcloud.api.app.ApiServer`` on a free port of 127.0.0.1, as
   ``build_services`` makes them (its monitor sampling, as in production). Before the
   dispatcher starts, ROWS clouds, ROWS applications and ROWS deployments of one
   active instance each go in with SQLAlchemy core bulk inserts (not through the
   API): the small stack ``--small`` (1,000), the large one ``--large`` (100,000). The
   deployments' instances are on a host that never registers, so no reconciliation
   touches them, and hold no listener port (the gateway serves none of them). One
   SQLite stack pair, and a PostgreSQL pair (databases of their own on the machine's
   server, tools/start-services.sh, dropped afterwards) unless ``--no-postgres`` or
   the server is not there.
   Every request is made here, client-side, with httpx over one keep-alive connection
   per stack, with an admin token: GET /v1/deployments (the default page), GET
   /v1/deployments?marker=<the deployment in the middle of the list's order>, GET
   /v1/clouds, GET /v1/applications; every answer must be a 200 and the first of each
   a full page with a next link. Rounds interleave the stacks (small, large, then
   large, small, ...): a stack's turn is ``--requests`` requests of each endpoint,
   the endpoints alternating, after two unrecorded cheap ones (GET /v1, one
   deployment); an endpoint that used ``--turn-budget`` seconds in a turn is asked no
   more in it (a list that takes seconds gets fewer samples, at least one a turn),
   and a request gets REQUEST_TIMEOUT seconds (one that times out counts as that
   long, and is counted). The stacks not taking their turn are stopped (SIGSTOP,
   SIGCONT after): on a two-core machine the others' monitor sampling would otherwise
   run during the one measured. p50 and p95 of each endpoint over all turns; the goal
   is p95 at ROWS large / p95 at ROWS small <= 2. ``--no-monitor`` (a diagnosis, not
   production) stops each stack's API monitor once started: what the lists cost
   without its sampling of every cloud each second.
b) ``--guests`` (root): the multi-host harness (tests/multihost/cluster.py) with 2
   compute hosts, a gateway host running ``vmcloud gateway``, a client host and
   ``vmcloud api`` on the controller; application ``hold`` (TCP, the test guest's
   ``vmcloud.tcp_hold`` service), 2 TCG instances in cloud ``stream``. Three pollers
   run on the controller, each a process asking every 20 ms (start to start) and
   printing each change with its time (CLOCK_MONOTONIC, one clock for every process
   of the machine): the gateway itself over its RPC (``GatewayAPI.connections``, the
   baseline), the dispatcher (``DispatcherAPI.gateway_connections``, what the API
   asks) and GET /v1/monitoring/connections with a token. Each round opens one
   connection from the client host through the gateway, then waits until each
   poller saw it (delay: from connect() returning at the client to the first answer
   naming it), reads its first line, closes it (until the gateway closed its side)
   and waits until each poller saw it gone. p50/p95/max; the goal is the API's
   appear p95 <= 1 s; the ratio API/gateway is what the API adds.
"""
import argparse
import datetime
import json
import os
import random
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

if __package__ in (None, ''):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from oslo_config import cfg  # noqa: E402

import vmcloud.conf  # noqa: E402,F401 - registers options
from benchmarks import common  # noqa: E402

CONF = cfg.CONF
SCRIPT = os.path.abspath(__file__)
READY = 'VMCLOUD-API-BENCH-READY'
USER = 'bench'
# Long enough for argon2 and the API's own rules (8 characters at least).
PASSWORD = 'bench-password-1'
# The stacks' instances live on a host that never registers: nothing reconciles them.
ARCHIVE_HOST = 'bench-archive'
INSERT_CHUNK = 5000
# A stack fills its database and starts in this long (100,000 rows of each kind into
# PostgreSQL take about a minute on the CI machine).
WORKER_TIMEOUT = 900.0
# A list request slower than this is recorded as this long (a lower bound).
REQUEST_TIMEOUT = 120.0
# A stopped stack must not come back to a dispatcher that marked its host silent.
SERVICE_DOWN_TIME = 3600
# What a resumed stack gets before its turn: its threads catch up first.
RESUME_SETTLE = 1.0
# A stack process above this is a leak worth stopping for (the machine has others).
MAX_WORKER_RSS = 4 * 1024 ** 3
GOAL_RATIO = 2.0
FRESHNESS_GOAL = 1.0
SQLITE, POSTGRES = 'SQLite', 'PostgreSQL'
POSTGRES_URL = 'postgresql+psycopg://vmcloud:vmcloud@127.0.0.1/{database}'
# -- b)
POLL_INTERVAL = 0.02
FRESHNESS_TIMEOUT = 30.0
START_TIMEOUT = 120.0
DEPLOY_TIMEOUT = 600.0
IO_TIMEOUT = 30.0
API_PORT = 8780
CLOUD = 'stream'
APPLICATION = 'hold'
HOLD_PORT = 7000
MEMORY_MIB = 192
GATEWAY_NAME = 'gw'
GATEWAY_POLLER = 'gateway RPC (baseline)'
DISPATCHER_POLLER = 'dispatcher gateway_connections'
API_POLLER = 'API GET /v1/monitoring/connections'
POLLERS = (GATEWAY_POLLER, DISPATCHER_POLLER, API_POLLER)


class BenchError(Exception):
    """A stack or service did not start, or an answer was not what was asked for."""


# -- a) the stacks: one worker process per database ---------------------------------

def cloud_name(i: int) -> str:
    return f'bench-cloud-{i:06d}'


def application_name(i: int) -> str:
    return f'bench-app-{i:06d}'


def fill(db, rows: int) -> str:
    """ROWS clouds, applications and deployments (one active instance each), in bulk.

    :returns: the id of the deployment in the middle of the list's order (newest
        first). :raises: DatabaseError.
    """
    from vmcloud.db import models
    epoch = datetime.datetime(2024, 1, 1)
    ids = [str(uuid.uuid4()) for _ in range(rows)]
    deployments = models.Deployment.__table__
    owned = {'owner': USER} if 'owner' in deployments.c else {}

    def cloud(i):
        return {'name': cloud_name(i), 'connection_limit': 1000, 'created_at': epoch}

    def application(i):
        return {'name': application_name(i), 'image': 'guest', 'boot': '{}',
                'health': '{}', 'vcpus': 1, 'memory_mib': 256, 'port': HOLD_PORT,
                'protocol': 'tcp', 'connection_limit': None, 'created_at': epoch}

    def deployment(i):
        # One second apart: the list's order (created_at, id) is the insertion order.
        return {'id': ids[i], 'image': 'guest:1', 'count': 1, 'min_count': 1, 'vcpus': 1,
                'memory_mib': 256, 'boot': '{}', 'health': '{}', 'state': 'active',
                'reason': '', 'cloud': cloud_name(i), 'application': application_name(i),
                'port': HOLD_PORT, 'protocol': 'tcp', 'listener_port': None,
                'created_at': epoch + datetime.timedelta(seconds=i), **owned}

    def instance(i):
        stamp = epoch + datetime.timedelta(seconds=i)
        return {'id': str(uuid.uuid4()), 'name': f'bench-{i:06d}', 'deployment_id': ids[i],
                'image': 'guest:1', 'host': ARCHIVE_HOST, 'state': 'active', 'reason': '',
                'attempts': 1, 'failed_hosts': '', 'boot_seconds': 1.0, 'fetched_bytes': 0,
                'deadline': None, 'created_at': stamp, 'updated_at': stamp}

    with db.engine.begin() as connection:
        for table, make in ((models.Cloud.__table__, cloud),
                            (models.Application.__table__, application),
                            (deployments, deployment), (models.Instance.__table__, instance)):
            for start in range(0, rows, INSERT_CHUNK):
                connection.execute(table.insert(), [
                    make(i) for i in range(start, min(rows, start + INSERT_CHUNK))])
    return ids[rows - 1 - rows // 2]


def stack_worker(spec: dict) -> None:
    """Fill the database, start the dispatcher and the API, say where, and stop both
    when stdin closes."""
    from vmcloud import allinone
    from vmcloud.api import app
    from vmcloud.api import auth
    from vmcloud.db import api as db_api
    CONF([], project='vmcloud', default_config_files=[])
    CONF.set_override('state_path', spec['state_dir'])
    CONF.set_override('connection', spec['database'], 'database')
    CONF.set_override('agent', 'fake', 'network')
    CONF.set_override('service_down_time', SERVICE_DOWN_TIME)
    started = time.perf_counter()
    db = db_api.Database(CONF)
    db.upgrade()
    marker = fill(db, spec['rows'])
    filled = time.perf_counter() - started
    auth.Identity(CONF, db).create_user(USER, PASSWORD, 'admin')
    db.dispose()
    cloud = allinone.AllInOne(CONF, hosts=1, driver='fake')
    cloud.start()
    try:
        server = app.ApiServer(CONF, port=0)
        server.start()
        if not spec['monitor']:
            server.services.monitor.stop()
        try:
            print(json.dumps({'ready': READY, 'url': server.url, 'marker': marker,
                              'fill_seconds': filled}), flush=True)
            sys.stdin.read()
        finally:
            server.stop()
    finally:
        cloud.stop()


def percentile(values: list[float], fraction: float) -> float:
    """The ``fraction`` quantile of ``values``, interpolated between the nearest ranks."""
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def read_ready(process: subprocess.Popen, timeout: float, log: str, what: str) -> dict:
    """The worker's ready line.

    :raises: BenchError with the tail of its log if it exits, or says nothing in time.
    """
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchError(f'{what} did not start in {timeout:g} s:\n{tail(log)}')
        readable, _, _ = select.select([process.stdout], [], [], min(remaining, 1.0))
        if readable:
            line = process.stdout.readline()
            if not line:
                process.wait(10)
                raise BenchError(f'{what} exited ({process.returncode}):\n{tail(log)}')
            if READY in line:
                return json.loads(line)
        elif process.poll() is not None:
            raise BenchError(f'{what} exited ({process.returncode}):\n{tail(log)}')


def tail(path: str, size: int = 3000) -> str:
    try:
        with open(path, 'rb') as f:
            f.seek(max(0, os.path.getsize(path) - size))
            return f.read().decode('utf-8', 'replace')
    except OSError as exc:
        return f'(no log: {exc})'


def rss_bytes(pid: int) -> int:
    try:
        with open(f'/proc/{pid}/status') as f:
            for line in f:
                if line.startswith('VmRSS:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (all its threads)."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            fields = f.read().rpartition(')')[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


class Stack:
    """One worker process: a dispatcher and the API over a database of ROWS rows."""

    def __init__(self, backend: str, rows: int, database: str, state_dir: str,
                 monitor: bool = True):
        self.backend = backend
        self.rows = rows
        self.name = f'{backend} {rows:,}'
        self.state_dir = state_dir
        self.log = os.path.join(self.state_dir, 'worker.log')
        spec = {'state_dir': self.state_dir, 'rows': rows, 'database': database,
                'monitor': monitor}
        with open(self.log, 'w') as log:
            # A session of its own: a signal meant for its process group is not this
            # process's.
            self.process = subprocess.Popen(
                [sys.executable, SCRIPT, '--stack-worker', json.dumps(spec)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                cwd=common.REPO, start_new_session=True)
        self.client = None
        self.ready: dict = {}
        self.samples: dict[str, list[float]] = {}
        self.timeouts: dict[str, int] = {}
        self.idle_cpu = 0.0

    def wait_ready(self) -> None:
        """The stack up and logged in to.

        :raises: BenchError.
        """
        import httpx
        self.ready = read_ready(self.process, WORKER_TIMEOUT, self.log, self.name)
        self.client = httpx.Client(base_url=self.ready['url'], timeout=REQUEST_TIMEOUT)
        answer = self.client.post('/v1/auth/tokens',
                                  json={'username': USER, 'password': PASSWORD})
        if answer.status_code != 201:
            raise BenchError(f'{self.name}: login answered {answer.status_code}: '
                             f'{answer.text[:2000]}')
        self.client.headers['X-Auth-Token'] = answer.json()['token']['id']

    def endpoints(self) -> dict[str, tuple[str, dict]]:
        return {'GET /v1/deployments': ('/v1/deployments', {}),
                'GET /v1/deployments?marker=(middle)': (
                    '/v1/deployments', {'marker': self.ready['marker']}),
                'GET /v1/clouds': ('/v1/clouds', {}),
                'GET /v1/applications': ('/v1/applications', {})}

    def get(self, path: str, params: dict) -> tuple[float, object]:
        """One request. :returns: (seconds, the answer). :raises: BenchError if not 200
        or the stack process is gone."""
        import httpx
        started = time.perf_counter()
        try:
            answer = self.client.get(path, params=params)
        except httpx.TransportError as exc:
            if self.process.poll() is None:
                raise
            raise BenchError(f'{self.name}: the stack process ended '
                             f'({self.process.returncode}):\n{tail(self.log)}') from exc
        elapsed = time.perf_counter() - started
        if answer.status_code != 200:
            raise BenchError(f'{self.name}: GET {path} {params} answered '
                             f'{answer.status_code}: {answer.text[:2000]}')
        return elapsed, answer

    def check_pages(self) -> None:
        """Each endpoint's first answer is a full page with a next link.

        :raises: BenchError.
        """
        for label, (path, params) in self.endpoints().items():
            body = self.get(path, params)[1].json()
            collection = path.rsplit('/', 1)[1]
            if not body.get(collection) or not body.get(f'{collection}_links'):
                raise BenchError(f'{self.name}: {label} is not a page with a next link: '
                                 f'{json.dumps(body)[:2000]}')

    def measure_idle_cpu(self, seconds: float) -> None:
        """The CPU the stack takes doing nothing asked (its monitor, heartbeats)."""
        before = cpu_seconds(self.process.pid)
        time.sleep(seconds)
        self.idle_cpu = (cpu_seconds(self.process.pid) - before) / seconds

    def turn(self, requests: int, budget: float) -> None:
        """Two cheap unrecorded requests (the connection and the token warm again), then
        up to ``requests`` of each endpoint, the endpoints alternating, each until it
        used ``budget`` seconds of the turn.

        :raises: BenchError (an answer not 200).
        """
        import httpx
        self.get('/v1', {})
        self.get('/v1/deployments', {'limit': 1})
        spent = dict.fromkeys(self.endpoints(), 0.0)
        for _ in range(requests):
            for label, (path, params) in self.endpoints().items():
                if spent[label] >= budget:
                    continue
                try:
                    elapsed = self.get(path, params)[0]
                except httpx.TimeoutException:
                    elapsed = REQUEST_TIMEOUT
                    self.timeouts[label] = self.timeouts.get(label, 0) + 1
                spent[label] += elapsed
                self.samples.setdefault(label, []).append(elapsed)

    def pause(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def check_memory(self) -> int:
        """:returns: its resident size. :raises: BenchError above MAX_WORKER_RSS."""
        rss = rss_bytes(self.process.pid)
        if rss > MAX_WORKER_RSS:
            raise BenchError(f'{self.name}: the stack process holds {common.mib(rss)}, '
                             f'more than {common.mib(MAX_WORKER_RSS)}')
        return rss

    def close(self) -> None:
        """Stop the worker (bounded), remove its state. Never raises."""
        if self.client is not None:
            self.client.close()
        if self.process.poll() is None:
            try:
                self.resume()
                self.process.stdin.close()
                self.process.wait(START_TIMEOUT)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait(10)
        shutil.rmtree(self.state_dir, ignore_errors=True)


def postgres_database(rows: int) -> str | None:
    """A PostgreSQL database of this run's own (owner vmcloud), or None if the server
    or the rights to make one are missing."""
    if os.geteuid() != 0 or shutil.which('pg_isready') is None:
        return None
    if subprocess.run(['pg_isready', '-q'], capture_output=True).returncode != 0:
        return None
    name = f'vmcloud_bench_api_{os.getpid()}_{rows}'
    done = subprocess.run(['su', 'postgres', '-c', f'createdb -O vmcloud {name}'],
                          capture_output=True, text=True, timeout=60)
    return name if done.returncode == 0 else None


def drop_database(name: str) -> None:
    subprocess.run(['su', 'postgres', '-c', f'dropdb --force --if-exists {name}'],
                   capture_output=True, timeout=60)


def run_lists(args) -> tuple[list[Stack], dict[str, str]]:
    """Every stack measured; :returns: the stacks (closed) and facts."""
    root = tempfile.mkdtemp(dir=os.path.join(common.REPO, '.cache'))
    databases: list[str] = []
    stacks: list[Stack] = []
    facts = {}
    try:
        specs = [(SQLITE, rows, None) for rows in (args.small, args.large)]
        if not args.no_postgres:
            for rows in (args.small, args.large):
                name = postgres_database(rows)
                if name is None:
                    facts['PostgreSQL'] = ('skipped: no server answering pg_isready, or '
                                           'no right to createdb (root runs su postgres)')
                    break
                databases.append(name)
                specs.append((POSTGRES, rows, POSTGRES_URL.format(database=name)))
            else:
                facts['PostgreSQL'] = ('the machine\'s server (tools/start-services.sh), '
                                       'a database per stack, dropped afterwards')
        else:
            facts['PostgreSQL'] = 'skipped (--no-postgres)'
        if len(specs) == 3:  # one PostgreSQL database made, the other not
            specs.pop()
        for backend, rows, url in specs:
            state_dir = tempfile.mkdtemp(dir=root)
            url = url or f'sqlite:///{state_dir}/vmcloud.sqlite'
            stacks.append(Stack(backend, rows, url, state_dir, monitor=not args.no_monitor))
        for stack in stacks:
            stack.wait_ready()
            stack.check_pages()
            print(f'  {stack.name}: up, filled in {stack.ready["fill_seconds"]:.1f} s',
                  flush=True)
        for stack in stacks:
            stack.pause()
        for stack in stacks:
            stack.resume()
            time.sleep(RESUME_SETTLE)
            stack.measure_idle_cpu(args.idle_seconds)
            stack.pause()
        for number in range(args.rounds):
            order = stacks if number % 2 == 0 else list(reversed(stacks))
            for stack in order:
                stack.resume()
                time.sleep(RESUME_SETTLE)
                try:
                    stack.turn(args.requests, args.turn_budget)
                    stack.check_memory()
                finally:
                    stack.pause()
            print(f'  round {number + 1}/{args.rounds} done', flush=True)
        facts['stack processes, resident at the end'] = ', '.join(
            f'{s.name}: {common.mib(rss_bytes(s.process.pid))}' for s in stacks)
        timeouts = [f'{s.name} {label}: {n}' for s in stacks for label, n in s.timeouts.items()]
        facts[f'requests over {REQUEST_TIMEOUT:g} s (counted as {REQUEST_TIMEOUT:g} s)'] = (
            ', '.join(timeouts) or 'none')
        return stacks, facts
    finally:
        for stack in stacks:
            stack.close()
        for name in databases:
            drop_database(name)
        shutil.rmtree(root, ignore_errors=True)


def ms(value: float) -> str:
    return f'{value * 1e3:.2f}'


def list_rows(stacks: list[Stack]) -> list[dict]:
    """Per backend and endpoint: p50/p95 small and large, the p95 ratio."""
    results = []
    backends = sorted({s.backend for s in stacks}, key=[SQLITE, POSTGRES].index)
    for backend in backends:
        small, large = sorted((s for s in stacks if s.backend == backend),
                              key=lambda s: s.rows)
        for label in small.samples:
            a, b = small.samples[label], large.samples[label]
            ratio = percentile(b, 0.95) / percentile(a, 0.95)
            results.append({
                'backend': backend, 'endpoint': label, 'small': small.rows,
                'large': large.rows, 'n': f'{len(a)} / {len(b)}',
                'p50_small': statistics.median(a), 'p95_small': percentile(a, 0.95),
                'p50_large': statistics.median(b), 'p95_large': percentile(b, 0.95),
                'ratio': ratio, 'met': ratio <= GOAL_RATIO})
    return results


def lists_table(rows: list[dict]) -> str:
    if not rows:
        return '(no stack measured)'
    small, large = f'{rows[0]["small"]:,}', f'{rows[0]["large"]:,}'
    return common.table(
        ('database', 'endpoint', 'samples', f'p50 ms {small}', f'p95 ms {small}',
         f'p50 ms {large}', f'p95 ms {large}', f'p95 {large} / {small}',
         f'goal <= {GOAL_RATIO:g}'),
        [(r['backend'], r['endpoint'], r['n'], ms(r['p50_small']), ms(r['p95_small']),
          ms(r['p50_large']), ms(r['p95_large']), f'{r["ratio"]:.3f}',
          'met' if r['met'] else 'NOT met') for r in rows])


def idle_table(stacks: list[Stack]) -> str:
    return common.table(('stack', 'CPU busy while idle (cores)'),
                        [(s.name, f'{s.idle_cpu:.3f}') for s in stacks])


# -- b) monitoring freshness: pollers on the controller -------------------------------

def poll_worker(spec: dict) -> None:
    """Ask ``spec['kind']`` for the cloud's connections every POLL_INTERVAL s (start to
    start) and print each change as {'at': monotonic, 'keys': [[client, port]...]} (or
    {'at', 'error'}), until stdin closes."""
    look = _looker(spec)
    stopping = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stopping.set()), daemon=True).start()
    last = None
    ready = False
    while not stopping.is_set():
        started = time.monotonic()
        try:
            seen = sorted(look())
            error = None
        except Exception as exc:  # reported, and asked again: a poll may fail
            seen, error = None, f'{type(exc).__name__}: {exc}'
        at = time.monotonic()
        if error is not None:
            print(json.dumps({'at': at, 'error': error[:500]}), flush=True)
        else:
            if not ready:
                print(READY, flush=True)
                ready = True
            if seen != last:
                print(json.dumps({'at': at, 'keys': seen}), flush=True)
        last = seen
        stopping.wait(max(0.0, started + spec['interval'] - time.monotonic()))


def _looker(spec: dict):
    """What one poll of ``spec['kind']`` asks: :returns: a function answering the
    (client, client_port) of the cloud's connections."""
    def keys(records):
        return [(r['client'], int(r['client_port'])) for r in records]

    if spec['kind'] == 'api':
        import httpx
        client = httpx.Client(base_url=spec['url'], timeout=IO_TIMEOUT)
        answer = client.post('/v1/auth/tokens',
                             json={'username': spec['username'], 'password': spec['password']})
        answer.raise_for_status()
        client.headers['X-Auth-Token'] = answer.json()['token']['id']

        def look():
            answer = client.get('/v1/monitoring/connections', params={'cloud': spec['cloud']})
            answer.raise_for_status()
            return keys(answer.json()['connections'])
        return look
    CONF(['--config-file', spec['config']], project='vmcloud', default_config_files=[])
    if spec['kind'] == 'gateway':
        from vmcloud.gateway import rpcapi as gateway_rpcapi
        gateway = gateway_rpcapi.GatewayAPI(CONF)
        return lambda: keys(gateway.connections(spec['server'], cloud=spec['cloud'],
                                                timeout=IO_TIMEOUT))
    from vmcloud.dispatcher import rpcapi as dispatcher_rpcapi
    dispatcher = dispatcher_rpcapi.DispatcherAPI(CONF)
    return lambda: keys(dispatcher.gateway_connections(spec['cloud']))


class Poller:
    """A poll worker on a host of the cloud, and what it reported so far."""

    def __init__(self, name: str, host, spec: dict):
        self.name = name
        self.log = os.path.join(host.state_dir, f'poller-{spec["kind"]}.log')
        with open(self.log, 'w') as log:
            self.process = host.popen(
                [sys.executable, SCRIPT, '--poll-worker', json.dumps(spec)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                cwd=common.REPO)
        self.changes: list[tuple[float, frozenset]] = []
        self.errors: list[str] = []
        self.ready = threading.Event()
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            if READY in line:
                self.ready.set()
                continue
            try:
                change = json.loads(line)
            except ValueError:
                continue
            with self.changed:
                if 'error' in change:
                    self.errors.append(change['error'])
                else:
                    self.changes.append((change['at'], frozenset(
                        (client, port) for client, port in change['keys'])))
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def wait_ready(self, timeout: float) -> None:
        """:raises: BenchError if it has not answered once within ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.2):
            if self.process.poll() is not None or time.monotonic() >= deadline:
                raise BenchError(f'poller {self.name} never answered; errors '
                                 f'{self.errors[-3:]}; its log ends:\n{tail(self.log)}')

    def wait_for(self, since: float, present: bool, key: tuple[str, int],
                 timeout: float) -> float | None:
        """When it first answered with ``key`` present (or absent) at or after ``since``
        (``since`` itself if its last answer before already did).

        :returns: that monotonic time, None if not within ``timeout`` s.
        """
        deadline = since + timeout
        with self.changed:
            while True:
                earlier = [keys for at, keys in self.changes if at < since]
                if earlier and (key in earlier[-1]) == present:
                    return since
                later = [at for at, keys in self.changes
                         if at >= since and (key in keys) == present]
                if later:
                    return later[0]
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.process.poll() is not None:
                    return None
                self.changed.wait(remaining)

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.close()
                self.process.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
        self.reader.join(10)


def read_line(sock) -> str:
    data = b''
    while not data.endswith(b'\n'):
        chunk = sock.recv(256)
        if not chunk:
            return ''
        data += chunk
    return data.decode('utf-8', 'replace').strip()


def close_connection(sock) -> None:
    """Close, and wait (IO_TIMEOUT) until the gateway closed its side too."""
    try:
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(4096):
            pass
    except OSError:
        pass
    finally:
        sock.close()


class FreshnessBench:
    """The multi-host cloud: a TCP application behind the gateway, the API on the
    controller, three pollers."""

    def __init__(self, cloud, args):
        self.cloud = cloud
        self.args = args
        self.pollers: dict[str, Poller] = {}
        self.facts: dict[str, str] = {}

    def prepare(self) -> None:
        """:raises: ClusterError, NetnsError, BenchError."""
        from tests import guest
        cloud = self.cloud
        cloud.import_guest()
        cloud.start_compute('node1')
        cloud.start_compute('node2')
        cloud.wait_host_states({'node1': 'up', 'node2': 'up'})
        self.gateway = cloud.start_gateway(GATEWAY_NAME)
        self.client = cloud.add_client('client')
        cloud.cli_json('cloud', 'create', CLOUD, '--connection-limit', '1000',
                       '--host', 'node1', '--host', 'node2')
        cmdline = f'{guest.CMDLINE} vmcloud.id={{name}} vmcloud.tcp_hold={HOLD_PORT}'
        cloud.cli_json('app', 'create', APPLICATION, '--image', 'guest', '--port',
                       str(HOLD_PORT), '--protocol', 'tcp', '--memory', str(MEMORY_MIB),
                       '--kernel', 'guest-kernel', '--initrd', 'guest-initrd',
                       '--cmdline', cmdline, '--health', f'tcp:{HOLD_PORT}')
        deployed = cloud.cli_json('app', 'deploy', APPLICATION, '--cloud', CLOUD, '-n', '2',
                                  '--wait', '--timeout', str(int(DEPLOY_TIMEOUT)),
                                  timeout=DEPLOY_TIMEOUT + 60)
        if deployed.get('state') != 'active' or not deployed.get('listener_port'):
            raise BenchError(f'{APPLICATION} not deployed behind a listener: {deployed}')
        self.listener_port = deployed['listener_port']
        cloud.wait_for(f'{APPLICATION} to answer through the gateway', self.answers_once,
                       lambda seen: seen is True, START_TIMEOUT, interval=0.5)
        url = self.start_api()
        controller = cloud.controller
        specs = {GATEWAY_POLLER: {'kind': 'gateway', 'config': cloud.cli_config,
                                  'server': GATEWAY_NAME},
                 DISPATCHER_POLLER: {'kind': 'dispatcher', 'config': cloud.cli_config},
                 API_POLLER: {'kind': 'api', 'url': url, 'username': USER,
                              'password': PASSWORD}}
        for name, spec in specs.items():
            self.pollers[name] = Poller(name, controller, dict(
                spec, cloud=CLOUD, interval=POLL_INTERVAL))
        for poller in self.pollers.values():
            poller.wait_ready(START_TIMEOUT)

    def start_api(self) -> str:
        """``vmcloud api`` on the controller and an admin user. :returns: its URL.

        :raises: ClusterError, BenchError.
        """
        cloud = self.cloud
        if hasattr(cloud, 'start_api'):
            cloud.start_api()
            cloud.create_api_user(USER, PASSWORD, 'admin')
            self.facts['API'] = ('Cluster.start_api: vmcloud api on the controller, the '
                                 'dispatcher\'s config (PostgreSQL over TCP)')
            return cloud.api_url
        # A harness of before start_api: the same by hand.
        controller = cloud.controller
        with open(cloud.cli_config) as f:
            text = f.read()
        config = cloud._write(controller, 'api.conf', text + (
            f'\n[api]\nlisten_address = {controller.address}\nport = {API_PORT}\n'))
        service = cloud.start_service('api', controller, cloud._vmcloud(config, 'api'), '',
                                      START_TIMEOUT)
        cloud._wait_tcp(service, API_PORT, START_TIMEOUT)
        password_file = os.path.join(controller.state_dir, 'bench-password')
        with open(password_file, 'w') as f:
            f.write(PASSWORD)
        done = cloud.cli('user', 'create', USER, '--role', 'admin',
                         '--password-file', password_file)
        if done.returncode != 0:
            raise BenchError(f'vmcloud user create failed ({done.returncode}): '
                             f'{done.stderr.strip()[-2000:]}')
        self.facts['API'] = 'vmcloud api on the controller, started by this benchmark'
        return f'http://{controller.address}:{API_PORT}'

    def answers_once(self) -> bool | str:
        try:
            sock = self.client.connect(self.gateway.address, self.listener_port, IO_TIMEOUT)
        except OSError as exc:
            return repr(exc)
        try:
            line = read_line(sock)
        except OSError as exc:
            line = repr(exc)
        close_connection(sock)
        return True if line.split()[:1] and not line.startswith('ConnectionReset') else line

    def round(self) -> dict[str, dict[str, float | None]]:
        """One connection opened, seen, closed, seen gone. :returns: poller -> {'appear',
        'gone'} delays (s), None where not seen within FRESHNESS_TIMEOUT.

        :raises: OSError, BenchError (the connection was not served).
        """
        # Off the pollers' and the API's monitor phase.
        time.sleep(random.uniform(0, 0.25))
        sock = self.client.connect(self.gateway.address, self.listener_port, IO_TIMEOUT)
        opened = time.monotonic()
        key = sock.getsockname()[:2]
        found = {}
        try:
            line = read_line(sock)
            if not line:
                raise BenchError('the gateway closed a connection it should serve')
            for name, poller in self.pollers.items():
                seen = poller.wait_for(opened, True, key, FRESHNESS_TIMEOUT)
                found[name] = {'appear': None if seen is None else seen - opened}
        finally:
            close_connection(sock)
            closed = time.monotonic()
        for name, poller in self.pollers.items():
            gone = poller.wait_for(closed, False, key, FRESHNESS_TIMEOUT)
            found[name]['gone'] = None if gone is None else gone - closed
        return found

    def measure(self) -> dict[str, dict[str, list[float | None]]]:
        results = {name: {'appear': [], 'gone': []} for name in self.pollers}
        for number in range(self.args.freshness_rounds):
            for name, delays in self.round().items():
                for what, delay in delays.items():
                    results[name][what].append(delay)
            if (number + 1) % 10 == 0:
                print(f'  freshness round {number + 1}/{self.args.freshness_rounds}',
                      flush=True)
        self.facts['poll errors'] = ', '.join(
            f'{name}: {len(p.errors)}' + (f' (last: {p.errors[-1]})' if p.errors else '')
            for name, p in self.pollers.items())
        return results

    def close(self) -> None:
        for poller in self.pollers.values():
            poller.close()


def summary(delays: list[float | None]) -> dict:
    seen = [d for d in delays if d is not None]
    return {'n': len(delays), 'missed': len(delays) - len(seen),
            'p50': statistics.median(seen) if seen else None,
            'p95': percentile(seen, 0.95) if seen else None,
            'max': max(seen) if seen else None}


def seconds_text(value: float | None) -> str:
    return '-' if value is None else f'{value:.3f}'


def freshness_table(results: dict[str, dict[str, list]]) -> tuple[str, list[tuple]]:
    """The delays table, and the goal rows."""
    base = {what: summary(results[GATEWAY_POLLER][what]) for what in ('appear', 'gone')}
    rows = []
    for name, delays in results.items():
        cells = [name]
        for what in ('appear', 'gone'):
            s = summary(delays[what])
            ratio = (s['p95'] / base[what]['p95'] if s['p95'] is not None
                     and base[what]['p95'] else None)
            cells += [seconds_text(s['p50']), seconds_text(s['p95']), seconds_text(s['max']),
                      '-' if ratio is None else f'{ratio:.2f}', str(s['missed'])]
        rows.append(cells)
    table = common.table(
        ('where it is seen', 'appear p50 s', 'appear p95 s', 'appear max s',
         'appear p95 / gateway', 'appear missed', 'gone p50 s', 'gone p95 s', 'gone max s',
         'gone p95 / gateway', 'gone missed'), rows)
    api = summary(results[API_POLLER]['appear'])
    met = api['p95'] is not None and api['p95'] <= FRESHNESS_GOAL and not api['missed']
    goal = ('monitoring freshness p95 (connect at the client -> in GET '
            '/v1/monitoring/connections)', f'<= {FRESHNESS_GOAL:g} s',
            f'{seconds_text(api["p95"])} s ({api["missed"]} of {api["n"]} not seen in '
            f'{FRESHNESS_TIMEOUT:g} s)', 'met' if met else 'NOT met')
    return table, [goal]


def run_guests(args) -> tuple[str, list[tuple], dict[str, str]]:
    from tests.multihost import cluster
    with cluster.Cluster() as cloud:
        bench = FreshnessBench(cloud, args)
        try:
            bench.prepare()
            results = bench.measure()
        finally:
            bench.close()
    table, goals = freshness_table(results)
    return table, goals, bench.facts


# -- main ---------------------------------------------------------------------------

def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rounds', type=int, default=10,
                        help='rounds; each gives every stack one turn')
    parser.add_argument('--requests', type=int, default=50,
                        help='requests of each endpoint in a stack\'s turn')
    parser.add_argument('--turn-budget', type=float, default=10.0,
                        help='seconds an endpoint may take of a stack\'s turn')
    parser.add_argument('--small', type=int, default=1000, help='rows of the small stacks')
    parser.add_argument('--large', type=int, default=100000,
                        help='rows of the large stacks')
    parser.add_argument('--idle-seconds', type=float, default=5.0,
                        help='how long each stack\'s idle CPU is measured')
    parser.add_argument('--no-postgres', action='store_true',
                        help='SQLite stacks only')
    parser.add_argument('--no-monitor', action='store_true',
                        help='the stacks\' API monitor stopped once started (a diagnosis: '
                             'what the lists cost without its sampling)')
    parser.add_argument('--guests', action='store_true',
                        help='also monitoring freshness on a multi-host cloud with 2 TCG '
                             'guests behind a gateway (root; minutes)')
    parser.add_argument('--freshness-rounds', type=int, default=40,
                        help='connections opened and closed, one at a time')
    parser.add_argument('--quick', action='store_true',
                        help='10,000 rows for the large stacks, 2 rounds of 10 requests, '
                             '5 freshness rounds')
    parser.add_argument('--stack-worker', help=argparse.SUPPRESS)
    parser.add_argument('--poll-worker', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.large, args.rounds, args.requests = 10000, 2, 10
        args.freshness_rounds, args.idle_seconds = 5, 2.0
    if min(args.rounds, args.requests, args.freshness_rounds) < 1 or args.small < 200 \
            or args.large <= args.small or args.turn_budget <= 0:
        parser.error('--rounds, --requests, --freshness-rounds, --turn-budget must be '
                     'positive; --small at least 200 (two pages), --large above it')
    return args


def main() -> int:
    args = parse_arguments()
    if args.stack_worker:
        stack_worker(json.loads(args.stack_worker))
        return 0
    if args.poll_worker:
        poll_worker(json.loads(args.poll_worker))
        return 0

    def terminate(signum, frame):
        print(f'benchmarks/api.py: stopped by signal {signum} at '
              f'{time.strftime("%H:%M:%S")}; cleaning up', file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, terminate)
    facts = common.machine()
    del facts['page cache dropped between runs']  # nothing here reads a cold file
    load_before = os.getloadavg()[0]
    stacks, list_facts = run_lists(args)
    rows = list_rows(stacks)
    goals = [(f'{r["backend"]} {r["endpoint"]} p95 {r["large"]:,} rows / {r["small"]:,}',
              f'<= {GOAL_RATIO:g}', f'{r["ratio"]:.3f} ({ms(r["p95_large"])} ms vs '
              f'{ms(r["p95_small"])} ms)', 'met' if r['met'] else 'NOT met') for r in rows]
    lists_body = lists_table(rows)
    sections = [
        ('List latency',
         f'Client-side, {args.rounds} rounds of up to {args.requests} requests of each '
         f'endpoint per stack, each endpoint at most {args.turn_budget:g} s of a turn '
         '(samples: small / large stack); the default page (100 items) of each list, and '
         'of deployments also from a marker in the middle of the rows.\n\n'
         + lists_body),
        ('Stacks at rest',
         'CPU each stack process used over a few seconds with no request (dispatcher '
         'heartbeats, the API\'s monitor sampling every [api] monitor_interval), before '
         'the rounds.\n\n' + idle_table(stacks))]
    for heading, body in sections:
        print(f'\n{heading}\n{body}', flush=True)
    if args.guests:
        freshness_body, freshness_goals, guest_facts = run_guests(args)
        goals += freshness_goals
        list_facts.update(guest_facts)
        print(f'\nMonitoring freshness\n{freshness_body}', flush=True)
        sections.append((
            'Monitoring freshness: 2 TCG guests behind vmcloud\'s gateway',
            f'{args.freshness_rounds} connections from the client host through the '
            'gateway to the ``vmcloud.tcp_hold`` service, one at a time; each poller on '
            f'the controller asks every {POLL_INTERVAL * 1e3:g} ms. Appear: from '
            'connect() returning at the client to the first answer naming the '
            'connection; gone: from the close done (the gateway closed its side) to the '
            'first answer without it. "/ gateway": p95 over the gateway\'s own p95 in '
            'the same rounds.\n\n' + freshness_body))
    else:
        list_facts['monitoring freshness'] = 'not measured (run with --guests, as root)'
    goals_body = common.table(('goal', 'target', 'measured', ''), goals)
    print(f'\nGoals\n{goals_body}', flush=True)
    sections.insert(0, ('Goals', goals_body))
    facts.update({
        'rows': f'{args.small:,} and {args.large:,} each of clouds, applications and '
                'deployments (one active instance each), SQLAlchemy core bulk inserts',
        'stack': 'one process per database: AllInOne (fake driver, fake network agent, '
                 '1 host, fake:// transport) + ApiServer (uvicorn) on 127.0.0.1, its monitor '
                 + ('stopped (--no-monitor)' if args.no_monitor else
                    'sampling every [api] monitor_interval as in production'),
        'client': 'httpx, one keep-alive connection per stack, X-Auth-Token of an admin',
        'rounds': f'{args.rounds}, stacks interleaved (forward, then reversed); the '
                  'stacks not in their turn stopped (SIGSTOP)',
        'percentiles': 'linear interpolation between the nearest ranks',
        'load average (1 min) at the start, at the end':
            f'{load_before:.2f}, {os.getloadavg()[0]:.2f} (other work on the machine '
            'shares its cores)',
        **list_facts})
    path = common.write_results('api', 'The admin REST API', sections, facts)
    print(f'written to {os.path.relpath(path, common.REPO)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
