"""A vmcloud cloud on emulated hosts: a controller and compute hosts, each a network
namespace of netns.Network with its own state directory and config files.

    with cluster.Cluster() as cloud:
        cloud.import_guest()
        cloud.start_compute('node1')
        cloud.start_compute('node2')
        cloud.wait_host_states({'node1': 'up', 'node2': 'up'})
        deployment = cloud.deploy(2, guest.CMDLINE)
        cloud.kill('compute-node1'); cloud.restart('compute-node1')

What runs where:

- controller (``ctl``, its link shaped to ``rate``): a private RabbitMQ (its own
  Erlang node, mnesia, logs, cookie and epmd, a login ``vmcloud`` allowed from other
  hosts), a private PostgreSQL cluster (initdb into the controller's state directory,
  listening on the controller's address only, password login), ``vmcloud warehouse``
  (file backend in the controller's state directory, bearer token), ``vmcloud
  dispatcher`` (PostgreSQL over TCP, RabbitMQ and the warehouse service at the
  controller's address), with ``start_api`` ``vmcloud api`` (the dispatcher's config,
  listening on the controller's address; ``create_api_user`` adds its users) and every
  ``vmcloud`` CLI command of the test.
- compute hosts (``node1``...): ``vmcloud mirror-service`` (the node's mirrors and
  their NBD server, which outlive the manager) and ``vmcloud compute`` with the qemu
  driver, two services started, killed and restarted separately; ``[storage]
  backend = http`` to the controller, ``transport_url`` to the controller's RabbitMQ,
  every path option under the host's own state directory. Their guests are qemu
  processes the compute service starts in sessions of their own, so they run inside
  the host's namespace and outlive the service. The compute service runs in the
  machine's mount namespace with a sysfs of its host (``netns.Host.popen``'s
  ``machine_mounts``): its network agent's DHCP namespaces are mounted in /run/netns
  for every process. Each compute host is a VTEP of the guest networks at its own
  address (``[network] vtep_address``), its agent's state under its state directory.
  With ``peer_replicas`` the compute hosts run the peer exchange: each mirror
  service's peer chunk server on its host's address at PEER_PORT, one token for the
  cloud (``peer_stats``, ``stage_chunk``); ``cached_chunks`` reads a host's chunk
  cache journal, ``warehouse_stats`` the warehouse's counters (its egress).

- gateway hosts (``gw``, ``start_gateway``): ``vmcloud gateway``, whose HAProxy
  outlives it (a gateway killed and started again adopts it), a VTEP at its own
  address that joins the deployment networks it serves; HAProxy listens on the
  host's address. Client hosts (``add_client``) are on the switch and nothing more.
- with ``host_cgroups``, each compute host's processes (its two services, and so
  its guests and their dnsmasq) run in a cgroup v2 of its own, which its compute
  service measures its CPU load in (``[compute] load_cgroup``; ``cpu_hog`` loads
  one host alone): the hosts share one kernel, whose /proc/stat is the machine's.

Each host's config files live in its state directory and name no path outside it
(``assert_nothing_shared`` checks). Nothing of the machine's own RabbitMQ, PostgreSQL
or /var/lib/vmcloud is used: the namespaces have no route out, and the two servers'
unix sockets and data live in the controller's state directory. Every start is a
bounded wait that fails as soon as the process exits, with the tail of its log;
``logs()`` names every service's log for a test to attach. Closing stops the
services in reverse order of their start, then the Network kills whatever is left in
the namespaces (guests included) and removes them, every state directory and the
hosts' cgroups, also when the block fails.

Faults (doc/operations.md says what vmcloud does about each): ``kill`` a service
(SIGKILL) and ``restart`` it, as it was started, its log appended; ``stop`` one
gracefully; a host's link down for N s or its packets to the warehouse dropped
(``netns.Host.link_down``, ``dropping``); ``stop_node`` powers a compute host off
(every process in it killed); ``corrupt_cached_chunks`` flips the bytes of chunks in a
host's cache slot files (a disk that returns wrong data). ``network_leftovers`` lists
what vmcloud made of the guest networks on a host (devices, DHCP namespaces,
dnsmasq): empty once no guest of any network runs there. What is left is checked by
``problems``: every process of every host accounted for (a service, a process a
service started, or the one qemu of an instance the dispatcher wants there), no
wanted guest missing or paused (QMP ``query-status`` on its monitor socket).
"""
import dataclasses
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
from typing import Callable, Sequence

from vmcloud.conf import compute as conf_compute
from vmcloud.conf import mirror as conf_mirror
from vmcloud.drivers import console
from vmcloud.mirror import cache as cache_mod
from vmcloud.storage import manifest as manifest_mod
from vmcloud.storage import protocol
from tests import guest
from tests.multihost import netns

