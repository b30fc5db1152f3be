"""The http backend against a real warehouse service over loopback.

The whole backend conformance suite runs against a service (in this process,
over a file backend in the test's directory); the command, lease expiry and a
killed client run the service or the client in a child process.
"""
import hashlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from unittest import mock

from vmcloud import exception
from vmcloud.conf import warehouse as warehouse_conf
from vmcloud.storage import backend as backend_mod
from vmcloud.storage.backends import file as file_backend
from vmcloud.storage.backends import http as http_backend
from vmcloud.storage import protocol
from vmcloud.storage.service import server as server_mod
from vmcloud.storage import warehouse as warehouse_mod
from tests import base
from tests.functional.storage.silent_peer import SilentPeer
from tests.unit.storage import test_backend_conformance

TOKEN = 'test-token-0123456789'


class ServiceFixtureMixin:
    """A warehouse service over a file store in the test's directory, and its clients."""

    def start_service(self, **service_opts) -> server_mod.WarehouseServer:
        self.file_store = file_backend.FileBackend(self.conf)  # in $state_path/warehouse
        warehouse_conf.register_opts(self.conf)
        self.conf.set_override('port', 0, group='warehouse_service')
        self.conf.set_override('token', TOKEN, group='warehouse_service')
        for name, value in service_opts.items():
            self.conf.set_override(name, value, group='warehouse_service')
        service = server_mod.WarehouseServer(self.conf, backend=self.file_store)
        url = service.start()
        self.addCleanup(service.stop)
        self.conf.register_group(http_backend.HttpBackend.OPTION_GROUP)
        self.conf.register_opts(http_backend.HttpBackend.OPTIONS,
                                group=http_backend.HttpBackend.OPTION_GROUP)
        self.conf.set_override('url', url, group='storage_http')
        self.conf.set_override('token', TOKEN, group='storage_http')
        self.conf.set_override('timeout', 10, group='storage_http')
        self.conf.set_override('lock_wait', 30, group='storage_http')
        self.service = service
        return service

    def client(self) -> http_backend.HttpBackend:
        return http_backend.HttpBackend(self.conf)


class HttpBackendContractTest(ServiceFixtureMixin, test_backend_conformance.BackendContract,
                              base.TestCase):
    def make_backend(self) -> http_backend.HttpBackend:
        if not hasattr(self, 'service'):
            self.start_service()
        return self.client()

    def damage_item_holding(self, backend, chunk_id):
        # The service's store is a file store: damage the pack index holding the chunk.
        store = file_backend.FileBackend(self.conf)
        path = os.path.join(store.packs_dir, store.locate(chunk_id).pack + '.idx')
        with open(path, 'r+b') as f:
            f.seek(20)
            byte = f.read(1)[0]
            f.seek(20)
            f.write(bytes([byte ^ 0x01]))

    def test_capabilities(self):
        self.assertEqual(backend_mod.Capabilities.SHARED_ACROSS_HOSTS
                         | backend_mod.Capabilities.CROSS_HOST_LOCKING,
                         http_backend.HttpBackend.CAPABILITIES)

    def test_purge_counts_a_crashed_session_whose_upload_was_late(self):
        # The chunk reaches the service after the lease ended, or not at all: the
        # session is still abandoned, and purge_abandoned must say it removed it.
        upload = http_backend.HttpWriteSession._upload

        def late(session, chunk_id, data):
            time.sleep(0.5)
            upload(session, chunk_id, data)
        self.patch(http_backend.HttpWriteSession, '_upload', late)
        a = self.chunk()
        with self.backend.shared_lock():
            self.backend.begin_write().put_chunk(*a)
        with self.backend.exclusive_lock(5):
            self.assertGreaterEqual(self.backend.purge_abandoned(), 1)
        self.assertAbsent(self.backend, a[0])


