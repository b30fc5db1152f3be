"""The default backend: pack files in a directory on a local (or shared) filesystem.

Layout under ``[storage_file] path``::

    packs/ID.pack        chunks written by one write session, back to back
    packs/ID.idx         the pack's index: chunk id, offset and length of each chunk
    images/NAME/N.json   the manifest of version N of image NAME
    staging/             packs being written, not yet visible
    locks/               flock() files

Chunks go into packs rather than one file each: creating a file per 256 KiB
chunk costs more than writing the chunk, and a warehouse of millions of small
files is slow to list, back up and fsck.

A pack becomes visible when its index appears in packs/, and the index is
renamed there only after pack and index are durable and the pack itself is in
place: a visible index always describes durable chunks, so deduplicating
against it is safe even after a crash.
"""
import contextlib
import fcntl
import hashlib
import os
import shutil
import struct
import threading
import time
import uuid
from typing import Iterator, NamedTuple

from oslo_config import cfg

from vmcloud import exception
from vmcloud.storage import backend
from vmcloud.storage import durable

_INDEX_MAGIC = b'VMCPACK1'
_INDEX_ENTRY = struct.Struct('>32sQI')  # raw sha256, offset, length


class Location(NamedTuple):
    pack: str
    offset: int
    length: int


def _encode_index(entries: list[tuple[str, int, int]]) -> bytes:
    body = _INDEX_MAGIC + struct.pack('>I', len(entries)) + b''.join(
        _INDEX_ENTRY.pack(bytes.fromhex(chunk_id), offset, length)
        for chunk_id, offset, length in entries)
    return body + hashlib.sha256(body).digest()


def _decode_index(data: bytes, where: str) -> list[tuple[str, int, int]]:
    body, checksum = data[:-32], data[-32:]
    if (not body.startswith(_INDEX_MAGIC) or hashlib.sha256(body).digest() != checksum):
        raise exception.StorageError(f'pack index {where} is corrupt')
    (count,) = struct.unpack_from('>I', body, len(_INDEX_MAGIC))
    start = len(_INDEX_MAGIC) + 4
    if len(body) != start + count * _INDEX_ENTRY.size:
        raise exception.StorageError(f'pack index {where} is corrupt: wrong length')
    return [(raw.hex(), offset, length)
            for raw, offset, length in _INDEX_ENTRY.iter_unpack(body[start:])]


