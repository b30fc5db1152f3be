"""Boot artifacts (kernel, initrd): warehouse images, pinned by the dispatcher, cached per node.

A deployment's ``boot`` names each artifact either as an absolute path, a file
that exists on every compute node (one machine, the all-in-one mode), or as a
warehouse image ``NAME[:VERSION]``. The dispatcher pins an image to the
``NAME:VERSION`` it names at deploy time (``pinned``), so every instance and
every rebuild boots the same bytes whatever is imported later.

A compute node exports each pinned version once into ``[compute]
boot_artifacts_path`` (``BootArtifacts.path_of``). The file's name holds the
version's identity, so a version deleted and imported again under the same
``NAME:VERSION`` gets a file of its own. A file appears under its name whole
(exported into a staging directory, fsynced, renamed): a crash leaves at most
a staging directory, which the next fetch of that artifact removes. A file is
checked against the version's size before every reuse.

A node of the peer exchange reads an artifact chunk by chunk through the exchange
(``BootArtifacts.read_chunks_with``): a chunk's owners first, the warehouse last, as
its mirrors read disks (the compute manager reads a chunk it owns first through its
node's own cache). While a chunk's primary owner is up, K nodes booting one kernel cost
the warehouse one read of each chunk, not K. Without peers the warehouse exports the
artifact whole.
"""
import contextlib
import logging
import os
import shutil
import stat
import time
from typing import Callable, Iterator

from vmcloud import exception
from vmcloud.nbd import statelock
from vmcloud.storage import delta
from vmcloud.storage import durable
from vmcloud.storage import manifest as manifest_mod
from vmcloud.storage import warehouse as warehouse_mod

LOG = logging.getLogger(__name__)

ARTIFACTS = ('kernel', 'initrd')

# How often a build waiting for another build's fetch of the same artifact looks again.
_LOCK_POLL = 0.05


def is_path(value: str) -> bool:
    """Whether a boot artifact is named as a file on the node rather than as an image."""
    return value.startswith('/')


def pinned(boot: dict, lookup: Callable[[str], manifest_mod.Manifest]) -> dict:
    """``boot`` with each artifact named as an image pinned to the version it names now.

    :param lookup: ``Warehouse.lookup``.
    :raises: InvalidRequest for an artifact that is neither an absolute path nor an
        image name; ImageNotFound for an image (or version) the warehouse lacks.
    """
    result = dict(boot)
    for what in ARTIFACTS:
        value = boot.get(what)
        if value is None:
            continue
        if not isinstance(value, str):
            raise exception.InvalidRequest(f'boot {what} must be a string, not {value!r}')
        if is_path(value):
            continue
        try:
            manifest_mod.VersionRef.parse(value)
        except exception.InvalidName as exc:
            raise exception.InvalidRequest(
                f'boot {what} {value!r} is neither an absolute path nor a warehouse image '
                f'NAME[:VERSION]: {exc}') from exc
        result[what] = str(lookup(value).ref)
    return result


