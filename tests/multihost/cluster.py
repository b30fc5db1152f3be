"""A vmcloud cloud on emulated hosts: a controller and compute hosts, each a network
namespace of netns.Network with its own state directory and config files.

    with cluster.Cluster() as cloud:
        cloud.start_compute('node1')
        cloud.start_compute('node2')
        cloud.wait_hosts_up(['node1', 'node2'])
        cloud.cli_json('image', 'import', path, 'guest', '--format', 'raw')

What runs where:

- controller (``ctl``, its link shaped to ``rate``): a private RabbitMQ (its own
  Erlang node, mnesia, logs, cookie and epmd, a login ``vmcloud`` allowed from other
  hosts), a private PostgreSQL cluster (initdb into the controller's state directory,
  listening on the controller's address only, password login), ``vmcloud warehouse``
  (file backend in the controller's state directory, bearer token), ``vmcloud
  dispatcher`` (PostgreSQL over TCP, RabbitMQ and the warehouse service at the
  controller's address) and every ``vmcloud`` CLI command of the test.
- compute hosts (``node1``...): ``vmcloud compute`` with the qemu driver, ``[storage]
  backend = http`` to the controller, ``transport_url`` to the controller's RabbitMQ,
  every path option under the host's own state directory. Their guests are qemu
  children of the service, so they run inside the host's namespace too.

Each host's config files live in its state directory and name no path outside it
(``assert_nothing_shared`` checks). Nothing of the machine's own RabbitMQ, PostgreSQL
or /var/lib/vmcloud is used: the namespaces have no route out, and the two servers'
unix sockets and data live in the controller's state directory. Every start is a
bounded wait that fails as soon as the process exits, with the tail of its log;
``logs()`` names every service's log for a test to attach. Closing stops the
services in reverse order of their start (compute services destroy their guests),
then the Network kills whatever is left in the namespaces and removes them and
every state directory, also when the block fails.
"""
import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from typing import Callable, Sequence

from vmcloud.drivers import console
from tests.multihost import netns

RABBITMQ_SERVER = '/usr/lib/rabbitmq/bin/rabbitmq-server'
POSTGRES_ROOT = '/usr/lib/postgresql'
RABBITMQ_PORT = 5672
POSTGRES_PORT = 5432
WAREHOUSE_PORT = 9494
USER = 'vmcloud'
# RabbitMQ boots its Erlang node and mnesia in about 8-10 s on the CI machine.
RABBITMQ_TIMEOUT = 90.0
# initdb and the server start in about a second each; generous for a loaded machine.
POSTGRES_TIMEOUT = 90.0
SERVICE_TIMEOUT = 90.0
CLI_TIMEOUT = 300.0
LOG_TAIL = 3000
# Fast heartbeats: a compute host that stopped is marked down in seconds.
HEARTBEAT_INTERVAL = 1
SERVICE_DOWN_TIME = 5
# [mirror] and [compute] path options a compute host sets under its own state
# directory: every one whose default is under state_path (HarnessTest checks it).
HOST_PATHS = {
    'mirror': {'mirrors_path': 'mirrors', 'cache_path': 'chunk-cache',
               'nbd_socket': 'nbd.sock'},
    'compute': {'instances_path': 'instances', 'boot_artifacts_path': 'boot-artifacts'},
}


class ClusterError(netns.NetnsError):
    """A server or service of the emulated cloud did not start or answer."""


def postgres_bin() -> str:
    """The newest installed PostgreSQL's bin directory.

    :raises: ClusterError if none is installed.
    """
    try:
        versions = sorted((v for v in os.listdir(POSTGRES_ROOT) if v.isdigit()), key=int)
    except OSError as exc:
        raise ClusterError(f'no PostgreSQL server under {POSTGRES_ROOT}: {exc}') from exc
    if not versions:
        raise ClusterError(f'no PostgreSQL server under {POSTGRES_ROOT}')
    return os.path.join(POSTGRES_ROOT, versions[-1], 'bin')


def render(sections: dict[str, dict[str, object]]) -> str:
    """oslo.config INI text of ``sections``."""
    lines = []
    for section, options in sections.items():
        lines.append(f'[{section}]')
        lines += [f'{key} = {value}' for key, value in options.items()]
        lines.append('')
    return '\n'.join(lines)


