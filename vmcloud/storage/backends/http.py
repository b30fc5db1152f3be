"""A warehouse served by ``vmcloud warehouse`` over HTTP: the client backend.

Every Backend method is one request to the service (iter_chunks and the
referenced set of retain are streamed), and every error the service sends back
is raised here as the same vmcloud class with the same fields. Connections are
kept alive and pooled (urllib3, thread-safe), so one instance serves every
thread of a compute manager.

Chunks: a chunk id is its own integrity check, so read_chunk checks the bytes
it received against it (CorruptChunk), and the service checks every chunk it
receives before storing it.

Writes: the writer asks the session which chunks of a batch the store lacks,
one ``POST /v1/chunks/missing`` per batch (WriteSession.MISSING_BATCH ids, or
fewer when 16 MiB of chunk data waits for the answer), then puts only those;
put_chunk asks nothing and uploads in the background, several in flight, into a
write session on the service; commit() waits for them and commits. The backend's
own ``missing()`` asks the same for callers that know their ids ahead (a node's cache).

Locks are leases the service grants (see vmcloud.storage.service.leases): a
thread renews each lease every third of its TTL while the context is held. If a
renewal fails for a whole TTL, or the service says the lease is gone, the lease
is lost: every later call made under it (by the thread holding it, or by a write
session begun under it) raises LeaseLost, and so does leaving the context, so
a writer never goes on believing gc cannot run.

Deadlines: a service that stops answering (its host or the network drops packets:
nothing is refused) fails each request within ``[storage_http] timeout``, naming
the URL and the request: connecting, all retries included, gets that long, and so
does each wait for the next bytes of an answer, a streamed one too. A renewal gets
a third of the lease's TTL, and a lease no renewal reached for a whole TTL counts
as lost even while its renewer still waits.
"""
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import threading
import time
import urllib.parse
from typing import Iterable, Iterator

import urllib3
from oslo_config import cfg

from vmcloud import exception
from vmcloud.storage import backend
from vmcloud.storage import protocol

LOG = logging.getLogger(__name__)

# How long one poll for a pending lease may hold its request open on the service.
_POLL_WAIT = 10.0


def _check_image(image: str) -> str:
    # The Warehouse validates names; this keeps a bad one from changing the URL's path.
    if not image or image in ('.', '..') or '/' in image or '\0' in image:
        raise exception.InvalidName(f'invalid image name {image!r}')
    return urllib.parse.quote(image, safe='')


@dataclasses.dataclass(eq=False)
class _Lease:
    """A lease this instance holds; ``lost`` says why it is no longer held."""

    id: str
    kind: str
    what: str
    ttl: float
    renewed_at: float
    lost: exception.StorageError | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)

    def check(self) -> None:
        """:raises: LeaseLost if the renewer said so, or if no renewal got through for a
        whole TTL (the renewer may still be waiting on a service that does not answer:
        the service expires the lease meanwhile, so we must not go on holding it)."""
        if self.lost is None and time.monotonic() - self.renewed_at >= self.ttl:
            self.lost = exception.StorageError(
                f'no renewal reached the service for {self.ttl:g} s')
        if self.lost is not None:
            raise exception.LeaseLost(f'{self.what} was lost: {self.lost}') from self.lost


