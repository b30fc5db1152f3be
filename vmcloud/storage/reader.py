"""Streaming, seekable reads of one image version."""
import io
from typing import Callable

from vmcloud.storage import delta
from vmcloud.storage.manifest import Manifest


class VersionReader(io.RawIOBase):
    """A read-only file over a version's bytes; holes read as zeros, delta chains
    resolved (``read_chunk`` reads each object of a chain).

    Keeps the last chunk it read, so sequential reads smaller than a chunk
    fetch each chunk once.
    """

    def __init__(self, read_chunk: Callable[[str], bytes], manifest: Manifest):
        super().__init__()
        self._read_chunk = read_chunk
        self._manifest = manifest
        self._position = 0
        self._cached_index = -1
        self._cached = b''

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

    def _chunk(self, index: int) -> bytes:
        if index != self._cached_index:
            self._cached = delta.resolve(self._manifest.chunks[index], self._read_chunk,
                                         self._manifest.chunk_length(index))
            self._cached_index = index
        return self._cached

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast('B')
        chunk_size = self._manifest.chunk_size
        written = 0
        while written < len(view) and self._position < self._manifest.size:
            index, within = divmod(self._position, chunk_size)
            piece = self._chunk(index)[within:within + len(view) - written]
            view[written:written + len(piece)] = piece
            written += len(piece)
            self._position += len(piece)
        return written
