"""One owner at a time for a piece of node state: a lock file with an flock on it.

The NBD socket, the chunk cache and each mirror directory are each owned by one
process (one object, even: flock locks belong to an open file, so a second
owner in the same process is refused too). The kernel drops the lock when the
owner dies, however it dies, so there is never a stale lock to clean up; the
file stays behind and the next owner takes it over.

The owner writes its pid and command line into the file, so that a refusal
names the process to look at. It lives in ``vmcloud.nbd`` because the NBD
server is the lowest layer that needs it; the mirrors use it too.
"""
import errno
import fcntl
import os
import sys

from vmcloud import exception

# Long enough for a command line a person recognises; lock files stay tiny.
_MAX_HOLDER = 512


def _command() -> str:
    try:
        with open('/proc/self/cmdline', 'rb') as f:
            argv = [a.decode('utf-8', 'replace') for a in f.read().split(b'\0') if a]
    except OSError:
        argv = [sys.executable] + sys.argv
    # One line, whatever the arguments hold (``python -c`` scripts have newlines).
    return ' '.join(' '.join(argv).split())[:_MAX_HOLDER]


class StateLock:
    """An exclusive claim on ``path``, held until ``release()`` or the end of the process."""

    def __init__(self, what: str, path: str):
        """Take the lock at once or fail.

        :param what: what the lock protects, for the error ("chunk cache").
        :param path: the lock file; created if missing, never removed here.
        :raises: StateLocked naming the holder if another owner has it;
            OSError if the file cannot be created. The note naming this owner
            is written if it can be; failing to write it does not fail the lock.
        """
        self.what = what
        self.path = path
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                raise exception.StateLocked(what, path, holder(path)) from exc
            # The previous owner may have removed the file (a mirror's directory
            # goes with its lock) between our open and our lock: then the lock
            # guards nothing anyone else can find, so take the new file instead.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._fd: int | None = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f'pid {os.getpid()} ({_command()})\n'.encode('utf-8', 'replace'), 0)
        except OSError:
            # The note only names the owner in others' errors (a full disk can refuse
            # it); the lock is taken all the same, and must not be left behind
            # unreleasable by a constructor that raised.
            pass

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Give the state up; idempotent. The file stays for the next owner."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the only descriptor drops the flock

    def __enter__(self) -> 'StateLock':
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def holder(path: str) -> str:
    """Who holds the lock at ``path``, as its owner wrote it, for error messages."""
    try:
        with open(path, 'rb') as f:
            text = ' '.join(f.read(_MAX_HOLDER + 64).decode('utf-8', 'replace').split())
    except OSError:
        text = ''
    # The owner writes the line just after it takes the lock: a refusal may fall between.
    return text or 'another process'
