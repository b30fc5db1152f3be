"""Mirror benchmark: cached and cold reads over NBD, bytes fetched to boot, profile replay.

    .venv/bin/python benchmarks/mirror.py [--size-mib 512] [--repeat 3] [--no-boot]

1. Cached reads: nbdcopy of a mirror whose chunks are all on the node, against
   qemu-nbd serving the same bytes as a raw file (page cache warm for both).
2. Cold reads: nbdcopy of a mirror with an empty node cache, against reading
   the same chunks straight from the warehouse in this process.
3. Booting the realistic guest (systemd) from a mirror: bytes fetched from the
   warehouse against the image's size.
4. A second boot on a node with an empty cache, with the recorded profile
   prefetched against without: the share of boot-phase reads already local.
"""
import argparse
import os
import random
import shutil
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
from vmcloud.compute import phases  # noqa: E402
from vmcloud.drivers import base as driver_base  # noqa: E402
from vmcloud.mirror import manager as manager_mod  # noqa: E402
from vmcloud.storage import warehouse as warehouse_mod  # noqa: E402

CONF = cfg.CONF
MIB = 1024 * 1024


def rotate(contenders: dict, repeat: int, prepare=None) -> dict[str, list[float]]:
    def run(name: str) -> float:
        if prepare is not None:
            prepare(name)
        return common.timed(contenders[name])
    return common.rotate(list(contenders), repeat, run)


def nbdcopy(uri: str) -> None:
    common.run('nbdcopy', uri, 'null:')


def fresh_manager(root: str, label: str) -> manager_mod.MirrorManager:
    """A node with an empty chunk cache and no mirrors (the warehouse stays)."""
    for option, leaf in (('cache_path', 'cache'), ('mirrors_path', 'mirrors'),
                         ('nbd_socket', 'nbd.sock')):
        CONF.set_override(option, os.path.join(root, label, leaf), 'mirror')
    shutil.rmtree(os.path.join(root, label), ignore_errors=True)
    return manager_mod.MirrorManager(CONF)