RABBITMQ_SERVER = '/usr/lib/rabbitmq/bin/rabbitmq-server'
POSTGRES_ROOT = '/usr/lib/postgresql'
RABBITMQ_PORT = 5672
POSTGRES_PORT = 5432
WAREHOUSE_PORT = 9494
API_PORT = 8780
# Every compute host's peer chunk server (with Cluster(peer_replicas=...)).
PEER_PORT = 9495
HTTP_TIMEOUT = 30.0
USER = 'vmcloud'
# RabbitMQ boots its Erlang node and mnesia in about 8-10 s on the CI machine.
RABBITMQ_TIMEOUT = 90.0
# initdb and the server start in about a second each; generous for a loaded machine.
POSTGRES_TIMEOUT = 90.0
SERVICE_TIMEOUT = 90.0
CLI_TIMEOUT = 300.0
LOG_TAIL = 3000
# Fast heartbeats: a compute host that stopped is marked unknown in seconds.
HEARTBEAT_INTERVAL = 1
SERVICE_DOWN_TIME = 5
# Seconds without AMQP heartbeats before a connection is taken for dead. oslo.messaging's
# default, 60, leaves a connection that a healed link left half-open (the broker dropped
# it meanwhile) unnoticed for up to a minute: a compute host's RPC server is deaf that
# long after its link or the controller's comes back, and a snapshot's freeze times out.
AMQP_HEARTBEAT_TIMEOUT = 10
# Deadlines short enough that a fault of a minute crosses every one (the defaults are
# for real clusters: doc/operations.md).
DEADLINES = {
    'build_timeout': 240,
    'snapshot_freeze_timeout': 20,
    'snapshot_pause_limit': 15,
    'snapshot_upload_timeout': 120,
    'cli_timeout': 10,
}
QMP_TIMEOUT = 10.0
# The test guest's files as the warehouse images import_guest makes of them.
GUEST_IMAGES = {'guest': 'disk.img', 'guest-kernel': 'vmlinuz', 'guest-initrd': 'initrd.img'}
# RabbitMQ daemonizes its port mapper: it belongs to the controller, not to a service.
# The network agent daemonizes one dnsmasq per guest network on a compute host: it
# outlives the compute service by design (guests keep their leases across a restart).
# The gateway's HAProxy runs in a session of its own and outlives ``vmcloud gateway`` by
# design (a restarted gateway adopts it, its connections kept).
DAEMONS = ('epmd', 'dnsmasq', 'haproxy')
# What vmcloud makes of a guest network on a host: bridges, VXLAN devices, the DHCP
# namespaces' veths (vmcloud/network/agent.py), the guests' taps (drivers) and the
# gateway host's veth into a network it joined.
NETWORK_DEVICE = re.compile(r'^vmc[bxdtg][0-9a-f]+$')
# Where the machine mounts cgroup v2: the whole of /sys/fs/cgroup, or (a hybrid
# machine, cgroup v1 controllers beside it) its unified/ directory.
CGROUP2_MOUNTS = ('/sys/fs/cgroup', '/sys/fs/cgroup/unified')
# A host's cgroup is vmcloud-<pid>-<tag>-<host> (the pid of the test process, so a
# later run removes those of a run that was killed), bind-mounted into its state
# directory at CGROUP_LEAF: a compute service sees the sysfs of its own host, not the
# machine's cgroup mounts, and its config names no path outside its directory.
CGROUP_PREFIX = 'vmcloud'
CGROUP_LEAF = 'cgroup'
_CGROUP = re.compile(rf'^{CGROUP_PREFIX}-(\d+)-([0-9a-f]+)-([a-z0-9]+)$')
# A cgroup's processes get this long to be gone once killed.
CGROUP_TIMEOUT = 10.0
# The dispatcher's gateway_state() as the controller's CLI config reaches it: the loads
# the gateway weighs (there is no CLI command for it; a test computes expected shares).
GATEWAY_STATE = """
import json, sys
import vmcloud.conf
from vmcloud.dispatcher import rpcapi
conf = vmcloud.conf.CONF
conf(["--config-file", sys.argv[1]], project="vmcloud", default_config_files=[])
print(json.dumps(rpcapi.DispatcherAPI(conf).gateway_state()))
"""
# A compute host's own copies of boot artifacts, fetched as a build fetches them
# (vmcloud.compute.artifacts), so that a deploy after it reads the warehouse for its
# disks alone.
FETCH_BOOT_ARTIFACTS = """
import sys
import vmcloud.conf
from vmcloud.compute import artifacts
from vmcloud.storage import warehouse
conf = vmcloud.conf.CONF
conf(["--config-file", sys.argv[1]], project="vmcloud", default_config_files=[])
node = artifacts.BootArtifacts(conf.compute.boot_artifacts_path, warehouse.Warehouse(conf),
                               conf.compute.boot_timeout)
for ref in sys.argv[2:]:
    print(node.path_of(ref))
"""
_STATE_PATH = '$state_path/'


def host_paths() -> dict[str, dict[str, str]]:
    """[mirror] and [compute] path options a compute host sets under its own state
    directory: every one whose default is under state_path, so one added later is
    placed too (its default would put it wherever state_path is), with the leaf of
    its default."""
    return {group: {opt.name: opt.default[len(_STATE_PATH):] for opt in opts
                    if isinstance(opt.default, str) and opt.default.startswith(_STATE_PATH)}
            for group, opts in (('mirror', conf_mirror.mirror_opts),
                                ('compute', conf_compute.compute_opts))}


HOST_PATHS = host_paths()


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


def cgroup2_root() -> str:
    """Where the machine's cgroup v2 hierarchy is mounted.

    :raises: ClusterError if it has none.
    """
    for path in CGROUP2_MOUNTS:
        if os.path.exists(os.path.join(path, 'cgroup.controllers')):
            return path
    raise ClusterError(f'no cgroup v2 hierarchy at {" or ".join(CGROUP2_MOUNTS)}: the '
                       'emulated hosts cannot measure their own CPU load')


def remove_cgroup(path: str) -> None:
    """Kill every process in cgroup ``path`` (bounded wait), then remove it; no error if
    it is gone. Never raises (best effort, logged)."""
    deadline = time.monotonic() + CGROUP_TIMEOUT
    while os.path.isdir(path):
        try:
            with open(os.path.join(path, 'cgroup.procs')) as f:
                pids = [int(p) for p in f.read().split()]
        except OSError:
            pids = []
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as exc:  # EBUSY while a killed process is still exiting
            if time.monotonic() >= deadline:
                print(f'cluster: cannot remove cgroup {path}: {exc}', file=sys.stderr)
                return
        time.sleep(0.05)


def sweep_stale_cgroups() -> list[str]:
    """Remove the hosts' cgroups of test processes that are dead (a run killed before
    it closed its cloud), and unmount their bind mounts; those of live runs stay.

    :returns: the cgroups removed.
    """
    try:
        root = cgroup2_root()
        entries = os.listdir(root)
    except (ClusterError, OSError):
        return []
    stale = [os.path.join(root, e) for e in entries
             if (m := _CGROUP.match(e)) and not netns._alive(int(m.group(1)))]
    for path in stale:
        remove_cgroup(path)
    state_root = os.path.realpath(netns.DEFAULT_STATE_ROOT) + os.sep
    for mount_point in _mount_points():
        if not mount_point.startswith(state_root):
            continue
        owner = re.match(r'^[^-]+-(\d+)-', mount_point[len(state_root):])
        if owner and not netns._alive(int(owner.group(1))):
            subprocess.run(['umount', '-l', mount_point], capture_output=True,
                           timeout=netns.COMMAND_TIMEOUT)
    return stale


def _mount_points() -> list[str]:
    try:
        with open('/proc/self/mounts') as f:
            return [line.split()[1] for line in f]
    except OSError:
        return []


