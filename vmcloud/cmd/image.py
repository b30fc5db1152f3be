"""``vmcloud image ...``: the warehouse from the command line.

``stage`` (and ``import --stage``) also asks the dispatcher, for the compute nodes of
the peer exchange, and those nodes' peer chunk servers; its modules are imported only
when it runs (``image list`` must not load the message bus).
"""
import argparse
import dataclasses
import sys
import time
from typing import TYPE_CHECKING, TextIO

from oslo_config import cfg

from vmcloud import exception
from vmcloud.cmd import output
from vmcloud.storage import inspect as inspect_mod
from vmcloud.storage import warehouse as warehouse_mod
from vmcloud.storage.manifest import Manifest
from vmcloud.storage.manifest import ManifestSummary
from vmcloud.storage.manifest import VersionRef

if TYPE_CHECKING:
    from vmcloud.mirror import staging as staging_types


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
    if args.stage:
        _stage_target(conf, args)  # nothing to stage to: refused before a long import
    warehouse = warehouse_mod.Warehouse(conf)
    result = _run_with_progress(
        args, f'importing {args.name}',
        lambda bar: warehouse.import_image(args.file, args.name, args.format, bar))
    record = dict(_version_row(result.manifest), stored_bytes=result.new_bytes)
    if not args.stage:
        output.emit_record(record, args.fmt)
        return 0
    ref = str(result.manifest.ref)
    try:
        staged, status = _stage(conf, args, warehouse, ref, args.stage_threads)
    except exception.VmcloudError as exc:
        output.emit_record(record, args.fmt)
        print(f'vmcloud: error: {ref} is imported but not staged: {exc}; '
              f"'vmcloud image stage {ref}' tries again", file=sys.stderr)
        return 1
    output.emit_record(dict(record, **{f'staged_{k}': v for k, v in staged.items()
                                       if k != 'image'}), args.fmt)
    return status


def do_stage(conf: cfg.ConfigOpts, args: argparse.Namespace) -> int:
    warehouse = warehouse_mod.Warehouse(conf)
    record, status = _stage(conf, args, warehouse, args.image, args.threads)
    output.emit_record(record, args.fmt)
    return status


MIB = 1024 * 1024


def _stage(conf: cfg.ConfigOpts, args: argparse.Namespace, warehouse: warehouse_mod.Warehouse,
           ref: str, threads: int) -> tuple[dict, int]:
    """Stage version ``ref`` on the peers up now, with a progress bar and a summary
    line on stderr.

    :returns: the record to show, and the exit status: 1 if a peer was given up (the
        chunks it owns are a copy short).
    :raises: ImageNotFound, StorageError; NoPeers; ReplicasUnknown; StagingFailed (a
        chunk no owner took); what reaching the dispatcher raises.
    """
    from vmcloud.mirror import staging

    planned = staging.plan(warehouse, ref)
    peers, replicas, client = _stage_target(conf, args)
    bar = StageProgress(f'staging {planned.ref}', planned.total_bytes,
                        enabled=args.progress is not False)
    try:
        result = staging.stage(planned.chunk_ids, peers, replicas, client, progress=bar,
                               threads=threads, sizes=planned.sizes)
    finally:
        bar.close()
    print(f'vmcloud: staged {result.chunks} chunks ({result.bytes / MIB:.1f} MiB, '
          f'{planned.source}) of {planned.ref} on {result.peers} peers, {replicas} owners '
          f'a chunk, in {result.seconds:.1f} s', file=sys.stderr)
    for host, why in sorted(result.failed_peers.items()):
        short = sum(1 for hosts in result.short.values() if host in hosts)
        print(f'vmcloud: error: peer {host} failed every attempt and was given up: {why}; '
              f'{short} chunks it owns are a copy short', file=sys.stderr)
    record = {'image': planned.ref, 'source': planned.source, 'chunks': result.chunks,
              'bytes': result.bytes, 'peers': result.peers, 'replicas': replicas,
              'copies': result.copies,
              'short_chunks': len(result.short),
              'failed_peers': ' '.join(sorted(result.failed_peers)),
              'seconds': round(result.seconds, 3)}
    return record, 1 if result.failed_peers else 0


