"""Sparse-file primitives Python's os module lacks."""
import ctypes
import ctypes.util
import errno
import os

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library('c'), use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a range: it reads as zeroes and takes no space.

    :raises: OSError, with EOPNOTSUPP where the filesystem cannot punch holes.
    """
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f'cannot punch a hole: {os.strerror(code)}')


def is_hole(fd: int, offset: int, length: int) -> bool:
    """True if no data is allocated in ``[offset, offset + length)``."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) >= offset + length
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # no data after offset
            return True
        raise
