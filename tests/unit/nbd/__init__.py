"""Helpers for NBD server tests: an in-memory device that can be told to fail."""
import threading

from vmcloud.nbd import device

BLOCK = 64 * 1024


class MemoryDevice(device.BlockDevice):
    """A device in a bytearray that tracks holes per 64 KiB block and records its calls.

    ``failures`` maps a method name to an exception that method raises (once
    per call, for as long as it stays in the map); ``gates`` maps a read
    offset to an Event the read waits for, to hold a request in flight.
    """

    def __init__(self, size: int, read_only: bool = False, data: bytes | None = None):
        self._size = size
        self._read_only = read_only
        self.data = bytearray(data if data is not None else bytes(size))
        self.holes = set(range(0, size, BLOCK)) if data is None else set()
        self.calls: list[tuple] = []
        self.failures: dict[str, BaseException] = {}
        self.gates: dict[int, threading.Event] = {}
        self.short_reads = False
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._read_only

    def _enter(self, name: str, *args) -> None:
        with self._lock:
            self.calls.append((name,) + args)
            failure = self.failures.get(name)
        if failure is not None:
            raise failure

    def read(self, offset: int, length: int) -> bytes:
        gate = self.gates.get(offset)
        if gate is not None:
            gate.wait(10)
        self._enter('read', offset, length)
        with self._lock:
            data = bytes(self.data[offset:offset + length])
        return data[:-1] if self.short_reads and data else data

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        self._enter('write', offset, len(data), fua)
        with self._lock:
            self.data[offset:offset + len(data)] = data
            first = offset // BLOCK * BLOCK
            self.holes.difference_update(range(first, offset + len(data), BLOCK))

    def flush(self) -> None:
        self._enter('flush')

    def write_zeroes(self, offset: int, length: int, fua: bool = False) -> None:
        self._enter('write_zeroes', offset, length, fua)
        with self._lock:
            self.data[offset:offset + length] = bytes(length)
            first = -(-offset // BLOCK) * BLOCK
            self.holes.update(range(first, offset + length - BLOCK + 1, BLOCK))

    def trim(self, offset: int, length: int) -> None:
        self._enter('trim', offset, length)
        self.write_zeroes(offset, length)

    def block_status(self, offset: int, length: int) -> list[device.Extent]:
        self._enter('block_status', offset, length)
        extents: list[device.Extent] = []
        position, end = offset, min(offset + length, self._size)
        with self._lock:
            while position < end:
                block = position // BLOCK * BLOCK
                stop = min(block + BLOCK, end)
                flags = device.STATE_HOLE | device.STATE_ZERO if block in self.holes else 0
                if extents and extents[-1].flags == flags:
                    extents[-1] = device.Extent(extents[-1].length + stop - position, flags)
                else:
                    extents.append(device.Extent(stop - position, flags))
                position = stop
        return extents


class FastMemoryDevice(MemoryDevice):
    """The same device with the read_into fast path, which the server serves differently."""

    def read_into(self, offset: int, buffer: memoryview) -> None:
        self._enter('read_into', offset, len(buffer))
        buffer[:] = self.read(offset, len(buffer))