def read_benchmarks(root: str, size: int, repeat: int) -> tuple[str, str]:
    rng = random.Random(1)
    path = os.path.join(root, 'image.raw')
    with open(path, 'wb') as f:
        for _ in range(size // MIB):
            f.write(rng.randbytes(MIB) if rng.random() < 0.8 else bytes(MIB))
    warehouse = warehouse_mod.Warehouse(CONF)
    manifest = warehouse.import_image(path, 'bench').manifest

    manager = fresh_manager(root, 'warm')
    mirror = manager.create('warm', 'bench')
    nbdcopy(mirror.uri)  # every chunk on the node now
    qemu_socket = os.path.join(root, 'qemu-nbd.sock')
    qemu_nbd = subprocess.Popen(['qemu-nbd', '--persistent', '--shared=8', '-f', 'raw',
                                 '--cache=writeback', '--read-only', '-k', qemu_socket, path])
    try:
        while not os.path.exists(qemu_socket):
            time.sleep(0.05)
        cached = rotate({
            'qemu-nbd, raw file': lambda: nbdcopy(f'nbd+unix:///?socket={qemu_socket}'),
            'vmcloud mirror, cached': lambda: nbdcopy(mirror.uri),
        }, repeat)
    finally:
        qemu_nbd.terminate()
        qemu_nbd.wait()
        manager.close()

    state = {}

    def prepare(name):
        if 'manager' in state:
            state.pop('manager').close()
        if name.startswith('vmcloud'):
            state['manager'] = fresh_manager(root, 'cold')
            state['uri'] = state['manager'].create('cold', 'bench').uri

    def straight():
        with warehouse.open(manifest) as reader:
            while reader.read(4 * MIB):
                pass

    cold = rotate({
        'warehouse read, in process': straight,
        'vmcloud mirror, empty cache': lambda: nbdcopy(state['uri']),
    }, repeat, prepare)
    state.pop('manager').close()

    def rows(times, baseline):
        base = statistics.median(times[baseline])
        return [(name, f'{statistics.median(t):.2f}', ' '.join(f'{x:.2f}' for x in t),
                 f'{size / MIB / statistics.median(t):.0f}',
                 f'{base / statistics.median(t):.3f}') for name, t in times.items()]

    columns = ('contender', 'median s', 'runs s', 'MiB/s', 'speed / baseline')
    return (common.table(columns, rows(cached, 'qemu-nbd, raw file')),
            common.table(columns, rows(cold, 'warehouse read, in process')))


def boot_once(root: str, label: str, timeout: float = 300) -> dict:
    """Boot the realistic guest from a fresh node; stats taken at boot-done."""
    manager = fresh_manager(root, label)
    driver = driver_base.load(CONF, 'qemu')
    name = f'{label}-{os.getpid()}'
    try:
        mirror = manager.create(name, 'realistic')
        prefetching = mirror.prefetcher is not None
        started = time.perf_counter()
        driver.boot(guest.realistic_spec(name, mirror.uri, disk_format='raw'), timeout)
        booted = time.perf_counter() - started
        stats = manager.cache.stats
        result = {'boot s': booted, 'hits': stats.hits, 'misses': stats.misses,
                  'fetched': stats.fetched_bytes, 'prefetch': prefetching}
        phases.follow(driver, manager, name)
        driver.wait_for_event(name, driver_base.APP_RUNNING, timeout)
        driver.stop(name, timeout=60)
        result['fetched total'] = manager.cache.stats.fetched_bytes
        driver.destroy(name)
        manager.remove(name)  # saves the profile if this was the first deployment
        return result
    finally:
        manager.close()


def boot_benchmarks(root: str) -> tuple[str, str]:
    warehouse = warehouse_mod.Warehouse(CONF)
    disk = guest.realistic_disk()
    manifest = warehouse.import_image(disk, 'realistic').manifest
    allocated = os.stat(disk).st_blocks * 512
    CONF.set_override('prefetch_threads', 0, 'mirror')
    first = boot_once(root, 'first')  # records the profile
    without = boot_once(root, 'without')
    CONF.set_override('prefetch_threads', 2, 'mirror')
    with_profile = boot_once(root, 'with')
    fetched = common.table(('what', 'bytes', 'share of image size', 'share of allocated'), [
        ('image (virtual size)', manifest.size, '1.000', ''),
        ('image (allocated in the file)', allocated, f'{allocated / manifest.size:.3f}', '1.000'),
        ('fetched until boot-done', first['fetched'],
         f"{first['fetched'] / manifest.size:.4f}", f"{first['fetched'] / allocated:.3f}"),
        ('fetched until powered off', first['fetched total'],
         f"{first['fetched total'] / manifest.size:.4f}",
         f"{first['fetched total'] / allocated:.3f}"),
    ])

    def local_share(r):
        return r['hits'] / max(1, r['hits'] + r['misses'])

    replay = common.table(
        ('second boot, empty node cache', 'boot s', 'reads local', 'reads fetched',
         'share local', 'boot time / without'), [
            (label, f"{r['boot s']:.2f}", r['hits'], r['misses'], f'{local_share(r):.3f}',
             f"{r['boot s'] / without['boot s']:.3f}")
            for label, r in (('without profile', without), ('profile prefetched', with_profile))])
    return fetched, replay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--size-mib', type=int, default=512)
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument('--no-boot', action='store_true')
    args = parser.parse_args()
    with common.scratch_state(CONF) as root:
        sections = []
        cached, cold = read_benchmarks(root, args.size_mib * MIB, args.repeat)
        sections += [
            ('Cached reads', 'nbdcopy to null: of a mirror whose chunks are all in the node '
             'cache, and of qemu-nbd serving the same bytes as a raw file, page cache warm for '
             'both. Goal: >= 0.8x qemu-nbd.\n\n' + cached),
            ('Cold reads', 'nbdcopy to null: of a mirror with an empty node cache (every '
             'chunk fetched from the warehouse, hashed, stored in the cache and served), and '
             'reading the same version straight from the warehouse in this process '
             '(hash-checked, not stored). Warehouse packs in the page cache for both.\n\n'
             + cold)]
        if not args.no_boot:
            fetched, replay = boot_benchmarks(root)
            sections += [
                ('Bytes fetched to boot the realistic guest',
                 'Debian 12 minbase with systemd, from an empty node cache, qemu driver under '
                 'the probed accelerator.\n\n' + fetched),
                ('Second boot with the recorded profile',
                 'The first boot recorded the first-touch profile. Each second boot starts '
                 'from an empty node cache; "reads local" counts the chunk reads until '
                 'boot-done that found the chunk on the node. Goal: >= 95% local with the '
                 'profile.\n\n' + replay)]
    facts = common.machine()
    facts['page cache dropped between runs'] = 'no: warm on purpose (see each section)'
    facts.update({'image': f'{args.size_mib} MiB, 80% random MiB blocks, 20% holes',
                  'chunk size': str(CONF.storage.chunk_size), 'runs per contender':
                  str(args.repeat)})
    print(common.table(('fact', 'value'), list(facts.items())))
    for heading, body in sections:
        print(f'\n{heading}\n{body}')
    path = common.write_results('mirror', 'Mirror benchmark', sections, facts)
    print(f'\nwritten to {os.path.relpath(path, common.REPO)}')


if __name__ == '__main__':
    main()
