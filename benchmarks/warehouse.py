"""Warehouse throughput and space, as ratios against cp and qemu-img in the same run.

    .venv/bin/python benchmarks/warehouse.py [--size MIB] [--repeat N] [--quick]

Import and export are timed against `cp` and `qemu-img convert` of the same image
(speed ratio = baseline time / our time: above 1 means we are faster). Snapshot cost
is the stored bytes a snapshot adds, against the bytes it actually changed, stored as
whole chunks and as deltas side by side; and the read speed of the 10th snapshot of
deltas against the base image's.
"""
import hashlib
import os
import random
import shutil
import sys
import tempfile

if __package__ in (None, ''):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from oslo_config import cfg  # noqa: E402

import vmcloud.conf  # noqa: E402,F401 - registers options
from benchmarks import common  # noqa: E402
from benchmarks import multisnapshot  # noqa: E402
from tests import guest  # noqa: E402
from vmcloud import allinone  # noqa: E402
from vmcloud.drivers import base as driver_base  # noqa: E402
from vmcloud.mirror import dirtymap  # noqa: E402
from vmcloud.storage import delta as delta_mod  # noqa: E402
from vmcloud.storage import warehouse as warehouse_mod  # noqa: E402

MIB = 1024 * 1024
CONF = cfg.CONF


def build_image(path: str, size_mib: int, seed: int = 1) -> dict[str, int]:
    """A raw disk of 1 MiB extents: 55% unique data, 10% repeats, 15% written zeros, 20% holes."""
    rng = random.Random(seed)
    kinds = rng.choices(('data', 'repeat', 'zero', 'hole'), (55, 10, 15, 20), k=size_mib)
    written: list[bytes] = []
    counts = dict.fromkeys(('data', 'repeat', 'zero', 'hole'), 0)
    with open(path, 'wb') as f:
        for kind in kinds:
            if kind == 'repeat' and not written:
                kind = 'data'
            counts[kind] += 1
            if kind == 'data':
                block = rng.randbytes(MIB)
                written.append(block)
                f.write(block)
            elif kind == 'repeat':
                f.write(rng.choice(written))
            elif kind == 'zero':
                f.write(bytes(MIB))
            else:
                f.seek(MIB, os.SEEK_CUR)
        f.truncate(size_mib * MIB)
    return counts


def new_warehouse(root: str, chunk_size: int | None = None) -> warehouse_mod.Warehouse:
    shutil.rmtree(root, ignore_errors=True)
    CONF.set_override('state_path', root)
    CONF.set_override('chunk_size', chunk_size or 256 * 1024, 'storage')
    return warehouse_mod.Warehouse(CONF)


def throughput(work: str, size: int, repeat: int) -> tuple[list, list]:
    raw = os.path.join(work, 'image.raw')
    qcow2 = os.path.join(work, 'image.qcow2')
    common.run('qemu-img', 'convert', '-f', 'raw', '-O', 'qcow2', raw, qcow2)
    out = os.path.join(work, 'out')
    store_root = os.path.join(work, 'store')

    def clean():
        for leftover in (out, out + '.qcow2'):
            if os.path.exists(leftover):
                os.unlink(leftover)
        shutil.rmtree(store_root, ignore_errors=True)
        os.sync()

    def ours_import(path):
        return lambda: new_warehouse(store_root).import_image(path, 'image')

    rows = []
    cases = [
        ('import raw', {
            'vmcloud import': ours_import(raw),
            'qemu-img convert -O raw': lambda: common.run(
                'qemu-img', 'convert', '-f', 'raw', '-O', 'raw', raw, out),
            'cp --sparse=always': lambda: common.run('cp', '--sparse=always', raw, out)}),
        ('import qcow2', {
            'vmcloud import': ours_import(qcow2),
            'qemu-img convert -O raw': lambda: common.run(
                'qemu-img', 'convert', '-f', 'qcow2', '-O', 'raw', qcow2, out)}),
    ]
    for label, contenders in cases:
        times = common.measure(contenders, repeat, prepare=clean)
        rows += _ratio_rows(label, times, 'vmcloud import', size)

    store = new_warehouse(store_root)
    manifest = store.import_image(raw, 'image').manifest
    exports = [
        ('export raw', {
            'vmcloud export': lambda: store.export(manifest, out, 'raw'),
            'cp --sparse=always': lambda: common.run('cp', '--sparse=always', raw, out),
            'qemu-img convert -O raw': lambda: common.run(
                'qemu-img', 'convert', '-f', 'raw', '-O', 'raw', raw, out)}),
        ('export qcow2', {
            'vmcloud export': lambda: store.export(manifest, out, 'qcow2'),
            'qemu-img convert -O qcow2': lambda: common.run(
                'qemu-img', 'convert', '-f', 'raw', '-O', 'qcow2', raw, out)}),
    ]

    def remove_out():
        if os.path.exists(out):
            os.unlink(out)
    for label, contenders in exports:
        times = common.measure(contenders, repeat, prepare=remove_out)
        rows += _ratio_rows(label, times, 'vmcloud export', size)
    stats = store.stats()
    space = [('image size', common.mib(size)),
             ('allocated in the raw file', common.mib(os.stat(raw).st_blocks * 512)),
             ('qcow2 file', common.mib(os.path.getsize(qcow2))),
             ('stored in the warehouse', common.mib(stats.stored_bytes)),
             ('stored / image size', f'{stats.stored_bytes / size:.3f}')]
    return rows, space


