"""An asyncio NBD server (fixed newstyle) that serves BlockDevices to qemu and libnbd clients.

The rest of vmcloud is threaded, so the server runs its own event loop in a
daemon thread and is driven from ordinary threads::

    with NbdServer() as server:
        server.add_export('disk', device)
        port = server.listen_tcp()
        ...

The loop only moves bytes. Device calls may block for seconds (a device may
fetch from a remote store), so they run in a thread pool owned by the server.
Requests on one connection are served concurrently, up to ``max_in_flight`` at
a time, and each reply is written whole in one step on the loop.

Memory is bounded with back-pressure. Every request is charged the bytes it
makes the server hold (its write payload, its read buffer as the pool hands it
out, its reply) from before its payload is read until its reply has left the
transport for the kernel. A connection stops reading requests while its charges exceed
``max_connection_bytes``, and every connection does while the server's total
(``buffered_bytes``) exceeds ``max_buffered_bytes``; so a client that sends
large reads and never reads the replies holds at most its share. A request on
its own may always go ahead when nothing else is charged: one request of up to
32 MiB must be servable.

``BlockDevice.flush`` is global across connections, which is what lets the
server advertise NBD_FLAG_CAN_MULTI_CONN.
"""
import asyncio
import concurrent.futures
import dataclasses
import logging
import os
import socket
import struct
import threading
from typing import Any, Callable, Coroutine

from vmcloud import exception
from vmcloud.nbd import device as device_mod
from vmcloud.nbd import protocol as p
from vmcloud.nbd import statelock

LOG = logging.getLogger(__name__)

_ZEROES_124 = bytes(124)
# Long enough for a device's error text, short enough never to matter on the wire.
_MAX_ERROR_MESSAGE = 1024
# What a request costs beyond its payload: its header and the largest reply it
# can get without data (an error with its message). Charged up front, so that
# floods of tiny requests count too.
_REQUEST_OVERHEAD = 64 + _MAX_ERROR_MESSAGE
# Extents in one block status reply at most; a client asks again for the rest (the
# protocol allows a reply to cover less than was asked). It bounds the reply, so
# that its request can be charged for it up front.
_MAX_DESCRIPTORS = 8192
_BLOCK_STATUS_CHARGE = 4 + 8 * _MAX_DESCRIPTORS
# A write payload is read in pieces of this size when it has to be thrown away.
_DISCARD_CHUNK = 1024 * 1024
# Big socket buffers let a whole read reply leave in one send() instead of
# being copied into the transport's buffer and sent piecemeal.
_SOCKET_BUFFER = 4 * 1024 * 1024
MIB = 1024 * 1024


@dataclasses.dataclass
class _Export:
    name: str
    device: device_mod.BlockDevice
    description: str


class _BufferPool:
    """Read buffers reused from request to request, by power-of-two size.

    Fresh buffers cost page faults and zeroing on every read, which is most of
    what separates a Python server from a C one on reads served from cache.
    Only the loop thread takes and returns buffers. Big buffers are not kept:
    they are rare, and each would pin more memory than the pool saves.
    """

    def __init__(self, max_bytes: int = 64 * MIB, max_buffer: int = 4 * MIB):
        self.max_bytes = max_bytes
        self.max_buffer = max_buffer
        self._free: dict[int, list[bytearray]] = {}
        self._bytes = 0

    @property
    def bytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        self._free.clear()
        self._bytes = 0

    @staticmethod
    def size_for(length: int) -> int:
        """The size of the buffer ``get(length)`` hands out, what a read holds."""
        return max(64 * 1024, 1 << (length - 1).bit_length())

    def get(self, length: int) -> bytearray:
        size = self.size_for(length)
        free = self._free.get(size)
        if free:
            self._bytes -= size
            return free.pop()
        return bytearray(size)

    def put(self, buffer: bytearray) -> None:
        if len(buffer) <= self.max_buffer and self._bytes + len(buffer) <= self.max_bytes:
            self._free.setdefault(len(buffer), []).append(buffer)
            self._bytes += len(buffer)


class _Closed(Exception):
    """The client went away or broke the protocol; the connection just ends."""


