"""Snapshot guests on two compute hosts at one cut: the longest pause as the dirty data grows.

    .venv/bin/python benchmarks/multisnapshot.py [--per-host 2] [--write-mib 1,8,32]
                                                 [--repeat 1] [--allinone]

On the multi-host harness (tests/multihost/cluster.py: a controller with RabbitMQ,
PostgreSQL, the warehouse service and the dispatcher, and two compute hosts each
running ``vmcloud mirror-service`` and ``vmcloud compute``, every host a network
namespace on 1 Gbit/s links), for each size W: 2 x per-host test guests, each having
written W MiB of random data to its disk before app-running without ever asking for a
flush (``vmcloud.no_flush=1``: the data is on its compute host, not yet durable), are
snapshotted by one request, under two compute configurations run side by side
(their order alternating from one size to the next, each on a deployment of its own,
so each freeze meets fresh dirty data):

- vmcloud: ``[compute] sync_before_freeze = True`` (the default): each mirror's
  writes are made durable while its guest still runs, then the guests freeze;
- baseline: ``sync_before_freeze = False``: the freeze (QMP ``stop``) waits for the
  writes not yet durable to be flushed.

The configuration is switched by rewriting the compute hosts' configs and restarting
their compute services. Reported per run: the longest and the median pause any guest
saw, the cut (the last freeze minus the first thaw: negative when every guest froze
before any thawed), the seconds from the request until every version was stored, and
the dirty and uploaded bytes.

``--allinone`` adds the earlier comparison on one compute node in one process: the
vmcloud snapshot against a qcow2 export per instance while paused.
"""
import argparse
import concurrent.futures
import hashlib
import os
import statistics
import subprocess
import sys
import time

if __package__ in (None, ''):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from oslo_config import cfg  # noqa: E402

import vmcloud.conf  # noqa: E402,F401 - registers options
from benchmarks import common  # noqa: E402
from tests import guest  # noqa: E402
from tests.multihost import cluster  # noqa: E402
from vmcloud import allinone  # noqa: E402
from vmcloud.drivers import base as driver_base  # noqa: E402

CONF = cfg.CONF
TIMEOUT = 600
MEMORY_MIB = 256
HOSTS = ('node1', 'node2')
APP_RUNNING = r'^VMCLOUD-PHASE app-running\r?$'
CONTENDERS = {'vmcloud (sync before freeze)': True,
              'baseline (freeze flushes)': False}
COLUMNS = ('MiB written per guest', 'contender', 'guests', 'longest pause ms',
           'median pause ms', 'last freeze - first thaw ms', 'until stored s', 'dirty',
           'uploaded')


# -- on the harness -------------------------------------------------------------------


def configure(cloud: cluster.Cluster, sync_before_freeze: bool) -> None:
    """Every compute host's config says ``sync_before_freeze``, its service restarted."""
    for name in HOSTS:
        cloud.set_options(name, {'compute': {'sync_before_freeze': sync_before_freeze}})
        cloud.stop_compute(name)
        cloud.restart(f'compute-{name}')
    cloud.wait_host_states({name: 'up' for name in HOSTS})


def snapshot_once(cloud: cluster.Cluster, count: int, write_mib: int) -> dict:
    """Deploy ``count`` guests that wrote ``write_mib`` MiB each, snapshot them all at
    once, delete them. :returns: the snapshot and how long it took to be stored."""
    # no_flush: the guest's data reaches its mirror unsynced, as a busy guest's would.
    cmdline = (f'{guest.CMDLINE} vmcloud.id={{name}} vmcloud.write_mib={write_mib} '
               'vmcloud.no_flush=1')
    deployment = cloud.deploy(count, cmdline, MEMORY_MIB, timeout=TIMEOUT)
    try:
        if deployment['state'] != 'active':
            raise RuntimeError(f'deployment failed: {deployment}')
        for instance in deployment['instances']:
            cloud.wait_console(instance['host'], instance['name'], APP_RUNNING, TIMEOUT)
        started = time.perf_counter()
        snapshot = cloud.cli_json('snapshot', 'create', deployment['id'], '--wait',
                                  '--timeout', str(TIMEOUT), timeout=TIMEOUT + 60)
        took = time.perf_counter() - started
        if snapshot['state'] != 'available':
            raise RuntimeError(f'snapshot failed: {snapshot}')
    finally:
        cloud.cli_json('delete', deployment['id'])
        cloud.wait_for(f'deployment {deployment["id"]} deleted',
                       lambda: cloud.deployment(deployment['id']),
                       lambda d: d['state'] == 'deleted', TIMEOUT)
    return {'snapshot': snapshot, 'took': took,
            'hosts': sorted({i['host'] for i in deployment['instances']})}


