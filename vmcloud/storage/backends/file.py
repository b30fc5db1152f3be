"""The default backend: a directory on a local (or shared) filesystem.

Layout under ``[storage_file] path``::

    chunks/ab/abcdef...      one file per chunk, named by its sha256
    images/NAME/N.json       the manifest of version N of image NAME
    staging/SESSION/...      chunks of writes not yet committed
    locks/                   flock() files

A write session stages its chunks, makes them durable with one syncfs(), and
only then renames them into chunks/: a chunk under chunks/ is always durable,
so deduplicating against it is safe even after a crash.
"""
import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from typing import Iterator

from oslo_config import cfg

from vmcloud import exception
from vmcloud.storage import backend
from vmcloud.storage import durable

_FANOUT = [f'{i:02x}' for i in range(256)]


class FileWriteSession(backend.WriteSession):
    def __init__(self, store: 'FileBackend'):
        self._store = store
        self._dir = tempfile.mkdtemp(dir=store.staging_dir)
        self._staged: dict[str, str] = {}
        self._stored_bytes = 0

    @property
    def stored_bytes(self) -> int:
        return self._stored_bytes

    def put_chunk(self, chunk_id: str, data: bytes) -> bool:
        if chunk_id in self._staged or self._store.has_chunk(chunk_id):
            return False
        path = os.path.join(self._dir, chunk_id)
        try:
            durable.write_file(path, data)
        except OSError as exc:
            raise exception.StorageError(f'cannot stage chunk {chunk_id}: {exc}') from exc
        self._staged[chunk_id] = path
        self._stored_bytes += len(data)
        return True

    def commit(self) -> None:
        root = self._store.root
        try:
            if self._staged:
                durable.sync_filesystem(root)
                for chunk_id, path in self._staged.items():
                    os.rename(path, self._store.chunk_path(chunk_id))
                durable.sync_filesystem(root)
        except OSError as exc:
            raise exception.StorageError(f'cannot commit chunks under {root}: {exc}') from exc
        self._staged.clear()
        shutil.rmtree(self._dir, ignore_errors=True)

    def abort(self) -> None:
        self._staged.clear()
        shutil.rmtree(self._dir, ignore_errors=True)


class FileBackend(backend.Backend):
    OPTION_GROUP = cfg.OptGroup('storage_file', title='Local-directory warehouse backend')
    OPTIONS = [
        cfg.StrOpt('path', default='$state_path/warehouse',
                   help='Directory holding the warehouse chunks and manifests.'),
    ]

    def __init__(self, conf: cfg.ConfigOpts):
        super().__init__(conf)
        self.root = os.path.abspath(conf.storage_file.path)
        self.chunks_dir = os.path.join(self.root, 'chunks')
        self.images_dir = os.path.join(self.root, 'images')
        self.staging_dir = os.path.join(self.root, 'staging')
        self.locks_dir = os.path.join(self.root, 'locks')
        try:
            for directory in (self.images_dir, self.staging_dir, self.locks_dir):
                os.makedirs(directory, exist_ok=True)
            for prefix in _FANOUT:
                os.makedirs(os.path.join(self.chunks_dir, prefix), exist_ok=True)
        except OSError as exc:
            raise exception.StorageError(
                f'cannot use warehouse directory {self.root}: {exc}') from exc

    def __repr__(self) -> str:
        return f'FileBackend({self.root})'

    # -- chunks --------------------------------------------------------------

    def chunk_path(self, chunk_id: str) -> str:
        return os.path.join(self.chunks_dir, chunk_id[:2], chunk_id)

    def has_chunk(self, chunk_id: str) -> bool:
        return os.path.exists(self.chunk_path(chunk_id))

    def read_chunk(self, chunk_id: str) -> bytes:
        try:
            with open(self.chunk_path(chunk_id), 'rb') as f:
                return f.read()
        except FileNotFoundError as exc:
            raise exception.ChunkNotFound(chunk_id) from exc

    def iter_chunks(self) -> Iterator[tuple[str, int]]:
        for prefix in _FANOUT:
            with os.scandir(os.path.join(self.chunks_dir, prefix)) as entries:
                for entry in entries:
                    yield entry.name, entry.stat().st_size

    def delete_chunk(self, chunk_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.chunk_path(chunk_id))

    def begin_write(self) -> backend.WriteSession:
        return FileWriteSession(self)

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
        for entry in os.listdir(self.staging_dir):
            path = os.path.join(self.staging_dir, entry)
            if os.path.isdir(path):
                removed += len(os.listdir(path))
                shutil.rmtree(path)
            else:
                os.unlink(path)
                removed += 1
        return removed
