"""A warehouse in a Ceph RADOS pool, shared by every host that reaches the cluster.

Objects, all in one pool and one RADOS namespace (``[storage_rados] namespace``)::

    chunk.ID                 a chunk's bytes, one object each, named by its sha256
    index.chunks.H           omap: ID -> length, for the chunks whose id starts with hex H;
                             a chunk is visible (stored) exactly when it is in this index
    images                   omap: image name -> b''
    image.NAME               omap: version (20 digits) -> manifest object's unique suffix
    manifest.NAME.N.UID      a manifest's bytes
    attachments.NAME         omap: attachment name -> b'', the attachments image NAME has
    attachment/NAME/ATT      attachment ATT's bytes ('/' is in no image or attachment name)
    lock.warehouse           the rados object lock writers share and gc takes exclusively
    lock.image.NAME          the per-image lock

One object per chunk, not packs: RADOS objects are cheap (no directory entry,
no inode; the OSD's key-value store holds them), a chunk can be removed on its
own, so gc never rewrites anything and a reader never sees a chunk move.

RADOS has no rename, so a write session cannot stage chunks elsewhere and publish
them: it writes each chunk straight to ``chunk.ID`` (asynchronously, a bounded
number in flight) and makes them visible at commit() by adding them to the index
in one omap write per index shard. Until then has_chunk, read_chunk and
iter_chunks do not see them. Each chunk object is made with an exclusive create,
so exactly one session creates it; another session that needs the same new chunk
at the same time "borrows" it. abort() removes only what its session created,
with a remove guarded (omap_cmp, atomically on the OSD) by the absence of a
borrow mark that a borrower sets, also atomically and only if the object still
has the chunk's first bytes, before indexing it. So either the borrower marks
first and the abort keeps the object, or the abort removes it first and the
borrower's commit fails instead of indexing a chunk that is gone.

Image listing uses omap indexes, not a listing of object names: listing a
namespace visits every object in it, millions of chunks, to find a few manifests.
A version exists when the image's index names it; its manifest object has a
unique suffix, so two writers racing for one version each write their own
object, and the index's omap_cmp (absent key) plus set, one atomic operation on
one object, lets exactly one win on every host: the loser removes its object and
gets VersionExists.

Locks are RADOS object locks (cls_lock): shared by writers, exclusive for gc and
per image, each with a duration so that a crashed holder's lock expires; a
thread renews a held lock every third of that duration. A lock another holder
took or broke, or that went unrenewed for its duration, is lost, never taken back:
the write sessions begun under it and the exit of its ``with`` block raise
LeaseLost, so a writer does not go on while gc on another host may run.
"""
import contextlib
import errno
import logging
import os
import threading
import time
import uuid
from typing import Callable, Iterable, Iterator, TypeVar

import rados
from oslo_config import cfg

from vmcloud import exception
from vmcloud.storage import backend

LOG = logging.getLogger(__name__)

_SHARDS = '0123456789abcdef'
_OMAP_PAGE = 1000
# No listing is longer than this many pages (a billion keys): every loop is bounded.
_MAX_PAGES = 1_000_000
_LOCK_NAME = 'vmcloud'
# LIBRADOS_LOCK_FLAG_MUST_RENEW: renew only a lock the OSD still lists as ours.
_LOCK_MUST_RENEW = 2
_BORROWED = 'borrowed'
# Enough of a chunk's bytes to tell that an object still holds that chunk.
_PREFIX_CHECK = 64
# Manifests are written and read in pieces of this size, below osd_max_write_size.
_PIECE = 32 * 1024 * 1024

T = TypeVar('T')


def _shard(chunk_id: str) -> str:
    return 'index.chunks.' + (chunk_id[:1] if chunk_id[:1] in _SHARDS else '0')


def _chunk_object(chunk_id: str) -> str:
    return 'chunk.' + chunk_id


def _version_key(version: int) -> str:
    return f'{version:020d}'


def _parse_length(value: bytes) -> int | None:
    """The length an index entry records, None if it is not a sane one."""
    if not value.isdigit() or len(value) > 19:
        return None
    length = int(value)
    return length if length > 0 else None


