"""Cutting a raw file into chunks: holes are found without reading, data is hashed in parallel."""
import bisect
import concurrent.futures
import errno
import os
from typing import Callable, Iterator

from vmcloud import exception
from vmcloud.storage import manifest as manifest_mod

# A chunk as read from a file: (index, data, chunk id); data and id are None for a hole.
Chunk = tuple[int, bytes | memoryview | None, str | None]
Progress = Callable[[int, int], None]

_WINDOW = 16
_zero_cache: dict[int, bytes] = {}


def is_zero(data: bytes | bytearray) -> bool:
    zero = _zero_cache.get(len(data))
    if zero is None:
        zero = _zero_cache.setdefault(len(data), bytes(len(data)))
    return data == zero


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The (start, end) ranges of ``fd`` that may hold data; the rest are holes."""
    extents = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            return [(0, size)]
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        extents.append((start, end))
        offset = end
    return extents


def read_chunks(path: str, chunk_size: int, progress: Progress | None = None) -> Iterator[Chunk]:
    """Yield every chunk of the raw file at ``path`` in order.

    Reading and hashing run on a small thread pool (both release the GIL), a
    bounded window ahead of the consumer, which does the writing. Chunks are
    read into a ring of reused buffers, because faulting in fresh memory for
    every chunk costs more than reading it: a chunk's data is valid only until
    the consumer asks for the next one.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        extents = data_extents(fd, size)
        starts = [start for start, _ in extents]

        def may_hold_data(offset: int, length: int) -> bool:
            i = bisect.bisect_right(starts, offset + length - 1) - 1
            return i >= 0 and extents[i][1] > offset

        buffers = [bytearray(chunk_size) for _ in range(_WINDOW + 1)]

        def load(index: int) -> Chunk:
            offset = index * chunk_size
            length = min(chunk_size, size - offset)
            if not may_hold_data(offset, length):
                return index, None, None
            buffer = buffers[index % len(buffers)]
            if length < chunk_size:
                buffer = bytearray(length)
            if os.preadv(fd, [buffer], offset) != length:
                raise exception.StorageError(
                    f'{path} shrank while being read (short read at offset {offset})')
            if is_zero(buffer):
                return index, None, None
            return index, memoryview(buffer), manifest_mod.chunk_id(buffer)

        count = -(-size // chunk_size)
        with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            pending = [pool.submit(load, i) for i in range(min(_WINDOW, count))]
            next_index = len(pending)
            done_bytes = 0
            while pending:
                chunk = pending.pop(0).result()
                if next_index < count:
                    pending.append(pool.submit(load, next_index))
                    next_index += 1
                yield chunk
                done_bytes = min(size, done_bytes + chunk_size)
                if progress is not None:
                    progress(done_bytes, size)
    finally:
        os.close(fd)
