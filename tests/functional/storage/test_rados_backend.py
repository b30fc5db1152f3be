"""The rados backend against the real single-node cluster of tools/ceph/start.sh.

Each test gets a RADOS namespace of its own, emptied afterwards, so tests do not see
each other's objects. Two backend instances stand for two hosts: each has its own
connection to the cluster, and nothing is shared between them but the cluster.
"""
import errno
import hashlib
import os
import random
import subprocess
import threading
import uuid
from unittest import mock

import rados

from vmcloud import exception
from vmcloud.storage import backend as backend_mod
from vmcloud.storage import warehouse
from vmcloud.storage.manifest import VersionRef
from vmcloud.storage.backends import rados as rados_backend
from tests import base
from tests.functional.storage.silent_peer import SilentPeer
from tests.unit.storage import test_backend_conformance

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
CEPH_DIR = os.environ.get('VMCLOUD_CEPH_DIR', os.path.join(REPO, '.cache', 'ceph'))
CHUNK = test_backend_conformance.CHUNK


class RadosTestCase(base.TestCase):
    def setUp(self):
        super().setUp()
        conffile = os.path.join(CEPH_DIR, 'ceph.conf')
        if not os.path.exists(os.path.join(CEPH_DIR, '.ready')):
            self.fail(f'no ceph cluster in {CEPH_DIR}: run tools/ceph/start.sh first')
        self.namespace = 'test-' + uuid.uuid4().hex
        self.conf.set_override('backend', 'rados', 'storage')
        self.conf.register_group(rados_backend.RadosBackend.OPTION_GROUP)
        self.conf.register_opts(rados_backend.RadosBackend.OPTIONS,
                                group=rados_backend.RadosBackend.OPTION_GROUP)
        for name, value in (('conffile', conffile),
                            ('keyring', os.path.join(CEPH_DIR, 'client.vmcloud.keyring')),
                            ('client_name', 'client.vmcloud'), ('pool', 'vmcloud'),
                            ('namespace', self.namespace), ('connect_timeout', 5),
                            ('op_timeout', 20), ('lock_wait', 30)):
            self.conf.set_override(name, value, 'storage_rados')
        cleaner = rados_backend.RadosBackend(self.conf)
        self.addCleanup(cleaner.close)
        self.addCleanup(self._empty_namespace, cleaner)

    def make_backend(self) -> rados_backend.RadosBackend:
        instance = rados_backend.RadosBackend(self.conf)
        self.addCleanup(instance.close)
        return instance

    def _empty_namespace(self, cleaner: rados_backend.RadosBackend) -> None:
        for obj in list(cleaner.ioctx.list_objects()):
            try:
                cleaner.ioctx.remove_object(obj.key)
            except rados.ObjectNotFound:
                pass


