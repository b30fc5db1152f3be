"""Snapshot N running guests at once: vmcloud's barrier against a qcow2 export per instance.

    .venv/bin/python benchmarks/multisnapshot.py [--count 8] [--write-mib 1,8,32]

N test guests run in the all-in-one cloud (one compute node, qemu driver), each
having written W MiB of random data. Then, on the same guests:

- vmcloud: one snapshot request: every guest paused at one barrier, its dirty set
  taken, resumed, the dirty chunks uploaded in the background (deduplicated);
- baseline: every guest paused, its whole disk exported with ``qemu-img convert -O
  qcow2`` (all N in parallel), resumed.

Reported: the longest pause any guest saw, and the bytes written against the
unique dirty bytes (the distinct non-zero content of the dirty chunks).
"""
import argparse
import concurrent.futures
import hashlib
import os
import subprocess
import sys
import time

if __package__ in (None, ''):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from oslo_config import cfg  # noqa: E402

import vmcloud.conf  # noqa: E402,F401 - registers options
from benchmarks import common  # noqa: E402
from tests import guest  # noqa: E402
from vmcloud import allinone  # noqa: E402
from vmcloud.drivers import base as driver_base  # noqa: E402

CONF = cfg.CONF
TIMEOUT = 600


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


COLUMNS = ('N', 'MiB written per guest', 'contender', 'longest pause ms', 'until stored s',
           'unique dirty', 'bytes written', 'written / unique dirty')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--count', type=int, default=8)
    parser.add_argument('--write-mib', default='1,8,32')
    args = parser.parse_args()
    with common.scratch_state(CONF) as root:
        rows = []
        for write_mib in [int(w) for w in args.write_mib.split(',')]:
            rows += one_size(root, args.count, write_mib)
            print(common.table(COLUMNS, rows[-2:]), flush=True)
    result = common.table(COLUMNS, rows)
    facts = common.machine()
    facts['page cache dropped between runs'] = 'no'
    facts.update({'node': 'one compute node (this machine), qemu driver',
                  'chunk size': str(CONF.storage.chunk_size)})
    print(f'\n{result}')
    path = common.write_results('multisnapshot', 'Multi-snapshot benchmark', [
        ('Pause and bytes written',
         'The test guest writes W MiB of random data to its disk before app-running; each '
         'guest also writes its own small file. Goals: bytes written <= 1.2x the unique '
         'dirty bytes; longest pause <= 100 ms whatever the dirty size. "until stored" '
         'for vmcloud runs from the request until every version is committed.\n\n'
         + result)], facts)
    print(f'\nwritten to {os.path.relpath(path, common.REPO)}')


if __name__ == '__main__':
    main()
