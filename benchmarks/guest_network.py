"""Guest networks: guest to guest across hosts over a deployment network (the network
agent's bridge and VXLAN) against the same guests on a plain bridge of one host, and a
guest's boot to its first HTTP answer on a deployment network against QEMU's user-mode
network, in one run.

    sudo .venv/bin/python benchmarks/guest_network.py [--repeat N] [--lines N]
        [--requests N] [--quick]

Needs root: two hosts emulated with network namespaces (tests/multihost/netns.py) on
one switch, unshaped veth links. On each the network agent (vmcloud/network/agent.py,
run in the host's network namespace as the compute service runs it) builds the same
network: bridge vmcbV, VXLAN vmcxV to the other host's address, a DHCP namespace with
dnsmasq. Guests are the test guest (busybox init, tools/guest/) in qemu-system started
here, inside a host's namespace, on a tap that is a port of the bridge (what the qemu
driver makes), its virtio NIC told the bridge's MTU (host_mtu) as the driver does.

a) Guest to guest. A server guest and a client guest: on the deployment network, the
   server on host 1 and the client on host 2 (every frame crosses both VXLAN devices
   and the underlay), addresses by DHCP from the agents' dnsmasq; on the plain bridge,
   both on one bridge of host 1 (no VXLAN, no agent), static addresses. The same MTU
   (1450) on both, so the guests send the same frames. Throughput: the client sends
   ``--lines`` lines (``seq 1 N``) over one TCP connection (vmcloud.stream_to), the
   server checks they all came (vmcloud.stream_server); the rate is timed from the
   bytes the server's tap delivers (its counter, sampled every few ms): from 10% to 90%
   of the stream, so neither the connection's start nor its close is in it. Request
   rate: a fresh client GETs / of the server ``--requests`` times, one after another
   (vmcloud.reach naming the server that many times, one round), timed from the first
   answer's console line to the last's. Both numbers are the guests' own limits under
   the machine's accelerator (TCG: an emulated CPU forks busybox per request and
   writes every line): they show what the datapath costs next to that.
b) Boot start to first HTTP answer: from the qemu process's start until GET / of the
   guest answers 200. On the deployment network, from the agent's DHCP namespace (as
   the health check probes), the guest configured by DHCP from dnsmasq; with QEMU's
   user-mode network (``-netdev user,restrict=on``, its DHCP server), through a
   hostfwd on 127.0.0.1. The same guest, the same probe interval.
Rounds rotate the order of the contenders; medians of ``--repeat`` runs.
"""
import argparse
import ctypes
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

if __package__ in (None, ''):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from oslo_config import cfg  # noqa: E402

import vmcloud.conf  # noqa: E402,F401 - registers options
from benchmarks import common  # noqa: E402

CONF = cfg.CONF
SCRIPT = os.path.abspath(__file__)
VNI = 1000
CIDR = '10.200.0.0/24'
PLAIN = '10.201.0'
MTU = 1450
PLAIN_BRIDGE = 'vbnbr0'
STREAM_PORT = 5001
BOOT_TIMEOUT = 300.0
RUN_TIMEOUT = 600.0
PROBE_INTERVAL = 0.05
PROBE_TIMEOUT = 1.0
SAMPLE_INTERVAL = 0.005
CONSOLE_INTERVAL = 0.01
CLONE_NEWNET = 0x40000000
DEPLOYMENT = 'deployment network, 2 hosts (VXLAN)'
BRIDGE = 'plain bridge, 1 host'
USER = 'QEMU user-mode network'
STREAM_DONE = re.compile(r'^VMCLOUD-STREAM-RECEIVED (\d+) (.*?)\r?$', re.MULTILINE)
NIC_UP = re.compile(r'^VMCLOUD-NET eth0 ', re.MULTILINE)
REACH = re.compile(r'^VMCLOUD-REACH \S+ (yes|no)', re.MULTILINE)
_libc = ctypes.CDLL(None, use_errno=True)


class BenchError(Exception):
    """A guest did not boot, answer or finish in time."""


# -- the agent: one call, inside a host's network namespace --------------------------

def agent_call(request: dict) -> object:
    """One NetworkAgent call in this process (run by ``nsenter --net`` inside a host)."""
    from vmcloud.network import agent
    CONF([], project='vmcloud', default_config_files=[])
    CONF.set_override('state_path', request['state_dir'])
    CONF.set_override('host', request['host'])
    CONF.set_override('state_dir', os.path.join(request['state_dir'], 'network'), 'network')
    CONF.set_override('vtep_address', request['vtep'], 'network')
    return getattr(agent.NetworkAgent(CONF), request['call'])(*request['args'])