class HttpWriteSession(backend.WriteSession):
    """A write session on the service, begun under one lease."""

    # One request asks about a batch: a HEAD per chunk costs a round trip each.
    MISSING_BATCH = 64

    def __init__(self, store: 'HttpBackend', lease: _Lease, session_id: str):
        super().__init__(store)
        self._store = store
        self._lease = lease
        self._id = session_id
        self._staged: set[str] = set()
        self._stored_bytes = 0
        self._lock = threading.Lock()
        in_flight = store.conf.storage_http.uploads_in_flight
        # Bounds the chunks held in memory waiting to be sent, not just the threads.
        self._slots = threading.BoundedSemaphore(in_flight)
        self._pool = concurrent.futures.ThreadPoolExecutor(in_flight, 'warehouse-upload')
        self._uploads: list[concurrent.futures.Future] = []
        self._finished = False

    @property
    def stored_bytes(self) -> int:
        return self._stored_bytes

    def _check(self) -> None:
        if self._finished:
            raise exception.StorageError(f'write session {self._id[:8]} is already over')
        self._lease.check()
        for future in [f for f in self._uploads if f.done()]:
            future.result()  # the first failed upload fails the session
            self._uploads.remove(future)

    def has_put(self, chunk_id: str) -> bool:
        return chunk_id in self._staged

    def missing(self, chunk_ids: Iterable[str]) -> set[str]:
        """:raises: LeaseLost; the first failed upload's error; StorageError."""
        self._check()
        return super().missing(chunk_ids)

    def put_chunk(self, chunk_id: str, data: bytes) -> None:
        self._check()
        if chunk_id in self._staged:
            return
        self._staged.add(chunk_id)
        if not self._slots.acquire(timeout=self._store.timeout * 2):
            raise exception.StorageError(
                f'uploads to the warehouse at {self._store.url} made no progress in '
                f'{self._store.timeout * 2:g} s')
        try:
            # A copy: the caller may reuse its buffer once put_chunk returns
            # (chunker.read_chunks does), while the upload is still in flight.
            self._uploads.append(self._pool.submit(self._upload, chunk_id, bytes(data)))
        except BaseException:
            self._slots.release()
            raise

    def _upload(self, chunk_id: str, data: bytes) -> None:
        try:
            self._store.request('PUT', f'/sessions/{self._id}/chunks/{chunk_id}', body=data)
            with self._lock:
                self._stored_bytes += len(data)
        finally:
            self._slots.release()

    def _drain(self) -> None:
        """Wait for every upload; :raises: the first upload's error."""
        uploads, self._uploads = self._uploads, []
        errors = [f.exception() for f in uploads if f.exception() is not None]
        if errors:
            raise errors[0]

    def commit(self) -> None:
        # On failure the session stays open for abort(), which tells the service.
        self._check()
        self._drain()
        self._lease.check()
        self._store.request_json('POST', f'/sessions/{self._id}/commit')
        self._finish()

    def abort(self) -> None:
        if self._finished:
            return
        try:
            self._drain()
        except Exception:  # noqa: B902 - abort never raises; the uploads are dropped
            pass
        try:
            self._store.request('DELETE', f'/sessions/{self._id}')
        except exception.VmcloudError as exc:
            # The service aborts a session whose lease ended; nothing is visible either way.
            LOG.info('aborting write session %s: %s', self._id[:8], exc)
        self._finish()

    def _finish(self) -> None:
        self._finished = True
        self._pool.shutdown(wait=False)


