"""The warehouse over a shaped network: chunk fetches and snapshot uploads between
emulated hosts, as ratios against curl and nbdcopy in the same run.

    .venv/bin/python benchmarks/network.py [--size MIB] [--repeat N] [--threads N] [--quick]

Needs root: two hosts emulated with network namespaces (tests/multihost/netns.py), a
"repository" whose link is shaped to 1 Gbit/s both ways (tbf; this kernel has no
netem, so no latency is added: the namespaces' own round trip is tens of
microseconds), and a "compute" host on an unshaped link of the same switch.

a) Fetch: the repository runs ``vmcloud warehouse`` (file backend, token auth) over an
   imported image of random data. From the compute host every chunk is fetched with
   HttpBackend.read_chunk, sequentially and with N threads, against curl fetching the
   same chunk URLs with keep-alive (one process, sequential and ``--parallel``), the
   fair baseline (same server, same requests: only the client differs), curl of the
   image as one file from busybox httpd (what the link gives), and nbdcopy of the
   same bytes from qemu-nbd over TCP (another server and protocol). Page cache
   dropped before every run, order rotated; per-chunk latency of the sequential runs.
b) Snapshot upload: 8 guests each changed some chunks of the image, a quarter of
   them the same across guests; the 8 snapshots are uploaded through the http
   backend from the compute host, at once (one Warehouse.snapshot_many, as a compute
   node uploads one barrier) and one after another, at MTU 1500 and 9000. Bytes on
   the wire (compute eth0 tx + rx, every frame counted: GSO capped at the MTU)
   against the unique new chunk bytes.

Guests' own networks (guest to guest over VXLAN, boot to first HTTP answer) are
benchmarks/guest_network.py's.
"""
import argparse
import concurrent.futures
import hashlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time

if __package__ in (None, ''):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from oslo_config import cfg  # noqa: E402

import vmcloud.conf  # noqa: E402,F401 - registers options
from benchmarks import common  # noqa: E402

MIB = 1024 * 1024
CHUNK = 256 * 1024
RATE = '1gbit'
SERVICE_PORT = 9494
NBD_PORT = 10809
FILE_PORT = 8080
LINK = 'curl one file (busybox httpd)'
TOKEN = 'network-benchmark-token'
GUESTS = 8
# Ethernet 14 + IPv4 20 + TCP 20 + timestamps option 12, in every frame.
FRAME_HEADERS = 66
JUMBO = 9000
START_TIMEOUT = 60.0
RUN_TIMEOUT = 600.0
CONF = cfg.CONF
VMCLOUD = os.path.join(os.path.dirname(sys.executable), 'vmcloud')


# -- the worker: runs inside the compute host -------------------------------------

def _backend(url: str):
    """CONF and an HttpBackend of the service at ``url`` (in the worker's process)."""
    from vmcloud.storage.backends import http
    CONF([], project='vmcloud', default_config_files=[])
    CONF.set_override('backend', 'http', 'storage')
    CONF.register_group(http.HttpBackend.OPTION_GROUP)
    CONF.register_opts(http.HttpBackend.OPTIONS, group=http.HttpBackend.OPTION_GROUP)
    CONF.set_override('url', url, 'storage_http')
    CONF.set_override('token', TOKEN, 'storage_http')
    return CONF, http.HttpBackend(CONF)


def worker_fetch(url: str, ids: list[str], threads: int) -> dict:
    """Fetch every chunk; the time, and each fetch's latency when sequential."""
    _, store = _backend(url)
    store.has_chunk(ids[0])  # the connection is open before timing, as curl's first is not
    latencies = []
    start = time.perf_counter()
    if threads == 1:
        total = 0
        for chunk_id in ids:
            begin = time.perf_counter()
            total += len(store.read_chunk(chunk_id))
            latencies.append(time.perf_counter() - begin)
    else:
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            total = sum(len(d) for d in pool.map(store.read_chunk, ids))
    return {'seconds': time.perf_counter() - start, 'bytes': total, 'latencies': latencies}