def row(write_mib: int, contender: str, run: dict) -> tuple:
    items = run['snapshot']['items']
    pauses = [item['pause_ms'] for item in items]
    cut = (max(i['frozen_at'] for i in items) - min(i['thawed_at'] for i in items)) * 1000
    return (write_mib, contender, f'{len(items)} on {"+".join(run["hosts"])}',
            f'{max(pauses):.0f}', f'{statistics.median(pauses):.0f}', f'{cut:.0f}',
            f'{run["took"]:.2f}', common.mib(sum(i['dirty_bytes'] for i in items)),
            common.mib(sum(i['uploaded_bytes'] for i in items)))


SUMMARY_COLUMNS = ('MiB written per guest',
                   *(f'{c}: worst longest pause ms' for c in CONTENDERS), 'baseline / vmcloud')


def summary(rows: list[tuple]) -> str:
    """Per size, the worst longest pause of each contender over its runs, and their ratio."""
    worst: dict[tuple[int, str], int] = {}
    for write_mib, contender, _guests, longest, *_ in rows:
        worst[write_mib, contender] = max(worst.get((write_mib, contender), 0), int(longest))
    ours, baseline = CONTENDERS
    return common.table(SUMMARY_COLUMNS, [
        (size, worst[size, ours], worst[size, baseline],
         f'{worst[size, baseline] / max(1, worst[size, ours]):.2f}')
        for size in sorted({size for size, _ in worst})])


def on_the_harness(per_host: int, sizes: list[int], repeat: int) -> str:
    """:returns: the summary and results tables."""
    rows = []
    with cluster.Cluster(rate='1gbit') as cloud:
        cloud.import_guest()
        for name in HOSTS:
            cloud.start_compute(name)
        cloud.wait_host_states({name: 'up' for name in HOSTS})
        names = list(CONTENDERS)
        for number, write_mib in enumerate(sizes):
            # Alternating, so that neither always runs on the warmer cloud.
            order = names if number % 2 == 0 else names[::-1]
            for _ in range(repeat):
                for contender in order:
                    configure(cloud, CONTENDERS[contender])
                    rows.append(row(write_mib, contender,
                                    snapshot_once(cloud, per_host * len(HOSTS), write_mib)))
                    print(common.table(COLUMNS, rows[-1:]), flush=True)
    return f'{summary(rows)}\n\nEvery run:\n\n{common.table(COLUMNS, rows)}'


# -- all in one process, one node (the earlier comparison) ------------------------------


def unique_dirty_bytes(node, names: list[str]) -> int:
    seen: dict[str, int] = {}
    for name in names:
        disk = node.mirrors.get(name).disk
        for index in disk.dirty.indexes():
            data = disk.read(index * disk.manifest.chunk_size, disk.manifest.chunk_length(index))
            if data.count(0) != len(data):
                seen[hashlib.sha256(data).hexdigest()] = len(data)
    return sum(seen.values())


def qcow2_exports(node, names: list[str], work: str) -> tuple[float, int]:
    """Pause all, export every disk to qcow2 in parallel, resume all: (longest pause, bytes)."""
    for name in names:
        node.driver.freeze_io(name)
    frozen = time.perf_counter()

    def export(name: str) -> int:
        path = os.path.join(work, f'{name}.qcow2')
        subprocess.run(['qemu-img', 'convert', '-f', 'raw', '-O', 'qcow2',
                        node.mirrors.get(name).uri, path], check=True)
        return os.path.getsize(path)
    try:
        with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
            written = sum(pool.map(export, names))
    finally:
        for name in names:
            node.driver.thaw_io(name)
    return (time.perf_counter() - frozen) * 1000, written