class WarehouseOverHttpTest(ServiceFixtureMixin, base.TestCase):
    """The Warehouse, unchanged, over a remote store."""

    def setUp(self):
        super().setUp()
        self.start_service()
        self.warehouse = warehouse_mod.Warehouse(self.conf, backend=self.client())
        self.chunk_size = self.conf.storage.chunk_size
        rng = random.Random(3)
        self.raw = os.path.join(self.tmp, 'disk.raw')
        with open(self.raw, 'wb') as f:
            f.write(rng.randbytes(12 * self.chunk_size))
            f.truncate(16 * self.chunk_size)  # four holes at the end

    def requests(self) -> dict:
        return self.service.app.counters

    def test_holds_cross_the_wire_and_refuse_a_delete_on_another_client(self):
        self.warehouse.import_image(self.raw, 'disk', 'raw')
        self.warehouse.hold('disk:1', 'mirror.node1.vm-1a2b3c4d-0')
        other = warehouse_mod.Warehouse(self.conf, backend=self.client())  # another host
        other.hold('disk:1', 'snapshot.s1')
        self.assertEqual(['mirror.node1.vm-1a2b3c4d-0', 'snapshot.s1'],
                         self.warehouse.holders('disk', 1))
        error = self.assertRaises(exception.ImageHeld, other.delete, 'disk', 1)
        self.assertEqual(['mirror.node1.vm-1a2b3c4d-0', 'snapshot.s1'], error.holders)
        self.assertEqual([1], self.file_store.list_versions('disk'))
        self.warehouse.release('disk:1', 'mirror.node1.vm-1a2b3c4d-0')
        other.release('disk:1', 'snapshot.s1')
        self.assertEqual([], other.holders('disk', 1))
        other.delete('disk', 1)
        self.assertEqual([], self.file_store.list_images())

    def test_import_snapshot_export(self):
        imported = self.warehouse.import_image(self.raw, 'disk', 'raw').manifest
        # Every data chunk crossed once, in its own request: no whole-image body.
        self.assertEqual(12, self.requests()['chunk_puts'])
        self.assertEqual(12 * self.chunk_size, self.requests()['chunk_put_bytes'])

        modified = os.path.join(self.tmp, 'modified.raw')
        shutil.copyfile(self.raw, modified)
        with open(modified, 'r+b') as f:
            f.seek(5 * self.chunk_size)
            f.write(b'changed')
            f.seek(14 * self.chunk_size)
            f.write(b'new data in a hole')
        result = self.warehouse.snapshot_file(imported.ref, modified, 'raw')
        # Only the two new chunks were sent; the other ten the store had.
        self.assertEqual(14, self.requests()['chunk_puts'])
        self.assertEqual(14 * self.chunk_size, self.requests()['chunk_put_bytes'])
        self.assertEqual(2 * self.chunk_size, result.new_bytes)

        out = os.path.join(self.tmp, 'out.raw')
        other = warehouse_mod.Warehouse(self.conf, backend=self.client())
        other.export(other.lookup('disk:2'), out)
        with open(out, 'rb') as a, open(modified, 'rb') as b:
            self.assertBytesEqual(b.read(), a.read())
        self.assertEqual(['disk'], other.images())
        self.assertTrue(other.verify().ok)

    def test_snapshot_chunks_sends_only_changes_and_gc_runs_on_the_service(self):
        base_manifest = self.warehouse.import_image(self.raw, 'disk', 'raw').manifest
        before = self.requests()['chunk_puts']
        change = bytes([7]) * self.chunk_size
        snap = self.warehouse.snapshot_chunks(base_manifest.ref, {3: change, 4: change})
        self.assertEqual(before + 1, self.requests()['chunk_puts'])  # equal chunks once
        self.warehouse.delete('disk', snap.manifest.version)
        report = self.warehouse.gc()
        self.assertEqual(1, report.removed_chunks)
        self.assertEqual(12, len(dict(self.file_store.iter_chunks())))

    def test_writes_ask_once_per_batch_and_send_only_new_chunks(self):
        asked = []
        missing = self.file_store.missing
        # The service asks its backend once per question too (rados: per index shard).
        self.patch(self.file_store, 'missing', lambda ids: asked.append(1) or missing(ids))
        self.conf.set_override('chunk_size', 4096, 'storage')
        rng = random.Random(4)
        raw = os.path.join(self.tmp, 'small.raw')
        with open(raw, 'wb') as f:
            f.write(rng.randbytes(150 * 4096))
        imported = self.warehouse.import_image(raw, 'small', 'raw').manifest
        batch = http_backend.HttpWriteSession.MISSING_BATCH
        self.assertEqual(-(-150 // batch), self.requests()['missing_queries'])
        self.assertEqual(0, self.requests()['chunk_heads'])  # no question per chunk
        self.assertEqual(150, self.requests()['chunk_puts'])
        changes = {i: rng.randbytes(4096) for i in (3, 77, 149)}
        result = self.warehouse.snapshot_chunks(imported.ref, changes)
        self.assertEqual(-(-150 // batch) + 1, self.requests()['missing_queries'])
        self.assertEqual(153, self.requests()['chunk_puts'])  # the three changes only
        self.assertEqual(3 * 4096, result.new_bytes)
        self.assertEqual(0, self.requests()['chunk_heads'])
        self.assertEqual(self.requests()['missing_queries'], len(asked))

    def test_a_batch_is_asked_about_by_bytes_too(self):
        self.patch(warehouse_mod, 'MISSING_BATCH_BYTES', 3 * self.chunk_size)
        self.warehouse.import_image(self.raw, 'disk', 'raw')
        self.assertEqual(4, self.requests()['missing_queries'])  # 12 chunks, 3 a batch
        self.assertEqual(12, self.requests()['chunk_puts'])

    def test_a_chunk_another_writer_stored_after_the_question_is_still_stored(self):
        imported = self.warehouse.import_image(self.raw, 'disk', 'raw').manifest
        change = bytes([9]) * self.chunk_size
        change_id = hashlib.sha256(change).hexdigest()
        asked = http_backend.HttpWriteSession.missing
        other = self.client()

        def then_another_writer_stores_it(session, chunk_ids):
            lacking = asked(session, chunk_ids)
            self.assertEqual({change_id}, lacking)
            with other.shared_lock():
                racer = other.begin_write()
                racer.put_chunk(change_id, change)
                racer.commit()
            return lacking

        self.patch(http_backend.HttpWriteSession, 'missing', then_another_writer_stores_it)
        snap = self.warehouse.snapshot_chunks(imported.ref, {2: change}).manifest
        self.assertEqual(change, self.warehouse.read(snap, 2 * self.chunk_size,
                                                     self.chunk_size))
        self.assertTrue(self.warehouse.verify().ok)
        self.assertEqual(0, self.warehouse.gc().removed_chunks)  # one copy dropped at most
        self.assertEqual(change, self.client().read_chunk(change_id))

    def test_snapshot_many_uploads_each_shared_chunk_once(self):
        imported = self.warehouse.import_image(self.raw, 'disk', 'raw').manifest
        puts, queries = self.requests()['chunk_puts'], self.requests()['missing_queries']
        rng = random.Random(8)
        shared = [rng.randbytes(self.chunk_size) for _ in range(3)]
        items = [(imported.ref, {0: shared[0], 1: shared[1], 2: shared[2],
                                 3 + n: rng.randbytes(self.chunk_size)}) for n in range(8)]
        results = self.warehouse.snapshot_many(items)
        self.assertEqual(list(range(2, 10)), [r.manifest.version for r in results])
        self.assertEqual(puts + 3 + 8, self.requests()['chunk_puts'])  # unique chunks once
        self.assertEqual(queries + 1, self.requests()['missing_queries'])
        self.assertEqual((3 + 8) * self.chunk_size, sum(r.new_bytes for r in results))
        other = warehouse_mod.Warehouse(self.conf, backend=self.client())
        for n, result in enumerate(results):
            self.assertEqual(items[n][1][3 + n], other.read(
                other.manifest('disk', result.manifest.version),
                (3 + n) * self.chunk_size, self.chunk_size))
        self.assertTrue(other.verify().ok)

    def test_attachments_over_http(self):
        imported = self.warehouse.import_image(self.raw, 'disk', 'raw').manifest
        self.warehouse.write_attachment('disk', 'boot-profile', b'order')
        other = warehouse_mod.Warehouse(self.conf, backend=self.client())
        self.assertEqual(b'order', other.read_attachment('disk', 'boot-profile'))
        self.assertEqual(b'order', self.file_store.read_attachment('disk', 'boot-profile'))
        self.assertRaises(exception.ImageNotFound, other.write_attachment, 'none', 'p', b'x')
        other.delete('disk', imported.version)
        self.assertIsNone(self.file_store.read_attachment('disk', 'boot-profile'))


class ServiceEdgesTest(ServiceFixtureMixin, base.TestCase):
    def test_wrong_token_is_one_line_naming_the_url(self):
        self.start_service()
        self.conf.set_override('token', 'not-the-token-xyz', group='storage_http')
        error = self.assertRaises(protocol.Unauthorized, self.client().list_images)
        self.assertIn(self.service.url, str(error))
        self.assertNotIn(TOKEN, str(error))
        self.assertNotIn('not-the-token', str(error))
        self.conf.set_override('token', '', group='storage_http')
        self.assertRaises(protocol.Unauthorized, self.client().has_chunk, 'ab' * 32)

    def test_cli_with_a_wrong_token_or_url(self):
        self.start_service()
        config = self.write_config(
            storage={'backend': 'http'},
            storage_http={'url': self.service.url, 'token': 'wrong', 'connect_retries': 1})
        result = vmcloud_cli('--config-file', config, 'image', 'list')
        self.assert_one_line_error(result, self.service.url.encode(), b'refused')
        closed = f'http://127.0.0.1:{free_port()}'
        config = self.write_config(
            storage={'backend': 'http'},
            storage_http={'url': closed, 'token': TOKEN, 'connect_retries': 1})
        result = vmcloud_cli('--config-file', config, 'image', 'list')
        self.assert_one_line_error(result, closed.encode(), b'cannot reach')

    def test_anonymous_reads_only_when_allowed(self):
        self.start_service(allow_anonymous_reads=True)
        writer = self.client()
        writer.create_manifest('img', 1, b'{}')
        self.conf.set_override('token', '', group='storage_http')
        reader = self.client()
        self.assertEqual(b'{}', reader.read_manifest('img', 1))
        self.assertRaises(protocol.Unauthorized, reader.create_manifest, 'img', 2, b'{}')
        self.assertRaises(protocol.Unauthorized, reader.missing, ['ab' * 32])
        self.assertRaises(protocol.Unauthorized, reader.shared_lock().__enter__)
        writer.write_attachment('img', 'boot-profile', b'p')
        self.assertEqual(b'p', reader.read_attachment('img', 'boot-profile'))
        self.assertRaises(protocol.Unauthorized, reader.write_attachment,
                          'img', 'boot-profile', b'q')
        self.assertRaises(protocol.Unauthorized, reader.delete_attachments, 'img')
        self.assertEqual(b'p', writer.read_attachment('img', 'boot-profile'))

    def test_attachment_reads_need_the_token_unless_anonymous_reads(self):
        self.start_service()
        self.client().create_manifest('img', 1, b'{}')
        self.client().write_attachment('img', 'boot-profile', b'p')
        self.conf.set_override('token', '', group='storage_http')
        self.assertRaises(protocol.Unauthorized, self.client().read_attachment,
                          'img', 'boot-profile')

    def test_service_refuses_a_bad_or_too_large_attachment(self):
        self.start_service()
        client = self.client()
        client.create_manifest('img', 1, b'{}')
        client.write_attachment('img', 'p', b'old')
        too_big = bytes(backend_mod.MAX_ATTACHMENT_BYTES + 1)
        # Straight to the service, past the Warehouse's own checks.
        self.assertRaises(exception.AttachmentTooLarge, client.write_attachment,
                          'img', 'p', too_big)
        self.assertRaises(exception.InvalidName, client.write_attachment, 'img', '.p', b'x')
        self.assertRaises(exception.InvalidName, client.request, 'PUT',
                          '/images/im%20g/attachments/p', body=b'x')
        self.assertEqual(b'old', client.read_attachment('img', 'p'))
        self.assertEqual(b'old', self.file_store.read_attachment('img', 'p'))

    def test_tls_round_trip(self):
        cert, key = self.self_signed()
        self.start_service(cert_file=cert, key_file=key)
        self.assertTrue(self.service.url.startswith('https://127.0.0.1:'))
        self.conf.set_override('ca_file', cert, group='storage_http')
        client = self.client()
        with client.shared_lock():
            session = client.begin_write()
            data = b'tls' * 1000
            session.put_chunk(hashlib.sha256(data).hexdigest(), data)
            session.commit()
        self.assertEqual(data, self.client().read_chunk(hashlib.sha256(data).hexdigest()))
        # Without the CA the certificate is refused, naming the URL.
        self.conf.set_override('ca_file', None, group='storage_http')
        self.conf.set_override('connect_retries', 0, group='storage_http')
        error = self.assertRaises(exception.StorageError, self.client().list_images)
        self.assertIn(self.service.url, str(error))
        self.assertIn('CERTIFICATE_VERIFY_FAILED', str(error))

    def self_signed(self) -> tuple[str, str]:
        cert, key = os.path.join(self.tmp, 'cert.pem'), os.path.join(self.tmp, 'key.pem')
        subprocess.run(['openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '1',
                        '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1',
                        '-keyout', key, '-out', cert], check=True, capture_output=True,
                       timeout=60)
        return cert, key

    def test_corrupt_bytes_from_the_service_are_corrupt_chunk(self):
        self.start_service()
        data = b'x' * 5000
        chunk_id = hashlib.sha256(data).hexdigest()
        client = self.client()
        with client.shared_lock():
            session = client.begin_write()
            session.put_chunk(chunk_id, data)
            session.commit()
        with mock.patch.object(self.file_store, 'read_chunk', return_value=b'y' * 5000):
            error = self.assertRaises(exception.CorruptChunk, client.read_chunk, chunk_id)
        self.assertEqual(chunk_id, error.chunk_id)

    def test_service_refuses_bytes_that_are_not_the_chunk(self):
        self.start_service()
        client = self.client()
        with client.shared_lock():
            session = client.begin_write()
            session.put_chunk('ab' * 32, b'not that chunk')
            error = self.assertRaises(exception.CorruptChunk, session.commit)
            session.abort()  # as the Warehouse does: the service forgets the session
            self.assertEqual({}, self.service.leases._sessions)
        self.assertEqual('ab' * 32, error.chunk_id)
        self.assertEqual([], list(self.file_store.iter_chunks()))

    def test_caller_may_reuse_its_buffer_once_put_chunk_returns(self):
        # chunker.read_chunks hands out a ring of reused buffers.
        self.start_service()
        client = self.client()
        data = b'q' * 8192
        chunk_id = hashlib.sha256(data).hexdigest()
        buffer = bytearray(data)
        real = client.request
        sent, uploaded = threading.Event(), []

        def slow_upload(method, path, *args, **kwargs):
            if '/chunks/' in path and method == 'PUT':
                self.assertTrue(sent.wait(10))
                uploaded.append(path)
            return real(method, path, *args, **kwargs)

        with mock.patch.object(client, 'request', slow_upload), client.shared_lock():
            session = client.begin_write()
            session.put_chunk(chunk_id, memoryview(buffer))
            buffer[:] = bytes(len(buffer))  # the next chunk is read into it
            sent.set()
            session.commit()
        self.assertEqual(1, len(uploaded))  # the upload waited for the buffer's reuse
        self.assertEqual(data, client.read_chunk(chunk_id))

    def test_a_cut_referenced_set_frees_nothing(self):
        self.start_service()
        client = self.client()
        data = b'k' * 4096
        chunk_id = hashlib.sha256(data).hexdigest()
        with client.shared_lock():
            session = client.begin_write()
            session.put_chunk(chunk_id, data)
            session.commit()
        with client.exclusive_lock(5):
            lease = client._held()[-1]
            # No "end" line: as when the connection is cut part-way through the set.
            error = self.assertRaises(protocol.RequestRefused, client.request_json, 'POST',
                                      '/gc/retain', body=b'ab' * 32 + b'\n',
                                      fields={'lease': lease.id})
        self.assertIn('"end"', str(error))
        self.assertTrue(client.has_chunk(chunk_id))


class DeadlineTest(ServiceFixtureMixin, base.TestCase):
    """Every request to a warehouse that stops answering fails within its deadline,
    naming the warehouse and the request."""

    TIMEOUT = 0.5
    RETRIES = 3
    # Three times the deadline; the old client took (retries + 1) connect timeouts
    # plus its backoff: 3.4 s.
    BOUND = 1.5

    def setUp(self):
        super().setUp()
        self.start_service()
        self.conf.set_override('timeout', self.TIMEOUT, group='storage_http')
        self.conf.set_override('connect_retries', self.RETRIES, group='storage_http')

    def peer(self, **kwargs) -> SilentPeer:
        peer = SilentPeer(**kwargs)
        self.addCleanup(peer.close)
        return peer

    def client_of(self, url: str) -> http_backend.HttpBackend:
        self.conf.set_override('url', url, group='storage_http')
        return self.client()

    def assertFailsInTime(self, call, *args, operation: str, url: str):
        started = time.monotonic()
        error = self.assertRaises(exception.StorageError, call, *args)
        elapsed = time.monotonic() - started
        self.assertLess(elapsed, self.BOUND, f'{operation} took {elapsed:.1f} s: {error}')
        self.assertIn(url, str(error))
        self.assertIn(operation, str(error))
        self.assertNotIn('\n', str(error))
        return error

    def test_every_kind_of_request_to_a_dropping_or_mute_peer_fails_named(self):
        chunk_id = hashlib.sha256(b'x').hexdigest()
        for peer in (self.peer(dropping=True), self.peer()):
            client = self.client_of(peer.url)
            calls = [
                ((client.list_images,), 'GET /v1/images'),
                ((client.read_chunk, chunk_id), f'GET /v1/chunks/{chunk_id}'),
                ((client.has_chunk, chunk_id), f'HEAD /v1/chunks/{chunk_id}'),
                ((client.missing, [chunk_id]), 'POST /v1/chunks/missing'),
                ((client.read_manifest, 'img', 1), 'GET /v1/images/img/versions/1'),
                ((client.create_manifest, 'img', 1, b'm'), 'PUT /v1/images/img/versions/1'),
                ((client.list_attachments, 'img'), 'GET /v1/images/img/attachments'),
                ((client.shared_lock().__enter__,), 'POST /v1/locks'),
                ((client.iter_chunks().__next__,), 'GET /v1/chunks'),
            ]
            for call, operation in calls:
                error = self.assertFailsInTime(*call, operation=operation, url=peer.url)
                self.assertIn(f'no answer within {self.TIMEOUT:g} s', str(error))

    def test_a_streamed_listing_that_stalls_fails_named(self):
        peer = self.peer(prefix=b'HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n'
                                b'Transfer-Encoding: chunked\r\n\r\n'
                                b'4a\r\n' + b'a' * 64 + b' 4096\n' + b'b' * 8 + b'\r\n')
        chunks = self.client_of(peer.url).iter_chunks()
        self.assertFailsInTime(list, chunks, operation='GET /v1/chunks', url=peer.url)

    def test_a_warehouse_lost_while_a_lock_is_held_loses_the_lock_in_time(self):
        self.conf.set_override('lease_ttl', 0.6, group='storage_http')
        # A renewal must fail within a third of the TTL, not within the (longer)
        # timeout of requests, or the lease expires on the service unnoticed.
        self.conf.set_override('timeout', 10, group='storage_http')
        client = self.client()
        context = client.shared_lock()
        context.__enter__()
        lease = client._held()[-1]
        # From now on every request of this client, its renewals too, goes nowhere.
        client.url = self.peer(dropping=True).url
        started = time.monotonic()
        for _ in range(100):  # 5 s at most
            if lease.lost is not None:
                break
            time.sleep(0.05)
        self.assertIsNotNone(lease.lost)
        self.assertLess(time.monotonic() - started, self.BOUND)
        self.assertRaises(exception.LeaseLost, client.list_images)
        self.assertRaises(exception.LeaseLost, context.__exit__, None, None, None)

    def test_a_renewal_stuck_in_a_request_does_not_keep_the_lock(self):
        # Whatever the renewer waits on, the holder's own calls see that no renewal
        # got through for a whole TTL: the service has expired the lease by then.
        self.conf.set_override('lease_ttl', 0.6, group='storage_http')
        client = self.client()
        real_request = client.request
        answer = threading.Event()
        self.addCleanup(answer.set)

        def request(method, path, *args, **kwargs):
            if path.endswith('/renew'):
                answer.wait(20)
                raise exception.StorageError('injected: no answer')
            return real_request(method, path, *args, **kwargs)

        with mock.patch.object(client, 'request', request):
            context = client.shared_lock()
            context.__enter__()
            lease = client._held()[-1]
            for _ in range(200):
                try:
                    lease.check()
                except exception.LeaseLost as exc:
                    self.assertIn('no renewal reached the service for 0.6 s', str(exc))
                    break
                time.sleep(0.05)
            else:
                self.fail('the lease was never lost')
            self.assertRaises(exception.LeaseLost, context.__exit__, None, None, None)
            answer.set()


class LeaseTest(ServiceFixtureMixin, base.TestCase):
    def setUp(self):
        super().setUp()
        self.start_service()
        self.conf.set_override('lease_ttl', 0.6, group='storage_http')

    def test_lease_of_a_vanished_client_expires(self):
        # A child takes the shared lock with a short TTL, then is killed: gc's
        # exclusive lock must be granted once the lease expires, not never.
        config = self.write_config(storage={'backend': 'http'}, storage_http={
            'url': self.service.url, 'token': TOKEN, 'lease_ttl': 1})
        child = subprocess.Popen(
            [sys.executable, '-c', HOLDER, config], stdout=subprocess.PIPE)
        self.addCleanup(child.wait, 30)
        self.addCleanup(child.kill)
        self.assertEqual(b'held\n', child.stdout.readline())
        gc = self.client()
        self.assertRaises(exception.WarehouseBusy, gc.exclusive_lock(0.3).__enter__)
        child.kill()
        with gc.exclusive_lock(20):
            self.assertEqual(0, gc.purge_abandoned())

    def test_renewal_that_fails_makes_the_next_call_raise(self):
        client = self.client()
        real_request = client.request
        partitioned = threading.Event()

        def request(method, path, *args, **kwargs):
            if partitioned.is_set() and path.endswith('/renew'):
                raise exception.StorageError(f'cannot reach the warehouse at {client.url}')
            return real_request(method, path, *args, **kwargs)

        data = b'z' * 4096
        chunk_id = hashlib.sha256(data).hexdigest()
        with mock.patch.object(client, 'request', request):
            context = client.shared_lock()
            context.__enter__()
            session = client.begin_write()
            lease = client._held()[-1]
            partitioned.set()
            deadline = time.monotonic() + 20
            while lease.lost is None and time.monotonic() < deadline:
                time.sleep(0.05)
            self.assertIsNotNone(lease.lost)
            error = self.assertRaises(exception.LeaseLost, session.put_chunk, chunk_id, data)
            self.assertIn('shared lock', str(error))
            self.assertRaises(exception.LeaseLost, client.list_images)
            self.assertRaises(exception.LeaseLost, context.__exit__, None, None, None)
        session.abort()
        # The service expired it too: gc may run now.
        with self.client().exclusive_lock(10):
            pass
        self.assertEqual([], client._held())
        client.list_images()  # outside the lost lock, the instance works again

    def test_service_that_forgot_the_lease(self):
        client = self.client()
        context = client.shared_lock()
        context.__enter__()
        lease = client._held()[-1]
        session = client.begin_write()
        self.service.leases.release(lease.id)  # as after a restart, or a long pause
        deadline = time.monotonic() + 20
        while lease.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertIsInstance(lease.lost, exception.LeaseLost)
        self.assertRaises(exception.LeaseLost, session.commit)
        self.assertRaises(exception.LeaseLost, client.has_chunk, 'ab' * 32)
        session.abort()
        self.assertRaises(exception.LeaseLost, context.__exit__, None, None, None)

    def test_a_wait_longer_than_the_ttl_keeps_the_pending_lease(self):
        holder, waiter = self.client(), self.client()
        result = []

        def wait_for_it():
            try:
                with waiter.image_lock('img'):
                    result.append('held')
            except exception.VmcloudError as exc:
                result.append(exc)

        with holder.image_lock('img'):
            thread = threading.Thread(target=wait_for_it)
            thread.start()
            time.sleep(3 * 0.6)  # three TTLs, all of it inside the waiter's polls
        thread.join(20)
        self.assertEqual(['held'], result)

    def test_image_lock_gives_up_after_lock_wait(self):
        self.conf.set_override('lock_wait', 0.3, group='storage_http')
        with self.client().image_lock('img'):
            error = self.assertRaises(exception.WarehouseBusy,
                                      self.client().image_lock('img').__enter__)
            self.assertIn('image lock on img', str(error))
        with self.client().image_lock('img'):  # the abandoned wait left nothing held
            pass


class CommandTest(base.TestCase):
    def test_serves_until_sigterm(self):
        config = self.write_config(warehouse_service={'port': 0, 'token': TOKEN})
        child = subprocess.Popen(CLI + ['--config-file', config, 'warehouse'],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(child.wait, 30)
        self.addCleanup(lambda: child.poll() is None and child.kill())
        line = child.stdout.readline().decode()
        self.assertTrue(line.startswith('serving the warehouse on http://127.0.0.1:'), line)
        url = line.split()[-1]
        self.conf.register_group(http_backend.HttpBackend.OPTION_GROUP)
        self.conf.register_opts(http_backend.HttpBackend.OPTIONS,
                                group=http_backend.HttpBackend.OPTION_GROUP)
        self.conf.set_override('url', url, group='storage_http')
        self.conf.set_override('token', TOKEN, group='storage_http')
        client = http_backend.HttpBackend(self.conf)
        client.create_manifest('img', 1, b'{}')
        self.assertEqual(['img'], client.list_images())
        child.send_signal(signal.SIGTERM)
        self.assertEqual(0, child.wait(30))
        self.assertTrue(os.path.exists(os.path.join(
            self.state_path, 'warehouse', 'images', 'img', '1.json')))

    def test_refuses_to_start_without_a_token(self):
        config = self.write_config(warehouse_service={'port': 0})
        result = vmcloud_cli('--config-file', config, 'warehouse')
        self.assert_one_line_error(result, b'[warehouse_service] token')


CLI = [sys.executable, '-m', 'vmcloud.cmd.cli']

HOLDER = """
import sys, time
from oslo_config import cfg
import vmcloud.conf
from vmcloud.storage import backend
cfg.CONF(['--config-file', sys.argv[1]], project='vmcloud')
store = backend.load(cfg.CONF)
with store.shared_lock():
    print('held', flush=True)
    time.sleep(600)
"""


def vmcloud_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), capture_output=True, timeout=120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]
