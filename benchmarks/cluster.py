"""Deploy N instances of one image on K compute hosts: full copies, a central NBD export
and vmcloud's mirrors without and with the peer exchange, side by side in one run.

    sudo .venv/bin/python benchmarks/cluster.py [--quick] [--n 16,64,128] [--k 4,8]
        [--contenders a,b,c,d,e] [--qemu-guests 2] [--no-kill] [--snapshot-n 128]
        [--no-snapshot]

Needs root: the multi-host harness (tests/multihost/cluster.py) emulates the cluster,
every host a network namespace on one switch, every link shaped by tc (tbf) to 1 Gbit/s
both ways: the repository host (``ctl``: the warehouse service, RabbitMQ, PostgreSQL,
the dispatcher) and each compute host alike, so traffic between two compute hosts
crosses both of their links. The 0.2 ms latency asked for needs netem; the benchmark
applies it when the kernel has netem and says in its results when it has not.

The workload: N instances of the realistic guest image (systemd on Debian,
tools/guest/build-realistic-guest.sh). All but ``--qemu-guests`` of them are ``replay``
instances (vmcloud/drivers/replay.py) replaying a block I/O trace recorded once from a
real boot of that guest (tools/record-boot-trace.py, cached in .cache/replay/), so their
storage behaviour is a real guest's while their CPU is almost nothing; the other few are
real qemu guests of the image, on the K-th host (its compute service runs the qemu
driver), the replay instances on the other K - 1. The K hosts share the machine's CPUs;
in a cluster the qemu host would have its own. So that the real guests get about a
host's share when everything wants the CPU, every session the replay hosts run (their
services, the workers of (a) and (b), and so the replays and qemu-nbd servers) has the
CFS autogroup nice ``--replay-nice`` (10: about a tenth of a nice-0 session's weight).

Contenders, the same hosts, links and instances each:

(a) Nova-style: each host first copies the whole image into its own cache (it pulls every
    stored chunk of the image from the warehouse service over its link, 8 at a time,
    into a local raw file), then every instance gets a local qcow2 overlay over that file.
    A replay instance replays through ``qemu-nbd`` serving its overlay on a unix socket
    (qemu's own block layer, as a Nova guest's qcow2 would be read), a qemu guest boots
    from its overlay.
(b) qcow2 overlays on one central NBD export: ``qemu-nbd`` on the repository host exports
    the image (raw, read-only, from the page cache), every instance's overlay has it as
    its backing file (``nbd://ctl:10809/base``): every read of the base goes over the
    network to that one server. No copy, no cache, no peers.
(c) vmcloud: one deployment through the dispatcher; each instance on a mirror over its
    host's chunk cache, which fetches from the warehouse alone (``[mirror] peer_address``
    empty), no prefetch.
(d) (c) with the peer exchange: every host serves its cache to the others, each chunk has
    R = 2 owners, a miss asks them before the warehouse. No prefetch.
(e) (d) with prefetch from the image's recorded boot profile (``[mirror]
    prefetch_threads`` 2; the profile recorded by an earlier deployment of this run).
Plus one extra run of (e), at the largest N and K (``--no-kill``: none), in which a
peer dies mid-deploy: once node1's peer chunk server has served its first 8 chunks to
the others, every other host drops its packets to node1's peer port (nftables, no reset:
to them node1 is a dead machine, a connection hangs until ``[mirror] peer_timeout``);
node1's own instances run on and its own requests to its peers pass.
And after (e)'s deployment (the normal one) at the largest N (``--snapshot-n``) of each K,
while its instances run: one multi-snapshot of them all, until every item is replicated
and persistent (its section of the results says what is measured, and how).

Each run starts from empty caches and fresh services. Boot time of an instance: from the
start (the deployment's creation in the dispatcher for (c)-(e); the workers' start for
(a) and (b), which have no control plane) until it reached boot-done (its state turned
active in the dispatcher, read from its database; the worker's own clock for (a), (b)).
Repository egress: bytes the repository host sent on its link from the warehouse's
port (and the central export's for (b)), counted by an nftables counter there (IP
packets, headers included). Bytes between peers: what the hosts had from each other's
peer chunk servers (their ``/v1/stats``). Distinct bytes touched: the distinct stored
chunks that the instances read (or wrote part of), from the replayed trace and, for the
qemu guests, the traces their mirrors recorded in the same run (``[mirror] trace_path``).
"""
import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable

if __package__ in (None, ''):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from oslo_config import cfg  # noqa: E402

import vmcloud.conf  # noqa: E402,F401 - registers options
from benchmarks import common  # noqa: E402
from tests import guest  # noqa: E402
from vmcloud import exception  # noqa: E402
from vmcloud.dispatcher import states  # noqa: E402
from vmcloud.drivers import base as driver_base  # noqa: E402
from vmcloud.drivers import replay as replay_driver  # noqa: E402
from vmcloud.nbd import trace as trace_mod  # noqa: E402
from vmcloud.storage import warehouse as warehouse_mod  # noqa: E402

CONF = cfg.CONF
SCRIPT = os.path.abspath(__file__)
IMAGE = 'realistic'
TRACE = os.path.join(common.REPO, '.cache', 'replay', 'realistic-boot.trace.gz')
RECORDER = os.path.join(common.REPO, 'tools', 'record-boot-trace.py')
RATE = '1gbit'
DELAY = '0.2ms'
PEER_PORT = 9495
CENTRAL_PORT = 10809
CENTRAL_EXPORT = 'base'
REPLICAS = 2
PREFETCH_THREADS = 2
# The K hosts share 2 CPUs; the replay hosts' sessions yield to the real guests' host.
REPLAY_NICE = 10
# Chunks a Nova-style host pulls at once: a stream of the image at the link's speed.
PULL_THREADS = 8
REPLAY_MEMORY_MIB = 64
QEMU_MEMORY_MIB = 512
# Every wait is bounded: a deployment of 128 instances on 2 cores takes minutes.
DEPLOY_TIMEOUT = 1500.0
DELETE_TIMEOUT = 600.0
PEERS_TIMEOUT = 60.0
SOCKET_TIMEOUT = 30.0
RECORD_TIMEOUT = 900.0
POLL = 0.5
# The peer killed in the extra run of (e) dies once it served this many chunks to the
# others, or this long after the start.
KILL_AFTER_CHUNKS = 8
KILL_DEADLINE = 20.0
# The multi-snapshot after (e)'s deployment: every wait bounded, the states polled
# finely (a time is when a poll first saw it: up to this much late, plus one query).
SNAPSHOT_TIMEOUT = 900.0
SNAPSHOT_POLL = 0.05
# After the last instance booted, the replay instances play the rest of their trace up
# to its shutdown marker: this much more than its recorded length before the snapshot.
SETTLE_MARGIN = 5.0
# The granularity of the second measure of unique dirty data: a guest's page and block.
BLOCK = 4096
QUICK = {'n': [16], 'k': [4], 'contenders': 'cde'}
CONTENDERS = {
    'a': '(a) Nova-style: full copy, local qcow2 overlays',
    'b': '(b) qcow2 overlays on one central NBD export',
    'c': '(c) vmcloud mirrors, no peers',
    'd': '(d) vmcloud mirrors, peers (R = 2)',
    'e': '(e) (d) + prefetch from the recorded profile',
    'e-kill': '(e) with a peer killed mid-deploy',
}
COLORS = {'a': '#d62728', 'b': '#ff7f0e', 'c': '#7f7f7f', 'd': '#1f77b4', 'e': '#2ca02c',
          'e-kill': '#9467bd'}
# The dispatcher and the hosts: a build of one instance among 128 on two cores takes
# much longer than the harness's short deadlines allow; the scheduler may put dozens
# of instances on a host (a replay instance costs no CPU to speak of).
CLOUD_OPTIONS = {
    'DEFAULT': {'build_timeout': int(DEPLOY_TIMEOUT)},
    'compute': {'boot_timeout': int(DEPLOY_TIMEOUT)},
    'scheduler': {'cpu_allocation_ratio': 256.0, 'max_instances_per_host': 1000},
}
# The harness's snapshot deadlines are for a few guests: freezing 128 instances on two
# cores, and uploading them, take longer; a pause still ends by the guests' own limit.
CLOUD_OPTIONS['DEFAULT'].update({'snapshot_freeze_timeout': 60, 'snapshot_pause_limit': 90,
                                 'snapshot_upload_timeout': int(SNAPSHOT_TIMEOUT)})
NFT_TABLE = 'vmcbench'


class BenchError(Exception):
    """A run could not be set up or did not finish."""


# -- what a run measured --------------------------------------------------------------

@dataclasses.dataclass
class Run:
    contender: str
    n: int
    k: int
    #: instance -> seconds from the start until it reached boot-done
    booted: dict[str, float]
    #: instance -> why it did not
    failed: dict[str, str]
    egress: int
    peer_bytes: int
    #: distinct bytes the instances touched (None: not known for this run)
    touched: int | None
    #: seconds the run took in all (setup, deploy, collection, teardown)
    wall: float
    note: str = ''
    #: the real qemu guests among the instances (the others replay the trace)
    qemu: frozenset[str] = frozenset()
    #: the multi-snapshot of its instances, if one was taken (runs of (e))
    snapshot: 'SnapshotRun | None' = None

    def times(self, replays_only: bool = False) -> list[float]:
        return sorted(t for name, t in self.booted.items()
                      if not (replays_only and name in self.qemu))

    def percentile(self, share: float, replays_only: bool = False) -> float | None:
        """Nearest rank: the smallest boot time at or above ``share`` of the instances
        (of the replay instances alone with ``replays_only``)."""
        times = self.times(replays_only)
        if not times:
            return None
        return times[max(0, math.ceil(share * len(times)) - 1)]

    def qemu_times(self) -> list[float]:
        return sorted(t for name, t in self.booted.items() if name in self.qemu)

    @property
    def all_booted(self) -> float | None:
        """Until every instance booted; None if one did not."""
        return max(self.booted.values()) if self.booted and not self.failed else None


