"""The block I/O trace format, version 1: what one client asked of one NBD export.

A trace is what one guest asked of its disk, in the order it asked, with the time it
spent between requests: the requests of the NBD protocol (read, write, write zeroes,
trim, flush) and the guest's phase markers. It is written by the mirror's recorder
(``vmcloud.mirror.trace.TracingDevice``) and replayed by the replay driver
(``vmcloud.drivers.replay``); both depend on this module, which depends on neither.
The format (doc/replay.md) is text, one event a line, gzip-compressed when the file
name ends in ``.gz``::

    vmcloud-trace 1 size=<bytes> block=<bytes>
    <ms> R|W|Z|T|F <offset> <length> [<service ms>]
    <ms> P <marker>

``ms`` is the time since the disk was opened at which the request arrived,
``service ms`` how long the disk took to answer it. A recorder writes lines as
requests finish, so the reader orders events by their time.
"""
import dataclasses
import gzip
import re
from typing import IO, Iterable

from vmcloud import exception

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
#: the phase markers a trace may hold, as the guest prints them. Spelled out here
#: because NBD sits below the drivers and the mirror that also name them;
#: tests/unit/nbd/test_trace.py checks that the three lists agree.
MARKERS = ('boot-done', 'app-running', 'shutdown-started')

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


def header(size: int, block: int) -> str:
    """The first line of a trace of a disk of ``size`` bytes and chunks of ``block``,
    without its line end."""
    return f'{MAGIC} {VERSION} size={size} block={block}'


def open_text(path: str, mode: str) -> IO[str]:
    """A trace file as text, gzip if its name ends in ``.gz``; ``mode`` one of 'r', 'w',
    'x'. :raises: OSError."""
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
        with open_text(path, 'r') as f:
            first = f.readline().rstrip('\n')
            found = _HEADER.match(first)
            if not found:
                raise TraceError(path, f'not a vmcloud trace: the first line is {first[:80]!r}, '
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
    with open_text(path, 'w') as f:
        f.write(header(size, block) + '\n')
        for event in events:
            f.write(event.line() + '\n')