class RadosBackendTest(test_backend_conformance.BackendContract, RadosTestCase):
    make_backend = RadosTestCase.make_backend

    def damage_item_holding(self, backend, chunk_id):
        # The item that makes a chunk visible is its index entry: garble it.
        shard = rados_backend._shard(chunk_id)
        backend._write_op(shard, lambda op: backend.ioctx.set_omap(
            op, (chunk_id,), (b'\xffnot-a-length',)))

    def test_capabilities(self):
        self.assertEqual(backend_mod.Capabilities.SHARED_ACROSS_HOSTS
                         | backend_mod.Capabilities.CROSS_HOST_LOCKING,
                         rados_backend.RadosBackend.CAPABILITIES)

    def test_damaged_entry_is_named(self):
        a = self.chunk()
        self.store(self.backend, a)
        self.damage_item_holding(self.backend, a[0])
        [problem] = self.backend.damaged()
        self.assertIn(f'chunk index entry {a[0]}', problem)
        self.assertIn(f'namespace {self.namespace}', problem)

    def test_chunk_longer_than_the_configured_chunk_size(self):
        # Images keep the chunk size they were made with; a read must not cut them.
        data = self.rng.randbytes(3 * 4096)
        a = (hashlib.sha256(data).hexdigest(), data)
        self.store(self.backend, a)
        self.conf.set_override('chunk_size', 4096, 'storage')
        self.assertEqual(a[1], self.make_backend().read_chunk(a[0]))

    def test_manifests_move_in_pieces(self):
        # One op may not exceed osd_max_write_size: big manifests go in pieces.
        data = bytes(range(256)) * 40
        with mock.patch.object(rados_backend, '_PIECE', 1000):
            self.backend.create_manifest('img', 1, data)
            reader = self.make_backend()
            self.assertEqual(data, reader.read_manifest('img', 1))
            self.assertEqual(data[:2500], reader.read_manifest_prefix('img', 1, 2500))
            self.assertEqual(data, reader.read_manifest_prefix('img', 1, len(data) + 999))

    def test_prefix_reads_only_what_is_asked(self):
        self.backend.create_manifest('img', 1, b'x' * 100000)
        spy = mock.Mock(wraps=self.backend.ioctx)
        with mock.patch.object(self.backend, 'ioctx', spy):
            self.assertEqual(b'x' * 10, self.backend.read_manifest_prefix('img', 1, 10))
        self.assertEqual([10], [c.args[1] for c in spy.read.call_args_list])
        spy.stat.assert_not_called()

    def test_two_hosts_race_for_one_version(self):
        hosts = [self.make_backend() for _ in range(4)]
        for version in range(1, 6):
            barrier = threading.Barrier(len(hosts))
            outcome = {}

            def create(index, host):
                barrier.wait(30)
                try:
                    host.create_manifest('img', version, b'host %d' % index)
                    outcome[index] = 'won'
                except exception.VersionExists:
                    outcome[index] = 'lost'

            threads = [threading.Thread(target=create, args=(i, host))
                       for i, host in enumerate(hosts)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            winners = [i for i, result in outcome.items() if result == 'won']
            self.assertEqual(1, len(winners), outcome)
            self.assertEqual(len(hosts) - 1, list(outcome.values()).count('lost'))
            self.assertEqual(b'host %d' % winners[0],
                             self.make_backend().read_manifest('img', version))
        self.assertEqual([1, 2, 3, 4, 5], self.backend.list_versions('img'))
        # The losers left no manifest object behind.
        with self.backend.exclusive_lock(5):
            self.assertEqual(0, self.backend.purge_abandoned())

    def test_image_lock_excludes_another_host_until_released(self):
        self.conf.set_override('lock_wait', 0, 'storage_rados')
        other = self.make_backend()
        with self.backend.image_lock('img'):
            self.assertRaises(exception.WarehouseBusy, other.image_lock('img').__enter__)
            with other.image_lock('img2'):
                pass
        with other.image_lock('img'):
            pass

    def test_held_lock_outlives_its_duration(self):
        # Renewed while held: its expiry (in the lock's xattr) moves on, and another
        # host stays out past the lock's duration. The OSD lets an unrenewed lock go
        # up to about twice its duration late (measured), hence waiting 5x. A
        # duration of 2 s leaves a renewal 1.3 s to get through on a loaded machine.
        self.conf.set_override('lock_duration', 2, 'storage_rados')
        self.conf.set_override('lock_wait', 0, 'storage_rados')
        other = self.make_backend()

        def lock_state():
            return dict(self.backend.ioctx.get_xattrs('lock.warehouse'))['lock.vmcloud']

        with self.backend.shared_lock():
            taken = lock_state()
            threading.Event().wait(10)
            self.assertNotEqual(taken, lock_state())
            self.assertRaises(exception.WarehouseBusy, other.exclusive_lock(0).__enter__)
        with other.exclusive_lock(0):
            pass

    # -- a lock that is lost: the writer must stop, not carry on ---------------

    def _break(self, backend, held):
        """Break ``held`` as an operator (or a buggy host) would: ``rados lock break``."""
        command = ['rados', '--conf', os.path.join(CEPH_DIR, 'ceph.conf'),
                   '--name', 'client.vmcloud',
                   '--keyring', os.path.join(CEPH_DIR, 'client.vmcloud.keyring'),
                   '-p', 'vmcloud', '-N', self.namespace, 'lock', 'break', held._oid,
                   rados_backend._LOCK_NAME, f'client.{backend._cluster.get_instance_id()}',
                   '--lock-cookie', held._cookie]
        subprocess.run(command, check=True, capture_output=True, timeout=30)

    def _writing(self, chunk):
        """Inside a shared lock (entered, left to the test), a write session that put
        ``chunk``. :returns: (the lock's context, the session, the held lock)."""
        lock = self.backend.shared_lock()
        lock.__enter__()
        session = self.backend.begin_write()
        session.put_chunk(*chunk)
        return lock, session, self.backend._held()[-1]

    def _wait_until_lost(self, held):
        # Bounded: a renewal runs every third of the 2 s duration.
        for _ in range(300):
            if held.lost is not None:
                return
            threading.Event().wait(0.05)
        self.fail(f'{held.what} still believed held 15 s after it was lost')

    def _assert_write_refused(self, session, lock_context, why):
        b = self.chunk()
        for call, args in ((session.put_chunk, b), (session.commit, ())):
            error = self.assertRaises(exception.LeaseLost, call, *args)
            self.assertIn('the shared (writer) lock was lost', str(error))
            self.assertIn(f'namespace {self.namespace} object lock.warehouse', str(error))
            self.assertIn(why, str(error))
        error = self.assertRaises(exception.LeaseLost, lock_context.__exit__, None, None, None)
        self.assertIn(why, str(error))
        session.abort()
        return b

    def test_broken_shared_lock_stops_the_writer(self):
        self.conf.set_override('lock_duration', 2, 'storage_rados')
        gc_host = self.make_backend()
        a = self.chunk()
        lock, session, held = self._writing(a)
        self._break(self.backend, held)
        self._wait_until_lost(held)
        # Not taken back by the next renewal: gc on another host gets in.
        with gc_host.exclusive_lock(10):
            b = self._assert_write_refused(session, lock, 'another holder took it or broke it')
        self.assertAbsent(gc_host, a[0])
        self.assertAbsent(gc_host, b[0])
        self.assertEqual([], self.backend._held())

    def test_commit_asks_the_cluster_whether_the_lock_is_still_held(self):
        # Broken just now, ten seconds before the renewer's next round: what the
        # renewer last saw says "held", the cluster says otherwise, and the commit
        # believes the cluster (as after a freeze past the duration, when gc ran).
        self.conf.set_override('lock_duration', 30, 'storage_rados')
        a = self.chunk()
        lock, session, held = self._writing(a)
        self._break(self.backend, held)
        self.assertIsNone(held.lost)
        error = self.assertRaises(exception.LeaseLost, session.commit)
        self.assertIn('another holder took it or broke it', str(error))
        self.assertRaises(exception.LeaseLost, lock.__exit__, None, None, None)
        session.abort()
        self.assertAbsent(self.make_backend(), a[0])

    def test_commit_after_the_lock_was_left_is_refused(self):
        a = self.chunk()
        session = self._session_with(self.backend, a)
        error = self.assertRaises(exception.LeaseLost, session.commit)
        self.assertIn('the shared (writer) lock was released', str(error))
        session.abort()
        self.assertAbsent(self.make_backend(), a[0])

    def test_failing_renewals_lose_the_lock_after_its_duration(self):
        self.conf.set_override('lock_duration', 2, 'storage_rados')
        take = rados_backend._HeldLock._take

        def renewal_fails(held, duration, flags):
            if flags & rados_backend._LOCK_MUST_RENEW:
                raise exception.StorageError('injected: the cluster does not answer')
            return take(held, duration, flags)

        a = self.chunk()
        lock, session, held = self._writing(a)
        with mock.patch.object(rados_backend._HeldLock, '_take', renewal_fails):
            self._wait_until_lost(held)
            b = self._assert_write_refused(session, lock, 'past its duration of 2 s')
        self.assertIn('injected: the cluster does not answer', str(held.lost))
        self.assertAbsent(self.make_backend(), a[0])
        self.assertAbsent(self.make_backend(), b[0])
        self.store(self.backend, a)  # the backend itself is still usable

    def test_image_lock_taken_by_another_host_fails_the_block(self):
        self.conf.set_override('lock_duration', 2, 'storage_rados')
        other = self.make_backend()
        lock = self.backend.image_lock('img')
        lock.__enter__()
        held = self.backend._held()[-1]
        self._break(self.backend, held)
        with other.image_lock('img'):
            self._wait_until_lost(held)
        error = self.assertRaises(exception.LeaseLost, lock.__exit__, None, None, None)
        self.assertIn('the lock of image img was lost', str(error))
        self.assertIn('object lock.image.img', str(error))

    def test_renewal_stuck_in_a_call_does_not_keep_the_lock(self):
        # The renewer waits on a cluster that does not answer (yet): the writer's own
        # calls see that no renewal got through for the lock's duration.
        self.conf.set_override('lock_duration', 2, 'storage_rados')
        take = rados_backend._HeldLock._take
        answer = threading.Event()
        self.addCleanup(answer.set)

        def renewal_hangs(held, duration, flags):
            if flags & rados_backend._LOCK_MUST_RENEW:
                answer.wait(20)
                raise exception.StorageError('injected: no answer')
            return take(held, duration, flags)

        lock = self.backend.shared_lock()
        lock.__enter__()
        session = self.backend.begin_write()
        with mock.patch.object(rados_backend._HeldLock, '_take', renewal_hangs):
            held = self.backend._held()[-1]
            for _ in range(300):
                try:
                    held.check()
                except exception.LeaseLost:
                    break
                threading.Event().wait(0.05)
            answer.set()
            self._assert_write_refused(session, lock, 'past its duration of 2 s')

    def test_lock_lost_while_commit_waits_indexes_nothing(self):
        a = self.chunk()
        lock, session, held = self._writing(a)
        collect = rados_backend._Session._collect

        def lost_meanwhile(self_, block):
            collect(self_, block)
            held.lost = exception.StorageError('injected: lost during the wait')

        with mock.patch.object(rados_backend._Session, '_collect', lost_meanwhile):
            error = self.assertRaises(exception.LeaseLost, session.commit)
            self.assertIn('injected: lost during the wait', str(error))
            self.assertRaises(exception.LeaseLost, lock.__exit__, None, None, None)
            session.abort()
        self.assertAbsent(self.make_backend(), a[0])

    def test_lock_kept_through_the_block_raises_nothing_on_exit(self):
        # Renewals that succeed past the duration do not make the lock look lost.
        self.conf.set_override('lock_duration', 2, 'storage_rados')
        a = self.chunk()
        with self.backend.shared_lock():
            session = self.backend.begin_write()
            threading.Event().wait(5)
            session.put_chunk(*a)
            session.commit()
        self.assertTrue(self.make_backend().has_chunk(a[0]))

    def _session_with(self, backend, chunk):
        with backend.shared_lock():
            session = backend.begin_write()
            session.put_chunk(*chunk)
        return session

    def test_abort_keeps_a_chunk_another_writer_committed(self):
        a = self.chunk()
        first = self._session_with(self.backend, a)          # creates chunk.a
        other = self.make_backend()
        with other.shared_lock():
            second = other.begin_write()
            second.put_chunk(*a)                             # borrows it
            second.commit()
        first.abort()
        self.assertEqual(a[1], self.make_backend().read_chunk(a[0]))

    def test_abort_removes_the_objects_it_created(self):
        a = self.chunk()
        self._session_with(self.backend, a).abort()
        self.assertRaises(rados.ObjectNotFound, self.backend.ioctx.stat, f'chunk.{a[0]}')

    def test_shared_lock_is_released_after_the_writes_in_flight(self):
        # gc may start as soon as the lock is gone: no write of ours may land later.
        events = []
        real = self.backend.ioctx
        spy = mock.Mock(wraps=real)
        spy.unlock.side_effect = lambda *args: (events.append('unlock'), real.unlock(*args))
        finished = rados_backend._Session._finished

        def note(session, chunk_id, result):
            events.append('written')
            finished(session, chunk_id, result)

        big = self.rng.randbytes(8 * 1024 * 1024)  # long to write, so a race would show
        with mock.patch.object(rados_backend._Session, '_finished', note), \
                mock.patch.object(self.backend, 'ioctx', spy):
            with self.backend.shared_lock():
                self.backend.begin_write().put_chunk(hashlib.sha256(big).hexdigest(), big)
        self.assertEqual(['written', 'unlock'], events)

    def test_commit_fails_when_the_creator_aborted_first(self):
        a = self.chunk()
        first = self._session_with(self.backend, a)
        second = self._session_with(self.make_backend(), a)
        first.abort()
        error = self.assertRaises(exception.StorageError, second.commit)
        self.assertIn(f'chunk.{a[0]}', str(error))
        self.assertIsInstance(error.__cause__, rados.Error)
        second.abort()
        self.assertAbsent(self.make_backend(), a[0])

    def test_orphan_of_a_crashed_writer_is_adopted(self):
        # An object no index names (a writer died before commit) has whole bytes:
        # the next writer of that chunk indexes it instead of failing.
        a = self.chunk()
        self.backend.ioctx.write_full(f'chunk.{a[0]}', a[1])
        self.store(self.make_backend(), a)
        self.assertEqual(a[1], self.make_backend().read_chunk(a[0]))

    def test_errors_name_the_object_and_keep_the_cause(self):
        a = self.chunk()
        self.store(self.backend, a)
        failing = mock.Mock(wraps=self.backend.ioctx)
        failing.operate_read_op.side_effect = rados.IOError('injected', errno=errno.EIO)
        failing.aio_read.side_effect = rados.IOError('injected', errno=errno.EIO)
        with mock.patch.object(self.backend, 'ioctx', failing):
            error = self.assertRaises(exception.StorageError, self.backend.has_chunk, a[0])
            self.assertIn(f'pool vmcloud namespace {self.namespace} object '
                          f'{rados_backend._shard(a[0])}', str(error))
            self.assertIsInstance(error.__cause__, rados.IOError)
            self.assertRaises(exception.StorageError, self.backend.list_images)
        failing.operate_read_op.side_effect = None
        with mock.patch.object(self.backend, 'ioctx', failing):
            error = self.assertRaises(exception.StorageError, self.backend.read_chunk, a[0])
        self.assertNotIsInstance(error, exception.ChunkNotFound)
        self.assertIn(f'object chunk.{a[0]}', str(error))

    def test_missing_pool_is_named(self):
        self.conf.set_override('pool', 'no-such-pool', 'storage_rados')
        error = self.assertRaises(exception.StorageError, rados_backend.RadosBackend, self.conf)
        self.assertIn('pool no-such-pool', str(error))
        self.assertIsInstance(error.__cause__, rados.Error)

    def test_operation_timeouts_come_from_the_options(self):
        # A cluster that stops answering fails each operation after op_timeout
        # (librados' rados_osd_op_timeout, rados_mon_op_timeout), never hangs it.
        self.conf.set_override('op_timeout', 7, 'storage_rados')
        self.conf.set_override('connect_timeout', 3, 'storage_rados')
        cluster = self.make_backend()._cluster
        self.assertEqual(('7', '7', '3'), (cluster.conf_get('rados_osd_op_timeout'),
                                           cluster.conf_get('rados_mon_op_timeout'),
                                           cluster.conf_get('client_mount_timeout')))

    def test_a_monitor_that_drops_packets_fails_in_bounded_time(self):
        peer = SilentPeer(dropping=True)
        self.addCleanup(peer.close)
        port = peer.sock.getsockname()[1]
        conffile = os.path.join(self.tmp, 'ceph.conf')
        with open(os.path.join(CEPH_DIR, 'ceph.conf')) as src, open(conffile, 'w') as dst:
            for line in src:
                if line.strip().startswith('mon_host'):
                    line = f'mon_host = v2:127.0.0.1:{port}\n'
                dst.write(line)
        error = self.connect_failure(conffile, 'a silent monitor')
        self.assertIn(f'mon_host v2:127.0.0.1:{port}', str(error))
        self.assertIn('within 2 s', str(error))

    def connect_failure(self, conffile: str, what: str) -> exception.StorageError:
        """The error connecting through ``conffile`` raises, within 2 s of connect_timeout
        (a connect still going after 60 s fails the test)."""
        self.conf.set_override('conffile', conffile, 'storage_rados')
        self.conf.set_override('connect_timeout', 2, 'storage_rados')
        errors = []

        def connect():
            try:
                rados_backend.RadosBackend(self.conf)
            except exception.StorageError as exc:
                errors.append(exc)

        thread = threading.Thread(target=connect, daemon=True)
        thread.start()
        thread.join(60)
        self.assertFalse(thread.is_alive(), f'connecting to {what} hung')
        [error] = errors
        return error

    def test_unreachable_cluster_fails_in_bounded_time(self):
        conffile = os.path.join(self.tmp, 'ceph.conf')
        with open(os.path.join(CEPH_DIR, 'ceph.conf')) as src, open(conffile, 'w') as dst:
            # A port nothing listens on: the monitor never answers.
            dst.write(src.read().replace('mon_host = v2:127.0.0.1:', 'mon_host = v2:127.0.0.1:1'))
        error = self.connect_failure(conffile, 'a dead cluster')
        self.assertIn(conffile, str(error))
        self.assertIn('mon_host v2:127.0.0.1:1', str(error))
        self.assertIsInstance(error.__cause__, rados.Error)


class RadosWarehouseTest(RadosTestCase):
    def test_import_snapshot_export_gc(self):
        self.conf.set_override('chunk_size', 64 * 1024, 'storage')
        rng = random.Random(5)
        data = rng.randbytes(64 * 1024 * 6) + bytes(64 * 1024 * 2)
        path = os.path.join(self.tmp, 'disk.raw')
        with open(path, 'wb') as f:
            f.write(data)
        store = warehouse.Warehouse(self.conf)
        self.assertIsInstance(store.backend, rados_backend.RadosBackend)
        self.addCleanup(store.backend.close)
        base_version = store.import_image(path, 'disk').manifest
        new_chunk = rng.randbytes(64 * 1024)
        snap = store.snapshot_chunks(base_version.ref, {1: new_chunk}).manifest
        self.assertEqual(2, snap.version)

        elsewhere = warehouse.Warehouse(self.conf)  # another host
        self.addCleanup(elsewhere.backend.close)
        out = os.path.join(self.tmp, 'out.raw')
        elsewhere.export(elsewhere.manifest('disk', 2), out)
        expected = data[:64 * 1024] + new_chunk + data[2 * 64 * 1024:]
        with open(out, 'rb') as f:
            self.assertBytesEqual(expected, f.read())

        elsewhere.delete('disk', 2)
        report = store.gc()
        self.assertEqual((1, len(new_chunk)), (report.removed_chunks, report.freed_bytes))
        self.assertFalse(store.backend.has_chunk(hashlib.sha256(new_chunk).hexdigest()))
        with store.open(store.manifest('disk', 1)) as disk:
            self.assertBytesEqual(data, disk.read())

    def test_snapshot_many_attachments_and_batched_lookups(self):
        self.conf.set_override('chunk_size', 4096, 'storage')
        rng = random.Random(6)
        path = os.path.join(self.tmp, 'disk.raw')
        with open(path, 'wb') as f:
            f.write(rng.randbytes(4096 * 100))
        store = warehouse.Warehouse(self.conf)
        self.addCleanup(store.backend.close)
        lookups = []
        missing = store.backend.missing
        self.patch(store.backend, 'missing', lambda ids: lookups.append(len(ids)) or missing(ids))
        self.patch(store.backend, 'has_chunk', mock.Mock(side_effect=AssertionError(
            'the writer asks in batches, never one chunk at a time')))
        base_version = store.import_image(path, 'disk').manifest
        self.assertEqual([64, 36], lookups)
        shared = rng.randbytes(4096)
        results = store.snapshot_many([(base_version.ref, {0: shared, 1 + n: rng.randbytes(4096)})
                                       for n in range(4)])
        self.assertEqual([2, 3, 4, 5], [r.manifest.version for r in results])
        self.assertEqual(5 * 4096, sum(r.new_bytes for r in results))
        store.write_attachment('disk', 'boot-profile', b'order')
        elsewhere = warehouse.Warehouse(self.conf)  # another host
        self.addCleanup(elsewhere.backend.close)
        self.assertEqual(b'order', elsewhere.read_attachment('disk', 'boot-profile'))
        self.assertEqual(shared, elsewhere.read(elsewhere.manifest('disk', 4), 0, 4096))
        self.assertTrue(elsewhere.verify().ok)
        elsewhere.delete('disk')
        self.assertIsNone(store.read_attachment('disk', 'boot-profile'))
        self.assertEqual([], [obj.key for obj in store.backend.ioctx.list_objects()
                              if obj.key.startswith('attachment')])

    def test_holds_and_instance_snapshots_across_hosts(self):
        self.conf.set_override('chunk_size', 4096, 'storage')
        path = os.path.join(self.tmp, 'disk.raw')
        with open(path, 'wb') as f:
            f.write(random.Random(7).randbytes(4096 * 4))
        store = warehouse.Warehouse(self.conf)
        self.addCleanup(store.backend.close)
        elsewhere = warehouse.Warehouse(self.conf)  # another host
        self.addCleanup(elsewhere.backend.close)
        base_version = store.import_image(path, 'disk').manifest
        store.hold('disk:1', 'mirror.node1.vm-a-0')
        elsewhere.hold('disk:1', 'mirror.node2.vm-b-0')
        [snap] = elsewhere.snapshot_many([(base_version.ref, {0: b's' * 4096})],
                                         targets=['vm-b-0'])
        self.assertEqual(base_version, store.lookup('disk'))  # the base is still the image
        self.assertEqual(base_version.ref, store.lookup('vm-b-0:1').parent)
        store.delete('vm-b-0')
        error = self.assertRaises(exception.ImageHeld, store.delete, 'disk', 1)
        self.assertEqual(['mirror.node1.vm-a-0', 'mirror.node2.vm-b-0'], error.holders)
        store.release('disk:1', 'mirror.node1.vm-a-0')
        self.assertEqual(['mirror.node2.vm-b-0'], elsewhere.holders('disk', 1))
        elsewhere.delete('disk', force=True)
        self.assertEqual([], store.images())
        self.assertEqual([], store.backend.list_attachments('disk'))
        self.assertEqual(VersionRef('vm-b-0', 1), snap.manifest.ref)
