"""One instance's copy-on-reference disk over one image version.

Chunks the instance never wrote are read through the node's chunk cache (each
fetched from the warehouse once per node); chunks it wrote live in its own
sparse local file and are named in its persistent dirty map. A partial write
to an unwritten chunk first fills the chunk from the image, so a dirty chunk is
always whole.

One disk object owns the mirror's directory at a time (the ``lock`` file in
it): a second owner's dirty map would replace the first one's, and lose its
flushed writes.
"""
import contextlib
import dataclasses
import os
import shutil
import threading
from typing import Iterator

from vmcloud import exception
from vmcloud import sparse
from vmcloud.mirror import cache as cache_mod
from vmcloud.mirror import dirtymap
from vmcloud.mirror import profile as profile_mod
from vmcloud.nbd import device
from vmcloud.nbd import statelock
from vmcloud.storage import durable
from vmcloud.storage.manifest import Manifest

_STRIPES = 64
_ZEROES = bytes(1024 * 1024)


def _zeroes(length: int) -> bytes | memoryview:
    return memoryview(_ZEROES)[:length] if length <= len(_ZEROES) else bytes(length)


def _preadv_all(fd: int, target: memoryview, offset: int) -> None:
    while target:
        count = os.preadv(fd, [target], offset)
        if count == 0:  # past the end of the file: a sparse file reads zeroes up to its size
            raise OSError(5, f'short read at {offset}')
        target, offset = target[count:], offset + count


@dataclasses.dataclass(frozen=True)
class _Piece:
    index: int
    start: int  # within the chunk
    end: int
    offset: int  # within the request