@dataclasses.dataclass
class SnapshotRun:
    """The multi-snapshot of every instance of a run of (e), taken while they run."""
    n: int
    k: int
    #: items of the snapshots (one an instance)
    items: int = 0
    #: seconds from the snapshots' creation in the dispatcher until every item was
    #: replicated, and until every item was persistent (None: not reached)
    replicated: float | None = None
    persistent: float | None = None
    #: the longest pause_ms among the qemu guests' items, and among all items
    qemu_pause_ms: float | None = None
    longest_pause_ms: float | None = None
    #: of the qemu guests, the longest freeze alone (QMP stop: vCPUs stopped, I/O
    #: drained and flushed), from their host's compute log (None: not logged)
    qemu_freeze_ms: float | None = None
    #: IP bytes the repository host received on the warehouse's port, request to persistent
    repository_bytes: int = 0
    #: the distinct chunks the items' versions reference that their parents do not
    new_chunks: int = 0
    new_chunk_bytes: int = 0
    #: distinct 4 KiB blocks the instances wrote data to, per instance, summed (None:
    #: not known)
    written_block_bytes: int | None = None
    #: the items' dirty_bytes and uploaded_bytes, summed (what the mirrors report)
    dirty_bytes: int = 0
    uploaded_bytes: int = 0
    #: IP bytes in and out of the compute hosts' peer chunk servers meanwhile
    peer_bytes: int = 0
    #: seconds the phase took in all (settling, requests, waits, collection)
    wall: float = 0.0
    #: why the snapshot did not end replicated and persistent ('' if it did)
    error: str = ''


def seconds(value: float | None) -> str:
    return 'n/a' if value is None else f'{value:.1f}'


# -- the trace and the touched chunks --------------------------------------------------

def ensure_trace(path: str) -> str:
    """The boot trace of the realistic guest, recorded once with RECORDER if missing.

    :raises: BenchError if there is none and it cannot be recorded.
    """
    if os.path.exists(path):
        return path
    if not os.path.exists(RECORDER):
        raise BenchError(f'no boot trace at {path} and no {RECORDER} to record one')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    print(f'recording the boot trace of the realistic guest into {path}', flush=True)
    done = subprocess.run([sys.executable, RECORDER, path], text=True,
                          capture_output=True, timeout=RECORD_TIMEOUT)
    if done.returncode != 0 or not os.path.exists(path):
        raise BenchError(f'{RECORDER} failed ({done.returncode}): '
                         f'{(done.stderr or done.stdout).strip()[-2000:]}')
    return path


def touched_chunks(trace: trace_mod.Trace, chunk_size: int) -> set[int]:
    """Indexes of the chunks a mirror has to have for ``trace``: every chunk a read
    touches, and the chunks a write covers only in part (a whole one is not read)."""
    found: set[int] = set()
    for event in trace.events:
        if not event.length:
            continue
        first = event.offset // chunk_size
        last = (event.offset + event.length - 1) // chunk_size
        if event.op == trace_mod.READ:
            found.update(range(first, last + 1))
        elif event.op in (trace_mod.WRITE, trace_mod.WRITE_ZEROES):
            if event.offset % chunk_size:
                found.add(first)
            if (event.offset + event.length) % chunk_size:
                found.add(last)
    return found


