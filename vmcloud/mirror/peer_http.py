"""The peer chunk protocol: compute nodes serve the chunks of their caches to each other.

Plain HTTP/1.1 with keep-alive, the warehouse service's path shape and error bodies
(vmcloud.storage.protocol), a bearer token (``[mirror] peer_token``; none when empty):

- ``GET /v1/chunks/{id}``: 200, the chunk as ``application/octet-stream``, read
  through the node's cache, which fetches it from the repository if the node lacks
  it; 404 ChunkNotFound if the repository lacks it too.
- ``POST /v1/chunks/{id}/stage``: 204 once the node holds the chunk, fetched the
  node's normal way (through its peer exchange).
- ``GET /v1/stats``: what the node served and fetched, as JSON.
- ``PUT /v1/chunks/{id}`` with the chunk as its body (and the uploading node's name in
  ``X-Vmcloud-Origin``): 201 once the node keeps it as an *unpersisted replica*, a
  snapshot's chunk the repository lacks yet (synced to disk, never evicted:
  ``vmcloud.mirror.persist``); 422 CorruptChunk if the body is not that chunk; 507
  when the node's replicas fill ``[mirror] replica_size``.
- ``POST /v1/chunks/persisted`` with a JSON list of chunk ids: 204; those replicas
  are in the repository now and become ordinary cache entries.

Errors: 401 without the token; 400 for a malformed request or chunk id; 404 for an
unknown path; 405 for a method the path does not take; 408 for a request line and
headers that took over HEAD_TIMEOUT s; 503 WarehouseBusy while the server handles
``threads`` requests already (a request is refused, never queued), while its node is
asking peers for the chunk itself (waiting for that could be waiting for the asker),
or while it is stopping; 502 when the node could not fetch the chunk (FetchFailed, a
repository error: the body is the repository's error); 500 for its own failure (its
cache's disk).

The client never checks a chunk's hash: the exchange does, and counts a peer's
corrupt chunk. It bounds every request: connecting, sending and each wait for the
next bytes of an answer get ``timeout`` seconds, and a whole answer must arrive
within ``timeout * 4 + length / SLOWEST_RATE`` of the request's start, so a peer
that trickles a byte at a time is given up too. The head of a chunk's answer may
take ``answer_timeout`` (ANSWER_WAIT_FACTOR timeouts by default): a peer that lacks
the chunk reads it from the repository first, or waits for its node's read of it,
and a slow repository is not a dead peer. A stage waits up to ``stage_timeout`` for
its answer (the peer fetches the chunk first). A longer wait for the head makes the
answer's deadline grow by as much. Idle connections are kept per peer (POOL_SIZE,
for KEEP_IDLE s); one that failed is closed, never kept; a kept one the peer has
closed meanwhile is asked again once on a new connection (both requests are
idempotent). A 502 is raised as the repository error it carries (the peer is not at
fault), every other refusal but ChunkNotFound as a PeerError.

The server takes a thread per connection, at most ``threads *
CONNECTIONS_PER_THREAD`` connections and ``connections_per_address`` from one
address (more are answered 503 and closed), and handles at most ``threads`` requests
at once. A request's line and headers are at most HEAD_LIMIT bytes and must arrive
within HEAD_TIMEOUT s of its first byte, its body (a PUT's, a persisted's) within
HEAD_TIMEOUT + length / SLOWEST_RATE s more (408 otherwise); a connection is closed
after IDLE_TIMEOUT s without a request, or IO_TIMEOUT s without progress in the middle
of one. Chunk
bodies go out PIECE bytes at a time through one token bucket of ``upload_rate``
bytes/s shared by every connection. The address served must be one the other nodes
can reach (it is the node's advertised peer URL): a wildcard is refused.
"""
import collections
import http
import http.client
import io
import ipaddress
import json
import logging
import re
import socket
import socketserver
import threading
import time
import urllib.parse
from typing import Callable, Protocol

from vmcloud import exception
from vmcloud.mirror import cache as cache_mod
from vmcloud.storage import manifest as manifest_mod
from vmcloud.storage import protocol
from vmcloud.storage.service import auth

LOG = logging.getLogger(__name__)

_CHUNK_PATH = re.compile(protocol.API + r'/chunks/([^/]+)')
_STAGE_PATH = re.compile(protocol.API + r'/chunks/([^/]+)/stage')
_STATS_PATH = protocol.API + '/stats'
_PERSISTED_PATH = protocol.API + '/chunks/persisted'
ORIGIN_HEADER = 'X-Vmcloud-Origin'

# -- client limits
POOL_SIZE = 8
"""Idle connections the client keeps to one peer."""
KEEP_IDLE = 10.0
"""Seconds the client keeps an idle connection: well under the server's IDLE_TIMEOUT, so
a pooled connection is rarely one the server is closing."""
SLOWEST_RATE = 1024 ** 2
"""Bytes/s: the slowest transfer the total deadline of an answer allows for."""
STAGE_TIMEOUT = 60.0
"""Default seconds a stage waits for its answer (the peer fetches the chunk first)."""
ANSWER_WAIT_FACTOR = 4
"""Timeouts the head of a chunk's answer may take by default (``answer_timeout``)."""
_READ_PIECE = 1024 ** 2
_ERROR_BODY_LIMIT = 64 * 1024
_STATS_LIMIT = 1024 ** 2
# The most ids one persisted request names (a snapshot's chunks are told in batches).
PERSISTED_BATCH = 4096
# The body a request of a route may carry, in bytes.
_BODY_LIMITS = {'_put_chunk': protocol.MAX_CHUNK_BYTES, '_persisted': PERSISTED_BATCH * 70}