def _stage_target(conf: cfg.ConfigOpts, args: argparse.Namespace
                  ) -> tuple[dict[str, str], int, 'staging_types.Stager']:
    """Where to stage: the peers up now (``_chunk_peers``), the number of owners a chunk
    has among them as the nodes tell it (this CLI's own [mirror] peer_replicas is not
    theirs), and the peer client to ask them with.

    :returns: (peers, replicas, client).
    :raises: NoPeers; ReplicasUnknown; what reaching the dispatcher raises.
    """
    from vmcloud.mirror import staging

    peers = _chunk_peers(conf, args)
    client = _peer_client(conf)
    return peers, staging.peer_replicas(peers, client), client


def _chunk_peers(conf: cfg.ConfigOpts, args: argparse.Namespace) -> dict[str, str]:
    """{host: peer URL} of the compute hosts up with one, from the dispatcher (over the
    bus or the REST API: ``common.client``).

    :raises: NoPeers naming every host known and its state; what reaching the
        dispatcher raises.
    """
    from vmcloud import rpc
    from vmcloud.cmd import common
    from vmcloud.dispatcher import states
    from vmcloud.mirror import staging

    with rpc.request_context():
        hosts = common.client(conf, args).list_hosts()
    peers = {h['name']: h['peer_url'] for h in hosts
             if h.get('state') == states.HOST_UP and h.get('peer_url')}
    if not peers:
        known = ', '.join(f"{h['name']} ({h.get('state')}"
                          f"{'' if h.get('peer_url') else ', no peer URL'})" for h in hosts)
        raise staging.NoPeers(
            f'no compute host is up with a peer URL (hosts: {known or "none"}); the '
            'compute nodes take part in the peer exchange with [mirror] peer_address set')
    return peers


def _peer_client(conf: cfg.ConfigOpts):
    """The client of the peer chunk servers (looked up at each call: a test gives the
    commands a fake)."""
    from vmcloud.mirror import peer_http

    return peer_http.PeerClient(conf.mirror.peer_token, conf.mirror.peer_timeout)


class StageProgress:
    """Staging's progress on ``stream`` (default: sys.stderr as it is now): on a
    terminal, one line redrawn with a bar, chunks and MiB (at most every 0.1 s, and at
    the end); elsewhere (a log, a pipe), one line at each tenth of the chunks done."""

    WIDTH = 30
    REDRAW = 0.1

    def __init__(self, label: str, total_bytes: int, stream: TextIO | None = None,
                 enabled: bool = True):
        self.label = label
        self.total_bytes = total_bytes
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.terminal = self.stream.isatty()
        self._last_draw = float('-inf')
        self._tenths = 0
        self._drawn = False

    def __call__(self, done: int, total: int, done_bytes: int) -> None:
        if not self.enabled:
            return
        fraction = done / total if total else 1.0
        amount = (f'{done}/{total} chunks {done_bytes / MIB:.1f}/'
                  f'{self.total_bytes / MIB:.1f} MiB')
        if self.terminal:
            now = time.monotonic()
            if done < total and now - self._last_draw < self.REDRAW:
                return
            self._last_draw = now
            filled = int(self.WIDTH * fraction)
            self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (self.WIDTH - filled)}] "
                              f'{fraction:4.0%} {amount}   ')
            self._drawn = True
        else:
            tenths = int(fraction * 10)
            if tenths <= self._tenths:
                return
            self._tenths = tenths
            self.stream.write(f'{self.label}: {fraction:.0%} {amount}\n')
        self.stream.flush()

    def close(self) -> None:
        if self._drawn:
            self.stream.write('\n')
            self.stream.flush()


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
            # A chunk is shared when it needs no object its parent does not.
            shared = parent.data_chunk_ids()
            record['chunks_shared_with_parent'] = sum(
                1 for index in range(manifest.chunk_count)
                if manifest.chunks[index] is not None
                and shared.issuperset(manifest.object_ids(index)))
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
    sub.add_argument('--stage', action='store_true',
                     help="then stage it, as 'image stage' does (refused before the import "
                          'if no compute node of the peer exchange is up)')
    sub.add_argument('--stage-threads', type=_positive, default=8, metavar='N',
                     help='chunks staged at once (default: 8)')

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

    sub = command('stage', do_stage,
                  "push a version's boot-profile chunks (without a profile, all its chunks) "
                  'to their owner compute nodes before a large deployment')
    sub.add_argument('image', metavar='IMAGE[:VERSION]')
    sub.add_argument('--threads', type=_positive, default=8, metavar='N',
                     help='chunks staged at once (default: 8)')


def _positive(text: str) -> int:
    """A whole number of at least 1. :raises: argparse.ArgumentTypeError naming it."""
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number of at least 1")
    return number
