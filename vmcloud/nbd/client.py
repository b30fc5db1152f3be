"""A small synchronous NBD client (fixed newstyle, simple replies), as doc/proto.md says.

Enough to drive a disk the way a guest does: NBD_OPT_GO with an export name, then
READ, WRITE, FLUSH, TRIM, WRITE_ZEROES and DISC, one request at a time on one
connection (a caller that wants several in flight opens several connections: the
server advertises NBD_FLAG_CAN_MULTI_CONN, so a FLUSH on any of them covers all).
Every error is an NbdClientError naming the export and what went wrong.
"""
import errno
import os
import socket
import struct
import threading

from vmcloud import exception
from vmcloud.nbd import protocol as p

DEFAULT_TIMEOUT = 60.0

_COMMAND_NAMES = {p.CMD_READ: 'read', p.CMD_WRITE: 'write', p.CMD_FLUSH: 'flush',
                  p.CMD_TRIM: 'trim', p.CMD_WRITE_ZEROES: 'write zeroes'}


class NbdClientError(exception.NbdError):
    """An NBD export cannot be reached or used: ``problem`` says why."""

    def __init__(self, export: str, problem: str):
        self.export = export
        self.problem = problem
        super().__init__(f'NBD export {export!r}: {problem}')


class NbdExportNotFound(NbdClientError):
    """The server has no export of that name."""


class NbdRequestError(NbdClientError):
    """The server answered a request with an error (``error``: the NBD errno, e.g. EIO)."""

    def __init__(self, export: str, command: str, offset: int, length: int, error: int):
        self.command = command
        self.offset = offset
        self.length = length
        self.error = error
        name = errno.errorcode.get(error, 'unknown error')
        where = f' of {length} bytes at {offset}' if command != 'flush' else ''
        super().__init__(export, f'{command}{where} failed: {name} ({os.strerror(error)})')