class PackWriteSession(backend.WriteSession):
    """Appends chunks to a staged pack; commit() publishes it."""

    def __init__(self, store: 'FileBackend'):
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

    def _staged_path(self, suffix: str) -> str:
        return os.path.join(self._store.staging_dir, self._pack_id + suffix)

    def put_chunk(self, chunk_id: str, data: bytes) -> bool:
        if chunk_id in self._staged or self._store.has_chunk(chunk_id):
            return False
        try:
            if self._fd < 0:
                self._pack_id = uuid.uuid4().hex
                self._fd = os.open(self._staged_path('.pack'),
                                   os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            durable.write_all(self._fd, data)
        except OSError as exc:
            raise exception.StorageError(f'cannot stage chunk {chunk_id}: {exc}') from exc
        self._entries.append((chunk_id, self._offset, len(data)))
        self._staged.add(chunk_id)
        self._offset += len(data)
        self._stored_bytes += len(data)
        if self._offset >= self._store.conf.storage_file.pack_size:
            self._publish()
        return True

    def _publish(self) -> None:
        try:
            os.fdatasync(self._fd)
            os.close(self._fd)
            self._fd = -1
            index = self._staged_path('.idx')
            durable.write_synced(index, _encode_index(self._entries))
            self._store.publish_pack(self._pack_id, self._staged_path('.pack'), index,
                                     self._entries)
        except OSError as exc:
            raise exception.StorageError(f'cannot publish pack {self._pack_id}: {exc}') from exc
        self._entries = []
        self._offset = 0

    def commit(self) -> None:
        if self._fd >= 0:
            self._publish()

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            for suffix in ('.pack', '.idx'):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._staged_path(suffix))


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
            raise exception.StorageError(
                f'cannot use warehouse directory {self.root}: {exc}') from exc
        self._index: dict[str, Location] = {}
        self._loaded_packs: set[str] = set()
        self._index_loaded = False
        self._index_lock = threading.Lock()

    def __repr__(self) -> str:
        return f'FileBackend({self.root})'

    # -- the pack index --------------------------------------------------------

    def _pack_path(self, pack_id: str, suffix: str = '.pack') -> str:
        return os.path.join(self.packs_dir, pack_id + suffix)

    def _published_packs(self) -> set[str]:
        return {name[:-4] for name in os.listdir(self.packs_dir) if name.endswith('.idx')}

    def refresh(self) -> None:
        """Load the indexes of packs other processes published since we last looked."""
        with self._index_lock:
            published = self._published_packs()
            for gone in self._loaded_packs - published:
                for chunk_id in [c for c, loc in self._index.items() if loc.pack == gone]:
                    del self._index[chunk_id]
            for pack_id in sorted(published - self._loaded_packs):
                with open(self._pack_path(pack_id, '.idx'), 'rb') as f:
                    entries = _decode_index(f.read(), pack_id)
                for chunk_id, offset, length in entries:
                    self._index.setdefault(chunk_id, Location(pack_id, offset, length))
            self._loaded_packs = published
            self._index_loaded = True

    def publish_pack(self, pack_id: str, pack: str, index: str,
                     entries: list[tuple[str, int, int]]) -> None:
        """Move a durable staged pack and its index into packs/, index last."""
        os.rename(pack, self._pack_path(pack_id))
        os.rename(index, self._pack_path(pack_id, '.idx'))
        durable.fsync_dir(self.packs_dir)
        with self._index_lock:
            for chunk_id, offset, length in entries:
                self._index.setdefault(chunk_id, Location(pack_id, offset, length))
            self._loaded_packs.add(pack_id)

    def locate(self, chunk_id: str) -> Location:
        """:raises: ChunkNotFound."""
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
        return chunk_id in self._index

    def read_chunk(self, chunk_id: str) -> bytes:
        location = self.locate(chunk_id)
        try:
            fd = os.open(self._pack_path(location.pack), os.O_RDONLY)
        except FileNotFoundError as exc:
            raise exception.ChunkNotFound(chunk_id) from exc
        try:
            data = os.pread(fd, location.length, location.offset)
        finally:
            os.close(fd)
        if len(data) != location.length:
            raise exception.ChunkNotFound(chunk_id)
        return data

    def iter_chunks(self) -> Iterator[tuple[str, int]]:
        self.refresh()
        for chunk_id, location in list(self._index.items()):
            yield chunk_id, location.length

    def begin_write(self) -> backend.WriteSession:
        self.refresh()
        return PackWriteSession(self)

    def retain(self, referenced: set[str]) -> tuple[int, int]:
        """Rewrite or delete every pack holding chunks outside ``referenced``.

        A pack's live chunks are copied into a new pack, published, and only
        then is the old pack's index removed, then the pack: a crash at any
        point leaves each live chunk in at least one visible pack.
        """
        self.refresh()
        removed = freed = 0
        for pack_id in sorted(self._loaded_packs):
            with open(self._pack_path(pack_id, '.idx'), 'rb') as f:
                entries = _decode_index(f.read(), pack_id)
            # A chunk stays in this pack only if the index points here; copies
            # that concurrent writers stored twice are dropped too.
            live = {chunk_id: (offset, length) for chunk_id, offset, length in entries
                    if chunk_id in referenced and self._index[chunk_id].pack == pack_id}
            if len(live) == len(entries):
                continue
            removed += sum(1 for chunk_id, _, _ in entries if chunk_id not in referenced)
            freed += sum(length for chunk_id, _, length in entries if chunk_id not in live)
            if live:
                self._copy_to_new_pack(pack_id, live)
            os.unlink(self._pack_path(pack_id, '.idx'))
            durable.fsync_dir(self.packs_dir)
            os.unlink(self._pack_path(pack_id))
        self.refresh()
        return removed, freed

    def _copy_to_new_pack(self, pack_id: str, live: dict[str, tuple[int, int]]) -> None:
        with self._index_lock:
            for chunk_id in live:
                del self._index[chunk_id]
        session = PackWriteSession(self)
        with open(self._pack_path(pack_id), 'rb') as old:
            for chunk_id, (offset, length) in sorted(live.items(), key=lambda i: i[1]):
                session.put_chunk(chunk_id, os.pread(old.fileno(), length, offset))
        session.commit()

    def stored_chunk_bytes(self) -> int:
        return sum(os.path.getsize(os.path.join(self.packs_dir, name))
                   for name in os.listdir(self.packs_dir))

    # -- manifests -----------------------------------------------------------

    def _manifest_path(self, image: str, version: int) -> str:
        return os.path.join(self.images_dir, image, f'{version}.json')

    def create_manifest(self, image: str, version: int, data: bytes) -> None:
        image_dir = os.path.join(self.images_dir, image)
        if not os.path.isdir(image_dir):
            os.mkdir(image_dir)
            durable.fsync_dir(self.images_dir)
        durable.atomic_create(self._manifest_path(image, version), data,
                              tmp_dir=self.staging_dir)

    def read_manifest(self, image: str, version: int) -> bytes:
        try:
            with open(self._manifest_path(image, version), 'rb') as f:
                return f.read()
        except FileNotFoundError as exc:
            raise exception.ImageNotFound(image, version) from exc

    def delete_manifest(self, image: str, version: int) -> None:
        try:
            os.unlink(self._manifest_path(image, version))
        except FileNotFoundError as exc:
            raise exception.ImageNotFound(image, version) from exc
        image_dir = os.path.join(self.images_dir, image)
        durable.fsync_dir(image_dir)
        if not self.list_versions(image):
            os.rmdir(image_dir)
            durable.fsync_dir(self.images_dir)

    def list_images(self) -> list[str]:
        return sorted(name for name in os.listdir(self.images_dir)
                      if self.list_versions(name))

    def list_versions(self, image: str) -> list[int]:
        try:
            names = os.listdir(os.path.join(self.images_dir, image))
        except FileNotFoundError:
            return []
        return sorted(int(n[:-5]) for n in names if n.endswith('.json') and n[:-5].isdigit())

    # -- concurrency ---------------------------------------------------------

    @contextlib.contextmanager
    def _flock(self, name: str, mode: int, timeout: float | None = None) -> Iterator[None]:
        fd = os.open(os.path.join(self.locks_dir, name), os.O_RDWR | os.O_CREAT, 0o644)
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
        return self._flock(f'image-{image}.lock', fcntl.LOCK_EX)

    def purge_abandoned(self) -> int:
        removed = 0
        for name in os.listdir(self.staging_dir):
            path = os.path.join(self.staging_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
            removed += 1
        # A pack whose index never arrived was never visible.
        published = self._published_packs()
        for name in os.listdir(self.packs_dir):
            if name.endswith('.pack') and name[:-5] not in published:
                os.unlink(os.path.join(self.packs_dir, name))
                removed += 1
        return removed