def written_blocks(events, block: int = BLOCK) -> set[int]:
    """Indexes of the ``block``-sized blocks that ``events`` write data to, in part or
    whole: zeroes and trims are left out (a block of zeros costs a content-addressed
    repository nothing)."""
    found: set[int] = set()
    for event in events:
        if event.op == trace_mod.WRITE and event.length:
            found.update(range(event.offset // block,
                               (event.offset + event.length - 1) // block + 1))
    return found


def replayed_events(trace: trace_mod.Trace) -> list[trace_mod.Event]:
    """The events a replay instance plays before it idles: up to the shutdown marker."""
    return [step.event for step in replay_driver.plan(trace).running]


def new_chunks(manifests, delta_bytes: Callable[[str], int] | None = None) -> dict[str, int]:
    """{object id: its bytes} of the distinct stored objects (plain chunks, and the deltas
    of chains) the ``(version, parent)`` manifest pairs need that their parents do not:
    the new data of a snapshot, each distinct content once (holes are no data). A plain
    chunk's bytes are its length; a delta's, ``delta_bytes(id)``, its stored size."""
    found: dict[str, int] = {}
    for version, parent in manifests:
        known = parent.data_chunk_ids() if parent is not None else set()
        for index, entry in enumerate(version.chunks):
            for object_id in version.object_ids(index):
                if object_id in known or object_id in found:
                    continue
                if isinstance(entry, str):
                    found[object_id] = version.chunk_length(index)
                else:
                    found[object_id] = delta_bytes(object_id)
    return found


def replay_tail(trace: trace_mod.Trace, time_scale: float) -> float:
    """Seconds a replay instance plays on after its boot-done, at least: the recorded
    time from that marker to the end of its last request before the shutdown marker,
    scaled as the replay scales think time (0 without a boot-done)."""
    events = replayed_events(trace)
    marks = [e.ms for e in events if e.op == trace_mod.PHASE and e.marker == driver_base.BOOT_DONE]
    if not marks:
        return 0.0
    end = max((e.ms + e.service_ms for e in events if e.op != trace_mod.PHASE), default=0.0)
    return max(0.0, end - marks[0]) / 1000 * time_scale


def snapshot_progress(snapshots: list[dict], items: list[dict], snapshots_expected: int,
                      items_expected: int) -> tuple[bool, bool]:
    """(every item replicated, every item persistent) of snapshots as
    ``Harness.snapshot_rows`` reads them: not yet while fewer snapshots or items than
    expected are there, or one is still freezing or uploading.

    :raises: BenchError naming the snapshot or item that failed (error, partial).
    """
    for snapshot in snapshots:
        if snapshot['state'] in (states.ERROR, states.PARTIAL):
            raise BenchError(f'snapshot {snapshot["id"]} ended {snapshot["state"]}: '
                             f'{snapshot["reason"][-500:]}')
    for item in items:
        if item['state'] == states.ERROR:
            raise BenchError(f'the snapshot of {item["name"]} failed: {item["reason"][-500:]}')
    if len(snapshots) < snapshots_expected or len(items) < items_expected:
        return False, False
    replicated = (all(s['state'] == states.AVAILABLE for s in snapshots)
                  and all(i['replicated'] for i in items))
    return replicated, replicated and all(i['persistent'] for i in items)


FROZEN_LINE = re.compile(r'(\S+) frozen in ([0-9.]+) ms')


def freeze_times(log: str) -> dict[str, float]:
    """{guest name: ms its freeze took} from a compute service's log (its '... frozen in
    X ms' lines; a guest frozen twice, its last)."""
    return {m.group(1): float(m.group(2)) for m in FROZEN_LINE.finditer(log)}


def sql_string(text: str) -> str:
    """``text`` as an SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def chunk_bytes(manifest, indexes: set[int]) -> int:
    """Bytes of the distinct stored chunks at ``indexes`` (holes cost nothing)."""
    sizes = {}
    for index in indexes:
        if index < manifest.chunk_count and manifest.chunks[index] is not None:
            sizes[manifest.chunks[index]] = manifest.chunk_length(index)
    return sum(sizes.values())


# -- the emulated cluster ----------------------------------------------------------------

def netem_available() -> bool:
    """Whether this kernel can add a delay to a link (netem), tried on a throwaway host."""
    from tests.multihost import netns
    try:
        with netns.Network() as net:
            net.add_host('probe').shape(RATE, DELAY)
        return True
    except netns.NetnsError as exc:
        if 'netem' in str(exc):
            return False
        raise


class Harness:
    """The cloud of one K: the controller (the repository host) and K compute hosts,
    node1 .. node(K-1) running the replay driver, nodeK the qemu driver."""

    def __init__(self, k: int, args: argparse.Namespace, accelerator: str, delay: bool):
        from tests.multihost import cluster
        self.cluster_mod = cluster
        self.k = k
        self.args = args
        self.accelerator = accelerator
        self.delay = delay
        self.cloud = cluster.Cluster(rate=RATE, options=CLOUD_OPTIONS, peer_replicas=REPLICAS)
        self.nodes = [f'node{i}' for i in range(1, k + 1)]
        self.replay_nodes = self.nodes[:-1]
        self.qemu_node = self.nodes[-1]
        self.central: subprocess.Popen | None = None
        self.manifest = None
        self.trace = trace_mod.read(args.trace)
        self.profile_recorded = False
        self.clouds_made = False
        #: why a replay host's process could not be given args.replay_nice, if it could not
        self.nice_errors: set[str] = set()
        self.kernel = self.initrd = ''
        with open(os.path.join(guest.GUEST_DIR, 'realistic', 'cmdline')) as f:
            self.cmdline = f.read().strip()

    def __enter__(self) -> 'Harness':
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self.cloud.close()

    @property
    def controller(self):
        return self.cloud.controller

    def open(self) -> None:
        """The cloud, its hosts shaped, the image imported, the trace on the replay hosts,
        the counters on the repository host.

        :raises: ClusterError, NetnsError, BenchError.
        """
        cloud = self.cloud
        cloud.open()
        for name in self.nodes:
            host = cloud.add_compute(name)
            os.makedirs(os.path.join(host.state_dir, 'bench'))
            options = {'compute': {'driver': 'qemu', 'accelerator': self.accelerator}}
            if name != self.qemu_node:
                trace = os.path.join(host.state_dir, 'bench', os.path.basename(self.args.trace))
                shutil.copyfile(self.args.trace, trace)
                options = {'compute': {'driver': 'replay'},
                           'replay': {'trace': trace, 'time_scale': self.args.time_scale,
                                      'queue_depth': self.args.queue_depth}}
            cloud.set_options(name, options)
        if self.delay:
            for host in cloud.hosts().values():
                host.shape(RATE, DELAY)
        # The qemu guests' kernel and initrd as files of their host: no warehouse
        # traffic but the image's in any contender.
        boot = os.path.join(cloud.computes[self.qemu_node].state_dir, 'bench')
        self.kernel = os.path.join(boot, 'vmlinuz')
        self.initrd = os.path.join(boot, 'initrd.img')
        shutil.copyfile(guest.path('vmlinuz'), self.kernel)
        shutil.copyfile(guest.path('initrd.img'), self.initrd)
        self.import_image()
        self.controller.run(['nft', '-f', '-'], input=(
            f'table inet {NFT_TABLE} {{\n'
            ' counter warehouse {}\n counter central {}\n counter warehouse_in {}\n'
            ' chain output { type filter hook output priority 0;\n'
            f'  oifname "eth0" tcp sport {self.cluster_mod.WAREHOUSE_PORT} counter name warehouse\n'
            f'  oifname "eth0" tcp sport {CENTRAL_PORT} counter name central\n'
            ' }\n'
            ' chain input { type filter hook input priority 0;\n'
            f'  iifname "eth0" tcp dport {self.cluster_mod.WAREHOUSE_PORT} '
            'counter name warehouse_in\n'
            ' }\n}\n'))
        # At the peer chunk servers, so that each exchange between two hosts is counted
        # once: the requests (a replica's put among them) in, the answers out.
        for name in self.nodes:
            self.cloud.computes[name].run(['nft', '-f', '-'], input=(
                f'table inet {NFT_TABLE} {{\n counter peer_in {{}}\n counter peer_out {{}}\n'
                ' chain input { type filter hook input priority 0;\n'
                f'  iifname "eth0" tcp dport {PEER_PORT} counter name peer_in\n }}\n'
                ' chain output { type filter hook output priority 0;\n'
                f'  oifname "eth0" tcp sport {PEER_PORT} counter name peer_out\n }}\n}}\n'))

    def import_image(self) -> None:
        """The realistic guest's disk into the warehouse (a sparse copy in the
        controller's directory first: no host reads another's files), its manifest read
        for the touched bytes, its packs read once so that every contender finds them in
        the page cache."""
        uploads = os.path.join(self.controller.state_dir, 'uploads')
        os.makedirs(uploads, exist_ok=True)
        disk = os.path.join(uploads, 'root.img')
        common.run('cp', '--sparse=always', guest.realistic_disk(), disk)
        self.cloud.cli_json('image', 'import', disk, IMAGE, '--format', 'raw')
        os.unlink(disk)
        conf = _conf_of(os.path.join(self.controller.state_dir, 'warehouse.conf'))
        self.manifest = warehouse_mod.Warehouse(conf).lookup(IMAGE)
        for root, _, files in os.walk(os.path.join(self.controller.state_dir, 'warehouse')):
            for leaf in files:
                with open(os.path.join(root, leaf), 'rb') as f:
                    while f.read(1 << 20):
                        pass

    # -- counters ----------------------------------------------------------------------

    def reset_counters(self) -> None:
        self.controller.run(['nft', 'reset', 'counters', 'table', 'inet', NFT_TABLE])

    def counters(self, host=None) -> dict[str, int]:
        """{name: bytes} of the benchmark's nftables counters on ``host`` (the
        repository host if None)."""
        out = (host or self.controller).run(['nft', '-j', 'list', 'counters', 'table',
                                             'inet', NFT_TABLE]).stdout
        found = {}
        for item in json.loads(out)['nftables']:
            if 'counter' in item:
                found[item['counter']['name']] = item['counter']['bytes']
        return found

    def peer_traffic(self) -> int:
        """IP bytes in and out of every compute host's peer chunk server so far."""
        total = 0
        for name in self.nodes:
            counted = self.counters(self.cloud.computes[name])
            total += counted['peer_in'] + counted['peer_out']
        return total

    def peer_stats(self, name: str) -> dict:
        """Host ``name``'s peer chunk server's /v1/stats ({} if it serves none)."""
        try:
            return self.cloud.peer_stats(name)
        except self.cluster_mod.ClusterError:
            return {}

    # -- the database ------------------------------------------------------------------

    def query(self, sql: str) -> list[list[str]]:
        """Rows of ``sql`` on the dispatcher's database, as the superuser over the unix
        socket in the controller's directory (no password, no namespace to enter).

        :raises: BenchError.
        """
        argv = ['runuser', '-u', 'postgres', '--',
                os.path.join(self.cluster_mod.postgres_bin(), 'psql'),
                '-h', os.path.join(self.controller.state_dir, 'postgres'),
                '-p', str(self.cluster_mod.POSTGRES_PORT), '-d', self.cluster_mod.USER,
                '-At', '-F', '\t', '-v', 'ON_ERROR_STOP=1', '-c', sql]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f'psql did not answer: {exc}') from exc
        if done.returncode != 0:
            raise BenchError(f'psql failed: {done.stderr.strip()}')
        return [line.split('\t') for line in done.stdout.splitlines() if line]

    def instances_since(self, since: float) -> list[dict]:
        """Instances of the deployments created since ``since`` (epoch seconds): name,
        host, state, when it was last updated and when its deployment was created."""
        rows = self.query(
            'SELECT i.name, coalesce(i.host, \'\'), i.state, extract(epoch from i.updated_at),'
            ' i.deployment_id, extract(epoch from d.created_at),'
            ' translate(i.reason, E\'\\t\\n\', \'  \')'
            ' FROM instances i JOIN deployments d ON d.id = i.deployment_id'
            f' WHERE d.created_at >= to_timestamp({since:.6f}) AT TIME ZONE \'UTC\'')
        return [{'name': r[0], 'host': r[1], 'state': r[2], 'updated': float(r[3]),
                 'deployment': r[4], 'created': float(r[5]), 'reason': r[6]} for r in rows]

    # -- the compute hosts' services ---------------------------------------------------

    def stop_nodes(self) -> None:
        """Every compute host's compute service, then its mirror service, stopped
        gracefully (bounded), the hosts at once."""
        def stop(name: str) -> None:
            for service in (f'compute-{name}', f'mirrors-{name}'):
                if service in self.cloud.services:
                    self.cloud.stop(service)
        with concurrent.futures.ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(stop, self.nodes))

    def wipe_nodes(self) -> None:
        """Every compute host's chunk cache, mirrors and instances gone: cold caches."""
        paths = self.cluster_mod.HOST_PATHS
        for name in self.nodes:
            state = self.cloud.computes[name].state_dir
            for leaf in (paths['mirror']['cache_path'], paths['mirror']['mirrors_path'],
                         paths['compute']['instances_path'], 'traces', 'work'):
                shutil.rmtree(os.path.join(state, leaf), ignore_errors=True)

    def start_nodes(self, contender: str) -> None:
        """Fresh services on every compute host, configured for ``contender``, waited
        for until the dispatcher has them up and, with peers, each knows all K."""
        peers = contender in ('d', 'e', 'e-kill')
        for name in self.nodes:
            host = self.cloud.computes[name]
            mirror = {'peer_address': host.address if peers else '', 'peer_port': PEER_PORT,
                      'peer_replicas': REPLICAS,
                      'prefetch_threads': PREFETCH_THREADS if contender.startswith('e') else 0,
                      'trace_path': (os.path.join(host.state_dir, 'traces')
                                     if name == self.qemu_node else '')}
            self.cloud.set_options(name, {'mirror': mirror})
        with concurrent.futures.ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(self.cloud.start_compute, self.nodes))
        for name in self.replay_nodes:
            for service in (f'compute-{name}', f'mirrors-{name}'):
                self.deprioritise(self.cloud.services[service].process.pid)
        self.cloud.wait_host_states({name: 'up' for name in self.nodes})
        if not self.clouds_made:
            # A cloud names hosts the dispatcher knows: after their first start.
            self.cloud.cli_json('cloud', 'create', 'replay', '--connection-limit', '1000',
                                *[a for n in self.replay_nodes for a in ('--host', n)])
            self.cloud.cli_json('cloud', 'create', 'qemu', '--connection-limit', '1000',
                                '--host', self.qemu_node)
            self.clouds_made = True
        if peers:
            deadline = time.monotonic() + PEERS_TIMEOUT
            while True:
                known = {name: len(self.peer_stats(name).get('peers', {}))
                         for name in self.nodes}
                if all(count == self.k for count in known.values()):
                    break
                if time.monotonic() >= deadline:
                    raise BenchError(f'the hosts do not all know their {self.k} peers after '
                                     f'{PEERS_TIMEOUT:g} s: {known}')
                time.sleep(POLL)

    def deprioritise(self, pid: int) -> None:
        """Give the session of a replay host's process ``pid`` (its CFS autogroup: the
        process and all it starts) the nice value --replay-nice; a failure is noted in
        ``nice_errors`` for the results, not raised."""
        if not self.args.replay_nice:
            return
        try:
            with open(f'/proc/{pid}/autogroup', 'w') as f:
                f.write(str(self.args.replay_nice))
        except OSError as exc:
            self.nice_errors.add(f'{type(exc).__name__}: {exc}')

    # -- the runs --------------------------------------------------------------------------

    def split(self, n: int) -> tuple[int, int]:
        """(replay instances, qemu guests) of N instances."""
        qemu = min(self.args.qemu_guests, n)
        return n - qemu, qemu

    def run(self, contender: str, n: int) -> Run:
        started = time.monotonic()
        self.stop_nodes()
        self.wipe_nodes()
        if contender in ('a', 'b'):
            run = self.run_outside(contender, n)
        else:
            if contender.startswith('e') and not self.profile_recorded:
                self.record_profile()
            run = self.run_vmcloud(contender, n)
        run.wall = time.monotonic() - started
        return run

    def attempt(self, contender: str, n: int) -> Run:
        """``run``, or a run of nothing but failures saying why it could not be done:
        the other runs go on (each starts from stopped, wiped hosts)."""
        started = time.monotonic()
        try:
            return self.run(contender, n)
        except (BenchError, self.cluster_mod.netns.NetnsError, OSError) as exc:
            why = f'{type(exc).__name__}: {exc}'
            print(f'  the run failed: {why[-2000:]}', flush=True)
            return Run(contender, n, self.k, {}, {'(the run)': why[-500:]}, 0, 0, None,
                       time.monotonic() - started, note=why[-500:])

    def record_profile(self) -> None:
        """One replay instance deployed and deleted: its mirror records the image's
        boot profile, which (e) prefetches."""
        print('  recording the boot profile (one instance, not measured)', flush=True)
        self.start_nodes('c')
        since = time.time() - 1
        self.cloud.cli_json('deploy', IMAGE, '-n', '1', '--cloud', 'replay', '--memory',
                            str(REPLAY_MEMORY_MIB), '--wait', '--timeout',
                            str(int(DEPLOY_TIMEOUT)), timeout=DEPLOY_TIMEOUT + 60)
        self.delete_since(since)
        self.profile_recorded = True
        self.stop_nodes()
        self.wipe_nodes()

    def deploy_args(self, replay: int, qemu: int) -> list[list[str]]:
        timeout = ['--wait', '--timeout', str(int(DEPLOY_TIMEOUT))]
        deploys = []
        if replay:
            deploys.append(['deploy', IMAGE, '-n', str(replay), '--cloud', 'replay',
                            '--memory', str(REPLAY_MEMORY_MIB)] + timeout)
        if qemu:
            deploys.append(['deploy', IMAGE, '-n', str(qemu), '--cloud', 'qemu',
                            '--memory', str(QEMU_MEMORY_MIB), '--kernel', self.kernel,
                            '--initrd', self.initrd, '--cmdline', self.cmdline] + timeout)
        return deploys

    def run_vmcloud(self, contender: str, n: int) -> Run:
        """Contenders (c), (d), (e): the deployments through the dispatcher, at once;
        ``e-kill``: (e), and a peer dies once it has served its first chunks (mid-transfer:
        with prefetch the chunks move within seconds of the start)."""
        self.start_nodes(contender)
        self.reset_counters()
        before = {name: self.peer_stats(name) for name in self.nodes}
        since = time.time() - 0.5
        replay, qemu = self.split(n)
        seen: dict[str, float] = {}
        failed: dict[str, str] = {}
        with contextlib.ExitStack() as faults, \
                concurrent.futures.ThreadPoolExecutor(2) as pool:
            deploys = [pool.submit(self.cloud.cli_json, *args, timeout=DEPLOY_TIMEOUT + 60)
                       for args in self.deploy_args(replay, qemu)]
            killed = contender != 'e-kill'
            while True:
                rows = self.instances_since(since)
                start = min((r['created'] for r in rows), default=None)
                for row in rows:
                    if row['state'] == 'active' and row['name'] not in seen:
                        seen[row['name']] = row['updated'] - start
                    elif row['state'] == 'error':
                        failed[row['name']] = row['reason']
                if not killed and start is not None and self.victim_busy(start):
                    self.kill_peer(faults)
                    killed = True
                if all(f.done() for f in deploys):
                    break
                time.sleep(POLL)
            problems = []
            for future in deploys:
                try:
                    future.result()
                except self.cluster_mod.ClusterError as exc:
                    problems.append(str(exc)[-500:])
        egress = self.counters()['warehouse']
        after = {name: self.peer_stats(name) for name in self.nodes}
        peer_bytes = sum(after[h].get('peer_bytes', 0) - before[h].get('peer_bytes', 0)
                         for h in self.nodes)
        rows = self.instances_since(since)
        for row in rows:
            if row['state'] != 'active' and row['name'] not in seen:
                failed.setdefault(row['name'], row['reason'] or row['state'])
        touched = self.touched(self.qemu_traces())
        qemu_guests = frozenset(r['name'] for r in rows if r['host'] == self.qemu_node)
        snapshot = None
        if contender == 'e' and n in self.args.snapshot_ns:
            snapshot = self.attempt_snapshot(n, rows, qemu_guests)
        self.delete_since(since)
        if snapshot is not None and not snapshot.error:
            # Once deleted, the qemu guests' mirrors have closed their traces: whole.
            snapshot.written_block_bytes = self.written_block_bytes(
                sum(1 for r in rows if r['state'] == states.ACTIVE
                    and r['name'] not in qemu_guests), self.qemu_traces())
        self.stop_nodes()
        note = '; '.join(problems)
        return Run(contender, n, self.k, seen, failed, egress, peer_bytes, touched, 0.0, note,
                   qemu_guests, snapshot)

    def victim_busy(self, start: float) -> bool:
        """Whether the peer to kill has served KILL_AFTER_CHUNKS chunks to the others (or
        KILL_DEADLINE s passed since the start, whatever it served)."""
        served = self.peer_stats(self.replay_nodes[0]).get('served_chunks', 0)
        return served >= KILL_AFTER_CHUNKS or time.time() - start >= KILL_DEADLINE

    def kill_peer(self, faults: contextlib.ExitStack) -> None:
        """node1's peer chunk server dies as a machine does, as every other host sees it:
        their packets to its peer port are dropped from now on (a connection hangs, no
        reset). Its own instances run on, its own requests to peers still pass."""
        victim = self.cloud.computes[self.replay_nodes[0]]
        print(f'  killing the peer chunk server of {victim.name}', flush=True)
        for name in self.nodes:
            if name != victim.name:
                faults.enter_context(self.cloud.computes[name].dropping(victim.address,
                                                                        PEER_PORT))

    def qemu_traces(self) -> list[trace_mod.Trace]:
        directory = os.path.join(self.cloud.computes[self.qemu_node].state_dir, 'traces')
        traces = []
        with contextlib.suppress(FileNotFoundError):
            for leaf in sorted(os.listdir(directory)):
                with contextlib.suppress(trace_mod.TraceError):
                    traces.append(trace_mod.read(os.path.join(directory, leaf)))
        return traces

    def touched(self, qemu_traces: list[trace_mod.Trace]) -> int:
        size = self.manifest.chunk_size
        indexes = touched_chunks(self.trace, size)
        for trace in qemu_traces:
            indexes |= touched_chunks(trace, size)
        return chunk_bytes(self.manifest, indexes)

    # -- the multi-snapshot after (e)'s deployment --------------------------------------

    def attempt_snapshot(self, n: int, rows: list[dict],
                         qemu_guests: frozenset[str]) -> SnapshotRun:
        """``snapshot_all``, or what of it was measured and why it failed: the run's
        deployment is deleted as usual either way."""
        print(f'  snapshot of every instance (N={n} K={self.k})', flush=True)
        started = time.monotonic()
        result = SnapshotRun(n, self.k)
        try:
            self.snapshot_all(result, rows, qemu_guests)
        except (BenchError, exception.VmcloudError, OSError, ValueError) as exc:
            result.error = f'{type(exc).__name__}: {exc}'[-1000:]
            print(f'  the snapshot failed: {result.error}', flush=True)
        result.wall = time.monotonic() - started
        return result

    def snapshot_all(self, result: SnapshotRun, rows: list[dict],
                     qemu_guests: frozenset[str]) -> None:
        """Snapshot every active instance while they run, once the replay instances
        played their trace to its end: a request per deployment (one cloud each: the
        replay instances', the qemu guests'), all at once; polled until every item is
        replicated, then persistent. Fills ``result`` as it goes.

        :raises: BenchError (an item failed, or the wait timed out), VmcloudError.
        """
        active = [r for r in rows if r['state'] == states.ACTIVE]
        deployments = sorted({r['deployment'] for r in active})
        if not deployments:
            raise BenchError('no active instance to snapshot')
        replays = [r for r in active if r['name'] not in qemu_guests]
        if replays:
            settled = (max(r['updated'] for r in replays)
                       + replay_tail(self.trace, self.args.time_scale) + SETTLE_MARGIN)
            time.sleep(max(0.0, settled - time.time()))
        repository = self.counters()['warehouse_in']
        peers = self.peer_traffic()
        compute_log = os.path.join(self.cloud.computes[self.qemu_node].state_dir,
                                   f'compute-{self.qemu_node}.log')
        log_start = os.path.getsize(compute_log)
        with concurrent.futures.ThreadPoolExecutor(len(deployments)) as pool:
            requests = [pool.submit(self.cloud.cli_json, 'snapshot', 'create', deployment)
                        for deployment in deployments]
            items = self.wait_snapshots(result, deployments, len(active), requests)
            for request in requests:
                request.result()  # the cut's own answer: a refused one is the error
        result.repository_bytes = self.counters()['warehouse_in'] - repository
        result.peer_bytes = self.peer_traffic() - peers
        result.items = len(items)
        pauses = [i['pause_ms'] for i in items if i['pause_ms'] is not None]
        qemu_pauses = [i['pause_ms'] for i in items
                       if i['pause_ms'] is not None and i['name'] in qemu_guests]
        result.longest_pause_ms = max(pauses, default=None)
        result.qemu_pause_ms = max(qemu_pauses, default=None)
        with open(compute_log, 'rb') as f:
            f.seek(log_start)
            freezes = freeze_times(f.read().decode('utf-8', 'replace'))
        result.qemu_freeze_ms = max((ms for name, ms in freezes.items()
                                     if name in qemu_guests), default=None)
        result.dirty_bytes = sum(i['dirty_bytes'] for i in items)
        result.uploaded_bytes = sum(i['uploaded_bytes'] for i in items)
        warehouse = self.warehouse()
        found = new_chunks(self.versions_of(items, warehouse),
                           lambda object_id: len(warehouse.read_chunk(object_id)))
        result.new_chunks, result.new_chunk_bytes = len(found), sum(found.values())

    def wait_snapshots(self, result: SnapshotRun, deployments: list[str], expected: int,
                       requests: list[concurrent.futures.Future]) -> list[dict]:
        """Poll the snapshots of ``deployments`` every SNAPSHOT_POLL s until all
        ``expected`` items are persistent, noting in ``result`` when every one was
        replicated and when persistent (from the snapshots' creation: a time is when
        a poll's answer came back).

        :returns: the items. :raises: BenchError if one failed or SNAPSHOT_TIMEOUT
            passed; ClusterError if a request was refused.
        """
        deadline = time.monotonic() + SNAPSHOT_TIMEOUT
        while True:
            for request in requests:
                if request.done():
                    request.result()
            snapshots, items = self.snapshot_rows(deployments)
            seen = time.time()
            replicated, persistent = snapshot_progress(snapshots, items, len(deployments),
                                                       expected)
            created = min((s['created'] for s in snapshots), default=seen)
            if replicated and result.replicated is None:
                result.replicated = seen - created
            if persistent:
                result.persistent = seen - created
                return items
            if time.monotonic() >= deadline:
                raise BenchError(
                    f'the snapshots are not persistent after {SNAPSHOT_TIMEOUT:g} s: '
                    f'{len(snapshots)} of {len(deployments)} snapshots '
                    f'({", ".join(s["state"] for s in snapshots)}), of {expected} items '
                    f'{sum(i["replicated"] for i in items)} replicated, '
                    f'{sum(i["persistent"] for i in items)} persistent')
            time.sleep(SNAPSHOT_POLL)

    def snapshot_rows(self, deployments: list[str]) -> tuple[list[dict], list[dict]]:
        """(snapshots, items) of the snapshots of ``deployments``, from the database.

        :raises: BenchError.
        """
        ids = ', '.join(sql_string(d) for d in deployments)
        rows = self.query(
            'SELECT s.id, s.state, extract(epoch from s.created_at),'
            ' translate(s.reason, E\'\\t\\n\', \'  \'), coalesce(i.state, \'\'),'
            ' coalesce(i.replicated, false), coalesce(i.persistent, false),'
            ' coalesce(i.pause_ms::text, \'\'), coalesce(i.dirty_bytes, 0),'
            ' coalesce(i.uploaded_bytes, 0), coalesce(i.version, \'\'),'
            ' coalesce(inst.name, \'\'), translate(coalesce(i.reason, \'\'), E\'\\t\\n\', \'  \')'
            ' FROM snapshots s LEFT JOIN snapshot_items i ON i.snapshot_id = s.id'
            ' LEFT JOIN instances inst ON inst.id = i.instance_id'
            f' WHERE s.deployment_id IN ({ids})')
        snapshots: dict[str, dict] = {}
        items = []
        for r in rows:
            snapshots[r[0]] = {'id': r[0], 'state': r[1], 'created': float(r[2]),
                               'reason': r[3]}
            if r[4]:
                items.append({'snapshot': r[0], 'state': r[4], 'replicated': r[5] == 't',
                              'persistent': r[6] == 't',
                              'pause_ms': float(r[7]) if r[7] else None,
                              'dirty_bytes': int(r[8]), 'uploaded_bytes': int(r[9]),
                              'version': r[10], 'name': r[11], 'reason': r[12]})
        return list(snapshots.values()), items

    def warehouse(self) -> warehouse_mod.Warehouse:
        """The warehouse's files on the repository host, read here."""
        return warehouse_mod.Warehouse(
            _conf_of(os.path.join(self.controller.state_dir, 'warehouse.conf')))

    def versions_of(self, items: list[dict], warehouse: warehouse_mod.Warehouse) -> list[tuple]:
        """(manifest, its parent's manifest or None) of every item's stored version.

        :raises: VmcloudError (a version the warehouse does not have).
        """
        parents: dict[str, object] = {}
        pairs = []
        for item in items:
            manifest = warehouse.lookup(item['version'])
            parent = None
            if manifest.parent is not None:
                key = str(manifest.parent)
                if key not in parents:
                    parents[key] = warehouse.lookup(key)
                parent = parents[key]
            pairs.append((manifest, parent))
        return pairs

    def written_block_bytes(self, replays: int, qemu_traces: list[trace_mod.Trace]) -> int:
        """The distinct 4 KiB blocks written with data, per instance, summed: each of the
        ``replays`` replay instances writes the trace's up to its shutdown marker (bytes
        of their own: replay.write_data), each qemu guest what its mirror recorded up to
        the power button."""
        total = replays * len(written_blocks(replayed_events(self.trace)))
        for trace in qemu_traces:
            total += len(written_blocks(replayed_events(trace)))
        return total * BLOCK

    def delete_since(self, since: float) -> None:
        """Delete the deployments created since ``since`` and wait (bounded) until their
        instances are gone: their mirrors close (recording the boot profile)."""
        rows = self.instances_since(since)
        for deployment in sorted({r['deployment'] for r in rows}):
            self.cloud.cli_json('delete', deployment)
        self.cloud.wait_for('the deployments to be deleted', lambda: sorted(
            r['name'] for r in self.instances_since(since) if r['state'] != 'deleted'),
            lambda left: not left, DELETE_TIMEOUT, interval=1.0)
        self.profile_recorded = True

    # -- (a) and (b): outside vmcloud, a worker per host -------------------------------------

    def start_central(self) -> None:
        """The central export of (b): qemu-nbd on the repository host over a raw copy of
        the image (exported once, not measured)."""
        if self.central is not None:
            return
        directory = os.path.join(self.controller.state_dir, 'central')
        os.makedirs(directory, exist_ok=True)
        raw = os.path.join(directory, 'base.raw')
        self.cloud.cli_json('image', 'export', IMAGE, raw)
        self.central = self.controller.popen(
            ['qemu-nbd', '--read-only', '--persistent', '--shared=4096', '--format=raw',
             f'--export-name={CENTRAL_EXPORT}', f'--bind={self.controller.address}',
             f'--port={CENTRAL_PORT}', '--cache=writeback', raw],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.controller.wait_for_tcp(self.controller.address, CENTRAL_PORT, SOCKET_TIMEOUT,
                                     self.central)

    def run_outside(self, contender: str, n: int) -> Run:
        """(a) or (b): one worker per host (this script, ``--worker``) in its namespace."""
        if contender == 'b':
            self.start_central()
        replay, qemu = self.split(n)
        assigned: dict[str, dict[str, list[str]]] = {
            name: {'replay': [], 'qemu': []} for name in self.nodes}
        for index in range(replay):
            node = self.replay_nodes[index % len(self.replay_nodes)]
            assigned[node]['replay'].append(f'{contender}{n}-r{index}')
        assigned[self.qemu_node]['qemu'] = [f'{contender}{n}-q{i}' for i in range(qemu)]
        self.reset_counters()
        booted: dict[str, float] = {}
        failed: dict[str, str] = {}
        lock = threading.Lock()
        workers = []
        start = time.time()
        for name in self.nodes:
            host = self.cloud.computes[name]
            work = os.path.join(host.state_dir, 'work')
            os.makedirs(work)
            spec = {'mode': 'copy' if contender == 'a' else 'central',
                    'config': self.cloud.config(name), 'work': work, 'image': IMAGE,
                    'central': (f'nbd://{self.controller.address}:{CENTRAL_PORT}/'
                                f'{CENTRAL_EXPORT}'),
                    'replay': assigned[name]['replay'], 'qemu': assigned[name]['qemu'],
                    'kernel': self.kernel, 'initrd': self.initrd, 'cmdline': self.cmdline,
                    'memory_mib': QEMU_MEMORY_MIB, 'timeout': DEPLOY_TIMEOUT,
                    'threads': PULL_THREADS}
            path = os.path.join(work, 'spec.json')
            with open(path, 'w') as f:
                json.dump(spec, f)
            if not (spec['replay'] or spec['qemu']):
                continue  # Nova copies an image to the hosts that boot it only
            with open(os.path.join(work, 'worker.log'), 'wb') as log:
                workers.append(host.popen([sys.executable, SCRIPT, '--worker', path],
                                          stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                          stderr=log, text=True))
            if name != self.qemu_node:
                self.deprioritise(workers[-1].pid)

        def listen(process: subprocess.Popen) -> None:
            for line in process.stdout:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                with lock:
                    if event['event'] == 'booted':
                        booted[event['name']] = event['t'] - start
                    elif event['event'] == 'failed':
                        failed[event['name']] = event['error']
        threads = [threading.Thread(target=listen, args=(w,), daemon=True) for w in workers]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + DEPLOY_TIMEOUT + 120
        for worker in workers:
            try:
                worker.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(10)
        for thread in threads:
            thread.join(10)
        for name, names in assigned.items():
            for instance in names['replay'] + names['qemu']:
                if instance not in booted:
                    failed.setdefault(instance, f'no boot-done (the worker ended first): '
                                                f'{worker_log(self.cloud.computes[name])}')
        counters = self.counters()
        egress = counters['warehouse'] + counters['central']
        # No mirror recorded the qemu guests' I/O: the trace's chunks alone.
        return Run(contender, n, self.k, booted, failed, egress, 0, self.touched([]), 0.0,
                   qemu=frozenset(assigned[self.qemu_node]['qemu']))


def worker_log(host) -> str:
    """The end of the worker's log on ``host`` (its stderr)."""
    try:
        with open(os.path.join(host.state_dir, 'work', 'worker.log'), 'rb') as f:
            return f.read()[-1000:].decode('utf-8', 'replace').strip()
    except OSError as exc:
        return f'(no worker log: {exc})'


def _conf_of(path: str) -> cfg.ConfigOpts:
    """A configuration of its own read from ``path`` (the global CONF is this process's)."""
    conf = cfg.ConfigOpts()
    for module in (vmcloud.conf.paths, vmcloud.conf.storage, vmcloud.conf.warehouse):
        module.register_opts(conf)
    conf(['--config-file', path], project='vmcloud', default_config_files=[])
    return conf


# -- the worker of (a) and (b), inside one host -------------------------------------------

_EMIT = threading.Lock()


def emit(**event) -> None:
    """One event a line on stdout; the boot threads emit at once, and print() writes a
    line's text and its end apart, so one write under a lock keeps lines whole."""
    with _EMIT:
        sys.stdout.write(json.dumps(event) + '\n')
        sys.stdout.flush()


def pull_image(warehouse: warehouse_mod.Warehouse, image: str, path: str,
               threads: int) -> int:
    """Every stored chunk of ``image`` from the warehouse into the raw file ``path``,
    ``threads`` at a time, durable. :returns: the bytes pulled."""
    manifest = warehouse.lookup(image)
    where: dict[str, list[int]] = {}
    for index, chunk_id in enumerate(manifest.chunks):
        if chunk_id is not None:
            where.setdefault(chunk_id, []).append(index)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, manifest.size)

        def pull(item: tuple[str, list[int]]) -> int:
            data = warehouse.read_chunk(item[0])
            for index in item[1]:
                os.pwrite(fd, data, index * manifest.chunk_size)
            return len(data)
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            pulled = sum(pool.map(pull, where.items()))
        os.fsync(fd)
    finally:
        os.close(fd)
    return pulled