class NbdClient:
    """One connection to one export. Thread safe: requests are sent one at a time.

    ``abort()`` may be called from any thread, also while a request waits for its
    reply: it ends that wait at once (with NbdClientError) and the connection.
    """

    def __init__(self, export: str, socket_path: str | None = None, host: str | None = None,
                 port: int = 10809, timeout: float = DEFAULT_TIMEOUT):
        """Connect and select ``export``: on the unix socket ``socket_path``, or TCP
        ``host``:``port``. ``timeout``: seconds the server may stay silent.

        :raises: NbdExportNotFound; NbdClientError for a socket or host that cannot be
            reached, a server that does not speak fixed newstyle NBD, a refused option.
        """
        if (socket_path is None) == (host is None):
            raise ValueError('give either socket_path or host')
        self.export = export
        self.where = socket_path if socket_path is not None else f'{host}:{port}'
        self._lock = threading.Lock()
        self._cookie = 0
        self._aborted = False
        try:
            if socket_path is not None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._sock.settimeout(timeout)
                self._sock.connect(socket_path)
            else:
                self._sock = socket.create_connection((host, port), timeout=timeout)
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            raise self._error(f'cannot connect to {self.where}: {exc}') from exc
        try:
            self.size, self.flags = self._handshake()
        except BaseException:
            self._sock.close()
            raise

    # -- errors and bytes ------------------------------------------------------------

    def _error(self, problem: str) -> NbdClientError:
        return NbdClientError(self.export, problem)

    def _recv(self, count: int) -> bytes:
        data = bytearray()
        while len(data) < count:
            try:
                chunk = self._sock.recv(count - len(data))
            except socket.timeout:
                raise self._error(f'{self.where} did not answer in time') from None
            except OSError as exc:
                raise self._error(self._lost(exc)) from exc
            if not chunk:
                raise self._error(self._lost(None))
            data += chunk
        return bytes(data)

    def _send(self, *parts: bytes) -> None:
        try:
            for part in parts:
                self._sock.sendall(part)
        except OSError as exc:
            raise self._error(self._lost(exc)) from exc

    def _lost(self, exc: OSError | None) -> str:
        if self._aborted:
            return 'the connection was closed by this client'
        return f'the connection to {self.where} was lost' + (f': {exc}' if exc else '')

    # -- handshake ---------------------------------------------------------------------

    def _handshake(self) -> tuple[int, int]:
        magic, option_magic, server_flags = p.HELLO.unpack(self._recv(p.HELLO.size))
        if (magic, option_magic) != (p.NBDMAGIC, p.IHAVEOPT):
            raise self._error(f'{self.where} is not a newstyle NBD server')
        if not server_flags & p.FLAG_FIXED_NEWSTYLE:
            raise self._error(f'{self.where} does not speak fixed newstyle NBD')
        self._send(p.CLIENT_FLAGS.pack(p.FLAG_FIXED_NEWSTYLE
                                       | (server_flags & p.FLAG_NO_ZEROES)))
        name = self.export.encode('utf-8')
        # No info requests: NBD_INFO_EXPORT comes anyway, and that is all this client needs.
        payload = struct.pack('>I', len(name)) + name + struct.pack('>H', 0)
        self._send(p.OPTION_HEADER.pack(p.IHAVEOPT, p.OPT_GO, len(payload)), payload)
        size = flags = None
        while True:
            magic, option, reply, length = p.OPTION_REPLY.unpack(
                self._recv(p.OPTION_REPLY.size))
            if magic != p.OPTION_REPLY_MAGIC or option != p.OPT_GO:
                raise self._error(f'{self.where} sent a malformed option reply')
            if length > p.MAX_OPTION_PAYLOAD:
                raise self._error(f'{self.where} sent an option reply of {length} bytes')
            body = self._recv(length)
            if reply == p.REP_INFO and len(body) >= 2:
                (info,) = struct.unpack_from('>H', body)
                if info == p.INFO_EXPORT and len(body) == p.INFO_EXPORT_REPLY.size:
                    _, size, flags = p.INFO_EXPORT_REPLY.unpack(body)
            elif reply == p.REP_ACK:
                if size is None:
                    raise self._error(f'{self.where} selected the export without its size')
                return size, flags
            elif reply & (1 << 31):
                message = body.decode('utf-8', 'replace') or f'error {reply & 0x7fffffff}'
                if reply == p.REP_ERR_UNKNOWN:
                    raise NbdExportNotFound(self.export, f'{self.where} has no such export '
                                                         f'({message})')
                raise self._error(f'{self.where} refused it: {message}')

    # -- transmission ------------------------------------------------------------------

    @property
    def read_only(self) -> bool:
        return bool(self.flags & p.TFLAG_READ_ONLY)

    def _request(self, command: int, offset: int = 0, length: int = 0, data: bytes = b'',
                 flags: int = 0) -> bytes:
        """Send one request and wait for its reply; the data of a read.

        :raises: NbdRequestError for an error reply, NbdClientError for a broken
            connection (it is then unusable).
        """
        with self._lock:
            self._cookie += 1
            cookie = self._cookie
            self._send(p.REQUEST.pack(p.REQUEST_MAGIC, flags, command, cookie, offset, length),
                       data)
            magic, error, answered = p.SIMPLE_REPLY.unpack(self._recv(p.SIMPLE_REPLY.size))
            if magic != p.SIMPLE_REPLY_MAGIC or answered != cookie:
                self.abort()
                raise self._error(f'{self.where} sent a malformed reply')
            if error:
                raise NbdRequestError(self.export, _COMMAND_NAMES[command], offset, length,
                                      error)
            return self._recv(length) if command == p.CMD_READ else b''

    def read(self, offset: int, length: int) -> bytes:
        """:raises: NbdRequestError, NbdClientError."""
        return self._request(p.CMD_READ, offset, length)

    def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        """:raises: NbdRequestError, NbdClientError."""
        self._request(p.CMD_WRITE, offset, len(data), data, p.CMD_FLAG_FUA if fua else 0)

    def write_zeroes(self, offset: int, length: int, fua: bool = False) -> None:
        """:raises: NbdRequestError, NbdClientError."""
        self._request(p.CMD_WRITE_ZEROES, offset, length, flags=p.CMD_FLAG_FUA if fua else 0)

    def trim(self, offset: int, length: int) -> None:
        """:raises: NbdRequestError, NbdClientError."""
        self._request(p.CMD_TRIM, offset, length)

    def flush(self) -> None:
        """:raises: NbdRequestError, NbdClientError."""
        self._request(p.CMD_FLUSH)

    def abort(self) -> None:
        """End the connection now, from any thread, without a goodbye."""
        self._aborted = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # not connected any more

    def close(self) -> None:
        """Say goodbye (NBD_CMD_DISC) if the connection is idle and usable, and close it."""
        if not self._aborted and self._lock.acquire(blocking=False):
            try:
                self._sock.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.CMD_DISC, 0, 0, 0))
            except OSError:
                pass  # gone already: closing is all that is left
            finally:
                self._lock.release()
        self.abort()
        self._sock.close()

    def __enter__(self) -> 'NbdClient':
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
