"""The node's mirrors behind ``Mirrors``: in-process, and through the service's socket."""
import json
import os
import socket
import threading
from unittest import mock

import fixtures

from vmcloud import exception
from vmcloud.mirror import api
from vmcloud.mirror import dirtymap
from vmcloud.mirror import service as service_mod
from tests.unit.mirror import test_disk

CHUNK = test_disk.CHUNK


class LocalMirrorsTest(test_disk.MirrorTestCase):
    def setUp(self):
        super().setUp()
        self.conf.set_override('host', 'node1')
        self.logs = self.useFixture(fixtures.FakeLogger(name='vmcloud.mirror'))
        self.mirrors = api.LocalMirrors(self.conf, self.warehouse)
        self.addCleanup(self.mirrors.close)

    def directory(self, name: str) -> str:
        return os.path.join(self.mirrors.mirrors_path, name)

    def version_bytes(self, ref: str) -> bytes:
        manifest = self.warehouse.lookup(ref)
        return self.warehouse.read(manifest, 0, manifest.size)

    def test_create_holds_the_version_and_remove_releases_it(self):
        info = self.mirrors.create('vm1', 'img')
        self.assertEqual(api.MirrorInfo('vm1', self.mirrors.uri('vm1'), 'img:1'), info)
        self.assertIn('socket=', info.uri)
        self.assertEqual(['vm1'], self.mirrors.names())
        self.assertEqual(['mirror.node1.vm1'], self.warehouse.holders('img', 1))
        self.assertRaises(exception.ImageInUse, self.warehouse.delete, 'img', 1)
        self.mirrors.remove('vm1')
        self.assertEqual([], self.warehouse.holders('img', 1))
        self.assertFalse(os.path.exists(self.directory('vm1')))
        self.assertRaises(exception.MirrorNotFound, self.mirrors.remove, 'vm1')

    def test_a_create_that_fails_after_the_hold_leaves_no_hold_nor_directory(self):
        with mock.patch.object(self.mirrors, '_serve', side_effect=exception.NbdError('boom')):
            self.assertRaises(exception.NbdError, self.mirrors.create, 'vm1', 'img')
        self.assertEqual([], self.warehouse.holders('img', 1))
        self.assertFalse(os.path.exists(self.directory('vm1')))
        self.assertEqual([], self.mirrors.names())

    def test_a_hold_refused_fails_the_create_and_leaves_nothing(self):
        refused = exception.StorageError('warehouse unreachable')
        with mock.patch.object(self.warehouse, 'hold', side_effect=refused):
            error = self.assertRaises(exception.StorageError, self.mirrors.create, 'vm1', 'img')
        self.assertIs(refused, error)
        self.assertFalse(os.path.exists(self.directory('vm1')))
        self.assertEqual([], self.mirrors.names())

    def test_a_release_that_fails_is_a_warning_and_the_mirror_is_gone(self):
        self.mirrors.create('vm1', 'img')
        with mock.patch.object(self.warehouse, 'release',
                               side_effect=exception.StorageError('warehouse unreachable')):
            self.mirrors.remove('vm1')
        self.assertFalse(os.path.exists(self.directory('vm1')))
        self.assertIn('cannot release the hold mirror.node1.vm1 on img:1', self.logs.output)

    def test_needed_fetched_and_cached_bytes(self):
        self.mirrors.create('vm1', 'img')
        self.assertEqual(0, self.mirrors.needed_bytes('vm1'))
        self.assertEqual(0, self.mirrors.cached_bytes())
        disk = self.mirrors.get('vm1').disk
        disk.read(CHUNK + 5, 10)  # chunk 1
        disk.read(2 * CHUNK, 10)  # chunk 2, a hole: nothing needed from the image
        self.assertEqual(CHUNK, self.mirrors.needed_bytes('vm1'))
        self.assertEqual(len(self.warehouse.read_chunk(self.manifest.chunks[1])),
                         self.mirrors.fetched_bytes())
        self.assertEqual(CHUNK, self.mirrors.cached_bytes())  # the slot chunk 1 takes
        self.assertRaises(exception.MirrorNotFound, self.mirrors.needed_bytes, 'nosuch')

    def test_sync_makes_the_writes_durable_while_the_guest_runs(self):
        self.mirrors.create('vm1', 'img')
        disk = self.mirrors.get('vm1').disk
        disk.write(3 * CHUNK, b'W' * 100)

        def on_disk() -> set[int]:
            return dirtymap.DirtyMap(os.path.join(self.directory('vm1'), 'dirty'),
                                     self.manifest.chunk_count, self.manifest.chunk_size,
                                     self.manifest.size).indexes()
        self.assertEqual(set(), on_disk())  # acknowledged, not yet durable
        self.mirrors.sync('vm1')
        self.assertEqual({3}, on_disk())
        disk.write(4 * CHUNK, b'X')  # the disk still takes writes after a sync
        self.assertEqual(b'X', disk.read(4 * CHUNK, 1))
        self.assertRaises(exception.MirrorNotFound, self.mirrors.sync, 'nosuch')

    def two_guests_with_a_barrier(self) -> dict[str, bytes]:
        """vm1 and vm2 written, their barriers taken under 's1', then written again."""
        expected = {}
        for name, index, fill in (('vm1', 1, b'1'), ('vm2', 3, b'2')):
            self.mirrors.create(name, 'img')
            disk = self.mirrors.get(name).disk
            disk.write(index * CHUNK, fill * CHUNK)
            image = bytearray(self.image)
            image[index * CHUNK:(index + 1) * CHUNK] = fill * CHUNK
            expected[name] = bytes(image)
        results = self.mirrors.barrier('s1', ['vm1', 'vm2', 'nosuch'])
        self.assertEqual({'vm1': {'dirty_bytes': CHUNK}, 'vm2': {'dirty_bytes': CHUNK},
                          'nosuch': {'error': 'mirror nosuch not found'}}, results)
        # The guests run on: what they write now is not in this snapshot.
        self.mirrors.get('vm1').disk.write(CHUNK, b'later')
        self.mirrors.get('vm2').disk.write(5 * CHUNK, b'later')
        return expected

    def test_upload_stores_each_barrier_under_its_target_in_one_session(self):
        expected = self.two_guests_with_a_barrier()
        with mock.patch.object(self.warehouse, 'snapshot_many',
                               wraps=self.warehouse.snapshot_many) as snapshot_many:
            results = self.mirrors.upload('s1', {'vm1': 'vm1', 'vm2': 'vm2', 'vm3': 'vm3'})
        self.assertEqual(1, snapshot_many.call_count)
        self.assertEqual(['vm1', 'vm2'], snapshot_many.call_args.kwargs['targets'])
        self.assertEqual({'error': 'mirror vm3 has no barrier for snapshot s1'}, results['vm3'])
        for name in ('vm1', 'vm2'):
            self.assertEqual(CHUNK, results[name]['uploaded_bytes'], results)
            self.assertTrue(results[name]['version'].startswith(f'{name}:'), results)
            self.assertBytesEqual(expected[name], self.version_bytes(results[name]['version']))
        # The barriers are exited: new ones can be taken, and their copies are gone.
        for name in ('vm1', 'vm2'):
            self.assertNotIn('barrier-copies', os.listdir(self.directory(name)))
        self.assertEqual({'vm1': {'dirty_bytes': CHUNK}},
                         self.mirrors.barrier('s2', ['vm1']))
        # An upload of a key already uploaded has nothing left.
        self.assertEqual({'vm2': {'error': 'mirror vm2 has no barrier for snapshot s1'}},
                         self.mirrors.upload('s1', {'vm2': 'vm2'}))

    def scattered_writes(self) -> bytes:
        """vm1 with 4 KiB written in chunks 0, 1 (data) and 2 (a hole) and chunk 4 written
        whole, its barrier taken under 's1'; what the snapshot must read."""
        self.mirrors.create('vm1', 'img')
        disk = self.mirrors.get('vm1').disk
        image = bytearray(self.image)
        for offset, data in ((4096, b'a' * 4096), (CHUNK + 8192, b'b' * 4096),
                             (2 * CHUNK, b'c' * 4096), (4 * CHUNK, b'd' * CHUNK)):
            disk.write(offset, data)
            image[offset:offset + len(data)] = data
        self.assertEqual({'vm1': {'dirty_bytes': 3 * 4096 + CHUNK}},
                         self.mirrors.barrier('s1', ['vm1']))
        return bytes(image)

    def test_small_writes_are_stored_as_deltas_of_the_blocks_written(self):
        expected = self.scattered_writes()
        stats = self.mirrors.cache.stats
        self.assertEqual(0, stats.fetched_chunks)  # whole blocks: no fetch to write them
        result = self.mirrors.upload('s1', {'vm1': 'vm1'})['vm1']
        self.assertEqual(0, stats.fetched_chunks)  # nor to store them
        manifest = self.warehouse.lookup(result['version'])
        self.assertEqual([0, 1, 2], [i for i in range(manifest.chunk_count)
                                     if manifest.is_delta(i)])
        self.assertIsInstance(manifest.chunks[4], str)
        deltas = sum(len(self.warehouse.read_chunk(manifest.chunks[i][0])) for i in (0, 1, 2))
        self.assertEqual(CHUNK + deltas, result['uploaded_bytes'])
        self.assertLess(deltas, 3 * (4096 + 128))  # the blocks and a small header each
        self.assertBytesEqual(expected, self.version_bytes(result['version']))

    def test_a_chunk_compacted_reads_its_parent_through_the_nodes_cache(self):
        self.conf.set_override('delta_max_depth', 0, 'storage')
        expected = self.scattered_writes()
        cache = self.mirrors.cache
        with mock.patch.object(self.warehouse, 'read_chunk',
                               wraps=self.warehouse.read_chunk) as read_chunk:
            result = self.mirrors.upload('s1', {'vm1': 'vm1'})['vm1']
        manifest = self.warehouse.lookup(result['version'])
        self.assertFalse(manifest.has_deltas)
        # Chunks 0 and 1 needed their parent's bytes (the hole none): the node's cache
        # fetched them, so they are on the node for its other guests; none was read
        # around it.
        self.assertEqual(2, cache.stats.fetched_chunks)
        self.assertTrue(all(self.manifest.chunks[i] in cache for i in (0, 1)))
        read_chunk.assert_not_called()
        self.assertBytesEqual(expected, self.version_bytes(result['version']))

    def test_a_second_barrier_of_one_mirror_fails_it_alone(self):
        self.two_guests_with_a_barrier()
        results = self.mirrors.barrier('s2', ['vm1'])
        self.assertIn('already has a barrier open', results['vm1']['error'])
        # The first one is intact.
        self.assertIn('version', self.mirrors.upload('s1', {'vm1': 'vm1'})['vm1'])

    def test_a_failed_session_fails_every_item_and_exits_the_barriers(self):
        self.two_guests_with_a_barrier()
        with mock.patch.object(self.warehouse, 'snapshot_many',
                               side_effect=exception.WarehouseBusy('no session')):
            results = self.mirrors.upload('s1', {'vm1': 'vm1', 'vm2': 'vm2'})
        self.assertEqual({name: {'error': 'WarehouseBusy: no session'} for name in ('vm1', 'vm2')},
                         results)
        # vm2 wrote a block of a second chunk after the first barrier
        self.assertEqual({'vm1': {'dirty_bytes': CHUNK}, 'vm2': {'dirty_bytes': CHUNK + 4096}},
                         self.mirrors.barrier('s2', ['vm1', 'vm2']))

    def test_discard_exits_the_barriers_without_storing(self):
        self.two_guests_with_a_barrier()
        with mock.patch.object(self.warehouse, 'snapshot_many') as snapshot_many:
            self.mirrors.discard('s1')
            self.mirrors.discard('s1')  # idempotent
            self.assertEqual({'vm1': {'error': 'mirror vm1 has no barrier for snapshot s1'}},
                             self.mirrors.upload('s1', {'vm1': 'vm1'}))
        snapshot_many.assert_not_called()
        self.assertEqual({'vm1': {'dirty_bytes': CHUNK}}, self.mirrors.barrier('s2', ['vm1']))
        self.assertEqual([], self.warehouse.versions('vm1') if 'vm1' in self.warehouse.images()
                         else [])

    def test_a_barrier_after_its_discard_is_refused_and_left_open_nowhere(self):
        # Its caller gave up waiting for it, and discarded the key before it came.
        self.two_guests_with_a_barrier()
        self.mirrors.discard('s1')
        self.assertEqual({'vm1': {'error': 'snapshot s1 was discarded already'},
                          'vm2': {'error': 'snapshot s1 was discarded already'}},
                         self.mirrors.barrier('s1', ['vm1', 'vm2']))
        # The late barriers did not stay open: the next snapshot takes both.
        self.assertEqual({'vm1': {'dirty_bytes': CHUNK}, 'vm2': {'dirty_bytes': CHUNK + 4096}},
                         self.mirrors.barrier('s3', ['vm1', 'vm2']))

    def test_remove_exits_the_mirrors_barriers(self):
        self.two_guests_with_a_barrier()
        self.mirrors.remove('vm1')
        self.assertFalse(os.path.exists(self.directory('vm1')))
        results = self.mirrors.upload('s1', {'vm1': 'vm1', 'vm2': 'vm2'})
        self.assertIn('no barrier', results['vm1']['error'])
        self.assertIn('version', results['vm2'])

    def test_remove_waits_for_the_upload_reading_the_mirror(self):
        expected = self.two_guests_with_a_barrier()
        reading, go_on = threading.Event(), threading.Event()
        real = self.warehouse.snapshot_many

        def slow(items, targets=None, **options):
            reading.set()
            go_on.wait(30)
            return real(items, targets=targets, **options)
        results = {}
        with mock.patch.object(self.warehouse, 'snapshot_many', side_effect=slow):
            upload = threading.Thread(target=lambda: results.update(
                self.mirrors.upload('s1', {'vm1': 'vm1', 'vm2': 'vm2'})))
            upload.start()
            self.assertTrue(reading.wait(30))
            remove = threading.Thread(target=self.mirrors.remove, args=('vm1',))
            remove.start()
            remove.join(0.5)
            self.assertTrue(remove.is_alive(), 'remove did not wait for the upload')
            self.assertTrue(os.path.exists(self.directory('vm1')))
            go_on.set()
            upload.join(30)
            remove.join(30)
        self.assertBytesEqual(expected['vm1'], self.version_bytes(results['vm1']['version']))
        self.assertFalse(os.path.exists(self.directory('vm1')))

    def test_a_remove_the_upload_outlasts_is_refused_and_the_mirror_kept(self):
        self.conf.set_override('snapshot_upload_timeout', 1)
        self.two_guests_with_a_barrier()
        reading, go_on = threading.Event(), threading.Event()
        real = self.warehouse.snapshot_many

        def slow(items, targets=None, **options):
            reading.set()
            go_on.wait(30)
            return real(items, targets=targets, **options)
        results = {}
        with mock.patch.object(self.warehouse, 'snapshot_many', side_effect=slow):
            upload = threading.Thread(target=lambda: results.update(
                self.mirrors.upload('s1', {'vm1': 'vm1'})))
            upload.start()
            self.assertTrue(reading.wait(30))
            error = self.assertRaises(exception.MirrorError, self.mirrors.remove, 'vm1')
            self.assertIn('mirror vm1 is still being uploaded after 1 s', str(error))
            self.assertEqual(['vm1', 'vm2'], sorted(self.mirrors.names()))
            go_on.set()
            upload.join(30)
        self.assertIn('version', results['vm1'])
        self.mirrors.remove('vm1')
        self.assertEqual(['vm2'], self.mirrors.names())

    def test_close_exits_every_barrier_and_keeps_the_mirrors(self):
        self.two_guests_with_a_barrier()
        self.mirrors.close()
        for name in ('vm1', 'vm2'):
            self.assertNotIn('barrier-copies', os.listdir(self.directory(name)))
        again = api.LocalMirrors(self.conf, self.warehouse)
        self.addCleanup(again.close)
        again.open('vm1')
        self.assertEqual(b'later', again.get('vm1').disk.read(CHUNK, 5))