class HttpBackend(backend.Backend):
    OPTION_GROUP = cfg.OptGroup('storage_http', title='Warehouse service client',
                                help='[storage] backend = http: the warehouse served by '
                                     '"vmcloud warehouse" on another host.')
    OPTIONS = [
        cfg.URIOpt('url', schemes=['http', 'https'],
                   help='URL of the warehouse service, e.g. https://repo1:9494.'),
        cfg.StrOpt('token', secret=True, default='',
                   help='Bearer token of the service ([warehouse_service] token).'),
        cfg.StrOpt('ca_file',
                   help='PEM file of the certificate authorities to trust for an https '
                        'URL (default: the system\'s).'),
        cfg.FloatOpt('timeout', default=60.0, min=0.1,
                     help='Seconds to wait for a connection (all its retries together) or '
                          'for the next bytes of an answer: a service that stops answering '
                          '(dropped packets) fails a request within about this, naming it.'),
        cfg.IntOpt('connect_retries', default=3, min=0,
                   help='Times a request is retried when the service cannot be reached '
                        '(never once it has been sent), within [storage_http] timeout, '
                        'before the error is raised.'),
        cfg.FloatOpt('lease_ttl', default=30.0, min=0.2,
                     help='Seconds a lock outlives this client if it stops renewing '
                          'it (a crash, a partition); renewed every third of it.'),
        cfg.FloatOpt('lock_wait', default=600.0, min=0.0,
                     help='Longest time in seconds to wait for an image lock or a '
                          'shared lock held by others (WarehouseBusy after).'),
        cfg.IntOpt('uploads_in_flight', default=8, min=1,
                   help='Chunks one write session uploads at once.'),
    ]
    CAPABILITIES = (backend.Capabilities.SHARED_ACROSS_HOSTS
                    | backend.Capabilities.CROSS_HOST_LOCKING)

    def __init__(self, conf: cfg.ConfigOpts):
        super().__init__(conf)
        opts = conf.storage_http
        if not opts.url:
            raise exception.ConfigError('[storage] backend = http needs [storage_http] url')
        self.url = opts.url.rstrip('/')
        self.timeout = opts.timeout
        self._token = opts.token
        self._connect_retries = opts.connect_retries
        tls = {}
        if self.url.startswith('https:'):
            tls = {'cert_reqs': 'CERT_REQUIRED', 'ca_certs': opts.ca_file}
        # Retries are ours (request()): urllib3's give each attempt the whole connect
        # timeout, so a service that drops packets took (retries + 1) times it.
        self._http = urllib3.PoolManager(num_pools=4, maxsize=32, retries=False, **tls)
        self._local = threading.local()

    def __repr__(self) -> str:
        return f'HttpBackend({self.url})'

    # -- requests ----------------------------------------------------------------

    def _headers(self) -> dict:
        return {'Authorization': f'Bearer {self._token}'} if self._token else {}

    def request(self, method: str, path: str, body: bytes | None = None,
                fields: dict | None = None, ok: tuple[int, ...] = (200, 201, 204),
                stream: bool = False, timeout: float | None = None
                ) -> urllib3.BaseHTTPResponse:
        """One request to ``/v1{path}``; the answer if its status is in ``ok``.

        Bounded: connecting, with every retry, takes at most ``timeout`` (default
        ``[storage_http] timeout``) and so does each wait for the next bytes of the
        answer (a streamed one included), so a service that stops answering fails the
        request instead of hanging it. A request is retried only while it cannot
        connect (never once sent: it may have been carried out).

        :raises: StorageError naming the URL and the request if the service cannot be
            reached or does not answer in time; the error the service sent (the same
            class, the same fields).
        """
        url = f'{self.url}{protocol.API}{path}'
        if fields:
            url += '?' + urllib.parse.urlencode(fields)
        headers = self._headers()
        if body is not None:
            headers['Content-Type'] = 'application/octet-stream'
        limit = self.timeout if timeout is None else timeout
        what = f'{method} {protocol.API}{path}'
        deadline = time.monotonic() + limit
        for attempt in range(self._connect_retries + 1):
            left = deadline - time.monotonic()
            try:
                response = self._http.request(
                    method, url, body=body, headers=headers, preload_content=not stream,
                    timeout=urllib3.Timeout(connect=max(0.001, left), read=limit))
                break
            except urllib3.exceptions.ConnectTimeoutError as exc:
                # NewConnectionError (refused, unresolvable) is one too: nothing was sent.
                pause = 0.2 * 2 ** attempt
                if (attempt == self._connect_retries
                        or time.monotonic() + pause >= deadline):
                    raise self._unreachable(what, exc, limit) from exc
                time.sleep(pause)
            except urllib3.exceptions.HTTPError as exc:
                raise self._unreachable(what, exc, limit) from exc
        if response.status in ok:
            return response
        try:
            data = response.data if not stream else response.read()
        except urllib3.exceptions.HTTPError as exc:  # the error's body stalled
            raise self._unreachable(what, exc, limit) from exc
        finally:
            response.release_conn()
        error = protocol.decode_error(response.status, data, f'the warehouse at {self.url}')
        # A HEAD's answer has no body to say so: the status must.
        if response.status == 401 or isinstance(error, protocol.Unauthorized):
            given = 'the configured token' if self._token else 'no token'
            raise protocol.Unauthorized(
                f'the warehouse at {self.url} refused {given} ([storage_http] token): '
                f'HTTP {response.status}')
        raise error

    def _unreachable(self, what: str, exc: Exception, limit: float) -> exception.StorageError:
        if isinstance(exc, urllib3.exceptions.NewConnectionError):
            reason = exc.args[-1] if exc.args else exc  # refused, unresolvable
        elif isinstance(exc, urllib3.exceptions.TimeoutError):
            # Dropped packets look like this: no refusal, no answer.
            reason = f'no answer within {limit:g} s'
        else:
            reason = getattr(exc, 'reason', None) or exc
        return exception.StorageError(f'cannot reach the warehouse at {self.url} ({what}): '
                                      f'{reason}')

    def request_json(self, method: str, path: str, doc=None, body: bytes | None = None,
                     **kwargs):
        if doc is not None:
            body = json.dumps(doc).encode()
        data = self.request(method, path, body=body, **kwargs).data
        try:
            return json.loads(data) if data else {}
        except ValueError as exc:
            raise exception.StorageError(
                f'the warehouse at {self.url} answered {method} {path} with no JSON') from exc

    # -- leases held by this thread ----------------------------------------------

    def _held(self) -> list[_Lease]:
        held = getattr(self._local, 'leases', None)
        if held is None:
            held = self._local.leases = []
        return held

    def _check_leases(self) -> None:
        """:raises: LeaseLost if a lease this thread holds was lost."""
        for lease in self._held():
            lease.check()

    # -- chunks ------------------------------------------------------------------

    def has_chunk(self, chunk_id: str) -> bool:
        self._check_leases()
        response = self.request('HEAD', f'/chunks/{chunk_id}', ok=(200, 404))
        return response.status == 200

    def missing(self, chunk_ids: Iterable[str]) -> set[str]:
        """One request per protocol.MAX_MISSING_QUERY ids. :raises: StorageError."""
        self._check_leases()
        wanted = list(dict.fromkeys(chunk_ids))
        lacking = set()
        for start in range(0, len(wanted), protocol.MAX_MISSING_QUERY):
            batch = wanted[start:start + protocol.MAX_MISSING_QUERY]
            lacking.update(self.request_json('POST', '/chunks/missing',
                                             {'chunks': batch})['missing'])
        return lacking

    def read_chunk(self, chunk_id: str) -> bytes:
        self._check_leases()
        data = self.request('GET', f'/chunks/{chunk_id}').data
        actual = hashlib.sha256(data).hexdigest()
        if actual != chunk_id:
            raise exception.CorruptChunk(chunk_id, actual)
        return data

    def iter_chunks(self) -> Iterator[tuple[str, int]]:
        self._check_leases()
        response = self.request('GET', '/chunks', stream=True)
        try:
            pending = b''
            for piece in response.stream(256 * 1024):
                lines = (pending + piece).split(b'\n')
                pending = lines.pop()
                for line in lines:
                    if line == b'end':
                        return
                    chunk_id, size = line.decode('ascii').split()
                    yield chunk_id, int(size)
        except urllib3.exceptions.HTTPError as exc:
            raise exception.StorageError(
                f'the listing of chunks from the warehouse at {self.url} was cut or stalled '
                f'(GET {protocol.API}/chunks, {self.timeout:g} s per read): {exc}') from exc
        finally:
            response.release_conn()
        raise exception.StorageError(
            f'the listing of chunks from the warehouse at {self.url} ended early')

    def retain(self, referenced: set[str]) -> tuple[int, int]:
        lease = self._innermost('exclusive', 'retain')

        def lines():
            batch = []
            for chunk_id in referenced:
                batch.append(chunk_id)
                if len(batch) == 4096:
                    yield ('\n'.join(batch) + '\n').encode()
                    batch = []
            yield ('\n'.join(batch) + '\nend\n').encode()

        doc = self.request_json('POST', '/gc/retain', body=b''.join(lines()),
                                fields={'lease': lease.id})
        return doc['removed'], doc['freed']

    def stored_chunk_bytes(self) -> int:
        return self.request_json('GET', '/stats')['chunk_bytes']

    def manifests_stored_bytes(self) -> int:
        return self.request_json('GET', '/stats')['manifest_bytes']

    def begin_write(self) -> backend.WriteSession:
        lease = self._innermost(('shared', 'exclusive'), 'begin_write')
        doc = self.request_json('POST', '/sessions', {'lease': lease.id})
        return HttpWriteSession(self, lease, doc['session'])

    def _innermost(self, kinds, call: str) -> _Lease:
        """The lease of the innermost lock of ``kinds`` this thread holds.

        :raises: LeaseLost if it was lost; StorageError if there is none.
        """
        self._check_leases()
        kinds = (kinds,) if isinstance(kinds, str) else kinds
        for lease in reversed(self._held()):
            if lease.kind in kinds:
                return lease
        raise exception.StorageError(
            f"{call} needs {' or '.join(k + '_lock()' for k in kinds)} held by this thread")

    def damaged(self) -> list[str]:
        return self.request_json('GET', '/damaged')['damaged']

    # -- manifests ---------------------------------------------------------------

    def _manifest_path(self, image: str, version: int) -> str:
        return f'/images/{_check_image(image)}/versions/{int(version)}'

    def create_manifest(self, image: str, version: int, data: bytes) -> None:
        self._check_leases()
        self.request('PUT', self._manifest_path(image, version), body=data)

    def read_manifest(self, image: str, version: int) -> bytes:
        self._check_leases()
        return self.request('GET', self._manifest_path(image, version)).data

    def read_manifest_prefix(self, image: str, version: int, length: int) -> bytes:
        self._check_leases()
        return self.request('GET', self._manifest_path(image, version),
                            fields={'length': max(0, length)}).data

    def delete_manifest(self, image: str, version: int) -> None:
        self._check_leases()
        self.request('DELETE', self._manifest_path(image, version))

    def list_images(self) -> list[str]:
        self._check_leases()
        return self.request_json('GET', '/images')['images']

    def list_versions(self, image: str) -> list[int]:
        self._check_leases()
        return self.request_json('GET', f'/images/{_check_image(image)}/versions')['versions']

    # -- attachments -------------------------------------------------------------

    def _attachment_path(self, image: str, name: str) -> str:
        return f'/images/{_check_image(image)}/attachments/{_check_image(name)}'

    def write_attachment(self, image: str, name: str, data: bytes) -> None:
        self._check_leases()
        self.request('PUT', self._attachment_path(image, name), body=bytes(data))

    def read_attachment(self, image: str, name: str) -> bytes | None:
        self._check_leases()
        response = self.request('GET', self._attachment_path(image, name), ok=(200, 404))
        return response.data if response.status == 200 else None

    def list_attachments(self, image: str) -> list[str]:
        self._check_leases()
        return self.request_json(
            'GET', f'/images/{_check_image(image)}/attachments')['attachments']

    def delete_attachment(self, image: str, name: str) -> None:
        self._check_leases()
        self.request('DELETE', self._attachment_path(image, name))

    def delete_attachments(self, image: str) -> None:
        self._check_leases()
        self.request('DELETE', f'/images/{_check_image(image)}/attachments')

    # -- locks -------------------------------------------------------------------

    def shared_lock(self):
        return self._lease('shared', None, None, 'shared lock')

    def exclusive_lock(self, timeout: float):
        return self._lease('exclusive', None, timeout, 'exclusive lock')

    def image_lock(self, image: str):
        _check_image(image)
        return self._lease('image', image, None, f'image lock on {image}')

    def _lease(self, kind: str, image: str | None, timeout: float | None, what: str):
        return _LeaseContext(self, kind, image, timeout, f'{what} at {self.url}')

    def acquire(self, kind: str, image: str | None, timeout: float | None,
                what: str) -> _Lease:
        """Ask for a lease and wait until it is held.

        :raises: WarehouseBusy if it is not held after ``timeout`` (an exclusive
            lock) or ``[storage_http] lock_wait``; the service's error.
        """
        opts = self.conf.storage_http
        # The exclusive lock's own timeout is the service's to apply; then it fails.
        limit = opts.lock_wait if timeout is None else timeout + opts.lock_wait
        deadline = time.monotonic() + limit

        def wait() -> float:
            # Each answer within the read timeout, and none after the deadline.
            return max(0.0, min(_POLL_WAIT, self.timeout - 0.5, deadline - time.monotonic()))

        doc = self.request_json('POST', '/locks', {
            'kind': kind, 'image': image, 'ttl': opts.lease_ttl, 'timeout': timeout,
            'wait': wait()})
        lease = _Lease(id=doc['lease'], kind=kind, what=what, ttl=doc['ttl'],
                       renewed_at=time.monotonic())
        try:
            while doc['state'] == 'pending':
                if time.monotonic() >= deadline:
                    raise exception.WarehouseBusy(f'{what} is still held by others after '
                                                  f'{limit:g} s')
                # Each poll renews the pending lease, so the service keeps it.
                doc = self.request_json('GET', f'/locks/{lease.id}', fields={'wait': wait()})
        except BaseException:
            self.release(lease)
            raise
        lease.renewed_at = time.monotonic()
        threading.Thread(target=self._renew, args=(lease,), daemon=True,
                         name=f'renew-{lease.id[:8]}').start()
        return lease

    def _renew(self, lease: _Lease) -> None:
        """Renew every third of the TTL until released; the lease is lost when the
        service says so, or when no renewal got through for a whole TTL."""
        while not lease.done.wait(lease.ttl / 3):
            # When the service renewed it, at the latest; and a renewal that cannot
            # connect or get its answer in a third of the TTL is a failed one.
            started = time.monotonic()
            try:
                self.request('POST', f'/locks/{lease.id}/renew',
                             timeout=max(0.1, min(self.timeout, lease.ttl / 3)))
                lease.renewed_at = started
            except exception.LeaseLost as exc:
                lease.lost = exc
                break
            except exception.VmcloudError as exc:
                if time.monotonic() - lease.renewed_at >= lease.ttl:
                    lease.lost = exception.StorageError(
                        f'no renewal reached the service for {lease.ttl:g} s: {exc}')
                    break
                LOG.warning('renewing %s: %s; trying again', lease.what, exc)
        if lease.lost is not None:
            LOG.error('%s is lost: %s', lease.what, lease.lost)

    def release(self, lease: _Lease) -> None:
        """Stop renewing and release; never raises (an unreleased lease expires)."""
        lease.done.set()
        try:
            self.request('DELETE', f'/locks/{lease.id}')
        except exception.VmcloudError as exc:
            LOG.warning('releasing %s: %s; it expires in %g s', lease.what, exc, lease.ttl)

    def purge_abandoned(self) -> int:
        lease = self._innermost('exclusive', 'purge_abandoned')
        return self.request_json('POST', '/gc/purge', fields={'lease': lease.id})['removed']


class _LeaseContext:
    """``with backend.shared_lock():`` and the others: a lease held for the block."""

    def __init__(self, store: HttpBackend, kind: str, image: str | None,
                 timeout: float | None, what: str):
        self._store = store
        self._args = (kind, image, timeout, what)
        self._lease: _Lease | None = None

    def __enter__(self) -> None:
        self._lease = self._store.acquire(*self._args)
        self._store._held().append(self._lease)

    def __exit__(self, exc_type, exc, tb) -> None:
        lease, self._lease = self._lease, None
        held = self._store._held()
        if lease in held:
            held.remove(lease)
        self._store.release(lease)
        if exc_type is None:
            # The block ran, but not all of it under the lock: say so.
            lease.check()
