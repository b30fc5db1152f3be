"""The default backend: pack files in a directory on a local (or shared) filesystem.

Layout under ``[storage_file] path``::

    packs/ID.pack        chunks written by one write session, back to back
    packs/ID.idx         the pack's index: chunk id, offset and length of each chunk
    images/NAME/N.json   the manifest of version N of image NAME
    images/NAME/attachments/ATT   attachment ATT of image NAME, replaced by rename
    staging/             packs being written, not yet visible; scratch files
    locks/               flock() files

Chunks go into packs rather than one file each: creating a file per 256 KiB
chunk costs more than writing the chunk, and a warehouse of millions of small
files is slow to list, back up and fsck.

A pack becomes visible when its index appears in packs/, and the index is
renamed there only after pack and index are durable and the pack itself is in
place: a visible index always describes durable chunks, so deduplicating
against it is safe even after a crash.

Each instance keeps the indexes of the packs it has seen in memory. gc in
another process rewrites a pack by publishing a new pack with its live chunks,
then removing the old index, then the old pack; so when a cached location's
pack is gone, its index is gone too, and reloading the list of packs finds
where the chunk went. A chunk may be in two packs at once (two writers stored
it, or gc is half-way through moving it): the instance remembers every copy,
so forgetting one pack falls back to the other.

A pack whose index is unreadable or fails its checksum is skipped (its chunks
are absent) and reported by damaged(); gc leaves such a pack alone, since what
it holds cannot be known. The lock files use flock(), which excludes only
processes of one host (and, on NFS, is not to be relied on across hosts).

No deadline: on a network filesystem that hangs (a hard NFS mount whose server is
gone) a read, write or fsync blocks inside the kernel, where no thread can be
interrupted, and so does the caller. A worker with a timeout would only move the
stuck thread aside, leaving its half-done write and its lock behind it. Mount such a
store ``soft,timeo=N,retrans=M`` (the filesystem then fails the call with EIO, which
becomes a StorageError naming the path), or serve it to other hosts with the http
backend, whose every request has a deadline.
"""
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import shutil
import stat
import struct
import threading
import time
import uuid
from typing import Iterable, Iterator, NamedTuple

from oslo_config import cfg

from vmcloud import exception
from vmcloud.storage import backend
from vmcloud.storage import durable

LOG = logging.getLogger(__name__)

_INDEX_MAGIC = b'VMCPACK1'
_INDEX_ENTRY = struct.Struct('>32sQI')  # raw sha256, offset, length
_INDEX_HEADER = len(_INDEX_MAGIC) + 4
# ASCII digits only: str.isdigit() also accepts '²', which int() refuses.
_MANIFEST_NAME = re.compile(r'([1-9][0-9]{0,17})\.json')
# Each retry needs the list of packs to have changed since the last one, so
# this only bounds how many gc rewrites in a row one read will chase.
_READ_ATTEMPTS = 4
# read_chunks takes two chunks of a pack in one read if at most this many bytes lie
# between them: copying 4 KiB more costs less than another call.
_RUN_GAP = 4096


class Location(NamedTuple):
    pack: str
    offset: int
    length: int


def _os_error(action: str, path: str, exc: OSError) -> exception.StorageError:
    """A StorageError naming what failed, where, and the errno text; raise it ``from exc``."""
    return exception.StorageError(f'cannot {action} {path}: {exc.strerror or exc}')


def _encode_index(entries: list[tuple[str, int, int]]) -> bytes:
    body = _INDEX_MAGIC + struct.pack('>I', len(entries)) + b''.join(
        _INDEX_ENTRY.pack(bytes.fromhex(chunk_id), offset, length)
        for chunk_id, offset, length in entries)
    return body + hashlib.sha256(body).digest()


def _decode_index(data: bytes, where: str) -> list[tuple[str, int, int]]:
    body, checksum = data[:-32], data[-32:]
    if not body.startswith(_INDEX_MAGIC) or len(body) < _INDEX_HEADER:
        raise exception.StorageError(f'pack index {where} is corrupt: no index header')
    if hashlib.sha256(body).digest() != checksum:
        raise exception.StorageError(f'pack index {where} is corrupt: checksum mismatch')
    (count,) = struct.unpack_from('>I', body, len(_INDEX_MAGIC))
    if len(body) != _INDEX_HEADER + count * _INDEX_ENTRY.size:
        raise exception.StorageError(f'pack index {where} is corrupt: wrong length')
    return [(raw.hex(), offset, length)
            for raw, offset, length in _INDEX_ENTRY.iter_unpack(body[_INDEX_HEADER:])]