def guest_changes(tag: str, guest: int, per_guest: int, chunk_count: int
                  ) -> dict[int, bytes]:
    """Chunks guest ``guest`` wrote: a quarter the same in every guest, the rest its own
    (``tag`` makes each run's data new to the store)."""
    shared = per_guest // 4
    changes = {}
    for i in range(per_guest):
        seed = f'{tag}-shared-{i}' if i < shared else f'{tag}-guest-{guest}-{i}'
        index = (i * 37 + (0 if i < shared else guest * 7)) % chunk_count
        changes[index] = random.Random(seed).randbytes(CHUNK)
    return changes


def worker_snapshot(url: str, image: str, per_guest: int, tag: str, at_once: bool) -> dict:
    """Snapshot 8 guests of ``image:1`` as new versions of it: at once (one barrier, so
    one snapshot_many: one write session, one question per batch, each shared chunk
    sent once), or one snapshot_chunks after another."""
    from vmcloud.storage import manifest as manifest_mod
    from vmcloud.storage import warehouse
    conf, store = _backend(url)
    house = warehouse.Warehouse(conf, store)
    parent = manifest_mod.VersionRef(image, 1)
    chunk_count = house.manifest(image, 1).chunk_count
    changes = [guest_changes(tag, guest, per_guest, chunk_count) for guest in range(GUESTS)]

    start = time.perf_counter()
    if at_once:
        results = house.snapshot_many([(parent, guest) for guest in changes])
    else:
        results = [house.snapshot_chunks(parent, guest) for guest in changes]
    seconds = time.perf_counter() - start
    failed = [str(r) for r in results if not isinstance(r, warehouse.WriteResult)]
    if failed:
        raise RuntimeError(f'snapshots failed: {failed}')
    return {'seconds': seconds, 'new_bytes': sum(r.new_bytes for r in results)}


def worker(spec: dict) -> None:
    if spec['mode'] == 'fetch':
        with open(spec['ids']) as f:
            ids = f.read().split()
        out = worker_fetch(spec['url'], ids, spec['threads'])
    else:
        out = worker_snapshot(spec['url'], spec['image'], spec['per_guest'], spec['tag'],
                              spec['at_once'])
    print(json.dumps(out))


# -- the orchestrator: runs in the machine's namespace ----------------------------