# -- the hosts ----------------------------------------------------------------------

def port(last: int) -> dict:
    return {'mac': f'52:54:00:0a:c8:{last:02x}', 'address': f'10.200.0.{last}'}


class Bench:
    def __init__(self, net, args, accelerator: str):
        from tests import guest
        self.net = net
        self.args = args
        self.accelerator = accelerator
        self.guest = guest
        self.work = tempfile.mkdtemp(dir=os.path.join(common.REPO, '.cache'))
        self.processes: list[subprocess.Popen] = []
        self.taps = 0
        self.network = {'id': 'guest-network-bench', 'vni': VNI, 'cidr': CIDR}
        self.plugged: list[tuple[object, str]] = []

    # -- plumbing --

    def agent(self, host, call: str, *args) -> object:
        request = {'state_dir': host.state_dir, 'host': host.name, 'vtep': host.address,
                   'call': call, 'args': list(args)}
        done = subprocess.run(['nsenter', f'--net=/run/netns/{host.namespace}',
                               sys.executable, SCRIPT, '--agent-call', json.dumps(request)],
                              capture_output=True, text=True, timeout=120, cwd=common.REPO)
        if done.returncode:
            raise BenchError(f'{host.name}: agent {call} failed: {done.stderr[-2000:]}')
        return json.loads(done.stdout)

    def plug(self, host, instance: str, last: int, dhcp_last: int) -> str:
        others = [h.address for h in self.hosts if h is not host]
        bridge = self.agent(host, 'plug', self.network, port(dhcp_last), others, instance,
                            port(last))
        self.plugged.append((host, instance))
        return bridge

    def namespace(self, host) -> str:
        from tests.multihost import netns
        return f'vmcloud-{VNI}-{netns.agent_tag(host.state_dir)}'

    def tap(self, host, bridge: str) -> str:
        self.taps += 1
        name = f'vbnt{self.taps}'
        for argv in (['tuntap', 'add', 'dev', name, 'mode', 'tap'],
                     ['link', 'set', name, 'mtu', str(MTU), 'master', bridge, 'up']):
            subprocess.run(['ip', '-n', host.namespace, *argv], check=True,
                           capture_output=True, timeout=30)
        return name

    def untap(self, host, name: str) -> None:
        subprocess.run(['ip', '-n', host.namespace, 'link', 'del', name],
                       capture_output=True, timeout=30)

    def prepare(self) -> None:
        self.hosts = [self.net.add_host('h1'), self.net.add_host('h2')]
        h1 = self.hosts[0]
        # The plain bridge: in host 1, no address, no uplink; the guests' taps only.
        for argv in (['link', 'add', PLAIN_BRIDGE, 'mtu', str(MTU), 'type', 'bridge',
                      'stp_state', '0', 'forward_delay', '0'],
                     ['link', 'set', PLAIN_BRIDGE, 'up']):
            subprocess.run(['ip', '-n', h1.namespace, *argv], check=True,
                           capture_output=True, timeout=30)
        # The deployment network on both hosts: the server's port on host 1, the
        # clients' on host 2, the booting guest's on host 1.
        h2 = self.hosts[1]
        self.plug(h1, 'server', 2, 254)
        self.plug(h2, 'client', 3, 253)
        self.plug(h2, 'client2', 4, 253)
        self.plug(h1, 'boot', 5, 254)

    def close(self) -> None:
        for process in self.processes:
            stop(process)
        for host, instance in reversed(self.plugged):
            try:
                self.agent(host, 'unplug', self.network['id'], instance)
            except (BenchError, subprocess.TimeoutExpired) as exc:
                print(f'cannot unplug {instance}: {exc}', file=sys.stderr)
        shutil.rmtree(self.work, ignore_errors=True)

    # -- guests --

    def boot(self, host, name: str, flags: dict, netdev: str, mac: str) -> 'Guest':
        """A test guest in qemu; inside ``host`` unless None (user-mode network)."""
        console = os.path.join(self.work, f'{name}-{time.monotonic_ns()}.console')
        cmdline = ' '.join([self.guest.CMDLINE, f'vmcloud.id={name}']
                           + [f'vmcloud.{k}={v}' for k, v in flags.items()])
        argv = ['qemu-system-x86_64', '-name', name, '-machine', f'pc,accel={self.accelerator}',
                '-nodefaults', '-no-user-config', '-display', 'none', '-m', '256',
                '-smp', '1', '-serial', f'file:{console}',
                '-kernel', self.guest.path('vmlinuz'), '-initrd', self.guest.path('initrd.img'),
                '-append', cmdline,
                '-drive', f'file={self.guest.path("disk.img")},format=raw,if=virtio,snapshot=on',
                '-netdev', f'{netdev},id=n0',
                '-device', f'virtio-net-pci,netdev=n0,mac={mac},host_mtu={MTU}']
        started = time.perf_counter()
        if host is None:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, start_new_session=True)
        else:
            process = host.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        self.processes.append(process)
        return Guest(name, process, console, started)

    def pair(self, contender: str) -> dict[str, tuple]:
        """Where the server and the clients of ``contender`` go: role -> (host, bridge,
        flags, MAC); the deployment network's guests take their ports' addresses by
        DHCP, the plain bridge's are static."""
        h1, h2 = self.hosts
        if contender == DEPLOYMENT:
            bridge = f'vmcb{VNI}'
            return {'server': (h1, bridge, {}, port(2)['mac']),
                    'client': (h2, bridge, {}, port(3)['mac']),
                    'client2': (h2, bridge, {}, port(4)['mac'])}
        return {role: (h1, PLAIN_BRIDGE, {'ip': f'{PLAIN}.{last}/24'}, f'52:54:00:0a:c9:{last:02x}')
                for role, last in (('server', 2), ('client', 3), ('client2', 4))}

    def server_address(self, contender: str) -> str:
        return port(2)['address'] if contender == DEPLOYMENT else f'{PLAIN}.2'

    def guest_to_guest(self, contender: str) -> dict:
        """One server, a streaming client, then a requesting client. :returns: MB/s,
        requests/s."""
        roles = self.pair(contender)
        address = self.server_address(contender)
        taps = []

        def start(role: str, flags: dict) -> tuple[Guest, str]:
            host, bridge, own, mac = roles[role]
            tap = self.tap(host, bridge)
            taps.append((host, tap))
            return self.boot(host, role, dict(own, **flags),
                             f'tap,ifname={tap},script=no,downscript=no', mac), tap
        try:
            server, stap = start('server', {'stream_server': STREAM_PORT})
            server.wait(r'^VMCLOUD-PHASE boot-done', BOOT_TIMEOUT)
            sampler = Sampler(roles['server'][0].namespace, stap)
            sampler.start()
            lines = self.args.lines
            client, _ = start('client', {'stream_to': f'{address}:{STREAM_PORT}:{lines}'})
            verdict = server.wait(STREAM_DONE.pattern, RUN_TIMEOUT)
            samples = sampler.stop()
            if verdict.group(1) != str(lines) or verdict.group(2) != 'ok':
                raise BenchError(f'{contender}: the stream arrived broken: {verdict.group(0)}')
            payload = sum(len(str(i)) + 1 for i in range(1, lines + 1))
            rate = middle_rate(samples) * payload / max(1, samples[-1][1] - samples[0][1])
            client.kill()

            count = self.args.requests
            requester, _ = start('client2', {'reach': ','.join([address] * count),
                                             'reach_tries': 1})
            times = requester.line_times(REACH, count, RUN_TIMEOUT)
            failed = [m for m in REACH.finditer(requester.console_text()) if m.group(1) != 'yes']
            if failed:
                raise BenchError(f'{contender}: {len(failed)} of {count} requests failed; '
                                 f'console:\n{requester.console_text()[-2000:]}')
            requester.kill()
            server.kill()
            return {'MB/s': rate / 1e6, 'requests/s': (count - 1) / (times[-1] - times[0])}
        finally:
            for process in self.processes:
                stop(process)
            self.processes.clear()
            for host, name in taps:
                self.untap(host, name)

    def first_answer(self, contender: str) -> dict:
        """Seconds from qemu's start to the guest's first HTTP answer ('answer'), and to
        its console saying its NIC is configured ('NIC'), where the time went."""
        tap = None
        try:
            if contender == DEPLOYMENT:
                h1 = self.hosts[0]
                tap = self.tap(h1, f'vmcb{VNI}')
                from vmcloud import exception
                from vmcloud.network import probe
                namespace = self.namespace(h1)
                guest = self.boot(h1, 'boot', {}, f'tap,ifname={tap},script=no,downscript=no',
                                  port(5)['mac'])

                def get():
                    try:
                        return probe.http_get(namespace, port(5)['address'], 80, '/',
                                              PROBE_TIMEOUT)[0]
                    except exception.NetworkError:
                        return None
            else:
                forwarded = free_port()
                guest = self.boot(None, 'boot', {}, f'user,restrict=on,hostfwd=tcp:127.0.0.1:'
                                  f'{forwarded}-:80', port(5)['mac'])

                def get():
                    try:
                        return local_get(forwarded)
                    except (OSError, http.client.HTTPException):
                        return None
            deadline = guest.started + BOOT_TIMEOUT
            configured = None
            while get() != 200:
                if configured is None and NIC_UP.search(guest.console_text()):
                    configured = time.perf_counter() - guest.started
                if guest.process.poll() is not None or time.perf_counter() > deadline:
                    raise BenchError(f'{contender}: no HTTP answer in {BOOT_TIMEOUT:g} s; '
                                     f'console:\n{guest.console_text()[-2000:]}')
                time.sleep(PROBE_INTERVAL)
            answered = time.perf_counter() - guest.started
            return {'answer': answered, 'NIC': answered if configured is None else configured}
        finally:
            for process in self.processes:
                stop(process)
            self.processes.clear()
            if tap is not None:
                self.untap(self.hosts[0], tap)


