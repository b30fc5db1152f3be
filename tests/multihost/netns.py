"""Hosts emulated on this one machine: a network namespace each, wired to one switch.

    with netns.Network() as net:
        repo = net.add_host('repo', rate='1gbit')
        compute = net.add_host('compute')
        server = repo.popen(['some-server', '--listen', repo.address])
        compute.wait_for_tcp(repo.address, 9494, timeout=30)
        compute.run(['curl', f'http://{repo.address}:9494/'])

Topology: every host is a namespace ``vmcnet-<pid>-<tag>-<name>`` whose ``eth0``
is one end of a veth pair; the other end is a port of bridge ``br0`` in a
"switch" namespace. A bridge rather than point-to-point pairs because N hosts need
N links instead of N*(N-1)/2, and each host's link is shaped on its own, like a
host's NIC and its switch port: ``tc`` netem (rate, delay) on the host's
``eth0`` (what the host sends) and on its switch port (what it receives), so
shaping is symmetric and traffic between two hosts crosses both hosts' links.
Rate is shaped with tbf; an added delay needs netem, which this CI kernel lacks
(Host.shape says so instead of silently not delaying).

Isolation: both ends of every veth are created directly inside the namespaces,
so no device ever appears in the machine's own namespace and names cannot clash
with anyone else's. Addresses come from a private range (10.77.0.0/24 by
default), assigned only inside the namespaces, and no namespace has a default
route: nothing can leave them. Loopback is up in every host.

Faults: a host's link goes down and up (``Host.link_down``: carrier lost, as when
a cable is pulled or a switch port dies), or its packets to one address are
dropped by an nftables table inside its namespace (``Host.dropping``: no reset,
no ICMP, a connection hangs as to a dead machine); both are undone when their
block ends, also when it fails. ``Host.processes`` finds every process of a host
by its network namespace, so one that left its parent's process group is found.

Mounts: ``Host.run`` and ``Host.popen`` use ``ip netns exec``, whose private mount
namespace has a /sys of the host's namespace. A vmcloud compute service runs the
network agent, which makes namespaces of its own (``ip netns add`` mounts them in
/run/netns): those mounts must reach the machine, or no other process sees them.
``popen(..., machine_mounts=True)`` enters only the host's network namespace
(nsenter) and then mounts a sysfs of it privately, so the agent's namespaces are
everyone's while /sys still shows the host's devices (the drivers read bridges and
MTUs there).

Sockets and cgroups: ``Host.connect`` makes a connection from the host in the calling
thread (setns for the socket's creation only), so a test holds hundreds of a host's
connections without a process each; ``popen(..., cgroup=DIR)`` starts a process, and
so everything it starts, in a cgroup v2 directory (a host's CPU load measured alone).
``Host.forward`` carries the connections to a local port of the machine's namespace
(which has no route to the hosts) to an address as the host reaches it: a browser
running outside the emulated network uses a service inside it.

Cleanup: a Network deletes every namespace it created (which removes every
veth, the bridge and the qdiscs with them), stops every process it started
(and any other process still inside its namespaces), and removes the hosts'
state directories, also when the block fails or is interrupted. Each namespace
is registered for cleanup before it is created. The network agent of a host names
its DHCP namespaces ``vmcloud-<vni>-<tag>``, the tag derived from its state
directory (``agent_namespaces``): they are not inside the host's namespace, so the
Network deletes them too (and the dnsmasq in them). A process killed before it
could clean up leaves namespaces named with its dead pid: ``sweep_stale()``
(called by every Network on entry) removes them and its hosts' agent namespaces.
Every command and every wait is bounded in time. Needs root (CAP_NET_ADMIN,
CAP_SYS_ADMIN).
"""
import contextlib
import ctypes
import dataclasses
import hashlib
import ipaddress
import json
import os
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence

from vmcloud import exception

PREFIX = 'vmcnet'
DEFAULT_SUBNET = '10.77.0.0/24'
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_STATE_ROOT = os.path.join(REPO, '.cache', 'netns')