# -- server limits
HEAD_LIMIT = 8192
"""Bytes of a request line and its headers together; larger requests get 431."""
HEAD_TIMEOUT = 10.0
"""Seconds from a request's first byte to the end of its headers; a slower one gets 408
(a client sending a byte now and then holds a thread no longer)."""
IDLE_TIMEOUT = 30.0
"""Seconds a server connection waits for the next request before closing."""
IO_TIMEOUT = 10.0
"""Seconds the server waits for each read of a request begun or each write of an answer."""
PIECE = 64 * 1024
"""Bytes of a chunk body written at a time (and taken at a time from the upload limit)."""
CONNECTIONS_PER_THREAD = 8
"""Open connections per request thread, idle keep-alive ones included; beyond, a new
connection is answered 503 and closed."""
CONNECTIONS_PER_ADDRESS = 32
"""Default open connections from one address (``[mirror] peer_connections_per_address``)."""
STOP_WAIT = 5.0
"""Seconds stop() waits for the requests in progress."""


def _check_token(token: str) -> str:
    """:raises: ConfigError unless ``token`` can travel in an HTTP header."""
    if not token.isascii() or not (token.isprintable() and token.strip() == token):
        raise exception.ConfigError('[mirror] peer_token must be printable ASCII without '
                                    'surrounding spaces')
    return token


def check_peer_address(address: str) -> str:
    """:raises: ConfigError naming ``[mirror] peer_address`` if ``address`` is empty or
    a wildcard (0.0.0.0, ::, and their other spellings): the address served is the
    peer URL the other nodes are told, so it must be one of this node's own."""
    host = address.strip() if isinstance(address, str) else ''
    if host.startswith('[') and host.endswith(']'):
        host = host[1:-1]
    wildcard = host in ('', '*')
    if not wildcard:
        try:
            wildcard = ipaddress.ip_address(host.split('%', 1)[0]).is_unspecified
        except ValueError:
            try:
                # What the socket calls accept as IPv4 ('0', '0.0', '0x0'...) binds too.
                wildcard = socket.inet_aton(host) == bytes(4)
            except OSError:
                pass  # a host name
    if wildcard:
        raise exception.ConfigError(
            f'[mirror] peer_address {address!r} is not an address of this node: the '
            'other compute nodes are told it as this node\'s peer URL, so it must be one '
            'they can reach (the node\'s own address on their network), not empty nor a '
            'wildcard such as 0.0.0.0 or ::')
    return address


def check_chunk_id(chunk_id: str) -> str:
    """:raises: InvalidName unless ``chunk_id`` is 64 lowercase hex digits (a sha256)."""
    if not isinstance(chunk_id, str) or not manifest_mod.CHUNK_ID.fullmatch(chunk_id):
        raise exception.InvalidName(
            f'invalid chunk id {chunk_id!r:.80}: a chunk id is 64 lowercase hex digits')
    return chunk_id


# -- the client ------------------------------------------------------------------

# What a pooled connection the peer already closed fails with, before any answer.
_STALE = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


