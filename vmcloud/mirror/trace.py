"""Block I/O traces of a guest's disk: the format, a recorder and a reader.

A trace is what one guest asked of its disk, in the order it asked, with the
time it spent between requests: the replay driver issues the same requests
against another mirror, so an "instance" that runs no CPU has the storage
behaviour of a real boot. The format (version 1, doc/replay.md) is text, one
event a line, gzip-compressed when the file name ends in ``.gz``::

    vmcloud-trace 1 size=<bytes> block=<bytes>
    <ms> R|W|Z|T|F <offset> <length> [<service ms>]
    <ms> P <marker>

``ms`` is the time since the disk was opened at which the request arrived,
``service ms`` how long the disk took to answer it. The recorder is a
BlockDevice that forwards every call to the device it wraps, so the NBD server
serves it exactly as it would serve that device, and appends an event for each
request; lines are written as requests finish, so the reader orders events by
their time.
"""
import dataclasses
import gzip
import io
import logging
import os
import re
import threading
import time
from typing import Iterable

from vmcloud import exception
from vmcloud.mirror import profile as profile_mod
from vmcloud.nbd import device as device_mod

LOG = logging.getLogger(__name__)

VERSION = 1
MAGIC = 'vmcloud-trace'

READ = 'R'
WRITE = 'W'
WRITE_ZEROES = 'Z'
TRIM = 'T'
FLUSH = 'F'
PHASE = 'P'
#: requests that carry a byte range
RANGED = (READ, WRITE, WRITE_ZEROES, TRIM)
REQUESTS = RANGED + (FLUSH,)
#: the phase markers a trace may hold: the guest's, as the mirror takes them
MARKERS = tuple(profile_mod.MARKERS)

# Lines kept in memory before they go to the file: a boot makes tens of thousands
# of requests, and a write per request would put a system call on each guest I/O.
_BUFFERED_LINES = 4096
_HEADER = re.compile(rf'^{MAGIC} (\d+) size=(\d+) block=(\d+)$')
_NUMBER = re.compile(r'^\d+(\.\d+)?$')
_INTEGER = re.compile(r'^\d+$')


class TraceError(exception.VmcloudError):
    """A trace file cannot be read: missing, not a trace, or a line that does not parse."""

    def __init__(self, path: str, problem: str, line: int | None = None):
        self.path = path
        self.problem = problem
        self.line = line
        where = f'{path} line {line}' if line is not None else path
        super().__init__(f'trace {where}: {problem}')


@dataclasses.dataclass(frozen=True)
class Event:
    """One line of a trace: a request (``op`` in REQUESTS) or a phase marker (PHASE)."""

    ms: float
    op: str
    offset: int = 0
    length: int = 0
    service_ms: float = 0.0
    marker: str = ''

    def line(self) -> str:
        if self.op == PHASE:
            return f'{self.ms:.3f} {PHASE} {self.marker}'
        return f'{self.ms:.3f} {self.op} {self.offset} {self.length} {self.service_ms:.3f}'