def build_image(path: str, size_mib: int) -> None:
    with open(path, 'wb') as f:
        for _ in range(size_mib):
            f.write(os.urandom(MIB))


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class Bench:
    def __init__(self, net, args):
        self.args = args
        self.repo = net.add_host('repo', rate=RATE)
        self.compute = net.add_host('compute')
        self.state = self.repo.state_dir
        self.url = f'http://{self.repo.address}:{SERVICE_PORT}'
        self.raw = os.path.join(self.state, 'image.raw')
        self.ids_file = os.path.join(self.compute.state_dir, 'ids')
        self.curl_config = os.path.join(self.compute.state_dir, 'curl.conf')
        self.startups: dict[str, float] = {}

    def prepare(self) -> None:
        from vmcloud.storage import warehouse
        build_image(self.raw, self.args.size)
        conf_path = os.path.join(self.state, 'vmcloud.conf')
        store = os.path.join(self.state, 'store')
        with open(conf_path, 'w') as f:
            f.write(f'[DEFAULT]\nstate_path = {store}\n[storage]\nbackend = file\n'
                    f'[warehouse_service]\nhost = {self.repo.address}\nport = {SERVICE_PORT}\n'
                    f'token = {TOKEN}\n')
        CONF([], project='vmcloud', default_config_files=[])
        CONF.set_override('state_path', store)
        self.local = warehouse.Warehouse(CONF)
        self.manifest = self.local.import_image(self.raw, 'image').manifest
        self.ids = [c for c in self.manifest.chunks if c is not None]
        with open(self.ids_file, 'w') as f:
            f.write('\n'.join(self.ids) + '\n')
        with open(self.curl_config, 'w') as f:
            for chunk_id in self.ids:
                f.write(f'url = "{self.url}/v1/chunks/{chunk_id}"\noutput = "/dev/null"\n')
        with open(os.path.join(self.state, 'service.log'), 'w') as log:
            service = self.repo.popen([VMCLOUD, '--config-file', conf_path, 'warehouse'],
                                      stdout=log, stderr=subprocess.STDOUT)
        self.compute.wait_for_tcp(self.repo.address, SERVICE_PORT, START_TIMEOUT, service)
        nbd = self.repo.popen(['qemu-nbd', '--read-only', '--persistent', '--format=raw',
                               '--export-name=img', f'--bind={self.repo.address}',
                               f'--port={NBD_PORT}', '--cache=none', self.raw],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.compute.wait_for_tcp(self.repo.address, NBD_PORT, START_TIMEOUT, nbd)
        # The same bytes as one file from a plain HTTP server: what the link gives.
        www = os.path.join(self.state, 'www')
        os.makedirs(www)
        os.link(self.raw, os.path.join(www, 'image.raw'))
        httpd = self.repo.popen(['busybox', 'httpd', '-f', '-p',
                                 f'{self.repo.address}:{FILE_PORT}', '-h', www],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.compute.wait_for_tcp(self.repo.address, FILE_PORT, START_TIMEOUT, httpd)

    def startup(self, argv: list[str]) -> float:
        """Median time to start ``argv`` (a --version) in the compute host: the part of
        a timed curl or nbdcopy run that is not fetching."""
        def once() -> float:
            start = time.perf_counter()
            self.compute.run(argv)
            return time.perf_counter() - start
        return statistics.median(once() for _ in range(5))

    def process_time(self, start: float, tool: str) -> float:
        if tool not in self.startups:
            self.startups[tool] = self.startup([tool, '--version'])
        return time.perf_counter() - start - self.startups[tool]

    def in_worker(self, spec: dict) -> dict:
        done = self.compute.run([sys.executable, os.path.abspath(__file__), '--worker',
                                 json.dumps(spec)], timeout=RUN_TIMEOUT)
        return json.loads(done.stdout.strip().splitlines()[-1])

    def curl(self, parallel: int) -> dict:
        argv = ['curl', '--silent', '--show-error', '--fail', '-H',
                f'Authorization: Bearer {TOKEN}', '--config', self.curl_config,
                '--write-out', '%{time_total} %{size_download}\\n']
        if parallel > 1:
            argv += ['--parallel', '--parallel-max', str(parallel)]
        start = time.perf_counter()
        done = self.compute.run(argv, timeout=RUN_TIMEOUT)
        seconds = self.process_time(start, 'curl')
        lines = [line.split() for line in done.stdout.splitlines()]
        latencies = [float(t) for t, _ in lines]
        fetched = sum(int(n) for _, n in lines)
        if len(lines) != len(self.ids) or fetched != len(self.ids) * CHUNK:
            raise RuntimeError(f'curl made {len(lines)} of {len(self.ids)} fetches, '
                               f'{fetched} bytes')
        return {'seconds': seconds, 'bytes': fetched,
                'latencies': latencies if parallel == 1 else []}

    def curl_file(self) -> dict:
        start = time.perf_counter()
        done = self.compute.run(['curl', '--silent', '--show-error', '--fail', '--output',
                                 '/dev/null', '--write-out', '%{size_download}',
                                 f'http://{self.repo.address}:{FILE_PORT}/image.raw'],
                                timeout=RUN_TIMEOUT)
        if int(done.stdout) != self.args.size * MIB:
            raise RuntimeError(f'curl fetched {done.stdout} bytes of the image file')
        return {'seconds': self.process_time(start, 'curl'), 'bytes': int(done.stdout)}

    def nbdcopy(self) -> dict:
        start = time.perf_counter()
        self.compute.run(['nbdcopy', f'nbd://{self.repo.address}:{NBD_PORT}/img', 'null:'],
                         timeout=RUN_TIMEOUT)
        return {'seconds': self.process_time(start, 'nbdcopy'), 'bytes': self.args.size * MIB}

    def fetch(self) -> tuple[str, dict]:
        threads = self.args.threads
        spec = {'mode': 'fetch', 'url': self.url, 'ids': self.ids_file}
        contenders = {
            'vmcloud sequential': lambda: self.in_worker(dict(spec, threads=1)),
            f'vmcloud {threads} threads': lambda: self.in_worker(dict(spec, threads=threads)),
            'curl sequential': lambda: self.curl(1),
            f'curl --parallel {threads}': lambda: self.curl(threads),
            'nbdcopy (qemu-nbd)': self.nbdcopy,
            LINK: self.curl_file,
        }

        def run(name: str) -> dict:
            common.drop_caches()
            return contenders[name]()

        results = common.rotate(list(contenders), self.args.repeat, run)
        speed = {name: statistics.median(r['bytes'] / r['seconds'] / MIB for r in runs)
                 for name, runs in results.items()}
        baseline = {'vmcloud sequential': 'curl sequential',
                    f'vmcloud {threads} threads': f'curl --parallel {threads}',
                    'curl sequential': 'curl sequential',
                    f'curl --parallel {threads}': f'curl --parallel {threads}',
                    'nbdcopy (qemu-nbd)': f'curl --parallel {threads}',
                    LINK: f'curl --parallel {threads}'}
        rows = []
        for name, runs in results.items():
            latencies = [x for r in runs for x in r.get('latencies', [])]
            lat = (f'{statistics.median(latencies) * 1e3:.2f}',
                   f'{percentile(latencies, 0.99) * 1e3:.2f}') if latencies else ('-', '-')
            rows.append((name, f'{speed[name]:.1f}', f'{speed[name] / speed[baseline[name]]:.2f}x',
                         baseline[name], f'{speed[name] / speed[LINK]:.2f}x', *lat))
        body = common.table(('client', 'MiB/s (median)', 'ratio', 'vs', 'vs one file',
                             'chunk ms median', 'chunk ms p99'), rows)
        body += (f'\n\n{len(self.ids)} chunks of 256 KiB ({common.mib(len(self.ids) * CHUNK)}),'
                 f' {self.args.repeat} run(s) each, rotated, page cache dropped before each. '
                 'vmcloud times the fetches inside its worker (the connection opened first); '
                 'curl and nbdcopy are timed around the whole process less its start-up '
                 '(the median time of its --version in the same host, measured in this run). '
                 'The fair baseline is curl of the same chunk URLs from the same service '
                 '(only the client differs); "one file" is the image as one file from '
                 'busybox httpd (what the link gives without per-chunk requests), nbdcopy '
                 'of qemu-nbd another server and protocol over the same link.')
        return body, speed

    def snapshot_run(self, tag: str, at_once: bool) -> dict:
        """Upload 8 guests' snapshots; what the store gained and the compute link carried."""
        store = self.local.backend
        chunk_before = store.stored_chunk_bytes()
        manifest_before = store.manifests_stored_bytes()
        before = self.compute.counters()
        resent_before = self.retransmitted()
        out = self.in_worker({'mode': 'snapshot', 'url': self.url, 'image': 'image',
                              'per_guest': self.args.per_guest, 'tag': tag,
                              'at_once': at_once})
        after = self.compute.counters()
        resent = self.retransmitted() - resent_before
        unique = set()
        for guest in range(GUESTS):
            changes = guest_changes(tag, guest, self.args.per_guest, len(self.manifest.chunks))
            unique.update(hashlib.sha256(data).hexdigest() for data in changes.values())
        delta = {key: after[key] - before[key] for key in after}
        return {'seconds': out['seconds'], 'reported_new': out['new_bytes'],
                'unique': len(unique) * CHUNK,
                'chunks': store.stored_chunk_bytes() - chunk_before,
                'manifests': store.manifests_stored_bytes() - manifest_before,
                'sent': delta['tx_bytes'], 'received': delta['rx_bytes'],
                'frames': delta['tx_packets'] + delta['rx_packets'], 'resent': resent}

    def retransmitted(self) -> int:
        """TCP segments the compute host has sent again (tbf drops what overflows it)."""
        out = self.compute.run(['nstat', '--ignore', '--noupdate', '--zeros', '--json',
                                'TcpRetransSegs']).stdout
        return json.loads(out)['kernel']['TcpRetransSegs']

    def snapshots(self) -> tuple[str, dict]:
        # Every frame counted as a NIC would send it: no 64 KiB GSO super-packets.
        for host in (self.compute, self.repo):
            host.count_frames()
        runs = {'8 at once': self.snapshot_run('once', True),
                'one after another': self.snapshot_run('turn', False)}
        # Storage networks often run jumbo frames: 9000-byte frames cut the TCP/IP headers
        # from 4.6 % to 0.7 % of the bytes.
        for host in (self.compute, self.repo):
            host.set_mtu(JUMBO)
            host.count_frames()
        runs[f'8 at once, MTU {JUMBO}'] = self.snapshot_run('jumbo-once', True)
        runs[f'one after another, MTU {JUMBO}'] = self.snapshot_run('jumbo', False)
        written = common.mib(GUESTS * self.args.per_guest * CHUNK)

        def row(label, value):
            return (label, *[value(r) for r in runs.values()])

        def wire(r):
            return r['sent'] + r['received']
        rows = [
            row('changed chunks written by the 8 guests', lambda r: written),
            row('unique new chunk bytes', lambda r: common.mib(r['unique'])),
            row('new chunk bytes stored (service store)', lambda r: common.mib(r['chunks'])),
            row('new bytes the snapshots reported', lambda r: common.mib(r['reported_new'])),
            row('new manifest bytes stored', lambda r: common.mib(r['manifests'])),
            row('compute sent (eth0 tx)', lambda r: common.mib(r['sent'])),
            row('compute received (eth0 rx)', lambda r: common.mib(r['received'])),
            row('frames both ways', lambda r: str(r['frames'])),
            row('TCP segments sent again', lambda r: str(r['resent'])),
            row('upload time', lambda r: f'{r["seconds"]:.2f} s'),
            row('**wire / unique new chunk bytes**',
                lambda r: f'**{wire(r) / r["unique"]:.3f}**'),
            row('wire / (unique chunk + manifest bytes)',
                lambda r: f'{wire(r) / (r["unique"] + r["manifests"]):.3f}'),
            row('TCP payload / unique new chunk bytes',
                lambda r: f'{(wire(r) - r["frames"] * FRAME_HEADERS) / r["unique"]:.3f}'),
        ]
        body = common.table(('snapshot upload of 8 guests', *runs), rows)
        body += ('\n\nWire bytes are every Ethernet frame on the compute host\'s link both '
                 'ways (Ethernet, IP, TCP and HTTP headers, TCP acknowledgements, the batched '
                 '"which of these do you lack?" queries, leases, the parent manifest read and '
                 'the 8 manifests written), GSO off so the kernel counts real frames of the '
                 'MTU (1500 unless said); preamble, inter-frame gap and FCS not counted. Each '
                 'run writes data new to the store. TCP payload is the '
                 f'wire bytes less {FRAME_HEADERS} bytes of Ethernet, IPv4 and TCP (with '
                 'timestamps) headers per frame: what HTTP itself sent, requests, answers and '
                 'chunk bodies; at MTU 1500 the headers alone cost 4.6 %.')
        once, jumbo = runs['8 at once'], runs[f'8 at once, MTU {JUMBO}']

        def share(part: float, r: dict) -> str:
            return f'{part / r["unique"]:.1%}'
        beyond = wire(once) - once['frames'] * FRAME_HEADERS - once['unique']
        body += ('\n\nWhere the rest goes, 8 at once (one snapshot_many: one write session, '
                 'one question per 64 chunks, each chunk the guests share sent once): at MTU '
                 f'1500 the Ethernet, IP and TCP headers of {once["frames"]} frames are '
                 f'{share(once["frames"] * FRAME_HEADERS, once)} of the unique bytes (a data '
                 'frame carries 1448 bytes, and the acknowledgements are frames too), so 1.05 '
                 'cannot be met at that MTU whatever HTTP does. The TCP payload beyond the '
                 f'chunks, {share(beyond, once)}, is the 8 manifests '
                 f'({share(once["manifests"], once)}), the parent manifest read once, '
                 f'{once["resent"]} segments sent again after the shaper dropped them, and '
                 'the request and answer headers (about 300 bytes a chunk, 0.1 %). At MTU '
                 f'{JUMBO} the headers of {jumbo["frames"]} frames cost '
                 f'{share(jumbo["frames"] * FRAME_HEADERS, jumbo)}.')
        for name, r in runs.items():
            # The store's chunk bytes include its pack indexes: a chunk sent twice is more.
            if r['chunks'] - r['unique'] >= CHUNK:
                body += (f'\n\n{name}, the store gained {common.mib(r["chunks"])} for '
                         f'{common.mib(r["unique"])} of unique chunks: some chunk was sent '
                         'twice.')
        return body, runs


def goals_table(speed: dict, runs: dict, threads: int) -> str:
    """Issue 13's goals, met or not, from this run's numbers."""
    rows = []
    for ours, theirs in (('vmcloud sequential', 'curl sequential'),
                         (f'vmcloud {threads} threads', f'curl --parallel {threads}')):
        ratio = speed[ours] / speed[theirs]
        rows.append((f'{ours} / {theirs} fetch throughput', '>= 0.8', f'{ratio:.2f}',
                     'met' if ratio >= 0.8 else 'NOT met'))
    for name, r in runs.items():
        ratio = (r['sent'] + r['received']) / r['unique']
        payload = (r['sent'] + r['received'] - r['frames'] * FRAME_HEADERS) / r['unique']
        rows.append((f'snapshot upload {name}: wire / unique new bytes', '<= 1.05',
                     f'{ratio:.3f} (TCP payload {payload:.3f})',
                     'met' if ratio <= 1.05 else
                     'met at TCP payload' if payload <= 1.05 else 'NOT met'))
    return common.table(('goal', 'target', 'measured', ''), rows)


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--size', type=int, default=256, help='image size in MiB')
    parser.add_argument('--repeat', type=int, default=3, help='runs per contender (median)')
    parser.add_argument('--threads', type=int, default=8, help='threads of the parallel fetch')
    parser.add_argument('--per-guest', type=int, default=32,
                        help='chunks each of the 8 guests changed')
    parser.add_argument('--quick', action='store_true', help='64 MiB, one run each')
    parser.add_argument('--worker', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.size, args.repeat = 64, 1
    return args


def main() -> int:
    args = parse_arguments()
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    from tests.multihost import netns

    def terminate(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, terminate)
    facts = common.machine()
    with netns.Network() as net:
        bench = Bench(net, args)
        bench.prepare()
        fetch_body, speed = bench.fetch()
        print(fetch_body, flush=True)
        snap_body, runs = bench.snapshots()
        print(snap_body, flush=True)
    goals = goals_table(speed, runs, args.threads)
    print(goals)
    facts.update({
        'image': f'{args.size} MiB of random data, 256 KiB chunks',
        'hosts': 'network namespaces on one bridge (tests/multihost/netns.py)',
        'repository link': f'{RATE} both ways (tbf, burst 128 KiB); no added delay: this '
                           'kernel has no netem',
        'compute link': 'unshaped veth',
        'service': 'vmcloud warehouse, file backend, bearer token, HTTP/1.1 keep-alive',
        'load': 'two cores shared with other work: a lower bound',
    })
    path = common.write_results('network', 'The warehouse over a shaped network', [
        ('Goals', goals),
        ('Chunk fetch from a compute host', fetch_body),
        ('Snapshot upload of 8 guests', snap_body)], facts)
    print(f'written to {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
