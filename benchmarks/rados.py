"""Warehouse import and export over the rados backend, against `rados put/get` in the same run.

    tools/ceph/start.sh && .venv/bin/python benchmarks/rados.py [--size MIB] [--repeat N] [--quick]

The image is random data with no holes and no repeats, so the warehouse gets no help
from deduplication or holes: every byte crosses librados in both contenders. The
baseline is the `rados` CLI putting (getting) the whole image as ONE object: the
least per-object overhead the cluster offers, so the fairest (hardest) baseline for
a warehouse that stores one object per 256 KiB chunk plus an index. Speed ratio =
baseline time / warehouse time (above 1: the warehouse is faster). Each contender
writes into a fresh RADOS namespace, emptied after the run (not timed); rounds
rotate which contender goes first, and every time includes a final sync().
"""
import os
import statistics
import subprocess
import sys
import uuid

if __package__ in (None, ''):
    # Run as a script, this file's directory comes first on sys.path, and this file
    # would shadow librados' own `rados` module: put the repository there instead.
    _HERE = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or '.') != _HERE]
    sys.path.insert(0, os.path.dirname(_HERE))

from oslo_config import cfg  # noqa: E402

import vmcloud.conf  # noqa: E402,F401 - registers options
from benchmarks import common  # noqa: E402
from vmcloud.storage import warehouse as warehouse_mod  # noqa: E402
from vmcloud.storage.backends import rados as rados_backend  # noqa: E402

MIB = 1024 * 1024
CONF = cfg.CONF
CEPH_DIR = os.environ.get('VMCLOUD_CEPH_DIR', os.path.join(common.REPO, '.cache', 'ceph'))
CEPH_CONF = os.path.join(CEPH_DIR, 'ceph.conf')
POOL = 'vmcloud'


def configure(namespace: str) -> None:
    CONF.set_override('backend', 'rados', 'storage')
    CONF.set_override('conffile', CEPH_CONF, 'storage_rados')
    CONF.set_override('client_name', 'client.vmcloud', 'storage_rados')
    CONF.set_override('keyring', os.path.join(CEPH_DIR, 'client.vmcloud.keyring'),
                      'storage_rados')
    CONF.set_override('pool', POOL, 'storage_rados')
    CONF.set_override('namespace', namespace, 'storage_rados')


def rados_cli(namespace: str, *args: str) -> None:
    subprocess.run(['rados', '--conf', CEPH_CONF, '--name', 'client.vmcloud', '-p', POOL,
                    '-N', namespace, *args], check=True, capture_output=True, timeout=600)


def empty(namespace: str) -> None:
    configure(namespace)
    backend = rados_backend.RadosBackend(CONF)
    try:
        for obj in list(backend.ioctx.list_objects()):
            backend.ioctx.remove_object(obj.key)
    finally:
        backend.close()


def run_all(args, image: str, out: str,
            export_ns: dict[str, str]) -> tuple[dict[str, list], dict[str, list]]:
    """Time every import and export contender. :returns: (imports, exports), name -> times."""
    configure(export_ns['warehouse'])
    store = warehouse_mod.Warehouse(CONF)
    try:
        manifest = store.import_image(image, 'bench', 'raw').manifest
        rados_cli(export_ns['rados get'], 'put', 'image', image)

        def import_run(name: str) -> float:
            namespace = 'bench-import-' + uuid.uuid4().hex
            common.drop_caches()
            target = None
            if name == 'warehouse':
                configure(namespace)
                target = warehouse_mod.Warehouse(CONF)

                def work():
                    target.import_image(image, 'bench', 'raw')
            else:
                def work():
                    rados_cli(namespace, 'put', 'image', image)
            try:
                return common.timed(lambda: (work(), os.sync()))
            finally:
                if target is not None:
                    target.backend.close()
                empty(namespace)

        def export_run(name: str) -> float:
            common.drop_caches()
            if name == 'warehouse':
                def work():
                    store.export(manifest, out)
            else:
                def work():
                    rados_cli(export_ns['rados get'], 'get', 'image', out)
            try:
                return common.timed(lambda: (work(), os.sync()))
            finally:
                if os.path.exists(out):
                    os.unlink(out)

        imports = common.rotate(['warehouse', 'rados put'], args.repeat, import_run)
        exports = common.rotate(['warehouse', 'rados get'], args.repeat, export_run)
        return imports, exports
    finally:
        store.backend.close()


def main() -> None:
    args = common.size_arguments(__doc__.splitlines()[0])
    if not os.path.exists(os.path.join(CEPH_DIR, '.ready')):
        sys.exit(f'benchmarks/rados.py: no cluster in {CEPH_DIR}: run tools/ceph/start.sh')
    with common.scratch_state(CONF) as root:
        CONF.register_group(rados_backend.RadosBackend.OPTION_GROUP)
        CONF.register_opts(rados_backend.RadosBackend.OPTIONS,
                           group=rados_backend.RadosBackend.OPTION_GROUP)
        image = os.path.join(args.workdir, 'rados-bench.raw')
        with open(image, 'wb') as f:
            for _ in range(args.size):
                f.write(os.urandom(MIB))
        size = args.size * MIB
        out = os.path.join(root, 'out.raw')
        # Export reads what import stored: one namespace per contender, filled untimed.
        export_ns = {'warehouse': 'bench-export-' + uuid.uuid4().hex,
                     'rados get': 'bench-export-' + uuid.uuid4().hex}
        try:
            imports, exports = run_all(args, image, out, export_ns)
        finally:
            for namespace in export_ns.values():
                empty(namespace)
            os.unlink(image)

    rows = []
    for what, results, baseline in (('import', imports, 'rados put'),
                                    ('export', exports, 'rados get')):
        ours = statistics.median(results['warehouse'])
        theirs = statistics.median(results[baseline])
        rows.append((what, f'{size / ours / MIB:.0f} MiB/s', baseline,
                     f'{size / theirs / MIB:.0f} MiB/s', f'{theirs / ours:.2f}x'))
    body = common.table(('operation', 'warehouse (rados backend)', 'baseline',
                         'baseline speed', 'speed ratio'), rows)
    body += (f'\n\n{args.size} MiB of random data (no holes, no repeats), median of '
             f'{args.repeat} runs in rotating order. Baseline: the `rados` CLI with the '
             'whole image as one object. The warehouse stores 256 KiB chunks as objects, '
             'writes 32 at a time (aio) and indexes them in omap at commit; its export '
             'asks for one chunk at a time (the index lookup runs beside the read).')
    print(body)
    facts = common.machine()
    facts['ceph'] = subprocess.run(['ceph', '--version'], capture_output=True,
                                   text=True).stdout.strip()
    facts['cluster'] = '1 mon, 1 bluestore OSD on a sparse file (tools/ceph/start.sh), size 1'
    path = common.write_results('rados', 'The rados backend against the rados CLI',
                                [('Import and export throughput', body)], facts)
    print(f'written to {path}')


if __name__ == '__main__':
    main()
