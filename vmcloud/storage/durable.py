"""Primitives for writes that survive a crash: temp file, fsync, rename, fsync the directory."""
import ctypes
import ctypes.util
import os
import uuid

_libc = ctypes.CDLL(ctypes.util.find_library('c'), use_errno=True)
_syncfs = getattr(_libc, 'syncfs', None)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_filesystem(path: str) -> None:
    """Make every write to the filesystem holding ``path`` durable.

    One syncfs() is far cheaper than an fsync() per file when a write session
    staged thousands of chunk files.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _syncfs is None or _syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def temp_name(directory: str, prefix: str = '.tmp-') -> str:
    return os.path.join(directory, f'{prefix}{uuid.uuid4().hex}')


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_file(path: str, data: bytes) -> None:
    """Write ``data`` to a new file at ``path``, failing if it exists. Not yet durable."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)


def _synced_temp(directory: str, data: bytes) -> str:
    tmp = temp_name(directory)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.unlink(tmp)
        raise
    finally:
        os.close(fd)
    return tmp


def atomic_write(path: str, data: bytes, tmp_dir: str | None = None) -> None:
    """Durably replace ``path`` with ``data``: readers see the old or the new bytes, never a mix."""
    directory = os.path.dirname(path)
    os.replace(_synced_temp(tmp_dir or directory, data), path)
    fsync_dir(directory)


def atomic_create(path: str, data: bytes, tmp_dir: str | None = None) -> None:
    """Durably create ``path`` with ``data``; FileExistsError if it already exists.

    link() refuses an existing name, which rename() would silently replace.
    """
    directory = os.path.dirname(path)
    tmp = _synced_temp(tmp_dir or directory, data)
    try:
        os.link(tmp, path)
    finally:
        os.unlink(tmp)
    fsync_dir(directory)
