"""What the NBD server serves: a block device with a fixed size.

The server calls these methods from worker threads, several at once and from
several connections to the same export, so implementations must be thread
safe. A method that fails raises an ``OSError`` (its errno goes to the client)
or a ``VmcloudError`` (the client sees EIO); the server never hangs on either.
"""
import abc
import dataclasses

# Flags of a base:allocation extent, as NBD defines them.
STATE_HOLE = 1
STATE_ZERO = 2


@dataclasses.dataclass(frozen=True)
class Extent:
    length: int
    flags: int  # STATE_HOLE | STATE_ZERO, or 0 for data


class BlockDevice(abc.ABC):

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Size in bytes; never changes while served."""

    @property
    def read_only(self) -> bool:
        return False

    @abc.abstractmethod
    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset``; the range is within the device.

        :raises: OSError, VmcloudError.
        """

    def read_into(self, offset: int, buffer: memoryview) -> None:
        """Optional fast path: fill ``buffer`` with the bytes at ``offset``.

        The server calls it instead of ``read`` when a subclass overrides it,
        and then reuses its buffers from read to read: fewer allocations, and
        pages that are already mapped, which is worth about a quarter of the
        throughput of reads served from the page cache. The range is within
        the device.

        :raises: OSError, VmcloudError.
        """
        buffer[:] = self.read(offset, len(buffer))

    @abc.abstractmethod
    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        """Write ``data``; with ``fua`` it is durable before this returns.

        :raises: OSError, VmcloudError.
        """

    @abc.abstractmethod
    def flush(self) -> None:
        """Make every write that has returned, on any connection, durable.

        :raises: OSError, VmcloudError.
        """

    @abc.abstractmethod
    def write_zeroes(self, offset: int, length: int, fua: bool = False) -> None:
        """Zero a range (a hole where possible). :raises: OSError, VmcloudError."""

    def trim(self, offset: int, length: int) -> None:
        """The client no longer needs this range; reads of it then return zeroes."""
        self.write_zeroes(offset, length)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        """Extents covering at least the first byte of the range, in order.

        The default says everything is data, which is always correct.
        """
        return [Extent(length, 0)]