class _Session(backend.WriteSession):
    """Writes chunks as they are put, asynchronously; commit() indexes them.

    ``locks`` are those its thread held when it began: once one is lost, put_chunk
    and commit raise LeaseLost (abort still cleans up).
    """

    # has_chunk is a round trip; missing() asks one omap read per index shard.
    MISSING_BATCH = 64

    def __init__(self, store: 'RadosBackend', locks: tuple['_HeldLock', ...]):
        super().__init__(store)
        self._store = store
        self._locks = locks
        self._lengths: dict[str, int] = {}      # every chunk this session needs indexed
        self._created: set[str] = set()         # objects this session made
        self._borrowed: dict[str, bytes] = {}   # made by another writer: id -> first bytes
        self._prefixes: dict[str, bytes] = {}   # first bytes of chunks in flight
        self._pending: list[tuple[str, rados.Completion]] = []
        self._results: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stored_bytes = 0
        self._done = False

    @property
    def stored_bytes(self) -> int:
        return self._stored_bytes

    def _check_locks(self) -> None:
        for lock in self._locks:
            lock.check()

    def has_put(self, chunk_id: str) -> bool:
        return chunk_id in self._lengths

    def missing(self, chunk_ids: Iterable[str]) -> set[str]:
        """:raises: LeaseLost if a lock it began under was lost; StorageError."""
        self._check_locks()
        return super().missing(chunk_ids)

    def put_chunk(self, chunk_id: str, data: bytes) -> None:
        """A chunk another writer made visible since missing() is borrowed like one
        in flight (its object exists). :raises: LeaseLost if a lock it began under
        was lost; StorageError."""
        self._check_locks()
        if chunk_id in self._lengths:
            return
        self._collect(block=False)
        self._lengths[chunk_id] = len(data)
        self._prefixes[chunk_id] = data[:_PREFIX_CHECK]
        completion = self._store.aio_create(chunk_id, data, self._finished)
        self._pending.append((chunk_id, completion))
        self._stored_bytes += len(data)

    def _finished(self, chunk_id: str, result: int) -> None:
        with self._lock:
            self._results[chunk_id] = result

    def _collect(self, block: bool) -> None:
        """Sort finished writes into created and borrowed; raise for a failed one."""
        if block:
            for chunk_id, completion in self._pending:
                completion.wait_for_complete_and_cb()
        with self._lock:
            results, self._results = self._results, {}
        self._pending = [(c, comp) for c, comp in self._pending if c not in results]
        failed = None
        for chunk_id, result in results.items():
            if result == 0:
                self._created.add(chunk_id)
            elif result == -errno.EEXIST:
                self._borrowed[chunk_id] = self._prefixes[chunk_id]
            elif failed is None:
                failed = (chunk_id, result)
            self._prefixes.pop(chunk_id, None)
        if failed is not None:
            chunk_id, result = failed
            raise self._store.error(f'write chunk {chunk_id} to', _chunk_object(chunk_id),
                                    OSError(-result, os.strerror(-result)))

    def commit(self) -> None:
        """:raises: LeaseLost if a lock it began under was lost; StorageError."""
        if self._done:
            return
        self._check_locks()
        self._collect(block=True)
        for chunk_id, prefix in self._borrowed.items():
            self._store.mark_borrowed(chunk_id, prefix)
        # Asked of the cluster, not of the renewer: waiting for the writes in flight can
        # outlast a lock, and a process frozen past the lock's duration wakes up with a
        # renewer that has not noticed yet.
        for lock in self._locks:
            lock.confirm()
        self._store.index_chunks(self._lengths)
        self._done = True

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        with contextlib.suppress(exception.StorageError):
            self._collect(block=True)
        for chunk_id in self._created:
            self._store.remove_unborrowed(chunk_id)

    def drain(self) -> None:
        """Wait for every write in flight (when the shared lock is released)."""
        for _, completion in self._pending:
            completion.wait_for_complete_and_cb()


