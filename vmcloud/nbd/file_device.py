"""A BlockDevice backed by a local file or block device: the simplest thing worth serving.

Reads and writes are pread/pwrite, so concurrent calls need no lock. Zeroing
punches holes, and block_status asks the filesystem where its holes are with
SEEK_DATA/SEEK_HOLE, so sparse files stay sparse and clients can skip holes.
"""
import errno
import os

from vmcloud import sparse
from vmcloud.nbd import device

# Descriptor count above which block_status stops early; the client asks again.
_MAX_EXTENTS = 1024
_ZERO_CHUNK = 1024 * 1024


class FileDevice(device.BlockDevice):
    """Serves the file at ``path``; its size is fixed when it is opened."""

    def __init__(self, path: str, read_only: bool = False):
        """:raises: OSError if the file cannot be opened."""
        self.path = path
        self._read_only = read_only
        self._fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        try:
            self._size = os.lseek(self._fd, 0, os.SEEK_END)
        except OSError:
            os.close(self._fd)
            raise
        self._can_punch = True

    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._read_only

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> 'FileDevice':
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def read(self, offset: int, length: int) -> bytes:
        """:raises: OSError, EIO if the file shrank under us."""
        data = os.pread(self._fd, length, offset)
        if len(data) == length:
            return data
        # Short reads only happen for huge lengths or a file truncated behind our back.
        buffer = bytearray(data)
        while len(buffer) < length:
            more = os.pread(self._fd, length - len(buffer), offset + len(buffer))
            if not more:
                raise OSError(errno.EIO, f'{self.path} ends before byte {offset + length}')
            buffer += more
        return bytes(buffer)

    def read_into(self, offset: int, buffer: memoryview) -> None:
        """The server's fast path: preadv straight into its reused buffer.

        :raises: OSError, EIO if the file shrank under us.
        """
        done = 0
        while done < len(buffer):
            count = os.preadv(self._fd, [buffer[done:]], offset + done)
            if count == 0:
                raise OSError(errno.EIO, f'{self.path} ends before byte {offset + len(buffer)}')
            done += count

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        """:raises: OSError."""
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, offset)
            view = view[written:]
            offset += written
        if fua:
            os.fdatasync(self._fd)

    def flush(self) -> None:
        """fdatasync covers writes made through every connection: they share the file.

        :raises: OSError.
        """
        os.fdatasync(self._fd)

    def write_zeroes(self, offset: int, length: int, fua: bool = False) -> None:
        """Punch a hole, or write zeroes where the filesystem (or a block device) cannot.

        :raises: OSError.
        """
        if length == 0:
            return
        if self._can_punch:
            try:
                sparse.punch_hole(self._fd, offset, length)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENODEV):
                    raise
                self._can_punch = False
        if not self._can_punch:
            zeroes = bytes(min(length, _ZERO_CHUNK))
            end = offset + length
            while offset < end:
                self.write(offset, zeroes[:end - offset])
                offset += min(len(zeroes), end - offset)
        if fua:
            os.fdatasync(self._fd)

    def block_status(self, offset: int, length: int) -> list[device.Extent]:
        """Data and holes of the range as the filesystem reports them.

        :raises: OSError.
        """
        extents = []
        end = offset + length
        while offset < end and len(extents) < _MAX_EXTENTS:
            try:
                data = os.lseek(self._fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:      # nothing but hole up to the end of the file
                    data = self._size
                elif exc.errno == errno.EINVAL:   # the filesystem cannot tell: say data
                    return [device.Extent(end - offset, 0)] if not extents else extents
                else:
                    raise
            if data > offset:
                stop = min(data, end)
                extents.append(device.Extent(stop - offset, device.STATE_HOLE | device.STATE_ZERO))
            else:
                stop = min(os.lseek(self._fd, offset, os.SEEK_HOLE), end)
                extents.append(device.Extent(stop - offset, 0))
            offset = stop
        return extents
