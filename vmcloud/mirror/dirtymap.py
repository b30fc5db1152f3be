"""The persistent set of chunks an instance has written.

A dirty chunk lives in the mirror's local file and must never be replaced by a
fetch. The map on disk is replaced atomically, and only after the local file
has been synced, so every chunk it names holds data that is on disk.
"""
import struct
import threading
import zlib
from typing import Callable

from vmcloud import exception
from vmcloud.storage import durable

_MAGIC = b'VMDIRTY1'
_HEADER = struct.Struct('<8sQ')


class DirtyMap:
    def __init__(self, path: str, chunk_count: int):
        self.path = path
        self.chunk_count = chunk_count
        self._lock = threading.Lock()
        self._bits = bytearray((chunk_count + 7) // 8)
        self._changed = False
        self._load()

    def __contains__(self, index: int) -> bool:
        return bool(self._bits[index >> 3] & (1 << (index & 7)))

    def add(self, index: int) -> None:
        with self._lock:
            if not self._bits[index >> 3] & (1 << (index & 7)):
                self._bits[index >> 3] |= 1 << (index & 7)
                self._changed = True

    def indexes(self) -> set[int]:
        with self._lock:
            bits = bytes(self._bits)
        return {i for i in range(self.chunk_count) if bits[i >> 3] & (1 << (i & 7))}

    def persist_after(self, sync: Callable[[], None]) -> None:
        """Call ``sync`` (which makes the local file durable), then write the map.

        The bits are taken before ``sync``, so the map never names a chunk whose
        data ``sync`` did not cover.
        """
        with self._lock:
            if not self._changed:
                sync()
                return
            self._changed = False
            bits = bytes(self._bits)
        try:
            sync()
            body = _HEADER.pack(_MAGIC, self.chunk_count) + bits
            durable.replace(self.path, body + struct.pack('<L', zlib.crc32(body)))
        except BaseException:
            with self._lock:
                self._changed = True
            raise

    def _load(self) -> None:
        try:
            with open(self.path, 'rb') as f:
                data = f.read()
        except FileNotFoundError:
            return
        body, crc = data[:-4], data[-4:]
        if (len(data) != _HEADER.size + len(self._bits) + 4
                or struct.pack('<L', zlib.crc32(body)) != crc
                or _HEADER.unpack_from(body) != (_MAGIC, self.chunk_count)):
            raise exception.CorruptMirrorState(
                f'dirty map {self.path} is corrupt; the mirror cannot tell which chunks '
                'the instance wrote')
        self._bits[:] = body[_HEADER.size:]