class _HeldLock:
    """A rados object lock, renewed by a thread until released.

    ``lost`` says why the lock is no longer held: another holder took it or broke
    it, or renewals kept failing until the lock's duration ran out (the OSD let it
    expire). From then on check() raises, so a writer stops instead of writing
    while gc on another host may run.
    """

    def __init__(self, store: 'RadosBackend', oid: str, shared: bool, wait: float,
                 busy: Callable[[], exception.StorageError], what: str):
        self._store = store
        self._oid = oid
        self._shared = shared
        self.what = what
        self._cookie = uuid.uuid4().hex
        self._stop = threading.Event()
        self.lost: exception.StorageError | None = None
        self._duration = duration = store.conf.storage_rados.lock_duration
        deadline = time.monotonic() + wait
        for _ in range(max(1, int(wait / 0.05) + 1)):
            # Taken at the time the request is sent, at latest: the OSD counts the
            # lock's duration from when it receives it, so this errs early.
            self._renewed_at = time.monotonic()
            if self._take(duration, 0):
                break
            if time.monotonic() >= deadline:
                raise busy()
            time.sleep(0.05)
        else:
            raise busy()
        self._renewer = threading.Thread(target=self._renew, args=(duration,),
                                         name=f'rados-lock-{oid}', daemon=True)
        self._renewer.start()

    def _take(self, duration: int, flags: int) -> bool:
        """:returns: False if another holder excludes us, or (renewing) the lock is no
        longer ours. :raises: StorageError."""
        ioctx = self._store.ioctx
        try:
            if self._shared:
                ioctx.lock_shared(self._oid, _LOCK_NAME, self._cookie, 'writers',
                                  'vmcloud writer', duration, flags)
            else:
                ioctx.lock_exclusive(self._oid, _LOCK_NAME, self._cookie,
                                     'vmcloud', duration, flags)
            return True
        except (rados.ObjectBusy, rados.ObjectExists):
            return False
        except rados.ObjectNotFound:
            if flags & _LOCK_MUST_RENEW:
                return False  # broken, or expired: the OSD no longer lists our cookie
            raise
        except rados.Error as exc:
            raise self._store.error('lock', self._oid, exc) from exc

    def _renew(self, duration: int) -> None:
        # MUST_RENEW, not RENEW: RENEW quietly takes the lock again after someone broke
        # it or it expired, and gc may have run in between.
        while not self._stop.wait(duration / 3) and self.lost is None:
            started = time.monotonic()
            try:
                self._renew_once(duration, started)
            except exception.StorageError as exc:
                LOG.warning('cannot renew %s: %s', self.what, exc)
                self._expire_if_late(exc)

    def _renew_once(self, duration: int, started: float) -> None:
        """:raises: StorageError if the cluster did not answer."""
        if self._take(duration, _LOCK_MUST_RENEW):
            self._renewed_at = max(self._renewed_at, started)
        else:
            self._lose(exception.StorageError(
                f'another holder took it or broke it, or it expired '
                f'(lock {_LOCK_NAME} of {self._store._where(self._oid)})'))

    def _expire_if_late(self, cause: exception.StorageError | None) -> None:
        late = time.monotonic() - self._renewed_at
        if self.lost is None and late >= self._duration:
            why = f': {cause}' if cause is not None else ''
            self._lose(exception.StorageError(
                f'not renewed for {late:.1f} s, past its duration of {self._duration} s '
                f'(lock {_LOCK_NAME} of {self._store._where(self._oid)}){why}'))

    def _lose(self, why: exception.StorageError) -> None:
        if self.lost is None:
            LOG.error('%s was lost: %s', self.what, why)
            self.lost = why

    def check(self) -> None:
        """:raises: LeaseLost naming the lock and why, once it is no longer held."""
        # A renewer stuck in a call that has not failed yet does not keep it alive.
        self._expire_if_late(None)
        if self.lost is not None:
            raise exception.LeaseLost(f'{self.what} was lost: {self.lost}') from self.lost

    def confirm(self) -> None:
        """Renew the lock now, so that the OSD, not the renewer's last round, says it
        is still ours (before a write gc must not have run ahead of).

        :raises: LeaseLost naming the lock and why, unless the OSD still lists it as
            ours; StorageError if the cluster did not answer.
        """
        self.check()
        if self._stop.is_set():
            raise exception.LeaseLost(f'{self.what} was released: the holder left its block')
        self._renew_once(self._duration, time.monotonic())
        self.check()

    def release(self) -> None:
        self._stop.set()
        # A lock context left open and collected in the renewer's own thread lands here.
        if threading.current_thread() is not self._renewer:
            self._renewer.join(self._store.conf.storage_rados.op_timeout + 5)
        try:
            self._store.ioctx.unlock(self._oid, _LOCK_NAME, self._cookie)
        except rados.ObjectNotFound:
            pass  # expired and taken or the object gone: nothing of ours is left
        except rados.Error as exc:
            LOG.warning('cannot unlock %s (it expires by itself): %s', self._oid, exc)