class NbdServer:
    """Serves named exports over unix sockets and TCP until stopped."""

    def __init__(self, max_workers: int = 32, max_in_flight: int = 16,
                 handshake_timeout: float = 30.0, max_connection_bytes: int = 64 * MIB,
                 max_buffered_bytes: int = 256 * MIB):
        """
        :param max_workers: threads for device calls, shared by all connections.
        :param max_in_flight: concurrent requests per connection; later ones wait.
        :param handshake_timeout: seconds a client may take to pick an export.
        :param max_connection_bytes: request and reply bytes one connection may
            hold before it stops reading requests.
        :param max_buffered_bytes: the same across all connections.
        """
        self.max_in_flight = max_in_flight
        self.handshake_timeout = handshake_timeout
        self.max_connection_bytes = max_connection_bytes
        self.max_buffered_bytes = max_buffered_bytes
        # Bytes charged to requests not yet answered or whose replies are still in
        # a transport's buffer; only the loop changes it.
        self._buffered = 0
        self._budget_waiters: set[asyncio.Future] = set()
        self._unix_locks: list[statelock.StateLock] = []
        self._exports: dict[str, _Export] = {}
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers, thread_name_prefix='nbd-device')
        self._thread: threading.Thread | None = None
        self._listeners: list[asyncio.AbstractServer] = []
        self._unix_paths: list[str] = []
        self._connections: set[_Connection] = set()
        self._buffers = _BufferPool()
        self._stopped = False

    # -- exports -----------------------------------------------------------

    def add_export(self, name: str, device: device_mod.BlockDevice,
                   description: str = '') -> None:
        """Serve ``device`` as ``name`` to every later connection.

        :raises: NbdError if the name is taken or too long for the protocol.
        """
        if len(name.encode('utf-8')) > p.MAX_NAME:
            raise exception.NbdError(f'export name {name[:64]!r}... is longer than '
                                     f'{p.MAX_NAME} bytes')
        with self._lock:
            if name in self._exports:
                raise exception.NbdError(f'export {name!r} already exists')
            self._exports[name] = _Export(name, device, description)

    def remove_export(self, name: str) -> None:
        """Stop serving ``name``: close its connections, wait for their device calls to end.

        When this returns the server no longer touches the device. Do not call
        it from a device method: it waits for those to return.

        :raises: NbdError if there is no such export.
        """
        with self._lock:
            if self._exports.pop(name, None) is None:
                raise exception.NbdError(f'export {name!r} does not exist')
        if not self._stopped:
            self._call(self._close_connections(lambda c: c.export_name == name))

    @property
    def buffered_bytes(self) -> int:
        """Request and reply bytes the server holds now, what its back-pressure limits."""
        return self._buffered

    @property
    def pooled_bytes(self) -> int:
        """Bytes of idle read buffers kept for reuse; none once every client has left."""
        return self._buffers.bytes

    def export_names(self) -> list[str]:
        with self._lock:
            return sorted(self._exports)

    def _export(self, name: str) -> _Export | None:
        with self._lock:
            return self._exports.get(name)

    # -- listening ---------------------------------------------------------

    def listen_unix(self, path: str) -> None:
        """Accept connections on a unix socket at ``path`` (replacing a stale socket there).

        The socket is owned through the lock file ``PATH.lock``: a socket whose
        owner is alive is never replaced, and its clients never taken over.

        :raises: StateLocked naming the owner if another server has the socket;
            NbdError if the socket cannot be created.
        """
        try:
            lock = statelock.StateLock('NBD socket', f'{path}.lock')
        except OSError as exc:
            raise exception.NbdError(f'cannot listen on {path}: {exc}') from exc
        try:
            listener = self._call(asyncio.start_unix_server(
                self._serve_client, path, limit=_SOCKET_BUFFER))
        except BaseException as exc:
            lock.release()
            if isinstance(exc, OSError):
                raise exception.NbdError(f'cannot listen on {path}: {exc}') from exc
            raise
        self._listeners.append(listener)
        self._unix_paths.append(path)
        self._unix_locks.append(lock)

    def listen_tcp(self, host: str = '127.0.0.1', port: int = 0) -> int:
        """Accept connections on ``host``:``port``; port 0 picks a free one.

        :returns: the port actually bound.
        :raises: NbdError if the address cannot be bound.
        """
        try:
            listener = self._call(asyncio.start_server(
                self._serve_client, host, port, limit=_SOCKET_BUFFER, reuse_address=True))
        except OSError as exc:
            raise exception.NbdError(f'cannot listen on {host}:{port}: {exc}') from exc
        self._listeners.append(listener)
        return listener.sockets[0].getsockname()[1]

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Run the event loop in a daemon thread; a second call does nothing.

        :raises: NbdError if the server was stopped.
        """
        if self._stopped:
            raise exception.NbdError('the NBD server was stopped; create a new one')
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop.run_forever, name='nbd-server',
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Close listeners and connections, wait for device calls, end the thread. Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        try:
            self._call(self._shutdown())
        finally:
            if self._thread is not None:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join()
            self._executor.shutdown(wait=True)
            self._loop.close()
            for path in self._unix_paths:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            # Only once the socket is gone: the next owner may then create its own.
            for lock in self._unix_locks:
                lock.release()

    def __enter__(self) -> 'NbdServer':
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _call(self, coroutine: Coroutine) -> Any:
        """Run ``coroutine`` on the server's loop from any thread other than the loop's.

        :raises: NbdError if the loop is closed or this is the loop's thread.
        """
        if self._loop.is_closed():
            coroutine.close()
            raise exception.NbdError('the NBD server was stopped')
        if self._thread is None:
            return self._loop.run_until_complete(coroutine)
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise exception.NbdError('cannot wait for the NBD server from its own thread')
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    async def _shutdown(self) -> None:
        for listener in self._listeners:
            listener.close()
        await self._close_connections(lambda c: True)

    async def _close_connections(self, which: Callable[['_Connection'], bool]) -> None:
        doomed = [c for c in self._connections if which(c)]
        for connection in doomed:
            connection.close()
        if doomed:
            await asyncio.gather(*(c.finished.wait() for c in doomed))

    async def _serve_client(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        if self._stopped:
            writer.close()
            return
        connection = _Connection(self, reader, writer)
        self._connections.add(connection)
        try:
            await connection.run()
        finally:
            self._connections.discard(connection)
            if not self._connections:
                self._buffers.clear()  # an idle server keeps no read buffers

    def _fits(self, connection: '_Connection', charge: int) -> bool:
        return ((connection.held == 0 or connection.held + charge <= self.max_connection_bytes)
                and (self._buffered == 0
                     or self._buffered + charge <= self.max_buffered_bytes))

    def _wake_budget_waiters(self) -> None:
        for waiter in self._budget_waiters:
            if not waiter.done():
                waiter.set_result(None)


class _Connection:
    """One client: the option haggling, then the transmission phase."""

    def __init__(self, server: NbdServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter):
        self.server = server
        self.reader = reader
        self.writer = writer
        self.export_name: str | None = None
        self.finished = asyncio.Event()
        self.peer = writer.get_extra_info('peername') or 'unix socket'
        self._structured = False
        self._no_zeroes = False
        # (export name, whether base:allocation is selected) from SET_META_CONTEXT.
        self._meta_context: tuple[str, bool] | None = None
        self._closing = False
        # Bytes charged to this connection (see the module docstring), and the
        # part of them whose replies wait in the transport's buffer.
        self.held = 0
        self._unsent = 0
        self._drainer: asyncio.Task | None = None
        sock = writer.get_extra_info('socket')
        if sock is not None:
            _tune_socket(sock)
        # The transport pauses as soon as it buffers anything and resumes only
        # once it is empty, so drain() tells when every written reply has left.
        writer.transport.set_write_buffer_limits(high=0)

    def close(self) -> None:
        """Hang up now; replies not yet sent are dropped, as nobody will read them."""
        self._closing = True
        self.writer.transport.abort()
        self.server._wake_budget_waiters()

    async def run(self) -> None:
        try:
            try:
                export = await asyncio.wait_for(self._negotiate(), self.server.handshake_timeout)
            except asyncio.TimeoutError:
                LOG.warning('NBD client %s did not finish the handshake in time', self.peer)
                return
            if export is not None:
                await self._transmit(export)
                await self._settle()
        except (_Closed, asyncio.IncompleteReadError, ConnectionError):
            pass
        except OSError as exc:  # the peer's host went away (ETIMEDOUT, EHOSTUNREACH)
            LOG.warning('NBD connection from %s lost: %s', self.peer, exc)
        except Exception:
            LOG.exception('NBD connection from %s failed', self.peer)
        finally:
            if self._drainer is not None:
                self._drainer.cancel()
                await asyncio.gather(self._drainer, return_exceptions=True)
            if self.writer.transport.get_write_buffer_size():
                # The client left without reading: drop the replies rather than keep
                # them, uncounted, for as long as it leaves the socket open.
                self.writer.transport.abort()
            else:
                self.writer.close()
            self._release(self.held)
            self.finished.set()

    # -- back-pressure -----------------------------------------------------

    async def reserve(self, charge: int) -> None:
        """Wait until this connection and the server may hold ``charge`` more bytes.

        :raises: _Closed if the connection is closed meanwhile.
        """
        server = self.server
        while not server._fits(self, charge):
            if self._closing:
                raise _Closed()
            waiter = asyncio.get_running_loop().create_future()
            server._budget_waiters.add(waiter)
            try:
                await waiter
            finally:
                server._budget_waiters.discard(waiter)
        if self._closing:
            raise _Closed()
        self.held += charge
        server._buffered += charge

    def _release(self, charge: int) -> None:
        if charge:
            self.held -= charge
            self.server._buffered -= charge
            self.server._wake_budget_waiters()

    def written(self, charge: int) -> None:
        """A request's reply was handed to the transport (or never will be): its
        charge ends once the transport has passed every byte to the kernel."""
        if self.writer.is_closing() or self.writer.transport.get_write_buffer_size() == 0:
            self._release(charge)
            return
        self._unsent += charge
        if self._drainer is None:
            self._drainer = asyncio.ensure_future(self._drain_unsent())

    async def _drain_unsent(self) -> None:
        try:
            while self._unsent:
                try:
                    await self.writer.drain()
                except OSError:
                    # The connection was lost, not only reset: a TCP peer whose host
                    # died ends with ETIMEDOUT. Either way the charges must end.
                    self.close()
                if self.writer.is_closing() or self.writer.transport.get_write_buffer_size() == 0:
                    unsent, self._unsent = self._unsent, 0
                    self._release(unsent)
                else:
                    # The transport resumed and was refilled before this task ran.
                    await asyncio.sleep(0)
        finally:
            self._drainer = None

    async def _settle(self) -> None:
        """After the last request: wait until its replies have left, or the client has."""
        while self._drainer is not None and not self._closing:
            await asyncio.shield(self._drainer)

    # -- handshake ---------------------------------------------------------

    async def _negotiate(self) -> _Export | None:
        """Haggle over options until the client picks an export (or leaves: None)."""
        self.writer.write(p.HELLO.pack(p.NBDMAGIC, p.IHAVEOPT,
                                       p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES))
        (flags,) = p.CLIENT_FLAGS.unpack(await self.reader.readexactly(4))
        if flags & ~p.KNOWN_CLIENT_FLAGS:
            raise _Closed()
        self._no_zeroes = bool(flags & p.FLAG_NO_ZEROES)
        while not self._closing:
            magic, option, length = p.OPTION_HEADER.unpack(
                await self.reader.readexactly(p.OPTION_HEADER.size))
            if magic != p.IHAVEOPT:
                raise _Closed()
            if length > p.MAX_OPTION_PAYLOAD:
                await self._discard(length)
                await self._reply(option, p.REP_ERR_TOO_BIG, b'option payload too large')
                continue
            payload = await self.reader.readexactly(length)
            handler = self._OPTIONS.get(option)
            if handler is None:
                await self._reply(option, p.REP_ERR_UNSUP,
                                  f'option {option} is not supported'.encode())
                continue
            try:
                export = await handler(self, option, payload)
            except p.BadOption as exc:
                await self._reply(option, p.REP_ERR_INVALID, str(exc).encode())
                continue
            if export is not None:
                return export
        return None

    async def _reply(self, option: int, reply_type: int, payload: bytes = b'') -> None:
        self.writer.write(p.OPTION_REPLY.pack(p.OPTION_REPLY_MAGIC, option, reply_type,
                                              len(payload)) + payload)
        await self.writer.drain()

    async def _discard(self, length: int) -> None:
        while length:
            chunk = await self.reader.read(min(length, _DISCARD_CHUNK))
            if not chunk:
                raise _Closed()
            length -= len(chunk)

    def _transmission_flags(self, export: _Export) -> int:
        flags = p.TFLAG_HAS_FLAGS | p.TFLAG_SEND_FLUSH | p.TFLAG_CAN_MULTI_CONN
        if export.device.read_only:
            flags |= p.TFLAG_READ_ONLY
        else:
            flags |= p.TFLAG_SEND_FUA | p.TFLAG_SEND_TRIM | p.TFLAG_SEND_WRITE_ZEROES
        if self._structured:
            flags |= p.TFLAG_SEND_DF
        return flags

    async def _opt_export_name(self, option: int, payload: bytes) -> _Export | None:
        name = payload.decode('utf-8', 'replace')
        export = self._select(name)
        if export is None:
            # NBD_OPT_EXPORT_NAME has no way to report an error but hanging up.
            LOG.warning('NBD client %s asked for unknown export %r', self.peer, name)
            raise _Closed()
        reply = p.EXPORT_NAME_REPLY.pack(export.device.size, self._transmission_flags(export))
        self.writer.write(reply if self._no_zeroes else reply + _ZEROES_124)
        await self.writer.drain()
        return export

    async def _opt_abort(self, option: int, payload: bytes) -> None:
        await self._reply(option, p.REP_ACK)
        raise _Closed()

    async def _opt_list(self, option: int, payload: bytes) -> None:
        if payload:
            raise p.BadOption('NBD_OPT_LIST takes no payload')
        for name in self.server.export_names():
            export = self.server._export(name)
            if export is None:
                continue
            encoded = name.encode('utf-8')
            await self._reply(option, p.REP_SERVER, struct.pack('>I', len(encoded)) + encoded
                              + export.description.encode('utf-8'))
        await self._reply(option, p.REP_ACK)

    async def _opt_info_go(self, option: int, payload: bytes) -> _Export | None:
        name, requests = p.parse_info_request(payload)
        export = self.server._export(name)
        if export is None:
            await self._reply(option, p.REP_ERR_UNKNOWN,
                              f'export {name!r} does not exist'.encode('utf-8'))
            return None
        await self._reply(option, p.REP_INFO, p.INFO_EXPORT_REPLY.pack(
            p.INFO_EXPORT, export.device.size, self._transmission_flags(export)))
        if p.INFO_BLOCK_SIZE in requests:
            await self._reply(option, p.REP_INFO, p.INFO_BLOCK_SIZE_REPLY.pack(
                p.INFO_BLOCK_SIZE, p.BLOCK_SIZE_MIN, p.BLOCK_SIZE_PREFERRED, p.BLOCK_SIZE_MAX))
        if p.INFO_NAME in requests:
            await self._reply(option, p.REP_INFO,
                              struct.pack('>H', p.INFO_NAME) + name.encode('utf-8'))
        if p.INFO_DESCRIPTION in requests and export.description:
            await self._reply(option, p.REP_INFO, struct.pack('>H', p.INFO_DESCRIPTION)
                              + export.description.encode('utf-8'))
        if option == p.OPT_INFO:
            await self._reply(option, p.REP_ACK)
            return None
        # The export may have been removed while the replies above were sent.
        if self._select(name) is None:
            await self._reply(option, p.REP_ERR_UNKNOWN,
                              f'export {name!r} was removed'.encode('utf-8'))
            return None
        await self._reply(option, p.REP_ACK)
        return export

    def _select(self, name: str) -> _Export | None:
        # Looking the export up and recording it happen without an await in
        # between, so remove_export (which runs on this loop) sees the choice.
        export = self.server._export(name)
        if export is not None:
            self.export_name = name
        return export

    async def _opt_structured_reply(self, option: int, payload: bytes) -> None:
        if payload:
            raise p.BadOption('NBD_OPT_STRUCTURED_REPLY takes no payload')
        self._structured = True
        await self._reply(option, p.REP_ACK)

    async def _opt_meta_context(self, option: int, payload: bytes) -> None:
        name, queries = p.parse_meta_context_request(payload)
        setting = option == p.OPT_SET_META_CONTEXT
        if setting and not self._structured:
            await self._reply(option, p.REP_ERR_INVALID,
                              b'negotiate structured replies before meta contexts')
            return
        if self.server._export(name) is None:
            await self._reply(option, p.REP_ERR_UNKNOWN,
                              f'export {name!r} does not exist'.encode('utf-8'))
            return
        contexts = p.match_meta_contexts(queries, listing=not setting)
        for context in contexts:
            await self._reply(option, p.REP_META_CONTEXT,
                              struct.pack('>I', p.META_CONTEXT_BASE_ALLOCATION_ID)
                              + context.encode('utf-8'))
        if setting:
            self._meta_context = (name, bool(contexts))
        await self._reply(option, p.REP_ACK)

    _OPTIONS = {
        p.OPT_EXPORT_NAME: _opt_export_name,
        p.OPT_ABORT: _opt_abort,
        p.OPT_LIST: _opt_list,
        p.OPT_INFO: _opt_info_go,
        p.OPT_GO: _opt_info_go,
        p.OPT_STRUCTURED_REPLY: _opt_structured_reply,
        p.OPT_LIST_META_CONTEXT: _opt_meta_context,
        p.OPT_SET_META_CONTEXT: _opt_meta_context,
    }

    # -- transmission ------------------------------------------------------

    async def _transmit(self, export: _Export) -> None:
        """Read requests and serve each concurrently until NBD_CMD_DISC or EOF."""
        allocation = self._meta_context == (export.name, True)
        handler = _Handler(self, export, self._structured, allocation)
        slots = asyncio.Semaphore(self.server.max_in_flight)
        in_flight: set[asyncio.Future] = set()

        def done(future: asyncio.Future) -> None:
            in_flight.discard(future)
            slots.release()

        try:
            while not self._closing:
                header = await self.reader.readexactly(p.REQUEST.size)
                magic, flags, command, cookie, offset, length = p.REQUEST.unpack(header)
                if magic != p.REQUEST_MAGIC:
                    LOG.warning('NBD client %s sent a bad request magic; hanging up', self.peer)
                    return
                if command == p.CMD_DISC:
                    return
                charge = _REQUEST_OVERHEAD
                if command == p.CMD_READ and handler.reads_into and 0 < length <= p.BLOCK_SIZE_MAX:
                    charge += _BufferPool.size_for(length)  # the pooled buffer, not just length
                elif command in (p.CMD_READ, p.CMD_WRITE) and length <= p.BLOCK_SIZE_MAX:
                    charge += length
                elif command == p.CMD_BLOCK_STATUS:
                    charge += _BLOCK_STATUS_CHARGE
                # Stop taking requests while this client, or all of them, hold too much.
                await self.reserve(charge)
                payload = None
                if command == p.CMD_WRITE:
                    if length > p.BLOCK_SIZE_MAX:
                        await self._discard(length)
                        await self.reply_error(cookie, p.EINVAL, 'write larger than 32 MiB')
                        self.written(charge)
                        continue
                    payload = await self.reader.readexactly(length)
                await slots.acquire()
                future = handler.fast_read(cookie, offset, length, charge) \
                    if command == p.CMD_READ else None
                if future is None:
                    future = asyncio.create_task(
                        handler.serve(command, flags, cookie, offset, length, payload, charge))
                in_flight.add(future)
                future.add_done_callback(done)
        finally:
            # Replies still go out after NBD_CMD_DISC, and remove_export relies on
            # every device call being over once the connection is finished.
            if in_flight:
                await asyncio.gather(*in_flight, return_exceptions=True)

    async def send(self, *parts: bytes | memoryview) -> bool:
        """Write one whole reply; replies of concurrent requests never interleave.

        It does not wait for the client to read: the request's charge does that
        (see ``written``).

        :returns: whether the kernel took every byte at once, so that the
            transport holds no reference to ``parts`` and they may be reused.
        """
        # No await between the writes: nothing else can write in between.
        if self.writer.is_closing():
            return False
        for part in parts:
            self.writer.write(part)
        return self.writer.transport.get_write_buffer_size() == 0

    async def reply_ok(self, cookie: int) -> None:
        await self.send(p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, cookie))

    async def reply_error(self, cookie: int, error: int, message: str) -> None:
        if not self._structured:
            await self.send(p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, error, cookie))
            return
        text = message.encode('utf-8', 'replace')[:_MAX_ERROR_MESSAGE]
        await self.send(p.STRUCTURED_REPLY.pack(
            p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE, p.REPLY_TYPE_ERROR, cookie,
            p.ERROR_PAYLOAD.size + len(text)) + p.ERROR_PAYLOAD.pack(error, len(text)) + text)


class _RequestError(Exception):
    def __init__(self, error: int, message: str):
        super().__init__(message)
        self.error = error


class _Handler:
    """Serves the requests of one connection to one export."""

    def __init__(self, connection: _Connection, export: _Export, structured: bool,
                 allocation: bool):
        self.connection = connection
        self.device = export.device
        self.size = export.device.size
        self.read_only = export.device.read_only
        self.structured = structured
        self.allocation = allocation
        self.executor = connection.server._executor
        self.loop = asyncio.get_running_loop()
        self.name = export.name
        self.buffers = connection.server._buffers
        self.reads_into = type(self.device).read_into is not device_mod.BlockDevice.read_into
        self.read = self._read_into if self.reads_into else self._read

    def fast_read(self, cookie: int, offset: int, length: int,
                  charge: int) -> asyncio.Future | None:
        """Start a plain read without a task, lock or drain; None if it needs ``serve``.

        This is the hot path of every NBD client, and a task per read costs
        more than the rest of the read put together. The reply is written in
        one callback on the loop, so it cannot interleave with another reply.
        """
        if not self.reads_into or not 0 < length <= p.BLOCK_SIZE_MAX \
                or offset + length > self.size:
            return None
        finished = self.loop.create_future()
        buffer = self.buffers.get(length)
        view = memoryview(buffer)[:length]
        work = self.executor.submit(self.device.read_into, offset, view)

        def failed(_) -> None:
            self.connection.written(charge)
            if not finished.done():
                finished.set_result(None)

        def reply() -> None:
            if finished.done():
                return
            failure = work.exception()
            if failure is not None:
                self.buffers.put(buffer)
                error = self._request_error(self.device.read_into, failure)
                task = asyncio.ensure_future(self._reply_error(cookie, error))
                task.add_done_callback(failed)
                return
            writer = self.connection.writer
            if not writer.is_closing():
                writer.write(self._read_header(cookie, offset, length))
                writer.write(view)
                # A buffer the transport still holds on to must not be handed out again.
                if writer.transport.get_write_buffer_size() == 0:
                    self.buffers.put(buffer)
            self.connection.written(charge)
            finished.set_result(None)

        work.add_done_callback(lambda _: self.loop.call_soon_threadsafe(reply))
        return finished

    async def serve(self, command: int, flags: int, cookie: int, offset: int, length: int,
                    payload: bytes | None, charge: int) -> None:
        """Serve one request and send its reply; never raises: the task has nobody to tell."""
        try:
            await self._serve(command, flags, cookie, offset, length, payload)
        except ConnectionError:
            pass  # the client is gone; the connection's reader notices too
        except Exception:
            LOG.exception('NBD export %r: request %d failed', self.name, command)
            self.connection.close()
        finally:
            self.connection.written(charge)

    async def _serve(self, command: int, flags: int, cookie: int, offset: int, length: int,
                     payload: bytes | None) -> None:
        try:
            if command == p.CMD_READ:
                self._check(command, offset, length)
                await self.read(cookie, offset, length)
                return
            self._check(command, offset, length)
            if command == p.CMD_BLOCK_STATUS:
                await self._block_status(cookie, flags, offset, length)
                return
            fua = bool(flags & p.CMD_FLAG_FUA)
            if command == p.CMD_WRITE:
                await self._device(self.device.write, offset, payload, fua)
            elif command == p.CMD_WRITE_ZEROES:
                await self._device(self.device.write_zeroes, offset, length, fua)
            elif command == p.CMD_TRIM:
                await self._device(self.device.trim, offset, length)
                if fua:
                    await self._device(self.device.flush)
            elif command == p.CMD_FLUSH:
                await self._device(self.device.flush)
            # NBD_CMD_CACHE is advice; doing nothing is a correct answer to it.
            await self.connection.reply_ok(cookie)
        except _RequestError as exc:
            await self.connection.reply_error(cookie, exc.error, str(exc))

    def _check(self, command: int, offset: int, length: int) -> None:
        """:raises: _RequestError for an unknown command, a read-only export or a bad range."""
        writes = (p.CMD_WRITE, p.CMD_WRITE_ZEROES, p.CMD_TRIM)
        if command not in writes + (p.CMD_READ, p.CMD_FLUSH, p.CMD_CACHE, p.CMD_BLOCK_STATUS):
            raise _RequestError(p.EINVAL, f'unknown command {command}')
        if command in writes and self.read_only:
            raise _RequestError(p.EPERM, f'export {self.name!r} is read-only')
        if command == p.CMD_FLUSH:
            return
        if offset + length > self.size:
            error = p.ENOSPC if command in (p.CMD_WRITE, p.CMD_WRITE_ZEROES) else p.EINVAL
            raise _RequestError(error, f'range {offset}+{length} is beyond the end of '
                                       f'the export ({self.size} bytes)')
        if command == p.CMD_READ and length > p.BLOCK_SIZE_MAX:
            raise _RequestError(p.EINVAL, 'read larger than 32 MiB')

    async def _device(self, method: Callable, *args) -> Any:
        """Run a device method in the thread pool, turning its failure into an NBD error.

        :raises: _RequestError with the errno of an OSError, or EIO for anything else.
        """
        try:
            return await self.loop.run_in_executor(self.executor, method, *args)
        except Exception as exc:
            raise self._request_error(method, exc) from exc

    def _request_error(self, method: Callable, exc: BaseException) -> _RequestError:
        """The NBD error for a device failure, logged unless the device said what it was."""
        if isinstance(exc, OSError):
            return _RequestError(p.nbd_error(exc.errno), str(exc))
        if isinstance(exc, exception.VmcloudError):
            LOG.error('NBD export %r: %s failed: %s', self.name, method.__name__, exc)
            return _RequestError(p.EIO, str(exc))
        LOG.error('NBD export %r: %s failed', self.name, method.__name__,
                  exc_info=(type(exc), exc, exc.__traceback__))
        return _RequestError(p.EIO, f'internal error: {exc}')

    async def _reply_error(self, cookie: int, error: _RequestError) -> None:
        try:
            await self.connection.reply_error(cookie, error.error, str(error))
        except ConnectionError:
            pass

    async def _read(self, cookie: int, offset: int, length: int) -> None:
        data = await self._device(self.device.read, offset, length) if length else b''
        if len(data) != length:
            # Sending it would desynchronise the stream.
            LOG.error('NBD export %r: read(%d, %d) returned %d bytes', self.name, offset,
                      length, len(data))
            raise _RequestError(p.EIO, 'device returned a short read')
        await self.connection.send(self._read_header(cookie, offset, length), data)

    async def _read_into(self, cookie: int, offset: int, length: int) -> None:
        if length == 0:
            await self.connection.send(self._read_header(cookie, offset, 0))
            return
        buffer = self.buffers.get(length)
        view = memoryview(buffer)[:length]
        try:
            await self._device(self.device.read_into, offset, view)
        except _RequestError:
            self.buffers.put(buffer)
            raise
        # A buffer the transport still holds on to must not be handed out again.
        if await self.connection.send(self._read_header(cookie, offset, length), view):
            self.buffers.put(buffer)

    def _read_header(self, cookie: int, offset: int, length: int) -> bytes:
        if not self.structured:
            return p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, cookie)
        if length == 0:
            return p.STRUCTURED_REPLY.pack(
                p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE, p.REPLY_TYPE_NONE, cookie, 0)
        return p.OFFSET_DATA_HEADER.pack(
            p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE, p.REPLY_TYPE_OFFSET_DATA, cookie,
            8 + length, offset)

    async def _block_status(self, cookie: int, flags: int, offset: int, length: int) -> None:
        if not self.allocation:
            raise _RequestError(p.EINVAL, 'base:allocation was not negotiated')
        if length == 0:
            raise _RequestError(p.EINVAL, 'block status of an empty range')
        extents = await self._device(self.device.block_status, offset, length)
        descriptors = _descriptors(extents, length, bool(flags & p.CMD_FLAG_REQ_ONE))
        if not descriptors:
            LOG.error('NBD export %r: block_status(%d, %d) returned no extent', self.name,
                      offset, length)
            raise _RequestError(p.EIO, 'device returned no extent')
        body = b''.join(descriptors)
        await self.connection.send(p.STRUCTURED_REPLY.pack(
            p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE, p.REPLY_TYPE_BLOCK_STATUS, cookie,
            4 + len(body)) + struct.pack('>I', p.META_CONTEXT_BASE_ALLOCATION_ID) + body)


def _descriptors(extents: list[device_mod.Extent], length: int, only_one: bool) -> list[bytes]:
    """Wire descriptors for ``extents``, cut to ``length`` bytes (clients reject
    overshoot) and to ``_MAX_DESCRIPTORS`` (the reply's charge)."""
    mask = device_mod.STATE_HOLE | device_mod.STATE_ZERO
    descriptors = []
    remaining = length
    for extent in extents:
        if remaining == 0 or len(descriptors) == _MAX_DESCRIPTORS:
            break
        if extent.length <= 0:
            continue
        size = min(extent.length, remaining)
        descriptors.append(p.BLOCK_DESCRIPTOR.pack(size, extent.flags & mask))
        remaining -= size
        if only_one:
            break
    return descriptors


def _tune_socket(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCKET_BUFFER)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass  # only a performance hint
