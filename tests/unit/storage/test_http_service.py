"""The warehouse service without a network: error mapping, auth, leases and sessions."""
import asyncio
import contextlib
import hashlib
import json
import os
import threading
import time
from unittest import mock

from aiohttp import test_utils
from aiohttp import web

from vmcloud import exception
from vmcloud.storage.backends import file as file_backend
from vmcloud.storage.service import app as app_mod
from vmcloud.storage.service import auth
from vmcloud.storage.service import leases as leases_mod
from vmcloud.storage import protocol
from tests import base

TOKEN = 's3cret-token'


class ErrorMappingTest(base.TestCase):
    def round_trip(self, error):
        status, body = protocol.encode_error(error)
        return status, protocol.decode_error(status, body, 'the warehouse at http://x')

    def test_every_class_comes_back_with_its_fields(self):
        cases = [
            (exception.ImageNotFound('img', 3), 404, ('image', 'version')),
            (exception.ImageNotFound('img'), 404, ('image', 'version')),
            (exception.ChunkNotFound('ab' * 32), 404, ('chunk_id',)),
            (exception.VersionExists('img', 2), 409, ('image', 'version')),
            (exception.ImageExists('img'), 409, ('image',)),
            (exception.CorruptChunk('ab' * 32, 'cd' * 32), 422, ('chunk_id',)),
            (exception.CorruptManifest('manifest img:1 is corrupt: x'), 500, ()),
            (exception.WarehouseBusy('busy after 5 s'), 503, ()),
            (exception.InvalidName("invalid image name '..'"), 400, ()),
            (exception.LeaseLost('lease ab was expired'), 410, ()),
            (protocol.Unauthorized('missing or wrong bearer token'), 401, ()),
            (exception.AttachmentTooLarge('attachment p of 2 bytes is larger'), 413, ()),
        ]
        for error, status, fields in cases:
            got_status, back = self.round_trip(error)
            self.assertEqual(status, got_status)
            self.assertIs(type(error), type(back))
            self.assertEqual(str(error), str(back))
            for name in fields:
                self.assertEqual(getattr(error, name), getattr(back, name))

    def test_an_unlisted_storage_error_keeps_its_message_as_its_nearest_class(self):
        _, back = self.round_trip(exception.ScratchSpaceExhausted('needs 5 bytes'))
        self.assertIs(exception.StorageError, type(back))
        self.assertEqual('needs 5 bytes', str(back))
        _, back = self.round_trip(exception.ConfigError('bad'))
        self.assertIs(exception.StorageError, type(back))

    def test_a_body_that_is_not_ours_names_where_and_the_status(self):
        error = protocol.decode_error(502, b'<html>Bad gateway</html>', 'the warehouse at W')
        self.assertIs(exception.StorageError, type(error))
        self.assertEqual('the warehouse at W answered HTTP 502: <html>Bad gateway</html>',
                         str(error))
        self.assertIn('no body', str(protocol.decode_error(500, b'', 'W')))


def run(coroutine):
    return asyncio.new_event_loop().run_until_complete(coroutine)


