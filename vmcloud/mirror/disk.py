"""One instance's copy-on-reference disk over one image version.

Blocks the instance never wrote are read through the node's chunk cache (each
chunk fetched from the warehouse once per node; a chunk the version stores as a
chain of deltas is resolved from its objects, each fetched that way); blocks it
wrote (guest blocks of ``[mirror] dirty_block_size`` within each chunk) live in
its own sparse local file and are named in its persistent dirty map. A write that
covers whole blocks needs nothing of the image; one that covers part of a block
first fills the rest of that block from the image, so a dirty block is always whole.

One disk object owns the mirror's directory at a time (the ``lock`` file in
it): a second owner's dirty map would replace the first one's, and lose its
flushed writes.
"""
import collections
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
from vmcloud.storage import delta as delta_mod
from vmcloud.storage import durable
from vmcloud.storage.manifest import Manifest

_STRIPES = 64
# Chunks of delta chains kept resolved per disk: a guest's reads of one chunk come in
# many requests, each of which would otherwise decode and apply the whole chain.
_RESOLVED_CHUNKS = 4
_ZEROES = bytes(1024 * 1024)


def _zeroes(length: int) -> bytes | memoryview:
    return memoryview(_ZEROES)[:length] if length <= len(_ZEROES) else bytes(length)