class PeerClient:
    """Requests to other nodes' peer chunk servers; thread safe, one for a whole node."""

    def __init__(self, token: str, timeout: float, stage_timeout: float = STAGE_TIMEOUT,
                 pool_size: int = POOL_SIZE, answer_timeout: float | None = None):
        """``answer_timeout``: seconds the head of a chunk's answer may take (default
        ``timeout * ANSWER_WAIT_FACTOR``, never less than ``timeout``).

        :raises: ConfigError if the token cannot travel in an HTTP header.
        """
        _check_token(token)
        self.timeout = timeout
        self.stage_timeout = max(stage_timeout, timeout)
        self.answer_timeout = max(timeout * ANSWER_WAIT_FACTOR if answer_timeout is None
                                  else answer_timeout, timeout)
        self._headers = {'Authorization': f'Bearer {token}'} if token else {}
        self._pool_size = pool_size
        self._lock = threading.Lock()
        # url -> (idle since, connection), the most recently used last
        self._idle: dict[str, list[tuple[float, http.client.HTTPConnection]]] = {}

    def get(self, url: str, chunk_id: str) -> bytes:
        """The chunk as the peer sent it, unchecked: the caller hashes it.

        :raises: InvalidName for a malformed id, before any request; ChunkNotFound if the
            peer says the repository lacks the chunk; the StorageError of the peer's
            own repository read if that failed (HTTP 502); PeerError for every other
            failure (busy: its cause is a WarehouseBusy).
        """
        check_chunk_id(chunk_id)
        return self._call(url, 'GET', f'{protocol.API}/chunks/{chunk_id}', chunk_id,
                          ok=200, limit=protocol.MAX_CHUNK_BYTES, wait=self.answer_timeout,
                          repository_errors=True)

    def stage(self, url: str, chunk_id: str) -> None:
        """Have the peer fetch the chunk and keep it; returns once it holds it.

        :raises: InvalidName for a malformed id, before any request; ChunkNotFound;
            the StorageError of the peer's repository read (HTTP 502); PeerError.
        """
        check_chunk_id(chunk_id)
        self._call(url, 'POST', f'{protocol.API}/chunks/{chunk_id}/stage', chunk_id,
                   ok=204, limit=0, wait=self.stage_timeout, repository_errors=True)

    def put(self, url: str, chunk_id: str, data: bytes, origin: str = '') -> None:
        """Have the peer keep ``data`` as an unpersisted replica of ``chunk_id``, put by
        node ``origin``; returns once it is durable there. The peer syncs it to disk
        first, so its answer may take up to four timeouts.

        :raises: InvalidName for a malformed id, before any request; PeerError (with
            HTTP 507 in its reason when the peer's replica budget is full, 422 when
            ``data`` is not the chunk's).
        """
        check_chunk_id(chunk_id)
        self._call(url, 'PUT', f'{protocol.API}/chunks/{chunk_id}', chunk_id, ok=201,
                   limit=0, wait=self.timeout * 4, body=data,
                   headers={ORIGIN_HEADER: origin} if origin else None)

    def persisted(self, url: str, chunk_ids: list[str]) -> None:
        """Tell the peer that these chunks are in the repository (its replicas of them
        become ordinary cache entries), PERSISTED_BATCH ids a request.

        :raises: InvalidName for a malformed id, before any request; PeerError.
        """
        for chunk_id in chunk_ids:
            check_chunk_id(chunk_id)
        for start in range(0, len(chunk_ids), PERSISTED_BATCH):
            body = json.dumps(list(chunk_ids[start:start + PERSISTED_BATCH])).encode()
            self._call(url, 'POST', _PERSISTED_PATH, None, ok=204, limit=0,
                       wait=self.timeout, body=body,
                       headers={'Content-Type': 'application/json'})

    def stats(self, url: str) -> dict:
        """The peer's /v1/stats document. :raises: PeerError."""
        body = self._call(url, 'GET', _STATS_PATH, None, ok=200, limit=_STATS_LIMIT,
                          wait=self.timeout)
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise exception.PeerError(url, None, f'its stats are not JSON: {exc}') from exc
        if not isinstance(doc, dict):
            raise exception.PeerError(url, None, 'its stats are not a JSON object')
        return doc

    def close(self) -> None:
        """Close the idle connections; the client stays usable."""
        with self._lock:
            idle = [conn for conns in self._idle.values() for _, conn in conns]
            self._idle.clear()
        for conn in idle:
            conn.close()

    # -- one request ---------------------------------------------------------------

    def _call(self, url: str, method: str, path: str, chunk_id: str | None, ok: int,
              limit: int, wait: float, body: bytes | None = None,
              headers: dict[str, str] | None = None, repository_errors: bool = False) -> bytes:
        """The body of an ``ok`` answer (``wait``: seconds its head may take).

        :raises: ChunkNotFound; with ``repository_errors``, the StorageError a 502
            carries; PeerError.
        """
        host, port = _split_url(url, chunk_id)
        started = time.monotonic()
        conn, sock, response = self._send(url, host, port, method, path, chunk_id, wait,
                                          body, headers)
        # What waiting longer than the timeout for the answer was allowed adds to it.
        allowed = started + (wait - self.timeout)
        try:
            body = self._read_body(url, chunk_id, sock, response, allowed,
                                   limit if response.status == ok else _ERROR_BODY_LIMIT)
        except BaseException:
            conn.close()  # a connection that failed is never reused
            raise
        if response.will_close:
            conn.close()
        else:
            self._give_back(url, conn)
        if response.status != ok:
            _raise_refusal(url, chunk_id, response.status, body, repository_errors)
        return body

    def _send(self, url: str, host: str, port: int, method: str, path: str,
              chunk_id: str | None, wait: float, body: bytes | None = None,
              headers: dict[str, str] | None = None
              ) -> tuple[http.client.HTTPConnection, socket.socket, http.client.HTTPResponse]:
        """The connection, its socket (the connection forgets it if the answer ends it)
        and the answer's head. :raises: PeerError."""
        conn = self._take(url)
        reused = conn is not None
        while True:
            if conn is None:
                conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
            step = 'connecting'
            try:
                if conn.sock is None:
                    conn.connect()
                    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                step = 'sending the request'
                conn.request(method, path, body=body, headers={**self._headers,
                                                               **(headers or {})})
                step = 'waiting for the answer'
                sock = conn.sock
                sock.settimeout(wait)
                return conn, sock, conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                if reused and isinstance(exc, _STALE):
                    # The peer closed this idle connection (its idle timeout, a restart):
                    # the requests are idempotent, so a fresh connection asks again, once.
                    conn, reused = None, False
                    continue
                wait_was = wait if step == 'waiting for the answer' else self.timeout
                raise exception.PeerError(url, chunk_id,
                                          f'{step}: {_describe(exc, wait_was)}') from exc

    def _read_body(self, url: str, chunk_id: str | None, sock: socket.socket,
                   response: http.client.HTTPResponse, started: float, limit: int) -> bytes:
        """The whole body, by ``started`` + timeout * 4 + length / SLOWEST_RATE."""
        status = response.status
        length = response.length  # None: no Content-Length (or an invalid one), or chunked
        if length is None:
            raise exception.PeerError(url, chunk_id,
                                      f'HTTP {status} answer without a Content-Length')
        if length > limit:
            raise exception.PeerError(
                url, chunk_id, f'HTTP {status} answer of {length} bytes, over the {limit} '
                               'such an answer may have')
        allowed = self.timeout * 4 + length / SLOWEST_RATE
        deadline = started + allowed
        pieces, got = [], 0
        while got < length:
            left = deadline - time.monotonic()
            too_slow = f'{got} of {length} bytes within the {allowed:.3g} s an answer of ' \
                       'that size gets'
            if left <= 0:
                raise exception.PeerError(url, chunk_id, too_slow)
            sock.settimeout(min(self.timeout, left))
            try:
                # read1: one recv at a time, so each waits at most the timeout set above
                piece = response.read1(min(length - got, _READ_PIECE))
            except (OSError, http.client.HTTPException) as exc:
                if isinstance(exc, TimeoutError) and left < self.timeout:
                    reason = too_slow  # the deadline cut this wait short, not the timeout
                else:
                    reason = (f'reading the answer, after {got} of {length} bytes: '
                              f'{_describe(exc, self.timeout)}')
                raise exception.PeerError(url, chunk_id, reason) from exc
            if not piece:
                raise exception.PeerError(
                    url, chunk_id, f'short answer: {got} of {length} bytes (its '
                                   'Content-Length), then the connection closed')
            pieces.append(piece)
            got += len(piece)
        response.close()  # read to its end: the connection may carry the next request
        return b''.join(pieces)

    # -- the pool ------------------------------------------------------------------

    def _take(self, url: str) -> http.client.HTTPConnection | None:
        now = time.monotonic()
        stale = []
        conn = None
        with self._lock:
            idle = self._idle.get(url, [])
            while idle:
                since, candidate = idle.pop()
                if now - since < KEEP_IDLE:
                    conn = candidate
                    break
                stale.append(candidate)
        for old in stale:
            old.close()
        return conn

    def _give_back(self, url: str, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(url, [])
            if len(idle) < self._pool_size:
                idle.append((time.monotonic(), conn))
                return
        conn.close()


def _split_url(url: str, chunk_id: str | None) -> tuple[str, int]:
    """(host, port) of a peer URL. :raises: PeerError unless it is http://HOST[:PORT]."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise exception.PeerError(url, chunk_id, f'not a peer URL: {exc}') from exc
    if parts.scheme != 'http' or not parts.hostname or parts.path not in ('', '/') \
            or parts.query or parts.fragment:
        raise exception.PeerError(url, chunk_id, 'not a peer URL (http://HOST:PORT)')
    return parts.hostname, port or 80


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f'silent for {timeout:.3g} s'
    if isinstance(exc, http.client.HTTPException):
        return f'malformed answer ({type(exc).__name__}: {exc})'
    return str(exc) or type(exc).__name__


def _raise_refusal(url: str, chunk_id: str | None, status: int, body: bytes,
                   repository_errors: bool) -> None:
    """:raises: the peer's ChunkNotFound for this chunk as such; with
    ``repository_errors``, the StorageError of a 502 that is one of the protocol's error
    bodies (the peer's repository read failed: the peer did its part); PeerError for
    the rest (a 502 without such a body is the peer's own failure)."""
    error = protocol.decode_error(status, body, f'peer {url}')
    if isinstance(error, exception.ChunkNotFound) and chunk_id is not None \
            and error.chunk_id == chunk_id:
        raise error
    if repository_errors and status == 502 and _is_error_body(body):
        raise error
    raise exception.PeerError(url, chunk_id, f'HTTP {status}: {error}') from error


def _is_error_body(body: bytes) -> bool:
    """Whether ``body`` is an error as the protocol encodes it (not a stray page)."""
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    return isinstance(doc, dict) and isinstance(doc.get('error'), str) \
        and isinstance(doc.get('message'), str)


# -- the server ------------------------------------------------------------------

class ServedExchange(Protocol):
    """What the server needs of the node's peer exchange (vmcloud.mirror.peers)."""

    me: str
    replicas: int

    def fetch_from_repository(self, chunk_id: str) -> bytes: ...

    def asking_peers(self, chunk_id: str) -> bool: ...

    def stats(self) -> dict: ...

    def peers(self) -> dict[str, str]: ...


class TokenBucket:
    """``rate`` bytes/s for every caller together, bursts up to ``burst`` bytes.

    take() reserves its bytes at once and sleeps off the debt they leave, so by any
    time t at most burst + rate * (t - creation) bytes have been let through, however
    many threads take.
    """

    def __init__(self, rate: int, burst: int, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], object] = time.sleep):
        self.rate = rate
        self.burst = burst
        self.taken = 0
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = float(burst)
        self._stamp = clock()

    def take(self, count: int) -> None:
        """Wait until ``count`` (at most ``burst``) bytes may go."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= count
            self.taken += count
            debt = -self._tokens
        if debt > 0:
            self._sleep(debt / self.rate)


def upload_burst(rate: int) -> int:
    """The burst of an upload limit of ``rate`` bytes/s: a tenth of a second, or a piece."""
    return max(PIECE, rate // 10)


class _Refused(Exception):
    """A request the server answers with an error and then closes the connection on."""

    def __init__(self, status: int, error: exception.StorageError):
        super().__init__(str(error))
        self.status = status
        self.error = error


class PeerServer:
    """Serves the node's chunk cache to the other nodes (see the module docstring)."""

    def __init__(self, cache: cache_mod.ChunkCache, exchange: ServedExchange, address: str,
                 port: int, token: str, upload_rate: int, threads: int, *,
                 connections_per_address: int = CONNECTIONS_PER_ADDRESS,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], object] | None = None):
        """``upload_rate``: bytes/s of chunk bodies to all peers together, 0 = unlimited;
        ``threads``: requests handled at once, more get 503; ``connections_per_address``:
        connections open from one address, more get 503. ``clock`` and ``sleep`` are
        the upload limit's (default: monotonic time, a sleep that stop() cuts short).

        :raises: ConfigError if ``address`` is empty or a wildcard, ``threads`` or
            ``connections_per_address`` < 1, ``upload_rate`` < 0 or the token cannot
            travel in an HTTP header.
        """
        _check_token(token)
        check_peer_address(address)
        if threads < 1 or upload_rate < 0:
            raise exception.ConfigError(
                f'a peer server needs at least 1 thread and an upload rate of 0 or more '
                f'bytes/s, not {threads} and {upload_rate}')
        if connections_per_address < 1:
            raise exception.ConfigError(
                f'[mirror] peer_connections_per_address must be at least 1, not '
                f'{connections_per_address}')
        self.cache = cache
        self.exchange = exchange
        self.address = address
        self.port = port
        self.threads = threads
        self.url = ''
        self._token = token
        self._stopping = threading.Event()
        self.upload_limit = TokenBucket(upload_rate, upload_burst(upload_rate), clock,
                                        sleep or self._stopping.wait) if upload_rate else None
        self._slots = threading.BoundedSemaphore(threads)
        self._max_connections = threads * CONNECTIONS_PER_THREAD
        self.connections_per_address = connections_per_address
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._per_address: collections.Counter[str] = collections.Counter()
        self._threads: set[threading.Thread] = set()
        self._counts = {'served_chunks': 0, 'served_bytes': 0, 'staged_chunks': 0}
        self._listener: _Listener | None = None
        self._accepting: threading.Thread | None = None

    def __enter__(self) -> 'PeerServer':
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> 'PeerServer':
        """Bind and serve in threads; ``url`` then names the bound port. A server starts
        once: after stop(), make a new one.

        :raises: MirrorError naming the address if it cannot be bound.
        """
        if self._listener is not None or self._stopping.is_set():
            raise exception.MirrorError(f'the peer server {self.url or "stopped"} starts once')
        try:
            self._listener = _Listener(self, self.address, self.port)
        except OSError as exc:
            raise exception.MirrorError(
                f'cannot serve chunks to peers on {self.address} port {self.port}: '
                f'{exc}') from exc
        host = f'[{self.address}]' if ':' in self.address else self.address
        self.url = f'http://{host}:{self._listener.server_address[1]}'
        self._accepting = threading.Thread(target=self._listener.serve_forever,
                                           kwargs={'poll_interval': 0.1},
                                           name='peer-server', daemon=True)
        self._accepting.start()
        LOG.info('serving chunks to peers at %s', self.url)
        if not self._token:
            LOG.warning('[mirror] peer_token is empty: the peer chunk server at %s '
                        '([mirror] peer_address) serves and takes chunks for anyone who '
                        'can reach it; set the same peer_token on every compute node',
                        self.url)
        return self

    def stop(self) -> None:
        """Close the listener and every connection, and wait up to STOP_WAIT s for the
        requests in progress (one still waiting for the repository ends on its own,
        its answer going nowhere). Idempotent."""
        with self._lock:
            # The sockets go before the upload limit's sleeps are cut short: a chunk
            # being sent stops there, it does not rush out its rest.
            for sock in self._connections:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # the client closed it already
            self._stopping.set()  # and no connection is taken any more
            threads = list(self._threads)
        listener, self._listener = self._listener, None
        if listener is None:
            return
        listener.shutdown()
        listener.server_close()
        deadline = time.monotonic() + STOP_WAIT
        for thread in [self._accepting, *threads]:
            thread.join(max(0.0, deadline - time.monotonic()))
        running = sum(thread.is_alive() for thread in threads)
        if running:
            LOG.warning('the peer server at %s stopped; requests still running: %d',
                        self.url, running)

    def stats(self) -> dict:
        """This server's own counters: served_chunks, served_bytes, staged_chunks."""
        with self._lock:
            return dict(self._counts)

    def document(self) -> dict:
        """The /v1/stats document: the exchange's counters, the server's, the node set."""
        doc = dict(self.exchange.stats())
        doc.update(self.stats())
        doc.update(host=self.exchange.me, peers=dict(self.exchange.peers()),
                   replicas=self.exchange.replicas)
        return doc

    def _count(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                self._counts[name] += value

    # -- connections ---------------------------------------------------------------

    def _accepted(self, sock: socket.socket, client: tuple) -> None:
        with self._lock:
            full = self._stopping.is_set() or len(self._connections) >= self._max_connections
            crowded = not full and \
                self._per_address[client[0]] >= self.connections_per_address
            if not (full or crowded):
                thread = threading.Thread(target=self._serve, args=(sock, client),
                                          name=f'peer-{client[0]}', daemon=True)
                try:
                    thread.start()  # under the lock: stop() must never join an unstarted one
                except RuntimeError as exc:  # the process has no thread left to give
                    LOG.warning('refusing a peer connection from %s: %s', client[0], exc)
                    full = True
                else:
                    self._connections.add(sock)
                    self._threads.add(thread)
                    self._per_address[client[0]] += 1
        if crowded:
            self._refuse_connection(sock, exception.WarehouseBusy(
                f'peer {self.url} has {self.connections_per_address} connections open from '
                f'{client[0]}, the most one address may have ([mirror] '
                'peer_connections_per_address)'))
        elif full:
            self._refuse_connection(sock, exception.WarehouseBusy(
                f'peer {self.url} has {self._max_connections} connections open, its most'))

    def _refuse_connection(self, sock: socket.socket, error: exception.WarehouseBusy) -> None:
        status, body = protocol.encode_error(error)
        try:
            # Never block the accepting thread: a fresh socket takes a short answer whole.
            sock.setblocking(False)
            sock.send(_head(status, 'application/json', len(body), False) + body)
        except OSError:
            pass
        finally:
            sock.close()

    def _serve(self, sock: socket.socket, client: tuple) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _Connection(self, sock).serve()
        except Exception:  # noqa: B902 - one connection's bug must not end the server
            LOG.exception('serving peer %s:%s failed', client[0], client[1])
        finally:
            with self._lock:
                self._connections.discard(sock)
                self._threads.discard(threading.current_thread())
                self._per_address[client[0]] -= 1
                if not self._per_address[client[0]]:
                    del self._per_address[client[0]]
                sock.close()  # under the lock: stop() shuts sockets down under it too


class _Listener(socketserver.TCPServer):
    """Accepts connections and hands each to its PeerServer."""

    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, peer_server: PeerServer, address: str, port: int):
        self.address_family = socket.AF_INET6 if ':' in address else socket.AF_INET
        self.peer_server = peer_server
        super().__init__((address, port), socketserver.BaseRequestHandler)

    def process_request(self, request: socket.socket, client_address: tuple) -> None:
        self.peer_server._accepted(request, client_address)

    def handle_error(self, request, client_address) -> None:
        LOG.exception('accepting a peer connection from %s failed', client_address)


