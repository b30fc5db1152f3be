"""The persistent set of guest blocks an instance has written, chunk by chunk.

A dirty block lives in the mirror's local file and must never be replaced by a
fetch. The map on disk is replaced atomically, and only after the local file
has been synced, so every block it names holds data that is on disk.

File format (version 2, little endian): a header ``VMDIRTY2``, the chunk count,
chunk size, block size and record count (u64 each), then one record per chunk
with a dirty block, in increasing chunk order: its index (u64) and a bitmap of
its blocks (bit ``b`` of byte ``b // 8`` is block ``b``); a crc32 of all that
last. Its size is proportional to the dirty chunks, not to the disk.

Version 1 (``VMDIRTY1``: the chunk count, one bit per chunk, a crc32) still
loads: a chunk it names was always written whole into the overlay, so all its
blocks are dirty. The next persist writes version 2.
"""
import struct
import threading
import zlib
from typing import Callable, Iterator

from vmcloud import exception
from vmcloud.storage import durable

DEFAULT_BLOCK_SIZE = 4096

_MAGIC_V1 = b'VMDIRTY1'
_HEADER_V1 = struct.Struct('<8sQ')
_MAGIC = b'VMDIRTY2'
_HEADER = struct.Struct('<8sQQQQ')  # magic, chunk count, chunk size, block size, records
_INDEX = struct.Struct('<Q')
_CRC = struct.Struct('<L')


def check_block_size(block_size: int, chunk_size: int) -> None:
    """:raises: ConfigError unless ``block_size`` is a power of two dividing ``chunk_size``."""
    if block_size < 1 or block_size & (block_size - 1):
        raise exception.ConfigError(
            f'[mirror] dirty_block_size {block_size} is not a power of two')
    if chunk_size % block_size:
        raise exception.ConfigError(
            f'[mirror] dirty_block_size {block_size} does not divide the image\'s chunk '
            f'size {chunk_size}')


def runs(mask: int) -> Iterator[tuple[int, int]]:
    """The runs of set bits of ``mask`` as (first, end) block ranges, end exclusive."""
    block = 0
    while mask:
        skip = (mask & -mask).bit_length() - 1
        block += skip
        mask >>= skip
        length = (~mask & (mask + 1)).bit_length() - 1
        yield block, block + length
        block += length
        mask >>= length