@dataclasses.dataclass
class Service:
    """A long-running process of the cloud on one host."""
    name: str
    host: netns.Host
    process: subprocess.Popen
    log: str
    # How to stop it gracefully (PostgreSQL: SIGINT is its fast shutdown).
    stop_signal: int = signal.SIGTERM

    def tail(self) -> str:
        try:
            with open(self.log, 'rb') as f:
                f.seek(max(0, os.path.getsize(self.log) - LOG_TAIL))
                return f.read().decode('utf-8', 'replace')
        except OSError as exc:
            return f'(no log: {exc})'

    def stop(self, timeout: float = 60.0) -> None:
        """Signal it and wait (bounded), then SIGKILL its process group. Never raises."""
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, self.stop_signal)
            self.process.wait(timeout)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(netns.STOP_TIMEOUT)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass  # what is left inside the namespace, the Network kills


class Cluster:
    """The controller and its servers, and compute hosts added one by one."""

    def __init__(self, rate: str = '1gbit', state_root: str = netns.DEFAULT_STATE_ROOT,
                 subnet: str = netns.DEFAULT_SUBNET):
        self.rate = rate
        self.network = netns.Network(subnet=subnet, state_root=state_root)
        # Fresh per cloud: nothing of one run can log in to another.
        self.password = secrets.token_hex(12)
        self.token = secrets.token_hex(16)
        self.services: dict[str, Service] = {}
        # Every service's log, also of those stopped since (a failure may be theirs).
        self.log_files: dict[str, str] = {}
        self.computes: dict[str, netns.Host] = {}
        self.configs: dict[str, list[str]] = {}
        self.controller: netns.Host | None = None

    # -- life cycle ---------------------------------------------------------------

    def __enter__(self) -> 'Cluster':
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def open(self) -> None:
        """The network, the controller and its four servers, each waited for.

        :raises: ClusterError (a server did not start: its log's tail), NetnsError.
        """
        self.network.open()
        self.controller = self.network.add_host('ctl', rate=self.rate)
        self.start_rabbitmq()
        self.start_postgres()
        self.start_warehouse()
        self.start_dispatcher()

    def close(self) -> None:
        """Stop every service, newest first, then remove the network. Never raises."""
        for name in reversed(list(self.services)):
            self.services.pop(name).stop()
        self.network.close()

    def logs(self) -> dict[str, str]:
        """Every service's log file, by service name, stopped services' too."""
        return dict(self.log_files)

    def hosts(self) -> dict[str, netns.Host]:
        return dict(self.network.hosts)

    # -- starting things ----------------------------------------------------------

    def _write(self, host: netns.Host, leaf: str, text: str) -> str:
        path = os.path.join(host.state_dir, leaf)
        with open(path, 'w') as f:
            f.write(text)
        self.configs.setdefault(host.name, []).append(path)
        return path

    def start_service(self, name: str, host: netns.Host, argv: Sequence[str], ready: str,
                      timeout: float, env: dict | None = None,
                      sig: int = signal.SIGTERM) -> Service:
        """Start ``argv`` on ``host``, logging to its state directory, and wait until
        its log holds ``ready``; ``sig`` stops it gracefully.

        :raises: ClusterError with the log's tail if it exits or is not ready in time.
        """
        log_path = os.path.join(host.state_dir, f'{name}.log')
        with open(log_path, 'wb') as log:
            process = host.popen(list(argv), stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=env)
        service = self.services[name] = Service(name, host, process, log_path, sig)
        self.log_files[name] = log_path
        self._wait(service, lambda: ready in _read(log_path), timeout, f'{name} to start')
        return service

    def _wait(self, service: Service, done: Callable[[], bool], timeout: float,
              what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if service.process.poll() is not None:
                raise ClusterError(f'{service.host.name}: {service.name} exited '
                                   f'({service.process.returncode}) while waiting for '
                                   f'{what}; its log ends:\n{service.tail()}')
            if time.monotonic() >= deadline:
                raise ClusterError(f'{service.host.name}: waited {timeout:g} s for {what}; '
                                   f'{service.name}\'s log ends:\n{service.tail()}')
            time.sleep(0.1)

    def _wait_tcp(self, service: Service, port: int, timeout: float) -> None:
        def listening() -> bool:
            try:
                self.controller.wait_for_tcp(self.controller.address, port, 0,
                                             service.process)
            except netns.NetnsError:
                return False
            return True
        self._wait(service, listening, timeout, f'{service.name} to listen on {port}')

    def start_rabbitmq(self) -> None:
        """A RabbitMQ node of the controller's own: its Erlang cookie, mnesia and logs in
        the controller's state directory, its epmd inside the namespace (so it cannot
        meet the machine's), and the cloud's own user, which may log in from other
        hosts (only guest is held to loopback; this node has no guest).

        :raises: ClusterError.
        """
        host = self.controller
        root = os.path.join(host.state_dir, 'rabbitmq')
        os.makedirs(root)
        config = self._write(host, 'rabbitmq/rabbitmq.conf', render_rabbitmq(
            host.address, USER, self.password))
        plugins = os.path.join(root, 'enabled_plugins')
        with open(plugins, 'w') as f:
            f.write('[].\n')
        env = dict(os.environ, HOME=root, RABBITMQ_NODENAME='rabbit@localhost',
                   RABBITMQ_NODE_IP_ADDRESS=host.address,
                   RABBITMQ_NODE_PORT=str(RABBITMQ_PORT),
                   RABBITMQ_MNESIA_BASE=os.path.join(root, 'mnesia'),
                   RABBITMQ_LOG_BASE=os.path.join(root, 'log'),
                   RABBITMQ_CONFIG_FILE=config,
                   RABBITMQ_ENABLED_PLUGINS_FILE=plugins,
                   # Not the machine's /etc/rabbitmq/rabbitmq-env.conf.
                   RABBITMQ_CONF_ENV_FILE='/dev/null')
        service = self.start_service('rabbitmq', host, [RABBITMQ_SERVER], 'completed with',
                                     RABBITMQ_TIMEOUT, env=env)
        self._wait_tcp(service, RABBITMQ_PORT, RABBITMQ_TIMEOUT)

    def start_postgres(self) -> None:
        """A PostgreSQL cluster of the controller's own (initdb as user postgres into its
        state directory), listening on its address with its unix socket in that
        directory too, and a password user owning the database ``vmcloud``.

        :raises: ClusterError.
        """
        host = self.controller
        binaries = postgres_bin()
        root = os.path.join(host.state_dir, 'postgres')
        data = os.path.join(root, 'data')
        os.makedirs(root, mode=0o700)
        shutil.chown(root, 'postgres', 'postgres')
        as_postgres = ['runuser', '-u', 'postgres', '--']
        if host.run(as_postgres + ['test', '-x', root], check=False).returncode != 0:
            raise ClusterError(f'user postgres cannot reach {root}: every directory above '
                               'it must be searchable by others (o+x), or give the Cluster '
                               'a state_root that is')
        try:
            host.run(as_postgres + [os.path.join(binaries, 'initdb'), '-D', data,
                                    '-U', 'postgres', '-E', 'UTF8', '--auth-local=peer',
                                    '--auth-host=scram-sha-256', '--no-sync'],
                     timeout=POSTGRES_TIMEOUT)
        except netns.NetnsError as exc:
            raise ClusterError(f'cannot create the controller\'s PostgreSQL cluster: {exc}'
                               ) from exc
        # initdb allows TCP logins from loopback only; the dispatcher may be elsewhere.
        with open(os.path.join(data, 'pg_hba.conf'), 'a') as f:
            f.write(f'host all all {self.network.subnet} scram-sha-256\n')
        self.configs.setdefault(host.name, []).append(os.path.join(data, 'pg_hba.conf'))
        # In the foreground, so the cluster stops it like any other service.
        service = self.start_service(
            'postgres', host, as_postgres + [
                os.path.join(binaries, 'postgres'), '-D', data,
                '-c', f'listen_addresses={host.address}', '-c', f'port={POSTGRES_PORT}',
                '-c', f'unix_socket_directories={root}',
                # A test's database need not survive a power cut.
                '-c', 'fsync=off', '-c', 'full_page_writes=off'],
            'ready to accept connections', POSTGRES_TIMEOUT, sig=signal.SIGINT)
        self._wait_tcp(service, POSTGRES_PORT, POSTGRES_TIMEOUT)
        psql = as_postgres + [os.path.join(binaries, 'psql'), '-h', root, '-p',
                              str(POSTGRES_PORT), '-v', 'ON_ERROR_STOP=1', '-q', '-c']
        try:
            host.run(psql + [f"CREATE ROLE {USER} LOGIN PASSWORD '{self.password}'"])
            host.run(psql + [f'CREATE DATABASE {USER} OWNER {USER}'])
        except netns.NetnsError as exc:
            raise ClusterError(f'cannot create the dispatcher\'s database: {exc}') from exc

    @property
    def transport_url(self) -> str:
        return f'rabbit://{USER}:{self.password}@{self.controller.address}:{RABBITMQ_PORT}/'

    @property
    def warehouse_url(self) -> str:
        return f'http://{self.controller.address}:{WAREHOUSE_PORT}'

    def _common(self, host: netns.Host, name: str) -> dict[str, dict[str, object]]:
        """What every vmcloud process's config has: its state, the bus, the warehouse."""
        return {
            'DEFAULT': {'state_path': host.state_dir, 'host': name,
                        'transport_url': self.transport_url,
                        'heartbeat_interval': HEARTBEAT_INTERVAL,
                        'service_down_time': SERVICE_DOWN_TIME, 'rpc_call_timeout': 60},
            'storage': {'backend': 'http'},
            'storage_http': {'url': self.warehouse_url, 'token': self.token},
        }

    def _vmcloud(self, config: str, *args: str) -> list[str]:
        return [sys.executable, '-m', 'vmcloud.cmd.cli', '--config-file', config, *args]

    def start_warehouse(self) -> None:
        """``vmcloud warehouse`` over a file store in the controller's state directory.

        :raises: ClusterError.
        """
        host = self.controller
        config = self._write(host, 'warehouse.conf', render({
            'DEFAULT': {'state_path': host.state_dir},
            'storage': {'backend': 'file'},
            'storage_file': {'path': os.path.join(host.state_dir, 'warehouse')},
            'warehouse_service': {'host': host.address, 'port': WAREHOUSE_PORT,
                                  'token': self.token},
        }))
        service = self.start_service('warehouse', host, self._vmcloud(config, 'warehouse'),
                                     'serving the warehouse on', SERVICE_TIMEOUT)
        self._wait_tcp(service, WAREHOUSE_PORT, SERVICE_TIMEOUT)

    def start_dispatcher(self) -> None:
        """The dispatcher; its config is also the CLI's.

        :raises: ClusterError.
        """
        host = self.controller
        sections = self._common(host, 'controller')
        sections['database'] = {'connection': f'postgresql+psycopg://{USER}:{self.password}@'
                                              f'{host.address}:{POSTGRES_PORT}/{USER}'}
        self.cli_config = self._write(host, 'vmcloud.conf', render(sections))
        self.start_service('dispatcher', host, self._vmcloud(self.cli_config, 'dispatcher'),
                           'running\n', SERVICE_TIMEOUT)

    def add_compute(self, name: str) -> netns.Host:
        """A compute host, its link shaped as the controller's, its config in its state
        directory; not started.

        :raises: NetnsError.
        """
        host = self.computes[name] = self.network.add_host(name, rate=self.rate)
        sections = self._common(host, name)
        sections['compute'] = {'driver': 'qemu'}
        for group, options in HOST_PATHS.items():
            sections.setdefault(group, {})
            for option, leaf in options.items():
                sections[group][option] = os.path.join(host.state_dir, leaf)
        self._write(host, 'vmcloud.conf', render(sections))
        return host

    def start_compute(self, name: str) -> netns.Host:
        """Add compute host ``name`` if new and start its service.

        :raises: ClusterError, NetnsError.
        """
        host = self.computes.get(name) or self.add_compute(name)
        config = os.path.join(host.state_dir, 'vmcloud.conf')
        self.start_service(f'compute-{name}', host, self._vmcloud(config, 'compute'),
                           'running\n', SERVICE_TIMEOUT)
        return host

    def stop_compute(self, name: str) -> None:
        """Stop the compute service of ``name`` (it destroys its guests); the host stays."""
        self.services.pop(f'compute-{name}').stop()

    # -- using it -----------------------------------------------------------------

    def cli(self, *args: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess:
        """``vmcloud ARGS`` on the controller with its config, finished (not checked).

        :raises: NetnsError if it outlives ``timeout``.
        """
        return self.controller.run(self._vmcloud(self.cli_config, *args), timeout=timeout,
                                   check=False)

    def cli_json(self, *args: str, timeout: float = CLI_TIMEOUT) -> object:
        """``vmcloud ARGS -f json`` on the controller, its output parsed.

        :raises: ClusterError with its stderr if it fails.
        """
        done = self.cli(*args, '-f', 'json', timeout=timeout)
        if done.returncode != 0:
            raise ClusterError(f'vmcloud {" ".join(args)} failed ({done.returncode}): '
                               f'{done.stderr.strip()[-LOG_TAIL:]}\n{done.stdout[-LOG_TAIL:]}')
        return json.loads(done.stdout)

    def wait_hosts(self, up: Sequence[str], down: Sequence[str] = (),
                   timeout: float = SERVICE_TIMEOUT) -> list[dict]:
        """Wait until the dispatcher sees every host of ``up`` up and of ``down`` down.

        :returns: the hosts as ``vmcloud hosts`` lists them. :raises: ClusterError.
        """
        deadline = time.monotonic() + timeout
        while True:
            hosts = self.cli_json('hosts')
            state = {h['name']: h['up'] for h in hosts}
            if all(state.get(n) is True for n in up) and all(not state.get(n, False)
                                                             for n in down):
                return hosts
            if time.monotonic() >= deadline:
                raise ClusterError(f'hosts not {list(up)} up and {list(down)} down after '
                                   f'{timeout:g} s: {state}')
            time.sleep(0.5)

    def peers(self, host: str) -> set[tuple[str, int]]:
        """The remote ends (address, port) of the TCP connections established on ``host``.

        :raises: NetnsError.
        """
        out = self.network.hosts[host].run(['ss', '-Htn', 'state', 'established']).stdout
        peers = set()
        for line in out.splitlines():
            address, _, port = line.split()[-1].rpartition(':')
            peers.add((address, int(port)))
        return peers

    def console_path(self, host: str, instance: str) -> str:
        """Where compute host ``host``'s qemu driver writes ``instance``'s console."""
        return os.path.join(self.computes[host].state_dir, 'instances', instance,
                            'console.log')

    def wait_console(self, host: str, instance: str, pattern: str, timeout: float) -> str:
        """Wait until ``instance``'s console on ``host`` has a line matching ``pattern``.

        :returns: the console text. :raises: GuestTimeout (with the console's tail),
            also as soon as the host's compute service exits.
        """
        path = self.console_path(host, instance)
        service = self.services[f'compute-{host}']
        console.wait_for_line(path, pattern, timeout, lambda: service.process.poll() is None,
                              f'{instance} on {host}')
        return console.read(path)

    # -- what the hosts share ------------------------------------------------------

    def sharing(self) -> list[str]:
        """Every way a host's state reaches another's: state directories that are the
        same or nested, a config file outside its host's directory, a config value
        that is a path outside it, a config text that names another host's directory.
        Empty when nothing is shared."""
        problems = []
        hosts = list(self.network.hosts.values())
        for host in hosts:
            for other in hosts:
                if other is host:
                    continue
                if os.path.realpath(host.state_dir) == os.path.realpath(other.state_dir):
                    problems.append(f'{host.name} and {other.name} share {host.state_dir}')
                elif _inside(host.state_dir, other.state_dir):
                    problems.append(f'{host.name}\'s {host.state_dir} is inside '
                                    f'{other.name}\'s')
        for name, paths in self.configs.items():
            host = self.network.hosts[name]
            for path in paths:
                if not _inside(path, host.state_dir):
                    problems.append(f'{name}\'s config {path} is outside its state directory')
                text = _read(path)
                for line in text.splitlines():
                    value = line.partition(' = ')[2].strip()
                    if value.startswith('/') and not _inside(value, host.state_dir):
                        problems.append(f'{name}\'s config {path} names {value}, outside '
                                        f'its state directory')
                for other in hosts:
                    if other is not host and other.state_dir in text:
                        problems.append(f'{name}\'s config {path} names {other.name}\'s '
                                        f'{other.state_dir}')
        return problems


def render_rabbitmq(address: str, user: str, password: str) -> str:
    """rabbitmq.conf: one listener on ``address``, ``user`` created on the first boot
    (only guest is limited to loopback logins, and no guest is created)."""
    return (f'listeners.tcp.default = {address}:{RABBITMQ_PORT}\n'
            f'default_user = {user}\ndefault_pass = {password}\n'
            # The state directory's disk is shared with 4 other engineers' tests.
            'disk_free_limit.absolute = 50MB\n')


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


def _read(path: str) -> str:
    try:
        with open(path, 'rb') as f:
            return f.read().decode('utf-8', 'replace')
    except OSError:
        return ''