class RadosBackend(backend.Backend):
    OPTION_GROUP = cfg.OptGroup('storage_rados', title='Ceph RADOS warehouse backend')
    OPTIONS = [
        cfg.StrOpt('conffile', default='/etc/ceph/ceph.conf',
                   help='ceph.conf naming the cluster (mon_host) to use.'),
        cfg.StrOpt('client_name', default='client.vmcloud',
                   help='Ceph client (cephx) name; it needs rwx on the pool only.'),
        cfg.StrOpt('keyring', default='',
                   help='Keyring of client_name; empty: where ceph.conf says.'),
        cfg.StrOpt('pool', default='vmcloud', help='Pool holding the warehouse.'),
        cfg.StrOpt('namespace', default='',
                   help='RADOS namespace of the warehouse in the pool, so that several '
                        'warehouses can share one pool.'),
        cfg.IntOpt('connect_timeout', default=10, min=1,
                   help='Seconds to reach the monitors before giving up.'),
        cfg.IntOpt('op_timeout', default=30, min=1,
                   help='Seconds an OSD or monitor operation may take before it fails '
                        '(rados_osd_op_timeout, rados_mon_op_timeout): a cluster that '
                        'does not answer is an error, not a hang.'),
        cfg.IntOpt('aio_depth', default=32, min=1,
                   help='Chunk writes in flight per backend instance (all its write sessions).'),
        cfg.IntOpt('lock_duration', default=30, min=1,
                   help='Seconds a lock outlives a holder that stopped renewing it '
                        '(a crashed process); renewed every third of that.'),
        cfg.IntOpt('lock_wait', default=600, min=0,
                   help='Seconds a writer waits for a shared or an image lock (gc or '
                        'another writer holding it) before giving up.'),
    ]
    CAPABILITIES = (backend.Capabilities.SHARED_ACROSS_HOSTS
                    | backend.Capabilities.CROSS_HOST_LOCKING)

    def __init__(self, conf: cfg.ConfigOpts):
        super().__init__(conf)
        opts = conf.storage_rados
        self.pool = opts.pool
        self.namespace = opts.namespace
        settings = {
            'rados_osd_op_timeout': str(opts.op_timeout),
            'rados_mon_op_timeout': str(opts.op_timeout),
            'client_mount_timeout': str(opts.connect_timeout),
        }
        if opts.keyring:
            settings['keyring'] = opts.keyring
        self.cluster_name = f'ceph cluster of {opts.conffile}'
        try:
            self._cluster = rados.Rados(conffile=opts.conffile, name=opts.client_name,
                                        conf=settings)
        except rados.Error as exc:
            raise exception.StorageError(f'cannot configure the {self.cluster_name} '
                                         f'as {opts.client_name}: {exc}') from exc
        with contextlib.suppress(rados.Error):
            self.cluster_name += f' (mon_host {self._cluster.conf_get("mon_host")})'
        try:
            self._cluster.connect(timeout=opts.connect_timeout)
        except rados.Error as exc:
            self._cluster.shutdown()
            raise exception.StorageError(
                f'cannot connect to the {self.cluster_name} as {opts.client_name} within '
                f'{opts.connect_timeout} s: {exc}') from exc
        try:
            self.ioctx = self._cluster.open_ioctx(self.pool)
        except rados.Error as exc:
            self._cluster.shutdown()
            raise exception.StorageError(
                f'cannot open pool {self.pool} of the {self.cluster_name}: {exc}') from exc
        self.ioctx.set_namespace(self.namespace)
        self._flight = threading.BoundedSemaphore(opts.aio_depth)
        self._sessions: list[_Session] = []
        self._sessions_lock = threading.Lock()
        self._local = threading.local()

    def _held(self) -> list[_HeldLock]:
        """The locks this thread holds, outermost first."""
        held = getattr(self._local, 'locks', None)
        if held is None:
            held = self._local.locks = []
        return held

    def __repr__(self) -> str:
        return f'RadosBackend({self._where("")})'

    def close(self) -> None:
        """Disconnect from the cluster; the instance is unusable afterwards."""
        with contextlib.suppress(rados.Error):
            self.ioctx.close()
        self._cluster.shutdown()

    def _where(self, oid: str) -> str:
        return f'pool {self.pool} namespace {self.namespace or "(default)"} object {oid}'

    def error(self, action: str, oid: str, exc: BaseException) -> exception.StorageError:
        """A StorageError naming what failed and which object; raise it ``from exc``."""
        return exception.StorageError(f'cannot {action} {self._where(oid)} '
                                      f'of the {self.cluster_name}: {exc}')

    def _call(self, action: str, oid: str, call: Callable[..., T], *args) -> T:
        try:
            return call(*args)
        except rados.Error as exc:
            raise self.error(action, oid, exc) from exc

    # -- omap helpers ----------------------------------------------------------

    def _omap_get(self, oid: str, keys: tuple[str, ...]) -> dict[str, bytes]:
        """The values of ``keys`` that exist; {} if the object does not. :raises: rados.Error."""
        read_op = self.ioctx.create_read_op()
        try:
            values, _ = self.ioctx.get_omap_vals_by_keys(read_op, keys)
            self.ioctx.operate_read_op(read_op, oid)
            return dict(values)
        except rados.ObjectNotFound:
            return {}
        finally:
            self.ioctx.release_read_op(read_op)

    def _omap_items(self, oid: str) -> Iterator[tuple[str, bytes]]:
        """Every key and value of an object's omap, a page at a time. :raises: rados.Error."""
        after = ''
        for _ in range(_MAX_PAGES):
            read_op = self.ioctx.create_read_op()
            try:
                values, _ = self.ioctx.get_omap_vals(read_op, after, '', _OMAP_PAGE)
                self.ioctx.operate_read_op(read_op, oid)
                page = list(values)
            except rados.ObjectNotFound:
                return
            finally:
                self.ioctx.release_read_op(read_op)
            yield from page
            if len(page) < _OMAP_PAGE:
                return
            after = page[-1][0]
        raise exception.StorageError(f'omap of {self._where(oid)} has more than '
                                     f'{_MAX_PAGES * _OMAP_PAGE} keys')

    def _write_op(self, oid: str, build: Callable[[rados.WriteOp], None]) -> None:
        """Run one atomic write operation. :raises: rados.Error."""
        write_op = self.ioctx.create_write_op()
        try:
            build(write_op)
            self.ioctx.operate_write_op(write_op, oid)
        finally:
            self.ioctx.release_write_op(write_op)

    # -- chunks --------------------------------------------------------------

    def _index_entry(self, chunk_id: str) -> int | None:
        """The length the index records for a visible chunk, None if it is not visible."""
        shard = _shard(chunk_id)
        values = self._call(f'look up chunk {chunk_id} in', shard,
                            self._omap_get, shard, (chunk_id,))
        return _parse_length(values[chunk_id]) if chunk_id in values else None

    def has_chunk(self, chunk_id: str) -> bool:
        return self._index_entry(chunk_id) is not None

    def missing(self, chunk_ids: Iterable[str]) -> set[str]:
        # One omap read per index shard the ids fall in, not one per id.
        by_shard: dict[str, list[str]] = {}
        for chunk_id in dict.fromkeys(chunk_ids):
            by_shard.setdefault(_shard(chunk_id), []).append(chunk_id)
        lacking = set()
        for shard, ids in sorted(by_shard.items()):
            values = self._call(f'look up {len(ids)} chunks in', shard,
                                self._omap_get, shard, tuple(ids))
            lacking.update(chunk_id for chunk_id in ids if chunk_id not in values
                           or _parse_length(values[chunk_id]) is None)
        return lacking

    def read_chunk(self, chunk_id: str) -> bytes:
        # The read starts before the index lookup and runs beside it: one round trip
        # instead of two. Its length is a guess (the configured chunk size); a longer
        # chunk (an image with a larger chunk size) is read again whole.
        oid = _chunk_object(chunk_id)
        guess = self.conf.storage.chunk_size
        got: list[bytes] = []
        completion = self._call(f'read chunk {chunk_id} from', oid, self.ioctx.aio_read,
                                oid, guess, 0, lambda _, data: got.append(data))
        try:
            length = self._index_entry(chunk_id)
        finally:
            completion.wait_for_complete_and_cb()
        if length is None:
            raise exception.ChunkNotFound(chunk_id)
        result = completion.get_return_value()
        if result == -errno.ENOENT:  # a gc removed it since the lookup
            raise exception.ChunkNotFound(chunk_id)
        if result < 0:
            raise self.error(f'read chunk {chunk_id} from', oid,
                             OSError(-result, os.strerror(-result)))
        data = got[0] if got else b''
        if length > guess:
            try:
                data = self.ioctx.read(oid, length)
            except rados.ObjectNotFound as exc:
                raise exception.ChunkNotFound(chunk_id) from exc
            except rados.Error as exc:
                raise self.error(f'read chunk {chunk_id} from', oid, exc) from exc
        return data[:length]

    def _index(self) -> tuple[dict[str, int], dict[str, str], list[str]]:
        """(visible chunk -> length, chunk with a corrupt entry -> its shard, problems)."""
        visible: dict[str, int] = {}
        corrupt: dict[str, str] = {}
        problems: list[str] = []
        for hex_digit in _SHARDS:
            shard = 'index.chunks.' + hex_digit
            for chunk_id, value in self._call('list chunk index', shard,
                                              lambda s=shard: list(self._omap_items(s))):
                length = _parse_length(value)
                if length is None:
                    corrupt[chunk_id] = shard
                    problems.append(f'chunk index entry {chunk_id} in {self._where(shard)} '
                                    f'is corrupt: {value[:40]!r}')
                else:
                    visible[chunk_id] = length
        return visible, corrupt, problems

    def iter_chunks(self) -> Iterator[tuple[str, int]]:
        yield from sorted(self._index()[0].items())

    def stored_chunk_bytes(self) -> int:
        return sum(self._index()[0].values())

    def damaged(self) -> list[str]:
        problems = self._index()[2]
        for image in self._image_names():
            problem = self._image_index_problem(image)
            if problem:
                problems.append(problem)
        return problems

    def begin_write(self) -> backend.WriteSession:
        session = _Session(self, tuple(self._held()))
        with self._sessions_lock:
            self._sessions = [s for s in self._sessions if not s._done] + [session]
        return session

    def aio_create(self, chunk_id: str, data: bytes,
                   finished: Callable[[str, int], None]) -> rados.Completion:
        """Start an exclusive create of a chunk's object; ``finished(id, result)`` follows.

        At most ``aio_depth`` are in flight per instance: this waits for a slot.
        """
        self._flight.acquire()
        write_op = self.ioctx.create_write_op()

        def done(completion: rados.Completion) -> None:
            try:
                finished(chunk_id, completion.get_return_value())
            finally:
                self.ioctx.release_write_op(write_op)
                self._flight.release()

        try:
            write_op.new(rados.LIBRADOS_CREATE_EXCLUSIVE)
            # librados takes bytes only; the chunker hands out memoryviews.
            write_op.write_full(bytes(data))
            return self.ioctx.operate_aio_write_op(write_op, _chunk_object(chunk_id),
                                                   oncomplete=done)
        except rados.Error as exc:
            self.ioctx.release_write_op(write_op)
            self._flight.release()
            raise self.error(f'write chunk {chunk_id} to', _chunk_object(chunk_id),
                             exc) from exc

    def mark_borrowed(self, chunk_id: str, prefix: bytes) -> None:
        """Keep the creator's abort from removing a chunk this session uses.

        :raises: StorageError if the object no longer holds the chunk (its creator
            aborted first): the session cannot commit.
        """
        oid = _chunk_object(chunk_id)

        def build(write_op: rados.WriteOp) -> None:
            write_op.cmpext(prefix, 0)
            self.ioctx.set_omap(write_op, (_BORROWED,), (b'1',))

        try:
            self._write_op(oid, build)
        except rados.Error as exc:
            raise self.error(f'keep chunk {chunk_id} (its other writer aborted?) at',
                             oid, exc) from exc

    def index_chunks(self, lengths: dict[str, int]) -> None:
        """Make chunks visible: one omap write per index shard. :raises: StorageError."""
        by_shard: dict[str, list[str]] = {}
        for chunk_id in lengths:
            by_shard.setdefault(_shard(chunk_id), []).append(chunk_id)
        for shard, chunk_ids in sorted(by_shard.items()):
            def build(write_op: rados.WriteOp, ids: list[str] = chunk_ids) -> None:
                self.ioctx.set_omap(write_op, tuple(ids),
                                    tuple(str(lengths[c]).encode() for c in ids))
            self._call(f'index {len(chunk_ids)} chunks in', shard, self._write_op,
                       shard, build)

    def remove_unborrowed(self, chunk_id: str) -> None:
        """Remove a chunk object unless another session marked it borrowed. Never raises."""
        oid = _chunk_object(chunk_id)

        def build(write_op: rados.WriteOp) -> None:
            write_op.omap_cmp(_BORROWED, '', rados.LIBRADOS_CMPXATTR_OP_EQ)
            write_op.remove()

        try:
            self._write_op(oid, build)
        except rados.Error as exc:
            # Borrowed (ECANCELED), or the cluster failed: gc's purge removes it then.
            LOG.debug('abort keeps %s: %s', self._where(oid), exc)

    def retain(self, referenced: set[str]) -> tuple[int, int]:
        unlisted = [problem for problem in (self._image_index_problem(image)
                                            for image in self._image_names()) if problem]
        if unlisted:
            raise exception.StorageError('gc refused: the versions of some images cannot be '
                                         'listed: ' + '; '.join(unlisted))
        visible, _, _ = self._index()
        dead = {chunk_id: length for chunk_id, length in visible.items()
                if chunk_id not in referenced}
        by_shard: dict[str, list[str]] = {}
        for chunk_id in dead:
            by_shard.setdefault(_shard(chunk_id), []).append(chunk_id)
        # Out of the index first: from then on no reader or writer relies on them.
        for shard, chunk_ids in sorted(by_shard.items()):
            def build(write_op: rados.WriteOp, ids: list[str] = chunk_ids) -> None:
                self.ioctx.remove_omap_keys(write_op, tuple(ids))
            self._call('unindex chunks in', shard, self._write_op, shard, build)
        for chunk_id in dead:
            self._remove(_chunk_object(chunk_id))
        return len(dead), sum(dead.values())

    def _remove(self, oid: str) -> None:
        try:
            self.ioctx.remove_object(oid)
        except rados.ObjectNotFound:
            pass
        except rados.Error as exc:
            raise self.error('remove', oid, exc) from exc

    def purge_abandoned(self) -> int:
        visible, corrupt, _ = self._index()
        removed = 0
        names = self._call('list objects of', '*',
                           lambda: [obj.key for obj in self.ioctx.list_objects()])
        for name in names:
            if name.startswith('chunk.'):
                chunk_id = name[len('chunk.'):]
                # A chunk with a corrupt index entry is kept: it may be what a version needs.
                if chunk_id not in visible and chunk_id not in corrupt:
                    self._remove(name)
                    removed += 1
            elif name.startswith('manifest.') and self._orphan_manifest(name):
                self._remove(name)
                removed += 1
        return removed

    def _orphan_manifest(self, oid: str) -> bool:
        """Whether a manifest object is one no index names (its writer crashed or lost)."""
        parts = oid[len('manifest.'):].rsplit('.', 2)
        if len(parts) != 3 or not parts[1].isdigit():
            return False  # not ours to judge
        image, version, uid = parts
        key = _version_key(int(version))
        values = self._call(f'look up {image}:{version} in', f'image.{image}',
                            self._omap_get, f'image.{image}', (key,))
        return values.get(key) != uid.encode()

    # -- manifests -----------------------------------------------------------

    def _check_name(self, image: str) -> None:
        # The Warehouse validates names; this keeps object names parseable.
        if not image or image in ('.', '..') or '/' in image or '\0' in image:
            raise exception.InvalidName(f'invalid image name {image!r}')

    def create_manifest(self, image: str, version: int, data: bytes) -> None:
        self._check_name(image)
        uid = uuid.uuid4().hex
        oid = f'manifest.{image}.{version}.{uid}'
        index = f'image.{image}'
        key = _version_key(version)
        self._call(f'store manifest {image}:{version} as', oid, self._write_pieces, oid, data)
        try:
            self._call(f'list image {image} in', 'images', self._write_op, 'images',
                       lambda op: self.ioctx.set_omap(op, (image,), (b'',)))

            def claim(write_op: rados.WriteOp) -> None:
                # Absent key compares equal to '': exactly one writer's set happens.
                write_op.new(rados.LIBRADOS_CREATE_IDEMPOTENT)
                write_op.omap_cmp(key, '', rados.LIBRADOS_CMPXATTR_OP_EQ)
                self.ioctx.set_omap(write_op, (key,), (uid.encode(),))

            try:
                self._write_op(index, claim)
            except rados.OSError as exc:
                if exc.errno == errno.ECANCELED:
                    raise exception.VersionExists(image, version) from exc
                raise self.error(f'add {image}:{version} to', index, exc) from exc
            except rados.Error as exc:
                raise self.error(f'add {image}:{version} to', index, exc) from exc
        except exception.StorageError:
            with contextlib.suppress(exception.StorageError):
                self._remove(oid)
            raise

    def _write_pieces(self, oid: str, data: bytes) -> None:
        """Write an object of any size: one op may not exceed osd_max_write_size (90 MiB).

        Only for objects no one reads before they are complete (a manifest is named by
        no index until it is). :raises: rados.Error.
        """
        self.ioctx.write_full(oid, bytes(data[:_PIECE]))
        for offset in range(_PIECE, len(data), _PIECE):
            self.ioctx.write(oid, bytes(data[offset:offset + _PIECE]), offset)

    def _read_pieces(self, oid: str, length: int) -> bytes:
        """The first ``length`` bytes of an object, read a piece at a time. :raises: rados.Error."""
        pieces = []
        for offset in range(0, length, _PIECE):
            piece = self.ioctx.read(oid, min(_PIECE, length - offset), offset)
            pieces.append(piece)
            if len(piece) < min(_PIECE, length - offset):
                break  # the object is shorter
        return b''.join(pieces)

    def _manifest_object(self, image: str, version: int) -> str:
        """:raises: ImageNotFound; CorruptManifest if the index entry is not sane."""
        self._check_name(image)
        key = _version_key(version)
        index = f'image.{image}'
        try:
            values = self._omap_get(index, (key,))
        except rados.Error as exc:
            raise exception.CorruptManifest(f'manifest {image}:{version} is unreadable: '
                                            f'{self._where(index)}: {exc}') from exc
        if key not in values:
            raise exception.ImageNotFound(image, version)
        uid = values[key]
        if len(uid) != 32 or not all(c in b'0123456789abcdef' for c in uid):
            raise exception.CorruptManifest(
                f'manifest {image}:{version} is unreadable: its entry in '
                f'{self._where(index)} is corrupt: {uid[:40]!r}')
        return f'manifest.{image}.{version}.{uid.decode()}'

    def _read_manifest(self, image: str, version: int, length: int | None) -> bytes:
        oid = self._manifest_object(image, version)
        try:
            if length is None:
                length, _ = self.ioctx.stat(oid)
            return self._read_pieces(oid, length)
        except rados.ObjectNotFound as exc:
            if version not in self.list_versions(image):
                raise exception.ImageNotFound(image, version) from exc  # deleted meanwhile
            raise exception.CorruptManifest(f'manifest {image}:{version} is unreadable: '
                                            f'{self._where(oid)} is missing') from exc
        except rados.Error as exc:
            raise exception.CorruptManifest(f'manifest {image}:{version} is unreadable: '
                                            f'{self._where(oid)}: {exc}') from exc

    def read_manifest(self, image: str, version: int) -> bytes:
        return self._read_manifest(image, version, None)

    def read_manifest_prefix(self, image: str, version: int, length: int) -> bytes:
        # A ranged read of the object: only ``length`` bytes cross the network.
        return self._read_manifest(image, version, max(0, length))

    def delete_manifest(self, image: str, version: int) -> None:
        index = f'image.{image}'
        key = _version_key(version)
        try:
            oid = self._manifest_object(image, version)
        except exception.CorruptManifest:
            oid = None  # a damaged entry can still be removed
        self._call(f'delete {image}:{version} from', index, self._write_op, index,
                   lambda op: self.ioctx.remove_omap_keys(op, (key,)))
        if oid is not None:
            self._remove(oid)
        if not self.list_versions(image):
            self._call(f'unlist image {image} in', 'images', self._write_op, 'images',
                       lambda op: self.ioctx.remove_omap_keys(op, (image,)))

    def _image_names(self) -> list[str]:
        return [name for name, _ in self._call('list images in', 'images',
                                               lambda: list(self._omap_items('images')))]

    def _image_index_problem(self, image: str) -> str | None:
        try:
            self.list_versions(image)
        except exception.StorageError as exc:
            return str(exc)
        return None

    def list_images(self) -> list[str]:
        images = []
        for name in self._image_names():
            with contextlib.suppress(exception.StorageError):  # damaged() names it
                if self.list_versions(name):
                    images.append(name)
        return sorted(images)

    def list_versions(self, image: str) -> list[int]:
        self._check_name(image)
        index = f'image.{image}'
        items = self._call(f'list versions of image {image} in', index,
                           lambda: list(self._omap_items(index)))
        return sorted(int(key) for key, _ in items if key.isdigit() and key.isascii())

    def manifests_stored_bytes(self) -> int:
        total = 0
        for image in self.list_images():
            for version in self.list_versions(image):
                with contextlib.suppress(exception.StorageError, rados.Error):
                    total += self.ioctx.stat(self._manifest_object(image, version))[0]
        return total

    # -- attachments ---------------------------------------------------------

    def _attachment_object(self, image: str, name: str) -> str:
        self._check_name(image)
        if not name or '/' in name or '\0' in name:
            raise exception.InvalidName(f'invalid attachment name {name!r}')
        return f'attachment/{image}/{name}'

    def write_attachment(self, image: str, name: str, data: bytes) -> None:
        oid = self._attachment_object(image, name)
        index = f'attachments.{image}'
        # Listed before it is written: a crash in between leaves a name that reads as
        # None, never an object that delete_attachments cannot find.
        self._call(f'list attachment {name} of image {image} in', index, self._write_op,
                   index, lambda op: self.ioctx.set_omap(op, (name,), (b'',)))
        # write_full replaces the object in one OSD operation: readers see old or new.
        self._call(f'store attachment {name} of image {image} as', oid,
                   self.ioctx.write_full, oid, bytes(data))

    def read_attachment(self, image: str, name: str) -> bytes | None:
        oid = self._attachment_object(image, name)
        try:
            # One more byte than the limit: a longer object is read whole below.
            data = self.ioctx.read(oid, backend.MAX_ATTACHMENT_BYTES + 1)
            if len(data) > backend.MAX_ATTACHMENT_BYTES:
                data = self.ioctx.read(oid, self.ioctx.stat(oid)[0])
            return data
        except rados.ObjectNotFound:
            return None
        except rados.Error as exc:
            raise self.error(f'read attachment {name} of image {image} from', oid,
                             exc) from exc

    def list_attachments(self, image: str) -> list[str]:
        self._check_name(image)
        index = f'attachments.{image}'
        # The index, not the objects: a name is listed before its object is written.
        return sorted(name for name, _ in self._call(
            f'list attachments of image {image} in', index,
            lambda: list(self._omap_items(index))))

    def delete_attachment(self, image: str, name: str) -> None:
        oid = self._attachment_object(image, name)
        index = f'attachments.{image}'
        # The object before its name: delete_attachments still finds one a crash left.
        self._remove(oid)
        try:
            self._write_op(index, lambda op: self.ioctx.remove_omap_keys(op, (name,)))
        except rados.ObjectNotFound:
            pass
        except rados.Error as exc:
            raise self.error(f'unlist attachment {name} of image {image} in', index,
                             exc) from exc

    def delete_attachments(self, image: str) -> None:
        self._check_name(image)
        index = f'attachments.{image}'
        names = [name for name, _ in self._call(f'list attachments of image {image} in', index,
                                                lambda: list(self._omap_items(index)))]
        for name in names:
            self._remove(self._attachment_object(image, name))
        self._remove(index)

    # -- concurrency ---------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self, oid: str, shared: bool, wait: float, what: str,
              mine: str) -> Iterator[None]:
        """Hold a lock for the block. :raises: WarehouseBusy if ``what`` (the holders
        that exclude us) keep it past ``wait``; LeaseLost on leaving the block if the
        lock (``mine``) was lost while in it."""
        def busy() -> exception.StorageError:
            return exception.WarehouseBusy(f'{what} in {self._where(oid)} of the '
                                           f'{self.cluster_name} still held after {wait:g} s')
        held = _HeldLock(self, oid, shared, wait, busy, mine)
        self._held().append(held)
        try:
            yield
        finally:
            with contextlib.suppress(ValueError):
                self._held().remove(held)
            if shared:
                # Writes still in flight must land while gc is still kept out.
                with self._sessions_lock:
                    sessions = list(self._sessions)
                for session in sessions:
                    session.drain()
            held.release()
        # Reached only when the block raised nothing: it ran, but not all of it under
        # the lock, so say so.
        held.check()

    def shared_lock(self):
        return self._lock('lock.warehouse', True, self.conf.storage_rados.lock_wait,
                          'the exclusive (gc) lock', 'the shared (writer) lock')

    def exclusive_lock(self, timeout: float):
        return self._lock('lock.warehouse', False, timeout, 'shared (writer) locks',
                          'the exclusive (gc) lock')

    def image_lock(self, image: str):
        self._check_name(image)
        return self._lock(f'lock.image.{image}', False, self.conf.storage_rados.lock_wait,
                          f'the lock of image {image}', f'the lock of image {image}')
