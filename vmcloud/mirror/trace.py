"""The recorder of block I/O traces: a mirror's disk, served as it is, its requests written
down.

With ``[mirror] trace_path`` set, the mirror manager serves each mirror's disk through a
TracingDevice: a BlockDevice that forwards every call to the device it wraps, so the NBD
server serves it exactly as it would serve that device, and appends an event for each
request to a trace in the format of ``vmcloud.nbd.trace`` (doc/replay.md). Lines are
written as requests finish; the reader orders events by their time.

Each time a mirror is served is a session of its own, in a file of its own: the first
one records into the path it is given (``<trace_path>/<mirror>.trace``), a later one
(the mirror served again after a restart, or a new mirror of the same name) into the
first free ``<mirror>@2.trace``, ``<mirror>@3.trace``, ...; an earlier session's file is
never opened for writing again. The sessions are not joined into one trace: each counts
its times from its own start, and what the guest did between two of them was not seen.
"""
import io
import logging
import os
import threading
import time

from vmcloud.nbd import device as device_mod
from vmcloud.nbd import trace as trace_format

LOG = logging.getLogger(__name__)

#: between a trace file's stem and the number of its session, from the second one on:
#: no mirror name has it (letters, digits, '.', '_', '-'), so the file of one mirror's
#: later session is never the first file of another mirror
SESSION_MARK = '@'
# Suffixes a session number goes in front of, longest first.
_SUFFIXES = ('.trace.gz', '.trace', '.gz')

# Lines kept in memory before they go to the file: a boot makes tens of thousands
# of requests, and a write per request would put a system call on each guest I/O.
_BUFFERED_LINES = 4096


def session_path(path: str, session: int) -> str:
    """The file of session ``session`` (1, 2, ...) of the trace ``path``: ``path`` itself
    for the first, ``dir/vm1@2.trace`` for the second of ``dir/vm1.trace`` (likewise
    ``vm1@2.trace.gz``).

    :raises: ValueError for a session below 1.
    """
    if session < 1:
        raise ValueError(f'trace sessions count from 1, not {session}')
    if session == 1:
        return path
    directory, leaf = os.path.split(path)
    for suffix in _SUFFIXES:
        if leaf.endswith(suffix) and len(leaf) > len(suffix):
            stem = leaf[:-len(suffix)]
            break
    else:
        stem, suffix = leaf, ''
    return os.path.join(directory, f'{stem}{SESSION_MARK}{session}{suffix}')


class TracingDevice(device_mod.BlockDevice):
    """Serves ``device`` unchanged and records every request it gets into the first free
    session file of ``path`` (session_path; ``self.path`` names the one it took).

    Tracing never fails the guest: a trace that cannot be opened or written logs one
    warning and stops, and the device goes on being served. Lines are kept in memory
    and written in batches, and the file is flushed at each phase mark and on close.
    """

    def __init__(self, device: device_mod.BlockDevice, path: str, block: int):
        self.device = device
        self.path = path
        self._lock = threading.Lock()
        self._lines: list[str] = []
        self._file: io.TextIOBase | None = None
        self._started = time.monotonic()
        try:
            os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
            self._file = self._open_session(path)
            self._file.write(trace_format.header(device.size, block) + '\n')
            self._file.flush()  # a trace read while it is recorded is a trace already
        except OSError as exc:
            self._give_up(exc)

    def _open_session(self, path: str) -> io.TextIOBase:
        """The first session file of ``path`` that does not exist yet, created: an
        earlier session's records stay as they are. :raises: OSError."""
        session = 1
        while True:
            self.path = session_path(path, session)
            try:
                opened = trace_format.open_text(self.path, 'x')
            except FileExistsError:
                session += 1
                continue
            if session > 1:
                LOG.info('block I/O trace %s has a session already: this one is recorded '
                         'into %s', path, self.path)
            return opened

    # -- the wrapped device, forwarded --------------------------------------------

    @property
    def size(self) -> int:
        return self.device.size

    @property
    def read_only(self) -> bool:
        return self.device.read_only

    def read(self, offset: int, length: int) -> bytes:
        started = time.monotonic()
        try:
            return self.device.read(offset, length)
        finally:
            self._record(trace_format.READ, started, offset, length)

    def read_into(self, offset: int, buffer: memoryview) -> None:
        # Overridden whatever the wrapped device does, so the server takes its fast
        # path: the wrapped device's own read_into (or its default, from read) does
        # the work.
        started = time.monotonic()
        try:
            self.device.read_into(offset, buffer)
        finally:
            self._record(trace_format.READ, started, offset, len(buffer))

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        started = time.monotonic()
        try:
            self.device.write(offset, data, fua)
        finally:
            self._record(trace_format.WRITE, started, offset, len(data), fua)

    def write_zeroes(self, offset: int, length: int, fua: bool = False) -> None:
        started = time.monotonic()
        try:
            self.device.write_zeroes(offset, length, fua)
        finally:
            self._record(trace_format.WRITE_ZEROES, started, offset, length, fua)

    def trim(self, offset: int, length: int) -> None:
        started = time.monotonic()
        try:
            self.device.trim(offset, length)
        finally:
            self._record(trace_format.TRIM, started, offset, length)

    def flush(self) -> None:
        started = time.monotonic()
        try:
            self.device.flush()
        finally:
            self._record(trace_format.FLUSH, started, 0, 0)

    def block_status(self, offset: int, length: int) -> list[device_mod.Extent]:
        # Not a request of the guest's storage behaviour (no data moves): not recorded.
        return self.device.block_status(offset, length)

    # -- recording -----------------------------------------------------------------

    @property
    def tracing(self) -> bool:
        """False once the trace was given up (or closed)."""
        return self._file is not None

    def _ms(self, moment: float) -> float:
        return (moment - self._started) * 1000

    def _record(self, op: str, started: float, offset: int, length: int,
                fua: bool = False) -> None:
        if self._file is None:
            return
        finished = time.monotonic()
        line = trace_format.Event(self._ms(started), op, offset, length,
                                  (finished - started) * 1000).line()
        with self._lock:
            self._lines.append(line)
            if fua:
                # Durable on its own: to a replay, as good as the write and a flush.
                self._lines.append(trace_format.Event(self._ms(finished),
                                                      trace_format.FLUSH).line())
            if len(self._lines) >= _BUFFERED_LINES:
                self._write_out(flush=False)

    def mark(self, marker: str) -> None:
        """The guest reached phase ``marker`` (one of trace_format.MARKERS) now; the file
        is flushed."""
        if self._file is None:
            return
        line = trace_format.Event(self._ms(time.monotonic()), trace_format.PHASE,
                                  marker=marker).line()
        with self._lock:
            self._lines.append(line)
            self._write_out(flush=True)

    def _write_out(self, flush: bool) -> None:
        """Called with the lock held."""
        if self._file is None:
            return
        try:
            self._file.write(''.join(f'{line}\n' for line in self._lines))
            if flush:
                self._file.flush()
        except (OSError, ValueError) as exc:
            self._give_up(exc)
        self._lines.clear()

    def _give_up(self, exc: Exception) -> None:
        LOG.warning('block I/O trace %s stopped, the disk is served untraced: %s',
                    self.path, exc)
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        """Write what is left and close the trace; the wrapped device stays open."""
        with self._lock:
            self._write_out(flush=True)
            file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except (OSError, ValueError) as exc:
                LOG.warning('block I/O trace %s may be incomplete: %s', self.path, exc)