def _ratio_rows(label: str, times: dict[str, float], ours: str, size: int) -> list:
    """Rows of a table where every contender's speed is shown as a multiple of ours."""
    return [(label, name, f'{seconds:.3f}', f'{size / seconds / MIB:.0f}',
             f'{times[name] / times[ours]:.2f}') for name, seconds in times.items()]


BLOCK = 4096
WORKLOADS = ('(a) 1% scattered 4 KiB writes', '(b) 1% in 4 KiB-1 MiB writes',
             '(c) 1% sequential writes')
# Each contender turns the pages a snapshot wrote into the changes snapshot_chunks takes.
CONTENDERS = ('whole chunks (before deltas)', 'deltas of 4 KiB blocks')


def _whole_chunks(data: bytearray, pages: set[int], chunk_size: int) -> dict:
    per_chunk = chunk_size // BLOCK
    return {index: bytes(data[index * chunk_size:(index + 1) * chunk_size])
            for index in {page // per_chunk for page in pages}}


def _block_changes(data: bytearray, pages: set[int], chunk_size: int) -> dict:
    per_chunk = chunk_size // BLOCK
    changes: dict[int, dict[int, bytes]] = {}
    for page in pages:
        changes.setdefault(page // per_chunk, {})[page % per_chunk] = bytes(
            data[page * BLOCK:(page + 1) * BLOCK])
    return {index: delta_mod.BlockChanges(BLOCK, blocks) for index, blocks in changes.items()}


def _write_pages(data: bytearray, rng: random.Random, workload: str) -> set[int]:
    """Write 1% of ``data`` with new random bytes as ``workload`` does; the 4 KiB pages
    written (a page written twice counts once)."""
    target = len(data) // 100 // BLOCK
    total = len(data) // BLOCK
    pages: set[int] = set()
    while len(pages) < target:
        if workload == WORKLOADS[0]:
            count = 1
        elif workload == WORKLOADS[1]:
            count = rng.randint(1, 256)
        else:
            count = target - len(pages)  # one run
        first = rng.randrange(total - count)
        data[first * BLOCK:(first + count) * BLOCK] = rng.randbytes(count * BLOCK)
        pages.update(range(first, first + count))
    return pages


def _read_seconds(store: warehouse_mod.Warehouse, versions: dict, repeat: int) -> dict:
    """{name: median seconds of reading the whole version ``versions[name]``}, 4 MiB at a
    time, the versions read in rotating order after one warm-up read of each."""
    def read_all(name: str) -> float:
        manifest = versions[name]

        def work():
            for offset in range(0, manifest.size, 4 * MIB):
                store.read(manifest, offset, min(4 * MIB, manifest.size - offset))
        return common.timed(work)
    for name in versions:
        read_all(name)
    times = common.rotate(list(versions), max(repeat, 3), read_all)
    return {name: sorted(values)[len(values) // 2] for name, values in times.items()}


def _stored_bytes_read(store: warehouse_mod.Warehouse, *manifests) -> list[int]:
    """The stored bytes a whole read of each manifest takes: each object of each chunk."""
    sizes = dict(store.backend.iter_chunks())
    return [sum(sizes[object_id] for index in range(manifest.chunk_count)
                for object_id in manifest.object_ids(index)) for manifest in manifests]


def snapshot_cost(work: str, size: int, repeat: int, rounds: int = 10) -> tuple[list, list]:
    """10 snapshots of each workload at 64 and 256 KiB chunks, stored as whole chunks
    and as deltas side by side; the 10th snapshot's read speed against the base
    image's, in each store."""
    raw = os.path.join(work, 'image.raw')
    with open(raw, 'rb') as f:
        image = f.read()
    rows, reads = [], []
    for workload in WORKLOADS:
        for chunk_size in (64 * 1024, 256 * 1024):
            speed = {}  # contender -> 10th / base
            for contender in CONTENDERS:
                rng = random.Random(7)  # the same writes for both contenders
                store = new_warehouse(os.path.join(work, 'snapstore'), chunk_size)
                base = parent = store.import_image(raw, 'image').manifest
                current = bytearray(image)
                changed_total = added_total = 0
                for _ in range(rounds):
                    before = store.stats().stored_bytes
                    pages = _write_pages(current, rng, workload)
                    make = _whole_chunks if contender == CONTENDERS[0] else _block_changes
                    parent = store.snapshot_chunks(
                        parent.ref, make(current, pages, chunk_size)).manifest
                    changed_total += len(pages) * BLOCK
                    added_total += store.stats().stored_bytes - before
                assert store.read(parent, 0, parent.size) == bytes(current)
                rows.append((workload, f'{chunk_size // 1024} KiB', contender,
                             common.mib(changed_total), common.mib(added_total),
                             f'{added_total / changed_total:.3f}'))
                times = _read_seconds(store, {'base': base, 'last': parent}, repeat)
                speed[contender] = times['base'] / times['last']
            # The store of deltas, the last one made.
            chains = [len(e) - 1 for e in parent.chunks if isinstance(e, tuple)]
            base_bytes, last_bytes = _stored_bytes_read(store, base, parent)
            reads.append((
                workload, f'{chunk_size // 1024} KiB', len(chains), max(chains, default=0),
                f'{base_bytes / last_bytes:.2f}',
                f'{size / times["base"] / MIB:.0f}', f'{size / times["last"] / MIB:.0f}',
                f'{speed[CONTENDERS[0]]:.2f}', f'{speed[CONTENDERS[1]]:.2f}',
                f'{speed[CONTENDERS[1]] / speed[CONTENDERS[0]]:.2f}'))
    return rows, reads


def _unique_dirty_blocks(node, names: list[str]) -> int:
    """Bytes of the distinct non-zero blocks (the mirrors' dirty blocks, 4 KiB) the
    guests wrote: the least a repository of these blocks could store."""
    seen: dict[str, int] = {}
    for name in names:
        disk = node.mirrors.get(name).disk
        block = disk.dirty.block_size
        for index in disk.dirty.indexes():
            for first, end in dirtymap.runs(disk.dirty.mask(index)):
                start = index * disk.manifest.chunk_size + first * block
                length = min(end * block, disk.manifest.chunk_length(index)) - first * block
                data = disk.read(start, length)
                for offset in range(0, length, block):
                    piece = data[offset:offset + block]
                    if piece.count(0) != len(piece):
                        seen[hashlib.sha256(piece).hexdigest()] = len(piece)
    return sum(seen.values())


def _scatter_disk(work: str) -> str:
    """A data disk like the test guest's that also carries /scatter.bin, 8 MiB of
    allocated zeros (holes in the warehouse), where vmcloud.small_writes writes."""
    files = os.path.join(work, 'disk-files')
    os.makedirs(files)
    with open(os.path.join(files, 'data.txt'), 'w') as f:
        f.writelines(f'{n}\n' for n in range(1, 20001))
    with open(os.path.join(files, 'scatter.bin'), 'wb') as f:
        f.write(bytes(8 * MIB))
    path = os.path.join(work, 'scatter-disk.img')
    with open(path, 'wb') as f:
        f.truncate(64 * MIB)
    common.run('/sbin/mkfs.ext4', '-q', '-F', '-L', 'vmcloud-scatter', '-d', files, path)
    return path


def guest_snapshots(count: int, small_writes: int) -> list:
    """``count`` test guests on one node each write ``small_writes`` scattered 4 KiB
    blocks, then one multi-snapshot of them all; beside it, the same guests paused and
    exported to qcow2."""
    CONF.clear_override('chunk_size', 'storage')
    with common.scratch_state(CONF) as root, common.nested_state(CONF, root) as work:
        with allinone.AllInOne(CONF, hosts=1, driver='qemu') as cloud:
            node = cloud.computes[0]
            cloud.warehouse.import_image(_scatter_disk(work), 'guest')
            boot = {'kernel': guest.path('vmlinuz'), 'initrd': guest.path('initrd.img'),
                    'cmdline': f'{guest.CMDLINE} vmcloud.id={{name}} '
                               f'vmcloud.small_writes={small_writes}'}
            deployment = cloud.api.deploy('guest', count, boot=boot)
            deployment = cloud.api.wait_deployment(deployment['id'], multisnapshot.TIMEOUT)
            names = [i['name'] for i in deployment['instances']]
            for name in names:
                node.driver.wait_for_event(name, driver_base.APP_RUNNING, multisnapshot.TIMEOUT)
            unique = _unique_dirty_blocks(node, names)
            stored_before = cloud.warehouse.stats().stored_bytes
            snapshot = cloud.api.snapshot(deployment['id'])
            snapshot = cloud.api.wait_snapshot(snapshot['id'], multisnapshot.TIMEOUT)
            if snapshot['state'] != 'available':
                raise RuntimeError(f'snapshot failed: {snapshot}')
            stored = cloud.warehouse.stats().stored_bytes - stored_before
            dirty = sum(item['dirty_bytes'] for item in snapshot['items'])
            pause = max(item['pause_ms'] for item in snapshot['items'])
            export_pause, exported = multisnapshot.qcow2_exports(node, names, work)
    return [(count, small_writes, 'vmcloud multi-snapshot', common.mib(unique),
             common.mib(dirty), common.mib(stored), f'{stored / unique:.3f}', f'{pause:.0f}'),
            (count, small_writes, 'qemu-img convert -O qcow2 of each', common.mib(unique), '',
             common.mib(exported), f'{exported / unique:.3f}', f'{export_pause:.0f}')]


def main() -> None:
    def more(parser):
        parser.add_argument('--guests', type=int, default=8,
                            help='test guests of the multi-snapshot (0: none)')
        parser.add_argument('--small-writes', type=int, default=256,
                            help='scattered 4 KiB writes of each guest')
    args = common.size_arguments(__doc__.splitlines()[0], more)
    CONF([], project='vmcloud', default_config_files=[])
    work = tempfile.mkdtemp(dir=args.workdir)
    try:
        size = args.size * MIB
        mix = build_image(os.path.join(work, 'image.raw'), args.size)
        facts = common.machine()
        facts.update({'image': f'{args.size} MiB raw; 1 MiB extents: '
                               + ', '.join(f'{n} {k}' for k, n in mix.items()),
                      'chunk size': '256 KiB', 'runs per contender': str(args.repeat)})
        speed_rows, space_rows = throughput(work, size, args.repeat)
        snapshot_rows, read_rows = snapshot_cost(work, size, args.repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    guest_rows = guest_snapshots(args.guests, args.small_writes) if args.guests else []

    speed = common.table(('operation', 'contender', 'seconds', 'MiB/s',
                          'vmcloud speed / contender speed'), speed_rows)
    space = common.table(('what', 'bytes'), space_rows)
    snapshots = common.table(('workload', 'chunk size', 'stored as', 'bytes changed',
                              'bytes stored', 'stored / changed'), snapshot_rows)
    reads = common.table(('workload', 'chunk size', 'chunks as deltas', 'longest chain',
                          'stored bytes read: base / 10th', 'base MiB/s', '10th MiB/s',
                          '10th / base, whole chunks', '10th / base, deltas',
                          'deltas / whole chunks'), read_rows)
    guests = common.table(('guests', '4 KiB writes each', 'contender', 'unique dirty 4 KiB',
                           'dirty (mirrors)', 'bytes stored', 'stored / unique dirty',
                           'longest pause ms'), guest_rows)
    print(common.table(('fact', 'value'), list(facts.items())))
    for title, body in (('Throughput', speed), ('Space, base image', space),
                        ('10 snapshots, each changing 1% of the image', snapshots),
                        ('Reading the 10th snapshot', reads),
                        ('Multi-snapshot of guests writing small blocks', guests)):
        print(f'\n{title}\n{body}')
    path = common.write_results('warehouse', 'Warehouse benchmark', [
        ('Throughput', 'Median of the runs; every contender ends with sync(), caches dropped '
                       'before each run. The last column is the contender\'s time divided by '
                       'ours: 0.70 means we run at 0.7x its speed. MiB/s counts the image\'s '
                       'virtual size.\n\n' + speed),
        ('Space, base image', space),
        ('10 snapshots, each changing 1% of the image',
         'Each workload\'s 10 snapshots, one on top of the other, write new random bytes '
         'to 1% of the image: (a) in single 4 KiB pages at random, (b) in runs of 4 KiB to '
         '1 MiB at random, (c) in one run. The same writes are stored twice side by side: '
         'as the whole chunks they touched (what a snapshot stored before deltas) and as '
         'the 4 KiB blocks they wrote (`delta.BlockChanges`, stored as deltas over the '
         'parent\'s chunk, or compacted into a plain chunk past `[storage] '
         f'delta_max_ratio` ({CONF.storage.delta_max_ratio}) or `delta_max_depth` '
         f'({CONF.storage.delta_max_depth})). Stored = growth of chunk '
         'packs, pack indexes and manifests. Changed = distinct 4 KiB pages written, in '
         'bytes. Goal: stored / changed <= 1.2 with deltas.\n\n' + snapshots),
        ('Reading the 10th snapshot',
         'The whole version read through `Warehouse.read`, 4 MiB at a time, with a warm '
         'page cache: the 10th snapshot and the base image of the same store, each read '
         'once first, then in turns (at least 3 each), the median of each; in the store of '
         'whole chunks and in the store of deltas (MiB/s: the store of deltas). Stored '
         'bytes read: every object a read of the version takes (each one is read and '
         'checked against its sha256), the base\'s over the 10th snapshot\'s: what the '
         'speed ratio would be if a read cost only its bytes. Goal: 10th / base >= 0.9 '
         'with deltas.\n\n' + reads),
        ('Multi-snapshot of guests writing small blocks',
         f'{args.guests} test guests (qemu, one node, all in one process, the default chunk '
         f'size; their data disk the test guest\'s with an 8 MiB file of zeros added) each '
         f'write {args.small_writes} blocks of 4 KiB of random data at random places of that '
         'file (`vmcloud.small_writes`), then one snapshot of them all. '
         '"unique dirty 4 KiB": the distinct non-zero 4 KiB blocks their mirrors hold as '
         'written, read just before the snapshot (the file system\'s own writes '
         'included); "dirty (mirrors)": the snapshot items\' dirty_bytes summed; stored: '
         'the growth of the warehouse. Beside it, the same guests paused and each disk '
         'exported with `qemu-img convert -O qcow2` from its mirror, what a snapshot by '
         'export stores. Goal: stored / unique dirty <= 1.2.\n\n'
         + (guests if guest_rows else 'Not run (--guests 0).')),
    ], facts)
    print(f'\nwritten to {os.path.relpath(path, common.REPO)}')


if __name__ == '__main__':
    main()
