"""Warehouse throughput and space, as ratios against cp and qemu-img in the same run.

    .venv/bin/python benchmarks/warehouse.py [--size MIB] [--repeat N] [--quick]

Import and export are timed against `cp` and `qemu-img convert` of the same image
(speed ratio = baseline time / our time: above 1 means we are faster). Snapshot cost
is the stored bytes a snapshot adds, against the bytes it actually changed.
"""
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


def _changed_chunks(base: bytes, changed: bytearray, chunk_size: int) -> dict[int, bytes]:
    return {i: bytes(changed[o:o + chunk_size])
            for i, o in enumerate(range(0, len(base), chunk_size))
            if base[o:o + chunk_size] != changed[o:o + chunk_size]}


def snapshot_cost(work: str, size: int, rounds: int = 10) -> tuple[list, list]:
    raw = os.path.join(work, 'image.raw')
    with open(raw, 'rb') as f:
        image = f.read()
    rows = []
    for workload in ('chunk-aligned', 'scattered 4 KiB-1 MiB'):
        chunk_sizes = (256 * 1024,) if workload == 'chunk-aligned' else (
            64 * 1024, 256 * 1024, 1024 * 1024)
        for chunk_size in chunk_sizes:
            rng = random.Random(7)
            store = new_warehouse(os.path.join(work, 'snapstore'), chunk_size)
            parent = store.import_image(raw, 'image').manifest
            current = bytearray(image)
            changed_total = added_total = 0
            for _ in range(rounds):
                before = store.stats().stored_bytes
                previous = bytes(current)
                changed = _apply_changes(current, rng, workload, chunk_size)
                changes = _changed_chunks(previous, current, chunk_size)
                parent = store.snapshot_chunks(parent.ref, changes).manifest
                changed_total += changed
                added_total += store.stats().stored_bytes - before
            assert store.read(parent, 0, parent.size) == bytes(current)
            rows.append((workload, f'{chunk_size // 1024} KiB', rounds,
                         common.mib(changed_total), common.mib(added_total),
                         f'{added_total / changed_total:.3f}'))
    return rows, []


def _apply_changes(data: bytearray, rng: random.Random, workload: str, chunk_size: int) -> int:
    """Change 1% of ``data``; return the number of bytes actually changed."""
    target = len(data) // 100
    if workload == 'chunk-aligned':
        count = max(1, target // chunk_size)
        for index in rng.sample(range(len(data) // chunk_size), count):
            data[index * chunk_size:(index + 1) * chunk_size] = rng.randbytes(chunk_size)
        return count * chunk_size
    touched = bytearray(len(data) // 4096)
    changed = 0
    while changed < target:
        pages = rng.randint(1, 256)
        first = rng.randrange(len(touched) - pages)
        data[first * 4096:(first + pages) * 4096] = rng.randbytes(pages * 4096)
        for page in range(first, first + pages):
            if not touched[page]:
                touched[page] = 1
                changed += 4096
    return changed


def main() -> None:
    args = common.size_arguments(__doc__.splitlines()[0])
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
        snapshot_rows, _ = snapshot_cost(work, size)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    speed = common.table(('operation', 'contender', 'seconds', 'MiB/s',
                          'vmcloud speed / contender speed'), speed_rows)
    space = common.table(('what', 'bytes'), space_rows)
    snapshots = common.table(('workload', 'chunk size', 'snapshots', 'bytes changed',
                              'bytes stored', 'stored / changed'), snapshot_rows)
    print(common.table(('fact', 'value'), list(facts.items())))
    for title, body in (('Throughput', speed), ('Space, base image', space),
                        ('10 snapshots, each changing 1% of the image', snapshots)):
        print(f'\n{title}\n{body}')
    path = common.write_results('warehouse', 'Warehouse benchmark', [
        ('Throughput', 'Median of the runs; every contender ends with sync(), caches dropped '
                       'before each run. The last column is the contender\'s time divided by '
                       'ours: 0.70 means we run at 0.7x its speed. MiB/s counts the image\'s '
                       'virtual size.\n\n' + speed),
        ('Space, base image', space),
        ('10 snapshots, each changing 1% of the image',
         'Stored = growth of chunk packs, pack indexes and manifests. Changed = distinct '
         'bytes rewritten with new content.\n\n' + snapshots),
    ], facts)
    print(f'\nwritten to {os.path.relpath(path, common.REPO)}')


if __name__ == '__main__':
    main()
