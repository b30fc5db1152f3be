"""Primitives for writes that survive a crash: temp file, fsync, rename, fsync the directory.

They raise the OSError they meet, after removing what they created; callers
turn it into a StorageError naming what they were doing.
"""
import contextlib
import os
import uuid


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(directory: str, prefix: str = '.tmp-') -> str:
    return os.path.join(directory, f'{prefix}{uuid.uuid4().hex}')


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_all_at(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def replace(path: str, data: bytes) -> None:
    """Durably replace the content of ``path`` (temp file, fsync, rename, fsync the directory)."""
    directory = os.path.dirname(path)
    tmp = temp_name(directory)
    write_synced(tmp, data)
    os.replace(tmp, path)
    fsync_dir(directory)


def write_synced(path: str, data: bytes) -> None:
    """Write ``data`` to a new file at ``path`` and fsync it; FileExistsError if it exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        # The first error is the one to report, not a failure to clean up after it.
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    finally:
        os.close(fd)


def atomic_create(path: str, data: bytes, tmp_dir: str | None = None) -> None:
    """Durably create ``path`` with ``data``; FileExistsError if it already exists.

    link() refuses an existing name, which rename() would silently replace.
    On any error neither ``path`` nor the temp file is left: a caller told the
    file was not created must not find it later.
    """
    directory = os.path.dirname(path)
    tmp = temp_name(tmp_dir or directory)
    write_synced(tmp, data)
    try:
        os.link(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    try:
        fsync_dir(directory)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