def one_size(root: str, count: int, write_mib: int) -> tuple:
    with common.nested_state(CONF, root) as work:
        with allinone.AllInOne(CONF, hosts=1, driver='qemu') as cloud:
            node = cloud.computes[0]
            cloud.warehouse.import_image(guest.path('disk.img'), 'guest')
            boot = {'kernel': guest.path('vmlinuz'), 'initrd': guest.path('initrd.img'),
                    'cmdline': f'{guest.CMDLINE} vmcloud.id={{name}} vmcloud.write_mib={write_mib}'}
            deployment = cloud.api.deploy('guest', count, boot=boot)
            deployment = cloud.api.wait_deployment(deployment['id'], TIMEOUT)
            names = [i['name'] for i in deployment['instances']]
            for name in names:
                node.driver.wait_for_event(name, driver_base.APP_RUNNING, TIMEOUT)
            unique = unique_dirty_bytes(node, names)

            stored_before = cloud.warehouse.stats().stored_bytes
            started = time.perf_counter()
            snapshot = cloud.api.snapshot(deployment['id'])
            snapshot = cloud.api.wait_snapshot(snapshot['id'], TIMEOUT)
            took = time.perf_counter() - started
            if snapshot['state'] != 'available':
                raise RuntimeError(f'snapshot failed: {snapshot}')
            written = cloud.warehouse.stats().stored_bytes - stored_before
            pause = max(item['pause_ms'] for item in snapshot['items'])

            export_pause, export_written = qcow2_exports(node, names, work)
    return [
        (count, write_mib, 'vmcloud snapshot', f'{pause:.0f}', f'{took:.2f}', common.mib(unique),
         common.mib(written), f'{written / unique:.3f}'),
        (count, write_mib, 'qcow2 export per instance', f'{export_pause:.0f}',
         f'{export_pause / 1000:.2f}', common.mib(unique), common.mib(export_written),
         f'{export_written / unique:.3f}'),
    ]


ALLINONE_COLUMNS = ('N', 'MiB written per guest', 'contender', 'longest pause ms',
                    'until stored s', 'unique dirty', 'bytes written',
                    'written / unique dirty')


def all_in_one(count: int, sizes: list[int]) -> str:
    """:returns: the results table."""
    with common.scratch_state(CONF) as root:
        rows = []
        for write_mib in sizes:
            rows += one_size(root, count, write_mib)
            print(common.table(ALLINONE_COLUMNS, rows[-2:]), flush=True)
    return common.table(ALLINONE_COLUMNS, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--per-host', type=int, default=2, help='guests per compute host')
    parser.add_argument('--write-mib', default='1,8,32')
    parser.add_argument('--repeat', type=int, default=1, help='runs per contender and size')
    parser.add_argument('--allinone', action='store_true',
                        help='also the one-node comparison against qcow2 exports')
    parser.add_argument('--count', type=int, default=8, help='guests of the one-node run')
    args = parser.parse_args()
    CONF([], project='vmcloud', default_config_files=[])
    sizes = [int(w) for w in args.write_mib.split(',')]
    facts = common.machine()
    facts['page cache dropped between runs'] = ('no: the baseline measures the flush of what '
                                                'the guests left in it')
    harness = on_the_harness(args.per_host, sizes, args.repeat)
    print(f'\n{harness}')
    sections = [(
        'One cut across two hosts, with and without a sync before the freeze',
        'Each guest writes W MiB of random data to its disk before app-running, with O_DIRECT '
        'and never a flush (`vmcloud.no_flush=1`): it sits on its compute host, not yet '
        'durable, as a busy guest\'s recent writes would. Goal: the longest pause <= 100 ms '
        'and flat as W grows; the cut negative (every guest froze before any thawed). '
        '"until stored" runs from the request until every version is committed.\n\n'
        + harness)]
    facts.update({'hosts': 'a controller and 2 compute hosts (network namespaces, '
                           '1 Gbit/s links), qemu driver',
                  'guests per host': str(args.per_host),
                  'chunk size': str(CONF.storage.chunk_size)})
    if args.allinone:
        result = all_in_one(args.count, sizes)
        print(f'\n{result}')
        sections.append((
            'All in one process, one node: against a qcow2 export per instance',
            f'{args.count} guests on one node. Goals: bytes written <= 1.2x the unique '
            'dirty bytes; longest pause <= 100 ms whatever the dirty size.\n\n' + result))
    path = common.write_results('multisnapshot', 'Multi-snapshot benchmark', sections, facts)
    print(f'\nwritten to {os.path.relpath(path, common.REPO)}')


if __name__ == '__main__':
    main()
