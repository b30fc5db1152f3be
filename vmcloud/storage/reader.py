"""Streaming, seekable reads of one image version."""
import io
from typing import Callable, Iterable, Mapping

from vmcloud.storage import delta
from vmcloud.storage.manifest import Manifest

ReadObjects = Callable[[Iterable[str]], Mapping[str, bytes | memoryview]]
"""read_objects(ids) -> the verified bytes of each stored object (chunk or delta)."""

BATCH_BYTES = 8 * 1024 * 1024
"""The most bytes of a version one call of read_objects is asked for: a large read
takes its objects a batch at a time, so it holds no more than this many of them."""


class VersionReader(io.RawIOBase):
    """A read-only file over a version's bytes; holes read as zeros, delta chains
    resolved.

    The whole chunks a read covers are resolved in place in the caller's buffer, their
    objects asked of ``read_objects`` a batch at a time (neighbours in a pack are read
    in one call). Keeps the last chunk it read part of, so sequential reads smaller
    than a chunk fetch each chunk once.
    """

    def __init__(self, read_objects: ReadObjects, manifest: Manifest):
        super().__init__()
        self._read_objects = read_objects
        self._manifest = manifest
        self._position = 0
        self._cached_index = -1
        self._cached = bytearray()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position,
                io.SEEK_END: self._manifest.size}[whence]
        if base + offset < 0:
            raise ValueError(f'negative seek position {base + offset}')
        self._position = base + offset
        return self._position

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast('B')
        manifest = self._manifest
        end = min(manifest.size, self._position + len(view))
        written = 0
        while self._position < end:
            index, within = divmod(self._position, manifest.chunk_size)
            # The chunks from ``index`` that end by ``end`` (the last one may be short).
            whole = (manifest.chunk_count - index if end == manifest.size
                     else (end - self._position) // manifest.chunk_size)
            if within or not whole:
                piece = memoryview(self._chunk(index))[within:within + end - self._position]
                view[written:written + len(piece)] = piece
                length = len(piece)
            else:
                length = self._resolve_chunks(index, whole, view[written:])
            written += length
            self._position += length
        return written

    def _resolve_chunks(self, first: int, count: int, view: memoryview) -> int:
        """Resolve ``count`` whole chunks from ``first`` into ``view``, their objects a
        batch at a time. :returns: the bytes written."""
        manifest = self._manifest
        per_batch = max(1, BATCH_BYTES // manifest.chunk_size)
        written = 0
        for start in range(first, first + count, per_batch):
            indexes = range(start, min(first + count, start + per_batch))
            objects = self._read_objects(
                [i for index in indexes for i in manifest.object_ids(index)])
            for index in indexes:
                length = manifest.chunk_length(index)
                delta.resolve_into(view[written:written + length], manifest.chunks[index],
                                   objects.__getitem__)
                written += length
        return written

    def _chunk(self, index: int) -> bytearray:
        if index != self._cached_index:
            self._cached = bytearray(self._manifest.chunk_length(index))
            self._cached_index = -1
            self._resolve_chunks(index, 1, memoryview(self._cached))
            self._cached_index = index
        return self._cached