def _bits(first: int, end: int) -> int:
    """The bitmask of blocks ``first`` to ``end`` (exclusive)."""
    return ((1 << (end - first)) - 1) << first


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

    def __init__(self, directory: str, manifest: Manifest, cache: cache_mod.ChunkCache,
                 block_size: int = dirtymap.DEFAULT_BLOCK_SIZE):
        """Open the mirror in ``directory``, a new one if it holds none.

        ``block_size`` is the dirty tracking's block for a new mirror; one
        already written keeps the block size its dirty map has.

        :raises: StateLocked naming the owner if another disk object has the
            directory; ConfigError if ``block_size`` is not a power of two
            dividing the chunk size; CorruptMirrorState if its dirty map cannot
            be trusted or names blocks its overlay file does not hold.
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
                                           manifest.chunk_count, manifest.chunk_size,
                                           manifest.size, block_size)
            self._block = self.dirty.block_size
            self._fd = self._open_overlay()
        except BaseException:
            self._owner.release()
            raise
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]
        self._flush_lock = threading.Lock()
        self._barrier: Barrier | None = None
        self._base_lock = threading.Lock()
        self._base_indexes: set[int] = set()
        self._resolved_lock = threading.Lock()
        self._resolved_chunks: collections.OrderedDict[int, bytes] = collections.OrderedDict()

    def _open_overlay(self) -> int:
        """The overlay's descriptor, sized to the image.

        :raises: CorruptMirrorState if the dirty map names chunks the overlay
            cannot hold: served from a new or cut file, they would read as zeroes.
        """
        path = os.path.join(self.directory, 'overlay')
        written = self.dirty.masks()
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
                end = last * self._chunk_size + min(written[last].bit_length() * self._block,
                                                    self.manifest.chunk_length(last))
                if size < end:
                    raise exception.CorruptMirrorState(
                        f'mirror overlay {path} is {size} bytes, but the dirty map names '
                        f'blocks of chunk {last} up to byte {end}; the overlay was cut short')
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
            at = piece.index * self._chunk_size
            for dirty, start, end in self._split(piece.start, piece.end,
                                                 self.dirty.mask(piece.index)):
                part = target[start - piece.start:end - piece.start]
                if dirty:
                    _preadv_all(self._fd, part, at + start)
                else:
                    self._base_into(piece.index, start, part)
        if pieces:
            self.recorder.touch(pieces[0].index, pieces[-1].index)

    def read_chunk(self, index: int) -> bytes:
        """Chunk ``index`` as the guest sees it now: its dirty blocks from the
        overlay, the others from the image. :raises: FetchFailed."""
        return self.read(index * self._chunk_size, self.manifest.chunk_length(index))

    def _split(self, start: int, end: int, mask: int) -> Iterator[tuple[bool, int, int]]:
        """``[start, end)`` of a chunk cut into (dirty, start, end) runs by ``mask``."""
        position = start
        for first, stop in dirtymap.runs(mask):
            run_start, run_end = max(first * self._block, start), min(stop * self._block, end)
            if run_start >= run_end:
                continue
            if position < run_start:
                yield False, position, run_start
            yield True, run_start, run_end
            position = run_end
        if position < end:
            yield False, position, end

    def _base_into(self, index: int, start: int, target: memoryview) -> None:
        """Bytes of the image version itself, noted as needed. :raises: FetchFailed."""
        if index not in self._base_indexes and self.manifest.chunks[index] is not None:
            with self._base_lock:
                self._base_indexes.add(index)
        self._image_into(index, start, target)

    def _image_into(self, index: int, start: int, target: memoryview) -> None:
        """Bytes of the image version itself. :raises: FetchFailed."""
        entry = self.manifest.chunks[index]
        if entry is None:
            target[:] = _zeroes(len(target))
        elif isinstance(entry, str):
            self._cache.read_into(entry, start, target)
        else:
            target[:] = memoryview(self._resolved(index, entry))[start:start + len(target)]

    def _resolved(self, index: int, chain: tuple) -> bytes:
        """The bytes chunk ``index``, a delta chain, resolves to; each object through
        the node's cache, the last few chunks resolved kept (a guest reads a chunk in
        many requests). :raises: FetchFailed, also for a delta that does not fit."""
        with self._resolved_lock:
            data = self._resolved_chunks.get(index)
            if data is not None:
                self._resolved_chunks.move_to_end(index)
                return data
        try:
            data = delta_mod.resolve(chain, self._cache.read_chunk,
                                     self.manifest.chunk_length(index))
        except delta_mod.CorruptDelta as exc:
            raise exception.FetchFailed(exc.chunk_id, 1, exc) from exc
        with self._resolved_lock:
            self._resolved_chunks[index] = data
            while len(self._resolved_chunks) > _RESOLVED_CHUNKS:
                self._resolved_chunks.popitem(last=False)
        return data

    def _base(self, index: int, start: int, end: int) -> bytearray:
        buffer = bytearray(end - start)
        self._base_into(index, start, memoryview(buffer))
        return buffer

    def fetched_indexes(self) -> set[int]:
        """Chunks whose image content this mirror needed (read, or filled before a write)."""
        with self._base_lock:
            return set(self._base_indexes)

    def prefetch(self, index: int) -> None:
        """Bring chunk ``index`` to the node unless it is there or written whole.

        :raises: FetchFailed.
        """
        if not self.dirty.is_whole(index):
            for object_id in self.manifest.object_ids(index):
                self._cache.ensure(object_id)

    # -- writes --------------------------------------------------------------------

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        view = memoryview(data)
        for piece in self._pieces(offset, len(data)):
            self._write_piece(piece, view[piece.offset:piece.offset + piece.end - piece.start])
        self._touch(offset, len(data))
        if fua:
            self.flush()

    def _blocks_of(self, piece: _Piece) -> tuple[int, int]:
        """The blocks ``piece`` touches, (first, end) with end exclusive."""
        return piece.start // self._block, -(-piece.end // self._block)

    def _write_piece(self, piece: _Piece, data) -> None:
        """Write ``data`` over ``piece`` and mark the blocks it touches dirty.

        :raises: FetchFailed if a block it covers in part needs the image; OSError
            of the overlay.
        """
        at = piece.index * self._chunk_size
        first, stop = self._blocks_of(piece)
        low = first * self._block
        high = min(stop * self._block, self.manifest.chunk_length(piece.index))
        with self._stripe(piece.index):
            self._preserve(piece.index, _bits(first, stop))
            mask = self.dirty.mask(piece.index)
            # Only a block the write covers in part, and not written before, needs the
            # image: the rest of it is filled from there before the block is marked.
            gaps = []
            if piece.start > low and not mask >> first & 1:
                gaps.append((low, min(low + self._block, piece.start)))
            if piece.end < high and not mask >> (stop - 1) & 1:
                gaps.append((max(high - self._block, piece.end), high))
            for gap_start, gap_end in gaps:
                durable.write_all_at(self._fd, self._base(piece.index, gap_start, gap_end),
                                     at + gap_start)
            durable.write_all_at(self._fd, data, at + piece.start)
            # Marked only once the whole blocks are in the local file.
            self.dirty.add_blocks(piece.index, first, stop)

    def write_zeroes(self, offset: int, length: int, fua: bool = False) -> None:
        for piece in self._pieces(offset, length):
            chunk_length = self.manifest.chunk_length(piece.index)
            whole_start = -(-piece.start // self._block) * self._block
            whole_end = (piece.end if piece.end == chunk_length
                         else piece.end // self._block * self._block)
            if whole_start >= whole_end:
                self._write_piece(piece, _zeroes(piece.end - piece.start))
                continue
            for start, end in ((piece.start, whole_start), (whole_end, piece.end)):
                if start < end:
                    self._write_piece(_Piece(piece.index, start, end, 0), _zeroes(end - start))
            first, stop = whole_start // self._block, -(-whole_end // self._block)
            with self._stripe(piece.index):
                self._preserve(piece.index, _bits(first, stop))
                sparse.punch_hole(self._fd, piece.index * self._chunk_size + whole_start,
                                  whole_end - whole_start)
                self.dirty.add_blocks(piece.index, first, stop)
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
        image_hole = self.manifest.chunks[index] is None
        if index not in self.dirty:
            return hole if image_hole else 0
        if not image_hole and not self.dirty.is_whole(index):
            return 0  # its clean blocks are the image's data
        # Clean blocks of a hole chunk read as zeroes; if they hold stale bytes of a
        # write lost in a crash, the chunk is reported as data, which is always allowed.
        at = index * self._chunk_size
        return hole if sparse.is_hole(self._fd, at, self.manifest.chunk_length(index)) else 0

    # -- snapshots -----------------------------------------------------------------

    def barrier(self) -> 'Barrier':
        """The dirty blocks as of now, readable while the guest goes on writing.

        Call it with the guest's I/O frozen. Until the barrier is closed, the
        first write to one of its blocks first copies the block aside (copy
        before overwrite), unless its chunk was already marked uploaded.

        :raises: MirrorError if another barrier is open.
        """
        with contextlib.ExitStack() as stack:
            for lock in self._stripes:
                stack.enter_context(lock)
            if self._barrier is not None:
                raise exception.MirrorError(f'mirror {self.directory} already has a barrier open')
            self._barrier = Barrier(self, self.dirty.masks())
            return self._barrier

    def _preserve(self, index: int, bits: int) -> None:
        """Called with the chunk's stripe held, before its blocks ``bits`` are overwritten."""
        if self._barrier is not None:
            self._barrier.preserve(index, bits)

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
    """The dirty blocks of a mirror at one instant, for a snapshot to upload."""

    def __init__(self, disk: MirrorDisk, masks: dict[int, int]):
        self.indexes = frozenset(masks)
        self.block_size = disk.dirty.block_size
        self._disk = disk
        self._masks = masks
        self._pending = dict(masks)  # blocks neither uploaded nor copied aside yet
        self._copied: dict[int, int] = {}
        self._path = os.path.join(disk.directory, 'barrier-copies')
        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

    def _range(self, index: int, first: int, end: int) -> tuple[int, int]:
        """Disk offset and length of blocks ``first`` to ``end`` of chunk ``index``."""
        manifest, block = self._disk.manifest, self._disk.dirty.block_size
        start = index * manifest.chunk_size + first * block
        return start, min(end * block, manifest.chunk_length(index)) - first * block

    def preserve(self, index: int, bits: int) -> None:
        """Copy aside the blocks ``bits`` of chunk ``index`` this barrier still needs;
        called with the chunk's stripe held, before they are overwritten."""
        taken = self._pending.get(index, 0) & bits
        if not taken:
            return
        for first, end in dirtymap.runs(taken):
            at, length = self._range(index, first, end)
            durable.write_all_at(self._fd, os.pread(self._disk._fd, length, at), at)
        self._pending[index] &= ~taken
        self._copied[index] = self._copied.get(index, 0) | taken

    def blocks(self, index: int) -> frozenset[int]:
        """The dirty blocks of chunk ``index`` at the barrier; one of ``indexes``."""
        mask = self._masks[index]
        return frozenset(block for first, end in dirtymap.runs(mask)
                         for block in range(first, end))

    def read_blocks(self, index: int) -> dict[int, bytes]:
        """{block: its bytes at the barrier} of chunk ``index``'s dirty blocks (the
        last one of a short last chunk short); one of ``indexes``."""
        if index not in self.indexes:
            raise KeyError(index)
        block = self._disk.dirty.block_size
        out = {}
        with self._disk._stripe(index):
            for first, end in dirtymap.runs(self._masks[index]):
                data = self._read_dirty(index, first, end)
                for number in range(first, end):
                    offset = (number - first) * block
                    out[number] = data[offset:offset + block]
        return out

    def read_chunk(self, index: int) -> bytes:
        """Chunk ``index`` as it was at the barrier (its dirty blocks then, the image's
        others); one of ``indexes``. :raises: FetchFailed."""
        if index not in self.indexes:
            raise KeyError(index)
        disk, mask = self._disk, self._masks[index]
        length = disk.manifest.chunk_length(index)
        chunk = bytearray(length)
        if mask != disk.dirty.whole_mask(index):
            # Outside the stripe: the image never changes, and a fetch may take long.
            disk._image_into(index, 0, memoryview(chunk))
        block = disk.dirty.block_size
        with disk._stripe(index):
            for first, end in dirtymap.runs(mask):
                data = self._read_dirty(index, first, end)
                chunk[first * block:first * block + len(data)] = data
        return bytes(chunk)

    def _read_dirty(self, index: int, first: int, end: int) -> bytes:
        """Blocks ``first`` to ``end`` of chunk ``index``, dirty at the barrier, as
        they were then; called with the chunk's stripe held."""
        at, length = self._range(index, first, end)
        data = bytearray(os.pread(self._disk._fd, length, at))
        copied = self._copied.get(index, 0) & _bits(first, end)
        for copy_first, copy_end in dirtymap.runs(copied):
            copy_at, copy_length = self._range(index, copy_first, copy_end)
            data[copy_at - at:copy_at - at + copy_length] = os.pread(self._fd, copy_length,
                                                                     copy_at)
        return bytes(data)

    def uploaded(self, index: int) -> None:
        """Chunk ``index`` is safe elsewhere: later writes need not copy it aside."""
        with self._disk._stripe(index):
            self._pending.pop(index, None)
            for first, end in dirtymap.runs(self._copied.get(index, 0)):
                sparse.punch_hole(self._fd, *self._range(index, first, end))

    @property
    def copied_bytes(self) -> int:
        """Bytes copied aside so far."""
        # A copy of the items: a writer's preserve may add one meanwhile.
        return sum(self._range(index, first, end)[1] for index, mask in list(self._copied.items())
                   for first, end in dirtymap.runs(mask))

    @property
    def dirty_bytes(self) -> int:
        """Bytes of the blocks dirty at the barrier (what the guest wrote, to blocks)."""
        return sum(self._range(index, first, end)[1] for index, mask in self._masks.items()
                   for first, end in dirtymap.runs(mask))

    def close(self) -> None:
        self._disk._end_barrier(self)
        os.close(self._fd)
        os.unlink(self._path)

    def __enter__(self) -> 'Barrier':
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