def serve_overlay(overlay: str, socket_path: str) -> subprocess.Popen:
    """qemu-nbd serving the qcow2 ``overlay`` (and so its backing file) on a unix
    socket, waited for until it accepts a connection (the socket's file exists from its
    bind, before it listens), bounded. :raises: BenchError."""
    process = subprocess.Popen(
        ['qemu-nbd', f'--socket={socket_path}', '--export-name=disk', '--format=qcow2',
         '--shared=64', '--persistent', '--cache=writeback', overlay],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + SOCKET_TIMEOUT
    while not accepts(socket_path):
        if process.poll() is not None:
            raise BenchError(f'qemu-nbd for {overlay} exited: {process.stderr.read()[-500:]}')
        if time.monotonic() >= deadline:
            process.kill()
            raise BenchError(f'qemu-nbd for {overlay} did not listen in {SOCKET_TIMEOUT:g} s')
        time.sleep(0.02)
    return process


def accepts(socket_path: str) -> bool:
    """Whether a server listens on the unix socket ``socket_path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(socket_path)
        except OSError:
            return False
    return True


def worker(spec_path: str) -> None:
    """Run one host's instances of (a) or (b) and print an event a line (JSON):
    ``copied`` (a), then ``booted`` or ``failed`` for each instance."""
    with open(spec_path) as f:
        spec = json.load(f)
    CONF(['--config-file', spec['config']], project='vmcloud', default_config_files=[])
    work = spec['work']
    if spec['mode'] == 'copy':
        base = os.path.join(work, 'base.raw')
        pulled = pull_image(warehouse_mod.Warehouse(CONF), spec['image'], base,
                            spec['threads'])
        emit(event='copied', t=time.time(), bytes=pulled)
    else:
        base = spec['central']
    servers: list[subprocess.Popen] = []
    drivers = {}
    if spec['replay']:
        drivers['replay'] = driver_base.load(CONF, 'replay')
    if spec['qemu']:
        drivers['qemu'] = driver_base.load(CONF, 'qemu')
    lock = threading.Lock()

    def boot(kind: str, name: str) -> None:
        overlay = os.path.join(work, f'{name}.qcow2')
        try:
            common.run('qemu-img', 'create', '-q', '-f', 'qcow2', '-F', 'raw', '-b', base,
                       overlay)
            if kind == 'replay':
                socket_path = os.path.join(work, f'{name}.sock')
                server = serve_overlay(overlay, socket_path)
                with lock:
                    servers.append(server)
                instance = driver_base.InstanceSpec(
                    name=name, disk=f'nbd+unix:///disk?socket={socket_path}',
                    memory_mib=REPLAY_MEMORY_MIB)
            else:
                instance = driver_base.InstanceSpec(
                    name=name, disk=overlay, disk_format='qcow2',
                    memory_mib=spec['memory_mib'], kernel=spec['kernel'],
                    initrd=spec['initrd'], cmdline=spec['cmdline'])
            drivers[kind].spawn(instance)
            drivers[kind].wait_for_event(name, driver_base.BOOT_DONE, spec['timeout'])
            emit(event='booted', name=name, t=time.time())
        except Exception as exc:  # every instance's outcome is reported, named
            emit(event='failed', name=name, error=f'{type(exc).__name__}: {exc}'[:500])
    try:
        with concurrent.futures.ThreadPoolExecutor(
                max(1, len(spec['replay']) + len(spec['qemu']))) as pool:
            list(pool.map(lambda item: boot(*item),
                          [('replay', n) for n in spec['replay']]
                          + [('qemu', n) for n in spec['qemu']]))
    finally:
        for kind, driver in drivers.items():
            for name in driver.list_instances():
                with contextlib.suppress(Exception):
                    driver.destroy(name)
        for server in servers:
            server.kill()
            server.wait(10)


# -- the report -----------------------------------------------------------------------------

COLUMNS = ('K', 'N', 'contender', 'p50 s', 'p99 s', 'max s', 'all booted s',
           'all booted / (a)', 'replays p50 / p99 s', 'qemu guests s', 'repository egress',
           'egress / touched', 'between peers', 'failed', 'run s')


def cell_touched(runs: list[Run], run: Run) -> int | None:
    """The distinct bytes touched in ``run``'s cell (N, K): the most any of its runs
    measured (the vmcloud runs add what the qemu guests touched to the trace's)."""
    return max((r.touched for r in runs if (r.n, r.k) == (run.n, run.k) and r.touched),
               default=None)


def rows_of(runs: list[Run]) -> list[tuple]:
    rows = []
    for run in runs:
        nova = next((r for r in runs if (r.contender, r.n, r.k) == ('a', run.n, run.k)), None)
        ratio = ''
        if nova is not None and nova.all_booted and run.all_booted:
            ratio = f'{run.all_booted / nova.all_booted:.3f}'
        touched = cell_touched(runs, run)
        rows.append((run.k, run.n, CONTENDERS[run.contender], seconds(run.percentile(0.5)),
                     seconds(run.percentile(0.99)), seconds(max(run.times(), default=None)),
                     seconds(run.all_booted), ratio,
                     f'{seconds(run.percentile(0.5, True))} / '
                     f'{seconds(run.percentile(0.99, True))}',
                     ' '.join(seconds(t) for t in run.qemu_times()), common.mib(run.egress),
                     f'{run.egress / touched:.2f}' if touched else '',
                     common.mib(run.peer_bytes) if run.contender not in 'ab' else '',
                     len(run.failed), f'{run.wall:.0f}'))
    return rows


SNAPSHOT_COLUMNS = ('K', 'N', 'items', 'until replicated s', 'until persistent s',
                    'longest pause ms: qemu guests / all', 'qemu guests\' freeze ms',
                    'to repository',
                    'unique dirty: new chunks', 'repository / new chunks',
                    'unique dirty: 4 KiB blocks', 'repository / 4 KiB blocks',
                    'dirty (mirrors)', 'between peers', 'phase s')


def milliseconds(value: float | None) -> str:
    return 'n/a' if value is None else f'{value:.0f}'


def per(numerator: int, denominator: int | None) -> str:
    return f'{numerator / denominator:.2f}' if denominator else ''


def snapshot_rows_of(snapshots: list[SnapshotRun]) -> list[tuple]:
    rows = []
    for s in snapshots:
        blocks = s.written_block_bytes
        rows.append((s.k, s.n, s.items, seconds(s.replicated), seconds(s.persistent),
                     f'{milliseconds(s.qemu_pause_ms)} / {milliseconds(s.longest_pause_ms)}',
                     milliseconds(s.qemu_freeze_ms), common.mib(s.repository_bytes),
                     f'{common.mib(s.new_chunk_bytes)} ({s.new_chunks} chunks)',
                     per(s.repository_bytes, s.new_chunk_bytes),
                     common.mib(blocks) if blocks is not None else 'n/a',
                     per(s.repository_bytes, blocks), common.mib(s.dirty_bytes),
                     common.mib(s.peer_bytes), f'{s.wall:.0f}'))
    return rows


def snapshot_goals(snapshots: list[SnapshotRun]) -> list[str]:
    """The multi-snapshot's goals, a line each with its numbers (or why unmeasured)."""
    if not snapshots:
        return ['not measured: multi-snapshot of all instances (no run of (e) at a '
                '--snapshot-n, or --no-snapshot)']
    done = [s for s in snapshots if not s.error]
    failed = [f'N={s.n} K={s.k}' for s in snapshots if s.error]
    also = f'; the snapshot failed at {", ".join(failed)} (see Failures)' if failed else ''
    if not done:
        return [f'FAIL multi-snapshot of all instances: no snapshot ended persistent{also}']
    lines = []

    def ratio(s: SnapshotRun) -> float:
        return s.repository_bytes / s.new_chunk_bytes if s.new_chunk_bytes else math.inf
    worst = max(done, key=ratio)
    blocks = per(worst.repository_bytes, worst.written_block_bytes) or 'n/a'
    ok = all(ratio(s) <= 1.2 for s in done) and not failed
    lines.append(f'{"PASS" if ok else "FAIL"} bytes to the repository <= 1.2x the unique dirty '
                 f'bytes (the distinct new chunks) of the multi-snapshot at every N and K '
                 f'snapshotted: worst N={worst.n} K={worst.k}: '
                 f'{common.mib(worst.repository_bytes)} / {common.mib(worst.new_chunk_bytes)}'
                 f' = {ratio(worst):.2f}x (against the distinct 4 KiB blocks written, not the '
                 f'goal\'s measure: {blocks}x){also}')
    paused = [s for s in done if s.qemu_pause_ms is not None]
    if paused:
        longest = max(paused, key=lambda s: s.qemu_pause_ms)
        ok = all(s.qemu_pause_ms <= 100 for s in paused) and not failed
        lines.append(f'{"PASS" if ok else "FAIL"} longest pause of the qemu guests in the '
                     f'multi-snapshot <= 100 ms at every N and K snapshotted: worst '
                     f'N={longest.n} K={longest.k}: {longest.qemu_pause_ms:.0f} ms, of which '
                     f'the freeze {milliseconds(longest.qemu_freeze_ms)} ms (of all its items: '
                     f'{milliseconds(longest.longest_pause_ms)} ms){also}')
    else:
        lines.append('not measured: longest pause of the qemu guests in the multi-snapshot '
                     '(no qemu guest: --qemu-guests 0)')
    times = '; '.join(f'N={s.n} K={s.k}: {seconds(s.replicated)} s / {seconds(s.persistent)} s'
                      for s in done)
    lines.append(f'measured: time from the multi-snapshot\'s request until every item was '
                 f'replicated / persistent: {times}{also}')
    return lines


def goals(runs: list[Run]) -> list[str]:
    """The issue's goals, a PASS/FAIL line each with its numbers (or why unmeasured)."""
    lines = []
    peered = [r for r in runs if r.contender in ('d', 'e')]
    if peered:
        def ratio(run: Run) -> float:
            touched = cell_touched(runs, run)
            return run.egress / touched if touched else math.inf
        worst = max(peered, key=ratio)
        ok = all(ratio(r) <= 1.2 and not r.failed for r in peered)
        lines.append(f'{"PASS" if ok else "FAIL"} repository egress of (d) and (e) <= 1.2x '
                     f'the distinct bytes touched at every N and K: worst '
                     f'{CONTENDERS[worst.contender]} N={worst.n} K={worst.k}: '
                     f'{common.mib(worst.egress)} / '
                     f'{common.mib(cell_touched(runs, worst) or 0)} = {ratio(worst):.2f}x')
    else:
        lines.append('not measured: repository egress of (d) and (e) (neither ran)')
    by = {(r.contender, r.n, r.k): r for r in runs}
    e, a = by.get(('e', 128, 8)), by.get(('a', 128, 8))
    if e and a and e.all_booted and a.all_booted:
        ratio = e.all_booted / a.all_booted
        lines.append(f'{"PASS" if ratio <= 0.2 else "FAIL"} time to all booted of (e) <= '
                     f'0.2x (a) at K=8, N=128: {e.all_booted:.1f} s / {a.all_booted:.1f} s = '
                     f'{ratio:.3f}x')
    else:
        lines.append('not measured: time to all booted of (e) against (a) at K=8, N=128 '
                     '(that cell did not run, or an instance of it failed)')

    def replays(ratio: float | None) -> str:
        # The real guests boot under the CPU they emulate (TCG on a loaded machine): the
        # replay instances alone show what the storage does to the spread.
        return f' (replay instances alone: {ratio:.2f})' if ratio is not None else ''

    def spread(run: Run, replays_only: bool = False) -> float | None:
        p50, p99 = run.percentile(0.5, replays_only), run.percentile(0.99, replays_only)
        return p99 / p50 if p50 and p99 else None

    for run in (r for r in runs if r.contender == 'e'):
        ratio = spread(run)
        if ratio is not None:
            lines.append(f'{"PASS" if ratio <= 2 else "FAIL"} p99/p50 boot time of (e) <= 2 '
                         f'at N={run.n} K={run.k}: {run.percentile(0.99):.1f} s / '
                         f'{run.percentile(0.5):.1f} s = {ratio:.2f}'
                         f'{replays(spread(run, True))}')
    for kill in (r for r in runs if r.contender == 'e-kill'):
        normal = by.get(('e', kill.n, kill.k))
        p99, p99_normal = kill.percentile(0.99), normal and normal.percentile(0.99)
        if p99 and p99_normal:
            ratio = p99 / p99_normal
            alone = kill.percentile(0.99, True), normal.percentile(0.99, True)
            lines.append(f'{"PASS" if ratio <= 1.3 and not kill.failed else "FAIL"} a peer '
                         f'killed mid-deploy raises (e)\'s p99 by <= 1.3x at N={kill.n} '
                         f'K={kill.k}: {p99:.1f} s / {p99_normal:.1f} s = {ratio:.2f}x, '
                         f'{len(kill.failed)} failed instances'
                         f'{replays(alone[0] / alone[1] if all(alone) else None)}')
    if not any(r.contender == 'e-kill' for r in runs):
        lines.append('not measured: a peer killed mid-deploy (no extra run of (e))')
    lines += snapshot_goals([r.snapshot for r in runs if r.snapshot is not None])
    return lines


SNAPSHOT_TEXT = (
    'Once the instances of (e) booted, at each N of --snapshot-n (the largest N unless '
    'given) and every K, and before they are deleted: one snapshot request per deployment '
    '(`vmcloud snapshot create`; the replay instances and the qemu guests are two '
    'deployments, on two clouds, so two requests at once, each one cut of its instances), '
    'sent once the replay instances have played their trace to its end (the last boot plus '
    'the trace\'s recorded time from boot-done to its last request, plus '
    f'{SETTLE_MARGIN:g} s). The snapshots land on R = {REPLICAS} peers first and are '
    'persisted to the repository in the background. "until replicated" and "until '
    'persistent": from the snapshots\' creation in the dispatcher until every item of both '
    'was replicated, then persistent, as the dispatcher\'s database says (polled every '
    f'{SNAPSHOT_POLL * 1000:g} ms; a time is when the answer of the first poll that saw it '
    'came back, so it is late by up to one poll and one query). The pauses are the items\' '
    'pause_ms: from a guest\'s freeze until its thaw, which includes waiting for every other '
    'instance of its deployment to freeze, the dispatcher\'s two calls to the host and '
    'the barrier. "qemu guests\' freeze": the longest freeze alone among the qemu guests '
    '(QMP stop: the vCPUs stop, the guest\'s I/O is drained and flushed to its mirror), as '
    'their host\'s compute log says. "to repository": IP bytes the repository host '
    'received on the warehouse\'s port (nftables, headers included) from the requests until '
    'persistent: chunks, manifests and the protocol around them. "unique dirty: new chunks", '
    'the goal\'s measure: the distinct objects the stored versions need that the image '
    'version they were deployed from does not (plain chunks, and the deltas a partly '
    'written chunk is stored as, each at its stored size), each content once: the least a '
    'content-addressed repository of these objects can receive. "unique dirty: 4 KiB blocks": '
    'the distinct 4 KiB blocks each instance wrote data to (zeroes and trims left out), '
    'summed over the instances, from the traces: a replay instance writes its trace\'s '
    'writes up to the shutdown marker, each with bytes of its own (replay.write_data hashes '
    'the instance\'s name and the offset), so no two instances\' data deduplicate and '
    'this is what a repository that stored 4 KiB blocks would need; a qemu guest, what its '
    'mirror recorded until the power button (a little after the cut: an upper bound). A '
    'delta holds the blocks its chunk\'s writes touched, of [mirror] dirty_block_size (4 '
    'KiB), and about a hundred bytes more, so "new chunks" is the larger. "dirty '
    '(mirrors)": the items\' dirty_bytes summed (their dirty blocks, per instance). '
    '"between peers": IP bytes in and out of the compute hosts\' peer chunk servers meanwhile (the '
    'replicas put, their persisted notices, any chunk fetched). "phase s": the whole phase, '
    'settling and collection included.')


def svg(runs: list[Run]) -> str:
    """Instances booted over time, one panel per (K, N), a line per contender."""
    cells = sorted({(r.k, r.n) for r in runs})
    width, height, left, bottom, top = 560, 300, 56, 40, 28
    panel_w, panel_h = width - left - 150, height - bottom - top
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" '
             f'height="{height * len(cells)}" font-family="sans-serif" font-size="11">',
             f'<rect width="{width}" height="{height * len(cells)}" fill="white"/>']
    for row, (k, n) in enumerate(cells):
        y0 = row * height + top
        cell = [r for r in runs if (r.k, r.n) == (k, n)]
        longest = max([max(r.times(), default=0) for r in cell] + [1.0])
        step = 10 ** math.floor(math.log10(longest))
        if longest / step < 3:
            step /= 2
        scale_x = panel_w / (math.ceil(longest / step) * step)
        scale_y = panel_h / n

        def x(t: float) -> float:
            return left + t * scale_x

        def y(count: float) -> float:
            return y0 + panel_h - count * scale_y
        parts.append(f'<text x="{left}" y="{y0 - 10}" font-size="13">K = {k} hosts, '
                     f'N = {n} instances: instances booted over time</text>')
        parts.append(f'<rect x="{left}" y="{y0}" width="{panel_w}" height="{panel_h}" '
                     'fill="none" stroke="#999"/>')
        tick = 0.0
        while tick <= longest + step / 2:
            parts.append(f'<line x1="{x(tick):.1f}" y1="{y0 + panel_h}" x2="{x(tick):.1f}" '
                         f'y2="{y0 + panel_h + 4}" stroke="#999"/>'
                         f'<text x="{x(tick):.1f}" y="{y0 + panel_h + 16}" '
                         f'text-anchor="middle">{tick:g}</text>')
            tick += step
        parts.append(f'<text x="{left + panel_w / 2}" y="{y0 + panel_h + 32}" '
                     'text-anchor="middle">seconds since the start</text>')
        for count in (0, n // 2, n):
            parts.append(f'<text x="{left - 6}" y="{y(count) + 4:.1f}" '
                         f'text-anchor="end">{count}</text>')
        for index, run in enumerate(cell):
            points = [(left, y(0))]
            for booted, t in enumerate(run.times(), start=1):
                points += [(x(t), y(booted - 1)), (x(t), y(booted))]
            text = ' '.join(f'{px:.1f},{py:.1f}' for px, py in points)
            color = COLORS[run.contender]
            parts.append(f'<polyline points="{text}" fill="none" stroke="{color}" '
                         'stroke-width="1.6"/>')
            ly = y0 + 14 + index * 16
            parts.append(f'<line x1="{left + panel_w + 10}" y1="{ly - 4}" '
                         f'x2="{left + panel_w + 28}" y2="{ly - 4}" stroke="{color}" '
                         f'stroke-width="2"/><text x="{left + panel_w + 32}" y="{ly}">'
                         f'{CONTENDERS[run.contender][:3]}'
                         f'{" killed" if run.contender == "e-kill" else ""}</text>')
    parts.append('</svg>')
    return '\n'.join(parts) + '\n'


def write_doc(runs: list[Run], facts: dict[str, str], args: argparse.Namespace) -> str:
    result = common.table(COLUMNS, rows_of(runs))
    goal_lines = '\n'.join(f'- {line}' for line in goals(runs))
    failures = '\n'.join(f'- {CONTENDERS[r.contender]} N={r.n} K={r.k}: {name}: {why}'
                         for r in runs for name, why in sorted(r.failed.items())[:5])
    notes = '\n'.join(f'- {CONTENDERS[r.contender]} N={r.n} K={r.k}: {r.note}'
                      for r in runs if r.note)
    snapshots = [r.snapshot for r in runs if r.snapshot is not None]
    snapshot_errors = '\n'.join(f'- the multi-snapshot at N={s.n} K={s.k}: {s.error}'
                                for s in snapshots if s.error)
    svg_path = os.path.join(common.RESULTS_DIR, 'cluster.svg')
    os.makedirs(common.RESULTS_DIR, exist_ok=True)
    with open(svg_path, 'w') as f:
        f.write(svg(runs))
    sections = [
        ('Time until boot-done, repository egress, bytes between peers',
         'Per instance, the time from the start until it reached boot-done; p99 by '
         'nearest rank (with 16 instances it is the slowest). "all booted / (a)" compares '
         'with the Nova-style copy of the same N and K, "egress / touched" the bytes the '
         'repository host sent with the distinct bytes of stored chunks the instances '
         'touched. "run s" is the whole run, setup and teardown included.\n\n' + result),
        ('Multi-snapshot of all instances', SNAPSHOT_TEXT + '\n\n' + (
            common.table(SNAPSHOT_COLUMNS, snapshot_rows_of(snapshots)) if snapshots
            else 'Not taken in this run (--no-snapshot, or no run of (e) at a --snapshot-n).')),
        ('Goals', goal_lines),
        ('Reading the numbers',
         'The real qemu guests boot under the CPU they emulate (TCG on this 2-core machine, '
         'shared with every service and replay of the run; the CPU fact above says what '
         'share the replay hosts leave them): their boot time is mostly '
         'emulated CPU and varies from run to run by tens of seconds, and being the '
         'slowest they make p99, max and "all booted" at small N. "replays p50 / p99" '
         'shows the replay instances alone, whose time is the recorded think time (the '
         'trace\'s boot-done, scaled by time_scale) plus what their storage made them '
         'wait. --qemu-guests 0 leaves the real guests out.'),
        ('Instances booted over time', '![instances booted over time](cluster.svg)'),
    ]
    if failures or notes or snapshot_errors:
        found = (failures, notes, snapshot_errors)
        sections.append(('Failures', '\n'.join(x for x in found if x)))
    sections.append(('How it was measured', __doc__.split('\n\n', 2)[2].strip()))
    return common.write_results('cluster', 'Cluster deployment benchmark', sections, facts)


# -- main --------------------------------------------------------------------------------------

def report(run: Run) -> None:
    """A run's row, and why its first few failed instances failed, on stdout."""
    print(common.table(COLUMNS, rows_of([run])), flush=True)
    for name, why in sorted(run.failed.items())[:3]:
        print(f'  {name} failed: {why}', flush=True)
    if run.snapshot is not None:
        print(common.table(SNAPSHOT_COLUMNS, snapshot_rows_of([run.snapshot])), flush=True)


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true',
                        help='a smoke run: N = 16, K = 4, contenders c, d, e')
    parser.add_argument('--n', default='16,64,128', help='instances per deployment')
    parser.add_argument('--k', default='4,8', help='compute hosts')
    parser.add_argument('--contenders', default='abcde', help='of a, b, c, d, e')
    parser.add_argument('--qemu-guests', type=int, default=2,
                        help='real qemu guests among the N instances (on the K-th host)')
    parser.add_argument('--replay-nice', type=int, default=REPLAY_NICE,
                        help='the nice value of the replay hosts\' processes\' sessions '
                             '(CFS autogroups), so that the real guests\' host has about '
                             'the CPU of a host of its own; 0 for none')
    parser.add_argument('--no-kill', action='store_true',
                        help='no extra run of (e) with a peer killed mid-deploy')
    parser.add_argument('--snapshot-n', default='',
                        help='the N (comma-separated, of --n) at which the instances of '
                             '(e) are snapshotted once booted, at every K; the largest N '
                             'if not given')
    parser.add_argument('--no-snapshot', action='store_true',
                        help='no multi-snapshot after the deployments of (e)')
    parser.add_argument('--time-scale', type=float, default=1.0,
                        help='[replay] time_scale: factor on the recorded think time')
    parser.add_argument('--queue-depth', type=int, default=4,
                        help='[replay] queue_depth of the replay instances')
    parser.add_argument('--trace', default=TRACE, help='the boot trace to replay')
    parser.add_argument('--worker', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return args
    if args.quick:
        args.n, args.k, args.contenders = (','.join(map(str, QUICK['n'])),
                                           ','.join(map(str, QUICK['k'])), QUICK['contenders'])
    try:
        args.ns = sorted({int(n) for n in args.n.split(',')})
        args.ks = sorted({int(k) for k in args.k.split(',')})
        args.snapshot_ns = ({int(n) for n in args.snapshot_n.split(',')} if args.snapshot_n
                            else {max(args.ns)})
    except ValueError:
        parser.error(f'--n, --k and --snapshot-n take numbers separated by commas: '
                     f'{args.n!r}, {args.k!r}, {args.snapshot_n!r}')
    if not args.snapshot_ns <= set(args.ns):
        parser.error(f'--snapshot-n {args.snapshot_n!r} names an N not in --n {args.n!r}')
    if args.no_snapshot:
        args.snapshot_ns = set()
    args.contender_keys = [c for c in 'abcde' if c in args.contenders.replace(',', '')]
    unknown = set(args.contenders.replace(',', '')) - set('abcde')
    if unknown or not args.contender_keys:
        parser.error(f'--contenders takes letters of abcde, not {args.contenders!r}')
    if min(args.ks) < 2:
        parser.error('K must be at least 2: one host runs the qemu guests')
    if args.qemu_guests < 0 or min(args.ns) <= args.qemu_guests:
        parser.error('--qemu-guests must be below every N')
    return args


def main() -> int:
    args = parse_arguments()
    if args.worker:
        worker(args.worker)
        return 0
    if os.geteuid() != 0:
        print('benchmarks/cluster.py needs root (network namespaces)', file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    begun = time.monotonic()
    args.trace = ensure_trace(args.trace)
    delay = netem_available()
    from vmcloud.drivers.qemu import accel
    with common.scratch_state(CONF):
        driver_base.load(CONF, 'qemu')  # registers [qemu]
        accelerator = accel.choose(CONF, shutil.which(CONF.qemu.binary),
                                   guest.spec('probe', guest.path('disk.img')))
    runs: list[Run] = []
    nice_errors: set[str] = set()
    for k in args.ks:
        with Harness(k, args, accelerator, delay) as harness:
            for n in args.ns:
                for contender in args.contender_keys:
                    print(f'K={k} N={n} {CONTENDERS[contender]}', flush=True)
                    runs.append(harness.attempt(contender, n))
                    report(runs[-1])
            if 'e' in args.contender_keys and not args.no_kill and k == args.ks[-1]:
                n = args.ns[-1]
                print(f'K={k} N={n} {CONTENDERS["e-kill"]}', flush=True)
                runs.append(harness.attempt('e-kill', n))
                report(runs[-1])
            nice_errors |= harness.nice_errors
    trace = trace_mod.read(args.trace)
    facts = common.machine()
    facts.update({
        'harness': 'tests/multihost/cluster.py: a network namespace per host on one switch',
        'links': f'every host {RATE} each way (tc tbf on both ends of its veth)',
        'latency added': DELAY if delay else f'none: this kernel has no netem, so the '
                                             f'{DELAY} asked for is not applied (veth RTT '
                                             'only)',
        'repository host': 'ctl: warehouse service (file backend), RabbitMQ, PostgreSQL, '
                           'dispatcher; (b)\'s central qemu-nbd',
        'hosts': 'K - 1 replay hosts, 1 qemu host (the real guests)',
        'page cache dropped between runs': 'no: the warehouse\'s packs are read once '
                                           'first, warm for every contender; the hosts\' '
                                           'caches and copies start empty',
        'image': f'{IMAGE}: systemd Debian guest, '
                 f'{common.mib(os.path.getsize(guest.realistic_disk()))} virtual',
        'trace': f'{os.path.relpath(args.trace, common.REPO)}: {len(trace.requests())} '
                 f'requests, {common.mib(trace.bytes_of(trace_mod.READ))} read, '
                 f'boot-done at {marker_seconds(trace, driver_base.BOOT_DONE)} s of '
                 f'{trace.duration_ms / 1000:.1f} s recorded, under {accelerator}',
        'replay': f'time_scale {args.time_scale:g}, queue_depth {args.queue_depth}',
        'real qemu guests per run': f'{args.qemu_guests} ({accelerator}), '
                                    f'{QEMU_MEMORY_MIB} MiB',
        'peers': f'R = {REPLICAS}, prefetch_threads {PREFETCH_THREADS} for (e)',
        'CPU': cpu_fact(args.replay_nice, nice_errors),
        'whole benchmark': f'{time.monotonic() - begun:.0f} s',
    })
    path = write_doc(runs, facts, args)
    print('\n' + common.table(COLUMNS, rows_of(runs)))
    print('\n'.join(goals(runs)))
    print(f'\nwritten to {os.path.relpath(path, common.REPO)} and cluster.svg')
    return 0


def cpu_fact(nice: int, errors: set[str]) -> str:
    """The results' line on how the hosts share the machine's CPUs."""
    shared = f'the K hosts share this machine\'s {os.cpu_count()} CPUs'
    if not nice:
        return f'{shared}, all at nice 0'
    if errors:
        return (f'{shared}; the replay hosts\' sessions were to run at autogroup nice {nice}, '
                f'not applied to all: {"; ".join(sorted(errors))[:300]}')
    return (f'{shared}; every session of the replay hosts (services, workers, and so their '
            f'qemu-nbd and replays) runs at autogroup nice {nice}, the qemu host\'s and the '
            'repository host\'s at 0, so that under contention the real guests\' host has '
            'about the CPU of a host of its own')


def marker_seconds(trace: trace_mod.Trace, marker: str) -> str:
    """When the recorded guest printed ``marker``, in seconds, or '?' if it did not."""
    found = [e.ms for e in trace.events if e.op == trace_mod.PHASE and e.marker == marker]
    return f'{found[0] / 1000:.1f}' if found else '?'


if __name__ == '__main__':
    sys.exit(main())