class _Connection:
    """One client's keep-alive connection: its requests one after the other."""

    def __init__(self, server: PeerServer, sock: socket.socket):
        self.server = server
        self.sock = sock
        self.rfile = sock.makefile('rb')

    def serve(self) -> None:
        try:
            while not self.server._stopping.is_set() and self._one_request():
                pass
        except OSError as exc:
            # The client went, stopped reading, or was silent too long.
            LOG.debug('peer connection closed: %s', exc)
        finally:
            self.rfile.close()

    def _one_request(self) -> bool:
        """Read a request and answer it; whether the connection stays open."""
        self.sock.settimeout(IDLE_TIMEOUT)
        try:
            request = self._read_head()
        except _Refused as refused:
            return self._send_error(refused.status, refused.error, keep_alive=False)
        if request is None:
            return False
        method, target, headers, keep_alive = request
        return self._answer(method, target, headers, keep_alive)

    def _read_head(self) -> tuple[str, str, http.client.HTTPMessage, bool] | None:
        """(method, target, headers, keep-alive), None if the client closed first.

        :raises: _Refused for a malformed or oversized head, one announcing a body, or
            one slower than HEAD_TIMEOUT; OSError (TimeoutError: IDLE_TIMEOUT s without
            a request, IO_TIMEOUT s without a byte of one).
        """
        if not self.rfile.peek(1):  # the wait for a request: IDLE_TIMEOUT
            return None
        deadline = time.monotonic() + HEAD_TIMEOUT
        lines, size = [], 0
        while True:
            line = self._read_line(HEAD_LIMIT + 1 - size, deadline)
            if not line:
                return None
            lines.append(line)
            size += len(line)
            if size > HEAD_LIMIT:
                raise _Refused(431, protocol.RequestRefused(
                    f'the request line and headers exceed {HEAD_LIMIT} bytes'))
            if not line.endswith(b'\n'):
                return None  # the client closed in the middle of a line
            if len(lines) > 1 and line in (b'\r\n', b'\n'):
                break
        self.sock.settimeout(IO_TIMEOUT)  # the body, if any: the deadline was the head's
        request_line = lines[0].rstrip(b'\r\n').decode('latin-1')
        parts = request_line.split(' ')
        if len(parts) != 3 or parts[2] not in ('HTTP/1.0', 'HTTP/1.1'):
            raise _Refused(400, protocol.RequestRefused(
                f'malformed request line {request_line!r:.100}'))
        method, target, version = parts
        try:
            headers = http.client.parse_headers(io.BytesIO(b''.join(lines[1:])))
        except http.client.HTTPException as exc:
            raise _Refused(431, protocol.RequestRefused(f'malformed headers: {exc}')) from exc
        length = headers.get('Content-Length', '0').strip()
        if headers.get('Transfer-Encoding') or not (length.isascii() and length.isdigit()):
            # Unread, a body would be taken for the next request: refuse and close.
            raise _Refused(400, protocol.RequestRefused(
                'a request to a peer has no body but a PUT\'s or persisted\'s, of a '
                'Content-Length'))
        tokens = {token.strip().lower() for token in headers.get('Connection', '').split(',')}
        keep_alive = 'keep-alive' in tokens if version == 'HTTP/1.0' else 'close' not in tokens
        return method, target, headers, keep_alive

    def _read_line(self, limit: int, deadline: float) -> bytes:
        """The next line with its newline, at most ``limit`` bytes (fewer without a
        newline: the client closed), by ``deadline``. A readline() would wait IO_TIMEOUT
        for each byte, however many: this waits for one socket read at a time.

        :raises: _Refused (408) once the deadline passes; OSError.
        """
        line = b''
        while len(line) < limit:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Refused(408, protocol.RequestRefused(
                    f'the request line and headers took over {HEAD_TIMEOUT:g} s'))
            self.sock.settimeout(min(IO_TIMEOUT, left))
            try:
                buffered = self.rfile.peek(1)  # one socket read at most
            except TimeoutError:
                if left < IO_TIMEOUT:  # the deadline cut this wait short
                    raise _Refused(408, protocol.RequestRefused(
                        f'the request line and headers took over {HEAD_TIMEOUT:g} s')) from None
                raise
            if not buffered:
                break
            room = limit - len(line)
            end = buffered.find(b'\n', 0, room)
            line += self.rfile.read(end + 1 if end >= 0 else min(len(buffered), room))
            if end >= 0:
                break
        return line

    def _read_body(self, length: int) -> bytes:
        """``length`` bytes of body (fewer: the client closed), within HEAD_TIMEOUT +
        length / SLOWEST_RATE s: a client trickling its body holds a request slot no
        longer than a slow honest one.

        :raises: _Refused (408) once that passes; OSError.
        """
        allowed = HEAD_TIMEOUT + length / SLOWEST_RATE
        deadline = time.monotonic() + allowed
        pieces, got = [], 0
        while got < length:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Refused(408, protocol.RequestRefused(
                    f'the body of {length} bytes took over {allowed:.3g} s ({got} came)'))
            self.sock.settimeout(min(IO_TIMEOUT, left))
            try:
                piece = self.rfile.read1(min(_READ_PIECE, length - got))
            except TimeoutError:
                if left < IO_TIMEOUT:  # the deadline cut this wait short
                    continue
                raise
            if not piece:
                break
            pieces.append(piece)
            got += len(piece)
        self.sock.settimeout(IO_TIMEOUT)
        return b''.join(pieces)

    def _answer(self, method: str, target: str, headers: http.client.HTTPMessage,
                keep_alive: bool) -> bool:
        server = self.server
        length = int(headers.get('Content-Length', '0'))
        # A refusal leaves a body unread: the connection cannot carry another request.
        open_after = keep_alive and not length
        if server._token and not auth.token_ok(headers.get('Authorization'), server._token):
            return self._send_error(
                401, protocol.Unauthorized('missing or wrong bearer token'), open_after,
                {'WWW-Authenticate': 'Bearer realm="vmcloud-peer"'})
        route = _route(target)
        if route is None:
            return self._send_error(
                404, protocol.RequestRefused(f'no such path {target!r:.100}'), open_after)
        actions, chunk_id = route
        action = actions.get(method)
        if action is None:
            allowed = ', '.join(actions)
            return self._send_error(
                405, protocol.RequestRefused(f'{target!r:.100} takes {allowed}, not '
                                             f'{method!r:.20}'), open_after, {'Allow': allowed})
        if chunk_id is not None:
            try:
                check_chunk_id(chunk_id)
            except exception.InvalidName as exc:
                return self._send_error(400, exc, open_after)
        if length > _BODY_LIMITS.get(action, 0):
            what = (f'of over {_BODY_LIMITS[action]} bytes' if action in _BODY_LIMITS
                    else 'at all')
            return self._send_error(
                413 if action in _BODY_LIMITS else 400,
                protocol.RequestRefused(f'{method} {target!r:.100} takes no body {what}'),
                False)
        if not server._slots.acquire(blocking=False):
            return self._send_error(503, exception.WarehouseBusy(
                f'peer {server.url} is busy: it serves {server.threads} requests at once '
                '([mirror] peer_threads)'), open_after)
        try:
            if action in _BODY_LIMITS:
                try:
                    body = self._read_body(length)
                except _Refused as refused:
                    return self._send_error(refused.status, refused.error, keep_alive=False)
                if len(body) != length:
                    return False  # the client went in the middle of its body
                return getattr(self, action)(chunk_id, keep_alive, body, headers)
            return getattr(self, action)(chunk_id, keep_alive)
        finally:
            server._slots.release()

    # -- the routes ----------------------------------------------------------------

    def _get_chunk(self, chunk_id: str, keep_alive: bool) -> bool:
        server = self.server
        exchange = server.exchange
        try:
            # Joining the node's own fetch is waiting for it: never for one that asks
            # peers (it may be waiting for the very peer asking: both would time out).
            data = server.cache.read_chunk(
                chunk_id, fetch=exchange.fetch_from_repository,
                join=lambda chunk_id: not exchange.asking_peers(chunk_id))
        except cache_mod.FetchInFlight:
            return self._send_error(503, exception.WarehouseBusy(
                f'peer {server.url} is asking its peers for chunk {chunk_id} itself: ask '
                'the next owner'), keep_alive)
        except Exception as exc:  # noqa: B902 - every failure is answered, see _failure
            return self._send_error(*_failure(chunk_id, exc), keep_alive)
        self._send(200, data, 'application/octet-stream', keep_alive, limited=True)
        server._count(served_chunks=1, served_bytes=len(data))
        return keep_alive

    def _stage(self, chunk_id: str, keep_alive: bool) -> bool:
        try:
            self.server.cache.ensure(chunk_id)
        except Exception as exc:  # noqa: B902 - every failure is answered, see _failure
            return self._send_error(*_failure(chunk_id, exc), keep_alive)
        self._send(204, b'', '', keep_alive)
        self.server._count(staged_chunks=1)
        return keep_alive

    def _put_chunk(self, chunk_id: str, keep_alive: bool, body: bytes,
                   headers: http.client.HTTPMessage) -> bool:
        origin = headers.get(ORIGIN_HEADER, '')
        try:
            if origin:
                manifest_mod.validate_image_name(origin, 'origin node')
            self.server.cache.put(chunk_id, body, replica=True, origin=origin)
        except exception.CorruptChunk as exc:
            return self._send_error(422, exc, keep_alive)
        except exception.InvalidName as exc:
            return self._send_error(400, exc, keep_alive)
        except exception.ReplicaBudgetFull as exc:
            return self._send_error(507, exc, keep_alive)
        except Exception as exc:  # noqa: B902 - every failure is answered, see _failure
            return self._send_error(*_failure(chunk_id, exc), keep_alive)
        self._send(201, b'', 'application/octet-stream', keep_alive)
        return keep_alive

    def _persisted(self, _chunk_id: None, keep_alive: bool, body: bytes,
                   _headers: http.client.HTTPMessage) -> bool:
        try:
            chunk_ids = json.loads(body)
            if not isinstance(chunk_ids, list) or len(chunk_ids) > PERSISTED_BATCH:
                raise ValueError(f'not a list of at most {PERSISTED_BATCH} chunk ids')
            for chunk_id in chunk_ids:
                check_chunk_id(chunk_id)
        except (ValueError, exception.InvalidName) as exc:
            return self._send_error(400, protocol.RequestRefused(
                f'persisted takes a JSON list of chunk ids: {exc}'), keep_alive)
        self.server.cache.mark_persisted(chunk_ids)
        self._send(204, b'', '', keep_alive)
        return keep_alive

    def _stats(self, _chunk_id: None, keep_alive: bool) -> bool:
        self._send(200, json.dumps(self.server.document()).encode(), 'application/json',
                   keep_alive)
        return keep_alive

    # -- answers -------------------------------------------------------------------

    def _send_error(self, status: int, error: exception.VmcloudError, keep_alive: bool,
                    headers: dict[str, str] | None = None) -> bool:
        _, body = protocol.encode_error(error)
        self._send(status, body, 'application/json', keep_alive, headers=headers)
        return keep_alive

    def _send(self, status: int, body: bytes, content_type: str, keep_alive: bool,
              headers: dict[str, str] | None = None, limited: bool = False) -> None:
        """:raises: OSError if the client went or stopped reading for IO_TIMEOUT."""
        self.sock.settimeout(IO_TIMEOUT)
        self.sock.sendall(_head(status, content_type, len(body), keep_alive, headers))
        limit = self.server.upload_limit if limited else None
        view = memoryview(body)
        for start in range(0, len(view), PIECE):
            piece = view[start:start + PIECE]
            if limit is not None:
                limit.take(len(piece))
            self.sock.sendall(piece)