def render(sections: dict[str, dict[str, object]]) -> str:
    """oslo.config INI text of ``sections``."""
    lines = []
    for section, options in sections.items():
        lines.append(f'[{section}]')
        lines += [f'{key} = {value}' for key, value in options.items()]
        lines.append('')
    return '\n'.join(lines)


@dataclasses.dataclass
class Start:
    """How a service was started, so that it can be started again the same way."""
    host: netns.Host
    argv: list[str]
    #: what its log says once it is ready
    ready: str
    timeout: float
    env: dict | None = None
    # How to stop it gracefully (PostgreSQL: SIGINT is its fast shutdown).
    sig: int = signal.SIGTERM
    #: run in the machine's mount namespace (netns.Host.command)
    machine_mounts: bool = False
    #: the cgroup v2 directory it runs in (netns.Host.command), None: the test's own
    cgroup: str | None = None


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

    def kill(self) -> None:
        """SIGKILL its process group (not the sessions its children made, as a crash
        would leave them) and reap it. Never raises."""
        if self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(netns.STOP_TIMEOUT)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


class Cluster:
    """The controller and its servers, and compute hosts added one by one."""

    def __init__(self, rate: str = '1gbit', state_root: str = netns.DEFAULT_STATE_ROOT,
                 subnet: str = netns.DEFAULT_SUBNET,
                 options: dict[str, dict[str, object]] | None = None,
                 host_cgroups: bool = False, peer_replicas: int | None = None):
        """``options``: sections merged into every vmcloud config the cloud renders
        (after its own, so they win), e.g. ``{'compute': {'sync_before_freeze': False}}``.
        ``host_cgroups``: each compute host's processes (its services, and so its
        guests) in a cgroup of its own, which its compute service measures its CPU
        load in (``[compute] load_cgroup``): the hosts share one kernel, whose
        /proc/stat would give each the whole machine's load.
        ``peer_replicas``: the compute hosts run the peer exchange, each chunk owned by
        that many of them (``[mirror] peer_replicas``); None: no peer exchange, every
        host's mirrors read the warehouse alone."""
        self.rate = rate
        self.options = options or {}
        self.peer_replicas = peer_replicas
        self.host_cgroups = host_cgroups
        # host name -> its cgroup directory (the machine's view), and the bind mounts
        # of them in the hosts' state directories (removed before the directories).
        self.cgroups: dict[str, str] = {}
        self._cgroup_mounts: list[str] = []
        self.network = netns.Network(subnet=subnet, state_root=state_root)
        # Fresh per cloud: nothing of one run can log in to another.
        self.password = secrets.token_hex(12)
        self.token = secrets.token_hex(16)
        self.peer_token = secrets.token_hex(16)
        self.services: dict[str, Service] = {}
        # How each service was last started, also once stopped (restart uses it).
        self.starts: dict[str, Start] = {}
        # Every service's log, also of those stopped since (a failure may be theirs).
        self.log_files: dict[str, str] = {}
        self.computes: dict[str, netns.Host] = {}
        self.gateways: dict[str, netns.Host] = {}
        self.clients: dict[str, netns.Host] = {}
        # Each compute host's own options, merged last into its config.
        self.host_options: dict[str, dict[str, dict[str, object]]] = {}
        self.configs: dict[str, list[str]] = {}
        self.controller: netns.Host | None = None
        # Where start_api runs the API, and its config.
        self.api_host: netns.Host | None = None
        self.api_port = API_PORT
        self.api_config: str | None = None

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
        # The cgroup bind mounts of a killed run first: its state directories, which the
        # network's sweep removes, cannot go while they are mounted.
        sweep_stale_cgroups()
        self.network.open()
        self.controller = self.network.add_host('ctl', rate=self.rate)
        self.start_rabbitmq()
        self.start_postgres()
        self.start_warehouse()
        self.start_dispatcher()

    def close(self) -> None:
        """Stop every service, newest first, then remove the network and the hosts'
        cgroups. Never raises."""
        for name in reversed(list(self.services)):
            self.services.pop(name).stop()
        # Before the state directories go: rmtree would reach into the cgroups.
        for mount_point in reversed(self._cgroup_mounts):
            subprocess.run(['umount', '-l', mount_point], capture_output=True,
                           timeout=netns.COMMAND_TIMEOUT)
        self._cgroup_mounts.clear()
        self.network.close()
        for path in self.cgroups.values():
            remove_cgroup(path)
        self.cgroups.clear()

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

    def start_service(self, name: str, host: netns.Host, argv: Sequence[str],
                      ready: str, timeout: float, env: dict | None = None,
                      sig: int = signal.SIGTERM, machine_mounts: bool = False,
                      cgroup: str | None = None) -> Service:
        """Start ``argv`` on ``host``, logging to its state directory, and wait until
        its log holds ``ready``; ``sig`` stops it gracefully; ``machine_mounts``,
        ``cgroup``: see netns.Host.command.
        A service started again under the same name appends to its log, after a line
        saying so, and is ready only when this run says it is.

        :raises: ClusterError with the log's tail if it exits or is not ready in time,
            or if a service of that name runs.
        """
        if name in self.services:
            raise ClusterError(f'{host.name}: {name} runs already')
        self.starts[name] = Start(host, list(argv), ready, timeout, env, sig, machine_mounts,
                                  cgroup)
        log_path = os.path.join(host.state_dir, f'{name}.log')
        with open(log_path, 'ab') as log:
            start = log.tell()
            if start:
                log.write(f'\n--- harness: {name} started again ---\n'.encode())
                start = log.tell()
            process = host.popen(list(argv), machine_mounts=machine_mounts, cgroup=cgroup,
                                 stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=env)
        service = self.services[name] = Service(name, host, process, log_path, sig)
        self.log_files[name] = log_path
        self._wait(service, lambda: ready in _read(log_path)[start:], timeout,
                   f'{name} to start')
        return service

    def restart(self, name: str) -> Service:
        """Start service ``name`` again as it was last started (it must not run).

        :raises: ClusterError.
        """
        start = self.starts[name]
        return self.start_service(name, start.host, start.argv, start.ready, start.timeout,
                                  start.env, start.sig, start.machine_mounts, start.cgroup)

    def kill(self, name: str) -> None:
        """SIGKILL service ``name``, as a crash would end it: what it started in
        sessions of its own (guests) runs on. ``restart`` starts it again."""
        self.services.pop(name).kill()

    def stop(self, name: str) -> None:
        """Stop service ``name`` gracefully (bounded, then SIGKILL)."""
        self.services.pop(name).stop()

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
                        'service_down_time': SERVICE_DOWN_TIME, 'rpc_call_timeout': 60,
                        **DEADLINES},
            'oslo_messaging_rabbit': {'heartbeat_timeout_threshold': AMQP_HEARTBEAT_TIMEOUT},
            'storage': {'backend': 'http'},
            'storage_http': {'url': self.warehouse_url, 'token': self.token},
        }

    @staticmethod
    def _merged(sections: dict, *overrides: dict | None) -> dict:
        for override in overrides:
            for section, values in (override or {}).items():
                sections.setdefault(section, {}).update(values)
        return sections

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
        sections['database'] = {'connection': self.database_url}
        self.cli_config = self._write(host, 'vmcloud.conf',
                                      render(self._merged(sections, self.options)))
        self.start_service('dispatcher', host, self._vmcloud(self.cli_config, 'dispatcher'),
                           'running\n', SERVICE_TIMEOUT)

    @property
    def database_url(self) -> str:
        """The dispatcher's database: the controller's PostgreSQL over TCP."""
        return (f'postgresql+psycopg://{USER}:{self.password}@{self.controller.address}:'
                f'{POSTGRES_PORT}/{USER}')

    @property
    def api_url(self) -> str:
        """Where ``start_api``'s API answers (from any host of the network).

        :raises: ClusterError if no API was started.
        """
        if self.api_host is None:
            raise ClusterError('no API runs: start_api first')
        return f'http://{self.api_host.address}:{self.api_port}'

    def start_api(self, name: str = 'controller', port: int = API_PORT) -> Service:
        """``vmcloud api`` (service ``api``) on the controller, or with another ``name``
        on a host of its own of that name (added if new, its link shaped as the
        controller's; the API reaches the database over TCP either way): the
        dispatcher's config (the same [database] connection, transport_url and
        warehouse) with ``[api] listen_address`` its host's address and ``port``;
        waited for until that port takes connections.

        :raises: ClusterError (it exited or did not listen: its log's tail), NetnsError.
        """
        host = (self.controller if name == 'controller'
                else self.network.hosts.get(name) or self.network.add_host(name, rate=self.rate))
        sections = self._common(host, name)
        sections['database'] = {'connection': self.database_url}
        sections['api'] = {'listen_address': host.address, 'port': port}
        self.api_config = self._write(host, 'api.conf',
                                      render(self._merged(sections, self.options)))
        self.api_host, self.api_port = host, port
        # Ready once it listens: no log line of its own is part of its interface.
        service = self.start_service('api', host, self._vmcloud(self.api_config, 'api'), '',
                                     SERVICE_TIMEOUT)

        def listening() -> bool:
            try:
                host.wait_for_tcp(host.address, port, 0, service.process)
            except netns.NetnsError:
                return False
            return True
        self._wait(service, listening, SERVICE_TIMEOUT, f'api to listen on {port}')
        return service

    def create_api_user(self, name: str, password: str, role: str = 'admin') -> None:
        """``vmcloud user create NAME --role ROLE --password-file F`` on the controller
        (straight to the database, no API needed): F a file of the controller's, mode
        0600, removed afterwards; the password is never on a command line.

        :raises: ClusterError with the command's stderr if it fails.
        """
        path = os.path.join(self.controller.state_dir, f'password-{secrets.token_hex(4)}')
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(descriptor, 'w') as f:
                f.write(password)
            done = self.controller.run(
                self._vmcloud(self.cli_config, 'user', 'create', name, '--role', role,
                              '--password-file', path), timeout=CLI_TIMEOUT, check=False)
        finally:
            os.unlink(path)
        if done.returncode != 0:
            raise ClusterError(f'vmcloud user create {name} failed ({done.returncode}): '
                               f'{done.stderr.strip()[-LOG_TAIL:]}')

    def add_compute(self, name: str,
                    options: dict[str, dict[str, object]] | None = None) -> netns.Host:
        """A compute host, its link shaped as the controller's, its config in its state
        directory (``options`` merged last, for this host only); not started.

        :raises: NetnsError.
        """
        host = self.computes[name] = self.network.add_host(name, rate=self.rate)
        self.host_options[name] = options or {}
        if self.host_cgroups:
            self._add_cgroup(host)
        self._render_compute(name)
        return host

    def _add_cgroup(self, host: netns.Host) -> str:
        """A cgroup of ``host``'s own, bind-mounted at CGROUP_LEAF of its state directory.

        :returns: its directory. :raises: ClusterError, NetnsError.
        """
        path = os.path.join(cgroup2_root(),
                            f'{CGROUP_PREFIX}-{os.getpid()}-{self.network.tag}-{host.name}')
        # Registered first: close() removes it also if what follows fails.
        self.cgroups[host.name] = path
        try:
            os.mkdir(path)
        except OSError as exc:
            raise ClusterError(f'{host.name}: cannot make cgroup {path}: {exc}') from exc
        mount_point = os.path.join(host.state_dir, CGROUP_LEAF)
        os.mkdir(mount_point)
        self._cgroup_mounts.append(mount_point)
        netns._command(['mount', '--bind', path, mount_point])
        return path

    def cpu_usage_usec(self, name: str) -> int:
        """CPU time host ``name``'s processes used so far (its cgroup's usage_usec).

        :raises: ClusterError if the host has no cgroup, OSError.
        """
        if name not in self.cgroups:
            raise ClusterError(f'{name} has no cgroup of its own: Cluster(host_cgroups=True)')
        with open(os.path.join(self.cgroups[name], 'cpu.stat')) as f:
            stat = dict(line.split() for line in f if line.strip())
        return int(stat['usage_usec'])

    def cpu_hog(self, name: str, seconds: float, loops: int = 1) -> list[subprocess.Popen]:
        """``loops`` busy loops on host ``name`` (in its cgroup if it has one), each
        ended by ``timeout`` after ``seconds`` at the latest; the Network stops what is
        left when it closes.

        :raises: NetnsError.
        """
        host = self.network.hosts[name]
        return [host.popen(['timeout', f'{seconds:g}', 'sh', '-c', 'while :; do :; done'],
                           cgroup=self.cgroups.get(name), stdin=subprocess.DEVNULL)
                for _ in range(loops)]

    def set_options(self, name: str, options: dict[str, dict[str, object]]) -> None:
        """Merge ``options`` into compute host ``name``'s own and rewrite its config; a
        service reads it when it starts (``restart``)."""
        self._merged(self.host_options[name], options)
        self._render_compute(name)

    def _render_compute(self, name: str) -> None:
        host = self.computes[name]
        sections = self._common(host, name)
        sections['compute'] = {'driver': 'qemu'}
        for group, options_of in HOST_PATHS.items():
            sections.setdefault(group, {})
            for option, leaf in options_of.items():
                sections[group][option] = os.path.join(host.state_dir, leaf)
        # The host's address is its VTEP; its agent's state (and so the tag of its
        # DHCP namespaces, netns.agent_tag) under its own directory.
        sections['network'] = {
            'vtep_address': host.address,
            'state_dir': os.path.join(host.state_dir, netns.AGENT_STATE_LEAF)}
        if name in self.cgroups:
            sections['compute']['load_cgroup'] = os.path.join(host.state_dir, CGROUP_LEAF)
        if self.peer_replicas is not None:
            # Its peer chunk server on its own address, reached by the others' mirrors.
            sections['mirror'].update(peer_address=host.address, peer_port=PEER_PORT,
                                      peer_replicas=self.peer_replicas,
                                      peer_token=self.peer_token)
        sections = self._merged(sections, self.options, self.host_options[name])
        path = os.path.join(host.state_dir, 'vmcloud.conf')
        if path in self.configs.get(name, ()):
            with open(path, 'w') as f:
                f.write(render(sections))
        else:
            self._write(host, 'vmcloud.conf', render(sections))

    def config(self, name: str) -> str:
        """Host ``name``'s vmcloud config file."""
        return os.path.join(self.network.hosts[name].state_dir, 'vmcloud.conf')

    def start_mirror_service(self, name: str) -> Service:
        """``vmcloud mirror-service`` on compute host ``name``.

        :raises: ClusterError, NetnsError.
        """
        host = self.computes.get(name) or self.add_compute(name)
        return self.start_service(f'mirrors-{name}', host,
                                  self._vmcloud(self.config(name), 'mirror-service'),
                                  'running\n', SERVICE_TIMEOUT, cgroup=self.cgroups.get(name))

    def start_compute(self, name: str) -> netns.Host:
        """Add compute host ``name`` if new, start its mirror service if it has none
        running, then its compute service.

        :raises: ClusterError, NetnsError.
        """
        host = self.computes.get(name) or self.add_compute(name)
        if f'mirrors-{name}' not in self.services:
            self.start_mirror_service(name)
        self.start_service(f'compute-{name}', host,
                           self._vmcloud(self.config(name), 'compute'), 'running\n',
                           SERVICE_TIMEOUT, machine_mounts=True, cgroup=self.cgroups.get(name))
        return host

    def add_gateway(self, name: str,
                    options: dict[str, dict[str, object]] | None = None) -> netns.Host:
        """A gateway host ``name`` (also the gateway's name), its link shaped as the
        controller's; its config in its state directory: HAProxy's listeners on its
        address only (not on the deployment networks it joins), its VTEP at that
        address, ``options`` merged last; not started.

        :raises: NetnsError.
        """
        host = self.gateways[name] = self.network.add_host(name, rate=self.rate)
        sections = self._common(host, name)
        sections['gateway'] = {'name': name, 'listen_address': host.address,
                               'state_path': os.path.join(host.state_dir, 'gateway')}
        sections['network'] = {
            'vtep_address': host.address,
            'state_dir': os.path.join(host.state_dir, netns.AGENT_STATE_LEAF)}
        sections = self._merged(sections, self.options, options)
        self._write(host, 'vmcloud.conf', render(sections))
        return host

    def start_gateway(self, name: str = 'gw') -> netns.Host:
        """Add gateway host ``name`` if new and start ``vmcloud gateway`` on it (service
        ``gateway-<name>``): stopped gracefully, it stops its HAProxy too; killed
        (``kill``), its HAProxy runs on, as after a crash, for ``restart`` to adopt.
        In the machine's mounts: its network agent joins the deployment networks.

        :raises: ClusterError, NetnsError.
        """
        host = self.gateways.get(name) or self.add_gateway(name)
        self.start_service(f'gateway-{name}', host,
                           self._vmcloud(self.config(name), 'gateway', '--stop-haproxy'),
                           'running\n', SERVICE_TIMEOUT, machine_mounts=True)
        return host

    def haproxy_pids(self, name: str = 'gw') -> list[int]:
        """The HAProxy processes (master and worker) running on gateway host ``name``."""
        return sorted(p.pid for p in self.gateways[name].processes()
                      if p.program == 'haproxy')

    def add_client(self, name: str) -> netns.Host:
        """A client host on the switch, no part of the cloud: it reaches the
        applications through the gateway's address only (it has no route anywhere).

        :raises: NetnsError.
        """
        host = self.clients[name] = self.network.add_host(name, rate=self.rate)
        return host

    def stop_compute(self, name: str) -> None:
        """Stop the compute service of ``name`` gracefully; its guests and mirror
        service run on."""
        self.stop(f'compute-{name}')

    def stop_node(self, name: str) -> None:
        """Power compute host ``name`` off: its compute and mirror services stopped,
        then every process left in it (its guests) killed, and what a power cut takes
        of its guest networks gone: its agent's DHCP namespaces (with their dnsmasq)
        and vmcloud's devices. The host and its state directory stay (a node that
        reboots).

        :raises: NetnsError.
        """
        for service in (f'compute-{name}', f'mirrors-{name}'):
            if service in self.services:
                self.stop(service)
        host = self.computes[name]
        netns.kill_inside(host.namespace)
        for namespace in netns.agent_namespaces([host.state_dir]):
            netns.delete_namespace(namespace)
        links = json.loads(host.run(['ip', '-j', 'link', 'show']).stdout or '[]')
        for link in links:
            if NETWORK_DEVICE.match(link['ifname']):
                host.run(['ip', 'link', 'del', link['ifname']], check=False)

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

    def import_guest(self) -> dict[str, dict]:
        """The test guest's disk, kernel and initrd (tests/guest.py) imported through the
        warehouse service by the controller's CLI, as GUEST_IMAGES names them, from
        copies in the controller's state directory (no host reads another's files).

        :returns: image name -> what ``vmcloud image import`` answered.
        :raises: ClusterError.
        """
        uploads = os.path.join(self.controller.state_dir, 'uploads')
        os.makedirs(uploads, exist_ok=True)
        imported = {}
        for name, leaf in GUEST_IMAGES.items():
            path = os.path.join(uploads, leaf)
            shutil.copyfile(guest.path(leaf), path)
            imported[name] = self.cli_json('image', 'import', path, name, '--format', 'raw')
        return imported

    def fetch_boot_artifacts(self, name: str, refs: Sequence[str]) -> list[str]:
        """Compute host ``name`` fetches the boot artifacts ``refs`` (pinned
        ``NAME:VERSION``) into its ``[compute] boot_artifacts_path`` from the warehouse,
        with the code and config its builds use.

        :returns: their files. :raises: ClusterError with its stderr if it fails.
        """
        done = self.computes[name].run(
            [sys.executable, '-c', FETCH_BOOT_ARTIFACTS, self.config(name), *refs],
            timeout=CLI_TIMEOUT, check=False)
        if done.returncode != 0:
            raise ClusterError(f'{name}: cannot fetch boot artifacts {list(refs)}: '
                               f'{done.stderr.strip()[-LOG_TAIL:]}')
        return done.stdout.split()

    # -- HTTP from the controller --------------------------------------------------

    def http(self, address: str, port: int, method: str, path: str, token: str = '',
             ok: Sequence[int] = (200,)) -> bytes:
        """``method path`` to ``address:port`` from the controller (the test's own
        namespace has no route to the hosts), with bearer ``token`` if any.

        :returns: the body. :raises: ClusterError naming the request and what its
            server answered, if that is not a status of ``ok`` or there is no answer.
        """
        where = f'{method} http://{address}:{port}{path}'
        connection = http.client.HTTPConnection(address, port, timeout=HTTP_TIMEOUT)
        try:
            connection.sock = self.controller.connect(address, port, HTTP_TIMEOUT)
            headers = {'Authorization': f'Bearer {token}'} if token else {}
            connection.request(method, path, headers=headers)
            response = connection.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException, netns.NetnsError) as exc:
            raise ClusterError(f'{where}: no answer: {exc}') from exc
        finally:
            connection.close()
        if response.status not in ok:
            raise ClusterError(f'{where}: {response.status} '
                               f'{body.decode("utf-8", "replace")[-LOG_TAIL:]}')
        return body

    def warehouse_stats(self) -> dict:
        """The warehouse service's ``GET /v1/stats``: the bytes it stores, and its
        request counters since it started (``requests.chunk_get_bytes``: chunk bytes it
        sent, the repository's egress).

        :raises: ClusterError.
        """
        return json.loads(self.http(self.controller.address, WAREHOUSE_PORT, 'GET',
                                    f'{protocol.API}/stats', self.token))

    def manifest(self, image: str, version: int) -> manifest_mod.Manifest:
        """The warehouse's manifest of ``image:version``.

        :raises: ClusterError; CorruptManifest.
        """
        data = self.http(self.controller.address, WAREHOUSE_PORT, 'GET',
                         f'{protocol.API}/images/{image}/versions/{int(version)}', self.token)
        return manifest_mod.Manifest.decode(data, f'{image}:{version} of the warehouse')

    def peer_url(self, name: str) -> str:
        """Where the other compute hosts reach compute host ``name``'s peer chunk server."""
        return f'http://{self.computes[name].address}:{PEER_PORT}'

    def peer_stats(self, name: str) -> dict:
        """``GET /v1/stats`` of compute host ``name``'s peer chunk server (its mirror
        service): the live nodes it knows (``peers``), what it served, and what it
        fetched from the warehouse and had from peers since its mirror service started.

        :raises: ClusterError (also if the cloud runs no peer exchange).
        """
        if self.peer_replicas is None:
            raise ClusterError('this cloud runs no peer exchange: Cluster(peer_replicas=...)')
        return json.loads(self.http(self.computes[name].address, PEER_PORT, 'GET',
                                    f'{protocol.API}/stats', self.peer_token))

    def stage_chunk(self, name: str, chunk_id: str) -> None:
        """``POST /v1/chunks/ID/stage`` to compute host ``name``'s peer chunk server:
        answered once the host holds the chunk.

        :raises: ClusterError.
        """
        self.http(self.computes[name].address, PEER_PORT, 'POST',
                  f'{protocol.API}/chunks/{chunk_id}/stage', self.peer_token, ok=(204,))

    # -- the compute hosts' chunk caches ---------------------------------------------

    def cache_dir(self, name: str) -> str:
        """Compute host ``name``'s chunk cache directory."""
        return os.path.join(self.computes[name].state_dir, HOST_PATHS['mirror']['cache_path'])

    def cached_chunks(self, name: str) -> dict[str, 'CachedChunk']:
        """The chunks compute host ``name``'s chunk cache holds, as its journal says
        (vmcloud.mirror.cache), by chunk id.

        :raises: OSError.
        """
        return read_cache_journal(self.cache_dir(name))

    def corrupt_cached_chunks(self, name: str, chunk_ids: Sequence[str]) -> None:
        """Flip every byte of the chunks ``chunk_ids`` in compute host ``name``'s cache
        slot files, under its running mirror service: a disk that returns wrong data.
        The cache checked them when it stored them, and does not again.

        :raises: ClusterError for a chunk the cache does not hold; OSError.
        """
        held = self.cached_chunks(name)
        for chunk_id in chunk_ids:
            if chunk_id not in held:
                raise ClusterError(f'{name}: its chunk cache holds no chunk {chunk_id}')
            place = held[chunk_id]
            with open(place.path(self.cache_dir(name)), 'r+b') as f:
                f.seek(place.offset)
                data = f.read(place.length)
                f.seek(place.offset)
                f.write(bytes(b ^ 0xff for b in data))

    def wipe_chunk_cache(self, name: str) -> Service:
        """Compute host ``name``'s mirror service stopped, its chunk cache removed and the
        service started again (with an empty cache and fresh peer counters). It must
        serve no mirror: a guest's disk would go with it.

        :raises: ClusterError, NetnsError.
        """
        self.stop(f'mirrors-{name}')
        shutil.rmtree(self.cache_dir(name), ignore_errors=True)
        return self.restart(f'mirrors-{name}')

    def deploy(self, count: int, cmdline: str, memory_mib: int = 256, image: str = 'guest',
               wait: bool = True, timeout: float = CLI_TIMEOUT, health: str | None = None,
               health_timeout: float | None = None, cloud: str | None = None) -> dict:
        """``vmcloud deploy`` of ``count`` test guests booted from the imported kernel and
        initrd with ``cmdline``; with ``wait``, until none is building (``timeout`` s).
        ``health``: the deploy's ``--health`` (``tcp:80``, ``http:80/``, ...); ``cloud``:
        its ``--cloud`` (on that cloud's hosts).

        :raises: ClusterError.
        """
        args = ['deploy', image, '-n', str(count), '--memory', str(memory_mib),
                '--kernel', 'guest-kernel', '--initrd', 'guest-initrd', '--cmdline', cmdline]
        if cloud is not None:
            args += ['--cloud', cloud]
        if health is not None:
            args += ['--health', health]
        if health_timeout is not None:
            args += ['--health-timeout', str(health_timeout)]
        if wait:
            args += ['--wait', '--timeout', str(timeout)]
        return self.cli_json(*args, timeout=timeout + 60)

    def wait_for(self, what: str, look: Callable[[], object],
                 done: Callable[[object], bool], timeout: float,
                 interval: float = 1.0) -> object:
        """``look()`` again every ``interval`` s until ``done`` of its answer.

        :returns: the last answer. :raises: ClusterError naming ``what`` and the last
            answer after ``timeout`` s.
        """
        deadline = time.monotonic() + timeout
        while True:
            seen = look()
            if done(seen):
                return seen
            if time.monotonic() >= deadline:
                raise ClusterError(f'waited {timeout:g} s for {what}; last seen: '
                                   f'{json.dumps(seen, default=str)[-LOG_TAIL:]}')
            time.sleep(interval)

    def gateway_state(self) -> dict:
        """The dispatcher's ``gateway_state()``: what the gateway serves, and the hosts'
        loads it weighs.

        :raises: ClusterError with the snippet's stderr if it fails.
        """
        done = self.controller.run([sys.executable, '-c', GATEWAY_STATE, self.cli_config],
                                   timeout=CLI_TIMEOUT, check=False)
        if done.returncode != 0:
            raise ClusterError(f'gateway_state failed ({done.returncode}): '
                               f'{done.stderr.strip()[-LOG_TAIL:]}')
        return json.loads(done.stdout)

    def host_states(self) -> dict[str, str]:
        """Every compute host's state as the dispatcher sees it (``vmcloud hosts``)."""
        return {h['name']: h.get('state', 'up' if h['up'] else 'down')
                for h in self.cli_json('hosts')}

    def wait_host_states(self, wanted: dict[str, str], timeout: float = SERVICE_TIMEOUT
                         ) -> dict[str, str]:
        """Wait until every host of ``wanted`` is in its state. :raises: ClusterError."""
        return self.wait_for(f'hosts {wanted}', self.host_states,
                             lambda seen: all(seen.get(h) == s for h, s in wanted.items()),
                             timeout)

    def deployment(self, deployment_id: str) -> dict:
        return self.cli_json('show', deployment_id)

    def wanted_guests(self) -> dict[str, set[str]]:
        """host -> the instances the dispatcher wants running there (building, active,
        unknown), over every deployment."""
        wanted: dict[str, set[str]] = {name: set() for name in self.computes}
        for listed in self.cli_json('list'):
            for instance in self.deployment(listed['id'])['instances']:
                if instance['host'] and instance['state'] in RUNNING_STATES:
                    wanted.setdefault(instance['host'], set()).add(instance['name'])
        return wanted

    def guests(self, host: str) -> dict[str, list[int]]:
        """The qemu processes running on compute host ``host``: instance name -> pids."""
        return _guests(self.network.hosts[host].processes())

    def guest_status(self, host: str, instance: str) -> str:
        """QMP ``query-status`` of ``instance``'s qemu on ``host`` (running, paused...).

        :raises: ClusterError if its monitor does not answer within QMP_TIMEOUT.
        """
        path = os.path.join(self.computes[host].state_dir,
                            HOST_PATHS['compute']['instances_path'], instance, 'qmp.sock')
        try:
            return qmp_status(path, QMP_TIMEOUT)
        except (OSError, ValueError) as exc:
            raise ClusterError(f'{host}: the monitor of {instance} ({path}) did not answer '
                               f'query-status: {exc}') from exc

    def problems(self, wanted: dict[str, set[str]] | None = None) -> list[str]:
        """What is wrong with the processes of the cloud, one line each; empty when every
        process of every host is a running service, a process one started (not a
        guest), or the one qemu of an instance the dispatcher wants on that host
        (``wanted``, by default ``wanted_guests()``), running, not paused."""
        wanted = self.wanted_guests() if wanted is None else wanted
        problems = []
        for name, host in self.network.hosts.items():
            processes = host.processes()
            by_pid = {p.pid: p for p in processes}
            roots = {s.process.pid for s in self.services.values() if s.host is host
                     and s.process.poll() is None}
            guests = _guests(processes)
            for process in processes:
                if (not _is_qemu(process) and process.program not in DAEMONS
                        and not _descends(process, roots, by_pid)):
                    problems.append(f'{name}: orphaned process {process}')
            for instance, pids in sorted(guests.items()):
                if instance not in wanted.get(name, ()):
                    problems.append(f'{name}: orphaned guest {instance} (qemu {pids})')
                elif len(pids) > 1:
                    problems.append(f'{name}: {len(pids)} qemu processes run {instance}: '
                                    f'{pids}')
            for instance in sorted(wanted.get(name, ())):
                if instance not in guests:
                    problems.append(f'{name}: {instance} is wanted there but no qemu runs it')
                    continue
                try:
                    status = self.guest_status(name, instance)
                except ClusterError as exc:
                    problems.append(str(exc))
                    continue
                if status != 'running':
                    problems.append(f'{name}: guest {instance} is {status}')
        return problems

    def wait_no_problems(self, timeout: float = 60.0,
                         wanted: dict[str, set[str]] | None = None) -> list[str]:
        """Wait (bounded) for ``problems()`` to be empty: a guest being destroyed or a
        helper process exiting takes a moment. :returns: what is still wrong."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.problems(wanted)
            if not found or time.monotonic() >= deadline:
                return found
            time.sleep(2)

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

    def network_leftovers(self, host: str) -> list[str]:
        """What vmcloud made of guest networks on host ``host`` (a compute or gateway
        host) and is still there, one line each: its devices (bridges, VXLAN devices,
        veths, taps), its agent's DHCP namespaces, dnsmasq processes naming its state
        directory, the bridges' nftables guards and the gateway's forward guard.

        :raises: NetnsError.
        """
        node = self.network.hosts[host]
        links = json.loads(node.run(['ip', '-j', 'link', 'show']).stdout or '[]')
        found = [f'{host}: link {link["ifname"]}' for link in links
                 if NETWORK_DEVICE.match(link['ifname'])]
        found += [f'{host}: netns {n}' for n in netns.agent_namespaces([node.state_dir])]
        found += [f'{host}: dnsmasq {p}' for p in node.processes() if p.program == 'dnsmasq']
        # The bridges' guards (nftables netdev tables, doc/networking.md).
        for family in ('netdev', 'inet'):
            tables = node.run(['nft', 'list', 'tables', family]).stdout.split()
            found += [f'{host}: nft {family} {t}' for t in tables if t.startswith('vmcloud_')]
        return found

    def agent_namespace(self, host: str, vni: int) -> str:
        """The DHCP namespace of network ``vni`` on compute host ``host`` (whether or
        not it exists): where health checks, and a test, reach its guests from."""
        return f'vmcloud-{int(vni)}-{netns.agent_tag(self.computes[host].state_dir)}'

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


@dataclasses.dataclass(frozen=True)
class CachedChunk:
    """Where a chunk cache keeps one chunk: slot ``slot`` of its slot file of
    ``slot_size`` bytes a slot, the chunk's ``length`` bytes first in it."""
    slot_size: int
    slot: int
    length: int

    def path(self, cache_dir: str) -> str:
        return os.path.join(cache_dir, f'slots-{self.slot_size}')

    @property
    def offset(self) -> int:
        return self.slot * self.slot_size


