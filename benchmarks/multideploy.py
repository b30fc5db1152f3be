"""Deploy N guests at once from one image: full copies vs a shared NBD export vs vmcloud mirrors.

    .venv/bin/python benchmarks/multideploy.py [--counts 1,4,8,16] [--realistic 4]

Three ways to give N instances of one image a disk, each timed from the first
request until every guest printed boot-done, with the bytes read from the
warehouse counted:

(a) full copy: export the image to a raw file per instance, then boot;
(b) a qcow2 overlay per instance over one NBD export of the image that reads
    the warehouse on every request (no local caching);
(c) vmcloud: a deployment through the all-in-one cloud (dispatcher, scheduler,
    one compute manager), each instance on a mirror over the node's chunk cache.

All on one node (this machine), the qemu driver under the probed accelerator.
"""
import argparse
import concurrent.futures
import os
import shutil
import subprocess
import sys
import threading
import time

if __package__ in (None, ''):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from oslo_config import cfg  # noqa: E402

import vmcloud.conf  # noqa: E402,F401 - registers options
from benchmarks import common  # noqa: E402
from tests import guest  # noqa: E402
from vmcloud import allinone  # noqa: E402
from vmcloud.drivers import base as driver_base  # noqa: E402
from vmcloud.drivers.qemu import accel  # noqa: E402
from vmcloud.nbd import device  # noqa: E402
from vmcloud.nbd import server as nbd_server  # noqa: E402
from vmcloud.storage import reader  # noqa: E402
from vmcloud.storage import warehouse as warehouse_mod  # noqa: E402
from vmcloud.storage.manifest import Manifest  # noqa: E402

CONF = cfg.CONF
TIMEOUT = 600


class WarehouseDevice(device.BlockDevice):
    """A read-only NBD device that reads the warehouse on every request: baseline (b)."""

    def __init__(self, warehouse: warehouse_mod.Warehouse, manifest: Manifest):
        self.warehouse, self.manifest = warehouse, manifest
        self.bytes_read = 0
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return self.manifest.size

    @property
    def read_only(self) -> bool:
        return True

    def read(self, offset: int, length: int) -> bytes:
        with reader.VersionReader(self._read_chunk, self.manifest) as version:
            version.seek(offset)
            return version.read(length)

    def _read_chunk(self, chunk_id: str) -> bytes:
        data = self.warehouse.read_chunk(chunk_id)
        with self._lock:
            self.bytes_read += len(data)
        return data

    def write(self, offset, data, fua=False):
        raise OSError(1, 'read-only')

    def flush(self):
        pass

    def write_zeroes(self, offset, length, fua=False):
        raise OSError(1, 'read-only')


class Workload:
    def __init__(self, label: str, image: str, spec):
        self.label, self.image, self.spec = label, image, spec  # spec(name, disk, format)


def boot_all(driver, specs) -> None:
    with concurrent.futures.ThreadPoolExecutor(max(1, len(specs))) as pool:
        list(pool.map(lambda spec: driver.boot(spec, TIMEOUT), specs))


def full_copies(work: str, workload: Workload, count: int) -> tuple[float, int]:
    warehouse = warehouse_mod.Warehouse(CONF)
    manifest = warehouse.lookup(workload.image)
    driver = driver_base.load(CONF, 'qemu')
    names = [guest.unique_name(f'copy{i}') for i in range(count)]
    started = time.perf_counter()
    paths = [os.path.join(work, f'{name}.raw') for name in names]
    with concurrent.futures.ThreadPoolExecutor(max(1, count)) as pool:
        list(pool.map(lambda path: warehouse.export(manifest, path), paths))
    try:
        boot_all(driver, [workload.spec(n, p, 'raw') for n, p in zip(names, paths)])
        elapsed = time.perf_counter() - started
    finally:
        for name in names:
            if name in driver.list_instances():
                driver.destroy(name)
    # An export reads every chunk that is not a hole, repeated ones each time.
    per_copy = sum(manifest.chunk_length(i) for i, c in enumerate(manifest.chunks) if c)
    return elapsed, per_copy * count


def shared_export(work: str, workload: Workload, count: int) -> tuple[float, int]:
    warehouse = warehouse_mod.Warehouse(CONF)
    source = WarehouseDevice(warehouse, warehouse.lookup(workload.image))
    driver = driver_base.load(CONF, 'qemu')
    socket = os.path.join(work, 'base.sock')
    names = [guest.unique_name(f'overlay{i}') for i in range(count)]
    with nbd_server.NbdServer() as server:
        server.add_export('base', source)
        server.listen_unix(socket)
        started = time.perf_counter()
        specs = []
        for name in names:
            overlay = os.path.join(work, f'{name}.qcow2')
            subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', '-b',
                            f'nbd+unix:///base?socket={socket}', '-F', 'raw', overlay],
                           check=True)
            specs.append(workload.spec(name, overlay, 'qcow2'))
        try:
            boot_all(driver, specs)
            elapsed = time.perf_counter() - started
        finally:
            for name in names:
                if name in driver.list_instances():
                    driver.destroy(name)
    return elapsed, source.bytes_read


