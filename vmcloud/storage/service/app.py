"""The warehouse service's HTTP application: one request per Backend method.

Handlers run the backend's blocking calls in a thread pool, so one slow disk
read does not stall the event loop; a chunk body is read whole (it is at most
one chunk) and every listing that can be long (iter_chunks, the referenced set
of a gc) is streamed line by line. Every VmcloudError becomes the JSON error of
``protocol``, so the client raises the same class with the same fields.
"""
import asyncio
import collections
import concurrent.futures
import functools
import hashlib
import itertools
import logging

from aiohttp import web

from vmcloud import exception
from vmcloud.storage import backend as backend_mod
from vmcloud.storage import manifest as manifest_mod
from vmcloud.storage import protocol
from vmcloud.storage.service import auth
from vmcloud.storage.service import leases as leases_mod

LOG = logging.getLogger(__name__)

CHUNK = r'{chunk_id:[0-9a-f]{64}}'
VERSION = r'{version:[1-9][0-9]{0,17}}'
# The longest a client may make the service hold a request open waiting for a lease.
MAX_LEASE_WAIT = 20.0
_ITER_BATCH = 4096


def _json(doc, status: int = 200) -> web.Response:
    return web.json_response(doc, status=status)


async def _body_json(request: web.Request) -> dict:
    try:
        doc = await request.json()
    except ValueError as exc:
        raise protocol.RequestRefused(f'request body is not JSON: {exc}') from exc
    if not isinstance(doc, dict):
        raise protocol.RequestRefused('request body must be a JSON object')
    return doc


def _number(value, name: str, default: float | None = None) -> float | None:
    if value is None:
        return default
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise protocol.RequestRefused(f'{name} must be a number, not {value!r}') from exc