def read_cache_journal(cache_dir: str) -> dict[str, CachedChunk]:
    """The chunks a chunk cache's journal says it holds, read as the cache reads it
    (vmcloud.mirror.cache: of each slot its last record; a torn record ends the
    journal), of each chunk its last slot. A chunk evicted since, whose slot nothing
    took yet, is still listed (the cache drops it when it opens the journal again).

    :raises: OSError (no journal: FileNotFoundError); MirrorError (a journal format
        this vmcloud does not read).
    """
    path = os.path.join(cache_dir, 'journal')
    with open(path, 'rb') as f:
        data = f.read()
    # The cache's own reader, not a copy of its format: the journal is the cache's,
    # versioned with it. It needs of its cache only the journal's path.
    records = cache_mod.ChunkCache._records(types.SimpleNamespace(_journal_path=lambda: path),
                                            data)
    by_slot: dict[tuple[int, int], tuple[str, int]] = {}
    for raw_id, slot_size, slot, length, _flags in records:
        by_slot.pop((slot_size, slot), None)  # re-inserted last: records stay in order
        by_slot[(slot_size, slot)] = raw_id.hex(), length
    return {chunk_id: CachedChunk(slot_size, slot, length)
            for (slot_size, slot), (chunk_id, length) in by_slot.items()}