class MirrorDisk(device.BlockDevice):
    """Thread safe, as the NBD server needs."""

    def __init__(self, directory: str, manifest: Manifest, cache: cache_mod.ChunkCache):
        """Open the mirror in ``directory``, a new one if it holds none.

        :raises: StateLocked naming the owner if another disk object has the
            directory; CorruptMirrorState if its dirty map cannot be trusted or
            names chunks its overlay file does not hold.
        """
        self.directory = directory
        self.manifest = manifest
        self.recorder = profile_mod.Recorder()
        self._cache = cache
        self._chunk_size = manifest.chunk_size
        os.makedirs(directory, exist_ok=True)
        self._owner = statelock.StateLock('mirror', os.path.join(directory, 'lock'))
        try:
            self.dirty = dirtymap.DirtyMap(os.path.join(directory, 'dirty'),
                                           manifest.chunk_count)
            self._fd = self._open_overlay()
        except BaseException:
            self._owner.release()
            raise
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]
        self._flush_lock = threading.Lock()
        self._barrier: Barrier | None = None
        self._base_lock = threading.Lock()
        self._base_indexes: set[int] = set()

    def _open_overlay(self) -> int:
        """The overlay's descriptor, sized to the image.

        :raises: CorruptMirrorState if the dirty map names chunks the overlay
            cannot hold: served from a new or cut file, they would read as zeroes.
        """
        path = os.path.join(self.directory, 'overlay')
        written = self.dirty.indexes()
        try:
            # A missing overlay is created only when no flushed write can be lost with it.
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | (0 if written else os.O_CREAT), 0o600)
        except FileNotFoundError:
            raise exception.CorruptMirrorState(
                f'mirror overlay {path} is missing, but the dirty map names {len(written)} '
                'written chunks; their data is lost') from None
        try:
            size = os.fstat(fd).st_size
            if written:
                last = max(written)
                end = last * self._chunk_size + self.manifest.chunk_length(last)
                if size < end:
                    raise exception.CorruptMirrorState(
                        f'mirror overlay {path} is {size} bytes, but the dirty map names '
                        f'chunk {last}, which ends at byte {end}; the overlay was cut short')
            if size != self.manifest.size:
                os.ftruncate(fd, self.manifest.size)
        except BaseException:
            os.close(fd)
            raise
        return fd

    @property
    def size(self) -> int:
        return self.manifest.size

    # -- reads ---------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        buffer = bytearray(length)
        self.read_into(offset, memoryview(buffer))
        return bytes(buffer)

    def read_into(self, offset: int, buffer: memoryview) -> None:
        pieces = list(self._pieces(offset, len(buffer)))
        for piece in pieces:
            target = buffer[piece.offset:piece.offset + piece.end - piece.start]
            if piece.index in self.dirty:
                _preadv_all(self._fd, target, piece.index * self._chunk_size + piece.start)
            else:
                self._base_into(piece.index, piece.start, target)
        if pieces:
            self.recorder.touch(pieces[0].index, pieces[-1].index)

    def _base_into(self, index: int, start: int, target: memoryview) -> None:
        """Bytes of the image version itself. :raises: FetchFailed."""
        chunk_id = self.manifest.chunks[index]
        if chunk_id is None:
            target[:] = _zeroes(len(target))
            return
        if index not in self._base_indexes:
            with self._base_lock:
                self._base_indexes.add(index)
        self._cache.read_into(chunk_id, start, target)

    def _base(self, index: int, start: int, end: int) -> bytearray:
        buffer = bytearray(end - start)
        self._base_into(index, start, memoryview(buffer))
        return buffer

    def fetched_indexes(self) -> set[int]:
        """Chunks whose image content this mirror needed (read, or filled before a write)."""
        with self._base_lock:
            return set(self._base_indexes)

    def prefetch(self, index: int) -> None:
        """Bring chunk ``index`` to the node unless it is there or written. :raises: FetchFailed."""
        chunk_id = self.manifest.chunks[index]
        if chunk_id is not None and index not in self.dirty:
            self._cache.ensure(chunk_id)

    # -- writes --------------------------------------------------------------------

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        view = memoryview(data)
        for piece in self._pieces(offset, len(data)):
            self._write_piece(piece, view[piece.offset:piece.offset + piece.end - piece.start])
        self._touch(offset, len(data))
        if fua:
            self.flush()

    def _write_piece(self, piece: _Piece, data) -> None:
        at = piece.index * self._chunk_size
        with self._stripe(piece.index):
            self._preserve(piece.index)
            if piece.index in self.dirty:
                durable.write_all_at(self._fd, data, at + piece.start)
                return
            length = self.manifest.chunk_length(piece.index)
            if piece.end - piece.start == length:
                durable.write_all_at(self._fd, data, at)
            else:
                whole = self._base(piece.index, 0, length)
                whole[piece.start:piece.end] = data
                durable.write_all_at(self._fd, whole, at)
            # Marked only once the whole chunk is in the local file.
            self.dirty.add(piece.index)

    def write_zeroes(self, offset: int, length: int, fua: bool = False) -> None:
        for piece in self._pieces(offset, length):
            chunk_length = self.manifest.chunk_length(piece.index)
            if piece.end - piece.start < chunk_length:
                self._write_piece(piece, bytes(piece.end - piece.start))
                continue
            with self._stripe(piece.index):
                self._preserve(piece.index)
                sparse.punch_hole(self._fd, piece.index * self._chunk_size, chunk_length)
                self.dirty.add(piece.index)
        self._touch(offset, length)
        if fua:
            self.flush()

    def flush(self) -> None:
        with self._flush_lock:
            self.dirty.persist_after(lambda: os.fdatasync(self._fd))

    def _touch(self, offset: int, length: int) -> None:
        if length:
            self.recorder.touch(offset // self._chunk_size,
                                (offset + length - 1) // self._chunk_size)

    # -- block status --------------------------------------------------------------

    def block_status(self, offset: int, length: int) -> list[device.Extent]:
        extents: list[device.Extent] = []
        for piece in self._pieces(offset, length):
            flags = self._chunk_flags(piece.index)
            size = piece.end - piece.start
            if extents and extents[-1].flags == flags:
                extents[-1] = device.Extent(extents[-1].length + size, flags)
            else:
                extents.append(device.Extent(size, flags))
        return extents

    def _chunk_flags(self, index: int) -> int:
        hole = device.STATE_HOLE | device.STATE_ZERO
        if index in self.dirty:
            at = index * self._chunk_size
            return hole if sparse.is_hole(self._fd, at, self.manifest.chunk_length(index)) else 0
        return hole if self.manifest.chunks[index] is None else 0

    # -- snapshots -----------------------------------------------------------------

    def barrier(self) -> 'Barrier':
        """The dirty chunks as of now, readable while the guest goes on writing.

        Call it with the guest's I/O frozen. Until the barrier is closed, the
        first write to one of its chunks first copies the chunk aside (copy
        before overwrite), unless the chunk was already marked uploaded.

        :raises: MirrorError if another barrier is open.
        """
        with contextlib.ExitStack() as stack:
            for lock in self._stripes:
                stack.enter_context(lock)
            if self._barrier is not None:
                raise exception.MirrorError(f'mirror {self.directory} already has a barrier open')
            self._barrier = Barrier(self, frozenset(self.dirty.indexes()))
            return self._barrier

    def _preserve(self, index: int) -> None:
        """Called with the chunk's stripe held, before it is overwritten."""
        if self._barrier is not None:
            self._barrier.preserve(index)

    def _end_barrier(self, barrier: 'Barrier') -> None:
        with contextlib.ExitStack() as stack:
            for lock in self._stripes:
                stack.enter_context(lock)
            if self._barrier is barrier:
                self._barrier = None

    # -- helpers -------------------------------------------------------------------

    def _stripe(self, index: int) -> threading.Lock:
        return self._stripes[index % _STRIPES]

    def _pieces(self, offset: int, length: int) -> Iterator[_Piece]:
        if offset < 0 or length < 0 or offset + length > self.manifest.size:
            raise exception.InvalidRange(
                f'range {offset}+{length} is outside the disk ({self.manifest.size} bytes)')
        position, end = offset, offset + length
        while position < end:
            index = position // self._chunk_size
            start = position - index * self._chunk_size
            stop = min(self._chunk_size, end - index * self._chunk_size)
            yield _Piece(index, start, stop, position - offset)
            position = index * self._chunk_size + stop

    def close(self) -> None:
        """Flush, stop using the directory and give it up to the next owner.

        The directory is given up even if the flush fails (its error is raised):
        what is on disk is then what the last good flush left, which the next
        owner reads as it would after a crash.
        """
        try:
            self.flush()
        finally:
            os.close(self._fd)
            self._owner.release()

    def remove(self) -> None:
        """Stop and delete the mirror's state; its lock goes last, so that no one
        else can open the mirror while it is half deleted."""
        os.close(self._fd)
        try:
            shutil.rmtree(self.directory)
        finally:
            self._owner.release()


class Barrier:
    """The dirty chunks of a mirror at one instant, for a snapshot to upload."""

    def __init__(self, disk: MirrorDisk, indexes: frozenset[int]):
        self.indexes = indexes
        self._disk = disk
        self._pending = set(indexes)  # neither uploaded nor copied aside yet
        self._copied: set[int] = set()
        self._path = os.path.join(disk.directory, 'barrier-copies')
        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

    def preserve(self, index: int) -> None:
        if index in self._pending:
            at = index * self._disk.manifest.chunk_size
            length = self._disk.manifest.chunk_length(index)
            durable.write_all_at(self._fd, os.pread(self._disk._fd, length, at), at)
            self._pending.discard(index)
            self._copied.add(index)

    def read_chunk(self, index: int) -> bytes:
        """Chunk ``index`` as it was at the barrier; one of ``indexes``."""
        if index not in self.indexes:
            raise KeyError(index)
        at = index * self._disk.manifest.chunk_size
        length = self._disk.manifest.chunk_length(index)
        with self._disk._stripe(index):
            fd = self._fd if index in self._copied else self._disk._fd
            return os.pread(fd, length, at)

    def uploaded(self, index: int) -> None:
        """Chunk ``index`` is safe elsewhere: later writes need not copy it aside."""
        with self._disk._stripe(index):
            self._pending.discard(index)
            if index in self._copied:
                sparse.punch_hole(self._fd, index * self._disk.manifest.chunk_size,
                                  self._disk.manifest.chunk_length(index))

    @property
    def copied_bytes(self) -> int:
        return sum(self._disk.manifest.chunk_length(i) for i in self._copied)

    def close(self) -> None:
        self._disk._end_barrier(self)
        os.close(self._fd)
        os.unlink(self._path)

    def __enter__(self) -> 'Barrier':
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