# One ip/tc command; they return in milliseconds unless the kernel is stuck.
COMMAND_TIMEOUT = 30.0
# A process gets this long to exit after SIGTERM, then again after SIGKILL.
STOP_TIMEOUT = 5.0
_NAME = re.compile(r'^[a-z][a-z0-9]{0,11}$')
_NAMESPACE = re.compile(rf'^{PREFIX}-(\d+)-([0-9a-f]+)-([a-z0-9]+)$')


# Programs a test runs inside a host with ``sys.executable -c``: an HTTP server answering
# every GET with ``argv[1]`` on address ``argv[2]``, port ``argv[3]``; a GET of URL
# ``argv[1]`` within ``argv[2]`` seconds, printing the body (exit 1 if it fails).
HTTP_SERVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = (sys.argv[1] + "\\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.HTTPServer((sys.argv[2], int(sys.argv[3])), H).serve_forever()
"""

HTTP_FETCH = """
import sys, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])).read().decode(), end="")
except OSError as exc:
    print(exc, file=sys.stderr)
    sys.exit(1)
"""
# Where a host's network agent keeps its state ([network] state_dir, as
# tests/multihost/cluster.py sets it) and how the agent names its DHCP namespaces
# (vmcloud/network/agent.py: the tag is sha1 of that directory's real path).
AGENT_STATE_LEAF = 'network'
_AGENT_NAMESPACE = re.compile(r'^vmcloud-\d+-([0-9a-f]{8})$')
# A host's own namespaces only: its sysfs, so /sys/class/net lists its devices; the
# /run/netns mounts its processes make are the machine's (see "Mounts" above).
_OWN_SYSFS = 'mount --make-rprivate /sys && mount -t sysfs sysfs /sys && exec "$@"'
# A process that moves itself into the cgroup v2 directory $0 and becomes "$@": before
# ``ip netns exec`` or the own sysfs above, whose /sys no longer shows the cgroup mounts.
_INTO_CGROUP = 'echo $$ > "$0/cgroup.procs" && exec "$@"'
_CLONE_NEWNET = 0x40000000
# A forwarder's bounds (Host.forward): connections it carries at once (a browser opens
# about 6 per origin), the seconds a connection into the host, or a send either way,
# may take, and how often its threads look whether it is closing.
FORWARD_CONNECTIONS = 32
FORWARD_IO_TIMEOUT = 30.0
FORWARD_POLL = 0.2
FORWARD_THREAD = 'netns-forward'


class NetnsError(exception.VmcloudError):
    """A namespace, link or process of the harness could not be set up."""


def _command(argv: Sequence[str], timeout: float = COMMAND_TIMEOUT) -> str:
    """Run ``argv``; its stdout.

    :raises: NetnsError naming the command and its stderr if it fails or hangs.
    """
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetnsError(f'{" ".join(argv)}: {exc}') from exc
    if done.returncode != 0:
        raise NetnsError(f'{" ".join(argv)} failed ({done.returncode}): '
                         f'{done.stderr.strip() or done.stdout.strip()}')
    return done.stdout


def namespaces() -> list[str]:
    """The names of every network namespace on the machine.

    :raises: NetnsError.
    """
    out = _command(['ip', '-j', 'netns', 'list']).strip()
    return [entry['name'] for entry in json.loads(out or '[]')]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_inside(namespace: str) -> None:
    """SIGKILL every process inside ``namespace`` (but this one) and wait (bounded)
    until they are gone; never raises."""
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        try:
            pids = [int(p) for p in _command(['ip', 'netns', 'pids', namespace]).split()]
        except NetnsError:
            return  # already gone
        pids = [p for p in pids if p != os.getpid()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def delete_namespace(namespace: str) -> None:
    """Remove ``namespace`` and everything in it, processes first (a namespace deleted
    while a daemon runs in it lives on, unnamed, with the daemon); never raises (best
    effort, logged)."""
    kill_inside(namespace)
    try:
        if namespace in namespaces():
            _command(['ip', 'netns', 'delete', namespace])
    except NetnsError as exc:
        print(f'netns: cannot delete {namespace}: {exc}', file=sys.stderr)


def agent_tag(state_dir: str) -> str:
    """The tag of the DHCP namespaces the network agent of the host whose state
    directory is ``state_dir`` makes (it need not exist any more)."""
    return _tag(os.path.join(state_dir, AGENT_STATE_LEAF))


def _tag(path: str) -> str:
    return hashlib.sha1(os.path.realpath(path).encode()).hexdigest()[:8]


def agent_namespaces(state_dirs: Sequence[str], present: Sequence[str] | None = None
                     ) -> list[str]:
    """The network agents' DHCP namespaces of the hosts with these state directories:
    of an agent whose state is in AGENT_STATE_LEAF of one (as the cluster's compute
    hosts keep it) or in the directory itself (as tests of the agent alone do).

    :raises: NetnsError if the namespaces cannot be listed.
    """
    tags = {t for d in state_dirs for t in (agent_tag(d), _tag(d))}
    return [n for n in (namespaces() if present is None else present)
            if (m := _AGENT_NAMESPACE.match(n)) and m.group(1) in tags]


def _stale_owner(argv: Sequence[str]) -> bool:
    """Whether ``argv`` names a state directory of a harness host whose creating
    process is dead (a dnsmasq's --pid-file under it)."""
    root = os.path.realpath(DEFAULT_STATE_ROOT) + os.sep
    for arg in argv:
        path = arg.partition('=')[2] or arg
        if path.startswith(root):
            match = _NAMESPACE.match(path[len(root):].split(os.sep)[0])
            if match and not _alive(int(match.group(1))):
                return True
    return False


def sweep_stale() -> list[str]:
    """Delete the namespaces of this harness whose creating process is dead, and the
    agent namespaces of their hosts: named after a stale host's state directory, or
    holding a process (dnsmasq) that names one. A namespace of a live run, or of
    anyone else, is left alone.

    :returns: the namespaces deleted.
    :raises: NetnsError if the namespaces cannot be listed.
    """
    swept = []
    present = namespaces()
    stale_dirs = []
    for namespace in present:
        match = _NAMESPACE.match(namespace)
        if match and not _alive(int(match.group(1))):
            delete_namespace(namespace)
            swept.append(namespace)
            stale_dirs.append(os.path.join(DEFAULT_STATE_ROOT, namespace))
    with contextlib.suppress(OSError):
        stale_dirs += [os.path.join(DEFAULT_STATE_ROOT, entry)
                       for entry in os.listdir(DEFAULT_STATE_ROOT)
                       if (m := _NAMESPACE.match(entry)) and not _alive(int(m.group(1)))]
    doomed = set(agent_namespaces(stale_dirs, present))
    for namespace in present:
        if _AGENT_NAMESPACE.match(namespace) and namespace not in doomed:
            try:
                pids = [int(p) for p in _command(['ip', 'netns', 'pids', namespace]).split()]
            except NetnsError:
                continue
            if any((p := read_process(pid)) and _stale_owner(p.argv) for pid in pids):
                doomed.add(namespace)
    for namespace in sorted(doomed):
        delete_namespace(namespace)
        swept.append(namespace)
    for path in stale_dirs:
        shutil.rmtree(path, ignore_errors=True)
    return swept


@dataclasses.dataclass(frozen=True)
class Process:
    """A process as /proc shows it."""
    pid: int
    ppid: int
    #: the one-letter state of /proc/PID/stat (Z: a zombie)
    state: str
    argv: tuple[str, ...]

    @property
    def program(self) -> str:
        return os.path.basename(self.argv[0]) if self.argv else ''

    def __str__(self) -> str:
        return f'{self.pid} {" ".join(self.argv)[:200]}'


def read_process(pid: int) -> Process | None:
    """``pid`` from /proc, or None if it is gone."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            fields = f.read().rsplit(')', 1)[1].split()
        with open(f'/proc/{pid}/cmdline', 'rb') as f:
            argv = tuple(a.decode('utf-8', 'replace') for a in f.read().split(b'\0') if a)
    except (OSError, IndexError):
        return None
    return Process(pid, int(fields[1]), fields[0], argv)


def _setns(fd: int, what: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise NetnsError(f'cannot enter the network namespace of {what}: '
                         f'{os.strerror(errno)}')


@contextlib.contextmanager
def _entered(path: str, what: str):
    """The calling thread in the network namespace ``path`` for the block (setns moves
    one thread only: the process's other threads stay where they are), back in its own
    afterwards, also when the block fails.

    :raises: NetnsError.
    """
    try:
        own = os.open('/proc/thread-self/ns/net', os.O_RDONLY)
    except OSError as exc:
        raise NetnsError(f'cannot open this thread\'s network namespace: {exc}') from exc
    try:
        try:
            target = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise NetnsError(f'no network namespace of {what}: {exc}') from exc
        try:
            _setns(target, what)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own, 'this thread (back from ' + what + ')')
    finally:
        os.close(own)


def _pids() -> list[int]:
    return [int(p) for p in os.listdir('/proc') if p.isdigit()]


class Host:
    """One emulated host: a network namespace, its address and a state directory."""

    def __init__(self, network: 'Network', name: str, namespace: str, address: str,
                 port: str, state_dir: str):
        self.network = network
        self.name = name
        self.namespace = namespace
        self.address = address
        #: this host's port on the switch (in the switch's namespace)
        self.port = port
        self.state_dir = state_dir

    def __repr__(self) -> str:
        return f'Host({self.name}, {self.address})'

    def command(self, argv: Sequence[str], machine_mounts: bool = False,
                cgroup: str | None = None) -> list[str]:
        """``argv`` as run inside this host: in a private mount namespace (``ip netns
        exec``), or with ``machine_mounts`` in the machine's, but for a sysfs of the
        host's own (see "Mounts" above); with ``cgroup`` (a cgroup v2 directory) in
        that cgroup, and so are the processes it starts."""
        if not machine_mounts:
            inside = ['ip', 'netns', 'exec', self.namespace, *argv]
        else:
            inside = ['nsenter', f'--net=/run/netns/{self.namespace}', '--',
                      'unshare', '--mount', '--propagation', 'unchanged', '--',
                      'sh', '-c', _OWN_SYSFS, 'sh', *argv]
        if cgroup is None:
            return inside
        return ['sh', '-c', _INTO_CGROUP, cgroup, *inside]

    def run(self, argv: Sequence[str], timeout: float = 60.0, check: bool = True,
            **kwargs) -> subprocess.CompletedProcess:
        """Run ``argv`` inside this host and wait for it (output captured as text unless
        ``kwargs`` say otherwise).

        :raises: NetnsError if it fails (``check``) or outlives ``timeout``.
        """
        kwargs.setdefault('capture_output', True)
        kwargs.setdefault('text', True)
        try:
            done = subprocess.run(self.command(argv), timeout=timeout, **kwargs)
        except subprocess.TimeoutExpired as exc:
            raise NetnsError(f'{self.name}: {" ".join(argv)} ran longer than {timeout:g} s'
                             ) from exc
        if check and done.returncode != 0:
            raise NetnsError(f'{self.name}: {" ".join(argv)} failed ({done.returncode}): '
                             f'{(done.stderr or "").strip()[-2000:]}')
        return done

    def popen(self, argv: Sequence[str], machine_mounts: bool = False,
              cgroup: str | None = None, **kwargs) -> subprocess.Popen:
        """Start ``argv`` inside this host in a session of its own (``machine_mounts``,
        ``cgroup``: see ``command``); the Network stops it (SIGTERM to its process
        group, then SIGKILL) when it closes, if it still runs.

        :raises: NetnsError if it cannot be started.
        """
        try:
            process = subprocess.Popen(self.command(argv, machine_mounts, cgroup),
                                       start_new_session=True, **kwargs)
        except OSError as exc:
            raise NetnsError(f'{self.name}: cannot start {" ".join(argv)}: {exc}') from exc
        self.network.processes.append(process)
        return process

    def new_socket(self, family: int = socket.AF_INET,
                   kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket of this host's network: made while the calling thread is in the
        host's namespace (a socket keeps the namespace it was made in), so that a test
        holds hundreds of connections of a host without a process per connection.

        :raises: NetnsError if the namespace cannot be entered or left.
        """
        with _entered(f'/run/netns/{self.namespace}', self.name):
            return socket.socket(family, kind)

    def connect(self, address: str, port: int, timeout: float) -> socket.socket:
        """A TCP connection from this host to ``address:port`` (``timeout`` s to connect,
        and then for every operation on it).

        :raises: OSError (refused, unreachable, timed out), NetnsError.
        """
        sock = self.new_socket()
        try:
            sock.settimeout(timeout)
            sock.connect((address, int(port)))
        except BaseException:
            sock.close()
            raise
        return sock

    @contextlib.contextmanager
    def forward(self, address: str, port: int, limit: int = FORWARD_CONNECTIONS):
        """A TCP port of 127.0.0.1 in the calling thread's namespace (the machine's,
        which has no route to the hosts) whose every connection is carried to
        ``address:port`` as this host reaches it (``connect``): a browser of the
        machine's talks to a service inside the emulated network. At most ``limit``
        connections at once (one more is closed at once); every socket and thread of
        it closed when the block ends, also when it fails.

        :returns: (yields) the local port.
        :raises: OSError if the local port cannot be opened.
        """
        forwarder = Forwarder(self, address, port, limit)
        try:
            yield forwarder.port
        finally:
            forwarder.close()

    def counters(self) -> dict[str, int]:
        """Bytes and packets this host's ``eth0`` sent and received (the kernel's
        counts per frame handed to the link: headers included).

        :raises: NetnsError.
        """
        out = _command(['ip', '-n', self.namespace, '-j', '-s', 'link', 'show', 'eth0'])
        stats = json.loads(out)[0]['stats64']
        return {'tx_bytes': stats['tx']['bytes'], 'rx_bytes': stats['rx']['bytes'],
                'tx_packets': stats['tx']['packets'], 'rx_packets': stats['rx']['packets']}

    def shape(self, rate: str | None = None, delay: str | None = None,
              burst: str = '128kb') -> None:
        """Shape this host's link in both directions: at most ``rate`` (tc units:
        ``1gbit``; tbf, ``burst`` bytes may pass at once) and ``delay`` added each
        way (``0.1ms``; netem, whose own rate then replaces tbf); both None
        removes the shaping.

        :raises: NetnsError, naming the missing qdisc if the kernel lacks it
            (this CI kernel has tbf and htb but no netem: no added delay).
        """
        for namespace, device in ((self.namespace, 'eth0'),
                                  (self.network.switch, self.port)):
            base = ['tc', '-n', namespace, 'qdisc', 'replace', 'dev', device, 'root']
            if delay is not None:
                args = base + ['netem', 'limit', '100000', 'delay', delay]
                args += ['rate', rate] if rate is not None else []
            elif rate is not None:
                # latency: the longest a packet may queue before tbf drops it.
                args = base + ['tbf', 'rate', rate, 'burst', burst, 'latency', '20ms']
            else:
                args = base + ['pfifo_fast']
            try:
                _command(args)
            except NetnsError as exc:
                if 'unknown' in str(exc):
                    raise NetnsError(f'this kernel has no {args[len(base)]} qdisc '
                                     f'(CONFIG_NET_SCH_{args[len(base)].upper()}): '
                                     f'cannot shape {self.name}\'s link') from exc
                raise

    def set_mtu(self, mtu: int) -> None:
        """Set the MTU of this host's link (both veth ends; the bridge follows its
        smallest port). New TCP connections use it; open ones keep their MSS.

        :raises: NetnsError.
        """
        _command(['ip', '-n', self.network.switch, 'link', 'set', self.port, 'mtu', str(mtu)])
        _command(['ip', '-n', self.namespace, 'link', 'set', 'eth0', 'mtu', str(mtu)])

    def count_frames(self, on: bool = True) -> None:
        """Whether this host sends one frame per packet the kernel counts (``on``:
        no GSO super-packets larger than the MTU), so counters() counts frames as
        a NIC would put them on a wire; off restores the default (64 KiB), faster.

        :raises: NetnsError.
        """
        mtu = json.loads(_command(['ip', '-n', self.namespace, '-j', 'link', 'show',
                                   'eth0']))[0]['mtu']
        size = mtu if on else 65536
        _command(['ip', '-n', self.namespace, 'link', 'set', 'eth0', 'gso_max_size', str(size)])

    def set_link(self, up: bool) -> None:
        """This host's ``eth0`` up or down: down, the switch port loses its carrier and
        nothing crosses; up, the address and its route are back at once.

        :raises: NetnsError.
        """
        _command(['ip', '-n', self.namespace, 'link', 'set', 'eth0', 'up' if up else 'down'])

    @contextlib.contextmanager
    def link_down(self, seconds: float = 0.0):
        """This host's link down for the block and, if the block ends sooner, until
        ``seconds`` after it went down; up again afterwards, also if the block fails.

        :raises: NetnsError.
        """
        self.set_link(False)
        went_down = time.monotonic()
        try:
            yield self
            time.sleep(max(0.0, went_down + seconds - time.monotonic()))
        finally:
            self.set_link(True)

    @contextlib.contextmanager
    def dropping(self, address: str, port: int | None = None):
        """Every packet between this host and ``address`` (TCP ``port`` of it only, if
        given) dropped for the block, both ways, by an nftables table inside this
        host's namespace (its ``output`` and ``input`` hooks): nothing is refused, a
        connection hangs as to a dead machine. The table goes when the block ends.

        :raises: NetnsError.
        """
        table = f'vmcnet_drop_{secrets.token_hex(3)}'
        out = f'ip daddr {address}' + (f' tcp dport {int(port)}' if port else '')
        back = f'ip saddr {address}' + (f' tcp sport {int(port)}' if port else '')
        rules = (f'table inet {table} {{\n'
                 f' chain output {{ type filter hook output priority 0; {out} drop; }}\n'
                 f' chain input {{ type filter hook input priority 0; {back} drop; }}\n'
                 '}\n')
        self.run(['nft', '-f', '-'], input=rules, timeout=COMMAND_TIMEOUT)
        try:
            yield self
        finally:
            self.run(['nft', 'delete', 'table', 'inet', table], timeout=COMMAND_TIMEOUT)

    def processes(self) -> list[Process]:
        """Every process whose network namespace is this host's (a child that left its
        parent's session or process group is still in it), and every other whose
        command line names this host's state directory; zombies left out.

        :raises: NetnsError if the namespace is gone.
        """
        try:
            inode = os.stat(f'/run/netns/{self.namespace}').st_ino
        except OSError as exc:
            raise NetnsError(f'{self.name}: no namespace {self.namespace}: {exc}') from exc
        found = []
        for pid in _pids():
            try:
                inside = os.stat(f'/proc/{pid}/ns/net').st_ino == inode
            except OSError:
                continue
            process = read_process(pid)
            if process is None or process.state == 'Z':
                continue
            if inside or any(self.state_dir in arg for arg in process.argv):
                found.append(process)
        return found

    def wait_for_tcp(self, address: str, port: int, timeout: float,
                     process: subprocess.Popen | None = None) -> None:
        """Wait until a TCP connection from this host to ``address:port`` succeeds.

        :raises: NetnsError after ``timeout`` seconds, or at once if ``process``
            (the server expected to listen) has exited.
        """
        deadline = time.monotonic() + timeout
        probe = ('import socket,sys\n'
                 'try:\n'
                 f' socket.create_connection(({address!r}, {int(port)}), timeout=1).close()\n'
                 'except OSError:\n'
                 ' sys.exit(1)\n')
        while True:
            if process is not None and process.poll() is not None:
                raise NetnsError(f'{self.name}: the server for {address}:{port} exited '
                                 f'({process.returncode}) before it listened')
            if self.run([sys.executable, '-c', probe], timeout=10, check=False).returncode == 0:
                return
            if time.monotonic() >= deadline:
                raise NetnsError(f'{self.name}: nothing listens on {address}:{port} after '
                                 f'{timeout:g} s')
            time.sleep(0.1)


class _Pair:
    """A connection accepted outside and its twin made from the host: two pumps carry
    its bytes, the one that ends last closes both sockets."""

    def __init__(self, outside: socket.socket, inside: socket.socket):
        self.sockets = (outside, inside)
        self._lock = threading.Lock()
        self._running = 2

    def pump_ended(self) -> bool:
        """Count one pump out. :returns: whether it was the last."""
        with self._lock:
            self._running -= 1
            return self._running == 0

    def shut(self) -> None:
        """Both connections shut both ways, so that both pumps see their end at once;
        never raises."""
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


class Forwarder:
    """Connections to a local port carried to ``address:port`` as a host reaches it
    (see Host.forward): a listening socket in the creating thread's namespace, an
    accepting thread, and per connection two pump threads (one each way)."""

    def __init__(self, host: Host, address: str, port: int,
                 limit: int = FORWARD_CONNECTIONS):
        """:raises: OSError if the local port cannot be opened."""
        self.host = host
        self.target = (address, int(port))
        self.limit = limit
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._pairs: set[_Pair] = set()
        self._threads: list[threading.Thread] = []
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.listener.bind(('127.0.0.1', 0))
            self.listener.listen(limit)
            # So that the accepting thread sees a close within FORWARD_POLL.
            self.listener.settimeout(FORWARD_POLL)
        except BaseException:
            self.listener.close()
            raise
        self.port = self.listener.getsockname()[1]
        self._acceptor = self._thread(self._accept, 'accept')

    def _thread(self, target, what: str, *args) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, daemon=True,
                                  name=f'{FORWARD_THREAD}-{self.port}-{what}')
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()
        return thread

    def _refuse(self, outside: socket.socket, why: str) -> None:
        print(f'netns: forward 127.0.0.1:{self.port} -> {self.host.name} '
              f'{self.target[0]}:{self.target[1]}: {why}', file=sys.stderr)
        outside.close()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                outside, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return  # the listener closed
            with self._lock:
                full = len(self._pairs) >= self.limit
            if full:
                self._refuse(outside, f'more than {self.limit} connections at once')
                continue
            self._thread(self._carry, 'pump', outside)

    def _carry(self, outside: socket.socket) -> None:
        """Connect from the host (in this thread, so that the accepting one never waits
        on it), then pump outside -> inside here, the other way in a thread of its own."""
        try:
            inside = self.host.connect(*self.target, FORWARD_IO_TIMEOUT)
        except (OSError, NetnsError) as exc:
            self._refuse(outside, f'cannot connect: {exc}')
            return
        outside.settimeout(FORWARD_IO_TIMEOUT)
        pair = _Pair(outside, inside)
        with self._lock:
            if self._closing.is_set():
                pair.close()
                return
            self._pairs.add(pair)
        self._thread(self._pump, 'pump', pair, inside, outside)
        self._pump(pair, outside, inside)

    def _pump(self, pair: _Pair, source: socket.socket, sink: socket.socket) -> None:
        try:
            while not self._closing.is_set():
                readable, _, _ = select.select([source], [], [], FORWARD_POLL)
                if not readable:
                    continue
                data = source.recv(65536)
                if not data:
                    # A half close passes on: the other way may still carry an answer.
                    sink.shutdown(socket.SHUT_WR)
                    return
                sink.sendall(data)
        except (OSError, ValueError):
            # A reset or a stuck send ends the other way too; ValueError: close() closed
            # the socket of a pump that did not end in time.
            pair.shut()
        finally:
            if pair.pump_ended():
                with self._lock:
                    self._pairs.discard(pair)
                pair.close()

    def close(self) -> None:
        """Stop accepting, end every connection, wait (bounded) for every thread. Never
        raises."""
        self._closing.set()
        self.listener.close()
        with self._lock:
            pairs = list(self._pairs)
            threads = list(self._threads)
        for pair in pairs:
            pair.shut()
        deadline = time.monotonic() + STOP_TIMEOUT
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            left = list(self._pairs)
            self._pairs.clear()
        for pair in left:  # pumps that did not end in time: their sockets go anyway
            pair.close()


class Network:
    """A switch and the hosts on it; a context manager that removes all of it."""

    def __init__(self, subnet: str = DEFAULT_SUBNET, state_root: str = DEFAULT_STATE_ROOT):
        self.subnet = ipaddress.ip_network(subnet)
        if not self.subnet.is_private:
            raise NetnsError(f'{subnet} is not a private range')
        self.state_root = state_root
        self.tag = secrets.token_hex(3)
        self.switch = self._name('switch')
        self.hosts: dict[str, Host] = {}
        self.processes: list[subprocess.Popen] = []
        self._created: list[str] = []
        self._addresses = self.subnet.hosts()
        self._open = False

    def _name(self, name: str) -> str:
        return f'{PREFIX}-{os.getpid()}-{self.tag}-{name}'

    def __enter__(self) -> 'Network':
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _add_namespace(self, namespace: str) -> None:
        # Registered first: if the command fails half-way, close() still removes it.
        self._created.append(namespace)
        _command(['ip', 'netns', 'add', namespace])
        _command(['ip', '-n', namespace, 'link', 'set', 'lo', 'up'])

    def open(self) -> None:
        """Sweep stale namespaces, create the switch.

        :raises: NetnsError.
        """
        if os.geteuid() != 0:
            raise NetnsError('network namespaces need root')
        sweep_stale()
        self._open = True
        self._add_namespace(self.switch)
        _command(['ip', '-n', self.switch, 'link', 'add', 'br0', 'type', 'bridge'])
        _command(['ip', '-n', self.switch, 'link', 'set', 'br0', 'up'])

    def add_host(self, name: str, rate: str | None = None, delay: str | None = None) -> Host:
        """A new host on the switch, with the next address of the subnet, its link
        shaped (see Host.shape) if ``rate`` or ``delay`` is given.

        :raises: NetnsError (a bad or taken name, the subnet is full, ip failed).
        """
        if not self._open:
            raise NetnsError('the network is not open')
        if not _NAME.match(name) or name == 'switch' or name in self.hosts:
            raise NetnsError(f'invalid or taken host name {name!r}')
        try:
            address = str(next(self._addresses))
        except StopIteration as exc:
            raise NetnsError(f'no address left in {self.subnet}') from exc
        namespace = self._name(name)
        port = f'p{len(self.hosts)}'
        state_dir = os.path.join(self.state_root, namespace)
        self._add_namespace(namespace)
        os.makedirs(state_dir)
        _command(['ip', '-n', self.switch, 'link', 'add', port, 'type', 'veth',
                  'peer', 'name', 'eth0', 'netns', namespace])
        _command(['ip', '-n', self.switch, 'link', 'set', port, 'master', 'br0', 'up'])
        _command(['ip', '-n', namespace, 'addr', 'add',
                  f'{address}/{self.subnet.prefixlen}', 'dev', 'eth0'])
        _command(['ip', '-n', namespace, 'link', 'set', 'eth0', 'up'])
        host = self.hosts[name] = Host(self, name, namespace, address, port, state_dir)
        if rate is not None or delay is not None:
            host.shape(rate, delay)
        return host

    def close(self) -> None:
        """Stop every process, delete every namespace and state directory. Never raises.

        Ctrl-C and SIGTERM are held off until it is done (a second Ctrl-C would
        otherwise leave half of it for the next sweep).
        """
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            self._close()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)

    def _close(self) -> None:
        for process in self.processes:
            _stop(process)
        self.processes.clear()
        # The hosts' network agents' namespaces first: a dnsmasq in one names its
        # host's state directory, removed below.
        try:
            for namespace in agent_namespaces([h.state_dir for h in self.hosts.values()]):
                delete_namespace(namespace)
        except NetnsError as exc:
            print(f'netns: cannot list the agents\' namespaces: {exc}', file=sys.stderr)
        for namespace in reversed(self._created):
            delete_namespace(namespace)
            shutil.rmtree(os.path.join(self.state_root, namespace), ignore_errors=True)
        self._created.clear()
        self.hosts.clear()
        self._open = False


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the process group, then SIGKILL; each wait bounded."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        if process.poll() is not None:
            break
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            break
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            continue
    # Children that outlive the leader are still inside the host's namespace:
    # Network.close() kills them there (never by a process group whose id may be reused).