def mirrors(work: str, workload: Workload, count: int) -> tuple[float, int, int]:
    probe = workload.spec('probe', 'x', 'raw')
    boot = {'kernel': probe.kernel, 'initrd': probe.initrd,
            'cmdline': probe.cmdline.replace('vmcloud.id=probe', 'vmcloud.id={name}')}
    with allinone.AllInOne(CONF, hosts=1, driver='qemu') as cloud:
        node = cloud.computes[0]
        started = time.perf_counter()
        deployment = cloud.api.deploy(workload.image, count, memory_mib=probe.memory_mib,
                                      boot=boot)
        deployment = cloud.api.wait_deployment(deployment['id'], TIMEOUT)
        elapsed = time.perf_counter() - started
        if deployment['state'] != 'active':
            raise RuntimeError(f'deployment failed: {deployment}')
        manifest = cloud.warehouse.lookup(workload.image)
        touched = set()
        for instance in deployment['instances']:
            disk = node.mirrors.get(instance['name']).disk
            touched |= {manifest.chunks[i] for i in disk.fetched_indexes()} - {None}
        touched_bytes = sum(len(cloud.warehouse.read_chunk(c)) for c in touched)
        return elapsed, node.mirrors.cache.stats.fetched_bytes, touched_bytes


def run_counts(root: str, workload: Workload, counts: list[int]) -> list[tuple]:
    rows = []
    for count in counts:
        results = {}
        for name, contender in (('(a) full copy', full_copies),
                                ('(b) overlay on shared NBD', shared_export),
                                ('(c) vmcloud mirrors', mirrors)):
            with common.nested_state(CONF, root) as work:
                results[name] = contender(work, workload, count)
        time_b, bytes_b = results['(b) overlay on shared NBD'][:2]
        touched = results['(c) vmcloud mirrors'][2]
        for name, result in results.items():
            elapsed, read = result[:2]
            rows.append((workload.label, count, name, f'{elapsed:.2f}',
                         f'{elapsed / time_b:.3f}', common.mib(read), f'{read / bytes_b:.3f}',
                         f'{read / touched:.3f}' if name.startswith('(c)') else ''))
        print(common.table(COLUMNS, rows[-3:]), flush=True)
    return rows


COLUMNS = ('guest', 'N', 'contender', 'all booted s', 'time / (b)', 'warehouse bytes',
           'bytes / (b)', 'bytes / touched')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--counts', default='1,4,8,16')
    parser.add_argument('--realistic', type=int, default=4,
                        help='N for the realistic guest (0: skip it)')
    args = parser.parse_args()
    with common.scratch_state(CONF) as root:
        CONF.set_override('prefetch_threads', 0, 'mirror')
        # One node runs all N: let the scheduler put 16 single-vCPU guests on 2 cores.
        CONF.set_override('cpu_allocation_ratio', 16.0, 'scheduler')
        warehouse = warehouse_mod.Warehouse(CONF)  # registers [storage_file]
        # Each contender gets its own state_path; the warehouse stays where it is.
        CONF.set_override('path', warehouse.backend.root, 'storage_file')
        warehouse.import_image(guest.path('disk.img'), 'guest')
        # Probe once: each contender's fresh state_path would otherwise probe KVM again.
        driver_base.load(CONF, 'qemu')  # registers [qemu]
        CONF.set_override('accelerator', accel.choose(
            CONF, shutil.which(CONF.qemu.binary), guest.spec('probe', 'x')), 'compute')
        rows = run_counts(root, Workload('test guest', 'guest', guest.spec),
                          [int(c) for c in args.counts.split(',')])
        if args.realistic:
            warehouse.import_image(guest.realistic_disk(), 'realistic')
            rows += run_counts(root, Workload('realistic (systemd)', 'realistic',
                                              guest.realistic_spec), [args.realistic])
    result = common.table(COLUMNS, rows)
    facts = common.machine()
    facts['page cache dropped between runs'] = 'no (warehouse packs warm for all three)'
    facts.update({'node': 'one compute node (this machine), qemu driver',
                  'prefetch': 'off (no recorded profile): first deployments',
                  'chunk size': str(CONF.storage.chunk_size)})
    print(f'\n{result}')
    path = common.write_results('multideploy', 'Multi-deployment benchmark', [
        ('Time until every guest booted, and bytes read from the warehouse',
         '"time / (b)" and "bytes / (b)" compare with the overlays on a shared export. '
         '"bytes / touched" divides what the node fetched by the bytes of the distinct '
         'chunks its guests needed. Goals: (c) bytes independent of N and <= 1.1x '
         'touched; (c) time <= (b) and well under (a).\n\n' + result)], facts)
    print(f'\nwritten to {os.path.relpath(path, common.REPO)}')


if __name__ == '__main__':
    main()