class BootArtifacts:
    """The node's copies of boot artifacts; safe for any number of threads and processes."""

    def __init__(self, path: str, warehouse: warehouse_mod.Warehouse, lock_timeout: float):
        """:param lock_timeout: seconds a build waits for another build on the node that
            is fetching the same artifact."""
        self.path = path
        self.warehouse = warehouse
        self.lock_timeout = lock_timeout
        self._read_chunk: Callable[[str], bytes] | None = None

    def read_chunks_with(self, read_chunk: Callable[[str], bytes] | None) -> None:
        """Fetch the artifacts from now on chunk by chunk with ``read_chunk(chunk_id)``,
        which checks each chunk against its id and raises a StorageError (or OSError)
        when it cannot be had: the peer exchange's ``fetch``. None: the warehouse
        exports each artifact whole (the default)."""
        self._read_chunk = read_chunk

    def path_of(self, ref: str) -> str:
        """A local file holding the boot artifact ``ref``: an absolute path as it is, a
        pinned ``NAME:VERSION`` exported from the warehouse unless the node has it.

        :raises: BootArtifactError naming the artifact: no version given, not in the
            warehouse, or it cannot be fetched or written here.
        """
        if is_path(ref):
            return ref
        try:
            image, version = manifest_mod.VersionRef.parse(ref)
        except exception.InvalidName as exc:
            raise exception.BootArtifactError(f'boot artifact {ref!r}: {exc}') from exc
        if version is None:
            raise exception.BootArtifactError(
                f'boot artifact {ref} names no version: the dispatcher pins each one')
        try:
            manifest = self.warehouse.manifest(image, version)
        except exception.StorageError as exc:
            raise exception.BootArtifactError(f'boot artifact {ref}: {exc}') from exc
        leaf = f'{image}@{version}-{manifest.identity()}'
        target = os.path.join(self.path, leaf)
        try:
            if _size(target) == manifest.size:
                return target
            os.makedirs(self.path, exist_ok=True)
            with self._locked(ref, os.path.join(self.path, f'.{leaf}.lock')):
                # Another build may have fetched it while this one waited.
                size = _size(target)
                if size != manifest.size:
                    if size is not None:
                        LOG.warning('boot artifact %s: %s is not a file of %d bytes (torn or '
                                    'damaged); fetching it again', ref, target, manifest.size)
                    self._fetch(manifest, target, os.path.join(self.path, f'.{leaf}.partial'))
        except OSError as exc:
            raise exception.BootArtifactError(
                f'boot artifact {ref}: cannot keep it in {self.path}: {exc}') from exc
        return target

    @contextlib.contextmanager
    def _locked(self, ref: str, path: str) -> Iterator[None]:
        """Hold the artifact's lock file: one fetch per node, across threads and processes.

        :raises: BootArtifactError naming the holder if it keeps the lock over
            ``lock_timeout`` seconds.
        """
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                lock = statelock.StateLock(f'boot artifact {ref}', path)
                break
            except exception.StateLocked as exc:
                if time.monotonic() > deadline:
                    raise exception.BootArtifactError(
                        f'boot artifact {ref}: another build on this node has been '
                        f'fetching it for over {self.lock_timeout:.0f} s: {exc}') from exc
                time.sleep(_LOCK_POLL)
        with lock:
            yield

    def _fetch(self, manifest: manifest_mod.Manifest, target: str, staging: str) -> None:
        """Export into ``staging`` (left by a crash, if it exists: removed first), then
        rename the whole file to ``target``. Called with the artifact's lock held.

        :raises: BootArtifactError; OSError.
        """
        shutil.rmtree(staging, ignore_errors=True)
        os.mkdir(staging)
        try:
            fetched = os.path.join(staging, 'artifact')
            try:
                if self._read_chunk is None:
                    # export writes a temporary file, fsyncs it and renames it into place.
                    self.warehouse.export(manifest, fetched)
                else:
                    _write_chunks(manifest, self._read_chunk, fetched)
            except exception.StorageError as exc:
                raise exception.BootArtifactError(
                    f'boot artifact {manifest.ref}: cannot fetch it: {exc}') from exc
            os.replace(fetched, target)
            durable.fsync_dir(self.path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        LOG.info('boot artifact %s fetched to %s (%d bytes)', manifest.ref, target,
                 manifest.size)


def _write_chunks(manifest: manifest_mod.Manifest, read_chunk: Callable[[str], bytes],
                  path: str) -> None:
    """Write the version into the new file ``path``, each distinct chunk read once with
    ``read_chunk`` (holes left sparse, delta chains resolved), then fsync it.

    :raises: the StorageError of ``read_chunk`` (its OSError as a StorageError), or
        one if a chunk is shorter than its place in the version; CorruptDelta for a
        chain that does not resolve; OSError writing.
    """
    first: dict[manifest_mod.Entry, int] = {}  # entry -> the offset it was written at

    def read_object(object_id: str) -> bytes:
        try:
            return read_chunk(object_id)
        except OSError as exc:  # the reader's, not this node's disk
            raise exception.StorageError(
                f'cannot read chunk {object_id} of {manifest.ref}: {exc}') from exc

    with open(path, 'x+b') as out:  # read too: a repeated chunk is read back
        for index, entry in enumerate(manifest.chunks):
            if entry is None:
                continue
            offset, length = index * manifest.chunk_size, manifest.chunk_length(index)
            if entry in first:
                # A chunk repeated within the artifact costs no second read of it.
                out.flush()
                data = os.pread(out.fileno(), length, first[entry])
            else:
                data = delta.resolve(entry, read_object, length)[:length]
                first[entry] = offset
            if len(data) != length:
                raise exception.StorageError(
                    f'chunk {index} ({entry}) of {manifest.ref} holds {len(data)} bytes, '
                    f'not the {length} of its place at offset {offset}')
            out.seek(offset)
            out.write(data)
        out.truncate(manifest.size)
        out.flush()
        os.fsync(out.fileno())


def _size(path: str) -> int | None:
    """The size of the regular file ``path``; None if there is none (-1 if it is not
    a regular file, so that it never passes for an artifact)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else -1