class ServiceTest(test_disk.MirrorTestCase):
    """The service in this process, its client over the real socket."""

    def setUp(self):
        super().setUp()
        self.conf.set_override('host', 'node1')
        self.logs = self.useFixture(fixtures.FakeLogger(name='vmcloud.mirror'))

    def start(self) -> service_mod.MirrorService:
        service = service_mod.MirrorService(self.conf, self.warehouse).start()
        self.addCleanup(service.stop)
        return service

    def raw(self, data: bytes) -> list[dict]:
        """The answers to ``data`` sent on one connection, until the service closes it."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(30)
            sock.connect(self.conf.mirror.control_socket)
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            received = b''
            while piece := sock.recv(65536):
                received += piece
        return [json.loads(line) for line in received.splitlines()]

    def test_errors_come_back_as_their_class_with_their_fields(self):
        self.start()
        client = api.RemoteMirrors(self.conf, timeout=30)
        error = self.assertRaises(exception.ImageNotFound, client.create, 'vm1', 'nosuch')
        self.assertEqual('nosuch', error.image)
        self.assertEqual('image nosuch not found', str(error))
        error = self.assertRaises(exception.MirrorNotFound, client.remove, 'vm9')
        self.assertEqual('vm9', error.name)
        info = client.create('vm1', 'img')
        self.assertEqual('img:1', info.image)
        self.assertRaises(exception.MirrorExists, client.create, 'vm1', 'img')
        self.assertEqual(['vm1'], client.names())
        self.assertRaises(exception.MirrorError, client.set_phase, 'vm1', 'nosuch-phase')

    def test_a_bad_request_is_answered_by_name_and_the_service_goes_on(self):
        self.start()
        answers = self.raw(b'not json\n{"method": "nosuch"}\n[1]\n'
                           b'{"method": "create", "args": {"bogus": 1}}\n'
                           b'{"method": "names", "args": []}\n{"method": "names"}\n')
        errors = [a.get('error', {}) for a in answers]
        self.assertEqual(['MirrorRequestInvalid'] * 5 + [''],
                         [e.get('class', '') for e in errors])
        self.assertIn('not JSON', errors[0]['message'])
        self.assertIn("unknown method 'nosuch'", errors[1]['message'])
        self.assertIn('"method" string', errors[2]['message'])
        self.assertIn('create: bad arguments', errors[3]['message'])
        self.assertIn('names: "args" is not an object', errors[4]['message'])
        self.assertEqual({'result': []}, answers[5])
        # Too long to frame: answered, and that connection is closed.
        answers = self.raw(b'x' * (api.MAX_REQUEST_BYTES + 10) + b'\n{"method": "names"}\n')
        self.assertEqual(1, len(answers))
        self.assertIn('request over', answers[0]['error']['message'])
        self.assertEqual([], api.RemoteMirrors(self.conf, timeout=30).names())

    def test_a_fault_inside_a_method_is_answered_and_the_service_goes_on(self):
        self.start()
        client = api.RemoteMirrors(self.conf, timeout=30)
        error = self.assertRaises(exception.VmcloudError, client.call, 'barrier', key='k',
                                  names=5)
        self.assertIs(exception.VmcloudError, type(error))
        self.assertIn('TypeError: ', str(error))
        self.assertIn('mirror service: request failed', self.logs.output)
        self.assertEqual([], client.names())

    def test_a_mirror_that_cannot_be_opened_is_logged_and_left_on_disk(self):
        first = self.start()
        client = api.RemoteMirrors(self.conf, timeout=30)
        client.create('good', 'img')
        client.create('bad', 'img')
        first.stop()
        dirty = os.path.join(first_path := self.conf.mirror.mirrors_path, 'bad', 'dirty')
        with open(dirty, 'wb') as f:
            f.write(b'garbage')
        self.start()
        self.assertEqual(['good'], client.names())
        self.assertIn('mirror bad in ', self.logs.output)
        self.assertIn('dirty map', self.logs.output)
        self.assertTrue(os.path.exists(dirty))
        self.assertEqual(sorted(['good', 'bad']), sorted(os.listdir(first_path)))

    def test_a_mirror_whose_create_was_cut_short_is_removed_and_made_again(self):
        os.makedirs(os.path.join(self.conf.mirror.mirrors_path, 'vm1'))  # killed there
        self.start()
        client = api.RemoteMirrors(self.conf, timeout=30)
        self.assertEqual([], client.names())
        self.assertIn('creation was cut short', self.logs.output)
        client.create('vm1', 'img')
        self.assertEqual(['vm1'], client.names())

    def test_a_second_service_is_refused_naming_the_first(self):
        self.start()
        error = self.assertRaises(exception.StateLocked, service_mod.MirrorService, self.conf,
                                  self.warehouse)
        self.assertIn('mirror service control socket at ', str(error))
        self.assertIn(f'pid {os.getpid()}', str(error))
        self.assertEqual({'pid': os.getpid(), 'mirrors': 0},
                         api.RemoteMirrors(self.conf, timeout=30).wait(30))

    def test_upload_answers_as_in_process(self):
        self.start()
        client = api.RemoteMirrors(self.conf, timeout=30)
        client.create('vm1', 'img')
        self.assertEqual({'vm1': {'error': 'mirror vm1 has no barrier for snapshot s1'}},
                         client.upload('s1', {'vm1': 'vm1'}))
        self.assertEqual({'vm1': {'dirty_bytes': 0}}, client.barrier('s1', ['vm1']))
        client.discard('s1')
        client.sync('vm1')
        self.assertEqual(0, client.needed_bytes('vm1'))
        self.assertEqual(0, client.fetched_bytes())
        self.assertEqual(0, client.cached_bytes())


class AbsentServiceTest(test_disk.MirrorTestCase):
    def setUp(self):
        super().setUp()
        self.logs = self.useFixture(fixtures.FakeLogger(name='vmcloud.mirror'))
        os.makedirs(self.state_path, exist_ok=True)
        self.path = self.conf.mirror.control_socket

    def test_no_socket_is_unavailable_naming_it(self):
        error = self.assertRaises(exception.MirrorServiceUnavailable,
                                  api.RemoteMirrors(self.conf, timeout=5).names)
        self.assertIn(f'mirror service at {self.path} is unavailable', str(error))
        self.assertEqual(self.path, error.socket)

    def test_wait_retries_logging_then_gives_up(self):
        error = self.assertRaises(exception.MirrorServiceUnavailable,
                                  api.RemoteMirrors(self.conf, timeout=5).wait, 0.5)
        self.assertIn(self.path, str(error))
        self.assertIn('retrying for', self.logs.output)

    def test_wait_finds_a_service_that_comes_up(self):
        started = threading.Timer(0.3, lambda: self.addCleanup(
            service_mod.MirrorService(self.conf, self.warehouse).start().stop))
        started.start()
        self.addCleanup(started.join)
        answer = api.RemoteMirrors(self.conf, timeout=5).wait(60)
        self.assertEqual(os.getpid(), answer['pid'])
        self.assertIn('retrying for', self.logs.output)

    def test_a_service_that_does_not_answer_fails_the_call_by_its_deadline(self):
        with socket.socket(socket.AF_UNIX) as mute:  # listens, never accepts nor answers
            mute.bind(self.path)
            mute.listen(4)
            error = self.assertRaises(exception.MirrorServiceUnavailable,
                                      api.RemoteMirrors(self.conf, timeout=0.3).names)
        self.assertIn('no answer to names within 0.3 s', str(error))

    def test_the_connection_ending_before_the_answer_is_unavailable(self):
        with socket.socket(socket.AF_UNIX) as dying:
            dying.bind(self.path)
            dying.listen(4)
            closer = threading.Thread(target=lambda: dying.accept()[0].close())
            closer.start()
            error = self.assertRaises(exception.MirrorServiceUnavailable,
                                      api.RemoteMirrors(self.conf, timeout=30).names)
            closer.join()
        # Depending on when the close lands: the request unsent, or the answer never read.
        self.assertRegex(str(error), 'the connection ended before the answer to names|'
                                     'names: (Broken pipe|Connection reset by peer)')