def _route(target: str) -> tuple[dict[str, str], str | None] | None:
    """({method: handler} of the methods a path takes, chunk id); None for an unknown
    path."""
    if target == _STATS_PATH:
        return {'GET': '_stats'}, None
    if target == _PERSISTED_PATH:
        return {'POST': '_persisted'}, None
    match = _STAGE_PATH.fullmatch(target)
    if match:
        return {'POST': '_stage'}, match.group(1)
    match = _CHUNK_PATH.fullmatch(target)
    if match:
        return {'GET': '_get_chunk', 'PUT': '_put_chunk'}, match.group(1)
    return None


def _head(status: int, content_type: str, length: int, keep_alive: bool,
          headers: dict[str, str] | None = None) -> bytes:
    lines = [f'HTTP/1.1 {status} {http.HTTPStatus(status).phrase}']
    if status != 204:  # a 204 has no Content-Length (RFC 9110 8.6)
        lines += [f'Content-Type: {content_type}', f'Content-Length: {length}']
    lines.append('Connection: ' + ('keep-alive' if keep_alive else 'close'))
    lines += [f'{name}: {value}' for name, value in (headers or {}).items()]
    return ('\r\n'.join(lines) + '\r\n\r\n').encode('latin-1')


def _causes(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__


def _failure(chunk_id: str, exc: Exception) -> tuple[int, exception.VmcloudError]:
    """The status and error that answer a failure to have a chunk: 404 if the repository
    lacks it, 503 if the repository was busy or the node's cache is closed (it is
    stopping), 502 for another failure to fetch it (the error named in the message),
    500 for the node's own failure (its cache's disk)."""
    if isinstance(exc, cache_mod.CacheClosed):
        return 503, exception.WarehouseBusy(f'this node is stopping: {exc}')
    causes = list(_causes(exc))
    if any(isinstance(cause, exception.ChunkNotFound) for cause in causes):
        return 404, exception.ChunkNotFound(chunk_id)
    if any(isinstance(cause, exception.WarehouseBusy) for cause in causes):
        return 503, exception.WarehouseBusy(f'{type(exc).__name__}: {exc}')
    if isinstance(exc, exception.StorageError):
        return 502, exc
    if isinstance(exc, exception.FetchFailed):
        return 502, exception.StorageError(f'FetchFailed: {exc}')
    if not isinstance(exc, OSError):
        LOG.error('serving chunk %s to a peer failed', chunk_id, exc_info=exc)
    return 500, exception.StorageError(f'{type(exc).__name__}: {exc}')