class WarehouseApp:
    """The handlers over one backend, its leases, and request counters."""

    def __init__(self, backend: backend_mod.Backend, leases: leases_mod.LeaseTable,
                 token: str, anonymous_reads: bool = False, threads: int = 16):
        self.backend = backend
        self.leases = leases
        self.pool = concurrent.futures.ThreadPoolExecutor(threads, 'warehouse')
        # Waiting for a lease holds a thread for up to MAX_LEASE_WAIT: not the
        # backend's threads, which every chunk read needs.
        self.wait_pool = concurrent.futures.ThreadPoolExecutor(4 * threads, 'lease-wait')
        # What crossed the wire, for tests and benchmarks (GET /v1/stats).
        self.counters: collections.Counter = collections.Counter()
        self.app = web.Application(
            client_max_size=protocol.MAX_CHUNK_BYTES + 4096,
            middlewares=[self._errors, auth.middleware(token, anonymous_reads)])
        self._routes()

    def _routes(self) -> None:
        api = protocol.API
        r = self.app.router
        r.add_route('HEAD', f'{api}/chunks/{CHUNK}', self.has_chunk)
        r.add_get(f'{api}/chunks/{CHUNK}', self.read_chunk, allow_head=False)
        r.add_post(f'{api}/chunks/missing', self.missing)
        r.add_get(f'{api}/chunks', self.iter_chunks, allow_head=False)
        r.add_get(f'{api}/stats', self.stats, allow_head=False)
        r.add_get(f'{api}/damaged', self.damaged, allow_head=False)
        r.add_get(f'{api}/images', self.list_images, allow_head=False)
        r.add_get(f'{api}/images/{{image}}/versions', self.list_versions, allow_head=False)
        manifest = f'{api}/images/{{image}}/versions/{VERSION}'
        r.add_put(manifest, self.create_manifest)
        r.add_get(manifest, self.read_manifest, allow_head=False)
        r.add_delete(manifest, self.delete_manifest)
        attachments = f'{api}/images/{{image}}/attachments'
        r.add_put(attachments + '/{name}', self.write_attachment)
        r.add_get(attachments + '/{name}', self.read_attachment, allow_head=False)
        r.add_get(attachments, self.list_attachments, allow_head=False)
        r.add_delete(attachments + '/{name}', self.delete_attachment)
        r.add_delete(attachments, self.delete_attachments)
        r.add_post(f'{api}/locks', self.acquire)
        r.add_get(f'{api}/locks/{{lease}}', self.wait_lease, allow_head=False)
        r.add_post(f'{api}/locks/{{lease}}/renew', self.renew)
        r.add_delete(f'{api}/locks/{{lease}}', self.release)
        r.add_post(f'{api}/sessions', self.begin)
        r.add_put(f'{api}/sessions/{{session}}/chunks/{CHUNK}', self.put_chunk)
        r.add_post(f'{api}/sessions/{{session}}/commit', self.commit)
        r.add_delete(f'{api}/sessions/{{session}}', self.abort)
        r.add_post(f'{api}/gc/retain', self.retain)
        r.add_post(f'{api}/gc/purge', self.purge)

    async def call(self, fn, *args):
        """Run a blocking backend call in the pool."""
        return await asyncio.get_running_loop().run_in_executor(
            self.pool, functools.partial(fn, *args))

    async def wait_for(self, fn, *args):
        """Run a call that may wait for a lease up to MAX_LEASE_WAIT."""
        return await asyncio.get_running_loop().run_in_executor(
            self.wait_pool, functools.partial(fn, *args))

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except exception.VmcloudError as exc:
            error = exc
        except Exception as exc:  # noqa: B902 - the client gets an answer, the log the trace
            LOG.exception('%s %s failed', request.method, request.path)
            error = exception.StorageError(
                f'the warehouse service failed on {request.method} {request.path}: '
                f'{type(exc).__name__}: {exc}')
        status, body = protocol.encode_error(error)
        return web.Response(status=status, body=body, content_type='application/json')

    # -- chunks ------------------------------------------------------------------

    async def has_chunk(self, request: web.Request) -> web.Response:
        found = await self.call(self.backend.has_chunk, request.match_info['chunk_id'])
        self.counters['chunk_heads'] += 1
        return web.Response(status=200 if found else 404)

    async def read_chunk(self, request: web.Request) -> web.Response:
        data = await self.call(self.backend.read_chunk, request.match_info['chunk_id'])
        self.counters['chunk_gets'] += 1
        self.counters['chunk_get_bytes'] += len(data)
        return web.Response(body=data, content_type='application/octet-stream')

    async def missing(self, request: web.Request) -> web.Response:
        ids = (await _body_json(request)).get('chunks')
        if (not isinstance(ids, list) or len(ids) > protocol.MAX_MISSING_QUERY
                or not all(isinstance(i, str) and manifest_mod.CHUNK_ID.fullmatch(i) for i in ids)):
            raise protocol.RequestRefused(
                f'"chunks" must be a list of at most {protocol.MAX_MISSING_QUERY} chunk ids')
        self.counters['missing_queries'] += 1
        lacking = await self.call(self.backend.missing, ids)
        # In the order asked, each id once.
        return _json({'missing': [chunk_id for chunk_id in dict.fromkeys(ids)
                                  if chunk_id in lacking]})

    async def iter_chunks(self, request: web.Request) -> web.StreamResponse:
        chunks = await self.call(self.backend.iter_chunks)
        response = web.StreamResponse(headers={'Content-Type': 'text/plain'})
        first = await self.call(lambda: list(itertools.islice(chunks, _ITER_BATCH)))
        await response.prepare(request)
        batch = first
        while batch:
            await response.write(''.join(f'{c} {size}\n' for c, size in batch).encode())
            batch = await self.call(lambda: list(itertools.islice(chunks, _ITER_BATCH)))
        # The last line says the listing is whole: a cut connection is not a short list.
        await response.write(b'end\n')
        await response.write_eof()
        return response

    async def stats(self, request: web.Request) -> web.Response:
        chunk_bytes = await self.call(self.backend.stored_chunk_bytes)
        manifest_bytes = await self.call(self.backend.manifests_stored_bytes)
        return _json({'chunk_bytes': chunk_bytes, 'manifest_bytes': manifest_bytes,
                      'requests': dict(self.counters)})

    async def damaged(self, request: web.Request) -> web.Response:
        return _json({'damaged': await self.call(self.backend.damaged)})

    # -- manifests ---------------------------------------------------------------

    @staticmethod
    def _ref(request: web.Request) -> tuple[str, int]:
        return request.match_info['image'], int(request.match_info['version'])

    async def list_images(self, request: web.Request) -> web.Response:
        return _json({'images': await self.call(self.backend.list_images)})

    async def list_versions(self, request: web.Request) -> web.Response:
        versions = await self.call(self.backend.list_versions, request.match_info['image'])
        return _json({'versions': versions})

    async def create_manifest(self, request: web.Request) -> web.Response:
        data = await request.read()
        await self.call(self.backend.create_manifest, *self._ref(request), data)
        self.counters['manifest_puts'] += 1
        self.counters['manifest_put_bytes'] += len(data)
        return web.Response(status=201)

    async def read_manifest(self, request: web.Request) -> web.Response:
        image, version = self._ref(request)
        length = request.query.get('length')
        if length is None:
            data = await self.call(self.backend.read_manifest, image, version)
        else:
            count = int(_number(length, 'length'))
            data = await self.call(self.backend.read_manifest_prefix, image, version, count)
        return web.Response(body=data, content_type='application/octet-stream')

    async def delete_manifest(self, request: web.Request) -> web.Response:
        await self.call(self.backend.delete_manifest, *self._ref(request))
        return web.Response(status=204)

    # -- attachments -------------------------------------------------------------

    @staticmethod
    def _attachment(request: web.Request) -> tuple[str, str]:
        """(image, name) of the request. :raises: InvalidName."""
        image, name = request.match_info['image'], request.match_info['name']
        manifest_mod.validate_image_name(image)
        backend_mod.check_attachment(name)
        return image, name

    async def write_attachment(self, request: web.Request) -> web.Response:
        image, name = self._attachment(request)
        # Refused before the body is read: it may be up to client_max_size.
        backend_mod.check_attachment(name, request.content_length)
        data = await request.read()
        backend_mod.check_attachment(name, len(data))
        await self.call(self.backend.write_attachment, image, name, data)
        self.counters['attachment_puts'] += 1
        return web.Response(status=204)

    async def read_attachment(self, request: web.Request) -> web.Response:
        data = await self.call(self.backend.read_attachment, *self._attachment(request))
        if data is None:
            # No body: an absent attachment is an answer (None), not an error.
            return web.Response(status=404)
        return web.Response(body=data, content_type='application/octet-stream')

    async def list_attachments(self, request: web.Request) -> web.Response:
        image = manifest_mod.validate_image_name(request.match_info['image'])
        return _json({'attachments': await self.call(self.backend.list_attachments, image)})

    async def delete_attachment(self, request: web.Request) -> web.Response:
        await self.call(self.backend.delete_attachment, *self._attachment(request))
        return web.Response(status=204)

    async def delete_attachments(self, request: web.Request) -> web.Response:
        image = manifest_mod.validate_image_name(request.match_info['image'])
        await self.call(self.backend.delete_attachments, image)
        return web.Response(status=204)

    # -- leases ------------------------------------------------------------------

    @staticmethod
    def _lease_doc(lease: leases_mod.Lease) -> dict:
        return {'lease': lease.id, 'state': lease.state, 'ttl': lease.ttl}

    async def acquire(self, request: web.Request) -> web.Response:
        doc = await _body_json(request)
        lease = await self.call(
            self.leases.acquire, str(doc.get('kind')), doc.get('image'),
            _number(doc.get('ttl'), 'ttl', 30.0), _number(doc.get('timeout'), 'timeout'))
        wait = min(MAX_LEASE_WAIT, _number(doc.get('wait'), 'wait', 0.0))
        lease = await self.wait_for(self.leases.wait, lease.id, wait)
        return _json(self._lease_doc(lease), status=201)

    async def wait_lease(self, request: web.Request) -> web.Response:
        wait = min(MAX_LEASE_WAIT, _number(request.query.get('wait'), 'wait', 0.0))
        lease = await self.wait_for(self.leases.wait, request.match_info['lease'], wait)
        return _json(self._lease_doc(lease))

    async def renew(self, request: web.Request) -> web.Response:
        lease = await self.call(self.leases.renew, request.match_info['lease'])
        return _json(self._lease_doc(lease))

    async def release(self, request: web.Request) -> web.Response:
        await self.call(self.leases.release, request.match_info['lease'])
        return web.Response(status=204)

    # -- write sessions ----------------------------------------------------------

    async def begin(self, request: web.Request) -> web.Response:
        doc = await _body_json(request)
        session = await self.call(self.leases.begin, str(doc.get('lease')))
        return _json({'session': session.id}, status=201)

    async def put_chunk(self, request: web.Request) -> web.Response:
        chunk_id = request.match_info['chunk_id']
        data = await request.read()
        # A chunk id is its own integrity check: refuse bytes that are not the chunk.
        actual = hashlib.sha256(data).hexdigest()
        if actual != chunk_id:
            raise exception.CorruptChunk(chunk_id, actual)
        await self.call(self.leases.put, request.match_info['session'], chunk_id, data)
        self.counters['chunk_puts'] += 1
        self.counters['chunk_put_bytes'] += len(data)
        return web.Response(status=204)

    async def commit(self, request: web.Request) -> web.Response:
        stored = await self.call(self.leases.commit, request.match_info['session'])
        return _json({'stored_bytes': stored})

    async def abort(self, request: web.Request) -> web.Response:
        await self.call(self.leases.abort, request.match_info['session'])
        return web.Response(status=204)

    # -- gc ----------------------------------------------------------------------

    async def retain(self, request: web.Request) -> web.Response:
        lease = str(request.query.get('lease'))
        await self.call(self.leases.require, lease, ('exclusive',))
        # The referenced set is one id a line, read as it arrives: it can be large.
        referenced, complete = set(), False
        async for line in request.content:
            word = line.strip().decode('ascii', 'replace')
            if word == 'end':
                complete = True
                break
            if word:
                if not manifest_mod.CHUNK_ID.fullmatch(word):
                    raise protocol.RequestRefused(f'not a chunk id in the referenced set: '
                                                  f'{word[:70]!r}')
                referenced.add(word)
        if not complete:
            # A cut upload must not free the chunks it did not get to name.
            raise protocol.RequestRefused('the referenced set ended before its "end" line')
        await self.call(self.leases.require, lease, ('exclusive',))
        removed, freed = await self.call(self.backend.retain, referenced)
        return _json({'removed': removed, 'freed': freed})

    async def purge(self, request: web.Request) -> web.Response:
        removed = await self.call(self.leases.purge_abandoned, str(request.query.get('lease')))
        return _json({'removed': removed})

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.wait_pool.shutdown(wait=True, cancel_futures=True)