class PackWriteSession(backend.WriteSession):
    """Appends chunks to a staged pack; commit() publishes it.

    missing() is the default, a lookup in this instance's index: no batching.
    """

    def __init__(self, store: 'FileBackend'):
        super().__init__(store)
        self._store = store
        self._pack_id = ''
        self._fd = -1
        self._offset = 0
        self._entries: list[tuple[str, int, int]] = []
        self._staged: set[str] = set()
        self._stored_bytes = 0

    @property
    def stored_bytes(self) -> int:
        return self._stored_bytes

    def has_put(self, chunk_id: str) -> bool:
        return chunk_id in self._staged

    def _staged_path(self, suffix: str) -> str:
        return os.path.join(self._store.staging_dir, self._pack_id + suffix)

    def put_chunk(self, chunk_id: str, data: bytes) -> None:
        if chunk_id in self._staged:
            return
        if self._fd < 0:
            self._pack_id = uuid.uuid4().hex
            try:
                self._fd = os.open(self._staged_path('.pack'),
                                   os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except OSError as exc:
                raise _os_error('create pack', self._staged_path('.pack'), exc) from exc
        try:
            durable.write_all(self._fd, data)
        except OSError as exc:
            raise _os_error(f'stage chunk {chunk_id} in', self._staged_path('.pack'),
                            exc) from exc
        self._entries.append((chunk_id, self._offset, len(data)))
        self._staged.add(chunk_id)
        self._offset += len(data)
        self._stored_bytes += len(data)
        if self._offset >= self._store.conf.storage_file.pack_size:
            self._publish()

    def _publish(self) -> None:
        path = self._staged_path('.pack')
        try:
            os.fdatasync(self._fd)
            os.close(self._fd)
            self._fd = -1
            path = self._staged_path('.idx')
            durable.write_synced(path, _encode_index(self._entries))
            path = self._store.packs_dir
            self._store.publish_pack(self._pack_id, self._staged_path('.pack'),
                                     self._staged_path('.idx'), self._entries)
        except OSError as exc:
            raise _os_error(f'publish pack {self._pack_id} at', path, exc) from exc
        self._pack_id = ''
        self._entries = []
        self._offset = 0

    def commit(self) -> None:
        if self._fd >= 0:
            self._publish()

    def abort(self) -> None:
        # Whatever cannot be removed here is in staging/, which gc purges.
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        if self._pack_id:
            for suffix in ('.pack', '.idx'):
                with contextlib.suppress(OSError):
                    os.unlink(self._staged_path(suffix))
            self._pack_id = ''


class FileBackend(backend.Backend):
    OPTION_GROUP = cfg.OptGroup('storage_file', title='Local-directory warehouse backend')
    OPTIONS = [
        cfg.StrOpt('path', default='$state_path/warehouse',
                   help='Directory holding the warehouse packs and manifests.'),
        cfg.IntOpt('pack_size', default=128 * 1024 ** 2, min=1,
                   help='A write session starts a new pack file once its pack holds '
                        'this many bytes. gc rewrites a pack to free its unused chunks, '
                        'so smaller packs make gc cheaper and imports slightly slower.'),
    ]
    CAPABILITIES = backend.Capabilities.SCRATCH_SPACE

    def __init__(self, conf: cfg.ConfigOpts):
        super().__init__(conf)
        self.root = os.path.abspath(conf.storage_file.path)
        self.packs_dir = os.path.join(self.root, 'packs')
        self.images_dir = os.path.join(self.root, 'images')
        self.staging_dir = os.path.join(self.root, 'staging')
        self.locks_dir = os.path.join(self.root, 'locks')
        try:
            for directory in (self.packs_dir, self.images_dir, self.staging_dir,
                              self.locks_dir):
                os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise _os_error('use warehouse directory', self.root, exc) from exc
        # Guarded by _index_lock: chunk id -> its first known copy, and the others.
        self._index: dict[str, Location] = {}
        self._copies: dict[str, list[Location]] = {}
        self._members: dict[str, list[str]] = {}
        self._damaged_packs: dict[str, str] = {}
        self._index_loaded = False
        self._index_lock = threading.Lock()

    def __repr__(self) -> str:
        return f'FileBackend({self.root})'

    def _relative(self, path: str) -> str:
        return os.path.relpath(path, self.root)

    # -- the pack index --------------------------------------------------------

    def _pack_path(self, pack_id: str, suffix: str = '.pack') -> str:
        # Not os.path.join: this is on every chunk read, and a pack id is a plain name.
        return f'{self.packs_dir}/{pack_id}{suffix}'

    def _published_packs(self) -> set[str]:
        try:
            names = os.listdir(self.packs_dir)
        except OSError as exc:
            raise _os_error('list packs in', self.packs_dir, exc) from exc
        return {name[:-4] for name in names if name.endswith('.idx')}

    def _read_index(self, pack_id: str) -> list[tuple[str, int, int]] | None:
        """The entries of a published pack; None if it vanished or is damaged (then noted)."""
        path = self._pack_path(pack_id, '.idx')
        where = self._relative(path)
        try:
            with open(path, 'rb') as f:
                entries = _decode_index(f.read(), where)
        except FileNotFoundError:
            self._damaged_packs.pop(pack_id, None)
            return None
        except OSError as exc:
            problem = f'pack index {where} is unreadable: {exc.strerror or exc}'
        except exception.StorageError as exc:
            problem = str(exc)
        else:
            self._damaged_packs.pop(pack_id, None)
            return entries
        if self._damaged_packs.get(pack_id) != problem:
            LOG.warning('skipping pack %s: %s', pack_id, problem)
        self._damaged_packs[pack_id] = problem
        return None

    def _add_pack(self, pack_id: str, entries: list[tuple[str, int, int]]) -> None:
        if pack_id in self._members:
            return  # another thread's refresh saw it between publish and here
        members = []
        for chunk_id, offset, length in entries:
            location = Location(pack_id, offset, length)
            if self._index.setdefault(chunk_id, location) is not location:
                self._copies.setdefault(chunk_id, []).append(location)
            members.append(chunk_id)
        self._members[pack_id] = members

    def _forget_pack(self, pack_id: str) -> None:
        for chunk_id in self._members.pop(pack_id, ()):
            copies = [loc for loc in [self._index.get(chunk_id), *self._copies.pop(chunk_id, ())]
                      if loc is not None and loc.pack != pack_id]
            if copies:
                self._index[chunk_id] = copies[0]
                if len(copies) > 1:
                    self._copies[chunk_id] = copies[1:]
            else:
                self._index.pop(chunk_id, None)

    def refresh(self) -> bool:
        """Catch up with the packs other processes published or removed since we last looked.

        :returns: whether the chunks this instance knows changed.
        :raises: StorageError if the pack directory cannot be listed.
        """
        with self._index_lock:
            published = self._published_packs()
            gone = set(self._members) - published
            for pack_id in gone:
                self._forget_pack(pack_id)
            added = False
            # Damaged packs are tried again each time: an operator may restore them.
            for pack_id in sorted(published - set(self._members)):
                entries = self._read_index(pack_id)
                if entries is not None:
                    self._add_pack(pack_id, entries)
                    added = True
            for pack_id in set(self._damaged_packs) - published:
                del self._damaged_packs[pack_id]
            changed = bool(gone) or added or not self._index_loaded
            self._index_loaded = True
            return changed

    def _reread_indexes(self) -> dict[str, list[tuple[str, int, int]]]:
        """Read every loaded index again; forget each pack whose index is now gone or damaged.

        Damage since an index was loaded counts too: those chunks are absent
        from now on, like any skipped pack's.

        :returns: the entries of every pack still readable.
        """
        readable = {}
        with self._index_lock:
            for pack_id in list(self._members):
                entries = self._read_index(pack_id)
                if entries is None:
                    self._forget_pack(pack_id)
                else:
                    readable[pack_id] = entries
        return readable

    def publish_pack(self, pack_id: str, pack: str, index: str,
                     entries: list[tuple[str, int, int]]) -> None:
        """Move a durable staged pack and its index into packs/, index last.

        :raises: OSError.
        """
        os.rename(pack, self._pack_path(pack_id))
        os.rename(index, self._pack_path(pack_id, '.idx'))
        durable.fsync_dir(self.packs_dir)
        with self._index_lock:
            self._add_pack(pack_id, entries)

    def locate(self, chunk_id: str) -> Location:
        """Where a chunk is now, as far as this instance knows. :raises: ChunkNotFound."""
        location = self._index.get(chunk_id)
        if location is None:
            self.refresh()
            location = self._index.get(chunk_id)
            if location is None:
                raise exception.ChunkNotFound(chunk_id)
        return location

    # -- chunks --------------------------------------------------------------

    def has_chunk(self, chunk_id: str) -> bool:
        if not self._index_loaded:
            self.refresh()
        location = self._index.get(chunk_id)
        if location is None:
            return False
        # A stat per hit, not a listing per miss: misses are every new chunk of
        # an import, and a stale miss only stores a duplicate.
        if os.path.exists(self._pack_path(location.pack, '.idx')):
            return True
        self.refresh()
        return chunk_id in self._index

    def _read_at(self, location: Location) -> bytes | None:
        """The bytes at ``location``; None if the pack is gone or too short for them."""
        path = self._pack_path(location.pack)
        try:
            # Once open, the pack stays readable even if gc unlinks it now.
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _os_error('open pack', path, exc) from exc
        try:
            data = os.pread(fd, location.length, location.offset)
        except OSError as exc:
            raise _os_error(f'read {location.length} bytes at {location.offset} of',
                            path, exc) from exc
        finally:
            os.close(fd)
        return data if len(data) == location.length else None

    def _places(self, chunk_id: str) -> list[Location]:
        """Every copy of a chunk this instance knows, the one to read first first.

        Without the lock, so reads do not wait for a refresh: a location read
        while another thread changes the index is at worst stale, and a stale
        one names a pack that is gone (pack ids are never reused) or still right.
        """
        first = self._index.get(chunk_id)
        return [] if first is None else [first, *self._copies.get(chunk_id, ())]

    def read_chunk(self, chunk_id: str) -> bytes:
        for _ in range(_READ_ATTEMPTS):
            places = self._places(chunk_id)
            # A copy whose pack is lost, short or unreadable falls back to the next.
            unreadable = None
            for location in places:
                try:
                    data = self._read_at(location)
                except exception.StorageError as exc:
                    unreadable = exc
                    continue
                if data is not None:
                    return data
            if unreadable is not None:
                raise unreadable  # stored, but no copy can be read
            # Not known, or where we knew it is gone: gc may have moved it to a
            # pack published since. It is missing only if no pack came or went,
            # here or in another thread's refresh since our attempt.
            if not self.refresh() and self._places(chunk_id) == places:
                break
        raise exception.ChunkNotFound(chunk_id)

    def read_chunks(self, chunk_ids: Iterable[str]) -> dict[str, bytes | memoryview]:
        """Each pack opened once, and each run of chunks that lie side by side in it
        (a version's chunks as one import or snapshot wrote them) read in one call.
        A chunk not read so (its pack gone, short or unreadable) is read by read_chunk,
        which falls back to another copy, looks for where gc moved it, or says why it
        cannot be read."""
        if not self._index_loaded:
            self.refresh()
        by_pack: dict[str | None, list[tuple[Location, str]]] = {}  # None: not known
        for chunk_id in dict.fromkeys(chunk_ids):
            location = self._index.get(chunk_id)
            by_pack.setdefault(None if location is None else location.pack, []).append(
                (location, chunk_id))
        found: dict[str, bytes | memoryview] = {}
        for pack_id, wanted in by_pack.items():
            if pack_id is not None:
                found.update(self._read_runs(pack_id, sorted(wanted)))
            for _, chunk_id in wanted:
                if chunk_id not in found:
                    found[chunk_id] = self.read_chunk(chunk_id)
        return found

    def _read_runs(self, pack_id: str, wanted: list[tuple[Location, str]]
                   ) -> dict[str, memoryview]:
        """What pack ``pack_id`` holds of ``wanted`` (sorted by offset), a run of
        neighbours a read: none if it cannot be opened, none past a read that fails."""
        found: dict[str, memoryview] = {}
        try:
            fd = os.open(self._pack_path(pack_id), os.O_RDONLY)
        except OSError:
            return found
        try:
            first = 0
            while first < len(wanted):
                last = first
                while last + 1 < len(wanted) and 0 <= (
                        wanted[last + 1][0].offset - wanted[last][0].offset
                        - wanted[last][0].length) <= _RUN_GAP:
                    last += 1
                start = wanted[first][0].offset
                run = memoryview(os.pread(
                    fd, wanted[last][0].offset + wanted[last][0].length - start, start))
                for location, chunk_id in wanted[first:last + 1]:
                    piece = run[location.offset - start:
                                location.offset - start + location.length]
                    if len(piece) == location.length:  # else the pack is short
                        found[chunk_id] = piece
                first = last + 1
        except OSError:
            return found  # read_chunk reads the rest, or says why it cannot
        finally:
            os.close(fd)
        return found

    def iter_chunks(self) -> Iterator[tuple[str, int]]:
        self.refresh()
        with self._index_lock:
            chunks = [(chunk_id, location.length) for chunk_id, location in self._index.items()]
        yield from chunks

    def begin_write(self) -> backend.WriteSession:
        # Under the writer's shared lock no gc runs, so after this refresh every
        # chunk the index knows stays stored until the session ends.
        self.refresh()
        return PackWriteSession(self)

    def retain(self, referenced: set[str]) -> tuple[int, int]:
        """Rewrite or delete every pack holding chunks outside ``referenced``.

        A pack's live chunks are copied into a new pack, published, and only
        then is the old pack's index removed, then the pack: a crash at any
        point leaves each live chunk in at least one visible pack, and a reader
        in another process that finds the old pack gone finds the new one.
        A pack whose index is damaged is left alone: what it holds is unknown.
        Nothing is removed while an image directory cannot be listed.
        """
        hidden = [problem for name in self._image_names()
                  if (problem := self._image_dir_problem(name, strays=False)) is not None]
        if hidden:
            # Versions nobody can list name chunks nobody can know: freeing any
            # could lose a version that comes back once its directory is readable.
            raise exception.StorageError(
                f"gc refused: {'; '.join(sorted(hidden))}; the chunks its versions "
                'need are unknown, so no chunk was freed')
        self.refresh()
        removed = freed = 0
        # Every index first: a copy is dropped below only for a readable twin.
        for pack_id, entries in sorted(self._reread_indexes().items()):
            problem = self._pack_file_problem(pack_id, entries)
            if problem is not None:
                # Its live chunks cannot be copied; keep what is left for repair.
                LOG.warning('gc leaves pack %s alone: %s', pack_id, problem)
                continue
            # A chunk stays in this pack unless it is read first from another
            # pack that holds it: copies concurrent writers stored twice are
            # dropped too, but never for a twin that is lost or truncated.
            live = {chunk_id: (offset, length) for chunk_id, offset, length in entries
                    if chunk_id in referenced and not self._read_elsewhere(chunk_id, pack_id)}
            if len(live) == len(entries):
                continue
            removed += sum(1 for chunk_id, _, _ in entries if chunk_id not in referenced)
            freed += sum(length for chunk_id, _, length in entries if chunk_id not in live)
            movers = self._rehome_elsewhere(pack_id, live)
            if movers:
                self._copy_to_new_pack(pack_id, movers)
            self._remove_pack(pack_id)
        self.refresh()
        return removed, freed

    def _read_elsewhere(self, chunk_id: str, pack_id: str) -> bool:
        """Whether the copy read first is in another pack, one that holds it.

        Not one that is lost or truncated: dropping this copy would leave none.
        """
        location = self._index.get(chunk_id)
        return location is not None and location.pack != pack_id and self._holds(location)

    def _pack_file_problem(self, pack_id: str, entries: list[tuple[str, int, int]]
                           ) -> str | None:
        """Why the pack file cannot hold what its index lists, or None."""
        path = self._pack_path(pack_id)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            return (f'pack {self._relative(path)} is missing; its index lists '
                    f'{len(entries)} chunks')
        except OSError as exc:
            return f'pack {self._relative(path)} is unreadable: {exc.strerror or exc}'
        needed = max((offset + length for _, offset, length in entries), default=0)
        if size < needed:
            return f'pack {self._relative(path)} is truncated: {size} of {needed} bytes'
        return None

    def _rehome_elsewhere(self, pack_id: str, live: dict[str, tuple[int, int]]
                          ) -> dict[str, tuple[int, int]]:
        """Make another visible copy the home of each live chunk that has one.

        Such copies exist after a gc was killed between publishing its new pack
        and removing the old one; copying those chunks again would keep both.

        :returns: the live chunks that have no other copy and must be copied.
        """
        movers = {}
        with self._index_lock:
            for chunk_id, place in live.items():
                copies = self._copies.get(chunk_id, [])
                other = next((loc for loc in copies
                              if loc.pack != pack_id and self._holds(loc)), None)
                if other is None:
                    movers[chunk_id] = place
                else:
                    copies.remove(other)
                    copies.append(self._index[chunk_id])
                    self._index[chunk_id] = other
        return movers

    def _holds(self, location: Location) -> bool:
        """Whether the pack file at ``location`` is long enough to hold the chunk."""
        try:
            size = os.stat(self._pack_path(location.pack)).st_size
        except OSError:
            return False
        return size >= location.offset + location.length

    def _copy_to_new_pack(self, pack_id: str, live: dict[str, tuple[int, int]]) -> None:
        session = PackWriteSession(self)
        path = self._pack_path(pack_id)
        try:
            with open(path, 'rb') as old:
                for chunk_id, (offset, length) in sorted(live.items(), key=lambda i: i[1]):
                    session.put_chunk(chunk_id, os.pread(old.fileno(), length, offset))
            session.commit()
        except OSError as exc:
            session.abort()
            raise _os_error('copy live chunks out of', path, exc) from exc
        except BaseException:
            session.abort()
            raise

    def _remove_pack(self, pack_id: str) -> None:
        # The index goes first: a pack without one is invisible, and a reader
        # that finds the pack gone must find its index gone too.
        path = self._pack_path(pack_id, '.idx')
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            durable.fsync_dir(self.packs_dir)
            with self._index_lock:
                self._forget_pack(pack_id)
            path = self._pack_path(pack_id)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        except OSError as exc:
            raise _os_error('remove pack file', path, exc) from exc

    def stored_chunk_bytes(self) -> int:
        total = 0
        try:
            names = os.listdir(self.packs_dir)
        except OSError as exc:
            raise _os_error('list packs in', self.packs_dir, exc) from exc
        for name in names:
            # A concurrent gc may remove it between the listing and the stat.
            with contextlib.suppress(FileNotFoundError):
                total += os.path.getsize(os.path.join(self.packs_dir, name))
        return total

    def damaged(self) -> list[str]:
        self.refresh()
        self._reread_indexes()
        with self._index_lock:
            # A lost or truncated pack is not skipped (its index is good), so it
            # is not listed: reading its chunks fails, and verify names them.
            problems = list(self._damaged_packs.values())
        for name in self._image_names():
            problem = self._image_dir_problem(name)
            if problem is not None:
                problems.append(problem)
        return sorted(problems)

    def scratch_dir(self) -> str:
        return self.staging_dir

    # -- manifests -----------------------------------------------------------

    def _image_dir(self, image: str) -> str:
        # The Warehouse validates names; this only keeps a bad one inside images/.
        if not image or image in ('.', '..') or '/' in image or '\0' in image:
            raise exception.InvalidName(f'invalid image name {image!r}')
        return os.path.join(self.images_dir, image)

    def _manifest_path(self, image: str, version: int) -> str:
        return os.path.join(self._image_dir(image), f'{version}.json')

    def create_manifest(self, image: str, version: int, data: bytes) -> None:
        image_dir = self._image_dir(image)
        path = self._manifest_path(image, version)
        made_dir = False
        try:
            try:
                os.mkdir(image_dir)
                made_dir = True
            except FileExistsError:
                pass  # the usual case; a file of that name fails below
            if made_dir:
                durable.fsync_dir(self.images_dir)
            try:
                durable.atomic_create(path, data, tmp_dir=self.staging_dir)
            except FileExistsError as exc:
                raise exception.VersionExists(image, version) from exc
        except OSError as exc:
            if made_dir:
                # An empty image directory would outlive the failed version.
                with contextlib.suppress(OSError):
                    os.rmdir(image_dir)
                    durable.fsync_dir(self.images_dir)
            raise _os_error(f'store manifest {image}:{version} as', path, exc) from exc

    def _read_manifest(self, image: str, version: int, length: int = -1) -> bytes:
        path = self._manifest_path(image, version)
        try:
            with open(path, 'rb') as f:
                return f.read(length)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise exception.ImageNotFound(image, version) from exc
        except IsADirectoryError as exc:
            raise exception.CorruptManifest(
                f'manifest {image}:{version} is unreadable: '
                f'{self._relative(path)} is a directory') from exc
        except OSError as exc:
            raise exception.CorruptManifest(
                f'manifest {image}:{version} is unreadable: {self._relative(path)}: '
                f'{exc.strerror or exc}') from exc

    def read_manifest(self, image: str, version: int) -> bytes:
        return self._read_manifest(image, version)

    def read_manifest_prefix(self, image: str, version: int, length: int) -> bytes:
        return self._read_manifest(image, version, max(0, length))

    def delete_manifest(self, image: str, version: int) -> None:
        image_dir = self._image_dir(image)
        path = self._manifest_path(image, version)
        try:
            try:
                os.unlink(path)
            except IsADirectoryError:
                # A directory where the manifest should be: the version is
                # damaged, and removing it must still be possible. Only an empty
                # one, though: what is inside is not ours to delete.
                os.rmdir(path)
            durable.fsync_dir(image_dir)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise exception.ImageNotFound(image, version) from exc
        except OSError as exc:
            raise _os_error(f'delete manifest {image}:{version} at', path, exc) from exc
        if not self.list_versions(image):
            try:
                os.rmdir(image_dir)
                durable.fsync_dir(self.images_dir)
            except OSError as exc:
                # Files that are not manifests keep it; it lists as no image.
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                    raise _os_error('remove image directory', image_dir, exc) from exc

    def _versions(self, image_dir: str) -> list[int]:
        """:raises: OSError."""
        matches = map(_MANIFEST_NAME.fullmatch, os.listdir(image_dir))
        return sorted(int(match[1]) for match in matches if match)

    def _image_dir_problem(self, name: str, strays: bool = True) -> str | None:
        """Why images/NAME cannot be listed, or None.

        A stray file there holds no versions: with ``strays=False`` it is no problem.
        """
        path = os.path.join(self.images_dir, name)
        try:
            self._versions(path)
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            return f'{self._relative(path)} is not a directory of manifests' if strays else None
        except OSError as exc:
            return f'image directory {self._relative(path)} is unreadable: {exc.strerror}'
        return None

    def _image_names(self) -> list[str]:
        """Every entry of images/, image or not. :raises: StorageError."""
        try:
            return os.listdir(self.images_dir)
        except OSError as exc:
            raise _os_error('list images in', self.images_dir, exc) from exc

    def list_images(self) -> list[str]:
        images = []
        for name in self._image_names():
            try:
                if self._versions(os.path.join(self.images_dir, name)):
                    images.append(name)
            except OSError:
                continue  # damaged() names it
        return sorted(images)

    def list_versions(self, image: str) -> list[int]:
        image_dir = self._image_dir(image)
        try:
            return self._versions(image_dir)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise _os_error(f'list versions of image {image} in', image_dir, exc) from exc

    def manifests_stored_bytes(self) -> int:
        # The sizes, not the contents: a manifest of a 4 TiB image is 84 MB.
        total = 0
        for image in self.list_images():
            for version in self.list_versions(image):
                with contextlib.suppress(OSError):
                    status = os.stat(self._manifest_path(image, version))
                    if stat.S_ISREG(status.st_mode):
                        total += status.st_size
        return total

    # -- attachments ---------------------------------------------------------

    def _attachments_dir(self, image: str) -> str:
        return os.path.join(self._image_dir(image), 'attachments')

    def _attachment_path(self, image: str, name: str) -> str:
        if not name or name in ('.', '..') or '/' in name or '\0' in name:
            raise exception.InvalidName(f'invalid attachment name {name!r}')
        return os.path.join(self._attachments_dir(image), name)

    def write_attachment(self, image: str, name: str, data: bytes) -> None:
        path = self._attachment_path(image, name)
        directory = os.path.dirname(path)
        # The temp file is in staging/, so one a crash leaves is purged by gc.
        tmp = durable.temp_name(self.staging_dir, '.attachment-')
        try:
            try:
                os.mkdir(directory)
                durable.fsync_dir(os.path.dirname(directory))
            except FileExistsError:
                pass
            except (FileNotFoundError, NotADirectoryError) as exc:
                raise exception.ImageNotFound(image) from exc
            durable.write_synced(tmp, data)
            # rename() replaces in one step: a reader opens the old file or the new one.
            os.replace(tmp, path)
            durable.fsync_dir(directory)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise _os_error(f'store attachment {name} of image {image} as', path,
                            exc) from exc

    def read_attachment(self, image: str, name: str) -> bytes | None:
        path = self._attachment_path(image, name)
        try:
            with open(path, 'rb') as f:
                return f.read()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise _os_error(f'read attachment {name} of image {image} at', path,
                            exc) from exc

    def list_attachments(self, image: str) -> list[str]:
        directory = self._attachments_dir(image)
        try:
            # Only whole attachments are here: each is staged in staging/ and renamed in.
            return sorted(os.listdir(directory))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise _os_error(f'list attachments of image {image} in', directory, exc) from exc

    def delete_attachment(self, image: str, name: str) -> None:
        path = self._attachment_path(image, name)
        try:
            os.unlink(path)
            durable.fsync_dir(os.path.dirname(path))
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            raise _os_error(f'remove attachment {name} of image {image} at', path,
                            exc) from exc

    def delete_attachments(self, image: str) -> None:
        directory = self._attachments_dir(image)
        try:
            names = os.listdir(directory)
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            raise _os_error(f'list attachments of image {image} in', directory, exc) from exc
        path = directory
        try:
            for name in names:
                path = os.path.join(directory, name)
                os.unlink(path)
            path = directory
            os.rmdir(directory)
            durable.fsync_dir(os.path.dirname(directory))
        except OSError as exc:
            raise _os_error(f'remove an attachment of image {image} at', path, exc) from exc

    # -- concurrency ---------------------------------------------------------

    @contextlib.contextmanager
    def _flock(self, name: str, mode: int, timeout: float | None = None) -> Iterator[None]:
        path = os.path.join(self.locks_dir, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _os_error('open lock file', path, exc) from exc
        try:
            if timeout is None:
                fcntl.flock(fd, mode)
            else:
                deadline = time.monotonic() + timeout
                while True:
                    try:
                        fcntl.flock(fd, mode | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            raise exception.WarehouseBusy(
                                f'warehouse {self.root} still has writes in progress '
                                f'after {timeout:g} s') from None
                        time.sleep(0.05)
            yield
        finally:
            os.close(fd)

    def shared_lock(self):
        return self._flock('warehouse.lock', fcntl.LOCK_SH)

    def exclusive_lock(self, timeout: float):
        return self._flock('warehouse.lock', fcntl.LOCK_EX, timeout)

    def image_lock(self, image: str):
        self._image_dir(image)
        return self._flock(f'image-{image}.lock', fcntl.LOCK_EX)

    def purge_abandoned(self) -> int:
        removed = 0
        try:
            for name in os.listdir(self.staging_dir):
                path = os.path.join(self.staging_dir, name)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
                removed += 1
            # A pack whose index never arrived was never visible; one whose
            # index is damaged is kept, as retain() keeps it.
            published = self._published_packs()
            for name in os.listdir(self.packs_dir):
                if name.endswith('.pack') and name[:-5] not in published:
                    os.unlink(os.path.join(self.packs_dir, name))
                    removed += 1
        except OSError as exc:
            raise _os_error('purge abandoned files in', self.root, exc) from exc
        return removed