def render_rabbitmq(address: str, user: str, password: str) -> str:
    """rabbitmq.conf: one listener on ``address``, ``user`` created on the first boot
    (only guest is limited to loopback logins, and no guest is created)."""
    return (f'listeners.tcp.default = {address}:{RABBITMQ_PORT}\n'
            f'default_user = {user}\ndefault_pass = {password}\n'
            # The state directory's disk is shared with 4 other engineers' tests.
            'disk_free_limit.absolute = 50MB\n')


# Instances the dispatcher wants running (vmcloud.dispatcher.states.RUNNING_STATES,
# spelled here so that the harness reads the CLI's answers as an operator would).
RUNNING_STATES = ('building', 'active', 'unknown')


def _is_qemu(process: netns.Process) -> bool:
    return process.program.startswith('qemu-system')


def _guests(processes: list[netns.Process]) -> dict[str, list[int]]:
    """The qemu processes among ``processes``: instance name (their ``-name``) -> pids."""
    found: dict[str, list[int]] = {}
    for process in filter(_is_qemu, processes):
        argv = list(process.argv)
        try:
            name = argv[argv.index('-name') + 1].split(',')[0]
        except (ValueError, IndexError):
            name = f'(no -name: pid {process.pid})'
        found.setdefault(name, []).append(process.pid)
    return found