class Guest:
    def __init__(self, name, process, console, started):
        self.name, self.process, self.console, self.started = name, process, console, started

    def console_text(self) -> str:
        try:
            with open(self.console, errors='replace') as f:
                return f.read()
        except FileNotFoundError:
            return ''

    def wait(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.console_text(), re.MULTILINE)
            if match:
                return match
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f'{self.name}: no line {pattern!r} in {timeout:g} s; '
                                 f'console:\n{self.console_text()[-2000:]}')
            time.sleep(CONSOLE_INTERVAL)

    def line_times(self, pattern: re.Pattern, count: int, timeout: float) -> list[float]:
        """When each of the first ``count`` lines matching ``pattern`` appeared."""
        deadline = time.monotonic() + timeout
        times: list[float] = []
        while len(times) < count:
            seen = len(pattern.findall(self.console_text()))
            now = time.perf_counter()
            times += [now] * (seen - len(times))
            if len(times) >= count:
                break
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f'{self.name}: {len(times)} of {count} answers in '
                                 f'{timeout:g} s; console:\n{self.console_text()[-2000:]}')
            time.sleep(CONSOLE_INTERVAL)
        return times[:count]

    def kill(self) -> None:
        stop(self.process)


class Sampler:
    """A tap's TX byte counter (what the bridge delivers to the guest), sampled by a
    thread inside the tap's network namespace (/proc/thread-self/net/dev is that
    thread's namespace's)."""

    def __init__(self, namespace: str, device: str):
        self.namespace, self.device = namespace, device
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: str | None = None

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        fd = os.open(f'/run/netns/{self.namespace}', os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                self.error = os.strerror(ctypes.get_errno())
                return
        finally:
            os.close(fd)
        while not self._stop.is_set():
            with open('/proc/thread-self/net/dev') as f:
                for line in f:
                    name, _, counters = line.partition(':')
                    if name.strip() == self.device:
                        # receive: 8 fields, then transmit bytes
                        self.samples.append((time.perf_counter(), int(counters.split()[8])))
            time.sleep(SAMPLE_INTERVAL)

    def stop(self) -> list[tuple[float, int]]:
        self._stop.set()
        self._thread.join(10)
        if self.error or len(self.samples) < 2:
            raise BenchError(f'cannot sample {self.device}: {self.error or "no samples"}')
        return self.samples


def middle_rate(samples: list[tuple[float, int]]) -> float:
    """Bytes per second between 10% and 90% of what the samples counted."""
    base, total = samples[0][1], samples[-1][1] - samples[0][1]

    def when(fraction: float) -> float:
        goal = base + fraction * total
        for (t0, b0), (t1, b1) in zip(samples, samples[1:]):
            if b1 >= goal:
                return t0 + (t1 - t0) * ((goal - b0) / (b1 - b0) if b1 > b0 else 1.0)
        return samples[-1][0]
    elapsed = when(0.9) - when(0.1)
    if elapsed <= 0:
        raise BenchError('the stream was shorter than the sampling interval: raise --lines')
    return 0.8 * total / elapsed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def local_get(port_number: int) -> int:
    connection = http.client.HTTPConnection('127.0.0.1', port_number, timeout=PROBE_TIMEOUT)
    try:
        connection.request('GET', '/')
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        pass


def row(name: str, values: list[float], baseline: float) -> tuple:
    median = statistics.median(values)
    return (name, f'{median:.2f}', ' '.join(f'{v:.2f}' for v in values),
            f'{median / baseline:.3f}', f'{(median / baseline - 1) * 100:+.1f}%')


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--repeat', type=int, default=3, help='runs per contender (median)')
    parser.add_argument('--lines', type=int, default=1_000_000,
                        help='lines of the TCP stream (seq 1 N: about 6.9 MB at a million)')
    parser.add_argument('--requests', type=int, default=100,
                        help='sequential HTTP requests per run (at most 150: the guest '
                             'kernel command line names the server each time)')
    parser.add_argument('--quick', action='store_true', help='one run each, a short stream')
    parser.add_argument('--agent-call', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.repeat, args.lines, args.requests = 1, 100_000, 20
    if not 2 <= args.requests <= 150:
        parser.error('--requests must be between 2 and 150')
    return args


def main() -> int:
    args = parse_arguments()
    if args.agent_call:
        json.dump(agent_call(json.loads(args.agent_call)), sys.stdout)
        return 0
    from tests.multihost import netns

    def terminate(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, terminate)
    from tests import guest
    from vmcloud.drivers.qemu import accel
    facts = common.machine()
    # As the qemu driver chooses it (a /dev/kvm that is there need not work).
    with common.scratch_state(CONF):
        accelerator = accel.choose(CONF, shutil.which('qemu-system-x86_64'),
                                   guest.spec('probe', guest.path('disk.img')))
    with netns.Network() as net:
        bench = Bench(net, args, accelerator)
        try:
            bench.prepare()
            pairs = common.rotate([DEPLOYMENT, BRIDGE], args.repeat, bench.guest_to_guest)
            boots = common.rotate([DEPLOYMENT, USER], args.repeat, bench.first_answer)
        finally:
            bench.close()
    columns = ('contender', 'median', 'runs', 'ratio', 'difference')
    throughput = common.table(
        columns, [row(n, [r['MB/s'] for r in pairs[n]],
                      statistics.median(r['MB/s'] for r in pairs[BRIDGE]))
                  for n in (BRIDGE, DEPLOYMENT)])
    requests = common.table(
        columns, [row(n, [r['requests/s'] for r in pairs[n]],
                      statistics.median(r['requests/s'] for r in pairs[BRIDGE]))
                  for n in (BRIDGE, DEPLOYMENT)])
    first = common.table(
        columns, [row(n, [r['answer'] for r in boots[n]],
                      statistics.median(r['answer'] for r in boots[USER]))
                  for n in (USER, DEPLOYMENT)])
    nic = common.table(
        columns, [row(n, [r['NIC'] for r in boots[n]],
                      statistics.median(r['NIC'] for r in boots[USER]))
                  for n in (USER, DEPLOYMENT)])
    facts.update({
        'accelerator (probed)': accelerator,
        'guest': 'test guest (busybox init), 256 MiB, 1 vCPU, virtio-net, MTU 1450',
        'hosts': 'network namespaces on one bridge (tests/multihost/netns.py), unshaped veths',
        'stream': f'{args.lines} lines (seq) over one TCP connection',
        'requests': f'{args.requests} sequential GET / (busybox wget, httpd + CGI)',
        'runs per contender': str(args.repeat),
        'load': 'two cores shared with other work: a lower bound',
    })
    sections = [
        ('Guest to guest: TCP throughput (payload MB/s)',
         'Ratio against the plain bridge; the stream timed from 10% to 90% of it.\n\n'
         + throughput),
        ('Guest to guest: sequential HTTP requests per second',
         'Ratio against the plain bridge.\n\n' + requests),
        ('Boot start to first HTTP answer (s)',
         'Ratio against QEMU user-mode networking (lower is faster).\n\n' + first),
        ('Boot start to the NIC configured (s)',
         'Where the time above went: until the guest printed VMCLOUD-NET (DHCP bound; '
         'console polled with the probes, so up to one probe late).\n\n' + nic)]
    for heading, body in sections:
        print(f'\n{heading}\n{body}', flush=True)
    path = common.write_results('guest_network', 'Guest networks', sections, facts)
    print(f'written to {os.path.relpath(path, common.REPO)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
