"""``vmcloud image ...``: the warehouse from the command line."""
import argparse
import dataclasses
import sys

from oslo_config import cfg

from vmcloud import exception
from vmcloud.cmd import output
from vmcloud.storage import inspect as inspect_mod
from vmcloud.storage import warehouse as warehouse_mod
from vmcloud.storage.manifest import Manifest
from vmcloud.storage.manifest import ManifestSummary
from vmcloud.storage.manifest import VersionRef


def _version_row(manifest: Manifest | ManifestSummary) -> dict:
    summary = manifest.summary() if isinstance(manifest, Manifest) else manifest
    return {
        'image': summary.image,
        'version': summary.version,
        'parent': str(summary.parent) if summary.parent else '',
        'size': summary.size,
        'chunk_size': summary.chunk_size,
        'data_chunks': summary.data_chunks,
        'holes': summary.chunk_count - summary.data_chunks,
        'created_at': summary.created_at,
    }


def _progress(args: argparse.Namespace, label: str, unit: str = 'bytes') -> output.ProgressBar:
    return output.ProgressBar(label, unit=unit, enabled=args.progress)


def _run_with_progress(args, label, work, unit='bytes'):
    bar = _progress(args, label, unit)
    try:
        return work(bar)
    finally:
        bar.close()


def do_import(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    warehouse = warehouse_mod.Warehouse(conf)
    result = _run_with_progress(
        args, f'importing {args.name}',
        lambda bar: warehouse.import_image(args.file, args.name, args.format, bar))
    output.emit_record(dict(_version_row(result.manifest), stored_bytes=result.new_bytes),
                       args.fmt)
    return 0


def do_snapshot(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    warehouse = warehouse_mod.Warehouse(conf)
    parent = warehouse.lookup(args.parent).ref
    result = _run_with_progress(
        args, f'snapshotting {parent}',
        lambda bar: warehouse.snapshot_file(parent, args.file, args.format, args.into, bar))
    output.emit_record(dict(_version_row(result.manifest), stored_bytes=result.new_bytes),
                       args.fmt)
    return 0


def do_list(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    warehouse = warehouse_mod.Warehouse(conf)
    listing = warehouse.listing()
    rows = [_version_row(s) for s in listing.versions]
    output.emit(rows, ('image', 'version', 'parent', 'size', 'data_chunks', 'created_at'),
                args.fmt)
    # Damage stays local: the readable versions are listed, each unreadable one named.
    for ref, problem in sorted(listing.damaged.items()):
        print(f"vmcloud: warning: {ref} is not listed: {problem}; 'vmcloud image rm {ref}' "
              'removes it', file=sys.stderr)
    return 0


def do_show(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    warehouse = warehouse_mod.Warehouse(conf)
    manifest = warehouse.lookup(args.image)
    record = _version_row(manifest)
    if manifest.parent is not None:
        try:
            parent = warehouse.manifest(manifest.parent.image, manifest.parent.version)
        except exception.StorageError as exc:
            # A parent deleted or damaged since does not hide the version itself.
            record['chunks_shared_with_parent'] = f'unknown: {exc}'
        else:
            shared = parent.data_chunk_ids()
            record['chunks_shared_with_parent'] = sum(1 for c in manifest.chunks if c in shared)
    record['source'] = manifest.source
    record['holders'] = warehouse.holders(manifest.ref.image, manifest.ref.version)
    output.emit_record(record, args.fmt)
    return 0


def do_export(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    warehouse = warehouse_mod.Warehouse(conf)
    manifest = warehouse.lookup(args.image)
    if args.dest == '-':
        if args.format != 'raw':
            raise exception.StorageError('only raw can be streamed to standard output')
        try:
            with warehouse.open(manifest) as reader:
                while block := reader.read(4 * 1024 * 1024):
                    sys.stdout.buffer.write(block)
            sys.stdout.buffer.flush()
        except BrokenPipeError as exc:
            raise exception.StorageError(
                f'export of {manifest.ref} to standard output stopped: '
                'the reading end of the pipe was closed') from exc
        return 0
    _run_with_progress(args, f'exporting {manifest.ref}',
                       lambda bar: warehouse.export(manifest, args.dest, args.format, bar))
    output.emit_record({'image': str(manifest.ref), 'file': args.dest, 'format': args.format},
                       args.fmt)
    return 0


def do_verify(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    warehouse = warehouse_mod.Warehouse(conf)
    report = _run_with_progress(args, 'verifying', warehouse.verify, unit='chunks')
    output.emit_record({'ok': report.ok, 'versions': report.versions, 'chunks': report.chunks,
                        'bytes': report.bytes, 'problems': len(report.problems),
                        'damaged_versions': ' '.join(report.damaged_versions)}, args.fmt)
    for problem in report.problems:
        print(f'vmcloud: problem: {problem}', file=sys.stderr)
    return 0 if report.ok else 1


def do_rm(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    warehouse = warehouse_mod.Warehouse(conf)
    deleted = warehouse.delete(*VersionRef.parse(args.image), force=args.force)
    output.emit([{'deleted': str(ref)} for ref in deleted], ('deleted',), args.fmt)
    return 0


def do_release(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    warehouse_mod.Warehouse(conf).release(args.image, args.holder)
    output.emit_record({'image': args.image, 'released': args.holder}, args.fmt)
    return 0


def do_gc(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    report = warehouse_mod.Warehouse(conf).gc(args.timeout)
    output.emit_record(dataclasses.asdict(report), args.fmt)
    return 0


def do_stats(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    stats = warehouse_mod.Warehouse(conf).stats()
    record = dataclasses.asdict(stats)
    record['stored_bytes'] = stats.stored_bytes
    if stats.referenced_bytes:
        record['stored_vs_referenced'] = round(stats.stored_bytes / stats.referenced_bytes, 4)
    output.emit_record(record, args.fmt)
    return 0


def add_parser(groups: argparse._SubParsersAction) -> None:
    parser = groups.add_parser('image', help='manage images in the warehouse')
    commands = parser.add_subparsers(dest='command', required=True, metavar='ACTION')
    formats = argparse.ArgumentParser(add_help=False)
    formats.add_argument('-f', dest='fmt', choices=('table', 'json'), default='table',
                         help='output format')
    formats.add_argument('--progress', action=argparse.BooleanOptionalAction, default=None,
                         help='show a progress bar (default: when stderr is a terminal)')

    def command(name, handler, help_text):
        sub = commands.add_parser(name, help=help_text, parents=[formats])
        sub.set_defaults(handler=handler)
        return sub

    sub = command('import', do_import, 'import a raw or qcow2 file as a new image')
    sub.add_argument('file')
    sub.add_argument('name')
    sub.add_argument('--format', choices=inspect_mod.SUPPORTED_FORMATS,
                     help='declared format; refused if the file is something else')

    sub = command('snapshot', do_snapshot, 'store a modified disk file as a new version')
    sub.add_argument('parent', metavar='IMAGE[:VERSION]')
    sub.add_argument('file')
    sub.add_argument('--format', choices=inspect_mod.SUPPORTED_FORMATS)
    sub.add_argument('--into', metavar='IMAGE',
                     help='store the snapshot as a version of this image (default: the parent\'s)')

    command('list', do_list, 'list every version of every image')

    sub = command('show', do_show, 'show one version')
    sub.add_argument('image', metavar='IMAGE[:VERSION]')

    sub = command('export', do_export, 'write a version to a raw or qcow2 file')
    sub.add_argument('image', metavar='IMAGE[:VERSION]')
    sub.add_argument('dest', help="output file, or '-' for raw on standard output")
    sub.add_argument('--format', choices=warehouse_mod.EXPORT_FORMATS, default='raw')

    command('verify', do_verify, 're-hash every chunk of every version')

    sub = command('rm', do_rm, 'delete a version, or a whole image')
    sub.add_argument('image', metavar='IMAGE[:VERSION]')
    sub.add_argument('--force', action='store_true',
                     help='delete even a version in use (held by a mirror or an unfinished '
                          'snapshot): its users lose it')

    sub = command('release', do_release,
                  "drop a hold a user left behind (a node that is gone); 'image show' names "
                  'the holders')
    sub.add_argument('image', metavar='IMAGE:VERSION')
    sub.add_argument('holder')

    sub = command('gc', do_gc, 'remove chunks no version references')
    sub.add_argument('--timeout', type=float, default=None,
                     help='seconds to wait for writes in progress')

    command('stats', do_stats, 'warehouse totals: logical, referenced and stored bytes')