class AuthTest(base.TestCase):
    def call(self, method: str, headers: dict, anonymous_reads: bool = False):
        check = auth.middleware(TOKEN, anonymous_reads)
        reached = []

        async def handler(request):
            reached.append(request)
            return web.Response(status=200)

        request = test_utils.make_mocked_request(method, '/v1/images', headers=headers)
        response = run(check(request, handler))
        return response, bool(reached)

    def test_token_compared_whole(self):
        self.assertTrue(auth.token_ok(f'Bearer {TOKEN}', TOKEN))
        for header in (None, '', TOKEN, f'Bearer {TOKEN}x', f'Bearer {TOKEN[:-1]}',
                       f'Basic {TOKEN}', 'Bearer '):
            self.assertFalse(auth.token_ok(header, TOKEN), header)

    def test_refusal_names_nothing_secret(self):
        for headers in ({}, {'Authorization': 'Bearer guess-123'}):
            response, reached = self.call('GET', headers)
            self.assertFalse(reached)
            self.assertEqual(401, response.status)
            self.assertEqual('Bearer realm="vmcloud-warehouse"',
                             response.headers['WWW-Authenticate'])
            self.assertNotIn(TOKEN.encode(), response.body)
            self.assertNotIn(b'guess', response.body)
            self.assertEqual('Unauthorized', json.loads(response.body)['error'])
        response, reached = self.call('PUT', {'Authorization': f'Bearer {TOKEN}'})
        self.assertTrue(reached)

    def test_anonymous_reads_only_if_allowed_and_never_writes(self):
        self.assertFalse(self.call('GET', {})[1])
        self.assertTrue(self.call('GET', {}, anonymous_reads=True)[1])
        self.assertTrue(self.call('HEAD', {}, anonymous_reads=True)[1])
        for method in ('PUT', 'POST', 'DELETE'):
            self.assertFalse(self.call(method, {}, anonymous_reads=True)[1], method)

    def test_no_token_no_service(self):
        error = self.assertRaises(exception.ConfigError, auth.middleware, '', False)
        self.assertIn('[warehouse_service] token', str(error))


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class LeaseTableTest(base.TestCase):
    def setUp(self):
        super().setUp()
        self.store = file_backend.FileBackend(self.conf)
        self.clock = Clock()
        self.leases = leases_mod.LeaseTable(self.store, max_ttl=60, clock=self.clock)
        self.addCleanup(self.leases.close)

    def held(self, kind: str, image: str | None = None, ttl: float = 10,
             timeout: float | None = None) -> leases_mod.Lease:
        lease = self.leases.acquire(kind, image, ttl, timeout)
        self.assertTrue(lease.settled.wait(10))
        return lease

    def test_an_unrenewed_lease_expires_and_frees_the_lock(self):
        shared = self.held('shared')
        self.assertEqual('held', shared.state)
        self.assertRaises(exception.WarehouseBusy, self.store.exclusive_lock(0).__enter__)
        self.clock.now += 5
        self.leases.renew(shared.id)
        self.clock.now += 9
        self.assertEqual(0, self.leases.expire_due())  # renewed 9 s ago, TTL 10
        self.clock.now += 2
        self.assertEqual(1, self.leases.expire_due())
        self.assertEqual('expired', shared.state)
        with self.store.exclusive_lock(0):  # the backend's own lock is free again
            pass
        error = self.assertRaises(exception.LeaseLost, self.leases.renew, shared.id)
        self.assertIn('expired', str(error))

    def test_ttl_is_clamped(self):
        self.assertEqual(60, self.held('shared', ttl=10 ** 6).ttl)
        self.assertEqual(leases_mod.MIN_TTL, self.held('shared', ttl=0).ttl)

    def test_a_failed_exclusive_lock_reports_the_backends_error(self):
        self.held('shared')
        lease = self.held('exclusive', timeout=0)
        self.assertEqual('failed', lease.state)
        self.assertRaises(exception.WarehouseBusy, self.leases.renew, lease.id)

    def test_a_lease_given_up_while_pending_is_released_when_granted(self):
        first = self.held('image', 'img')
        waiting = self.leases.acquire('image', 'img', 10, None)
        self.assertFalse(waiting.settled.wait(0.1))
        self.leases.release(waiting.id)  # its client gave up
        self.leases.release(first.id)
        third = self.held('image', 'img')  # not blocked by the abandoned one
        self.assertEqual('held', third.state)
        self.assertEqual('released', waiting.state)

    def test_a_lock_granted_after_its_client_gave_up_is_exited(self):
        gate, log, contexts = threading.Event(), [], []

        class GateLock:
            def __enter__(self):
                gate.wait(10)
                log.append('enter')

            def __exit__(self, *exc_info):
                log.append('exit')

        def image_lock(image):
            contexts.append(GateLock())  # kept alive: only an explicit exit counts
            return contexts[-1]

        table = leases_mod.LeaseTable(mock.Mock(image_lock=image_lock), max_ttl=60)
        lease = table.acquire('image', 'img', 10, None)
        table.release(lease.id)
        gate.set()
        deadline = time.monotonic() + 10
        while log != ['enter', 'exit'] and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertEqual(['enter', 'exit'], log)

    def test_sessions_begin_in_the_thread_holding_the_lock_which_releases_it(self):
        # A backend ties a write session to the locks of the thread that begins it
        # (rados: it then fails with LeaseLost once that lock is lost).
        threads = {}

        class Lock:
            def __enter__(self):
                threads['enter'] = threading.current_thread()

            def __exit__(self, *exc_info):
                threads['exit'] = threading.current_thread()

        def begin_write():
            threads['begin'] = threading.current_thread()
            return mock.Mock()

        table = leases_mod.LeaseTable(mock.Mock(shared_lock=Lock, begin_write=begin_write),
                                      max_ttl=60)
        lease = table.acquire('shared', None, 10, None)
        self.assertTrue(lease.settled.wait(10))
        table.begin(lease.id)
        self.assertIs(threads['enter'], threads['begin'])
        self.assertIsNot(threading.current_thread(), threads['begin'])
        table.release(lease.id)
        self.assertIs(threads['enter'], threads.get('exit'))  # released on return
        self.assertRaises(exception.LeaseLost, table.begin, lease.id)

    def test_a_session_begun_after_the_caller_gave_up_is_aborted(self):
        began, go = threading.Event(), threading.Event()
        session = mock.Mock()

        def slow_begin_write():
            began.set()
            go.wait(10)
            return session

        table = leases_mod.LeaseTable(
            mock.Mock(shared_lock=contextlib.nullcontext, begin_write=slow_begin_write),
            max_ttl=60)
        lease = table.acquire('shared', None, 10, None)
        self.assertTrue(lease.settled.wait(10))
        self.patch(leases_mod, 'THREAD_WAIT', 0.05)
        error = self.assertRaises(exception.StorageError, table.begin, lease.id)
        self.assertIn('did not answer', str(error))
        self.assertTrue(began.is_set())
        go.set()
        table.release(lease.id)  # returns once the lock thread has finished the task
        session.abort.assert_called_once_with()

    def test_a_session_works_only_while_its_lease_is_held(self):
        lease = self.held('shared')
        session = self.leases.begin(lease.id)
        data = b'd' * 4096
        chunk_id = hashlib.sha256(data).hexdigest()
        self.leases.put(session.id, chunk_id, data)
        self.clock.now += 11
        self.leases.expire_due()
        self.assertRaises(exception.LeaseLost, self.leases.put, session.id, chunk_id, data)
        self.assertRaises(exception.LeaseLost, self.leases.commit, session.id)
        self.assertFalse(self.store.has_chunk(chunk_id))
        # Abandoned like a crashed writer's: purge removes its staged pack and the session.
        gc = self.held('exclusive', timeout=1)
        self.assertGreaterEqual(self.leases.purge_abandoned(gc.id), 1)
        self.assertRaises(protocol.RequestRefused, self.leases.session, session.id)
        self.assertEqual([], os.listdir(self.store.staging_dir))

    def test_sessions_and_gc_need_the_right_lease(self):
        image = self.held('image', 'img')
        self.assertRaises(protocol.RequestRefused, self.leases.begin, image.id)
        self.assertRaises(protocol.RequestRefused, self.leases.purge_abandoned, image.id)
        self.assertRaises(exception.LeaseLost, self.leases.begin, 'f' * 32)
        self.assertRaises(protocol.RequestRefused, self.leases.acquire, 'image', None, 1, None)
        self.assertRaises(protocol.RequestRefused, self.leases.acquire, 'bogus', None, 1, None)

    def test_an_orphan_session_is_aborted_one_ttl_after_its_lease_ended(self):
        lease = self.held('shared')
        session = self.leases.begin(lease.id)
        self.leases.put(session.id, hashlib.sha256(b'x').hexdigest(), b'x')
        self.leases.release(lease.id)
        self.leases.expire_due()
        self.assertNotEqual([], os.listdir(self.store.staging_dir))
        self.clock.now += 10
        self.leases.expire_due()
        self.assertEqual([], os.listdir(self.store.staging_dir))


class AppErrorsTest(base.TestCase):
    def test_backend_errors_become_their_json(self):
        store = file_backend.FileBackend(self.conf)
        leases = leases_mod.LeaseTable(store, max_ttl=60)
        service = app_mod.WarehouseApp(store, leases, TOKEN, threads=1)
        self.addCleanup(service.close)
        request = test_utils.make_mocked_request('GET', '/v1/images/img/versions/1')

        async def missing(request):
            raise exception.ImageNotFound('img', 1)

        async def broken(request):
            raise KeyError('boom')

        response = run(service._errors(request, missing))
        self.assertEqual(404, response.status)
        error = protocol.decode_error(response.status, response.body, 'W')
        self.assertEqual(('img', 1), (error.image, error.version))
        response = run(service._errors(request, broken))
        self.assertEqual(500, response.status)
        error = protocol.decode_error(response.status, response.body, 'W')
        self.assertIs(exception.StorageError, type(error))
        self.assertIn('GET /v1/images/img/versions/1', str(error))