def _descends(process: netns.Process, roots: set[int], by_pid: dict) -> bool:
    """Whether ``process`` is one of ``roots`` or started, directly or not, by one."""
    seen = set()
    while process is not None and process.pid not in seen:
        if process.pid in roots:
            return True
        seen.add(process.pid)
        process = by_pid.get(process.ppid) or netns.read_process(process.ppid)
    return False


def qmp_status(path: str, timeout: float) -> str:
    """QMP ``query-status`` on the monitor socket ``path``, every step bounded by
    ``timeout`` (the monitor serves one client at a time: a connection made while the
    compute service holds one waits for it).

    :raises: OSError, ValueError (an answer that is not QMP).
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        stream = sock.makefile('rwb')

        def answer() -> dict:
            while True:  # events may come first
                line = stream.readline()
                if not line:
                    raise ValueError('the monitor closed the connection')
                message = json.loads(line)
                if 'return' in message or 'error' in message:
                    return message
        if 'QMP' not in json.loads(stream.readline() or b'{}'):
            raise ValueError('no QMP greeting')
        for command in ('qmp_capabilities', 'query-status'):
            stream.write(json.dumps({'execute': command}).encode() + b'\n')
            stream.flush()
            reply = answer()
            if 'error' in reply:
                raise ValueError(f'{command}: {reply["error"]}')
        return reply['return']['status']


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


def _read(path: str) -> str:
    try:
        with open(path, 'rb') as f:
            return f.read().decode('utf-8', 'replace')
    except OSError:
        return ''