@dataclasses.dataclass(frozen=True)
class Trace:
    """A whole trace, events in time order (ties in file order)."""

    path: str
    size: int
    block: int
    events: tuple[Event, ...]

    def requests(self) -> list[Event]:
        return [e for e in self.events if e.op != PHASE]

    def markers(self) -> list[str]:
        return [e.marker for e in self.events if e.op == PHASE]

    def bytes_of(self, op: str) -> int:
        return sum(e.length for e in self.events if e.op == op)

    def blocks(self, ops: Iterable[str] = RANGED) -> set[int]:
        """Indexes of the ``block``-sized blocks that requests of ``ops`` touch."""
        wanted = set(ops)
        found: set[int] = set()
        for event in self.events:
            if event.op in wanted and event.length:
                found.update(range(event.offset // self.block,
                                   (event.offset + event.length - 1) // self.block + 1))
        return found

    @property
    def duration_ms(self) -> float:
        return max((e.ms + e.service_ms for e in self.events), default=0.0)


def _open_text(path: str, mode: str):
    """The trace file as text; gzip by name."""
    if path.endswith('.gz'):
        return gzip.open(path, mode + 't', encoding='ascii', newline='\n')
    return open(path, mode, encoding='ascii', newline='\n')


def _parse_event(fields: list[str], size: int) -> Event:
    """:raises: ValueError saying what is wrong with the line."""
    if len(fields) < 2:
        raise ValueError('expected "<ms> <op> ..."')
    ms_text, op = fields[0], fields[1]
    if not _NUMBER.match(ms_text):
        raise ValueError(f'time {ms_text!r} is not a number of milliseconds')
    ms = float(ms_text)
    if op == PHASE:
        if len(fields) != 3:
            raise ValueError('a phase line is "<ms> P <marker>"')
        if fields[2] not in MARKERS:
            raise ValueError(f'unknown phase marker {fields[2]!r}; expected one of '
                             f'{", ".join(MARKERS)}')
        return Event(ms, PHASE, marker=fields[2])
    if op not in REQUESTS:
        raise ValueError(f'unknown operation {op!r}; expected one of '
                         f'{", ".join(REQUESTS + (PHASE,))}')
    if len(fields) not in (4, 5):
        raise ValueError(f'a request line is "<ms> {op} <offset> <length> [<service ms>]"')
    for text, what in ((fields[2], 'offset'), (fields[3], 'length')):
        if not _INTEGER.match(text):
            raise ValueError(f'{what} {text!r} is not a whole number of bytes')
    offset, length = int(fields[2]), int(fields[3])
    service = 0.0
    if len(fields) == 5:
        if not _NUMBER.match(fields[4]):
            raise ValueError(f'service time {fields[4]!r} is not a number of milliseconds')
        service = float(fields[4])
    if op == FLUSH and (offset or length):
        raise ValueError('a flush has no range: "<ms> F 0 0"')
    if offset + length > size:
        raise ValueError(f'range {offset}+{length} ends beyond the disk ({size} bytes)')
    return Event(ms, op, offset, length, service)


def read(path: str) -> Trace:
    """Read and check a whole trace.

    :raises: TraceError naming the file, and the line for a line that does not parse.
    """
    try:
        with _open_text(path, 'r') as f:
            header = f.readline().rstrip('\n')
            found = _HEADER.match(header)
            if not found:
                raise TraceError(path, f'not a vmcloud trace: the first line is {header[:80]!r}, '
                                       f'expected "{MAGIC} {VERSION} size=<bytes> '
                                       f'block=<bytes>"', 1)
            version, size, block = (int(g) for g in found.groups())
            if version != VERSION:
                raise TraceError(path, f'format version {version}; this vmcloud reads '
                                       f'version {VERSION}', 1)
            if block < 1:
                raise TraceError(path, 'block size 0', 1)
            events = []
            for number, text in enumerate(f, start=2):
                fields = text.split()
                if not fields:
                    continue
                try:
                    events.append(_parse_event(fields, size))
                except ValueError as exc:
                    raise TraceError(path, str(exc), number) from None
    except FileNotFoundError:
        raise TraceError(path, 'no such file') from None
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        # gzip.BadGzipFile is an OSError; a cut gzip stream is an EOFError
        raise TraceError(path, f'cannot be read: {exc}') from exc
    # Lines are written as requests finish: a request issued earlier may come later.
    events.sort(key=lambda e: e.ms)
    return Trace(path, size, block, tuple(events))


def write(path: str, size: int, block: int, events: Iterable[Event]) -> None:
    """Write a whole trace (for tools and tests that make one). :raises: OSError."""
    with _open_text(path, 'w') as f:
        f.write(f'{MAGIC} {VERSION} size={size} block={block}\n')
        for event in events:
            f.write(event.line() + '\n')


class TracingDevice(device_mod.BlockDevice):
    """Serves ``device`` unchanged and records every request it gets into ``path``.

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
            self._file = _open_text(path, 'w')
            self._file.write(f'{MAGIC} {VERSION} size={device.size} block={block}\n')
            self._file.flush()  # a trace read while it is recorded is a trace already
        except OSError as exc:
            self._give_up(exc)

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
            self._record(READ, started, offset, length)

    def read_into(self, offset: int, buffer: memoryview) -> None:
        # Overridden whatever the wrapped device does, so the server takes its fast
        # path: the wrapped device's own read_into (or its default, from read) does
        # the work.
        started = time.monotonic()
        try:
            self.device.read_into(offset, buffer)
        finally:
            self._record(READ, started, offset, len(buffer))

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        started = time.monotonic()
        try:
            self.device.write(offset, data, fua)
        finally:
            self._record(WRITE, started, offset, len(data), fua)

    def write_zeroes(self, offset: int, length: int, fua: bool = False) -> None:
        started = time.monotonic()
        try:
            self.device.write_zeroes(offset, length, fua)
        finally:
            self._record(WRITE_ZEROES, started, offset, length, fua)

    def trim(self, offset: int, length: int) -> None:
        started = time.monotonic()
        try:
            self.device.trim(offset, length)
        finally:
            self._record(TRIM, started, offset, length)

    def flush(self) -> None:
        started = time.monotonic()
        try:
            self.device.flush()
        finally:
            self._record(FLUSH, started, 0, 0)

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
        line = Event(self._ms(started), op, offset, length, (finished - started) * 1000).line()
        with self._lock:
            self._lines.append(line)
            if fua:
                # Durable on its own: to a replay, as good as the write and a flush.
                self._lines.append(Event(self._ms(finished), FLUSH).line())
            if len(self._lines) >= _BUFFERED_LINES:
                self._write_out(flush=False)

    def mark(self, marker: str) -> None:
        """The guest reached phase ``marker`` (one of MARKERS) now; the file is flushed."""
        if self._file is None:
            return
        line = Event(self._ms(time.monotonic()), PHASE, marker=marker).line()
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