class DirtyMap:
    """Thread safe. Blocks are ``block_size`` bytes; the last one of a short last
    chunk is short."""

    def __init__(self, path: str, chunk_count: int, chunk_size: int, size: int,
                 block_size: int = DEFAULT_BLOCK_SIZE):
        """Load the map at ``path``, an empty one if there is none.

        A version 2 file keeps the block size it was written with, whatever
        ``block_size`` says: its bits mean blocks of that size.

        :raises: ConfigError if ``block_size`` is not a power of two dividing
            ``chunk_size``; CorruptMirrorState if the file cannot be trusted.
        """
        self.path = path
        self.chunk_count = chunk_count
        self.chunk_size = chunk_size
        self.size = size
        self.block_size = block_size
        self._lock = threading.Lock()
        self._masks: dict[int, int] = {}
        self._changed = False
        self._load()

    @property
    def blocks_per_chunk(self) -> int:
        return self.chunk_size // self.block_size

    def block_count(self, index: int) -> int:
        """Blocks of chunk ``index``, a short last block included."""
        length = min(self.chunk_size, self.size - index * self.chunk_size)
        return -(-length // self.block_size)

    def whole_mask(self, index: int) -> int:
        return (1 << self.block_count(index)) - 1

    def __contains__(self, index: int) -> bool:
        """Whether chunk ``index`` has a dirty block."""
        return index in self._masks

    def mask(self, index: int) -> int:
        """Chunk ``index``'s dirty blocks as a bitmask (bit b: block b); 0 if none."""
        return self._masks.get(index, 0)

    def blocks(self, index: int) -> frozenset[int]:
        """The indexes (within the chunk) of chunk ``index``'s dirty blocks."""
        return frozenset(block for first, end in runs(self.mask(index))
                         for block in range(first, end))

    def is_whole(self, index: int) -> bool:
        """Whether every block of chunk ``index`` is dirty."""
        return self.mask(index) == self.whole_mask(index)

    def add_blocks(self, index: int, first: int, end: int) -> None:
        """Mark blocks ``first`` to ``end`` (exclusive) of chunk ``index`` dirty.

        :raises: IndexError if the chunk or the blocks are outside the disk.
        """
        if not (0 <= index < self.chunk_count and 0 <= first < end <= self.block_count(index)):
            raise IndexError(f'blocks {first}..{end} of chunk {index} are outside the disk')
        bits = ((1 << (end - first)) - 1) << first
        with self._lock:
            old = self._masks.get(index, 0)
            if old | bits != old:
                self._masks[index] = old | bits
                self._changed = True

    def add(self, index: int) -> None:
        """Mark every block of chunk ``index`` dirty. :raises: IndexError."""
        self.add_blocks(index, 0, self.block_count(index))

    def indexes(self) -> set[int]:
        """The chunks with a dirty block."""
        with self._lock:
            return set(self._masks)

    def masks(self) -> dict[int, int]:
        """A copy of every dirty chunk's bitmask, taken at one instant."""
        with self._lock:
            return dict(self._masks)

    def persist_after(self, sync: Callable[[], None]) -> None:
        """Call ``sync`` (which makes the local file durable), then write the map.

        The bits are taken before ``sync``, so the map never names a block whose
        data ``sync`` did not cover.

        :raises: what ``sync`` or the replace raises; the map is then written
            again by the next call.
        """
        with self._lock:
            if not self._changed:
                sync()
                return
            self._changed = False
            masks = dict(self._masks)
        try:
            sync()
            durable.replace(self.path, self._encode(masks))
        except BaseException:
            with self._lock:
                self._changed = True
            raise

    def _encode(self, masks: dict[int, int]) -> bytes:
        width = (self.blocks_per_chunk + 7) // 8
        parts = [_HEADER.pack(_MAGIC, self.chunk_count, self.chunk_size, self.block_size,
                              len(masks))]
        for index in sorted(masks):
            parts.append(_INDEX.pack(index))
            parts.append(masks[index].to_bytes(width, 'little'))
        body = b''.join(parts)
        return body + _CRC.pack(zlib.crc32(body))

    def _corrupt(self, problem: str) -> exception.CorruptMirrorState:
        return exception.CorruptMirrorState(
            f'dirty map {self.path} is corrupt ({problem}); the mirror cannot tell which '
            'blocks the instance wrote')

    def _load(self) -> None:
        """:raises: CorruptMirrorState."""
        try:
            with open(self.path, 'rb') as f:
                data = f.read()
        except FileNotFoundError:
            check_block_size(self.block_size, self.chunk_size)
            return
        body, crc = data[:-_CRC.size], data[-_CRC.size:]
        if len(data) < _CRC.size + 8 or _CRC.pack(zlib.crc32(body)) != crc:
            raise self._corrupt('bad checksum or size')
        if body[:8] == _MAGIC_V1:
            check_block_size(self.block_size, self.chunk_size)
            self._load_v1(body)
        elif body[:8] == _MAGIC:
            self._load_v2(body)
        else:
            raise self._corrupt(f'unknown format {body[:8]!r}')

    def _load_v1(self, body: bytes) -> None:
        bits = body[_HEADER_V1.size:]
        if (len(body) != _HEADER_V1.size + (self.chunk_count + 7) // 8
                or _HEADER_V1.unpack_from(body)[1] != self.chunk_count):
            raise self._corrupt(f'not a version 1 map of {self.chunk_count} chunks')
        for index in range(self.chunk_count):
            if bits[index >> 3] & (1 << (index & 7)):
                self._masks[index] = self.whole_mask(index)

    def _load_v2(self, body: bytes) -> None:
        if len(body) < _HEADER.size:
            raise self._corrupt('short header')
        _, chunk_count, chunk_size, block_size, records = _HEADER.unpack_from(body)
        if (chunk_count, chunk_size) != (self.chunk_count, self.chunk_size):
            raise self._corrupt(f'written for {chunk_count} chunks of {chunk_size} bytes, '
                                f'not {self.chunk_count} of {self.chunk_size}')
        try:
            check_block_size(block_size, chunk_size)
        except exception.ConfigError as exc:
            raise self._corrupt(str(exc)) from exc
        self.block_size = block_size
        width = (self.blocks_per_chunk + 7) // 8
        if len(body) != _HEADER.size + records * (_INDEX.size + width):
            raise self._corrupt(f'{len(body)} bytes do not hold {records} records')
        previous = -1
        for position in range(_HEADER.size, len(body), _INDEX.size + width):
            index, = _INDEX.unpack_from(body, position)
            start = position + _INDEX.size
            mask = int.from_bytes(body[start:start + width], 'little')
            if not previous < index < self.chunk_count:
                raise self._corrupt(f'chunk {index} out of order or outside the disk')
            if not mask or mask & ~self.whole_mask(index):
                raise self._corrupt(f'chunk {index} has an empty bitmap or blocks past its end')
            self._masks[index] = mask
            previous = index
